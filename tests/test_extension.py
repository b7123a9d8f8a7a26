"""The C++ ops (``torch.ops.lowrank_merge.*``) against their pure-torch twins
in ``lowrank_merge.engines``, ``opcheck``, argument errors, and the merge with
and without the extension."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import lowrank_merge as lm
import lowrank_merge._ops as ops
from lowrank_merge import engines

from conftest import make_models, relative_error

requires_extension = pytest.mark.skipif(
    not lm.extension_available(),
    reason="the compiled lowrank_merge._C extension is not built or failed to load "
    "(pip install --no-build-isolation -e . builds it); the pure-torch path is tested elsewhere",
)
pytestmark = requires_extension

ENGINES = ["exact", "randomized", "krylov", "gram", "gram_subspace", "chebyshev"]
SHAPES = [(3, 24, 16), (2, 16, 24), (4, 20, 20), (2, 1, 9)]


def _omega(engine, k, m, n, dtype, oversample=5, seed=0):
    if engine not in engines.SKETCH_ENGINES:
        return None
    return engines.gaussian_sketch(n, engines.sketch_width(k, oversample, m, n), seed, dtype, "cpu")


def _stack(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    T, m, n = shape
    base = torch.randn(m, n, generator=g, dtype=torch.float64)
    return torch.stack([base + 0.1 * torch.randn(m, n, generator=g, dtype=torch.float64) for _ in range(T)]).to(dtype)


def _tolerance(dtype):
    # Same algorithm, same LAPACK calls; only reductions (the C++ centering sums the T values in
    # another order than torch.mean) may round differently, and the truncated SVD amplifies that
    # by ‖A‖ / gap (~10-100 on these random matrices): 1e3 eps.
    return 1e3 * torch.finfo(dtype).eps


def test_ops_are_registered():
    assert hasattr(torch.ops.lowrank_merge, "low_rank_factors")
    assert hasattr(torch.ops.lowrank_merge, "centered_low_rank_sum")
    assert ops.has_kernel("cpu")
    assert not ops.has_kernel("meta")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("engine", ENGINES)
def test_low_rank_factors_match_twin(engine, shape, dtype):
    A = _stack(shape, dtype) - _stack(shape, dtype).mean(0)
    m, n = shape[1:]
    for k in sorted({1, min(m, n) // 2 or 1, min(m, n)}):
        omega = _omega(engine, k, m, n, dtype)
        cpp = torch.ops.lowrank_merge.low_rank_factors(A, k, engine, 2, omega)
        twin = engines.low_rank_factors(A, k, engine, 2, omega)
        for a, b in zip(cpp, twin):
            assert a.shape == b.shape and a.dtype == b.dtype == dtype
        assert relative_error(cpp[1], twin[1]) <= _tolerance(dtype), (engine, k)
        rec_cpp = (cpp[0] * cpp[1].unsqueeze(-2)) @ cpp[2]
        rec_twin = (twin[0] * twin[1].unsqueeze(-2)) @ twin[2]
        assert relative_error(rec_cpp, rec_twin) <= _tolerance(dtype), (engine, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("engine", ENGINES)
def test_centered_low_rank_sum_matches_twin(engine, shape, dtype):
    stack = _stack(shape, dtype, seed=1)
    m, n = shape[1:]
    k = max(1, min(m, n) // 3)
    omega = _omega(engine, k, m, n, dtype, seed=3)
    avg_cpp, delta_cpp = torch.ops.lowrank_merge.centered_low_rank_sum(stack, k, engine, 2, omega)
    avg_twin, delta_twin = engines.centered_low_rank_sum(stack, k, engine, 2, omega)
    assert avg_cpp.shape == delta_cpp.shape == (m, n)
    assert avg_cpp.dtype == delta_cpp.dtype == dtype
    assert relative_error(avg_cpp, avg_twin) <= 4 * torch.finfo(dtype).eps
    assert relative_error(avg_cpp, stack.double().mean(0)) <= 4 * torch.finfo(dtype).eps
    # Relative to the centered stack, not to the delta: with T = 2 the two reconstructions
    # cancel and the delta is itself rounding noise, which the C++ gram_subspace (CholeskyQR2)
    # and its twin (Householder) round differently.
    scale = (stack.double() - stack.double().mean(0)).norm()
    assert (delta_cpp.double() - delta_twin.double()).norm() <= _tolerance(dtype) * scale, engine


def test_centered_low_rank_sum_accepts_non_contiguous_stack():
    stack = _stack((3, 16, 12), torch.float32).transpose(1, 2)  # [3, 12, 16], not contiguous
    assert not stack.is_contiguous()
    omega = _omega("randomized", 3, 12, 16, torch.float32)
    avg, delta = torch.ops.lowrank_merge.centered_low_rank_sum(stack, 3, "randomized", 2, omega)
    avg_twin, delta_twin = engines.centered_low_rank_sum(stack.contiguous(), 3, "randomized", 2, omega)
    assert relative_error(avg, avg_twin) <= 1e-6
    assert relative_error(delta, delta_twin) <= _tolerance(torch.float32)


LARGE = (4, 2048, 2048)  # matrices of engines.PER_TASK_MIN_ELEMENTS: decomposed task by task


@pytest.mark.parametrize("engine", ["randomized", "gram_subspace"])
def test_large_stacks_decomposed_task_by_task_as_one_batch(engine):
    """From PER_TASK_MIN_ELEMENTS up, the op and its twin center and decompose
    one task at a time; the delta is the batched computation's, to rounding
    (bit for bit where a batched product is the per-matrix one)."""
    assert LARGE[1] * LARGE[2] == engines.PER_TASK_MIN_ELEMENTS
    stack = _stack(LARGE, torch.float32, seed=2)
    omega = _omega(engine, 8, *LARGE[1:], torch.float32, seed=4)
    average = engines.task_average(stack)
    batched = engines.sum_of_reconstructions(*engines.low_rank_factors(stack - average, 8, engine, 2, omega))
    for op in (torch.ops.lowrank_merge.centered_low_rank_sum, engines.centered_low_rank_sum):
        avg, delta = op(stack, 8, engine, 2, omega)
        assert torch.equal(avg, average)
        assert relative_error(delta, batched) <= _tolerance(torch.float32), (op, engine)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the huge-page pool counts only on Linux")
def test_large_stacks_hold_one_centered_task_not_a_centered_stack():
    """The op's buffers from 2 MiB up (the huge-page pool's live bytes) stay
    under the size of a centered copy of the stack, which the batched path
    alone would allocate."""
    stack = _stack(LARGE, torch.float32, seed=2)
    omega = _omega("randomized", 8, *LARGE[1:], torch.float32)
    stack_bytes = stack.numel() * stack.element_size()
    torch.ops.lowrank_merge.centered_low_rank_sum(stack, 8, "randomized", 2, omega)
    _, _, peak_live = _pool_bytes()
    assert 0 < peak_live < stack_bytes
    small = _stack((4, 1024, 1024), torch.float32, seed=2)  # below the threshold: a centered stack
    small_omega = _omega("randomized", 8, 1024, 1024, torch.float32)
    torch.ops.lowrank_merge.centered_low_rank_sum(small, 8, "randomized", 2, small_omega)
    assert _pool_bytes()[2] >= small.numel() * small.element_size()


@pytest.mark.parametrize("engine", ENGINES)
def test_opcheck_low_rank_factors(engine):
    for shape, k in [((12, 8), 3), ((8, 12), 2), ((2, 3, 10, 7), 4)]:
        A = torch.randn(*shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        omega = _omega(engine, k, *shape[-2:], torch.float64)
        torch.library.opcheck(torch.ops.lowrank_merge.low_rank_factors.default, (A, k, engine, 2, omega))


@pytest.mark.parametrize("engine", ENGINES)
def test_opcheck_centered_low_rank_sum(engine):
    for shape, k in [((3, 12, 8), 3), ((2, 8, 12), 1)]:
        stack = _stack(shape, torch.float32)
        omega = _omega(engine, k, *shape[-2:], torch.float32)
        torch.library.opcheck(torch.ops.lowrank_merge.centered_low_rank_sum.default, (stack, k, engine, 1, omega))


A_OK = torch.zeros(3, 6, 4)
OMEGA_OK = torch.zeros(4, 3)


@pytest.mark.parametrize(
    "op, args, match",
    [
        ("low_rank_factors", (torch.zeros(5), 1, "exact", 2, None), "dims"),
        ("centered_low_rank_sum", (torch.zeros(6, 4), 1, "exact", 2, None), r"\[T, m, n\]"),
        ("centered_low_rank_sum", (torch.zeros(2, 3, 6, 4), 1, "exact", 2, None), r"\[T, m, n\]"),
        ("centered_low_rank_sum", (A_OK, 0, "exact", 2, None), r"k must be in \[1, min\(m, n\)\]"),
        ("centered_low_rank_sum", (A_OK, 5, "exact", 2, None), r"k must be in \[1, min\(m, n\)\]"),
        ("low_rank_factors", (A_OK, -1, "gram", 2, None), r"k must be in \[1, min\(m, n\)\]"),
        ("low_rank_factors", (A_OK, 2, "svd", 2, None), "unknown svd engine 'svd'"),
        ("centered_low_rank_sum", (A_OK, 2, "auto", 2, None), "unknown svd engine 'auto'"),
        ("centered_low_rank_sum", (A_OK, 2, "randomized", 2, None), "needs a sketch matrix omega"),
        ("low_rank_factors", (A_OK, 2, "krylov", 2, None), "needs a sketch matrix omega"),
        ("low_rank_factors", (A_OK, 2, "randomized", 2, torch.zeros(6, 3)), "omega must be"),
        ("low_rank_factors", (A_OK, 2, "randomized", 2, OMEGA_OK.double()), "dtype"),
        ("low_rank_factors", (A_OK.int(), 2, "exact", 2, None), "float32 or float64"),
        ("centered_low_rank_sum", (A_OK.half(), 2, "exact", 2, None), "float32 or float64"),
        ("low_rank_factors", (A_OK, 2, "randomized", -1, OMEGA_OK), "niter"),
    ],
)
@pytest.mark.parametrize("implementation", ["extension", "twin", "fake"])
def test_ops_reject_bad_arguments(op, args, match, implementation):
    """The C++ op, its pure-torch twin and its fake kernel (meta tensors, torch.compile) raise alike."""
    if implementation == "twin":
        function = getattr(engines, op)
    else:
        function = getattr(torch.ops.lowrank_merge, op)
        if implementation == "fake":
            args = tuple(arg.to("meta") if isinstance(arg, torch.Tensor) else arg for arg in args)
    with pytest.raises(RuntimeError, match=match):
        function(*args)


@pytest.mark.parametrize("op", ["low_rank_factors", "centered_low_rank_sum"])
def test_a_meta_sketch_beside_a_cpu_stack_is_rejected(op):
    """A meta argument selects the fake kernel, which must not return uninitialised tensors."""
    stack = torch.randn(2, 6, 4)
    with pytest.raises(RuntimeError, match="omega must have A's dtype and device"):
        getattr(torch.ops.lowrank_merge, op)(stack, 2, "randomized", 1, OMEGA_OK.to("meta"))


@pytest.mark.parametrize("svd", ["exact", "randomized", "krylov", "gram"])
def test_merge_same_with_and_without_extension(svd, monkeypatch):
    models = make_models(3, 24, seed=0)
    calls = []
    twin = engines.low_rank_factors  # the merge centers the stack it owns, then runs this op

    def counting_twin(*args):
        calls.append(args[2])
        return twin(*args)

    monkeypatch.setattr(engines, "low_rank_factors", counting_twin)
    with_extension = lm.cart_merge(models, rank_ratio=0.25, svd=svd, seed=2)
    assert calls == []  # the C++ op ran
    monkeypatch.setattr(ops, "has_kernel", lambda device_type: False)
    fallback = lm.cart_merge(models, rank_ratio=0.25, svd=svd, seed=2)
    assert calls and set(calls) == {svd}  # the pure-torch twin ran
    for name, tensor in with_extension.items():
        assert fallback[name].dtype == tensor.dtype
        if tensor.dtype.is_floating_point:
            assert relative_error(fallback[name], tensor) <= 1e-5, name  # float32 rounding
        else:
            assert torch.equal(fallback[name], tensor)


def test_low_rank_approx_same_with_and_without_extension(monkeypatch):
    A = torch.randn(3, 30, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with_extension = lm.low_rank_approx(A, 4, svd="krylov")
    monkeypatch.setattr(ops, "has_kernel", lambda device_type: False)
    fallback = lm.low_rank_approx(A, 4, svd="krylov")
    rec = [(U * S.unsqueeze(-2)) @ Vh for U, S, Vh in (with_extension, fallback)]
    assert relative_error(rec[0], rec[1]) <= 1e-12


@pytest.mark.parametrize("shape", [(2, 1100, 1030), (2, 300, 1100)])
@pytest.mark.parametrize("engine", ["gram", "gram_subspace"])
def test_blocked_gram_engines_match_twin(engine, shape):
    """Shapes whose smaller side (≥ 256) takes the blocked Gram product, with
    five blocks and with two, tall and wide: the C++ op equals its twin."""
    A = _stack(shape, torch.float64) - _stack(shape, torch.float64).mean(0)
    k = 20
    omega = _omega(engine, k, *shape[1:], torch.float64)
    cpp = ops.low_rank_factors(A, k, engine, 3, omega)
    twin = engines.low_rank_factors(A, k, engine, 3, omega)
    rec_cpp = (cpp[0] * cpp[1].unsqueeze(-2)) @ cpp[2]
    rec_twin = (twin[0] * twin[1].unsqueeze(-2)) @ twin[2]
    assert relative_error(rec_cpp, rec_twin) <= _tolerance(torch.float64)
    assert relative_error(cpp[1], twin[1]) <= _tolerance(torch.float64)


@pytest.mark.parametrize("engine", ["randomized", "krylov", "gram", "gram_subspace"])
def test_factors_come_sorted_when_singular_values_tie(engine):
    """All singular values equal (2 · orthonormal rows): the norms that give S come
    out of the eigenvalues' order by rounding, so the reordering branch runs.
    S is non-increasing, and each rank-1 term still pairs its own U and Vh
    (U S Vh is an exact piece of A: A's rows project onto Vh's span unchanged)."""
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(3, 60, 40, generator=g, dtype=torch.float64))
    A = 2.0 * Q.mT  # [3, 40, 60]
    k = 10
    omega = _omega(engine, k, 40, 60, torch.float64)
    for factors in (ops.low_rank_factors(A, k, engine, 2, omega), engines.low_rank_factors(A, k, engine, 2, omega)):
        U, S, Vh = factors
        assert bool((S[..., :-1] >= S[..., 1:]).all())
        assert torch.allclose(S, torch.full_like(S, 2.0), rtol=1e-12, atol=0)
        assert torch.allclose(U.mT @ A, S.unsqueeze(-1) * Vh, atol=1e-12)  # Uᵀ A = S Vh, term by term


def test_reordering_follows_the_values():
    S = torch.tensor([[3.0, 1.0, 2.0], [5.0, 4.0, 6.0]])
    U = torch.arange(12.0).reshape(2, 2, 3)  # k on the last axis
    Vh = torch.arange(12.0).reshape(2, 3, 2)  # k on the second-to-last
    sorted_S, sorted_U, sorted_Vh = engines._sort_by_descending_values(S, (U, -1), (Vh, -2))
    assert torch.equal(sorted_S, torch.tensor([[3.0, 2.0, 1.0], [6.0, 5.0, 4.0]]))
    assert torch.equal(sorted_U, torch.stack([U[0][:, [0, 2, 1]], U[1][:, [2, 0, 1]]]))
    assert torch.equal(sorted_Vh, torch.stack([Vh[0][[0, 2, 1]], Vh[1][[2, 0, 1]]]))
    already, U_first = torch.tensor([[3.0, 2.0, 2.0]]), U[:1]
    same = engines._sort_by_descending_values(already, (U_first, -1))
    assert same[0] is already and same[1] is U_first  # in order: nothing gathered


HUGE_PAGE = 2 << 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are a Linux feature")
def test_large_buffers_of_the_cpu_ops_are_huge_page_aligned_only_inside_the_op():
    """The CPU ops back allocations of at least 2 MiB by huge pages (2 MiB
    aligned, madvised) while they run: the outputs carry that alignment and stay
    valid after the op (they free themselves), and afterwards torch allocates
    as before (the huge-page pool serves nothing)."""
    T, m, n = 3, 1024, 1024  # delta and average: 4 MiB each
    stack = _stack((T, m, n), torch.float32)
    k = 8
    omega = _omega("randomized", k, m, n, torch.float32)
    average, delta = torch.ops.lowrank_merge.centered_low_rank_sum(stack, k, "randomized", 2, omega)
    assert average.data_ptr() % HUGE_PAGE == 0 and delta.data_ptr() % HUGE_PAGE == 0
    expected_average, expected_delta = engines.centered_low_rank_sum(stack, k, "randomized", 2, omega)
    assert relative_error(delta, expected_delta) <= _tolerance(torch.float32) * 10
    assert torch.equal(average, expected_average)
    U, S, Vh = torch.ops.lowrank_merge.low_rank_factors(stack, k, "randomized", 2, omega)
    assert U.shape == (T, m, k) and torch.isfinite(U).all()
    del average, delta, U, S, Vh  # freed by their own deleter, after the op
    assert not _served_by_huge_pages()


def _pool_bytes() -> tuple[int, int, int]:
    """(idle, live, peak live) bytes of the huge-page buffers."""
    return tuple(torch.ops.lowrank_merge._huge_page_pool_bytes())


def _served_by_huge_pages() -> bool:
    """Whether a fresh 3 MiB tensor comes from the huge-page allocator: 2 MiB
    aligned and counted live by its pool. (Alignment alone is not enough
    outside a scope: glibc can hand back a freed aligned buffer, which made
    this check flaky.)"""
    live_before = _pool_bytes()[1]
    tensor = torch.empty(3 << 18)
    return tensor.data_ptr() % HUGE_PAGE == 0 and _pool_bytes()[1] > live_before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are a Linux feature")
@pytest.mark.skipif("THP_MEM_ALLOC_ENABLE" in os.environ, reason="torch itself aligns large tensors")
def test_huge_page_scope_from_python_nests_and_closes_on_errors():
    cpu = torch.device("cpu")
    assert not _served_by_huge_pages()
    with pytest.raises(KeyError):
        with ops.huge_page_allocations(cpu):
            with ops.huge_page_allocations(cpu):
                assert _served_by_huge_pages()
            assert _served_by_huge_pages()  # the outer scope is still open
            raise KeyError("inside")
    assert not _served_by_huge_pages()
    with pytest.raises(RuntimeError, match="without begin_huge_pages"):
        torch.ops.lowrank_merge._end_huge_pages()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are a Linux feature")
def test_huge_page_scope_reuses_freed_buffers_within_two_buffers_of_its_peak():
    """A buffer freed in the scope serves the next request of its size; a miss
    frees idle buffers, smallest first, until live + idle bytes fit the peak of
    live bytes, or idle bytes fit twice the largest idle buffer; closing the
    scope frees them all, and a buffer freed after the scope is not kept."""
    MiB = 1 << 20

    def buffer(mebibytes: float) -> torch.Tensor:
        return torch.empty(int(mebibytes * MiB) // 4)

    with ops.huge_page_allocations(torch.device("cpu")):
        first = buffer(4)
        address = first.data_ptr()
        del first
        assert _pool_bytes() == (4 * MiB, 0, 4 * MiB)
        again = buffer(4)
        assert again.data_ptr() == address and _pool_bytes() == (0, 4 * MiB, 4 * MiB)
        others = [buffer(6), buffer(3), buffer(2.5)]  # misses with nothing idle
        assert _pool_bytes() == (0, int(15.5 * MiB), int(15.5 * MiB))
        del others, again
        assert _pool_bytes() == (int(15.5 * MiB), 0, int(15.5 * MiB))
        kept = buffer(2)  # a miss: 2 + 15.5 > 15.5, the smallest (2.5 MiB) is freed
        assert _pool_bytes() == (13 * MiB, 2 * MiB, int(15.5 * MiB))
        # A miss: 7.5 + 13 > 15.5, and 13 > 2 x 6: the 3 MiB buffer is freed,
        # the 4 MiB one stays beside the largest.
        grown = buffer(5.5)
        assert _pool_bytes() == (10 * MiB, int(7.5 * MiB), int(15.5 * MiB))
        tiny = buffer(1.5)  # under 2 MiB: torch's allocator
        assert _pool_bytes()[:2] == (10 * MiB, int(7.5 * MiB))
        reused = [buffer(6), buffer(4)]
        assert _pool_bytes() == (0, int(17.5 * MiB), int(17.5 * MiB))
        del grown, reused
    assert _pool_bytes() == (0, 2 * MiB, int(17.5 * MiB))  # closing frees the idle buffers
    del kept, tiny
    assert _pool_bytes()[:2] == (0, 0)  # freed after the scope: not kept


@pytest.mark.parametrize("rank", [None, 5])
@pytest.mark.parametrize("engine", ["randomized", "krylov", "gram_subspace", "chebyshev"])
def test_cuda_steps_give_the_cpu_steps_results(engine, rank):
    """The CUDA path's EngineSteps (CholeskyQR2 for every basis, R = triu(QᵀY) for
    the filter's re-basing), run on CPU tensors, give the CPU steps' results (LU
    and Householder: other bases of the same spans) to rounding, on float64
    matrices of full rank and of rank 5 < k + oversample (CholeskyQR2 falls back)."""
    g = torch.Generator().manual_seed(14)
    A = _stack((3, 70, 50), torch.float64, seed=14)
    A = A - A.mean(0)
    if rank is not None:
        A = torch.randn(3, 70, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, 50, generator=g, dtype=torch.float64)
    k = 8
    omega = _omega(engine, k, 70, 50, torch.float64)
    batched = torch.ops.lowrank_merge._low_rank_factors_batched_steps(A, k, engine, 3, omega)
    cpu = ops.low_rank_factors(A, k, engine, 3, omega)
    rec_batched, rec_cpu = ((U * S.unsqueeze(-2)) @ Vh for U, S, Vh in (batched, cpu))
    assert torch.isfinite(rec_batched).all()
    assert relative_error(rec_batched, rec_cpu) <= 1e-9
    assert relative_error(batched[1], cpu[1]) <= 1e-9
