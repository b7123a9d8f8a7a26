"""The top-k SVD engines through the public ``low_rank_approx``: near-optimal
residuals on hard spectra, factor structure, batches, clipping, odd symmetry."""

from __future__ import annotations

import math

import pytest
import torch

import lowrank_merge as lm
from lowrank_merge import _ops as ops

FAST_ENGINES = ["randomized", "krylov", "gram", "gram_subspace", "chebyshev", "auto"]
ALL_ENGINES = ["exact", *FAST_ENGINES]


def _orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q


def _with_spectrum(m: int, n: int, singular_values: torch.Tensor, seed: int) -> torch.Tensor:
    """U diag(σ) Vᵀ in float64 with random orthonormal U [m, r], V [n, r]."""
    g = torch.Generator().manual_seed(seed)
    r = singular_values.numel()
    return (_orthonormal(m, r, g) * singular_values) @ _orthonormal(n, r, g).T


def _reconstruct(U, S, Vh):
    return (U * S.unsqueeze(-2)) @ Vh


# ---------------------------------------------------------------------------
# Near-optimality on a slowly decaying spectrum
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_decay_tall():
    """3072 x 768, σ_i ∝ i^-0.6: no spectral gap anywhere (σ_61 / σ_62 ≈ 1.01)."""
    n = 768
    sigma = torch.arange(1, n + 1, dtype=torch.float64) ** -0.6
    return _with_spectrum(3072, n, sigma, seed=0), sigma


@pytest.fixture(scope="module")
def slow_decay_square():
    n = 768
    sigma = torch.arange(1, n + 1, dtype=torch.float64) ** -0.6
    return _with_spectrum(n, n, sigma, seed=1), sigma


def _optimal_residual(A32: torch.Tensor, k: int) -> float:
    """‖A − A_k‖_F from a dense float64 SVD of the float32 matrix actually decomposed.

    (A = QR with R square; A and R have the same singular values, and the dense
    SVD of the 768 x 768 R is 30x cheaper than that of a 3072 x 768 A.)
    """
    A = A32.to(torch.float64)
    if A.shape[0] < A.shape[1]:
        A = A.T
    S = torch.linalg.svdvals(torch.linalg.qr(A).R)
    return S[k:].norm().item()


@pytest.mark.parametrize("shape", ["768x768", "3072x768", "768x3072"])
@pytest.mark.parametrize("svd", FAST_ENGINES)
def test_residual_within_two_percent_of_optimal(svd, shape, slow_decay_tall, slow_decay_square):
    if shape == "768x768":
        A64, sigma = slow_decay_square
    elif shape == "3072x768":
        A64, sigma = slow_decay_tall
    else:
        A64, sigma = slow_decay_tall[0].T, slow_decay_tall[1]
    A = A64.to(torch.float32).contiguous()
    k = math.floor(0.08 * 768)
    assert k == 61
    optimal = _optimal_residual(A, k)
    # The dense SVD sees the spectrum the matrix was built with.
    assert optimal == pytest.approx(sigma[k:].norm().item(), rel=1e-6)
    U, S, Vh = lm.low_rank_approx(A, k, svd=svd)  # default niter / oversample, float32
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    assert U.shape == (A.shape[0], k) and S.shape == (k,) and Vh.shape == (k, A.shape[1])
    residual = (A.to(torch.float64) - _reconstruct(U, S, Vh).to(torch.float64)).norm().item()
    # The residual, not the factors: with no gap, near-optimal factors need not be close.
    assert residual <= 1.02 * optimal, f"{svd}: residual / optimal = {residual / optimal:.4f}"
    assert residual >= optimal * (1 - 1e-5)  # no rank-k matrix beats the optimum (sanity)


