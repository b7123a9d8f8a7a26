"""The engines' float32 CPU products through oneDNN or the BLAS
(``engines.matrix_product``, ``csrc/cpu_matmul.h``): against float64 products in
every operand layout the engines use, the engines and the C++ ops under each
backend, the huge-page allocator under oneDNN's raw buffers, and how the
backend is chosen."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lowrank_merge as lm
import lowrank_merge._ops as ops
from lowrank_merge import engines

from conftest import relative_error

requires_onednn = pytest.mark.skipif(
    not engines.onednn_available(), reason="this torch build has no oneDNN inner product on the CPU"
)
requires_extension = pytest.mark.skipif(not lm.extension_available(), reason="the C++ extension is not built")


@pytest.fixture
def set_backend():
    """lm.set_cpu_matmul_backend for one test; the backend before it is restored after."""
    previous = lm.cpu_matmul_backend()
    yield lm.set_cpu_matmul_backend
    lm.set_cpu_matmul_backend(previous)


@pytest.fixture
def onednn_calls(monkeypatch):
    """How many matrix products the pure-torch path sent to oneDNN."""
    calls = []
    product = engines._onednn_product
    monkeypatch.setattr(engines, "_onednn_product", lambda left, right: calls.append(1) or product(left, right))
    return calls


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# 256 x 256 x 128 multiply-adds = 2^23, the smallest product that goes to oneDNN.
M, K, N = 256, 256, 128
RIGHT_LAYOUTS = {
    "row-major": lambda right: right,
    "column-major": lambda right: right.mT.contiguous().mT,
    "column block": lambda right: _randn(*right.shape[:-1], 3 * N, seed=5)[..., N : 2 * N].copy_(right),
}
BATCHES = [((M, K), (K, N)), ((3, M, K), (3, K, N)), ((M, K), (3, K, N)), ((3, M, K), (K, N)), ((2, 3, M, K), (3, K, N))]


def _check_product(left, right):
    product = engines.matrix_product(left, right)
    expected = left.double() @ right.double()
    assert product.shape == expected.shape and product.dtype == torch.float32 and product.is_contiguous()
    assert relative_error(product, expected) <= 1e-6
    return expected[..., 0, 0].numel()  # matrices in the batch


@requires_onednn
@pytest.mark.parametrize("layout", RIGHT_LAYOUTS)
@pytest.mark.parametrize("left_shape, right_shape", BATCHES)
def test_onednn_products_match_float64_in_every_layout(layout, left_shape, right_shape, set_backend, onednn_calls):
    set_backend("onednn")
    matrices = _check_product(_randn(*left_shape, seed=1), RIGHT_LAYOUTS[layout](_randn(*right_shape, seed=2)))
    # One call per matrix of the batch for a column-major right (oneDNN's
    # row-major weight). A column block is not dense (oneDNN ran it ~1000x
    # slower) and a row-major right is a column-major weight (1.2-3x slower
    # than the BLAS): both stay on the BLAS.
    assert len(onednn_calls) == (matrices if layout == "column-major" else 0)


@requires_onednn
@pytest.mark.parametrize("left_shape, right_shape", BATCHES)
def test_a_strided_left_goes_to_onednn_only_when_smaller_than_the_right(left_shape, right_shape, set_backend, onednn_calls):
    """A sketch or basis beside a stack is copied for oneDNN; a stack's
    transpose is not (the BLAS reads it in place, no second stack in memory)."""
    set_backend("onednn")
    for left_rows, right_columns, left_is_smaller in ((M // 2, 2 * N, True), (M, N, False)):
        left = _randn(*left_shape[:-2], K, left_rows, seed=3).mT  # [..., rows, K], column-major
        right = _randn(*right_shape[:-2], right_columns, right_shape[-2], seed=4).mT  # column-major
        onednn_calls.clear()
        matrices = _check_product(left, right)
        if len(left_shape) == len(right_shape):  # else a broadcast operand counts once: the sizes decide
            assert (left.numel() < right.numel()) == left_is_smaller
        assert len(onednn_calls) == (matrices if left.numel() < right.numel() else 0)


@requires_onednn
@pytest.mark.parametrize(
    "left, right",
    [
        (_randn(M, K // 2), _randn(K // 2, N)),  # half the multiply-adds of the threshold
        (_randn(M, K).double(), _randn(K, N).double()),
        (_randn(K), _randn(K, N * M)),
    ],
    ids=["small", "float64", "vector"],
)
def test_small_float64_and_vector_products_stay_on_the_blas(left, right, set_backend, onednn_calls):
    set_backend("onednn")
    assert torch.equal(engines.matrix_product(left, right), left @ right)
    assert onednn_calls == []


@requires_onednn
def test_products_that_need_gradients_stay_on_the_blas(set_backend, onednn_calls):
    set_backend("onednn")
    left = _randn(M, K).requires_grad_()
    product = engines.matrix_product(left, _randn(K, N))
    product.sum().backward()
    assert onednn_calls == [] and left.grad is not None


def _orthonormal(rows, cols, g):
    return torch.linalg.qr(torch.randn(rows, cols, generator=g)).Q


def _centered_stack(seed=0):
    """[3, 256, 512]: a shared base plus per task 10 Q_t R_tᵀ (orthonormal Q_t, R_t of
    RANK columns) plus a 1e-3 tail. Each centered task vector is 2/3 of its own
    term plus 1/3 of the others': singular values near 6.7 to RANK, then near 3.3."""
    g = torch.Generator().manual_seed(seed)
    tasks = [10 * _orthonormal(256, RANK, g) @ _orthonormal(512, RANK, g).T for _ in range(3)]
    return torch.randn(256, 512, generator=g) + torch.stack(tasks) + 1e-3 * torch.randn(3, 256, 512, generator=g)


