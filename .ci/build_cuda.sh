#!/usr/bin/env bash
# Compile check of the CUDA path (csrc/cuda/) on a machine without a GPU.
#
# Builds lowrank_merge._C with its CUDA kernels for sm_80 and sm_90 against a
# CUDA build of torch, in a separate venv and a copy of the sources (the
# working tree keeps its CPU build), and checks what the built library holds.
# It does not run the kernels: that needs a GPU (tests/test_cuda.py).
#
#   .ci/build_cuda.sh            # exit 0: built and checked, or skipped (no nvcc)
#
# Environment (all optional):
#   CUDA_HOME            toolkit with bin/nvcc             (default /usr/local/cuda)
#   LOWRANK_CUDA_VENV    venv with the CUDA torch, reused  (default /tmp/lowrank_cuda_venv)
#   LOWRANK_CUDA_TORCH   torch requirement for that venv   (default torch==2.14.1, CUDA 13.0)
#   LOWRANK_CUDA_PYTHON  interpreter that creates the venv (default python3.11)
#   TORCH_CUDA_ARCH_LIST                                   (default "8.0;9.0")
#   MAX_JOBS             parallel compile jobs             (default 2)
#   KEEP_BUILD=1         keep the temporary build directory
set -euo pipefail

start=$(date +%s)
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
NVCC="$CUDA_HOME/bin/nvcc"
if [ ! -x "$NVCC" ]; then
  echo "build_cuda: skipped: no CUDA compiler at $NVCC"
  exit 0
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${LOWRANK_CUDA_VENV:-/tmp/lowrank_cuda_venv}
TORCH_REQ=${LOWRANK_CUDA_TORCH:-torch==2.14.1}
PYTHON=${LOWRANK_CUDA_PYTHON:-python3.11}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export MAX_JOBS=${MAX_JOBS:-2}

log() { echo "build_cuda: $*"; }
# pip prints one warning per missing local index directory; keep real output.
quiet_pip() { "$VENV/bin/pip" "$@" 2>&1 | { grep -v '^WARNING: Location .* is ignored' || true; }; }

# 1. The venv with a CUDA torch (about 5 GB; created once, then reused).
torch_ok() {
  "$VENV/bin/python" - "$TORCH_REQ" <<'EOF' 2>/dev/null
import sys, torch
wanted = sys.argv[1].partition("==")[2]
ok = torch.version.cuda is not None and (not wanted or torch.__version__.split("+")[0] == wanted)
sys.exit(0 if ok else 1)
EOF
}
if [ -x "$VENV/bin/python" ] && torch_ok; then
  log "reusing $VENV"
else
  log "creating $VENV with $TORCH_REQ (a CUDA build; several GB)"
  "$PYTHON" -m venv "$VENV"
  quiet_pip install -q "$TORCH_REQ" setuptools wheel numpy ninja
  torch_ok || { log "FAILED: $VENV has no CUDA build of $TORCH_REQ"; exit 1; }
fi
"$VENV/bin/python" -c "import torch; print('build_cuda: torch', torch.__version__, 'CUDA', torch.version.cuda)"
"$NVCC" --version | tail -n 2 | sed 's/^/build_cuda: /'

# cuBLAS/cuSOLVER/cuSPARSE headers, which torch's CUDA headers include, come
# with the nvidia-* wheels torch depends on (the toolkit here has no cuBLAS).
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
NV_INCLUDE=() NV_LIB=()
for dir in "$SITE"/nvidia/*/include "$SITE"/nvidia/*/*/include; do [ -d "$dir" ] && NV_INCLUDE+=("$dir"); done
for dir in "$SITE"/nvidia/*/lib "$SITE"/nvidia/*/*/lib; do [ -d "$dir" ] && NV_LIB+=("$dir"); done
join() { local IFS=:; echo "$*"; }
export CPATH="$(join "${NV_INCLUDE[@]}")${CPATH:+:$CPATH}"
export LIBRARY_PATH="$(join "${NV_LIB[@]}")${LIBRARY_PATH:+:$LIBRARY_PATH}"

# 2. Build in a copy of the sources: the working tree holds an editable CPU
#    build of lowrank_merge._C that must not be overwritten.
WORK=$(mktemp -d /tmp/lowrank_cuda_build.XXXXXX)
if [ "${KEEP_BUILD:-0}" = 1 ]; then log "keeping $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
copy=(setup.py csrc lowrank_merge)
[ -f "$REPO/README.md" ] && copy+=(README.md)
tar -C "$REPO" --exclude='*.so' --exclude='__pycache__' --exclude='build' -cf - "${copy[@]}" | tar -C "$WORK" -xf -

log "building in $WORK (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
build_start=$(date +%s)
# CFLAGS=-g0 overrides the -g in Python's own CFLAGS: this library is thrown
# away, and debug info makes the host compiles markedly slower.
if ! (cd "$WORK" && LOWRANK_MERGE_FORCE_CUDA=1 CUDA_HOME="$CUDA_HOME" CFLAGS="${CFLAGS:-} -g0" \
      "$VENV/bin/python" setup.py build_ext --inplace) >"$WORK/build.log" 2>&1; then
  tail -n 80 "$WORK/build.log"
  log "FAILED: compile or link error (log above)"
  exit 1
