"""Identities CART satisfies whatever the data: full rank and λ = 0 give the
average, T = 2 gives the average, shift equivariance, permutation invariance,
the base cancels, T = 1 copies, decompose-then-merge equals merge, seeds."""

from __future__ import annotations

import pytest
import torch

import lowrank_merge as lm
from lowrank_merge import engines

from conftest import EXPECTED_DEFAULT_LOW_RANK, make_models, make_pretrained, reference_cart, relative_error

ALL_ENGINES = ["exact", "randomized", "krylov", "gram", "gram_subspace", "auto"]
SKETCH_ENGINES = ["randomized", "krylov", "gram_subspace", "auto"]
# float32 results of two computations that are equal in exact arithmetic but
# round differently (other summation order, other inputs' rounding): a few
# float32 ulps of the average, plus the low-rank part's float32 error
# (see FLOAT32_RTOL in test_reference.py). Relative to each tensor's norm.
ROUNDING_RTOL = 1e-5


def _average(models):
    return reference_cart(models, scale=0.0)  # float64 average of every floating tensor


def _assert_is_average(result, models, rtol=ROUNDING_RTOL):
    average = _average(models)
    for name, expected in average.items():
        assert result[name].dtype == models[0][name].dtype
        if expected.dtype.is_floating_point:
            assert relative_error(result[name], expected) <= rtol, name
        else:
            assert torch.equal(result[name], expected), name


@pytest.mark.parametrize("svd", ALL_ENGINES)
def test_full_rank_and_zero_scale_give_the_average(svd):
    models = make_models(4, 16, seed=0)
    # Full rank: Σ_t τ̄_t = 0. Averaging costs ~1 float32 rounding: 1e-6 is ~8 eps.
    full = lm.cart_merge(models, rank_ratio=1.0, svd=svd)
    _assert_is_average(full, models, rtol=1e-6)
    zero = lm.cart_merge(models, rank_ratio=0.25, scale=0.0, svd=svd)
    _assert_is_average(zero, models, rtol=1e-6)
    # ... while a nonzero λ at rank 4 < 16 is not the average.
    nonzero = lm.cart_merge(models, rank_ratio=0.25, scale=2.0, svd=svd)
    average = _average(models)
    for name in EXPECTED_DEFAULT_LOW_RANK - {"blocks.0.attn.gate.weight"}:
        assert relative_error(nonzero[name], average[name]) > 1e-4, name


def _on_grid(models):
    """Round every floating value to a multiple of 2^-20: then θ_1 + θ_2 and their half are
    exact in float32, so the centered vectors are exactly opposite, τ̄_2 = −τ̄_1."""
    return [
        {n: (torch.round(t * 2.0**20) / 2.0**20 if t.dtype.is_floating_point else t) for n, t in m.items()}
        for m in models
    ]


# d = 32, k = floor(0.1 · 32) = 3: the sketch (3 + 10 columns, or 3 Krylov blocks of 3) does
# not span the 32 columns, so the randomized engines really are approximate here.
T2_D, T2_RATIO = 32, 0.1
# ‖Σ_t SVD_k(τ̄_t)‖ / ‖τ̄_1‖ for exactly opposite τ̄: exact and gram leave ~4e-8, the sketch
# engines ~3e-6 at most (their QR is odd-symmetric only up to rounding). A sketch that is
# not shared by the tasks leaves >= 1.6e-4 on this data (test_non_shared_sketch_is_detected).
T2_DELTA_RTOL = 2e-5


def _t2_layers(models):
    for name in sorted(EXPECTED_DEFAULT_LOW_RANK):
        stack = torch.stack([m[name] for m in models])
        k = max(1, int(T2_RATIO * min(stack.shape[1:])))
        if k < min(stack.shape[1:]):
            yield name, stack, k


@pytest.mark.parametrize("svd", ALL_ENGINES)
def test_two_models_give_the_average(svd):
    """τ̄_2 = −τ̄_1, so SVD_k(τ̄_1) + SVD_k(τ̄_2) = 0 for an odd-symmetric engine."""
    models = _on_grid(make_models(2, T2_D, seed=1))
    result = lm.cart_merge(models, rank_ratio=T2_RATIO, scale=2.0, svd=svd)
    # The average is exact on the grid and the low-rank sum lies below float32 resolution:
    # 1e-6 is ~8 eps_32 (a non-shared sketch gives >= 4e-6 here).
    _assert_is_average(result, models, rtol=1e-6)
    # Sharper, on the low-rank sum itself.
    checked = 0
    for name, stack, k in _t2_layers(models):
        average, delta = lm.cart_layer_parts(stack, k, svd=svd)
        tau = stack[0] - average
        assert torch.equal(tau, average - stack[1])  # exactly opposite
        assert delta.norm() <= T2_DELTA_RTOL * tau.norm(), name
        checked += 1
    assert checked == 6


