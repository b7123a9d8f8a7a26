"""``lowrank_merge.tune``: the grid search over rank ratio x λ.

Checked independently of how tune works inside: every score it reports is the
score of a separate ``cart_merge`` call at that grid point (exact and gram
engines), the sketch engines stay within the accuracy of a separate merge of
the float64 reference of conftest.py, each layer is decomposed once, only one
merged model is alive at a time, and bad input is rejected before any
decomposition (``forbid_decomposition``) and before ``evaluate`` is called.
"""

from __future__ import annotations

import gc
import math
import weakref

import numpy as np
import pytest
import torch

import lowrank_merge as lm
import lowrank_merge._ops as ops

from conftest import (
    EXPECTED_DEFAULT_LOW_RANK,
    as_module,
    make_models,
    make_pretrained,
    reference_cart,
    relative_error,
)

# float32 merges against each other or the float64 reference, relative to each
# tensor's norm (see FLOAT32_RTOL in test_reference.py for the analysis).
FLOAT32_RTOL = 1e-5
# Two float32 computations of the same score: a few float32 roundings of the
# merged weights, summed by a float64 functional (~1e-7 measured for gram).
SCORE_RTOL = 1e-6
# The same in float64 (the gram engine's eigendecomposition route, ~1e-13 measured).
SCORE_RTOL_64 = 1e-10

RATIOS = (0.125, 0.25, 0.5, 1.0)
SCALES = (-1.0, 0.5, 2.0)


def _models(T=4, d=32, seed=0):
    return make_models(T, d, seed=seed)


def _float_names(model):
    return [name for name, tensor in model.items() if tensor.dtype.is_floating_point]


def _average(models):
    return {n: sum(m[n].double() for m in models) / len(models) for n in _float_names(models[0])}


class LinearScore:
    """``Σ_name <w_name − center_name, probe_name>`` in float64: a fixed random
    linear functional of every floating weight, counting its calls.

    With ``center`` = the float64 average, the score sees only λ·(low-rank
    sum): a wrong rank, λ or factor moves it by O(1) of itself.
    """

    def __init__(self, models, *, seed=5, center=None):
        g = torch.Generator().manual_seed(seed)
        names = _float_names(models[0])
        self.probe = {n: torch.randn(models[0][n].shape, generator=g, dtype=torch.float64) for n in names}
        self.center = center or {}
        self.calls = 0

    def __call__(self, state_dict):
        self.calls += 1
        total = 0.0
        for name, probe in self.probe.items():
            weight = state_dict[name].double()
            if name in self.center:
                weight = weight - self.center[name]
            total += float((weight * probe).sum())
        return total


def _separate_scores(models, evaluate, ratios, scales, **kwargs):
    return {
        (r, s): evaluate(lm.cart_merge(models, rank_ratio=r, scale=s, **kwargs)) for r in ratios for s in scales
    }


def _assert_scores_close(got, expected, rtol):
    assert list(got) == list(expected)
    # Relative to the largest score of the grid: the centered score is ~0 at ratio 1.0.
    size = max(abs(v) for v in expected.values())
    for point, value in expected.items():
        assert abs(got[point] - value) <= rtol * size, (point, got[point], value)


# ---------------------------------------------------------------------------
# Scores equal separate cart_merge calls
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("svd", ["exact", "gram"])
def test_scores_equal_separate_merges(svd):
    models = _models(seed=1)
    evaluate = LinearScore(models)
    result = lm.tune(models, evaluate, rank_ratios=RATIOS, scales=SCALES, svd=svd)
    assert evaluate.calls == len(RATIOS) * len(SCALES)
    expected = _separate_scores(models, evaluate, RATIOS, SCALES, svd=svd)
    _assert_scores_close(result.scores, expected, SCORE_RTOL)
    # The grid really varies: points below full rank differ far beyond the tolerance.
    values = sorted(value for (ratio, _), value in expected.items() if ratio < 1.0)
    assert min(b - a for a, b in zip(values, values[1:])) > 100 * SCORE_RTOL * max(map(abs, values))


