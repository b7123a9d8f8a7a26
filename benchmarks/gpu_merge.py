"""Time the CART merge of one layer stack on a GPU (or CPU) against the baselines.

For each case (a model's distinct 2-D weight shapes, each appearing ``count``
times, merged over T tasks) and each rank ratio, this times:

* ``ours:<engine>``: :func:`lowrank_merge.cart_layer_parts` (the per-layer
  work of a merge: the shared Gaussian sketch drawn as the merge draws it, then
  the ``centered_low_rank_sum`` op: the CUDA kernels when the extension has
  them, else the pure-torch path);
* ``reference``: what the CART reference code does, a thin
  ``torch.linalg.svd`` of every centered task matrix, one at a time, then the
  truncated reconstructions summed (timed at one ratio: its cost does not
  depend on k);
* ``svd_lowrank``: ``torch.svd_lowrank`` (q = k + 10, niter = 2) per task;
* the floor: max(FLOPs of the randomized engine / measured GEMM rate, bytes
  that any method must move / measured copy bandwidth).

It also reports each result's relative Frobenius distance to the reference's
delta, and (CUDA) the peak extra memory of each method. Results go to
``benchmarks/results/gpu_merge_<device>_<date>.{json,md}``.

    python benchmarks/gpu_merge.py                     # CUDA, full cases
    python benchmarks/gpu_merge.py --device cpu --quick  # small smoke test

Cases: CLIP ViT-B/32 visual encoder shapes with 8 tasks, ViT-L/14 with 20
tasks, single 4096x4096 and 4096x14336 layers with 8 tasks; rank ratios 0.02,
0.08, 0.16. ``--quick`` divides every dimension by 16 and uses at most 4 tasks.
Task matrices are synthetic: a shared base plus Gaussian factors with
power-law column scales 1/(i + 1) (a decaying spectrum, like real task vectors).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lowrank_merge as lm  # noqa: E402
from lowrank_merge import _ops, engines  # noqa: E402
from lowrank_merge.cart import DEFAULT_NITER, DEFAULT_OVERSAMPLE  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    tasks: int
    shapes: tuple[tuple[int, int, int], ...]  # (m, n, count)


def _vit(width: int, mlp: int, blocks: int, proj: int) -> tuple[tuple[int, int, int], ...]:
    # open_clip VisionTransformer: attn.in_proj_weight, attn.out_proj.weight,
    # mlp.c_fc.weight, mlp.c_proj.weight per block, and the output proj.
    return ((3 * width, width, blocks), (width, width, blocks), (mlp, width, blocks), (width, mlp, blocks), (width, proj, 1))


CASES = (
    Case("ViT-B/32 x 8 tasks", 8, _vit(768, 3072, 12, 512)),
    Case("ViT-L/14 x 20 tasks", 20, _vit(1024, 4096, 24, 768)),
    Case("4096x4096 x 8 tasks", 8, ((4096, 4096, 1),)),
    Case("4096x14336 x 8 tasks", 8, ((4096, 14336, 1),)),
)
RATIOS = (0.02, 0.08, 0.16)


def quick_case(case: Case) -> Case:
    shapes = tuple((max(8, m // 16), max(8, n // 16), count) for m, n, count in case.shapes)
    return Case(case.name + " (quick)", min(case.tasks, 4), shapes)


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, repeats: int, long_run: float = 1.0) -> dict:
    """Median seconds of ``fn()``. The first run warms up and is untimed, unless
    it took over ``long_run`` seconds (then it is the measurement). On CUDA the
    first run also gives the peak memory allocated beyond what was live before."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    first = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    times = [first]
    if first <= long_run:
        times = []
        for _ in range(repeats):
            del result
            synchronize(device)
            start = time.perf_counter()
            result = fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "runs": len(times), "peak_extra_bytes": peak, "result": result}


def gemm_rate(device: torch.device, dtype: torch.dtype, quick: bool) -> float:
    size = 1024 if quick or device.type == "cpu" else 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    timing = measure(lambda: a @ b, device, repeats=5)
    return 2 * size**3 / timing["seconds"]


def copy_bandwidth(device: torch.device, quick: bool) -> float:
    elements = (16 if quick or device.type == "cpu" else 256) * 2**20
    x = torch.empty(elements, device=device, dtype=torch.float32).fill_(1)
    y = torch.empty_like(x)
    timing = measure(lambda: y.copy_(x), device, repeats=5)
    return 2 * x.numel() * x.element_size() / timing["seconds"]  # read + write


# ---------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------


