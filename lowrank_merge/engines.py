"""Top-k SVD engines in pure torch, and the per-layer CART kernel built on them.

This module is the pure-torch twin of the C++ ops in ``csrc/``: the same
algorithms, step for step, so that the two paths agree to rounding. Every
function takes a batch of matrices ``A`` of shape ``[..., m, n]`` (the leading
dimension is the T tasks of one layer) and works on all of them at once.

Engines (``svd=`` everywhere in the library):

* ``"exact"``: thin ``torch.linalg.svd`` and truncation. The reference path.
* ``"randomized"``: randomized subspace iteration (Halko, Martinsson & Tropp
  2011, Alg. 4.4): a Gaussian sketch of width ``k + oversample``, ``niter``
  power iterations with re-orthonormalisation, then a small SVD.
* ``"krylov"``: randomized block Krylov iteration (Musco & Musco 2015): the
  same passes over ``A``, but the SVD is taken on the whole Krylov space
  ``[AΩ, (AAᵀ)AΩ, …]``, which is markedly more accurate for the same passes.
* ``"gram"``: eigendecomposition of the smaller Gram matrix ``AAᵀ`` or
  ``AᵀA``, then a small SVD of the projection. Exact up to the squared
  condition number; cheap when one side of ``A`` is small.

The randomized engines take the Gaussian test matrix ``omega`` ``[n, l]`` from
the caller. One ``omega`` is shared by the T tasks of a layer, which makes every
engine odd-symmetric (``f(-A) = -f(A)``): with T = 2 the centered task vectors
are opposite and their reconstructions cancel, as they must.
"""

from __future__ import annotations

import torch
from torch import Tensor

ENGINES = ("exact", "randomized", "krylov", "gram")
SKETCH_ENGINES = ("randomized", "krylov")


def sketch_width(k: int, oversample: int, m: int, n: int) -> int:
    """Columns ``k + oversample`` of the Gaussian test matrix, never wider than the matrix.

    (Block Krylov needs little or no oversampling: its extra power blocks
    already widen the space; its default ``oversample`` is 0.)
    """
    return max(1, min(k + oversample, m, n))


def gaussian_sketch(n: int, width: int, seed: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """The shared Gaussian test matrix ``Ω`` of shape ``[n, width]``.

    Drawn on the CPU from a generator seeded with ``seed`` and then moved, so a
    seed gives the same ``Ω`` (and the same merge) on every device and does not
    depend on the order in which layers are visited.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, width, generator=generator, dtype=torch.float64)
    return omega.to(device=device, dtype=dtype)


def _orthonormal_basis(Y: Tensor) -> Tensor:
    """An orthonormal basis ``Q`` ``[..., m, l]`` of the columns of ``Y``."""
    return torch.linalg.qr(Y, mode="reduced").Q


def _truncated_svd_of_projection(Q: Tensor, A: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k SVD of ``Q Qᵀ A`` for an orthonormal ``Q`` ``[..., m, l]``."""
    small = Q.mT @ A  # [..., l, n]
    U_small, S, Vh = torch.linalg.svd(small, full_matrices=False)
    return Q @ U_small[..., :k], S[..., :k].contiguous(), Vh[..., :k, :].contiguous()


def exact_svd(A: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return U[..., :k].contiguous(), S[..., :k].contiguous(), Vh[..., :k, :].contiguous()


def randomized_svd(A: Tensor, k: int, omega: Tensor, niter: int) -> tuple[Tensor, Tensor, Tensor]:
    Q = _orthonormal_basis(A @ omega)
    for _ in range(niter):
        Q = _orthonormal_basis(A @ _orthonormal_basis(A.mT @ Q))
    return _truncated_svd_of_projection(Q, A, k)


def krylov_svd(A: Tensor, k: int, omega: Tensor, niter: int) -> tuple[Tensor, Tensor, Tensor]:
    block = _orthonormal_basis(A @ omega)
    blocks = [block]
    for _ in range(niter):
        # Orthonormalising each block keeps its span and the iteration stable.
        block = _orthonormal_basis(A @ (A.mT @ block))
        blocks.append(block)
    Q = _orthonormal_basis(torch.cat(blocks, dim=-1))
    return _truncated_svd_of_projection(Q, A, k)


def gram_svd(A: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    m, n = A.shape[-2:]
    if m <= n:
        _, eigenvectors = torch.linalg.eigh(A @ A.mT)  # ascending eigenvalues
        return _truncated_svd_of_projection(eigenvectors[..., -k:], A, k)
    U, S, Vh = gram_svd(A.mT, k)
    return Vh.mT.contiguous(), S, U.mT.contiguous()


def low_rank_factors(
    A: Tensor, k: int, engine: str, niter: int, omega: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k factors ``U [..., m, k], S [..., k], Vh [..., k, n]`` of ``A``.

    ``omega`` is required by the sketch engines and ignored by the others.
    Inputs are assumed validated (see ``lowrank_merge.api``).
    """
    if engine == "exact":
        return exact_svd(A, k)
    if engine == "gram":
        return gram_svd(A, k)
    if omega is None or omega.shape[-1] < k:
        raise ValueError(f"svd engine {engine!r} needs a sketch matrix omega with at least k = {k} columns")
    if engine == "randomized":
        return randomized_svd(A, k, omega, niter)
    if engine == "krylov":
        return krylov_svd(A, k, omega, niter)
    raise ValueError(f"unknown svd engine {engine!r}; choose one of {ENGINES}")


def average_and_center(stack: Tensor) -> tuple[Tensor, Tensor]:
    """Average ``[m, n]`` and centered stack ``[T, m, n]`` of a task stack."""
    average = stack.mean(dim=0)
    return average, stack - average


def sum_of_reconstructions(U: Tensor, S: Tensor, Vh: Tensor) -> Tensor:
    """``Σ_t U_t diag(S_t) Vh_t`` as one product of concatenated factors.

    ``U [T, m, k], S [T, k], Vh [T, k, n]`` -> ``[m, n]``.
    """
    T, m, k = U.shape
    left = (U * S.unsqueeze(-2)).transpose(0, 1).reshape(m, T * k)
    right = Vh.reshape(T * k, Vh.shape[-1])
    return left @ right


def centered_low_rank_sum(
    stack: Tensor, k: int, engine: str, niter: int, omega: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The two parts of a CART layer: ``(θ_avg, Σ_t SVD_k(θ_t − θ_avg))``.

    ``stack`` is ``[T, m, n]`` in the compute dtype; both results are ``[m, n]``.
    The merged layer is ``average + scale * delta``.
    """
    average, centered = average_and_center(stack)
    U, S, Vh = low_rank_factors(centered, k, engine, niter, omega)
    return average, sum_of_reconstructions(U, S, Vh)
