"""Which top-k engine is fastest at equal accuracy? (CPU or GPU)

For each matrix shape, T tasks of centered task-vector-like matrices with a
slowly decaying spectrum (σ_i ∝ i^-0.6, like real fine-tune deltas) are
decomposed at rank k = floor(ratio · min(m, n)) by every engine and setting.
Reported per engine:

* time for the batch of T matrices (median of repeats, warm),
* residual excess ‖A − Â‖_F / ‖A − A_k‖_F − 1 against the optimal rank-k
  residual (float64 dense SVD),
* reconstruction error ‖Â − A_k‖_F / ‖A_k‖_F against the exact truncated SVD,
* the reference path: one dense thin ``torch.linalg.svd`` per task (fp32).

Usage: python benchmarks/engines.py [--tasks 8] [--device cpu] [--quick] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date

import torch

from lowrank_merge import low_rank_approx

SHAPES = [(768, 768), (3072, 768), (768, 3072), (2048, 2048)]
QUICK_SHAPES = [(768, 768), (3072, 768)]
RATIOS = [0.02, 0.08, 0.16]
SETTINGS = [
    ("gram", None),
    ("randomized", 1),
    ("randomized", 2),
    ("randomized", 3),
    ("krylov", 1),
    ("krylov", 2),
    ("krylov", 3),
]


def slow_decay_batch(tasks: int, m: int, n: int, seed: int) -> torch.Tensor:
    """``[T, m, n]`` float64 matrices with σ_i ∝ i^-0.6 and random singular vectors."""
    generator = torch.Generator().manual_seed(seed)
    r = min(m, n)
    spectrum = torch.arange(1, r + 1, dtype=torch.float64) ** -0.6
    batch = []
    for _ in range(tasks):
        U = torch.linalg.qr(torch.randn(m, r, generator=generator, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=torch.float64)).Q
        batch.append((U * spectrum) @ V.T)
    return torch.stack(batch)


def timed(fn, device: str, repeats: int) -> tuple[float, object]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def reconstruct(U, S, Vh):
    return (U * S.unsqueeze(-2)) @ Vh


def run_case(m: int, n: int, ratio: float, tasks: int, device: str, repeats: int) -> list[dict]:
    k = max(1, int(ratio * min(m, n)))
    A64 = slow_decay_batch(tasks, m, n, seed=m * 7 + n)
    U, S, Vh = torch.linalg.svd(A64, full_matrices=False)
    optimal = reconstruct(U[..., :k], S[..., :k], Vh[..., :k, :])
    optimal_residual = torch.linalg.norm(A64 - optimal, dim=(-2, -1))
    A = A64.to(device=device, dtype=torch.float32)

    def reference_path():
        return [torch.linalg.svd(A[t], full_matrices=False) for t in range(tasks)]

    rows = []
    seconds, _ = timed(reference_path, device, 1)
    rows.append(dict(engine="reference (dense SVD per task)", niter="", seconds=seconds, excess=0.0, recon=0.0))
    for engine, niter in SETTINGS:
        seconds, factors = timed(lambda: low_rank_approx(A, k, svd=engine, niter=niter), device, repeats)
        approx = reconstruct(*factors).double().cpu()
        excess = (torch.linalg.norm(A64 - approx, dim=(-2, -1)) / optimal_residual - 1).max().item()
        recon = (torch.linalg.norm(approx - optimal, dim=(-2, -1)) / torch.linalg.norm(optimal, dim=(-2, -1))).max().item()
        rows.append(dict(engine=engine, niter="" if niter is None else niter, seconds=seconds, excess=excess, recon=recon))
    return [dict(m=m, n=n, k=k, **row) for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="two shapes, rank ratio 0.08 only")
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args()

    shapes, ratios = (QUICK_SHAPES, [0.08]) if args.quick else (SHAPES, RATIOS)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    lines = [
        f"# Engines at equal accuracy ({args.tasks} tasks, σ_i ∝ i^-0.6, fp32)",
        "",
        f"{date.today()} · {device_name} · torch {torch.__version__}",
        "",
        "| m x n | k | engine | niter | seconds (T tasks) | residual excess | recon. error vs exact top-k |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for m, n in shapes:
        for ratio in ratios:
            for row in run_case(m, n, ratio, args.tasks, args.device, args.repeats):
                line = (
                    f"| {row['m']}x{row['n']} | {row['k']} | {row['engine']} | {row['niter']} | "
                    f"{row['seconds']:.3f} | {row['excess']:.1e} | {row['recon']:.1e} |"
                )
                lines.append(line)
                print(line, flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