RANK = 40


def _delta(stack, engine, op=engines.centered_low_rank_sum):
    T, m, n = stack.shape
    omega = engines.gaussian_sketch(n, engines.sketch_width(RANK, 20, m, n), 0, stack.dtype, "cpu")
    return op(stack, RANK, engine, 5, omega if engine in engines.SKETCH_ENGINES else None)[1]


@requires_onednn
@pytest.mark.parametrize("engine", engines.ENGINES)
def test_engines_under_onednn_are_as_accurate_as_under_the_blas(engine, set_backend, onednn_calls):
    stack = _centered_stack()
    expected = _delta(stack.double(), "exact")
    set_backend("blas")
    blas = _delta(stack, engine)
    assert onednn_calls == []
    set_backend("onednn")
    onednn = _delta(stack, engine)
    # The engine's products did go to oneDNN; exact's only one, the
    # reconstruction, has a row-major right (a column-major weight) and stays on the BLAS.
    assert bool(onednn_calls) == (engine != "exact")
    assert relative_error(onednn, blas) <= 1e-4
    assert relative_error(onednn, expected) <= max(1e-5, 2 * relative_error(blas, expected))


@requires_extension
@requires_onednn
@pytest.mark.parametrize("backend", engines.CPU_MATMUL_BACKENDS)
@pytest.mark.parametrize("engine", ["randomized", "krylov", "gram", "gram_subspace"])
def test_cpp_ops_follow_the_backend_like_their_twins(engine, backend, set_backend):
    """The C++ op and its pure-torch twin run the same products under each
    backend, so they agree to the last bits; the backends themselves do not."""
    stack = _centered_stack(seed=1)
    set_backend(backend)
    cpp = _delta(stack, engine, torch.ops.lowrank_merge.centered_low_rank_sum)
    assert relative_error(cpp, _delta(stack, engine)) <= 1e3 * torch.finfo(torch.float32).eps
    other = "blas" if backend == "onednn" else "onednn"
    set_backend(other)
    assert not torch.equal(cpp, _delta(stack, engine))


@requires_extension
@requires_onednn
def test_onednn_inside_a_huge_page_scope_frees_its_raw_buffers(set_backend):
    """oneDNN allocates its buffers through the CPU allocator's raw interface;
    inside a huge-page scope that is the huge-page allocator (which once had no
    raw deleter, and aborted the process)."""
    set_backend("onednn")
    left, right = _randn(3, 1024, 2048), _randn(3, 2048, 1024)
    _, live_before, _ = torch.ops.lowrank_merge._huge_page_pool_bytes()
    with ops.huge_page_allocations(torch.device("cpu")):
        product = engines.matrix_product(left, right)
    assert relative_error(product, left.double() @ right.double()) <= 1e-6
    idle, live, _ = torch.ops.lowrank_merge._huge_page_pool_bytes()
    assert idle == 0 and live == live_before + product.numel() * 4  # only the result is still held
    del product
    assert torch.ops.lowrank_merge._huge_page_pool_bytes()[1] == live_before


@pytest.mark.parametrize("vendor, expected", [("AuthenticAMD", "onednn"), ("GenuineIntel", "blas"), ("", "blas")])
def test_auto_picks_onednn_on_amd_cpus_only(vendor, expected, set_backend, monkeypatch):
    monkeypatch.setattr(engines, "_cpu_vendor", lambda: vendor)
    set_backend("auto")
    assert lm.cpu_matmul_backend() == (expected if engines.onednn_available() else "blas")


def test_unknown_backends_are_rejected(set_backend, monkeypatch):
    with pytest.raises(ValueError, match="unknown CPU matmul backend 'mkl'"):
        set_backend("mkl")
    monkeypatch.setenv(engines.CPU_MATMUL_ENV, "fast")
    with pytest.raises(ValueError, match=r"\$LOWRANK_MERGE_CPU_MATMUL is 'fast'"):
        engines.default_cpu_matmul_backend()
    if lm.extension_available():
        with pytest.raises(RuntimeError, match="unknown CPU matmul backend 'mkl'"):
            torch.ops.lowrank_merge._set_cpu_matmul_backend("mkl")


@requires_onednn
@pytest.mark.parametrize("backend", engines.CPU_MATMUL_BACKENDS)
def test_the_environment_variable_sets_the_backend_at_import(backend):
    env = {**os.environ, engines.CPU_MATMUL_ENV: backend.upper()}
    code = "import lowrank_merge as lm; print(lm.cpu_matmul_backend())"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split()[-1] == backend
