"""Tests of the CUDA kernels of the two ops (csrc/cuda/, docs/cuda.md).

Every test here needs a CUDA GPU and a ``lowrank_merge._C`` built with its CUDA
kernels; elsewhere the whole module is skipped. What they check:

* the centering kernel gives the CPU's average to rounding (it sums in task
  order and divides by T; the CPU uses ATen's mean, whose summation order can
  differ), on the vectorised and the scalar path, for every register-cache size
  of the kernel (T <= 8, <= 16, <= 32, more);
* every engine on CUDA against a float64 dense-SVD reference (exact engine) or
  within 1 % of the optimal rank-k residual (sketch engines), and against the
  CPU kernels with the same sketch omega;
* (the batched CholeskyQR2 orthonormaliser is tested on both devices in
  test_cholesky_qr2.py);
* out-of-memory errors name the sizes (op) and the layer (merge API);
* the kernels run on the current stream, a non-default one included;
* TF32 follows ``torch.backends.cuda.matmul.allow_tf32``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import lowrank_merge as lm
from lowrank_merge import _ops, engines

from conftest import conditioned, orthogonality_error, random_orthonormal, span_error


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not _ops.has_kernel("cuda"):
            return "no CUDA GPU kernel: lowrank_merge._C was built without csrc/cuda (see docs/cuda.md)"
    return None


SKIP_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")

ops = torch.ops.lowrank_merge
CUDA = torch.device("cuda")
DTYPES = (torch.float32, torch.float64)
SKETCH_ENGINES = engines.SKETCH_ENGINES


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def task_stack(T: int, m: int, n: int, *, seed: int = 0, decay: float = 1.0) -> torch.Tensor:
    """``[T, m, n]`` float64 on the CPU: a shared base plus a task vector with a
    power-law spectrum ``s_i = (i + 1) ** -decay`` per task."""
    generator = torch.Generator().manual_seed(seed)
    r = min(m, n)
    spectrum = (torch.arange(r, dtype=torch.float64) + 1) ** -decay
    base = torch.randn(m, n, generator=generator, dtype=torch.float64)
    tasks = [
        base + (random_orthonormal(m, r, generator) * spectrum) @ random_orthonormal(n, r, generator).T for _ in range(T)
    ]
    return torch.stack(tasks)


def reference_delta(stack64: torch.Tensor, k: int) -> torch.Tensor:
    """``Σ_t SVD_k(W_t − avg)`` by dense float64 SVD (on the CPU)."""
    centered = stack64 - stack64.mean(dim=0)
    U, S, Vh = torch.linalg.svd(centered, full_matrices=False)
    return ((U[..., :k] * S[..., None, :k]) @ Vh[..., :k, :]).sum(dim=0)


def optimal_residuals(A64: torch.Tensor, k: int) -> torch.Tensor:
    """``‖A_t − [A_t]_k‖_F`` per matrix, from the float64 singular values."""
    S = torch.linalg.svdvals(A64)
    return S[..., k:].square().sum(dim=-1).sqrt()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def sketch(engine: str, k: int, m: int, n: int, dtype: torch.dtype, device, seed: int = 0) -> torch.Tensor | None:
    if engine not in SKETCH_ENGINES:
        return None
    oversample = lm.cart.DEFAULT_OVERSAMPLE.get(engine, lm.cart.accurate_oversample(k))
    return engines.gaussian_sketch(n, engines.sketch_width(k, oversample, m, n), seed, dtype, device)


EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}


# ---------------------------------------------------------------------------
# The centering kernel
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 8, 12, 20, 40])  # every register-cache size of the kernel
@pytest.mark.parametrize("shape", [(64, 48), (33, 17)])  # vectorised / scalar path
def test_average_is_bitwise_the_cpu_kernels(dtype, T, shape):
    stack = task_stack(T, *shape, seed=T).to(dtype)
    average_cpu, _ = ops.centered_low_rank_sum(stack, 1, "exact", 0, None)
    average_cuda, _ = ops.centered_low_rank_sum(stack.to(CUDA), 1, "exact", 0, None)
    # A sum of T terms in another order differs by at most ~T ulps.
    assert rel(average_cuda, average_cpu) <= T * EPS[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_average_of_misaligned_and_strided_stacks(dtype):
    T, m, n = 5, 32, 64
    stack = task_stack(T, m, n).to(dtype)
    expected, _ = ops.centered_low_rank_sum(stack, 1, "exact", 0, None)
    # A view one element into its storage: not 16-byte aligned, so the scalar path.
    storage = torch.empty(T * m * n + 1, dtype=dtype, device=CUDA)
    misaligned = storage[1:].view(T, m, n)
    misaligned.copy_(stack)
    average, _ = ops.centered_low_rank_sum(misaligned, 1, "exact", 0, None)
    assert rel(average, expected) <= T * EPS[dtype]
    # A transposed (non-contiguous) stack is made contiguous first.
    transposed = stack.transpose(1, 2).contiguous().to(CUDA).transpose(1, 2)
    average, _ = ops.centered_low_rank_sum(transposed, 1, "exact", 0, None)
    assert rel(average, expected) <= T * EPS[dtype]


# ---------------------------------------------------------------------------
# Engines: against a float64 reference, and against the CPU kernels
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
def test_exact_engine_matches_float64_reference(dtype, shape):
    T, k = 4, 8
    stack64 = task_stack(T, *shape, seed=1)
    average, delta = lm.cart_layer_parts(stack64.to(CUDA), k, svd="exact", compute_dtype=dtype)
    assert average.device.type == "cuda" and delta.dtype == dtype
    assert rel(average, stack64.mean(dim=0)) <= 10 * EPS[dtype]
    assert rel(delta, reference_delta(stack64, k)) <= (1e-10 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("engine", ["randomized", "krylov", "gram"])
@pytest.mark.parametrize("shape", [(120, 80), (80, 200)])
def test_fast_engines_within_residual_tolerance(dtype, engine, shape):
    T, k = 5, 10
    stack64 = task_stack(T, *shape, seed=2)
    A64 = stack64 - stack64.mean(dim=0)
    U, S, Vh = lm.low_rank_approx(A64.to(CUDA, dtype), k, svd=engine)
    assert U.shape == (T, shape[0], k) and S.shape == (T, k) and Vh.shape == (T, k, shape[1])
    residual = (A64 - ((U * S[..., None, :]) @ Vh).cpu().double()).norm(dim=(-2, -1))
    optimal = optimal_residuals(A64, k)
    assert torch.all(residual <= 1.01 * optimal + 1e-5 * A64.norm(dim=(-2, -1)))
    # Factors of an SVD: orthonormal columns / rows, singular values descending.
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert orthogonality_error(U) <= tol and orthogonality_error(Vh.mT) <= tol
    assert torch.all(S[..., :-1] >= S[..., 1:])
    assert rel(S, torch.linalg.svdvals(A64)[..., :k]) <= 2e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("engine", engines.ENGINES)
@pytest.mark.parametrize("shape", [(80, 60), (48, 150)])
def test_cuda_agrees_with_cpu_for_the_same_omega(dtype, engine, shape):
    T, k = 4, 6
    stack = task_stack(T, *shape, seed=3).to(dtype)
    omega = sketch(engine, k, *shape, dtype, "cpu", seed=7)
    average_cpu, delta_cpu = ops.centered_low_rank_sum(stack, k, engine, 2, omega)
    average_cuda, delta_cuda = ops.centered_low_rank_sum(
        stack.to(CUDA), k, engine, 2, None if omega is None else omega.to(CUDA)
    )
    assert rel(average_cuda, average_cpu) <= T * EPS[dtype]
    # Same omega, same products: the two paths differ only in the orthonormaliser
    # (the same span) and the small SVD (the same truncation), i.e. by rounding.
    assert rel(delta_cuda, delta_cpu) <= (1e-9 if dtype == torch.float64 else 2e-4)

    # The factors: per-task reconstructions agree (the factors' signs may not).
    centered = stack - stack.mean(dim=0)
    factors_cpu = ops.low_rank_factors(centered, k, engine, 2, omega)
    factors_cuda = ops.low_rank_factors(centered.to(CUDA), k, engine, 2, None if omega is None else omega.to(CUDA))

    def reconstruct(U, S, Vh):
        return (U * S[..., None, :]) @ Vh

    assert rel(reconstruct(*factors_cuda), reconstruct(*factors_cpu)) <= (1e-9 if dtype == torch.float64 else 2e-4)
    assert rel(factors_cuda[1], factors_cpu[1]) <= (1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("engine", engines.ENGINES)
def test_batched_factors_of_any_leading_shape(engine):
    m, n, k = 40, 30, 5
    A = torch.randn(2, 3, m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    omega = sketch(engine, k, m, n, torch.float64, "cpu")
    U, S, Vh = ops.low_rank_factors(A.to(CUDA), k, engine, 2, None if omega is None else omega.to(CUDA))
    assert U.shape == (2, 3, m, k) and S.shape == (2, 3, k) and Vh.shape == (2, 3, k, n)
    U0, S0, Vh0 = ops.low_rank_factors(A, k, engine, 2, omega)
    assert rel((U * S[..., None, :]) @ Vh, (U0 * S0[..., None, :]) @ Vh0) <= 1e-9


@pytest.mark.parametrize("engine", engines.ENGINES)
def test_two_tasks_cancel(engine):
    # With T = 2 the centered task vectors are opposite; every engine is odd
    # (f(-A) = -f(A), one shared omega), so their reconstructions cancel.
    stack = task_stack(2, 64, 48, seed=5).float().to(CUDA)
    k = 6
    _, delta = ops.centered_low_rank_sum(stack, k, engine, 2, sketch(engine, k, 64, 48, torch.float32, CUDA))
    scale = (stack[0] - stack[1]).norm()
    assert (delta.norm() / scale).item() <= 1e-5


def test_krylov_basis_wider_than_the_matrix():
    # (niter + 1) * l > m: the Krylov basis has more columns than rows; the CUDA
    # orthonormaliser hands it to Householder, which returns the [m, m] basis.
    T, m, n, k = 3, 20, 50, 8
    stack = task_stack(T, m, n, seed=6)
    omega = sketch("krylov", k, m, n, torch.float64, "cpu")
    _, delta_cpu = ops.centered_low_rank_sum(stack, k, "krylov", 2, omega)
    _, delta_cuda = ops.centered_low_rank_sum(stack.to(CUDA), k, "krylov", 2, omega.to(CUDA))
    assert rel(delta_cuda, delta_cpu) <= 1e-9
    assert rel(delta_cuda, reference_delta(stack, k)) <= 1e-9  # at full rank the basis is exact


def test_cart_merge_on_cuda_matches_cpu():
    generator = torch.Generator().manual_seed(8)
    models = [
        {
            "block.weight": torch.randn(64, 48, generator=generator),
            "block.bias": torch.randn(64, generator=generator),
            "head.weight": torch.randn(10, 64, generator=generator),
        }
        for _ in range(3)
    ]
    for engine in engines.ENGINES:
        on_cpu = lm.cart_merge(models, rank_ratio=0.25, svd=engine, device="cpu")
        on_cuda = lm.cart_merge(models, rank_ratio=0.25, svd=engine, device="cuda")
        for name in on_cpu:
            assert on_cuda[name].device.type == "cpu"  # results on the inputs' device
            assert rel(on_cuda[name], on_cpu[name]) <= 1e-4, (engine, name)


# ---------------------------------------------------------------------------
# Out of memory, streams, TF32, errors, schema
# ---------------------------------------------------------------------------


class _MemoryCap:
    """Caps this process's CUDA caching allocator at ``reserved-now + extra`` bytes."""

    def __init__(self, extra_bytes: int):
        self.extra_bytes = extra_bytes

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(CUDA).total_memory
        limit = torch.cuda.memory_reserved(CUDA) + self.extra_bytes
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), CUDA)
        return self

    def __exit__(self, *exc):
        torch.cuda.set_per_process_memory_fraction(1.0, CUDA)
        torch.cuda.empty_cache()
        return False