def test_non_shared_sketch_is_detected():
    """The T = 2 check above can fail: one sketch per task breaks the cancellation."""
    models = _on_grid(make_models(2, T2_D, seed=1))
    worst = 0.0
    for name, stack, k in _t2_layers(models):
        centered = stack - stack.mean(0)
        m, n = stack.shape[1:]
        width = engines.sketch_width(k, 10, m, n)
        reconstructions = []
        for t, seed in enumerate((0, 1)):  # a different sketch for each task
            omega = engines.gaussian_sketch(n, width, seed, torch.float32, "cpu")
            U, S, Vh = engines.randomized_svd(centered[t], k, omega, 2)
            reconstructions.append((U * S) @ Vh)
        leftover = (reconstructions[0] + reconstructions[1]).norm() / centered[0].norm()
        worst = max(worst, float(leftover))
    assert worst > 5 * T2_DELTA_RTOL


@pytest.mark.parametrize("svd", ["exact", "randomized", "krylov", "gram"])
def test_shift_equivariance(svd):
    """CART(θ_t + c) = CART(θ_t) + c: the centered task vectors do not change."""
    models = make_models(3, 24, seed=2)
    g = torch.Generator().manual_seed(5)
    shift = {n: torch.randn(t.shape, generator=g) for n, t in models[0].items() if t.dtype.is_floating_point}
    shifted = [{n: (t + shift[n] if n in shift else t) for n, t in m.items()} for m in models]
    a = lm.cart_merge(models, rank_ratio=0.25, svd=svd)
    b = lm.cart_merge(shifted, rank_ratio=0.25, svd=svd)
    for name in a:
        if name in shift:
            expected = a[name].double() + shift[name].double()
            assert relative_error(b[name], expected) <= ROUNDING_RTOL, name
        else:
            assert torch.equal(a[name], b[name])
    # The check is sharp: not shifting, or shifting by a different tensor, is detected.
    for name in EXPECTED_DEFAULT_LOW_RANK:
        assert relative_error(b[name], a[name].double() + 1.01 * shift[name].double()) > 10 * ROUNDING_RTOL


