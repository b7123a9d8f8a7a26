#!/usr/bin/env bash
# The GPU checks of a session that is lent a GPU machine, as one prepared call
# (the device tool: a bare machine with torch, nvcc and pytest, nothing to fetch,
# 15 minutes of device time in all; see docs/cuda.md "Tests and benchmark"):
#
#   run(command="OUT=$OUT bash benchmarks/device_check.sh", timeout_s=600)
#
# 1. builds the extension in place with its CUDA kernels (for the GPU's arch),
# 2. runs tests/test_cuda.py and tests/test_extension.py,
# 3. times the CUDA path with benchmarks/gpu_merge.py: ViT-B/32 x 8 first, then
#    the 4096 x 4096 and 4096 x 14336 layers, then ViT-L/14 x 20.
# Each step has its own time limit and writes under $OUT as it goes, so a step
# that runs out of time still leaves the earlier steps' logs and results.
# Commit what comes back under benchmarks/results/ with the device and date.
set -uo pipefail
out=${OUT:?set OUT to the folder whose files come back}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local status=$?
    echo "   exit $status after $((SECONDS - start)) s; last lines:"
    tail -n 15 "$out/$name.log" | sed 's/^/   /'
    return $status
}

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
    nvcc --version | tail -n 1
} | tee "$out/machine.txt"

step build 240 python3 setup.py build_ext --inplace || exit 1
python3 -c 'from lowrank_merge import _ops; assert _ops.extension_available() and _ops.has_kernel("cuda")' \
    || { echo "the extension has no CUDA kernels"; exit 1; }
step tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_extension.py
mkdir -p "$out/vit-b" "$out/layers" "$out/vit-l"
step bench_vit-b 60 python3 benchmarks/gpu_merge.py --cases 'ViT-B' --out "$out/vit-b"
step bench_layers 100 python3 benchmarks/gpu_merge.py --cases '4096' --out "$out/layers"
step bench_vit-l 60 python3 benchmarks/gpu_merge.py --cases 'ViT-L' --out "$out/vit-l"
exit 0