def test_out_of_memory_names_the_sizes():
    T, m, n, k = 4, 2048, 2048, 40
    stack_bytes = T * m * n * 4
    # Room for the stack and its average, not for the centered copy.
    with _MemoryCap(int(1.5 * stack_bytes)):
        stack = torch.ones(T, m, n, device=CUDA)
        omega = sketch("randomized", k, m, n, torch.float32, CUDA)
        with pytest.raises(torch.OutOfMemoryError) as error:
            ops.centered_low_rank_sum(stack, k, "randomized", 2, omega)
        del stack, omega
    message = str(error.value)
    assert "centered_low_rank_sum" in message
    assert f"T={T}, m={m}, n={n}, k={k}" in message and "randomized" in message


def test_out_of_memory_in_a_merge_names_the_layer():
    T, m, n = 4, 2048, 2048
    models = [{"encoder.layer.3.weight": torch.ones(m, n) * t} for t in range(T)]
    # The merge stacks the CPU tensors on the GPU (fits), then the op needs more.
    with _MemoryCap(int(1.5 * T * m * n * 4)):
        with pytest.raises(torch.OutOfMemoryError) as error:
            lm.cart_merge(models, rank=40, device="cuda")
    message = str(error.value)
    assert "'encoder.layer.3.weight'" in message and f"T={T} tasks of {m} x {n}" in message


