"""The benchmark's outputs: a Markdown report, a JSON file and the rank-curve plot."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .benchmark import METHOD_LABELS, BenchmarkResult


def markdown_report(result: BenchmarkResult) -> str:
    """Per-task test accuracy (mean over seeds), averages with spread, chosen hyper-parameters, timings."""
    config = result.config
    names = result.method_names()
    lines = [
        f"Tasks: {len(config.tasks)}; seeds: {list(config.seeds)}; split sizes (train, val, test): "
        f"{list(config.split_sizes)}; ViT width {config.model.width}, depth {config.model.depth}.",
        "",
        "| method | " + " | ".join(config.tasks) + " | average | ± (seeds) | normalized |",
        "|---|" + "---|" * (len(config.tasks) + 3),
    ]
    for method in names:
        mean, spread = result.average_accuracy(method)
        cells = " | ".join(f"{value:.1f}" for value in result.task_accuracy(method))
        lines.append(
            f"| {METHOD_LABELS[method]} | {cells} | **{mean:.1f}** | {spread:.1f} | {result.normalized_accuracy(method):.1f} |"
        )
    lines += ["", "CART rank curve (test accuracy at the λ chosen on validation for each ratio):", ""]
    lines += ["| rank ratio | " + " | ".join(result.rank_curve()) + " |", "|---|" + "---|" * len(result.rank_curve())]
    lines.append("| average accuracy | " + " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in result.rank_curve().values()) + " |")
    lines += ["", "Hyper-parameters chosen on validation, per seed:", ""]
    for seed in result.seeds:
        chosen = "; ".join(
            f"{METHOD_LABELS[method]}: " + ", ".join(f"{key}={value:g}" for key, value in point.items())
            for method, point in seed.chosen.items()
            if point
        )
        lines.append(f"- seed {seed.seed}: {chosen}")
    lines += ["", "Seconds per seed spent merging and scoring, by method:", ""]
    for seed in result.seeds:
        lines.append(f"- seed {seed.seed}: " + ", ".join(f"{k} {v:.1f}" for k, v in seed.seconds.items()))
    lines.append(
        f"\nTotal: {result.seconds_total:.1f} s, of which {result.seconds_training:.1f} s pretraining and "
        "fine-tuning (near 0 when every model is cached)."
    )
    return "\n".join(lines) + "\n"


def write_json(result: BenchmarkResult, path: Path | str) -> None:
    _atomic_write(Path(path), json.dumps(result.to_json(), indent=2))


def plot_rank_curve(result: BenchmarkResult, path: Path | str) -> None:
    """Average accuracy against CART's rank ratio, with the averaging and task-arithmetic lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = result.rank_curve()
    ratios = [float(ratio) for ratio in curve]
    means = [mean for mean, _ in curve.values()]
    spreads = [spread for _, spread in curve.values()]
    figure, axes = plt.subplots(figsize=(6.0, 4.0))
    axes.errorbar(ratios, means, yerr=spreads, marker="o", capsize=3, label="CART (λ chosen on validation)")
    for method, style in (("weight_averaging", "--"), ("task_arithmetic", ":"), ("individual", "-.")):
        axes.axhline(result.average_accuracy(method)[0], linestyle=style, color="gray", label=METHOD_LABELS[method])
    axes.set_xscale("log")
    axes.set_xticks(ratios, [f"{ratio:g}" for ratio in ratios], rotation=45)
    axes.set_xlabel("rank ratio k / min(m, n)")
    axes.set_ylabel("average test accuracy (%)")
    axes.set_title(f"{len(result.config.tasks)} tasks, {len(result.seeds)} seed(s)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    temporary = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp.png")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    os.replace(temporary, path)


def _atomic_write(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