def test_residual_check_is_sharp(slow_decay_square):
    """The 2 % bound above can fail: one subspace iteration without oversampling misses it."""
    A = slow_decay_square[0].to(torch.float32)
    k = 61
    U, S, Vh = lm.low_rank_approx(A, k, svd="randomized", niter=0, oversample=0)
    residual = (A.double() - _reconstruct(U, S, Vh).double()).norm().item()
    assert residual > 1.02 * _optimal_residual(A, k)


# ---------------------------------------------------------------------------
# Factors on a matrix with a clear gap
# ---------------------------------------------------------------------------

TOP = torch.tensor([10.0, 7.0, 5.0, 3.5, 2.0], dtype=torch.float64)


def _gapped(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """Five well-separated singular values, then a tail below 1e-2."""
    r = min(m, n)
    tail = 1e-2 * torch.linspace(1.0, 0.1, r - TOP.numel(), dtype=torch.float64)
    return _with_spectrum(m, n, torch.cat([TOP, tail]), seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(60, 40), (40, 60), (50, 50)])
@pytest.mark.parametrize("svd", ALL_ENGINES)
def test_factors_on_gapped_matrix(svd, shape, dtype):
    m, n = shape
    A64 = _gapped(m, n)
    A = A64.to(dtype)
    k = TOP.numel()
    U, S, Vh = lm.low_rank_approx(A, k, svd=svd)
    assert U.shape == (m, k) and S.shape == (k,) and Vh.shape == (k, n)
    assert U.dtype == S.dtype == Vh.dtype == dtype
    eps = torch.finfo(dtype).eps
    eye = torch.eye(k, dtype=torch.float64)
    assert torch.allclose(U.double().T @ U.double(), eye, atol=100 * eps)
    assert torch.allclose(Vh.double() @ Vh.double().T, eye, atol=100 * eps)
    assert bool((S[:-1] >= S[1:]).all()), S  # descending
    assert bool((S > 0).all())
    # The tail (‖tail‖ ~ 0.05) bounds how far the top singular values can move.
    assert torch.allclose(S.double(), TOP, rtol=0, atol=1e-3), S
    # With gaps, the singular subspaces are determined: compare the projectors.
    U_true, _, Vh_true = torch.linalg.svd(A64, full_matrices=False)
    P, P_true = U.double() @ U.double().T, U_true[:, :k] @ U_true[:, :k].T
    assert (P - P_true).norm() <= 1e-2
    Q, Q_true = Vh.double().T @ Vh.double(), Vh_true[:k].T @ Vh_true[:k]
    assert (Q - Q_true).norm() <= 1e-2


@pytest.mark.parametrize("svd", ALL_ENGINES)
def test_batch_dimensions(svd):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 3, 20, 14, generator=g)
    k = 4
    U, S, Vh = lm.low_rank_approx(A, k, svd=svd, seed=5)
    assert U.shape == (2, 3, 20, k) and S.shape == (2, 3, k) and Vh.shape == (2, 3, k, 14)
    # Each matrix of the batch gets what it would get alone (all share one sketch).
    for i in range(2):
        for j in range(3):
            u, s, vh = lm.low_rank_approx(A[i, j], k, svd=svd, seed=5)
            batched = _reconstruct(U[i, j], S[i, j], Vh[i, j])
            single = _reconstruct(u, s, vh)
            assert (batched - single).norm() <= 1e-5 * single.norm(), (i, j)
            assert torch.allclose(S[i, j], s, rtol=1e-5)


