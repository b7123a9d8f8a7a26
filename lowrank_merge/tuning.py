"""Tune CART's rank ratio and λ on a validation score for the price of one merge.

:func:`tune` merges T models at every point of a grid of rank ratios x scales
(λ) and returns the point with the best ``evaluate(state_dict)``. The grid
costs one decomposition per layer, not one per point:

* the rank-k truncation of a task vector is a prefix of its SVD: the top-k
  factors are the first k columns of the top-K factors for any K >= k, so each
  low-rank layer is decomposed once, at the largest rank the ratios ask for
  (``K_max``), and every smaller rank is summed from a prefix of those factors;
* λ only scales the summed delta: the merged layer at ``(ratio, λ)`` is
  ``average + λ · delta_ratio``, a multiply-add.

So a 6 x 10 grid costs about one merge at the largest ratio (its
decomposition and its sum of reconstructions, built up ratio by ratio), 60
multiply-adds over the model and 60 calls of ``evaluate``
(``benchmarks/tune_grid.py`` measures it).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .cart import (
    CartDeltas,
    Factors,
    MergeSettings,
    ModelLike,
    TensorPlan,
    _check_all_values,
    _progress,
    decompose_models,
    low_rank_sum,
    plan_tensor,
    prepare_models,
    tensor_factors,
)
from .validation import TensorMeta, check_scale

#: Default rank ratios: from 2 % to 32 % of min(m, n), around the paper's 8 %.
DEFAULT_TUNE_RANK_RATIOS: tuple[float, ...] = (0.02, 0.04, 0.08, 0.12, 0.16, 0.32)
#: Default λ values: the paper's configurations use 1.5-2.0 for vision and
#: 1.3-1.6 for language models; the grid brackets them from 0.5 to 4.0.
DEFAULT_TUNE_SCALES: tuple[float, ...] = (0.5, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 4.0)

#: ``evaluate(merged_state_dict) -> score``: the user's validation score.
Evaluate = Callable[[dict[str, Tensor]], float]


@dataclass(frozen=True)
class TuneResult:
    """What :func:`tune` found.

    Attributes:
        best_rank_ratio / best_scale / best_score: the best grid point and its
            score (on ties, the first in the order of :attr:`scores`).
        rank_ratios / scales: the grid's axes, in the order given (floats).
        scores: ``{(rank_ratio, scale): score}`` for every grid point,
            ratio-major in the order of the axes; :meth:`table` gives them as
            a ``[len(rank_ratios), len(scales)]`` float64 tensor.
        merged: the merged state dict at the best point, rebuilt by the same
            operations as the one that was scored (on the first model's
            devices, dtypes as in :func:`~lowrank_merge.cart_merge`).
        higher_is_better: whether the best score is the largest or smallest.
    """

    best_rank_ratio: float
    best_scale: float
    best_score: float
    rank_ratios: tuple[float, ...]
    scales: tuple[float, ...]
    scores: dict[tuple[float, float], float]
    merged: dict[str, Tensor] = field(repr=False)
    higher_is_better: bool = True

    def table(self) -> Tensor:
        """Scores as a ``[len(rank_ratios), len(scales)]`` float64 tensor (rows: ratios)."""
        return torch.tensor(
            [[self.scores[(ratio, scale)] for scale in self.scales] for ratio in self.rank_ratios],
            dtype=torch.float64,
        )


def _axis(values: Iterable[float], argument: str, check: Callable[[float], None]) -> tuple[float, ...]:
    """The grid axis ``values`` as a tuple of floats, each checked by ``check``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{argument} must be a sequence of numbers (e.g. (0.08,)), got {values!r}")
    values = tuple(values)
    if not values:
        raise ValueError(f"{argument} is empty: the grid needs at least one value")
    for index, value in enumerate(values):
        try:
            check(value)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{argument}[{index}]: {error}") from None
    floats = tuple(float(value) for value in values)
    repeated = sorted({value for value in floats if floats.count(value) > 1})
    if repeated:
        raise ValueError(f"{argument} has repeated values {repeated}: each grid point is evaluated once")
    return floats


def _check_rank_ratio(ratio: float) -> None:
    MergeSettings.create(rank_ratio=ratio)


def _score(value: object, ratio: float, scale: float) -> float:
    """``value`` as a finite float, or an error naming the grid point."""
    point = f"evaluate returned {value!r} at rank_ratio={ratio}, scale={scale}"
    if isinstance(value, Tensor) and value.numel() == 1 and not (value.is_complex() or value.dtype == torch.bool):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{point}; it must return a real number (a float), not a {type(value).__name__}")
    try:
        score = float(value)
    except OverflowError:  # an int beyond float's range
        score = math.inf
    if not math.isfinite(score):
        raise ValueError(f"{point}; the score must be finite")
    return score