def task_stack(T: int, m: int, n: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    r = min(m, n)
    scales = (torch.arange(r, device=device, dtype=dtype) + 1) ** -1.0
    base = torch.randn(m, n, generator=generator, device=device, dtype=dtype) * 0.02
    stack = torch.empty(T, m, n, device=device, dtype=dtype)
    for t in range(T):
        left = torch.randn(m, r, generator=generator, device=device, dtype=dtype) * (scales / math.sqrt(m))
        right = torch.randn(r, n, generator=generator, device=device, dtype=dtype) / math.sqrt(n)
        stack[t] = base + 1e-3 * (left @ right)
    return stack


def reference_factors(stack: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    average = stack.mean(dim=0)
    return [torch.linalg.svd(task - average, full_matrices=False) for task in stack]


def reference_delta(stack: torch.Tensor, k: int, factors=None) -> torch.Tensor:
    """The CART reference: thin SVD per task matrix, truncate, sum."""
    factors = reference_factors(stack) if factors is None else factors
    delta = torch.zeros_like(stack[0])
    for U, S, Vh in factors:
        delta += (U[:, :k] * S[:k]) @ Vh[:k]
    return delta


def svd_lowrank_delta(stack: torch.Tensor, k: int) -> torch.Tensor:
    average = stack.mean(dim=0)
    q = min(k + 10, *stack.shape[-2:])
    delta = torch.zeros_like(average)
    for task in stack:
        U, S, V = torch.svd_lowrank(task - average, q=q, niter=2)
        delta += (U[:, :k] * S[:k]) @ V[:, :k].T
    return delta


def engine_flops(engine: str, T: int, m: int, n: int, k: int) -> float:
    """GEMM FLOPs of an engine on one layer (the products with the [T, m, n]
    stack dominate; the small factorisations are left out)."""
    if engine == "krylov":
        width = engines.sketch_width(k, 0, m, n)
        passes = (1 + 2 * DEFAULT_NITER) + (DEFAULT_NITER + 1)  # sketch + iterations, then Q^T A on the whole basis
    else:
        width = engines.sketch_width(k, DEFAULT_OVERSAMPLE["randomized"], m, n)
        passes = 2 + 2 * DEFAULT_NITER  # A Omega, niter x (A^T Q, A Q), Q^T A
    return 2.0 * T * m * n * width * passes + 2.0 * m * n * T * k  # + the sum of reconstructions


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def run_case(case: Case, args, device: torch.device, dtype: torch.dtype, rates: dict) -> dict:
    rows = []
    for index, (m, n, count) in enumerate(case.shapes):
        T = case.tasks
        stack = task_stack(T, m, n, dtype, device, seed=index)
        print(f"  [{T}, {m}, {n}] x {count}", flush=True)
        reference = None
        if not args.no_reference:
            middle = max(1, math.floor(RATIOS[len(RATIOS) // 2] * min(m, n)))
            reference = measure(lambda: reference_delta(stack, middle), device, repeats=args.repeats)
            reference.pop("result")
            factors = reference_factors(stack)
        for ratio in args.ratios:
            k = max(1, math.floor(ratio * min(m, n)))
            row = {"m": m, "n": n, "count": count, "tasks": T, "ratio": ratio, "k": k, "methods": {}}
            target = reference_delta(stack, k, factors) if reference is not None else None

            def record(name: str, timing: dict, delta: torch.Tensor | None) -> None:
                entry = {key: value for key, value in timing.items() if key != "result"}
                if target is not None and delta is not None:
                    entry["rel_err_vs_reference"] = ((delta - target).norm() / target.norm()).item()
                row["methods"][name] = entry

            if reference is not None:
                record("reference", reference, target)
            for engine in args.engines:
                timing = measure(
                    lambda: lm.cart_layer_parts(stack, k, svd=engine, compute_dtype=dtype), device, args.repeats
                )
                record(f"ours:{engine}", timing, timing["result"][1])
                if engine in engines.SKETCH_ENGINES:
                    width = engines.sketch_width(k, DEFAULT_OVERSAMPLE[engine], m, n)
                    draw = measure(lambda: engines.gaussian_sketch(n, width, 0, dtype, device), device, args.repeats)
                    row["methods"][f"ours:{engine}"]["sketch_draw_seconds"] = draw["seconds"]
            if not args.no_svd_lowrank:
                timing = measure(lambda: svd_lowrank_delta(stack, k), device, args.repeats)
                record("svd_lowrank", timing, timing["result"])
            flops = engine_flops("randomized", T, m, n, k)
            bytes_moved = (T + 2) * m * n * stack.element_size()  # read the stack, write average and delta
            row["floor"] = {
                "flops": flops,
                "bytes": bytes_moved,
                "flops_seconds": flops / rates["gemm_flops"],
                "bytes_seconds": bytes_moved / rates["copy_bytes"],
                "seconds": max(flops / rates["gemm_flops"], bytes_moved / rates["copy_bytes"]),
            }
            rows.append(row)
            summary = ", ".join(f"{name} {entry['seconds'] * 1e3:.1f} ms" for name, entry in row["methods"].items())
            print(f"    ratio {ratio} (k={k}): {summary}; floor {row['floor']['seconds'] * 1e3:.2f} ms", flush=True)
        del stack
        if device.type == "cuda":
            torch.cuda.empty_cache()

    totals = {}
    for ratio in args.ratios:
        per_method: dict[str, float] = {}
        for row in rows:
            if row["ratio"] != ratio:
                continue
            for name, entry in row["methods"].items():
                per_method[name] = per_method.get(name, 0.0) + row["count"] * entry["seconds"]
            per_method["floor"] = per_method.get("floor", 0.0) + row["count"] * row["floor"]["seconds"]
        totals[str(ratio)] = per_method
    return {"case": case.name, "tasks": case.tasks, "layers": rows, "model_totals_seconds": totals}


def markdown(report: dict) -> str:
    lines = [
        f"# CART merge timings: {report['device']}",
        "",
        f"{report['date']}, torch {report['torch']}, CUDA {report['cuda']}, {report['dtype']}, "
        f"TF32 {'on' if report['tf32'] else 'off'}, lowrank_merge kernel for this device: "
        f"{'yes' if report['extension_kernel'] else 'no (pure-torch path)'}{', quick' if report['quick'] else ''}.",
        f"Measured GEMM rate {report['gemm_tflops']:.2f} TFLOP/s, copy bandwidth {report['copy_gbps']:.1f} GB/s.",
        "",
        "Times in ms per layer (median); `ours:*` includes drawing the sketch, as a merge does.",
        "Error: relative Frobenius distance of the delta to the reference's.",
        "",
    ]
    for case in report["cases"]:
        methods = list(dict.fromkeys(name for row in case["layers"] for name in row["methods"]))
        lines += [f"## {case['case']}", ""]
        header = ["shape", "ratio", "k", *methods, "floor", *[f"err {name}" for name in methods if name != "reference"]]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in case["layers"]:
            cells = [f"{row['m']}x{row['n']} (x{row['count']})", str(row["ratio"]), str(row["k"])]
            cells += [f"{row['methods'][name]['seconds'] * 1e3:.2f}" if name in row["methods"] else "" for name in methods]
            cells.append(f"{row['floor']['seconds'] * 1e3:.3f}")
            for name in methods:
                if name == "reference":
                    continue
                error = row["methods"].get(name, {}).get("rel_err_vs_reference")
                cells.append("" if error is None else f"{error:.1e}")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Whole model (sum over layers x count), seconds:", ""]
        header = ["ratio", *methods, "floor"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for ratio, totals in case["model_totals_seconds"].items():
            cells = [ratio] + [f"{totals[name]:.3f}" if name in totals else "" for name in methods] + [f"{totals['floor']:.4f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes (dimensions / 16, <= 4 tasks): a smoke test")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (torch.backends.cuda.matmul.allow_tf32)")
    parser.add_argument("--engines", default="randomized,krylov,gram", help="comma-separated lowrank_merge engines")
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    parser.add_argument("--cases", default="", help="regex on case names (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (short runs only)")
    parser.add_argument("--no-reference", action="store_true", help="skip the per-task SVD reference (and the errors)")
    parser.add_argument("--no-svd-lowrank", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    args.engines = [engine for engine in args.engines.split(",") if engine]
    args.ratios = [float(ratio) for ratio in args.ratios.split(",") if ratio]
    for engine in args.engines:
        if engine not in engines.ENGINES:
            parser.error(f"unknown engine {engine!r}; choose from {engines.ENGINES}")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU here; use --device cpu")
    dtype = getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    cases = [quick_case(case) if args.quick else case for case in CASES if re.search(args.cases, case.name)]

    rates = {"gemm_flops": gemm_rate(device, dtype, args.quick), "copy_bytes": copy_bandwidth(device, args.quick)}
    name = device_name(device)
    print(f"{name}: GEMM {rates['gemm_flops'] / 1e12:.2f} TFLOP/s, copy {rates['copy_bytes'] / 1e9:.1f} GB/s", flush=True)
    report = {
        "device": name,
        "device_type": device.type,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": args.dtype,
        "tf32": bool(args.tf32),
        "quick": args.quick,
        "extension_kernel": _ops.has_kernel(device.type),
        "engines": args.engines,
        "niter": DEFAULT_NITER,
        "oversample": DEFAULT_OVERSAMPLE,
        "gemm_tflops": rates["gemm_flops"] / 1e12,
        "copy_gbps": rates["copy_bytes"] / 1e9,
        "cases": [],
    }
    for case in cases:
        print(f"{case.name}", flush=True)
        report["cases"].append(run_case(case, args, device, dtype, rates))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    stem = f"gpu_merge_{slug}_{datetime.date.today().isoformat()}{'_quick' if args.quick else ''}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(report) + "\n")
    print(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
