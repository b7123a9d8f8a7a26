"""Property tests (hypothesis) over shapes m, n in 1..40, T in 1..5 and ranks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import lowrank_merge as lm

from conftest import input_dtypes, reference_cart, reference_layer, reference_rank, relative_error

# float32 against the float64 reference, relative to each tensor's norm: see FLOAT32_RTOL in
# test_reference.py for the derivation (the worst case measured over 3000 random examples of
# this file was 2.5e-6).
FLOAT32_RTOL = 1e-5
# The low-rank sum Σ_t SVD_k(τ̄_t) of an engine against the reference's, in units of
# eps_32 Σ_t ‖τ̄_t‖ (1 + σ_1/(σ_k − σ_{k+1})), the first-order error bound of any float32
# truncated SVD (see _low_rank_sum_error). Over 3000 random cases the worst was 22 units for
# "exact", "randomized" (spanning sketch) and "gram" alike; 200 leaves a ~9x margin, while a
# sketch that misses part of the range is off by ~1e5 units or more.
LOW_RANK_SUM_UNITS = 200

PROPERTY_SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)

dims = st.integers(1, 40)
tasks = st.integers(1, 5)
seeds = st.integers(0, 2**31 - 1)
rank_ratios = st.one_of(st.sampled_from([0.01, 0.08, 0.1, 0.25, 0.5, 0.99, 1.0]), st.floats(0.001, 1.0))


@st.composite
def rank_settings(draw):
    """Either {"rank_ratio": r} or {"rank": k} (k may exceed min(m, n))."""
    if draw(st.booleans()):
        return {"rank_ratio": draw(rank_ratios)}
    return {"rank": draw(st.integers(1, 45))}


def _models(T, m, n, seed, dtype=torch.float32):
    """T models: one selected m x n matrix, a bias, a norm, an int buffer."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    b = 0.02 * torch.randn(m, generator=g, dtype=torch.float64)
    ln = 1 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    ids = torch.arange(3)
    models = []
    for _ in range(T):
        task_delta = 1e-2 / math.sqrt(n) * torch.randn(m, n, generator=g, dtype=torch.float64)
        models.append(
            {
                "blocks.0.attn.proj.weight": (w + task_delta).to(dtype),
                "blocks.0.attn.proj.bias": (b + 1e-3 * torch.randn(m, generator=g, dtype=torch.float64)).to(dtype),
                "blocks.0.ln_1.weight": (ln + 1e-3 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype),
                "position_ids": ids.clone(),
            }
        )
    return models


def _stack(T, m, n, seed):
    return torch.stack([m_["blocks.0.attn.proj.weight"] for m_ in _models(T, m, n, seed)])


def _k(m, n, ranks):
    return reference_rank(m, n, ranks.get("rank_ratio", 0.08), ranks.get("rank"))


@PROPERTY_SETTINGS
@given(
    T=tasks,
    m=dims,
    n=dims,
    seed=seeds,
    ranks=rank_settings(),
    scale=st.floats(-3, 3),
    out_dtype=st.sampled_from([None, torch.float64, torch.bfloat16]),
)
def test_exact_merge_matches_reference(T, m, n, seed, ranks, scale, out_dtype):
    models = _models(T, m, n, seed)
    result = lm.cart_merge(models, svd="exact", scale=scale, out_dtype=out_dtype, **ranks)
    reference = reference_cart(models, scale=scale, **ranks)
    assert list(result) == list(models[0])
    dtypes = input_dtypes(models[0], out_dtype)
    for name, expected in reference.items():
        got = result[name]
        assert got.shape == expected.shape and got.dtype == dtypes[name], name
        if not expected.dtype.is_floating_point:
            assert torch.equal(got, expected)
            continue
        rtol = 2.0**-8 if out_dtype == torch.bfloat16 else FLOAT32_RTOL
        assert relative_error(got, expected) <= rtol, (name, relative_error(got, expected))


@PROPERTY_SETTINGS
@given(T=tasks, m=dims, n=dims, seed=seeds, svd=st.sampled_from(["exact", "randomized", "krylov", "gram", "gram_subspace", "auto"]))
def test_full_rank_ratio_gives_the_average(T, m, n, seed, svd):
    models = _models(T, m, n, seed)
    result = lm.cart_merge(models, svd=svd, rank_ratio=1.0)
    average = reference_cart(models, scale=0.0)
    for name, expected in average.items():
        if expected.dtype.is_floating_point:
            assert result[name].dtype == torch.float32
            assert relative_error(result[name], expected) <= 1e-6, name  # ~8 eps: the averaging only
        else:
            assert torch.equal(result[name], expected)


