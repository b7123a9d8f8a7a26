"""The performance benchmark suite (issue 7): one run, every case, every method.

    python benchmarks/run.py --quick                      # dimensions / 16, <= 4 tasks: a smoke run (seconds)
    python benchmarks/run.py --threads 2 --skip-reference # full cases; dense reference extrapolated from 1 task
    python benchmarks/run.py --cases ViT-B --ratios 0.08 --json out.json

**Inputs.** Synthetic task stacks with the real 2-D weight shapes, made by
``gpu_merge.task_stack``: ``θ_t = B + 1e-3 · L_t R_t`` with a shared Gaussian
"pretrained" ``B`` and per-task Gaussian factors whose r = min(m, n) columns are
scaled by 1/(i + 1), so each centered task vector has a power-law singular
spectrum (σ_i ∝ 1/i, no gap at any k), like real fine-tuning deltas. Cases:

* ViT-B/32 visual-encoder shapes (open_clip names: in_proj, out_proj, c_fc,
  c_proj per block, x12, plus proj) with 8 tasks;
* ViT-L/14 shapes (x24 blocks) with 20 tasks;
* one 4096 x 4096 and one 4096 x 14336 layer, each with 4 and 8 tasks;
* ``eval-demo``: the fine-tuned task backbones of ``lowrank-merge demo``
  (seed 0, default config), read from its model cache when it is there
  (nothing is trained here: the case is skipped with a note otherwise).

Whole-model cases time one layer of each distinct shape and sum ``count x``
its time (the layers of one shape cost the same).

**Methods**, per case and rank ratio: every ``lowrank_merge`` engine through
``cart_layer_parts`` (the per-layer work of a merge: sketch draw, centering,
decomposition, sum; the default engine is marked), the reference path (a thin
fp32 ``torch.linalg.svd`` per centered task, truncated and summed, as the
paper's code does), ``torch.svd_lowrank`` per task (q = k + 10, niter = 2),
and as speed references for cheap methods: lowrank_merge's task arithmetic,
TIES and TSV-M, FusionBench's TSV-M and mergekit's task arithmetic / TIES
(only where those packages import; a note is printed otherwise).

**Reported**: wall time (median of ``--repeats`` warm runs when one run is
under 1 s, else the single run; with ``--warm-long-runs`` every method is
called once untimed first, as it runs in a model with many layers of a shape:
on VMs whose hypervisor backs fresh memory on first touch, a single cold run
of a large case pays for that too), speed-up over the reference path, peak
memory (CPU: the peak resident set above the one before the call, sampled from
/proc/self/statm every millisecond during the first call; CUDA: torch's
allocator peak above what was allocated before), the relative error
‖Δ − Δ_ref64‖_F / ‖Δ_ref64‖_F of the low-rank sum against a float64 dense
reference (thin float64 SVD per task; only on layers with at most
``--error-max-weights`` weights, the rest say n/a), and time / floor, where
floor = max(FLOPs / measured sgemm rate, minimal bytes / measured copy
bandwidth), a fixed yardstick: the FLOPs are the randomized engine's at
niter 2 (:func:`randomized_flops`; the accurate default does more), the
minimal bytes are reading the T inputs and writing the average and the delta
once. The sgemm rate (a 2048³ fp32 product)
and the copy bandwidth (a 256 MiB copy, read + write) are measured at the
start of the run with the same thread count.

**Streaming**: T synthetic sharded safetensors checkpoints written to a
temporary folder are merged by ``lowrank_merge.merge_checkpoints`` (CART,
default engine, rank ratio 0.02; and ``average``, the same I/O without a
decomposition) in a subprocess whose peak RSS comes from ``wait4``; the time
of the whole call is compared with reading every byte of the T inputs once
(``readinto``, the I/O floor), with a cold page cache (the files evicted with
``fsync`` + ``POSIX_FADV_DONTNEED``, no root needed) and a warm one. Beside
them: the same merges of the same tensors already in memory (no I/O), and
CART's FLOP floor (as above) for the case, each as a multiple of the reads.

Output: a table on stdout, ``--json PATH``, and (not with ``--quick``)
``benchmarks/results/run_<device>_<date>.md``.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import lowrank_merge as lm  # noqa: E402
from lowrank_merge import engines  # noqa: E402
from lowrank_merge.cart import ACCURATE_NITER, DEFAULT_NITER, DEFAULT_OVERSAMPLE  # noqa: E402
from lowrank_merge.selection import KeyFilter  # noqa: E402
from gpu_merge import (  # noqa: E402
    CASES as GPU_CASES,
    Case,
    device_name,
    measure,
    quick_case,
    reference_delta,
    reference_factors,
    svd_lowrank_delta,
    synchronize,
    task_stack,
)
from streaming_memory import build_models, run_measured  # noqa: E402

MiB = 2**20
RATIOS = (0.02, 0.08, 0.16)
_VIT_B, _VIT_L = GPU_CASES[0], GPU_CASES[1]
CASES = (
    _VIT_B,
    _VIT_L,
    Case("4096x4096 x 4 tasks", 4, ((4096, 4096, 1),)),
    Case("4096x4096 x 8 tasks", 8, ((4096, 4096, 1),)),
    Case("4096x14336 x 4 tasks", 4, ((4096, 14336, 1),)),
    Case("4096x14336 x 8 tasks", 8, ((4096, 14336, 1),)),
)
EVAL_CASE = "eval-demo task models"


# ---------------------------------------------------------------------------
# Machine rates and the floor
# ---------------------------------------------------------------------------


def sgemm_rates(device: torch.device, size: int = 2048) -> dict[str, float]:
    """FLOP/s of one fp32 ``size³`` product (median of 3 warm runs) by each library
    that can run it here: torch's matmul (the BLAS), and on the CPU oneDNN's
    inner product where torch has it (lowrank_merge's other CPU matmul backend)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    flops = 2.0 * size**3
    rates = {"torch.matmul": flops / measure(lambda: a @ b, device, repeats=3, long_run=10.0)["seconds"]}
    if device.type == "cpu" and engines.onednn_available():
        backend = lm.cpu_matmul_backend()
        lm.set_cpu_matmul_backend("onednn")
        try:
            seconds = measure(lambda: engines.matrix_product(a, b), device, repeats=3, long_run=10.0)["seconds"]
            rates["oneDNN"] = flops / seconds
        finally:
            lm.set_cpu_matmul_backend(backend)
    return rates


def copy_bandwidth(device: torch.device, mib: int = 256) -> float:
    """Bytes/s of a large fp32 copy, counting the read and the write."""
    x = torch.ones(mib * MiB // 4, device=device)
    y = torch.empty_like(x)
    return 2.0 * x.numel() * 4 / measure(lambda: y.copy_(x), device, repeats=5, long_run=10.0)["seconds"]


def _qr_flops(rows: int, cols: int) -> float:
    """Householder QR with the thin Q formed: 2·rows·cols² − (2/3)·cols³, twice (factor + form Q)."""
    return 2 * (2.0 * rows * cols**2 - 2.0 / 3.0 * cols**3)


def _lu_flops(rows: int, cols: int) -> float:
    """LU with partial pivoting of a tall ``rows x cols`` matrix: rows·cols² − cols³/3."""
    return rows * cols**2 - cols**3 / 3.0


def randomized_flops(T: int, m: int, n: int, k: int, niter: int = DEFAULT_NITER,
                     oversample: int = DEFAULT_OVERSAMPLE["randomized"]) -> float:
    """FLOPs of ``centered_low_rank_sum`` with the randomized engine, from its steps
    (``engines.randomized_svd``): per task, with l = k + oversample: A·Ω (2mnl);
    niter x [LU basis (m×l), Aᵀ·B (2mnl), LU basis (n×l), A·B (2mnl)]; QR of the
    last iterate with Q formed (m×l); Qᵀ·A (2mnl); the projection's l × l Gram
    matrix (2nl²) and its eigendecomposition (~9l³); W_kᵀ·(Qᵀ A) (2lkn) and Q·W_k
    (2mlk); once: mean and centering (2Tmn) and the sum of reconstructions as
    one GEMM (2mnTk)."""
    l = engines.sketch_width(k, oversample, m, n)
    per_task = (
        2.0 * m * n * l * (2 + 2 * niter)
        + (_lu_flops(m, l) + _lu_flops(n, l)) * niter
        + _qr_flops(m, l)
        + 2.0 * n * l**2 + 9.0 * l**3
        + 2.0 * l * k * n + 2.0 * m * l * k
    )
    return T * per_task + 2.0 * T * m * n + 2.0 * m * n * T * k


def floor_of(T: int, m: int, n: int, k: int, element: int, rates: dict) -> dict:
    flops = randomized_flops(T, m, n, k)
    nbytes = (T + 2) * m * n * element  # read the T inputs, write the average and the delta
    flop_s, byte_s = flops / rates["sgemm_flops"], nbytes / rates["copy_bytes"]
    return {"flops": flops, "bytes": nbytes, "flops_seconds": flop_s, "bytes_seconds": byte_s, "seconds": max(flop_s, byte_s)}


# ---------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc), so that a call's allocations raise the RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Peak resident set above the one at entry, sampled every ``interval`` s
    from /proc/self/statm (torch's CPU tensors bypass tracemalloc). Freed heap
    is trimmed first (glibc ``malloc_trim``), else reused pages would hide the
    call's allocations; short-lived peaks between samples can be missed."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak_extra = None

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def __enter__(self) -> "PeakRSS":
        _malloc_trim()
        self.start = self._rss()
        self.peak = self.start
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self._rss())
        self.peak_extra = self.peak - self.start


def timed(fn: Callable[[], object], device: torch.device, repeats: int, long_run: float = 1.0) -> dict:
    """:func:`gpu_merge.measure` with the peak memory of its first call added
    (a first call over ``long_run`` seconds is the measurement)."""
    first = {}

    def call():
        if first:
            return fn()
        if device.type == "cuda":
            first["peak"] = None  # measure() reads the allocator's peak
            return fn()
        with PeakRSS() as sampler:
            result = fn()
        first["peak"] = sampler.peak_extra
        return result

    timing = measure(call, device, repeats, long_run)
    if device.type != "cuda":
        timing["peak_extra_bytes"] = first["peak"]
    return timing


# ---------------------------------------------------------------------------
# Methods beside our engines
# ---------------------------------------------------------------------------

LAYER_NAME = "blocks.0.mlp.c_fc.weight"


def cheap_methods(stack: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Speed references: methods that do not depend on k. The base is a stand-in
    (the average): their cost does not depend on the values."""
    base = stack.mean(dim=0)
    tensors = list(stack)
    labels = [f"model {t}" for t in range(len(tensors))]
    methods: dict[str, Callable[[], object]] = {}
    for method, options in (("task_arithmetic", {}), ("ties", {"trim": "tensor"}), ("tsv", {})):
        settings = lm.method_settings(method, **options)  # TIES trimmed per tensor, as mergekit does
        methods[f"lowrank_merge {method}"] = (
            lambda settings=settings: lm.merge_method_tensor(LAYER_NAME, tensors, base, settings, labels)
        )
    try:
        from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
    except Exception as error:  # noqa: BLE001 - any import failure means "not available"
        _note(f"FusionBench TSV-M skipped: fusion_bench not importable ({type(error).__name__})")
    else:
        vectors = [{LAYER_NAME: tensor - base} for tensor in tensors]
        methods["FusionBench TSV-M"] = lambda: compute_and_sum_svd_mem_reduction(vectors, accelerator=str(stack.device))
    try:
        from mergekit.merge_methods import merge_state_dicts
    except Exception as error:  # noqa: BLE001
        _note(f"mergekit task arithmetic / TIES skipped: mergekit not importable ({type(error).__name__})")
    else:
        models = [{LAYER_NAME: tensor} for tensor in tensors] + [{LAYER_NAME: base}]
        methods["mergekit task_arithmetic"] = lambda: merge_state_dicts(
            models, "task_arithmetic", base=len(tensors), parameters={"weight": 1.0, "lambda": 1.0})
        methods["mergekit ties"] = lambda: merge_state_dicts(
            models, "ties", base=len(tensors), parameters={"weight": 1.0, "density": 0.2, "lambda": 1.0})
    return methods


_NOTES: list[str] = []


def _note(text: str) -> None:
    if text not in _NOTES:
        _NOTES.append(text)
        print(f"note: {text}", flush=True)


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------


def eval_demo_stacks(tasks: int | None) -> tuple[Case, list[torch.Tensor]] | None:
    """The cached task backbones of ``lowrank-merge demo`` (default config, seed 0):
    one [T, m, n] stack per matrix the reference key rule low-ranks. None if not cached."""
    try:
        from lowrank_merge.eval.benchmark import BenchmarkConfig, ModelCache, _task_key, default_cache_dir
    except Exception as error:  # noqa: BLE001
        _note(f"{EVAL_CASE} skipped: lowrank_merge.eval not importable ({type(error).__name__})")
        return None
    config = BenchmarkConfig()
    cache = ModelCache(default_cache_dir())
    names = config.tasks[:tasks] if tasks else config.tasks
    stored = [cache.get(_task_key(name, config.seeds[0], config)) for name in names]
    if any(model is None for model in stored):
        _note(f"{EVAL_CASE} skipped: not in the model cache (run `lowrank-merge demo` once to train them)")
        return None
    selection = lm.key_preset("reference")
    key_filter = KeyFilter.build(selection["include"], selection["exclude"])
    backbones = [{k[len("backbone."):]: v for k, v in model.items() if k.startswith("backbone.")} for model in stored]
    keys = [k for k, v in backbones[0].items() if key_filter.is_low_rank(k, v.shape, v.dtype)]
    stacks = [torch.stack([b[k].float() for b in backbones]) for k in keys]
    shapes = tuple((s.shape[1], s.shape[2], 1) for s in stacks)
    return Case(f"{EVAL_CASE} x {len(names)} tasks", len(names), shapes), stacks


def select_cases(args) -> list[tuple[Case, list[torch.Tensor] | None]]:
    cases: list[Case] = []
    for case in CASES:
        if not re.search(args.cases, case.name):
            continue
        if args.tasks:
            case = replace(case, name=re.sub(r"x \d+ tasks", f"x {args.tasks} tasks", case.name), tasks=args.tasks)
        if args.quick:
            case = quick_case(case)
        if all((c.tasks, c.shapes) != (case.tasks, case.shapes) for c in cases):  # quick mode merges 4 and 8 tasks
            cases.append(case)
    chosen: list[tuple[Case, list[torch.Tensor] | None]] = [(case, None) for case in cases]
    if re.search(args.cases, EVAL_CASE):
        found = eval_demo_stacks(args.tasks)
        if found is not None:
            chosen.append(found)
    return chosen


def run_case(case: Case, stacks: list[torch.Tensor] | None, args, device: torch.device, rates: dict) -> dict:
    dtype = torch.float32
    layers = []
    for index, (m, n, count) in enumerate(case.shapes):
        T = case.tasks
        stack = (stacks[index] if stacks is not None else task_stack(T, m, n, dtype, torch.device("cpu"), seed=index))
        stack = stack.to(device)
        print(f"  [{T}, {m}, {n}] x {count}", flush=True)
        shape_methods: dict[str, dict] = {}

        # The reference path: its cost does not depend on k (timed once, at the largest k).
        k_max = max(1, math.floor(max(args.ratios) * min(m, n)))
        if args.skip_reference:
            average = stack.mean(dim=0)
            one = timed(lambda: torch.linalg.svd(stack[0] - average, full_matrices=False), device, args.repeats, args.long_run)
            one.pop("result")
            one.update(seconds=T * one["seconds"], extrapolated=f"1 task, extrapolated x{T}")
            shape_methods["reference"] = one
        else:
            timing = timed(lambda: reference_delta(stack, k_max), device, args.repeats, args.long_run)
            timing.pop("result")
            shape_methods["reference"] = timing
        for name, fn in cheap_methods(stack).items():
            timing = timed(fn, device, args.repeats, args.long_run)
            timing.pop("result")
            shape_methods[name] = timing

        with_error = m * n <= args.error_max_weights
        factors64 = reference_factors(stack.to(torch.float64)) if with_error else None
        factors32 = reference_factors(stack) if with_error and not args.skip_reference else None
        for ratio in args.ratios:
            k = max(1, math.floor(ratio * min(m, n)))
            row = {"m": m, "n": n, "count": count, "tasks": T, "ratio": ratio, "k": k, "methods": {}}
            target = reference_delta(stack.to(torch.float64), k, factors64) if with_error else None

            def record(name: str, timing: dict, delta: torch.Tensor | None) -> None:
                entry = {key: value for key, value in timing.items() if key != "result"}
                if target is not None and delta is not None:
                    entry["rel_err"] = ((delta.double().cpu() - target.cpu()).norm() / target.norm()).item()
                row["methods"][name] = entry

            record("reference", shape_methods["reference"], reference_delta(stack, k, factors32) if factors32 else None)
            for engine in args.engines:
                timing = timed(lambda: lm.cart_layer_parts(stack, k, svd=engine, compute_dtype=dtype), device, args.repeats, args.long_run)
                record(f"ours:{engine}", timing, timing["result"][1])
            timing = timed(lambda: svd_lowrank_delta(stack, k), device, args.repeats, args.long_run)
            record("torch.svd_lowrank", timing, timing["result"])
            for name, timing in shape_methods.items():
                if name != "reference":
                    record(name, timing, None)
            row["floor"] = floor_of(T, m, n, k, stack.element_size(), rates)
            layers.append(row)
        del stack
        synchronize(device)
    return {"case": case.name, "tasks": case.tasks, "layers": layers, "totals": case_totals(layers, args.ratios),
            "error_layers": sum(1 for (m, n, _) in case.shapes if m * n <= args.error_max_weights),
            "distinct_shapes": len(case.shapes)}


def case_totals(layers: list[dict], ratios: list[float]) -> dict:
    """Per ratio and method: whole-case seconds (Σ count x layer time), the
    largest peak memory and error over the layers, speed-up and time / floor."""
    totals = {}
    for ratio in ratios:
        rows = [row for row in layers if row["ratio"] == ratio]
        floor = sum(row["count"] * row["floor"]["seconds"] for row in rows)
        methods: dict[str, dict] = {}
        for row in rows:
            for name, entry in row["methods"].items():
                total = methods.setdefault(name, {"seconds": 0.0, "peak_extra_bytes": None, "rel_err": None})
                total["seconds"] += row["count"] * entry["seconds"]
                if entry.get("peak_extra_bytes") is not None:
                    total["peak_extra_bytes"] = max(total["peak_extra_bytes"] or 0, entry["peak_extra_bytes"])
                if entry.get("rel_err") is not None:
                    total["rel_err"] = max(total["rel_err"] or 0.0, entry["rel_err"])
                if entry.get("extrapolated"):
                    total["extrapolated"] = entry["extrapolated"].split(",")[0] + ", extrapolated"
        reference = methods.get("reference", {}).get("seconds")
        for total in methods.values():
            total["speedup"] = reference / total["seconds"] if reference and total["seconds"] else None
            total["x_floor"] = total["seconds"] / floor if floor else None
        totals[str(ratio)] = {"floor_seconds": floor, "methods": methods}
    return totals


# ---------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------

STREAM_MERGE = """
import json, sys, time, lowrank_merge as lm
from pathlib import Path
from lowrank_merge.streaming import merge_checkpoints
from safetensors.torch import load_file
method, where, output, models = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
parameters = {"rank_ratio": 0.02} if method == "cart" else {}
if where == "memory":
    # Copies: load_file's tensors map the files, which would put page faults (or reads) in the timing.
    state_dicts = [{name: tensor.clone() for file in sorted(Path(model).glob("*.safetensors"))
                    for name, tensor in load_file(file).items()} for model in models]
    start = time.perf_counter()
    lm.merge(state_dicts, method, **parameters)
    print(json.dumps({"call_seconds": time.perf_counter() - start}))
else:
    start = time.perf_counter()
    result = merge_checkpoints(models, output, lm.method_settings(method, **parameters))
    call = time.perf_counter() - start
    print(json.dumps({"seconds": result.seconds, "call_seconds": call, "bytes_read": result.bytes_read}))
"""
#: The streaming merges: CART, and ``average``, which reads, checks and writes
#: everything as CART does but decomposes nothing (the I/O path alone).
STREAM_METHODS = ("cart", "average")


def _checkpoint_files(paths: list[Path]) -> list[Path]:
    return [file for path in paths for file in sorted(path.glob("*.safetensors"))]


def read_all(paths: list[Path], buffer: bytearray) -> int:
    """Read every byte of every checkpoint file once into memory (plain
    ``readinto`` in chunks of the caller's ``buffer``, allocated outside the
    timing: zero-filling 64 MiB alone takes ~50 ms on the VM). The fastest way
    to get the bytes, so the I/O floor. Returns the bytes read."""
    view = memoryview(buffer)
    total = 0
    for file in _checkpoint_files(paths):
        with open(file, "rb", buffering=0) as handle:
            while read := handle.readinto(view):
                total += read
    return total


def evict_from_page_cache(paths: list[Path]) -> None:
    """Drop the checkpoint files' pages from the page cache, without root:
    ``fsync`` (dirty pages cannot be dropped), then ``POSIX_FADV_DONTNEED``."""
    for file in _checkpoint_files(paths):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _stream_merge(method: str, where: str, output: Path, paths: list[Path], env: dict) -> dict:
    """Run :data:`STREAM_MERGE` in a subprocess: its times and its peak RSS."""
    merged = run_measured([sys.executable, "-c", STREAM_MERGE, method, where, str(output), *map(str, paths)], env)
    shutil.rmtree(output, ignore_errors=True)
    return {**json.loads(merged["stdout"].strip().splitlines()[-1]), "maxrss": merged["maxrss"]}


def run_streaming(args, rates: dict) -> dict:
    """Merge T checkpoints from disk against reading them once, with a cold
    page cache (the files evicted first: what merging models larger than RAM
    sees) and a warm one (every file just read). Beside them, the same merges
    of the same tensors already in memory (no I/O at all) and CART's FLOP floor
    at the measured sgemm rate: what a streaming merge cannot go below,
    however well it overlaps reading, computing and writing."""
    T, layers, dim = args.stream_models, *args.stream_shape
    rank_ratio = 0.02
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    env[engines.CPU_MATMUL_ENV] = lm.cpu_matmul_backend()
    k = max(1, math.floor(rank_ratio * dim))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = build_models(tmp, T, layers, dim, 2, "float32")
        buffer = bytearray(64 * MiB)
        result: dict = {
            "models": T, "layers": layers, "dim": dim, "rank_ratio": rank_ratio, "largest_tensor_bytes": dim * dim * 4,
            "cart_flop_floor_seconds": layers * floor_of(T, dim, dim, k, 4, rates)["flops_seconds"],
        }
        for cache in ("cold", "warm"):
            reads = []
            for _ in range(args.repeats):
                if cache == "cold":
                    evict_from_page_cache(paths)
                else:
                    read_all(paths, buffer)
                start = time.perf_counter()
                result["input_bytes"] = read_all(paths, buffer)
                reads.append(time.perf_counter() - start)
            read_seconds = statistics.median(reads)
            result[cache] = {"read_seconds": read_seconds}
            for method in STREAM_METHODS:
                evict_from_page_cache(paths) if cache == "cold" else read_all(paths, buffer)
                times = _stream_merge(method, "disk", tmp / "merged", paths, env)
                result[cache][method] = {
                    "merge_seconds": times["seconds"], "call_seconds": times["call_seconds"],
                    "x_io_floor": times["call_seconds"] / read_seconds, "peak_rss_bytes": times["maxrss"],
                }
        result["in_memory_seconds"] = {
            method: _stream_merge(method, "memory", tmp / "merged", paths, env)["call_seconds"] for method in STREAM_METHODS
        }
        result["baseline_rss_bytes"] = run_measured([sys.executable, "-c", "import torch, lowrank_merge"], env)["maxrss"]
    return result


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _fmt_seconds(value: float) -> str:
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def tables(report: dict) -> list[str]:
    lines = []
    memory = "peak extra MiB (" + ("allocator" if report["device_type"] == "cuda" else "RSS, sampled") + ")"
    for case in report["cases"]:
        lines += ["", f"## {case['case']}", ""]
        if case["error_layers"] < case["distinct_shapes"]:
            lines.append(f"rel. error on {case['error_layers']} of {case['distinct_shapes']} distinct shapes "
                         f"(layers over --error-max-weights: n/a)")
        lines.append("Times: whole case (Σ over layers x count), one layer of each distinct shape timed.")
        for ratio, total in case["totals"].items():
            lines += ["", f"rank ratio {ratio}: floor {_fmt_seconds(total['floor_seconds'])}", ""]
            header = ["method", "time", "speed-up vs reference", memory, "rel. error vs float64", "x floor"]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for name, entry in total["methods"].items():
                label = name + (" (default)" if name == "ours:auto" else "")
                seconds = _fmt_seconds(entry["seconds"]) + (f" ({entry['extrapolated']})" if entry.get("extrapolated") else "")
                cells = [
                    label,
                    seconds,
                    f"{entry['speedup']:.1f}x" if entry["speedup"] else "",
                    f"{entry['peak_extra_bytes'] / MiB:.1f}" if entry["peak_extra_bytes"] is not None else "",
                    f"{entry['rel_err']:.1e}" if entry["rel_err"] is not None else ("n/a" if name.startswith(("ours", "ref", "torch")) else ""),
                    f"{entry['x_floor']:.1f}" if entry["x_floor"] else "",
                ]
                lines.append("| " + " | ".join(cells) + " |")
    stream = report.get("streaming")
    if stream:
        lines += [
            "", "## Streaming merge from disk", "",
            f"{stream['models']} checkpoints of {stream['layers']} x {stream['dim']}² float32 (+ biases, norms), "
            f"{stream['input_bytes'] / MiB:.1f} MiB in all: CART (default engine) at rank ratio {stream['rank_ratio']}, "
            "and `average`, which reads, checks and writes the same but decomposes nothing (the I/O path alone). "
            "Cold: the files evicted from the page cache first (fsync + POSIX_FADV_DONTNEED), as when merging "
            "models larger than RAM; warm: every file read just before. The floor reads every byte once with readinto. "
            "The call is the whole `merge_checkpoints` call (headers read and checked, output written and synced); "
            "the merge loop is its part after the checks (`MergeResult.seconds`).", "",
            "| page cache | method | call | merge loop | read the inputs once (I/O floor) | call / I/O floor | peak RSS | import baseline RSS |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for cache in ("cold", "warm"):
            read_seconds = stream[cache]["read_seconds"]
            for method in STREAM_METHODS:
                row = stream[cache][method]
                lines.append(
                    f"| {cache} | {method} | {_fmt_seconds(row['call_seconds'])} | {_fmt_seconds(row['merge_seconds'])} | "
                    f"{_fmt_seconds(read_seconds)} | {row['x_io_floor']:.1f} | {row['peak_rss_bytes'] / MiB:.1f} MiB | "
                    f"{stream['baseline_rss_bytes'] / MiB:.1f} MiB |"
                )
        cold, warm = stream["cold"]["read_seconds"], stream["warm"]["read_seconds"]
        without_io = [(f"{method} of the same tensors in memory (`lowrank_merge.merge`, no I/O)", seconds)
                      for method, seconds in stream["in_memory_seconds"].items()]
        without_io.append(("CART's FLOP floor (the randomized engine's FLOPs at niter 2 / measured sgemm)",
                           stream["cart_flop_floor_seconds"]))
        lines += [
            "", "Without I/O: what a streaming merge cannot go below, however well it overlaps reading, "
            "computing and writing.", "",
            "| without I/O | time | / cold read | / warm read |", "|---|---|---|---|",
        ]
        lines += [f"| {label} | {_fmt_seconds(seconds)} | {seconds / cold:.1f} | {seconds / warm:.1f} |"
                  for label, seconds in without_io]
    if report["notes"]:
        lines += [""] + [f"note: {note}" for note in report["notes"]]
    return lines


def header_lines(report: dict) -> list[str]:
    return [
        f"# CART merge benchmark suite{' (quick smoke run: not headline numbers)' if report['quick'] else ''}",
        "",
        f"{report['date']} · {report['device']} · {report['cpu_count']} logical CPUs, {report['threads']} torch thread(s) · "
        f"torch {report['torch']} · python {report['python']} · load average at start {report['load_average']}",
        f"measured sgemm {report['sgemm_gflops']:.1f} GFLOP/s ({report['sgemm_size']}³ fp32, the faster of "
        + ", ".join(f"{name} {gflops:.1f}" for name, gflops in report["sgemm_gflops_by_library"].items())
        + f"; CPU matmul backend of the run: {report['cpu_matmul_backend']}), "
        f"copy bandwidth {report['copy_gbps']:.1f} GB/s (read + write)",
        f"engines: randomized/krylov niter {DEFAULT_NITER}, oversample {DEFAULT_OVERSAMPLE}; "
        f"gram_subspace, chebyshev and auto (the default: per layer the cheaper of gram_subspace and chebyshev by "
        f"engine_cost) niter " + ", ".join(f"{name} {niter}" for name, niter in ACCURATE_NITER.items()) + ", oversample max(10, k // 2)",
        "timing: " + ("every method called once untimed first (--warm-long-runs)" if report.get("warm_long_runs")
                      else "runs over 1 s timed once, cold, with the memory sampler running (for a whole-model case "
                      "usually the reference alone: its speed-ups then compare a cold call against warm ones; "
                      "--warm-long-runs times both warm)"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="dimensions / 16, <= 4 tasks, tiny streaming models: a smoke run")
    parser.add_argument("--cases", default="", help="regex on case names (default: all)")
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    parser.add_argument("--tasks", type=int, help="override every case's number of tasks")
    parser.add_argument("--engines", default=",".join(("auto", *engines.ENGINES)),
                        help="comma-separated lowrank_merge engines ('auto' is the default engine)")
    parser.add_argument("--skip-reference", action="store_true",
                        help="time the reference path on one task and multiply by T (errors of the reference itself n/a)")
    parser.add_argument("--error-max-weights", type=int, default=4096 * 1024,
                        help="compute the float64 reference errors only on layers with at most this many weights")
    parser.add_argument("--threads", type=int, help="torch threads (and OMP_NUM_THREADS of subprocesses)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warm-long-runs", action="store_true",
                        help="call every method once untimed first, also when one call takes over 1 s")
    parser.add_argument("--no-streaming", action="store_true")
    parser.add_argument("--cpu-matmul", choices=("auto", *engines.CPU_MATMUL_BACKENDS),
                        help="lowrank_merge.set_cpu_matmul_backend for the run (default: the library's, "
                        "$LOWRANK_MERGE_CPU_MATMUL or auto; the streaming subprocess inherits it)")
    parser.add_argument("--json", type=Path, help="write the full report as JSON here")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder of the markdown report")
    args = parser.parse_args(argv)
    args.long_run = math.inf if args.warm_long_runs else 1.0
    args.ratios = [float(r) for r in args.ratios.split(",") if r]
    args.engines = [e for e in args.engines.split(",") if e]
    for engine in args.engines:
        if engine not in ("auto", *engines.ENGINES):
            parser.error(f"unknown engine {engine!r}; choose from auto, {', '.join(engines.ENGINES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.stream_models, args.stream_shape = (4, (8, 256)) if args.quick else (4, (24, 1024))
    device = torch.device(args.device)
    _NOTES.clear()

    sgemm_size = 2048
    if args.cpu_matmul:
        lm.set_cpu_matmul_backend(args.cpu_matmul)
    sgemm_by_library = sgemm_rates(device, sgemm_size)
    rates = {"sgemm_flops": max(sgemm_by_library.values()), "copy_bytes": copy_bandwidth(device, 64 if args.quick else 256)}
    report = {
        "device": device_name(device), "device_type": device.type,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "load_average": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "quick": args.quick, "sgemm_size": sgemm_size,
        "sgemm_gflops": rates["sgemm_flops"] / 1e9, "copy_gbps": rates["copy_bytes"] / 1e9,
        "sgemm_gflops_by_library": {name: rate / 1e9 for name, rate in sgemm_by_library.items()},
        "cpu_matmul_backend": lm.cpu_matmul_backend(),
        "ratios": args.ratios, "engines": args.engines, "default_engine": "auto",
        "skip_reference": args.skip_reference, "error_max_weights": args.error_max_weights,
        "warm_long_runs": args.warm_long_runs,
        "memory_measure": "torch.cuda.max_memory_allocated above the allocated bytes before the call"
        if device.type == "cuda" else "peak RSS above the RSS before the call, sampled from /proc/self/statm every 1 ms",
        "cases": [], "notes": _NOTES,
    }
    print("\n".join(header_lines(report)), flush=True)
    for case, stacks in select_cases(args):
        print(case.name, flush=True)
        report["cases"].append(run_case(case, stacks, args, device, rates))
    if not args.no_streaming:
        print("streaming merge", flush=True)
        report["streaming"] = run_streaming(args, rates)
    body = tables(report)
    print("\n".join(body))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if not args.quick:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", report["device"]).strip("-").lower()
        path = args.out / f"run_{slug}_{datetime.date.today().isoformat()}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(header_lines(report) + body) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