def _decomposition_plan(
    name: str, meta: TensorMeta, grid: Sequence[MergeSettings]
) -> tuple[TensorPlan, list[int | None]]:
    """The plan that decomposes ``name`` once, and its rank at each ratio of ``grid``.

    A low-rank tensor is decomposed at the largest k the ratios ask for below
    ``min(m, n)`` (or not at all if every k is full rank); the ranks of other
    tensors are None.
    """
    plans = [plan_tensor(name, meta, settings) for settings in grid]
    if plans[0].action != "low_rank":
        return plans[0], [None] * len(plans)
    ranks = [plan.rank for plan in plans]
    below_full = [k for k in ranks if k < min(meta.shape)]
    return replace(plans[0], rank=max(below_full, default=min(meta.shape))), ranks


def _sums_by_ratio(
    factors: Mapping[str, tuple[Tensor, Factors | None]],
    ranks: Mapping[str, Sequence[int | None]],
    layouts: Mapping[str, tuple[torch.dtype, torch.device]],
    order: Sequence[int],
) -> Iterator[tuple[int, CartDeltas]]:
    """``(index, parts at ratio index)`` for the ratio indices in ``order`` (ascending ratios).

    Each layer's low-rank sum is extended in place from the previous ratio's
    by the factors between the two ranks, so the whole pass costs one sum at
    ``K_max``. A yielded :class:`CartDeltas` is valid until the next is built.
    """
    sums: dict[str, tuple[Tensor | None, int]] = {}  # name -> (low-rank sum, its rank)
    for index in order:
        parts = {}
        for name, (average, layer_factors) in factors.items():
            total, done = sums.get(name, (None, 0))
            k = ranks[name][index]
            if k is not None and k > done:
                part = low_rank_sum(layer_factors, k, start=done)
                total = None if part is None else part if total is None else total.add_(part)
                sums[name] = (total, k)
            parts[name] = (average, total)
        yield index, CartDeltas(parts, layouts)