@pytest.mark.parametrize("svd", ALL_ENGINES)
@pytest.mark.parametrize("shape, k", [((5, 3), 10), ((3, 5), 3), ((1, 7), 4), ((7, 1), 2)])
def test_k_is_clipped_to_min_dimension(svd, shape, k):
    g = torch.Generator().manual_seed(1)
    A = torch.randn(*shape, generator=g, dtype=torch.float64)
    U, S, Vh = lm.low_rank_approx(A, k, svd=svd)
    r = min(shape)
    assert U.shape == (shape[0], r) and S.shape == (r,) and Vh.shape == (r, shape[1])
    # Full rank: the factors reproduce A.
    assert torch.allclose(_reconstruct(U, S, Vh), A, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("svd", ALL_ENGINES)
def test_odd_symmetry(svd, dtype):
    """f(−A) = −f(A) for the reconstruction, also for an approximate engine."""
    g = torch.Generator().manual_seed(2)
    A = torch.randn(3, 40, 30, generator=g, dtype=dtype)  # flat spectrum: the sketch matters
    k = 3
    plus = _reconstruct(*lm.low_rank_approx(A, k, svd=svd, seed=7))
    minus = _reconstruct(*lm.low_rank_approx(-A, k, svd=svd, seed=7))
    eps = torch.finfo(dtype).eps
    assert (plus + minus).norm() <= 1e3 * eps * plus.norm()
    # ... which is not trivial: the result is a nonzero rank-k matrix (and, for the sketch
    # engines, a different seed gives another one).
    assert plus.norm() > 0.1 * A.norm() / math.sqrt(10)
    if svd in ("randomized", "krylov", "auto"):
        other = _reconstruct(*lm.low_rank_approx(A, k, svd=svd, seed=8))
        assert (other - plus).norm() > 1e3 * eps * plus.norm()


@pytest.mark.parametrize(
    ("shape", "k", "picked"),
    [((400, 64), 16, "gram_subspace"), ((64, 400), 16, "gram_subspace"), ((2000, 1000), 2, "chebyshev")],
)
def test_auto_runs_the_cheaper_engine_with_the_accurate_settings(shape, k, picked):
    """auto = the engine of lower ``engine_cost``, run with ACCURATE_NITER and
    ``accurate_oversample(k)``, bit for bit."""
    m, n = shape
    settings = lm.cart.MergeSettings.create()
    engine, niter, width = settings.layer_engine(m, n, k)
    assert (engine, niter) == (picked, lm.cart.ACCURATE_NITER[picked])
    assert width == lm.engines.sketch_width(k, lm.cart.accurate_oversample(k), m, n)
    gram, chebyshev = (
        lm.engines.engine_cost(name, m, n, k, lm.cart.ACCURATE_NITER[name], width) for name in ("gram_subspace", "chebyshev")
    )
    assert (picked == "chebyshev") == (chebyshev < gram)
    A = torch.randn(m, n, generator=torch.Generator().manual_seed(3))
    auto = lm.low_rank_approx(A, k, svd="auto", seed=1)
    explicit = lm.low_rank_approx(
        A, k, svd=picked, niter=lm.cart.ACCURATE_NITER[picked], oversample=lm.cart.accurate_oversample(k), seed=1
    )
    for a, b in zip(auto, explicit):
        assert torch.equal(a, b)


def test_explicit_iterations_and_oversampling_override_the_accurate_ones():
    settings = lm.cart.MergeSettings.create(svd="gram_subspace", niter=1, oversample=3)
    assert settings.layer_engine(400, 64, 16) == ("gram_subspace", 1, 24)  # 16 + 3, rounded up to 8s
    assert lm.cart.MergeSettings.create(svd="randomized").layer_engine(400, 64, 16) == ("randomized", 2, 32)


def _power_law_stack(T: int, m: int, n: int, seed: int) -> torch.Tensor:
    """float32 ``θ_t = B + 1e-3 L_t R_t``: centered task vectors with σ_i ∝ 1/i
    (no gap at any k), the benchmarks' model of fine-tuning deltas."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    scales = torch.arange(1, r + 1, dtype=torch.float64) ** -1.0
    base = 0.02 * torch.randn(m, n, generator=g, dtype=torch.float64)
    tasks = [
        base + 1e-3 * ((torch.randn(m, r, generator=g, dtype=torch.float64) * scales) @ torch.randn(r, n, generator=g, dtype=torch.float64))
        / math.sqrt(m * n)
        for _ in range(T)
    ]
    return torch.stack(tasks).to(torch.float32)


def _low_rank_sum_error_vs_float64(stack: torch.Tensor, k: int, svd: str) -> float:
    _, delta = lm.cart_layer_parts(stack, k, svd=svd)
    X = stack.double()
    U, S, Vh = torch.linalg.svd(X - X.mean(0), full_matrices=False)
    reference = ((U[..., :k] * S[..., :k].unsqueeze(-2)) @ Vh[..., :k, :]).sum(0)
    return ((delta.double() - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("shape", [(1536, 384), (384, 1536)])
def test_accurate_engines_match_the_float64_low_rank_sum_without_a_gap(shape):
    """The merged delta of gram_subspace, chebyshev and auto is within 1e-2 of the float64
    dense reference on 1/i spectra at 8 % rank, where the fast default of the
    randomized engine is off by about 10 % (the float32 dense SVD: ~1e-3)."""
    m, n = shape
    stack = _power_law_stack(4, m, n, seed=5)
    k = math.floor(0.08 * min(m, n))
    exact = _low_rank_sum_error_vs_float64(stack, k, "exact")
    assert exact < 3e-3  # float32 rounding, amplified by the missing gap
    assert _low_rank_sum_error_vs_float64(stack, k, "randomized") > 5e-2  # the case is hard
    for svd in ("gram_subspace", "chebyshev", "auto"):
        assert _low_rank_sum_error_vs_float64(stack, k, svd) <= 1e-2, svd


@pytest.mark.parametrize("path", ["extension", "twin"])
@pytest.mark.parametrize("svd", ALL_ENGINES)
def test_scaled_task_vectors_give_the_scaled_delta(svd, path, monkeypatch):
    """delta(2⁵⁰ · stack) = 2⁵⁰ · delta(stack): scaling by a power of two is
    exact, so only a step that overflows or underflows on the way can break it.
    The Chebyshev filter's weight b² did, from task vectors of ~1e9, before it
    was applied as two factors of ~b each."""
    if path == "twin":
        monkeypatch.setattr(ops, "has_kernel", lambda device_type: False)
    elif not ops.has_kernel("cpu"):
        pytest.skip("the C++ extension is not built")
    stack = _power_law_stack(3, 96, 64, seed=3)
    factor = 2.0**50
    _, delta = lm.cart_layer_parts(stack, 8, svd=svd)
    _, scaled = lm.cart_layer_parts(stack * factor, 8, svd=svd)
    assert ((scaled / factor - delta).norm() / delta.norm()).item() <= 1e-5


@pytest.mark.parametrize("path", ["extension", "twin"])
@pytest.mark.parametrize("svd", ALL_ENGINES)
def test_an_empty_batch_gives_empty_factors(svd, path, monkeypatch):
    if path == "twin":
        monkeypatch.setattr(ops, "has_kernel", lambda device_type: False)
    elif not ops.has_kernel("cpu"):
        pytest.skip("the C++ extension is not built")
    U, S, Vh = lm.low_rank_approx(torch.zeros(0, 6, 8), 2, svd=svd)
    assert (U.shape, S.shape, Vh.shape) == ((0, 6, 2), (0, 2), (0, 2, 8))


def test_gram_subspace_is_exact_on_low_rank_task_vectors():
    """LoRA-like task vectors of rank 6 < k + oversample: the Gram matrix is
    singular, so are the iterates (the LU bases keep full rank; on CUDA
    CholeskyQR2 falls back), and the result is the exact truncation."""
    g = torch.Generator().manual_seed(8)
    A = (torch.randn(3, 300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 200, generator=g, dtype=torch.float64))
    for k in (4, 6):
        U, S, Vh = lm.low_rank_approx(A, k, svd="gram_subspace")
        U64, S64, Vh64 = torch.linalg.svd(A, full_matrices=False)
        expected = (U64[..., :k] * S64[..., :k].unsqueeze(-2)) @ Vh64[..., :k, :]
        assert (_reconstruct(U, S, Vh) - expected).norm() <= 1e-10 * expected.norm()
        assert torch.allclose(S, S64[..., :k], rtol=1e-10, atol=0)


@pytest.mark.parametrize("svd", ["randomized", "krylov"])
def test_more_iterations_do_not_hurt(svd):
    """On the flat spectrum of a Gaussian matrix, niter = 4 is at least as good as niter = 0."""
    g = torch.Generator().manual_seed(4)
    A = torch.randn(80, 60, generator=g, dtype=torch.float64)
    k = 5
    optimal = torch.linalg.svdvals(A)[k:].norm()
    residuals = [
        (A - _reconstruct(*lm.low_rank_approx(A, k, svd=svd, niter=niter))).norm() / optimal for niter in (0, 4)
    ]
    assert residuals[1] <= residuals[0]
    assert residuals[1] <= 1.05


@pytest.mark.parametrize(
    ("k", "oversample", "m", "n", "width"),
    [(16, 10, 400, 64, 32), (16, 0, 400, 64, 16), (20, 10, 28, 50, 28), (1, 0, 5, 5, 5), (327, 163, 4096, 14336, 496)],
)
def test_sketch_width_is_rounded_up_to_eights_within_the_matrix(k, oversample, m, n, width):
    assert lm.engines.sketch_width(k, oversample, m, n) == width


@pytest.mark.parametrize("columns, blocks", [(255, 1), (256, 1), (257, 2), (700, 4), (1100, 8)])
def test_gram_matrix_is_the_exactly_symmetric_product(columns, blocks):
    """Recursive lower triangle plus mirrored copies equals ``XᵀX`` (float64
    product) for one block, two, and column counts that halve unevenly."""
    g = torch.Generator().manual_seed(columns)
    X = torch.randn(2, 90, columns, generator=g)
    assert lm.engines.gram_blocks(columns) == blocks
    gram = lm.engines.gram_matrix(X)
    expected = X.double().mT @ X.double()
    assert gram.shape == (2, columns, columns) and gram.dtype == torch.float32
    assert (gram.double() - expected).norm() <= 1e-6 * expected.norm()
    if blocks > 1:
        assert torch.equal(gram, gram.mT)


def _projector(Y: torch.Tensor) -> torch.Tensor:
    Q = torch.linalg.qr(Y.double()).Q
    return Q @ Q.mT


def test_iteration_basis_spans_the_columns_with_bounded_entries():
    """``P L`` of ``Y = P L U`` spans what ``Y`` spans (projectors equal to
    rounding), on a batch of two leading dimensions and on one matrix; its
    entries are at most 1 in magnitude, and its rows are ``L``'s, permuted."""
    g = torch.Generator().manual_seed(11)
    Y = torch.randn(2, 3, 50, 12, generator=g, dtype=torch.float64)
    for Yi in (Y, Y[1, 2]):
        basis = lm.engines._iteration_basis(Yi)
        assert basis.shape == Yi.shape
        assert (_projector(basis) - _projector(Yi)).abs().max() <= 1e-12
        assert basis.abs().max() <= 1.0
        assert torch.equal((basis == 1).sum(dim=-2), torch.ones(Yi.shape[:-2] + (12,), dtype=torch.int64))


@pytest.mark.parametrize("rank", [0, 4])
def test_iteration_basis_keeps_full_rank_where_the_iterate_has_not(rank):
    """A rank-deficient or zero iterate (task vectors of low rank, a task equal
    to the average): the basis stays finite and of full column rank, and
    contains the iterate's columns."""
    g = torch.Generator().manual_seed(rank)
    Y = torch.randn(50, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, 12, generator=g, dtype=torch.float64)
    basis = lm.engines._iteration_basis(Y)
    assert torch.isfinite(basis).all()
    assert torch.linalg.matrix_rank(basis) == 12
    assert (Y - _projector(basis) @ Y).norm() <= 1e-12 * max(1.0, Y.norm().item())


def test_iteration_basis_of_a_wide_iterate_is_orthonormal_and_square():
    Y = torch.randn(6, 9, dtype=torch.float64)
    basis = lm.engines._iteration_basis(Y)
    assert basis.shape == (6, 6)
    assert torch.allclose(basis.mT @ basis, torch.eye(6, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tasks", [2, 3, 8, 20])
def test_task_average_has_the_bits_of_torch_mean(dtype, tasks):
    """The sum-then-divide average is torch's mean over the task axis bit for
    bit, on values spread over six decades (so a different summation order or
    accumulator would show), in the twin and in the C++ op."""
    g = torch.Generator().manual_seed(tasks)
    scales = torch.logspace(-3, 3, tasks, dtype=dtype).view(tasks, 1, 1)
    stack = torch.randn(tasks, 33, 257, generator=g, dtype=dtype) * scales
    assert torch.equal(lm.engines.task_average(stack), stack.mean(dim=0))
    if lm.extension_available():
        average, _ = torch.ops.lowrank_merge.centered_low_rank_sum(stack, 1, "exact", 0, None)
        assert torch.equal(average, stack.mean(dim=0))


def test_iteration_factor_reproduces_the_iterate():
    """``Y = B R`` for the LU basis ``B`` and its upper triangular factor ``R``."""
    g = torch.Generator().manual_seed(12)
    Y = torch.randn(2, 50, 12, generator=g, dtype=torch.float64)
    basis, factor = lm.engines._iteration_basis_and_factor(Y)
    assert torch.equal(basis, lm.engines._iteration_basis(Y))
    assert factor.shape == (2, 12, 12) and torch.equal(factor, factor.triu())
    assert (basis @ factor - Y).norm() <= 1e-13 * Y.norm()


# ---------------------------------------------------------------------------
# The Chebyshev filter of gram_subspace
# ---------------------------------------------------------------------------


def _gram_with_eigenvalues(eigenvalues: torch.Tensor, seed: int) -> torch.Tensor:
    """``Q diag(λ) Qᵀ`` ``[s, s]`` in float64 for a random orthonormal ``Q``."""
    Q = _orthonormal(eigenvalues.numel(), eigenvalues.numel(), torch.Generator().manual_seed(seed))
    return (Q * eigenvalues) @ Q.T


def test_chebyshev_cut_is_the_ritz_value_below_the_top_k():
    """The cut is the ((k + l) // 2 + 1)-th largest Ritz value of G on the span
    of the (not orthonormal) LU basis: equal to the eigenvalue of QᵀGQ for an
    orthonormal Q of that span, hence (interlacing) between 0 and the
    eigenvalue of that index, below λ_k. One cut per matrix of a batch."""
    s, l, k = 120, 24, 10
    spectra = [1.0 / torch.arange(1, s + 1, dtype=torch.float64) ** 2, torch.logspace(0, -4, s, dtype=torch.float64)]
    G = torch.stack([_gram_with_eigenvalues(eigenvalues, seed) for seed, eigenvalues in enumerate(spectra)])
    X = G @ torch.randn(s, l, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    basis = lm.engines._iteration_basis(X)
    cut = lm.engines.chebyshev_cut(basis, G @ basis, k)
    assert cut.shape == (2, 1, 1) and cut.dtype == torch.float64
    Q = torch.linalg.qr(X).Q
    ritz = torch.linalg.eigvalsh(Q.mT @ G @ Q).flip(-1)  # descending
    index = (k + l) // 2
    for matrix, eigenvalues in enumerate(spectra):
        assert abs(cut[matrix].item() - ritz[matrix, index].item()) <= 1e-10 * eigenvalues[0].item()
        assert 0 < cut[matrix].item() <= eigenvalues[index].item() < eigenvalues[k - 1].item()


def test_chebyshev_cut_is_zero_where_the_basis_is_rank_deficient():
    """A basis with a zero column makes ``BᵀB`` singular: the cut falls back to
    0 (plain subspace iteration) for that matrix only."""
    G = _gram_with_eigenvalues(1.0 / torch.arange(1, 41, dtype=torch.float64), seed=3).expand(2, 40, 40)
    basis = torch.randn(2, 40, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    basis[1, :, 2] = 0
    cut = lm.engines.chebyshev_cut(basis, G @ basis, 2)
    assert cut[0].item() > 0 and cut[1].item() == 0


@pytest.mark.parametrize("niter", [1, 2, 3])
def test_chebyshev_filter_spans_the_polynomial_of_the_gram_matrix(niter):
    """The re-based, scaled recurrence spans ``T_j(2G/b − 1) X`` (reference: the
    plain three-term recurrence on the start block in float64, without bases)."""
    s, l, k = 60, 8, 3
    G = _gram_with_eigenvalues(torch.logspace(0, -2, s, dtype=torch.float64), seed=9)
    X = G @ torch.randn(s, l, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    filtered = lm.engines.chebyshev_filtered_iterate(lambda B: G @ B, X, k, niter)
    basis = lm.engines._iteration_basis(X)
    b = lm.engines.chebyshev_cut(basis, G @ basis, k).item()
    previous, current = X, (2 / b) * (G @ X) - X
    for _ in range(niter - 1):
        previous, current = current, (4 / b) * (G @ current) - 2 * current - previous
    assert filtered.shape == (s, l)
    assert (_projector(filtered) - _projector(current)).abs().max() <= 1e-9


def test_chebyshev_filter_converges_faster_than_subspace_iteration():
    """At equal products with G, gram_subspace's rank-k truncation is at least 4x
    closer to the exact one than plain subspace iteration's (a float64 reference
    written here: QR bases, the same start and Rayleigh–Ritz) on a 1/i spectrum,
    and with 3 iterations closer than plain iteration with 5 (measured: 3.1e-4
    against 3.1e-3 and 4.0e-4)."""
    m, n, k = 600, 200, 16
    A = _with_spectrum(m, n, 1.0 / torch.arange(1, n + 1, dtype=torch.float64), seed=13)
    omega = lm.engines.gaussian_sketch(n, lm.engines.sketch_width(k, k // 2, m, n), 0, torch.float64, "cpu")
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    exact = _reconstruct(U[:, :k], S[:k], Vh[:k])
    G = A.T @ A

    def plain_error(niter: int) -> float:
        X = G @ omega
        for _ in range(niter):
            X = G @ torch.linalg.qr(X).Q
        Q = torch.linalg.qr(X).Q
        top = Q @ torch.linalg.eigh(Q.T @ G @ Q).eigenvectors[:, -k:]
        return ((A @ top @ top.T - exact).norm() / exact.norm()).item()

    filtered = _reconstruct(*lm.engines.gram_subspace_svd(A, k, omega, 3))
    filtered_error = ((filtered - exact).norm() / exact.norm()).item()
    assert filtered_error <= 0.25 * plain_error(3)
    assert filtered_error <= plain_error(5)


def test_chebyshev_engine_is_the_filter_on_the_explicit_gram_matrix():
    """``chebyshev`` equals the filter applied to the explicit ``A Aᵀ`` from
    ``A Ω``, then the projection's small SVD (float64, to rounding)."""
    g = torch.Generator().manual_seed(15)
    A = torch.randn(2, 90, 70, generator=g, dtype=torch.float64) * (1.0 / torch.arange(1, 71, dtype=torch.float64))
    k = 6
    omega = lm.engines.gaussian_sketch(70, lm.engines.sketch_width(k, 10, 90, 70), 0, torch.float64, "cpu")
    G = A @ A.mT
    X = lm.engines.chebyshev_filtered_iterate(lambda B: G @ B, A @ omega, k, 4)
    explicit = lm.engines._truncated_svd_of_projection(torch.linalg.qr(X).Q, A, k)
    implicit = lm.engines.chebyshev_svd(A, k, omega, 4)
    assert (_reconstruct(*implicit) - _reconstruct(*explicit)).norm() <= 1e-10 * A.norm()


def test_row_interchanges_out_of_range_raise():
    """An interchange outside [1, m] (torch 2.13's batched CPU LU returned some):
    a clear error (the C++ op raised nothing and wrote out of bounds)."""
    assert lm.engines._rows_of_interchanges(torch.tensor([[2, 2, 3]], dtype=torch.int32), 3).tolist() == [[1, 0, 2]]
    with pytest.raises(RuntimeError, match=r"interchange 0 outside \[1, 3\]: a fault of the LAPACK call"):
        lm.engines._rows_of_interchanges(torch.tensor([[0, 2]], dtype=torch.int32), 3)


def test_iteration_basis_of_a_batch_where_torchs_batched_lu_fails():
    """torch 2.13's batched CPU LU returned out-of-range pivots for [2, 2048, 1536]
    batches of random matrices; the bases factor one matrix at a time (``Y = B R``)."""
    Y = torch.randn(2, 1536, 2048, generator=torch.Generator().manual_seed(16)).mT  # column-major, as iterates are
    basis, factor = lm.engines._iteration_basis_and_factor(Y)
    assert torch.isfinite(basis).all() and basis.abs().max() <= 1.0
    assert (basis @ factor - Y).norm() <= 1e-4 * Y.norm()


# ---------------------------------------------------------------------------
# A decomposition that fails, or returns non-finite values, is reported
# ---------------------------------------------------------------------------


def _one_layer_models(T: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    return [{"blocks.0.attn.weight": torch.randn(12, 10, generator=g)} for _ in range(T)]


def test_a_failed_decomposition_names_the_layer_and_what_to_try(monkeypatch):
    def failing(*args):
        raise torch.linalg.LinAlgError("linalg.eigh: (Batch element 0): The algorithm failed to converge")

    monkeypatch.setattr(ops, "low_rank_factors", failing)
    expected = (
        r"the decomposition of layer 'blocks\.0\.attn\.weight' \(T=3 tasks of 12 x 10, k=1, svd='auto', "
        r"torch\.float32\) failed\..*Try compute_dtype=torch\.float64 or svd='exact'\..*failed to converge"
    )
    with pytest.raises(torch.linalg.LinAlgError, match=expected):
        lm.cart_merge(_one_layer_models())


def test_non_finite_factors_never_reach_the_output(monkeypatch):
    real = ops.low_rank_factors

    def poisoned(*args):
        U, S, Vh = real(*args)
        return U, S * float("nan"), Vh

    monkeypatch.setattr(ops, "low_rank_factors", poisoned)
    with pytest.raises(FloatingPointError, match=r"decomposition of layer 'blocks\.0\.attn\.weight' .* gave non-finite values"):
        lm.cart_merge(_one_layer_models())
    with pytest.raises(FloatingPointError, match="gave non-finite values"):
        lm.cart_decompose(_one_layer_models())


def test_a_non_finite_delta_of_a_layer_stack_is_reported(monkeypatch):
    real = ops.centered_low_rank_sum

    def poisoned(*args):
        average, delta = real(*args)
        return average, delta * float("inf")

    monkeypatch.setattr(ops, "centered_low_rank_sum", poisoned)
    stack = torch.stack([model["blocks.0.attn.weight"] for model in _one_layer_models()])
    with pytest.raises(FloatingPointError, match=r"decomposition of a layer \(T=3 tasks of 12 x 10, k=2, .*non-finite"):
        lm.cart_layer_parts(stack, 2)