@pytest.mark.parametrize("svd", ALL_ENGINES)
def test_permuting_models_changes_nothing(svd):
    models = make_models(4, 16, seed=3)
    a = lm.cart_merge(models, rank_ratio=0.25, svd=svd)
    b = lm.cart_merge([models[i] for i in (2, 0, 3, 1)], rank_ratio=0.25, svd=svd)
    for name in a:
        if a[name].dtype.is_floating_point:
            assert relative_error(b[name], a[name]) <= ROUNDING_RTOL, name
        else:
            assert torch.equal(a[name], b[name])


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_base_changes_nothing(svd):
    models = make_models(3, 16, seed=4)
    without = lm.cart_merge(models, rank_ratio=0.25, svd=svd)
    for base in (make_pretrained(16, seed=99), models[1], make_pretrained(16, seed=5, dtype=torch.bfloat16)):
        with_base = lm.cart_merge(models, rank_ratio=0.25, svd=svd, base=base)
        assert list(with_base) == list(without)
        for name in without:
            assert torch.equal(with_base[name], without[name]), name
        decomposed = lm.cart_decompose(models, rank_ratio=0.25, svd=svd, base=base).merged(2.0)
        for name in without:
            assert torch.equal(decomposed[name], without[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_single_model_is_copied(dtype, svd):
    (model,) = make_models(1, 16, seed=5, dtype=dtype)
    result = lm.cart_merge([model], rank_ratio=0.25, svd=svd)
    assert list(result) == list(model)
    for name, tensor in model.items():
        assert result[name].dtype == tensor.dtype
        assert torch.equal(result[name], tensor), name
        assert result[name] is not tensor
        assert result[name].untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr(), name
    # Writing to the result does not touch the model.
    before = {n: t.clone() for n, t in model.items()}
    for tensor in result.values():
        tensor.zero_()
    for name in model:
        assert torch.equal(model[name], before[name])


def test_merged_outputs_never_alias_inputs():
    models = make_models(3, 16, seed=6)
    pointers = {t.untyped_storage().data_ptr() for m in models for t in m.values()}
    for result in (lm.cart_merge(models, rank_ratio=1.0), lm.cart_merge(models, scale=0.0)):
        for name, tensor in result.items():
            assert tensor.untyped_storage().data_ptr() not in pointers, name


@pytest.mark.parametrize("svd", ["exact", "randomized", "krylov"])
def test_decompose_then_merge_equals_merge(svd):
    models = make_models(3, 16, seed=7)
    decomposed = lm.cart_decompose(models, rank_ratio=0.25, svd=svd, seed=3)
    for scale in (0.0, 0.5, 1.3, 2.0, -1.0):
        expected = lm.cart_merge(models, rank_ratio=0.25, svd=svd, seed=3, scale=scale)
        got = decomposed.merged(scale)
        assert list(got) == list(expected)
        for name in expected:
            assert got[name].dtype == expected[name].dtype
            assert torch.equal(got[name], expected[name]), (scale, name)
    # Each call returns fresh tensors: writing to one result does not change the next.
    first = decomposed.merged(2.0)
    for tensor in first.values():
        tensor.zero_()
    again = decomposed.merged(2.0)
    expected = lm.cart_merge(models, rank_ratio=0.25, svd=svd, seed=3, scale=2.0)
    for name in expected:
        assert torch.equal(again[name], expected[name]), name


def test_decompose_keeps_out_dtype():
    models = make_models(2, 16, seed=8, dtype=torch.bfloat16)
    merged = lm.cart_decompose(models, rank_ratio=0.25, out_dtype=torch.float32).merged(1.5)
    expected = lm.cart_merge(models, rank_ratio=0.25, out_dtype=torch.float32, scale=1.5)
    for name in expected:
        assert merged[name].dtype == expected[name].dtype
        assert torch.equal(merged[name], expected[name])


@pytest.mark.parametrize("svd", SKETCH_ENGINES)
def test_same_seed_is_bitwise_reproducible(svd):
    models = make_models(3, 32, seed=9)
    a = lm.cart_merge(models, rank_ratio=0.1, svd=svd, seed=123)
    b = lm.cart_merge(models, rank_ratio=0.1, svd=svd, seed=123)
    for name in a:
        assert torch.equal(a[name], b[name]), name


# Not gram_subspace nor auto (which picks it at d = 32): their 4 iterations on the
# Gram matrix converge to the dense SVD's subspace here, so the seed rounds away.
@pytest.mark.parametrize("svd", ["randomized", "krylov"])
def test_different_seed_changes_the_sketch_result(svd):
    # d = 32, k = 3: the sketch does not span the matrices, so it shows in the result.
    models = make_models(3, 32, seed=9)
    a = lm.cart_merge(models, rank_ratio=0.1, svd=svd, seed=1)
    b = lm.cart_merge(models, rank_ratio=0.1, svd=svd, seed=2)
    average = _average(models)
    changed = 0
    for name in EXPECTED_DEFAULT_LOW_RANK - {"blocks.0.attn.gate.weight", "blocks.0.attn.rel_proj.weight"}:
        delta_a = a[name].double() - average[name]
        delta_b = b[name].double() - average[name]
        # Clearly above rounding: the two low-rank sums differ by more than 1e-4 of their size.
        changed += relative_error(delta_b, delta_a) > 1e-4
    assert changed >= 4


@pytest.mark.parametrize("svd", ["exact", "gram"])
def test_seed_does_not_matter_without_a_sketch(svd):
    models = make_models(3, 16, seed=10)
    a = lm.cart_merge(models, rank_ratio=0.25, svd=svd, seed=1)
    b = lm.cart_merge(models, rank_ratio=0.25, svd=svd, seed=2)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_result_does_not_depend_on_key_order():
    """A layer's sketch depends on the seed only, not on which layers came before."""
    models = make_models(3, 24, seed=11)
    reordered = [dict(reversed(list(m.items()))) for m in models]
    a = lm.cart_merge(models, rank_ratio=0.1, svd="randomized", seed=4)
    b = lm.cart_merge(reordered, rank_ratio=0.1, svd="randomized", seed=4)
    assert list(b) == list(reordered[0])
    for name in a:
        assert torch.equal(a[name], b[name]), name