def tune(
    models: Sequence[ModelLike],
    evaluate: Evaluate,
    *,
    rank_ratios: Iterable[float] = DEFAULT_TUNE_RANK_RATIOS,
    scales: Iterable[float] = DEFAULT_TUNE_SCALES,
    base: ModelLike | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    svd: str = "auto",
    niter: int | None = None,
    oversample: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    compute_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
    higher_is_better: bool = True,
    progress: bool = False,
) -> TuneResult:
    """Grid-search CART's rank ratio and λ on ``evaluate``, decomposing once.

    Each grid point's merged model is ``cart_merge(models, rank_ratio=r,
    scale=λ, ...)`` with the other arguments as given here, built one at a
    time, passed to ``evaluate`` and dropped (only the best one is rebuilt and
    returned). ``evaluate`` is called exactly ``len(rank_ratios) *
    len(scales)`` times: ratio by ratio in ascending order, and for each ratio
    the scales in the order given.

    Args:
        models: T >= 1 state dicts or ``nn.Module`` s, as in ``cart_merge``.
        evaluate: ``evaluate(state_dict) -> float``, the validation score of a
            merged state dict (name -> tensor, the first model's keys, devices
            and dtypes, or ``out_dtype``). It may read the tensors but must not
            modify them in place. Must return a finite real number (a Python
            or NumPy number, or a one-element real tensor).
        rank_ratios: the ratios to try, each in (0, 1] (default
            :data:`DEFAULT_TUNE_RANK_RATIOS`); ``k = max(1, floor(r * min(m,
            n)))`` per matrix. A ratio whose k is ``min(m, n)`` gives the
            average for that matrix, as ``cart_merge`` does (1.0: the average
            everywhere).
        scales: the λ values to try, finite (default :data:`DEFAULT_TUNE_SCALES`).
        base, include, exclude, svd, niter, oversample, seed, device,
            compute_dtype, out_dtype: as in :func:`~lowrank_merge.cart_merge`.
        higher_is_better: maximise the score (default) or minimise it (a loss).
        progress: tqdm bars for the decomposition and the grid.

    Returns:
        A :class:`TuneResult`: the best point, every score, and the merged
        state dict at the best point.

    Exactness. Each low-rank layer is decomposed once, at ``K_max``, the
    largest k below ``min(m, n)`` among the ratios, with the engine and seeded
    sketch ``cart_merge`` would use at ``K_max``; rank k < K_max is summed from
    the first k factors. With ``svd="exact"`` and ``svd="gram"`` these are the
    top-k factors ``cart_merge`` computes, so every score equals the score of
    a separate ``cart_merge`` call (to float rounding). With the sketch
    engines (``"randomized"``, ``"krylov"``, ``"gram_subspace"`` and ``"auto"``,
    which may also pick another engine at ``K_max`` than at k) only the points at
    each layer's ``K_max`` are those of ``cart_merge`` (to float rounding); a
    smaller k is a prefix of factors from a sketch of width ``K_max +
    oversample``, not the rank-k sketch of width ``k + oversample`` a separate
    call draws, so its score differs from a separate call's: the prefix is a
    better approximation of the exact top-k, since the wider sketch spans the
    top-k subspace more accurately (on the test models 5-20x closer to the
    exact merge than a separate ``randomized`` merge; tests/test_tune.py).

    Cost: one decomposition per low-rank layer at ``K_max`` (about one
    ``cart_merge`` at the largest ratio); the low-rank sums, built ratio by
    ratio in ascending order, each adding the factors between the previous
    ratio's rank and its own (``[m, T·Δk] @ [T·Δk, n]``), so all ratios
    together cost one sum at ``K_max``, as one merge does; per grid point
    one multiply-add over the model and one ``evaluate``. (Summing
    incrementally rounds differently from one product: scores agree with
    separate merges to float rounding, not bit for bit.)

    Memory (compute dtype, on the compute device), besides the input models:
    the average (one model), the factors ``U, S, Vh`` of every low-rank layer
    (``T · K_max · (m + n + 1)`` numbers each: for 8 ViT-B/32 tasks at
    K_max = 0.32 · 768, about 3.4 models' worth), the low-rank sums of the
    ratio being evaluated (one model's low-rank layers), and the merged model
    being scored (one model, in the output dtypes). While a layer is decomposed its
    stack and centered stack (2 T copies of that layer) are live too.

    Raises:
        ValueError / TypeError: bad models, grid or settings, or a
            non-callable ``evaluate``, before any decomposition; a non-finite
            or non-numeric score, naming the grid point.
    """
    if not callable(evaluate):
        raise TypeError(f"evaluate must be a callable evaluate(state_dict) -> float, got {evaluate!r}")
    ratios = _axis(rank_ratios, "rank_ratios", _check_rank_ratio)
    lambdas = _axis(scales, "scales", check_scale)
    if not isinstance(higher_is_better, bool):
        raise TypeError(f"higher_is_better must be True or False, got {higher_is_better!r}")
    common = dict(
        include=include,
        exclude=exclude,
        svd=svd,
        niter=niter,
        oversample=oversample,
        seed=seed,
        device=device,
        compute_dtype=compute_dtype,
        out_dtype=out_dtype,
    )
    grid = [MergeSettings.create(rank_ratio=ratio, **common) for ratio in ratios]
    state_dicts, labels = prepare_models(models, base)
    _check_all_values(state_dicts, labels)

    # Decompose every low-rank layer once, at its largest rank.
    plans, ranks = {}, {}
    for name, tensor in state_dicts[0].items():
        plans[name], ranks[name] = _decomposition_plan(name, TensorMeta.of(tensor), grid)
    factors, layouts = decompose_models(state_dicts, plans, grid[0], tensor_factors, progress, "CART tune: decompose")

    # Ratio by ratio in ascending order (each ratio's sums extend the previous
    # ratio's), λ in the order given; one merged model at a time.
    order = sorted(range(len(ratios)), key=ratios.__getitem__)
    sums = _sums_by_ratio(factors, ranks, layouts, order)
    evaluated: dict[tuple[int, float], float] = {}
    current, decomposed = None, None
    points = [(index, scale) for index in order for scale in lambdas]
    for index, scale in _progress(points, progress, "CART tune: evaluate", unit="point"):
        if index != current:
            current, decomposed = next(sums)
        evaluated[(index, scale)] = _score(evaluate(decomposed.merged(scale)), ratios[index], scale)
    sums.close()

    scores = {(ratios[index], scale): evaluated[(index, scale)] for index in range(len(ratios)) for scale in lambdas}
    pick = max if higher_is_better else min
    (best_ratio, best_scale), best_score = pick(scores.items(), key=lambda item: item[1])  # the first of ties
    best = ratios.index(best_ratio)
    if best != current:
        # Replay the sums up to the best ratio: the same operations as when it was scored.
        decomposed = None
        decomposed = next(parts for index, parts in _sums_by_ratio(factors, ranks, layouts, order) if index == best)
    return TuneResult(
        best_rank_ratio=best_ratio,
        best_scale=best_scale,
        best_score=best_score,
        rank_ratios=ratios,
        scales=lambdas,
        scores=scores,
        merged=decomposed.merged(best_scale),
        higher_is_better=higher_is_better,
    )
