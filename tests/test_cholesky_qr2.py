"""The batched CholeskyQR2 orthonormaliser (csrc/batched_steps.cpp, private op
``_cholesky_qr2``), on the CPU and, where there is one, on a CUDA GPU.

The CUDA path orthonormalises every sketch with it, and the gram_subspace engine
its iterations on every device. It must reproduce Householder's Q up to column
signs on well-conditioned input, return an orthonormal basis of the right span
on ill-conditioned, rank-deficient and zero input, and fall back to Householder
exactly where CholeskyQR2 cannot work.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from lowrank_merge import _ops

from conftest import conditioned, orthogonality_error, span_error


def _devices() -> list:
    devices = ["cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cuda_ready = torch.cuda.is_available() and _ops.has_kernel("cuda")
    return devices + (["cuda"] if cuda_ready else [])


pytestmark = pytest.mark.skipif(not _ops.extension_available(), reason="lowrank_merge._C is not built")

ops = torch.ops.lowrank_merge
DEVICES = _devices()
DTYPES = (torch.float32, torch.float64)
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}




@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_cholesky_qr2_is_householder_up_to_signs(dtype, device):
    Y = torch.randn(6, 500, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(9)).to(device, dtype)
    Q, fell_back = ops._cholesky_qr2(Y)
    assert Q.shape == Y.shape and fell_back.shape == (6,) and fell_back.dtype == torch.bool
    assert not fell_back.any()  # well conditioned: CholeskyQR2 itself did the work
    tol = 50 * EPS[dtype]
    assert orthogonality_error(Q) <= tol
    assert span_error(Q, Y) <= tol
    # CholeskyQR's R has a positive diagonal; Householder's Q equals it up to column signs.
    Q_householder = torch.linalg.qr(Y).Q
    signs = torch.sign((Q_householder * Q).sum(dim=-2, keepdim=True))
    assert (Q - Q_householder * signs).abs().max().item() <= 1e3 * EPS[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cond", [1e1, 1e2, 1e3, 1e5, 1e8, 1e12])
@pytest.mark.parametrize("device", DEVICES)
def test_cholesky_qr2_orthonormal_on_ill_conditioned_input(dtype, cond, device):
    Y = conditioned(4, 300, 30, cond, seed=10).to(device, dtype)
    Q, fell_back = ops._cholesky_qr2(Y)
    # Whichever path ran, Q is orthonormal and spans Y.
    assert orthogonality_error(Q) <= 50 * EPS[dtype]
    assert span_error(Q, Y) <= 50 * EPS[dtype]
    # Within its range it needs no fallback. With float64 Gram matrices that is
    # cond(Y) up to ~1e6 for float32 input (pass 1 loses u * cond) and ~7e7
    # (u^-1/2) for float64; asserted here with one to two decades to spare.
    if cond <= {torch.float32: 1e4, torch.float64: 1e6}[dtype]:
        assert not fell_back.any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_cholesky_qr2_falls_back_exactly_where_needed(dtype, device):
    generator = torch.Generator().manual_seed(11)
    good = torch.randn(200, 12, dtype=torch.float64, generator=generator)
    zero_column = good.clone()
    zero_column[:, 5] = 0
    repeated_column = good.clone()
    repeated_column[:, 7] = repeated_column[:, 2]
    Y = torch.stack([good, torch.zeros_like(good), zero_column, good * 3, repeated_column]).to(device, dtype)
    Q, fell_back = ops._cholesky_qr2(Y)
    # A zero column makes a Cholesky pivot exactly 0: those two always fall back.
    # A repeated column makes a pivot ~0 of either sign: it may fall back, or pass
    # 2 repairs it; either way Q must be an orthonormal basis holding Y's columns.
    assert fell_back[:4].tolist() == [False, True, True, False]
    assert orthogonality_error(Q) <= 50 * EPS[dtype]
    for index in (0, 2, 3, 4):
        assert span_error(Q[index], Y[index]) <= 50 * EPS[dtype]
    # A matrix's result does not depend on its batch mates.
    alone, _ = ops._cholesky_qr2(Y[:1])
    assert (alone[0] - Q[0]).abs().max().item() <= 100 * EPS[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_cholesky_qr2_shapes(device):
    generator = torch.Generator().manual_seed(12)
    # Any leading shape, and a plain matrix.
    Y = torch.randn(2, 3, 50, 7, generator=generator, dtype=torch.float64).to(device)
    Q, fell_back = ops._cholesky_qr2(Y)
    assert Q.shape == Y.shape and fell_back.shape == (2, 3)
    Q2, fell_back2 = ops._cholesky_qr2(Y[0, 0])
    assert Q2.shape == (50, 7) and fell_back2.shape == () and (Q2 - Q[0, 0]).abs().max().item() <= 1e-12
    # More columns than rows: Householder's [m, m] basis, reported as a fallback.
    wide = torch.randn(3, 10, 16, generator=generator, dtype=torch.float64).to(device)
    Q, fell_back = ops._cholesky_qr2(wide)
    assert Q.shape == (3, 10, 10) and fell_back.all()
    assert orthogonality_error(Q) <= 1e-13