def _low_rank_sum_error(T, m, n, seed, k, **kwargs):
    """‖δ − δ_ref‖_F / bound for the low-rank sum δ of ``cart_layer_parts``.

    bound = eps_32 Σ_t ‖τ̄_t‖_F (1 + σ_1(τ̄_t) / (σ_k(τ̄_t) − σ_{k+1}(τ̄_t))): a backward-stable
    float32 rank-k truncation is off by ~eps ‖τ̄‖ times the condition number of its top-k
    subspace, ‖τ̄‖₂ / gap (Wedin). The result is a multiple of the float32 rounding unit.
    """
    stack = _stack(T, m, n, seed)
    average, delta = lm.cart_layer_parts(stack, k, **kwargs)
    assert average.shape == delta.shape == (m, n) and average.dtype == delta.dtype == torch.float32
    X = stack.double()
    centered = X - X.mean(0)
    expected = reference_layer(list(X), k, 1.0) - X.mean(0)
    bound = 0.0
    for tau in centered:
        s = torch.linalg.svdvals(tau)
        gap = (s[k - 1] - s[k]).item()
        bound += tau.norm().item() * (1 + s[0].item() / max(gap, 1e-300))
    return (delta.double() - expected).norm().item() / (torch.finfo(torch.float32).eps * bound)


@st.composite
def layer_cases(draw):
    """(T, m, n, seed, k, oversample) with k + oversample >= min(m, n) (the sketch spans all
    of A's range) and 1 <= k < min(m, n) (at full rank the delta is skipped by identity)."""
    T = draw(st.integers(2, 5))
    m, n = draw(dims), draw(dims)
    r = min(m, n)
    if r < 2:
        m, n = max(m, 2), max(n, 2)
        r = min(m, n)
    k = draw(st.integers(1, r - 1))
    oversample = draw(st.integers(max(0, r - k), r - k + 10))
    return T, m, n, draw(seeds), k, oversample


@PROPERTY_SETTINGS
@given(case=layer_cases(), svd=st.sampled_from(["randomized", "gram_subspace", "auto"]), niter=st.integers(0, 3))
def test_randomized_is_exact_when_the_sketch_spans(case, svd, niter):
    T, m, n, seed, k, oversample = case
    assert _low_rank_sum_error(T, m, n, seed, k, svd=svd, oversample=oversample, niter=niter) <= LOW_RANK_SUM_UNITS


@PROPERTY_SETTINGS
@given(case=layer_cases())
def test_gram_is_close_for_every_rank(case):
    T, m, n, seed, k, _ = case
    assert _low_rank_sum_error(T, m, n, seed, k, svd="gram") <= LOW_RANK_SUM_UNITS


@PROPERTY_SETTINGS
@example(case=(3, 30, 20, 1, 2, 18))  # 2 + 18 >= 20; krylov's 3 blocks of width 2 span only 6
@given(case=layer_cases())
def test_krylov_is_exact_when_the_sketch_spans(case):
    T, m, n, seed, k, oversample = case
    assert _low_rank_sum_error(T, m, n, seed, k, svd="krylov", oversample=oversample) <= LOW_RANK_SUM_UNITS


@PROPERTY_SETTINGS
@given(
    batch=st.lists(st.integers(1, 3), max_size=2),
    m=dims,
    n=dims,
    k=st.integers(1, 45),
    seed=seeds,
    dtype=st.sampled_from([torch.float32, torch.float64]),
    svd=st.sampled_from(["exact", "randomized", "krylov", "gram", "gram_subspace", "auto"]),
)
def test_factor_shapes_and_structure(batch, m, n, k, seed, dtype, svd):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*batch, m, n, generator=g, dtype=torch.float64).to(dtype)
    U, S, Vh = lm.low_rank_approx(A, k, svd=svd, seed=seed)
    r = min(k, m, n)
    assert U.shape == (*batch, m, r) and S.shape == (*batch, r) and Vh.shape == (*batch, r, n)
    assert U.dtype == S.dtype == Vh.dtype == dtype
    assert bool((S[..., :-1] >= S[..., 1:]).all()) and bool((S >= 0).all())
    # No approximation has more energy than A, and the top singular value is at most σ_1(A).
    sigma = torch.linalg.svdvals(A.double())
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert bool((S[..., 0].double() <= sigma[..., 0] * (1 + tol) + tol).all())
    eye = torch.eye(r, dtype=torch.float64)
    UtU = U.double().mT @ U.double()
    # Orthonormal columns wherever the corresponding singular value is not negligible.
    keep = (S.double() > tol * sigma[..., :1]).double()
    mask = keep.unsqueeze(-1) * keep.unsqueeze(-2)
    assert torch.allclose(UtU * mask, eye * mask, atol=100 * tol)
