"""The multi-task merging benchmark: train (or load) T task models, merge, score.

For each seed: build the tasks' splits, fine-tune one backbone per task from
the shared pretrained backbone (cached on disk), then merge the T backbones
with every method through :func:`lowrank_merge.merge` / :func:`lowrank_merge.tune`
and score the merged backbone on each task with that task's own frozen head.
Every hyper-parameter (λ, TIES's density, CART's rank ratio) is chosen on the
validation splits; test accuracy is measured once per chosen point.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..methods import merge
from ..selection import key_preset
from ..tuning import tune
from .data import DEFAULT_TASKS, Task, build_task, pretraining_corpus
from .model import VisionTransformer, ViTConfig
from .train import StateDict, TrainingConfig, accuracy, finetune, fit_head, pretrain

# Bump when a change to data, model or training makes cached models stale.
CACHE_VERSION = 1
PRETRAIN_SEED = 0

METHOD_LABELS: dict[str, str] = {
    "pretrained": "pretrained",
    "individual": "individual (upper bound)",
    "weight_averaging": "weight averaging",
    "task_arithmetic": "task arithmetic",
    "ties": "TIES",
    "tsv_m": "TSV-M",
    "iso_cts": "Iso-CTS",
    "cart": "CART",
}


@dataclass(frozen=True)
class BenchmarkConfig:
    """What to train and which grids to search (λ grids wide enough that the best is inside)."""

    tasks: tuple[str, ...] = DEFAULT_TASKS
    seeds: tuple[int, ...] = (0, 1, 2)
    split_sizes: tuple[int, int, int] = (2000, 100, 400)  # train, validation, test per task
    model: ViTConfig = field(default_factory=ViTConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    rank_ratios: tuple[float, ...] = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.5, 1.0)
    cart_scales: tuple[float, ...] = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
    task_arithmetic_scales: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
    ties_densities: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)
    ties_scales: tuple[float, ...] = (0.4, 0.6, 0.8, 1.0, 1.5)
    svd_method_scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5, 2.0)
    key_preset: str = "reference"

    def __post_init__(self) -> None:
        if len(self.tasks) < 2:
            raise ValueError(f"the benchmark needs at least 2 tasks, got {list(self.tasks)}")
        if not self.seeds:
            raise ValueError("the benchmark needs at least one seed")
        if 1.0 not in self.rank_ratios:
            raise ValueError("rank_ratios must include 1.0 (the full-rank end of the curve, equal to averaging)")


@dataclass
class SeedResult:
    """Per-task test accuracies (percent) of every method, for one seed."""

    seed: int
    test_accuracy: dict[str, list[float]]  # method -> [T]
    chosen: dict[str, dict[str, float]]  # method -> hyper-parameters chosen on validation
    rank_curve: dict[str, float]  # rank ratio -> mean test accuracy at its best λ
    rank_curve_scale: dict[str, float]  # rank ratio -> that λ
    seconds: dict[str, float]


@dataclass
class BenchmarkResult:
    config: BenchmarkConfig
    seeds: list[SeedResult]
    seconds_total: float = 0.0
    seconds_training: float = 0.0  # pretraining and task models (near 0 when all are cached)

    def method_names(self) -> list[str]:
        return list(self.seeds[0].test_accuracy)

    def average_accuracy(self, method: str) -> tuple[float, float]:
        """Mean over seeds of the mean over tasks, and its spread (sample std over seeds)."""
        per_seed = [statistics.fmean(seed.test_accuracy[method]) for seed in self.seeds]
        return statistics.fmean(per_seed), (statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0)

    def normalized_accuracy(self, method: str) -> float:
        """Mean over seeds and tasks of accuracy / the individual model's accuracy, in percent."""
        values = [
            100.0 * accuracy / individual
            for seed in self.seeds
            for accuracy, individual in zip(seed.test_accuracy[method], seed.test_accuracy["individual"])
        ]
        return statistics.fmean(values)

    def task_accuracy(self, method: str) -> list[float]:
        """Per-task test accuracy, mean over seeds."""
        columns = zip(*(seed.test_accuracy[method] for seed in self.seeds))
        return [statistics.fmean(column) for column in columns]

    def rank_curve(self) -> dict[str, tuple[float, float]]:
        """Rank ratio -> (mean, spread) over seeds of the average test accuracy."""
        curve = {}
        for ratio in self.seeds[0].rank_curve:
            values = [seed.rank_curve[ratio] for seed in self.seeds]
            curve[ratio] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        return curve

    def to_json(self) -> dict:
        average = {method: self.average_accuracy(method) for method in self.method_names()}
        return {
            "average_accuracy": {method: mean for method, (mean, _) in average.items()},
            "average_accuracy_spread": {method: spread for method, (_, spread) in average.items()},
            "normalized_accuracy": {method: self.normalized_accuracy(method) for method in self.method_names()},
            "cart_rank_curve": {ratio: mean for ratio, (mean, _) in self.rank_curve().items()},
            "cart_rank_curve_spread": {ratio: spread for ratio, (_, spread) in self.rank_curve().items()},
            "task_accuracy": {
                method: dict(zip(self.config.tasks, self.task_accuracy(method))) for method in self.method_names()
            },
            "seeds": [asdict(seed) for seed in self.seeds],
            "seconds_total": self.seconds_total,
            "seconds_training": self.seconds_training,
            "config": _config_dict(self.config),
        }