@pytest.mark.parametrize("svd", ["exact", "gram"])
def test_delta_sensitive_scores_equal_separate_merges_in_float64(svd):
    """Scored on merged − average only, in float64: any error in the low-rank
    sums (a wrong prefix, rank or λ) would be O(1) of the score."""
    models = _models(seed=2)
    evaluate = LinearScore(models, center=_average(models))
    kwargs = dict(svd=svd, compute_dtype=torch.float64, out_dtype=torch.float64)
    result = lm.tune(models, evaluate, rank_ratios=RATIOS, scales=SCALES, **kwargs)
    expected = _separate_scores(models, evaluate, RATIOS, SCALES, **kwargs)
    _assert_scores_close(result.scores, expected, SCORE_RTOL_64)
    # ...and both equal the independent float64 reference.
    reference = {(r, s): evaluate(reference_cart(models, rank_ratio=r, scale=s)) for r, s in expected}
    _assert_scores_close(result.scores, reference, SCORE_RTOL_64)
    # Tolerance check: the next rank's score is far away.
    shifted = evaluate(lm.cart_merge(models, rank_ratio=0.125 + 1 / 32, scale=2.0, **kwargs))
    assert abs(shifted - result.scores[(0.125, 2.0)]) > 1e-3 * abs(result.scores[(0.125, 2.0)])


@pytest.mark.parametrize("svd", ["exact", "gram"])
def test_best_merged_model_equals_cart_merge(svd):
    models = _models(seed=3)
    result = lm.tune(models, LinearScore(models), rank_ratios=RATIOS, scales=SCALES, svd=svd)
    expected = lm.cart_merge(models, rank_ratio=result.best_rank_ratio, scale=result.best_scale, svd=svd)
    assert list(result.merged) == list(expected) == list(models[0])
    for name, tensor in expected.items():
        assert result.merged[name].dtype == tensor.dtype, name
        assert result.merged[name].shape == tensor.shape, name
        if tensor.dtype.is_floating_point:
            assert relative_error(result.merged[name], tensor) <= 1e-6, name
        else:
            assert torch.equal(result.merged[name], tensor), name
    # The merged model is the one scored at the best point.
    assert LinearScore(models)(result.merged) == pytest.approx(result.best_score, rel=1e-12)


def test_full_rank_ratio_gives_exactly_the_average():
    models = _models(seed=4)
    evaluate = LinearScore(models)
    result = lm.tune(models, evaluate, rank_ratios=(1.0,), scales=(0.5, 2.0, -3.0))
    average = lm.cart_merge(models, rank_ratio=1.0)
    for name, tensor in average.items():
        assert torch.equal(result.merged[name], tensor), name
    reference = _average(models)
    for name in reference:
        assert relative_error(result.merged[name], reference[name]) <= 1e-6, name
    # λ has nothing to scale: every score is the same.
    assert len(set(result.scores.values())) == 1


# ---------------------------------------------------------------------------
# The best point
# ---------------------------------------------------------------------------