def test_runs_on_the_current_stream():
    stack = task_stack(6, 256, 192, seed=13).float().to(CUDA)
    k = 12
    omega = sketch("randomized", k, 256, 192, torch.float32, CUDA)
    expected = ops.centered_low_rank_sum(stack, k, "randomized", 2, omega)
    torch.cuda.synchronize()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # The side stream is busy for a while before it writes the input; a
        # kernel launched on another stream would read the input too early.
        torch.cuda._sleep(100_000_000)
        source = torch.empty_like(stack)
        source.copy_(stack)
        average, delta = ops.centered_low_rank_sum(source, k, "randomized", 2, omega)
    side.synchronize()
    assert torch.equal(average, expected[0])
    torch.testing.assert_close(delta, expected[1], rtol=1e-5, atol=1e-6)


def test_tf32_follows_the_global_flag():
    stack = task_stack(4, 256, 256, seed=14).float().to(CUDA)
    k = 16
    omega = sketch("randomized", k, 256, 256, torch.float32, CUDA)
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        _, full = ops.centered_low_rank_sum(stack, k, "randomized", 2, omega)
        torch.backends.cuda.matmul.allow_tf32 = True
        _, tf32 = ops.centered_low_rank_sum(stack, k, "randomized", 2, omega)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert rel(tf32, full) <= 2e-2  # TF32 keeps 10 mantissa bits
    if torch.cuda.get_device_capability(CUDA) >= (8, 0):
        # TF32 GEMMs (Ampere and later) round differently: the flag took effect.
        assert not torch.equal(tf32, full)