fi
# Compiler warnings from our own sources, shown but not fatal.
grep -E "csrc/.*(warning|error)" "$WORK/build.log" | sed 's/^/build_cuda: /' || true

# 3. What the library must hold.
SO=$(ls "$WORK"/lowrank_merge/_C*.so 2>/dev/null | head -n 1 || true)
[ -n "$SO" ] || { log "FAILED: no lowrank_merge/_C*.so was built"; exit 1; }
log "built $(basename "$SO") ($(du -h "$SO" | cut -f1)) in $(( $(date +%s) - build_start )) s"
fail=0
check() {  # check DESCRIPTION COMMAND...: the command must succeed
  local what=$1; shift
  if "$@" >/dev/null 2>&1; then log "ok: $what"; else log "MISSING: $what"; fail=1; fi
}
check "the CUDA sources were compiled (nvcc ran for sm_80 and sm_90)" \
  bash -c "grep -q 'code=sm_80' '$WORK/build.log' && grep -q 'code=sm_90' '$WORK/build.log'"
check "the centering kernel (average_and_center_kernel) is in the library" \
  bash -c "nm -C '$SO' | grep -q 'average_and_center_kernel'"
check "the CUDA op kernels (centered_low_rank_sum_cuda, low_rank_factors_cuda) are in the library" \
  bash -c "nm -C '$SO' | grep -q 'centered_low_rank_sum_cuda' && nm -C '$SO' | grep -q 'low_rank_factors_cuda'"
check "the CUDA registration (the private op schema _cholesky_qr2) is in the library" \
  bash -c "strings '$SO' | grep -q '_cholesky_qr2(Tensor Y)'"
check "device code is embedded (.nv_fatbin section)" \
  bash -c "readelf -S -W '$SO' | grep -q '\.nv_fatbin'"
check "it links against torch's CUDA libraries (libc10_cuda, libtorch_cuda)" \
  bash -c "readelf -d '$SO' | grep -q 'libc10_cuda' && readelf -d '$SO' | grep -q 'libtorch_cuda'"
# The architectures of the embedded cubins, read from the fatbin headers.
if archs=$("$VENV/bin/python" - "$SO" <<'EOF'
import struct, sys
data = open(sys.argv[1], "rb").read()
found, pos = set(), data.find(struct.pack("<I", 0xBA55ED50))
while pos != -1:
    _, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
    entry, end = pos + header_size, pos + header_size + fat_size
    while entry < end:
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
        arch = struct.unpack_from("<I", data, entry + 28)[0]
        found.add(("sm_" if kind == 2 else "ptx_") + str(arch))
        entry += entry_header + payload
    pos = data.find(struct.pack("<I", 0xBA55ED50), end)
print(" ".join(sorted(found)))
EOF
); then
  log "embedded device code: ${archs:-none}"
  for arch in sm_80 sm_90; do
    case " $archs " in *" $arch "*) log "ok: $arch cubin present";; *) log "MISSING: $arch cubin"; fail=1;; esac
  done
else
  log "note: could not parse the fatbin headers; relying on the build log for the archs"
fi

# 4. Load it, where this machine can: CUDA torch imports without a GPU, and so
#    may the extension; then the dispatcher must list the CUDA kernels. An
#    unresolved symbol fails the check; a failure for want of a driver is
#    expected on some machines and only noted.
if out=$(cd "$WORK" && "$VENV/bin/python" - 2>&1 <<'EOF'
import torch
import lowrank_merge._C  # noqa: F401  (registers the ops)
has = torch._C._dispatch_has_kernel_for_dispatch_key
for op in ("centered_low_rank_sum", "low_rank_factors", "_cholesky_qr2"):
    assert has(f"lowrank_merge::{op}", "CUDA"), f"no CUDA kernel for lowrank_merge::{op}"
for op in ("centered_low_rank_sum", "low_rank_factors"):
    assert has(f"lowrank_merge::{op}", "CPU"), f"no CPU kernel for lowrank_merge::{op}"
print("CUDA and CPU kernels registered; torch.cuda.is_available() =", torch.cuda.is_available())
EOF
); then
  log "ok: import: $out"
elif grep -q "AssertionError" <<<"$out"; then
  echo "$out" | tail -n 5; log "FAILED: the ops are not registered as expected"; fail=1
elif grep -q "undefined symbol" <<<"$out"; then
  # A shared library links with unresolved symbols; they show up on loading.
  echo "$out" | tail -n 3; log "FAILED: the library has an unresolved symbol"; fail=1
else
  log "note: the module does not import here (expected without a GPU driver): $(tail -n 1 <<<"$out")"
fi

[ "$fail" = 0 ] || { log "FAILED: the built library lacks what is listed above"; exit 1; }
log "passed in $(( $(date +%s) - start )) s"