class DistanceScore:
    """−|c − target|: the best point is the one whose centered score c is closest to target."""

    def __init__(self, inner, target):
        self.inner, self.target = inner, target

    def __call__(self, state_dict):
        return -abs(self.inner(state_dict) - self.target)


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_best_point_is_the_arg_best_of_separate_merges(higher_is_better):
    models = _models(seed=5)
    inner = LinearScore(models, center=_average(models))
    ratios, scales = (0.125, 0.25, 0.5), (0.5, 1.0, 1.5, 2.0, 3.0)
    plain = _separate_scores(models, inner, ratios, scales, svd="exact")
    # A target between grid scores puts the optimum at an interior point (not the
    # first or last), unique by construction.
    ordered = sorted(plain.values())
    target = 0.5 * (ordered[len(ordered) // 2] + ordered[len(ordered) // 2 + 1]) + 1e-3 * abs(ordered[-1])
    distance = DistanceScore(inner, target)
    evaluate = distance if higher_is_better else (lambda sd: -distance(sd))  # a loss: smaller is better
    expected = _separate_scores(models, evaluate, ratios, scales, svd="exact")
    pick = max if higher_is_better else min
    best_point = pick(expected, key=expected.get)
    assert best_point not in {(ratios[0], scales[0]), (ratios[-1], scales[-1])}
    result = lm.tune(
        models, evaluate, rank_ratios=ratios, scales=scales, svd="exact", higher_is_better=higher_is_better
    )
    assert (result.best_rank_ratio, result.best_scale) == best_point
    assert result.best_score == pick(result.scores.values())
    # float32 weights: the centered score is known to ~1e-6 of its grid's size.
    assert result.best_score == pytest.approx(expected[best_point], rel=0, abs=SCORE_RTOL * max(map(abs, plain.values())))
    assert result.higher_is_better is higher_is_better


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_ties_go_to_the_first_point_in_grid_order(higher_is_better):
    models = _models(T=2, d=16)
    result = lm.tune(
        models, lambda sd: 1.0, rank_ratios=(0.5, 0.25), scales=(3.0, 1.0), higher_is_better=higher_is_better
    )
    assert (result.best_rank_ratio, result.best_scale, result.best_score) == (0.5, 3.0, 1.0)
    # ...and the merged model is the one at that point (0.5 is evaluated last).
    expected = lm.cart_merge(models, rank_ratio=0.5, scale=3.0)
    for name, tensor in expected.items():
        assert relative_error(result.merged[name], tensor) <= 1e-6, name


def test_best_merged_model_is_rebuilt_when_the_best_ratio_came_first():
    """The best point is the first evaluated (smallest ratio, first λ): its sums
    are rebuilt after the grid, by the same operations, so the returned model
    is the scored one bit for bit."""
    models = _models(T=3, d=32, seed=9)
    scored = []

    def evaluate(state_dict):
        scored.append({name: tensor.clone() for name, tensor in state_dict.items()})
        return 1.0 if len(scored) == 1 else 0.0

    result = lm.tune(models, evaluate, rank_ratios=(0.5, 0.125, 0.25), scales=(2.0, 0.5))
    assert (result.best_rank_ratio, result.best_scale) == (0.125, 2.0)
    for name, tensor in scored[0].items():
        assert torch.equal(result.merged[name], tensor), name
    # (and it is not just any grid point's model)
    assert not torch.equal(result.merged["blocks.0.mlp.c_fc.weight"], scored[-1]["blocks.0.mlp.c_fc.weight"])


# ---------------------------------------------------------------------------
# Sketch engines
# ---------------------------------------------------------------------------


def _worst_error(merged, reference):
    return max(relative_error(merged[n], reference[n]) for n in reference if reference[n].dtype.is_floating_point)


@pytest.mark.parametrize("svd", ["randomized", "krylov", "auto"])
def test_sketch_engines_against_the_float64_reference(svd):
    """d = 48, T = 4, two blocks: at k = 6..24 of 48 the sketch (width k + 10 for
    randomized) does not span the matrices, so the engines are approximate.

    * At each layer's largest rank (ratio 0.5 here, for every low-rank matrix)
      tune runs cart_merge's decomposition, with the same seeded sketch.
    * At smaller ranks it sums a prefix of those factors: never less accurate
      against the float64 reference than a separate merge with the same engine
      (the accuracy the library accepts for it, cf. test_engines.py), plus
      float32 rounding. Measured: 5-20x more accurate for randomized, and up to
      1e4x for krylov, whose default oversample is 0.
    """
    models = make_models(4, 48, seed=2, blocks=2)
    ratios, scales = (0.125, 0.25, 0.5), (0.5, 2.0)
    merged = {}

    def keep(state_dict):  # records every grid point's merged model (a test only)
        merged[len(merged)] = state_dict
        return 0.0

    lm.tune(models, keep, rank_ratios=ratios, scales=scales, svd=svd, seed=7)
    points = [(r, s) for r in ratios for s in scales]
    for index, (ratio, scale) in enumerate(points):
        separate = lm.cart_merge(models, rank_ratio=ratio, scale=scale, svd=svd, seed=7)
        reference = reference_cart(models, rank_ratio=ratio, scale=scale)
        if ratio == ratios[-1]:
            for name, tensor in separate.items():
                assert relative_error(merged[index][name], tensor) <= 1e-6, (ratio, scale, name)
        error, separate_error = _worst_error(merged[index], reference), _worst_error(separate, reference)
        assert error <= separate_error + FLOAT32_RTOL, (ratio, scale, error, separate_error)


# ---------------------------------------------------------------------------
# Cost: one decomposition per layer, one merged model alive at a time
# ---------------------------------------------------------------------------


def test_one_decomposition_per_layer_at_the_largest_rank(monkeypatch):
    models = _models(T=3, d=32, seed=6)
    calls = []
    real = ops.low_rank_factors

    def counting(A, k, *args):
        calls.append((tuple(A.shape), k))
        return real(A, k, *args)

    def forbidden(*args, **kwargs):
        pytest.fail("tune must not sum at a fixed rank")

    monkeypatch.setattr(ops, "low_rank_factors", counting)
    monkeypatch.setattr(ops, "centered_low_rank_sum", forbidden)
    ratios = (0.125, 0.5, 0.25, 1.0)
    lm.tune(models, LinearScore(models), rank_ratios=ratios, scales=SCALES)
    # One call per low-rank matrix with a rank below full at some ratio, at the
    # largest such rank (the 1 x n gate is full rank at every ratio: no call).
    expected = {}
    for name in EXPECTED_DEFAULT_LOW_RANK:
        m, n = models[0][name].shape
        ks = [max(1, math.floor(r * min(m, n))) for r in ratios]
        below = [k for k in ks if k < min(m, n)]
        if below:
            expected[name] = ((3, m, n), max(below))
    assert sorted(calls) == sorted(expected.values())
    assert ((3, 32, 32), 16) in calls


def test_low_rank_sums_are_built_once_up_to_the_largest_rank(monkeypatch):
    """Per layer, the low-rank sums of all ratios together multiply each of the
    K_max factors once: each ratio adds only the ranks above the previous one."""
    import lowrank_merge.cart as cart

    widths = {}
    real = cart.sum_of_reconstructions

    def recording(U, S, Vh):
        widths.setdefault(tuple(U.shape[1:2]) + tuple(Vh.shape[2:]), []).append(S.shape[-1])
        return real(U, S, Vh)

    monkeypatch.setattr(cart, "sum_of_reconstructions", recording)
    models = _models(T=3, d=32, seed=6)
    calls = iter(range(100))
    # Increasing scores: the best point is the last evaluated, so nothing is rebuilt.
    result = lm.tune(models, lambda sd: next(calls), rank_ratios=(0.5, 0.125, 1.0, 0.25), scales=SCALES, svd="exact")
    assert result.best_rank_ratio == 1.0
    # 32 x 32 (out_proj): ranks 4, 8, 16 in ascending order, then full rank (nothing to sum).
    assert widths[(32, 32)] == [4, 4, 8]
    assert widths[(128, 32)] == [4, 4, 8]  # c_fc


def test_one_merged_model_alive_at_a_time():
    models = _models(T=3, d=16)
    previous = []

    def evaluate(state_dict):
        gc.collect()
        assert all(ref() is None for ref in previous), "a previous grid point's model is still alive"
        previous.append(weakref.ref(state_dict["blocks.0.mlp.c_fc.weight"]))
        return 0.0

    lm.tune(models, evaluate, rank_ratios=(0.25, 0.5), scales=(1.0, 2.0, 3.0))
    assert len(previous) == 6


def test_merged_models_are_fresh_and_on_the_output_dtype():
    models = _models(T=3, d=16)
    pointers = {t.untyped_storage().data_ptr() for m in models for t in m.values()}

    def evaluate(state_dict):
        for name, tensor in state_dict.items():
            assert tensor.untyped_storage().data_ptr() not in pointers, name
            if tensor.dtype.is_floating_point:
                assert tensor.dtype == torch.float64, name
        return 0.0

    result = lm.tune(models, evaluate, rank_ratios=(0.25, 1.0), scales=(1.0,), out_dtype=torch.float64)
    assert result.merged["position_ids"].dtype == torch.int64


def test_modules_base_and_single_model():
    models = _models(T=3, d=16, seed=8)
    evaluate = LinearScore(models)
    from_modules = lm.tune([as_module(m) for m in models], evaluate, rank_ratios=(0.25,), scales=(2.0,),
                           base=make_pretrained(16), svd="exact")
    from_dicts = lm.tune(models, evaluate, rank_ratios=(0.25,), scales=(2.0,), svd="exact")
    assert from_modules.best_score == pytest.approx(from_dicts.best_score, rel=1e-6)
    single = lm.tune(models[:1], evaluate, rank_ratios=(0.25,), scales=(2.0,))
    for name, tensor in models[0].items():
        assert torch.equal(single.merged[name], tensor), name


def test_numpy_and_tensor_scores_are_accepted():
    models = _models(T=2, d=16)
    result = lm.tune(models, lambda sd: np.float32(0.5), rank_ratios=(0.25,), scales=(1.0,))
    assert result.best_score == 0.5 and type(result.best_score) is float
    result = lm.tune(models, lambda sd: torch.tensor([2.0]), rank_ratios=(0.25,), scales=(1.0,))
    assert result.best_score == 2.0


def test_default_grid_is_six_by_ten():
    models = _models(T=2, d=16)
    evaluate = LinearScore(models)
    result = lm.tune(models, evaluate)
    assert result.rank_ratios == lm.DEFAULT_TUNE_RANK_RATIOS and len(result.rank_ratios) == 6
    assert result.scales == lm.DEFAULT_TUNE_SCALES and len(result.scales) == 10
    assert evaluate.calls == 60


# ---------------------------------------------------------------------------
# Bad input: rejected before any decomposition, evaluate never called
# ---------------------------------------------------------------------------


def _never_called(state_dict):
    pytest.fail("evaluate was called before the input was rejected")


BAD_GRIDS = [
    (dict(rank_ratios=()), ValueError, r"rank_ratios is empty"),
    (dict(scales=[]), ValueError, r"scales is empty"),
    (dict(rank_ratios=(0.1, 0.0)), ValueError, r"rank_ratios\[1\]: rank_ratio must be in \(0, 1\], got 0\.0"),
    (dict(rank_ratios=(1.5,)), ValueError, r"rank_ratios\[0\]: rank_ratio must be in \(0, 1\], got 1\.5"),
    (dict(rank_ratios=(-0.1,)), ValueError, r"rank_ratio must be in \(0, 1\]"),
    (dict(rank_ratios=(float("nan"),)), ValueError, r"rank_ratio must be in \(0, 1\]"),
    (dict(rank_ratios=("0.1",)), TypeError, r"rank_ratios\[0\]: rank_ratio must be a number"),
    (dict(rank_ratios=0.1), TypeError, r"rank_ratios must be a sequence of numbers"),
    (dict(rank_ratios="0.1"), TypeError, r"rank_ratios must be a sequence of numbers"),
    (dict(scales=(1.0, float("nan"))), ValueError, r"scales\[1\]: scale must be a finite number, got nan"),
    (dict(scales=(float("inf"),)), ValueError, r"scales\[0\]: scale must be a finite number"),
    (dict(scales=(True,)), ValueError, r"scale must be a finite number"),
    (dict(scales=2.0), TypeError, r"scales must be a sequence of numbers"),
    (dict(rank_ratios=(0.1, 0.2, 0.1)), ValueError, r"rank_ratios has repeated values \[0\.1\]"),
    (dict(scales=(1, 1.0)), ValueError, r"scales has repeated values \[1\.0\]"),
    (dict(svd="fast"), ValueError, r"unknown svd engine 'fast'"),
    (dict(niter=-1), ValueError, r"niter must be >= 0"),
    (dict(compute_dtype=torch.float16), ValueError, r"compute_dtype must be torch.float32 or torch.float64"),
    (dict(higher_is_better="yes"), TypeError, r"higher_is_better must be True or False"),
    (dict(include="("), ValueError, r"include pattern"),
]


@pytest.mark.usefixtures("forbid_decomposition")
@pytest.mark.parametrize("kwargs, error, match", BAD_GRIDS, ids=[str(case[0]) for case in BAD_GRIDS])
def test_bad_grid_and_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        lm.tune(_models(T=3, d=16), _never_called, **kwargs)


@pytest.mark.usefixtures("forbid_decomposition")
@pytest.mark.parametrize("evaluate", [None, "accuracy", 3.0, {"a": 1}], ids=["None", "str", "float", "dict"])
def test_evaluate_must_be_callable(evaluate):
    with pytest.raises(TypeError, match=r"evaluate must be a callable evaluate\(state_dict\) -> float"):
        lm.tune(_models(T=3, d=16), evaluate)


@pytest.mark.usefixtures("forbid_decomposition")
def test_bad_models_are_rejected_before_decomposing():
    models = _models(T=3, d=16)
    # Put the bad tensor last, after every low-rank layer (as in test_bad_input.py).
    models = [{**{n: t for n, t in m.items() if n != "head.weight"}, "head.weight": m["head.weight"]} for m in models]
    models[2]["head.weight"] = models[2]["head.weight"].clone()
    models[2]["head.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"tensor 'head.weight' of model 2 contains NaN values"):
        lm.tune(models, _never_called)
    models[2]["head.weight"] = torch.zeros(6, 16)
    with pytest.raises(ValueError, match=r"tensor 'head.weight' has shape \[6, 16\] in model 2"):
        lm.tune(models, _never_called)
    with pytest.raises(ValueError, match="no models to merge"):
        lm.tune([], _never_called)
    with pytest.raises(ValueError, match="'head.weight'"):
        lm.tune(models[:2], _never_called, base=models[2])


@pytest.mark.parametrize(
    "value, error, match",
    [
        (float("nan"), ValueError, r"evaluate returned nan at rank_ratio=0\.25, scale=2\.0; the score must be finite"),
        (float("-inf"), ValueError, r"evaluate returned -inf at rank_ratio=0\.25, scale=2\.0"),
        (10**400, ValueError, r"evaluate returned 1000.* at rank_ratio=0\.25, scale=2\.0; the score must be finite"),
        (torch.tensor(float("nan")), ValueError, r"at rank_ratio=0\.25, scale=2\.0; the score must be finite"),
        ("0.9", TypeError, r"evaluate returned '0\.9' at rank_ratio=0\.25, scale=2\.0; it must return a real number"),
        (None, TypeError, r"evaluate returned None at rank_ratio=0\.25, scale=2\.0"),
        (True, TypeError, r"not a bool"),
        (1 + 2j, TypeError, r"not a complex"),
        (torch.ones(2), TypeError, r"not a Tensor"),
    ],
    ids=["nan", "-inf", "int beyond float", "nan tensor", "str", "None", "bool", "complex", "2-element tensor"],
)
def test_bad_score_names_the_grid_point(value, error, match):
    calls = []

    def evaluate(state_dict):
        calls.append(1)
        return value

    with pytest.raises(error, match=match):
        lm.tune(_models(T=3, d=16), evaluate, rank_ratios=(0.25, 0.5), scales=(2.0, 1.0))
    assert len(calls) == 1  # stopped at the first point


def test_bad_score_after_good_ones_names_its_point():
    scores = iter([1.0, 2.0, 3.0, float("nan")])
    with pytest.raises(ValueError, match=r"at rank_ratio=0\.5, scale=1\.0"):
        lm.tune(_models(T=3, d=16), lambda sd: next(scores), rank_ratios=(0.25, 0.5), scales=(2.0, 1.0))