def test_cholesky_qr2_under_tf32():
    # The Gram matrices are float64, so TF32 cannot break the Cholesky; the
    # triangular solves may run in TF32, which bounds Q's accuracy to TF32's.
    Y = conditioned(4, 400, 32, 1e3, seed=16).float().to(CUDA)
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        Q, _ = ops._cholesky_qr2(Y)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert orthogonality_error(Q) <= 1e-2 and span_error(Q, Y) <= 1e-2


def test_argument_errors():
    stack = torch.randn(3, 20, 10, device=CUDA)
    omega = torch.randn(10, 5)
    with pytest.raises(RuntimeError, match="omega must have A's dtype and device"):
        ops.centered_low_rank_sum(stack, 2, "randomized", 2, omega)
    with pytest.raises(RuntimeError, match="k must be in"):
        ops.centered_low_rank_sum(stack, 11, "exact", 0, None)
    with pytest.raises(RuntimeError, match="fewer than the rank"):
        ops.low_rank_factors(stack, 8, "randomized", 1, torch.randn(10, 5, device=CUDA))


@pytest.mark.parametrize("engine", engines.ENGINES)
def test_opcheck(engine):
    stack = task_stack(3, 40, 30, seed=15).float().to(CUDA)
    k = 4
    omega = sketch(engine, k, 40, 30, torch.float32, CUDA)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.centered_low_rank_sum.default, (stack, k, engine, 2, omega), test_utils=utils)
    torch.library.opcheck(ops.low_rank_factors.default, (stack, k, engine, 2, omega), test_utils=utils)