def _config_dict(config: BenchmarkConfig) -> dict:
    return json.loads(json.dumps(asdict(config)))


# ---------------------------------------------------------------------------
# Trained models, cached on disk
# ---------------------------------------------------------------------------


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "lowrank_merge" / "eval"


class ModelCache:
    """Trained backbones and heads on disk, keyed by everything that shapes them.

    ``None`` as the directory disables caching. Files are written to a
    temporary name and renamed, so an interrupted run never leaves a
    half-written model behind.
    """

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    def _path(self, key: dict) -> Path | None:
        if self.directory is None:
            return None
        digest = hashlib.sha256(json.dumps({"version": CACHE_VERSION, **key}, sort_keys=True).encode()).hexdigest()
        return self.directory / f"{digest[:24]}.pt"

    def get(self, key: dict) -> dict[str, Tensor] | None:
        """The stored value, or None if absent (or caching is off)."""
        path = self._path(key)
        return torch.load(path, weights_only=True) if path is not None and path.exists() else None

    def load_or_make(self, key: dict, make: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
        stored = self.get(key)
        if stored is not None:
            return stored
        value = make()
        path = self._path(key)
        if path is None:
            return value
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(value, partial)
        os.replace(partial, path)
        return value


def _pretrained(config: BenchmarkConfig, cache: ModelCache) -> StateDict:
    key = {"kind": "pretrained", "model": config.model.as_dict(), "training": config.training.as_dict(),
           "seed": PRETRAIN_SEED}

    def make() -> StateDict:
        training = config.training
        corpus = pretraining_corpus(training.pretrain_per_class, PRETRAIN_SEED, training.pretrain_strength)
        return pretrain(corpus, config.model, training, PRETRAIN_SEED)

    return cache.load_or_make(key, make)


def _task_key(task_name: str, seed: int, config: BenchmarkConfig) -> dict:
    return {"kind": "task", "task": task_name, "seed": seed, "sizes": list(config.split_sizes),
            "model": config.model.as_dict(), "training": config.training.as_dict()}


def _stored_task_model(
    task_name: str, seed: int, pretrained: StateDict, config: BenchmarkConfig, cache: ModelCache
) -> dict[str, Tensor]:
    """One task's frozen head (fit on pretrained features) and fine-tuned backbone, as
    ``backbone.*`` / ``head.*`` tensors; trained unless cached."""

    def make() -> dict[str, Tensor]:
        task = build_task(task_name, seed, config.split_sizes)
        backbone = VisionTransformer(config.model)
        backbone.load_state_dict(pretrained)
        head = fit_head(backbone, task, config.training, seed)
        tuned = finetune(pretrained, config.model, head, task, config.training, seed)
        return {**{f"backbone.{k}": v for k, v in tuned.items()}, **{f"head.{k}": v for k, v in head.state_dict().items()}}

    return cache.load_or_make(_task_key(task_name, seed, config), make)


def _unpack(stored: dict[str, Tensor], config: BenchmarkConfig, num_classes: int) -> tuple[StateDict, nn.Linear]:
    head = nn.Linear(config.model.width, num_classes)
    head.load_state_dict({k[len("head."):]: v for k, v in stored.items() if k.startswith("head.")})
    head.requires_grad_(False)
    return {k[len("backbone."):]: v for k, v in stored.items() if k.startswith("backbone.")}, head


def train_task_models(
    config: BenchmarkConfig,
    pretrained: StateDict,
    cache: ModelCache,
    progress: Callable[[str], None],
    workers: int,
) -> dict[tuple[int, str], dict[str, Tensor]]:
    """Every (seed, task) model, the uncached ones trained by ``workers`` processes.

    The models are small, so torch's intra-op threads are poorly used: on 2
    cores, two single-threaded training processes finish 1.4x sooner than one
    process with two threads (measured: 66 against 92 ms per step).
    """
    jobs = [(seed, name) for seed in config.seeds for name in config.tasks]
    stored = {job: cache.get(_task_key(job[1], job[0], config)) for job in jobs}
    pending = [job for job in jobs if stored[job] is None]
    workers = min(workers, len(pending))
    if workers <= 1:
        for count, (seed, name) in enumerate(pending, 1):
            progress(f"task model {count}/{len(pending)}: seed {seed}, {name}")
            stored[(seed, name)] = _stored_task_model(name, seed, pretrained, config, cache)
        return stored
    threads = max(1, torch.get_num_threads() // workers)
    progress(f"training {len(pending)} task models in {workers} processes of {threads} thread(s)")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        futures = {pool.submit(_stored_task_model, name, seed, pretrained, config, cache): (seed, name)
                   for seed, name in pending}
        for count, future in enumerate(as_completed(futures), 1):
            seed, name = futures[future]
            stored[(seed, name)] = future.result()
            progress(f"task model {count}/{len(pending)} done: seed {seed}, {name}")
    return stored


# ---------------------------------------------------------------------------
# Scoring and model selection
# ---------------------------------------------------------------------------


class Scorer:
    """Per-task accuracy of a backbone state dict, with each task's own head."""

    def __init__(self, tasks: Sequence[Task], heads: Sequence[nn.Linear], model_config: ViTConfig) -> None:
        self.tasks, self.heads = list(tasks), list(heads)
        self.backbone = VisionTransformer(model_config)

    def accuracies(self, state_dict: StateDict, split: str) -> list[float]:
        self.backbone.load_state_dict(state_dict)
        return [accuracy(self.backbone, head, getattr(task, split)) for task, head in zip(self.tasks, self.heads)]

    def own_task_accuracy(self, state_dict: StateDict, index: int, split: str) -> float:
        """Accuracy on task ``index`` alone (the individual fine-tuned model's own task)."""
        self.backbone.load_state_dict(state_dict)
        return accuracy(self.backbone, self.heads[index], getattr(self.tasks[index], split))

    def validation_score(self, state_dict: StateDict) -> float:
        return statistics.fmean(self.accuracies(state_dict, "validation"))


def _grid_search(
    scorer: Scorer, make: Callable[..., StateDict], grid: Sequence[dict[str, float]]
) -> tuple[dict[str, float], StateDict]:
    """The grid point with the best validation score (the first, on ties) and its merged model."""
    best_score, best_point, best_model = -1.0, grid[0], None
    for point in grid:
        model = make(**point)
        score = scorer.validation_score(model)
        if score > best_score:
            best_score, best_point, best_model = score, point, model
    return best_point, best_model


def _cart_rank_curve(
    scorer: Scorer, finetuned: Sequence[StateDict], config: BenchmarkConfig, filters: dict
) -> tuple[dict[str, tuple[float, StateDict]], tuple[float, float]]:
    """For each rank ratio, the best λ on validation and its merged model; and the best (ratio, λ).

    One :func:`tune` call per ratio, so each point is exactly ``cart_merge`` at
    that ratio (a prefix of a larger decomposition would be a slightly
    different approximation with the randomized engine).
    """
    per_ratio, best = {}, (-1.0, None)
    for ratio in config.rank_ratios:
        scales = (1.0,) if ratio == 1.0 else config.cart_scales  # full rank is the average for every λ
        result = tune(finetuned, scorer.validation_score, rank_ratios=(ratio,), scales=scales, **filters)
        per_ratio[str(ratio)] = (result.best_scale, result.merged)
        if result.best_score > best[0]:
            best = (result.best_score, (ratio, result.best_scale))
    return per_ratio, best[1]


def evaluate_seed(
    config: BenchmarkConfig,
    seed: int,
    pretrained: StateDict,
    stored: dict[tuple[int, str], dict[str, Tensor]],
    progress: Callable[[str], None],
) -> SeedResult:
    """Merge this seed's task models with every method and score them (choices on validation)."""
    seconds: dict[str, float] = {}
    progress(f"seed {seed}: building {len(config.tasks)} tasks")
    tasks = [build_task(name, seed, config.split_sizes) for name in config.tasks]
    finetuned, heads = [], []
    for task in tasks:
        backbone, head = _unpack(stored[(seed, task.name)], config, task.num_classes)
        finetuned.append(backbone)
        heads.append(head)

    scorer = Scorer(tasks, heads, config.model)
    filters = key_preset(config.key_preset)
    test: dict[str, list[float]] = {}
    chosen: dict[str, dict[str, float]] = {}

    def timed(method: str, run: Callable[[], tuple[dict[str, float], StateDict]]) -> None:
        progress(f"seed {seed}: {METHOD_LABELS[method]}")
        start = time.perf_counter()
        point, model = run()
        test[method] = scorer.accuracies(model, "test")
        chosen[method] = point
        seconds[method] = time.perf_counter() - start

    timed("pretrained", lambda: ({}, pretrained))
    individual = [scorer.own_task_accuracy(model, index, "test") for index, model in enumerate(finetuned)]
    test["individual"], chosen["individual"] = individual, {}
    timed("weight_averaging", lambda: ({}, merge(finetuned, "average")))

    def baseline(method: str, **grids: Sequence[float]) -> tuple[dict[str, float], StateDict]:
        points = [dict(zip(grids, values)) for values in _product(*grids.values())]
        options = filters if method in ("tsv", "iso_cts") else {}
        return _grid_search(scorer, lambda **p: merge(finetuned, method, base=pretrained, **p, **options), points)

    timed("task_arithmetic", lambda: baseline("task_arithmetic", scale=config.task_arithmetic_scales))
    timed("ties", lambda: baseline("ties", density=config.ties_densities, scale=config.ties_scales))
    timed("tsv_m", lambda: baseline("tsv", scale=config.svd_method_scales))
    timed("iso_cts", lambda: baseline("iso_cts", scale=config.svd_method_scales))

    progress(f"seed {seed}: CART rank curve")
    start = time.perf_counter()
    per_ratio, (best_ratio, best_scale) = _cart_rank_curve(scorer, finetuned, config, filters)
    rank_curve, rank_curve_scale = {}, {}
    for ratio, (scale, model) in per_ratio.items():
        accuracies = scorer.accuracies(model, "test")
        rank_curve[ratio], rank_curve_scale[ratio] = statistics.fmean(accuracies), scale
        if float(ratio) == best_ratio:
            test["cart"], chosen["cart"] = accuracies, {"rank_ratio": best_ratio, "scale": best_scale}
    seconds["cart"] = time.perf_counter() - start
    return SeedResult(seed, test, chosen, rank_curve, rank_curve_scale, seconds)


def _product(*axes: Sequence[float]) -> list[tuple[float, ...]]:
    points: list[tuple[float, ...]] = [()]
    for axis in axes:
        points = [point + (value,) for point in points for value in axis]
    return points


def run_benchmark(
    config: BenchmarkConfig | None = None,
    *,
    cache_dir: Path | str | None = "default",
    progress: Callable[[str], None] | None = None,
    workers: int | None = None,
) -> BenchmarkResult:
    """Run the whole benchmark.

    ``cache_dir=None`` trains everything afresh and keeps nothing; ``workers``
    training processes (default: one per CPU core) share the task models.
    """
    config = config or BenchmarkConfig()
    directory = default_cache_dir() if cache_dir == "default" else (None if cache_dir is None else Path(cache_dir))
    cache = ModelCache(directory)
    report = progress or (lambda message: None)
    started = time.perf_counter()
    report("pretrained backbone (trained once, then cached)")
    pretrained = _pretrained(config, cache)
    stored = train_task_models(config, pretrained, cache, report, workers or os.cpu_count() or 1)
    training_seconds = time.perf_counter() - started
    seeds = [evaluate_seed(config, seed, pretrained, stored, report) for seed in config.seeds]
    return BenchmarkResult(config, seeds, time.perf_counter() - started, training_seconds)
