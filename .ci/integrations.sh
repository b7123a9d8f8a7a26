#!/usr/bin/env bash
# Integration tests (tests/integrations): lowrank_merge inside mergekit 0.1.5 and
# FusionBench 0.2.33, and the PEFT-style functions on real PEFT adapters.
#
# Each toolkit gets its own virtual environment, so that the project's own
# dependencies stay light (FusionBench even pins pytest). The venvs are reused
# when they already hold the toolkit; set MERGEKIT_VENV / FUSION_BENCH_VENV to
# choose where they live. torch is installed first and pinned with a
# constraints file, so pip never swaps in a multi-GB CUDA build. lowrank_merge
# is installed editable without building the extension: the in-tree build of
# the main job (same torch) is used when present, the pure-torch path otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
MERGEKIT_VENV=${MERGEKIT_VENV:-$root/.venv-mergekit}
FUSION_BENCH_VENV=${FUSION_BENCH_VENV:-$root/.venv-fusionbench}
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "$TORCH_SPEC" >"$constraints"

# ensure_venv VENV MODULE PACKAGE...: a venv where MODULE and this checkout's lowrank_merge import.
ensure_venv() {
  local venv=$1 module=$2
  shift 2
  # -I: import from the venv only, never from the current directory.
  if ! "$venv/bin/python" -I -c "import $module, pytest" 2>/dev/null; then
    echo "integrations: $(date +%T) building $venv ($*)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --no-compile "$TORCH_SPEC" setuptools wheel
    "$venv/bin/pip" install -q --no-compile -c "$constraints" "$@" pytest
  fi
  if ! "$venv/bin/python" -I -c "import lowrank_merge, os, sys; sys.exit(not os.path.samefile(lowrank_merge.__path__[0], '$root/lowrank_merge'))" 2>/dev/null; then
    LOWRANK_MERGE_NO_EXTENSION=1 "$venv/bin/pip" install -q -c "$constraints" --no-build-isolation -e "$root"
  fi
}

# run_tests VENV REQUIRED: the integration tests; REQUIRED packages must not be skipped.
run_tests() {
  echo "integrations: $(date +%T) testing in $1 (requires $2)"
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LOWRANK_MERGE_REQUIRE=$2 \
    "$1/bin/python" -m pytest tests/integrations -q -rs -p no:cacheprovider
}

ensure_venv "$MERGEKIT_VENV" mergekit mergekit==0.1.5
ensure_venv "$FUSION_BENCH_VENV" fusion_bench fusion-bench==0.2.33

status=0
run_tests "$MERGEKIT_VENV" mergekit,peft,transformers || status=1
run_tests "$FUSION_BENCH_VENV" fusion_bench,peft || status=1
exit $status
