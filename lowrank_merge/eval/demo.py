"""``lowrank-merge demo``: run the offline benchmark and write its report, JSON and plot."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

# The eval extra's packages, by import name.
EVAL_PACKAGES = ("mlxtend", "sklearn", "mnist1d", "matplotlib")


def quick_config():
    """A small, fast configuration (3 tasks, 1 seed, a tiny ViT): checks the pipeline, not the method."""
    from .benchmark import BenchmarkConfig
    from .model import ViTConfig
    from .train import TrainingConfig

    return BenchmarkConfig(
        tasks=("mnist_rotated", "greek_inverted", "hebrew_mirrored"),
        seeds=(0,),
        split_sizes=(400, 100, 150),
        model=ViTConfig(width=32, depth=2, heads=2),
        training=TrainingConfig(pretrain_per_class=30, pretrain_steps=150, finetune_steps=60, head_steps=60),
        rank_ratios=(0.04, 0.16, 1.0),
        cart_scales=(0.5, 1.0, 2.0),
        task_arithmetic_scales=(0.2, 0.5),
        ties_densities=(0.2,),
        ties_scales=(0.5, 1.0),
        svd_method_scales=(0.5, 1.0),
    )


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from .data import DEFAULT_TASKS, TASK_SOURCES

    parser.add_argument("--tasks", metavar="A,B,...", help=f"comma-separated tasks (default: {','.join(DEFAULT_TASKS)}; "
                        f"available: {','.join(TASK_SOURCES)})")
    parser.add_argument("--seeds", type=int, metavar="N", help="number of seeds (default 3)")
    parser.add_argument("--quick", action="store_true", help="a tiny, fast run that checks the pipeline (3 tasks, 1 seed)")
    parser.add_argument("--out", default="lowrank_merge_demo", metavar="DIR",
                        help="folder for report.md, results.json and rank_curve.png (default ./lowrank_merge_demo)")
    parser.add_argument("--json", metavar="PATH", help="also write the results JSON here")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--cache-dir", metavar="DIR", help="where trained task models are kept (default ~/.cache/lowrank_merge/eval)")
    cache.add_argument("--no-cache", action="store_true", help="train everything afresh and keep nothing")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: all cores)")
    parser.add_argument("--workers", type=int, metavar="N", help="processes that train task models (default: one per core)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


def _missing_packages() -> list[str]:
    return [name for name in EVAL_PACKAGES if importlib.util.find_spec(name) is None]


def _config_from(args: argparse.Namespace):
    from .benchmark import BenchmarkConfig
    from .data import TASK_SOURCES

    config = quick_config() if args.quick else BenchmarkConfig()
    if args.tasks:
        tasks = tuple(name.strip() for name in args.tasks.split(",") if name.strip())
        unknown = [name for name in tasks if name not in TASK_SOURCES]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; choose from {sorted(TASK_SOURCES)}")
        repeated = sorted({name for name in tasks if tasks.count(name) > 1})
        if repeated:
            raise ValueError(f"task(s) {repeated} given more than once in --tasks; each task is merged once")
        config = replace(config, tasks=tasks)
    if args.seeds is not None:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
        config = replace(config, seeds=tuple(range(args.seeds)))
    return config


def run_demo(args: argparse.Namespace) -> int:
    missing = _missing_packages()
    if missing:
        raise ValueError(
            f"the demo needs the eval extra (missing: {', '.join(missing)}); "
            'install it with: pip install --no-build-isolation -e ".[eval]"'
        )
    from .benchmark import run_benchmark
    from .report import markdown_report, plot_rank_curve, write_json

    config = _config_from(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    cache_dir = None if args.no_cache else (args.cache_dir or "default")
    started = time.perf_counter()

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    result = run_benchmark(config, cache_dir=cache_dir, progress=progress, workers=args.workers)
    report = markdown_report(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report)
    write_json(result, out / "results.json")
    plot_rank_curve(result, out / "rank_curve.png")
    if args.json:
        write_json(result, args.json)
    print(report)
    print(f"wrote {out / 'report.md'}, {out / 'results.json'} and {out / 'rank_curve.png'}"
          + (f", and {args.json}" if args.json else ""))
    return 0
