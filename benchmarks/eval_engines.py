"""CART's test accuracy on the offline evaluation benchmark with one engine against another.

For each seed, the task models of ``lowrank-merge demo`` (default config; read
from its model cache, trained and cached when missing) are merged with CART at
each rank ratio, λ chosen on validation separately for each engine (one
``tune`` call per engine and ratio), and the merged model's mean test accuracy
over the tasks is reported. Issue 7 asks that the default engine stay within
0.2 points of the exact path.

Usage::

    python benchmarks/eval_engines.py --engines auto,exact --ratios 0.08,0.32 \
        --out benchmarks/results/eval_auto_vs_exact_cpu_<date>.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lowrank_merge import key_preset, tune  # noqa: E402
from lowrank_merge.eval.benchmark import (  # noqa: E402
    BenchmarkConfig,
    ModelCache,
    Scorer,
    _pretrained,
    _unpack,
    default_cache_dir,
    train_task_models,
)
from lowrank_merge.eval.data import build_task  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="auto,exact")
    parser.add_argument("--ratios", default="0.08,0.32")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    engines = args.engines.split(",")
    ratios = [float(r) for r in args.ratios.split(",")]
    config = BenchmarkConfig(seeds=tuple(int(s) for s in args.seeds.split(",")))
    cache = ModelCache(default_cache_dir())
    pretrained = _pretrained(config, cache)
    stored = train_task_models(config, pretrained, cache, lambda message: print(message, flush=True), os.cpu_count() or 1)
    filters = key_preset(config.key_preset)

    rows, differences = [], {ratio: [] for ratio in ratios}
    for seed in config.seeds:
        tasks = [build_task(name, seed, config.split_sizes) for name in config.tasks]
        unpacked = [_unpack(stored[(seed, task.name)], config, task.num_classes) for task in tasks]
        finetuned = [backbone for backbone, _ in unpacked]
        scorer = Scorer(tasks, [head for _, head in unpacked], config.model)
        cells = []
        for ratio in ratios:
            accuracy = {}
            for engine in engines:
                result = tune(finetuned, scorer.validation_score, rank_ratios=(ratio,), scales=config.cart_scales,
                              svd=engine, **filters)
                accuracy[engine] = (statistics.fmean(scorer.accuracies(result.merged, "test")), result.best_scale)
                print(f"seed {seed}, ratio {ratio}, {engine}: λ {result.best_scale}, test {accuracy[engine][0]:.2f}", flush=True)
            cells.append(" / ".join(f"{accuracy[e][0]:.2f} (λ {accuracy[e][1]:g})" for e in engines))
            differences[ratio].append(accuracy[engines[0]][0] - accuracy[engines[-1]][0])
        rows.append(f"| {seed} | " + " | ".join(cells) + " |")

    header = " | ".join(f"ratio {ratio}: {' / '.join(engines)}" for ratio in ratios)
    mean_row = " | ".join(
        f"{statistics.fmean(differences[r]):+.2f} (per seed {min(differences[r]):+.2f} … {max(differences[r]):+.2f})"
        for r in ratios
    )
    lines = [
        f"# Eval demo: CART's mean test accuracy with {' against '.join(engines)}",
        "",
        f"{datetime.date.today().isoformat()} · {platform.processor() or platform.machine()} · "
        f"{os.cpu_count()} logical CPUs · torch {torch.__version__}. The task models of `lowrank-merge demo` "
        "(default config), λ chosen on validation for each engine and ratio (`tune`), mean test accuracy over "
        f"the {len(config.tasks)} tasks (`benchmarks/eval_engines.py`).",
        "",
        f"| seed | {header} |",
        "|---|" + "---|" * len(ratios),
        *rows,
        f"| {engines[0]} − {engines[-1]}, mean over seeds | {mean_row} |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
