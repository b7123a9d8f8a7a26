"""What does a rank-ratio x λ grid cost with ``lowrank_merge.tune``?

Builds T synthetic models with the 2-D weight shapes of the CLIP ViT-B/32
visual encoder (the ``ViT-B/32 x 8 tasks`` case of ``benchmarks/gpu_merge.py``,
its task matrices too: 49 matrices, 85 M weights per model), then times:

* one ``cart_merge`` at the largest ratio of the grid (what tune decomposes at);
* one ``evaluate`` call: a fixed linear functional Σ x_nᵀ W_n y_n over every
  matrix (a stand-in for a cheap validation score);
* ``tune`` over the grid (default 6 ratios x 10 λ), split into the time spent
  in ``evaluate`` and the rest (decomposition, the per-ratio low-rank sums and
  the per-point multiply-adds), and the time until its first ``evaluate`` call
  (the decomposition, one ratio's sums and one merged model);
* ``cart_merge`` at the smallest ratio, to estimate what the grid would cost
  as separate calls: the per-ratio merge time is interpolated linearly in the
  ratio between the measured smallest- and largest-ratio merges (the engines'
  cost grows about linearly in k); the 60 separate merges are then
  10 x Σ_ratios (merge time) + 60 evaluations. This is an extrapolation, not
  a measurement of 60 merges.

It checks that tune's score at (largest ratio, λ = 2.0) equals the separate
merge's score: at its own largest rank tune runs cart_merge's decomposition
with the same seeded sketch.

Usage::

    python benchmarks/tune_grid.py --threads 1              # full: 8 tasks, ViT-B/32 shapes
    python benchmarks/tune_grid.py --threads 1 --blocks 6   # the first 6 of 12 blocks: half the time
    python benchmarks/tune_grid.py --quick                  # dimensions / 16, 4 tasks: a smoke test

Results (markdown) go to ``--out`` (default
``benchmarks/results/tune_grid_cpu_<date>.md``).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import lowrank_merge as lm  # noqa: E402
from gpu_merge import CASES, device_name, measure, quick_case, task_stack  # noqa: E402

#: State-dict names of the shapes of ``gpu_merge._vit``, in its order.
VIT_NAMES = (
    "visual.transformer.resblocks.{}.attn.in_proj_weight",
    "visual.transformer.resblocks.{}.attn.out_proj.weight",
    "visual.transformer.resblocks.{}.mlp.c_fc.weight",
    "visual.transformer.resblocks.{}.mlp.c_proj.weight",
    "visual.proj{}",
)


def vit_models(quick: bool, blocks: int | None = None) -> tuple[str, list[dict[str, torch.Tensor]]]:
    """T state dicts of ViT-B/32 visual-encoder matrices (views into one [T, m, n] stack per matrix).

    ``blocks``: keep only the first ``blocks`` of the 12 residual blocks (every
    cost measured here is linear in it).
    """
    case = next(case for case in CASES if case.name.startswith("ViT-B/32"))
    case = quick_case(case) if quick else case
    if blocks is not None:
        shapes = tuple((m, n, min(count, blocks) if count > 1 else count) for m, n, count in case.shapes)
        case = replace(case, name=f"{case.name}, first {blocks} of 12 blocks", shapes=shapes)
    models: list[dict[str, torch.Tensor]] = [{} for _ in range(case.tasks)]
    for index, ((m, n, count), pattern) in enumerate(zip(case.shapes, VIT_NAMES, strict=True)):
        for block in range(count):
            stack = task_stack(case.tasks, m, n, torch.float32, torch.device("cpu"), seed=100 * index + block)
            for model, weight in zip(models, stack):
                model[pattern.format(block if count > 1 else "")] = weight
    return case.name, models


class LinearScore:
    """Σ_n x_nᵀ W_n y_n with fixed random x_n, y_n; records the time spent in it."""

    def __init__(self, model: dict[str, torch.Tensor], seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.vectors = {
            name: (torch.randn(w.shape[0], generator=generator), torch.randn(w.shape[1], generator=generator))
            for name, w in model.items()
        }
        self.calls = 0
        self.seconds = 0.0
        self.first_call_at: float | None = None

    def __call__(self, state_dict: dict[str, torch.Tensor]) -> float:
        start = time.perf_counter()
        if self.first_call_at is None:
            self.first_call_at = start
        total = sum(float(x @ (state_dict[name] @ y)) for name, (x, y) in self.vectors.items())
        self.calls += 1
        self.seconds += time.perf_counter() - start
        return total


def interpolate(ratio: float, measured: dict[float, float]) -> float:
    """Piecewise-linear in the ratio between the measured (ratio -> seconds) points."""
    points = sorted(measured.items())
    for (r0, t0), (r1, t1) in zip(points, points[1:]):
        if r0 <= ratio <= r1:
            return t0 + (t1 - t0) * (ratio - r0) / (r1 - r0)
    return measured[min(measured, key=lambda r: abs(r - ratio))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="dimensions / 16 and 4 tasks: a smoke test")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--blocks", type=int, default=None, help="only the first N of the 12 blocks (default: all)")
    parser.add_argument("--svd", default="auto")
    parser.add_argument("--ratios", default=",".join(map(str, lm.DEFAULT_TUNE_RANK_RATIOS)))
    parser.add_argument("--scales", default=",".join(map(str, lm.DEFAULT_TUNE_SCALES)))
    parser.add_argument("--out", default=None, help="markdown output (default: benchmarks/results/tune_grid_cpu_<date>.md)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = tuple(float(r) for r in args.ratios.split(","))
    scales = tuple(float(s) for s in args.scales.split(","))
    points = len(ratios) * len(scales)
    cpu = torch.device("cpu")
    today = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"tune_grid_cpu_{today}.md"

    start = time.perf_counter()
    case, models = vit_models(args.quick, args.blocks)
    built = time.perf_counter() - start
    weights = sum(t.numel() for t in models[0].values())
    print(f"{case}: {len(models)} models of {weights / 1e6:.1f} M weights in {len(models[0])} matrices, "
          f"built in {built:.1f} s", flush=True)
    evaluate = LinearScore(models[0])
    settings = dict(svd=args.svd)

    def merge_at(ratio: float, scale: float = 2.0) -> dict[str, torch.Tensor]:
        return lm.cart_merge(models, rank_ratio=ratio, scale=scale, **settings)

    largest, smallest = max(ratios), min(ratios)
    merge_max = measure(lambda: merge_at(largest), cpu, repeats=1)
    print(f"cart_merge at ratio {largest}: {merge_max['seconds']:.2f} s", flush=True)
    merged = merge_max.pop("result")
    score_separate = evaluate(merged)
    eval_timing = measure(lambda: evaluate(merged), cpu, repeats=5)
    eval_seconds = eval_timing["seconds"]
    print(f"one evaluate: {eval_seconds * 1e3:.1f} ms", flush=True)
    del merged

    evaluate = LinearScore(models[0])
    start = time.perf_counter()
    result = lm.tune(models, evaluate, rank_ratios=ratios, scales=scales, **settings)
    tune_seconds = time.perf_counter() - start
    to_first_eval = evaluate.first_call_at - start
    assert evaluate.calls == points
    print(f"tune {len(ratios)} x {len(scales)}: {tune_seconds:.2f} s ({evaluate.seconds:.2f} s in evaluate, "
          f"{to_first_eval:.2f} s before the first evaluate)", flush=True)
    score_tune = result.scores[(largest, 2.0)] if 2.0 in scales else None
    check = abs(score_tune - score_separate) / abs(score_separate) if score_tune is not None else None
    del result

    merge_min = measure(lambda: merge_at(smallest), cpu, repeats=1)
    merge_min.pop("result")
    print(f"cart_merge at ratio {smallest}: {merge_min['seconds']:.2f} s", flush=True)
    per_ratio = {r: interpolate(r, {smallest: merge_min["seconds"], largest: merge_max["seconds"]}) for r in ratios}
    separate_merges = len(scales) * sum(per_ratio.values())
    separate_total = separate_merges + points * eval_seconds
    decompose_then_scale = sum(per_ratio.values()) + points * eval_seconds  # 6 cart_decompose, 60 .merged() not counted
    floor = merge_max["seconds"] + points * eval_seconds

    lines = [
        f"# Tuning rank ratio x λ: {len(ratios)} x {len(scales)} grid, {case}",
        "",
        f"{today}, {device_name(cpu)}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"svd={args.svd!r}, float32, lowrank_merge kernel: {'yes' if lm.extension_available() else 'no'}"
        f"{', quick' if args.quick else ''}.",
        f"{len(models)} synthetic models, {weights / 1e6:.1f} M weights each in {len(models[0])} matrices "
        "(benchmarks/gpu_merge.py task matrices).",
        f"Ratios {list(ratios)}; λ {list(scales)}. evaluate: Σ_n x_nᵀ W_n y_n over every matrix.",
        "",
        "| what | seconds |",
        "|---|---|",
        f"| one `cart_merge` at the largest ratio ({largest}) | {merge_max['seconds']:.2f} |",
        f"| one `cart_merge` at the smallest ratio ({smallest}) | {merge_min['seconds']:.2f} |",
        f"| one `evaluate` (median of 5) | {eval_seconds:.3f} |",
        f"| **`tune`, whole {len(ratios)} x {len(scales)} grid** | **{tune_seconds:.2f}** |",
        f"| of which in `evaluate` ({points} calls) | {evaluate.seconds:.2f} |",
        f"| of which outside `evaluate` (decomposition, low-rank sums, {points} multiply-adds) | "
        f"{tune_seconds - evaluate.seconds:.2f} |",
        f"| `tune` until its first `evaluate` call | {to_first_eval:.2f} |",
        f"| one merge + {points} evaluations (merge at {largest} + {points} x one evaluate) | {floor:.2f} |",
        f"| {points} separate `cart_merge` calls + {points} evaluations (extrapolated, see below) | "
        f"{separate_total:.1f} |",
        f"| {len(ratios)} `cart_decompose` + {points} evaluations (extrapolated; `.merged()` not counted) | "
        f"{decompose_then_scale:.1f} |",
        "",
        f"- tune / (one merge + {points} evaluations) = **{tune_seconds / floor:.2f}**",
        f"- {points} separate merges / tune = **{separate_total / tune_seconds:.1f}x**; "
        f"{len(ratios)} decompositions / tune = {decompose_then_scale / tune_seconds:.1f}x",
        "- Separate merges are extrapolated, not measured: the merge time at each ratio is interpolated "
        f"linearly in the ratio between the measured {smallest} and {largest} merges "
        f"({', '.join(f'{r}: {t:.1f} s' for r, t in per_ratio.items())}), times {len(scales)} λ values, "
        f"plus {points} evaluations.",
    ]
    if check is not None:
        lines.append(
            f"- Check: tune's score at ({largest}, 2.0) vs the separate merge's: relative difference {check:.1e} "
            "(the same decomposition and seeded sketch at the largest rank)."
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
