"""Top-k SVD engines in pure torch, and the per-layer CART kernel built on them.

This module is the pure-torch twin of the C++ ops in ``csrc/``: the same
algorithms, step for step, so that the two paths agree to rounding. Every
function takes a batch of matrices ``A`` of shape ``[..., m, n]`` (the leading
dimension is the T tasks of one layer) and works on all of them at once.

Engines (``svd=`` everywhere in the library):

* ``"exact"``: thin ``torch.linalg.svd`` and truncation. The reference path.
* ``"randomized"``: randomized subspace iteration (Halko, Martinsson & Tropp
  2011, Alg. 4.4): a Gaussian sketch of width ``k + oversample`` (rounded up
  to a multiple of 8, see :func:`sketch_width`), ``niter``
  power iterations, then a small SVD.
* ``"krylov"``: randomized block Krylov iteration (Musco & Musco 2015): the
  same passes over ``A``, but the SVD is taken on the whole Krylov space
  ``[AΩ, (AAᵀ)AΩ, …]``, which is markedly more accurate for the same passes.
* ``"gram"``: eigendecomposition of the smaller Gram matrix ``AAᵀ`` or
  ``AᵀA``, then a small SVD of the projection. Exact up to the squared
  condition number; cheap when one side of ``A`` is small.
* ``"gram_subspace"``: Chebyshev-filtered subspace iteration on that Gram
  matrix ``G`` (``s × s``, ``s = min(m, n)``) from the sketch, then
  Rayleigh–Ritz in float64. After the one product that forms ``G``, an
  iteration costs ``2 s² l`` instead of the ``4 m n l`` of a power iteration on
  ``A``, and the filter (:func:`chebyshev_filtered_iterate`) converges about
  twice as fast per product as powers of ``G``, so the top-k subspace is as
  accurate as the dense SVD's on slowly decaying spectra after a few
  iterations, at a fraction of the ``gram`` engine's dense ``eigh``.
* ``"chebyshev"``: the same filtered iteration on ``G = A Aᵀ`` without forming
  ``G`` (each product ``A (Aᵀ X)``), from ``A Ω``, then ``randomized``'s small
  SVD. It suits shapes where forming ``G`` costs more than the iterations (low
  ranks of large matrices), and needs fewer passes over ``A`` than
  ``randomized`` for the same accuracy.

The sketch engines' power steps keep each iterate's span with an LU basis
(``P L`` of ``Y = P L U``, cheaper than QR and as good for the iteration), and
only the last basis, on which the small SVD projects, is orthonormalised by
Householder QR, here and in the C++ CPU kernels; the CUDA kernels use
CholeskyQR2 for both (the same spans, so the results agree to rounding; the
filter's Ritz values and re-based recurrence do not depend on the basis either).

Their large float32 products on the CPU go through :func:`matrix_product`,
which runs them with oneDNN or the BLAS (:data:`CPU_MATMUL_BACKENDS`).

The randomized engines take the Gaussian test matrix ``omega`` ``[n, l]`` from
the caller. One ``omega`` is shared by the T tasks of a layer, which makes every
engine odd-symmetric (``f(-A) = -f(A)``): with T = 2 the centered task vectors
are opposite and their reconstructions cancel, as they must.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Callable

import torch
from torch import Tensor

ENGINES = ("exact", "randomized", "krylov", "gram", "gram_subspace", "chebyshev")
SKETCH_ENGINES = ("randomized", "krylov", "gram_subspace", "chebyshev")


#: Sketch widths are rounded up to a multiple of this. BLAS runs the skinny
#: products of the sketch engines much faster at such widths (MKL, 2-core AMD
#: EPYC: ``A·Q`` on [2, 4096, 14336] 698 ms at 337 columns, 449 ms at 344;
#: ``G·X`` on [2, 4096, 4096] 258 ms at 490, 179 ms at 496; benchmarks/NOTES.md),
#: and the extra columns only add oversampling.
SKETCH_WIDTH_MULTIPLE = 8


def sketch_width(k: int, oversample: int, m: int, n: int) -> int:
    """Columns of the Gaussian test matrix: ``k + oversample`` rounded up to a
    multiple of :data:`SKETCH_WIDTH_MULTIPLE`, never wider than the matrix.

    (Block Krylov needs little or no oversampling: its extra power blocks
    already widen the space; its default ``oversample`` is 0.)
    """
    wanted = k + oversample
    aligned = -(-wanted // SKETCH_WIDTH_MULTIPLE) * SKETCH_WIDTH_MULTIPLE
    return max(1, min(aligned, m, n))


#: How many GEMM flops one flop of a factorisation (QR, a dense SVD or eigh)
#: costs in time: Householder QR of the [8, 768, 91] blocks of a ViT-B layer
#: runs at ~27 GFLOP/s against ~190 for the skinny GEMMs beside it on the
#: 2-core CPU (benchmarks/NOTES.md, 2026-12-02).
FACTORIZATION_WEIGHT = 8.0
#: The same for the skinny products ``A·Q`` (``l`` ≪ ``n`` columns) of the sketch
#: engines against the large products that form a Gram matrix. Refitted after
#: the power steps moved to LU bases (which made ``randomized``'s products the
#: bulk of its cost), on the 2-core Intel VM (2026-12-02, third session): 1.5
#: picks the faster of the two accurate engines in 10 of 11 measured cases
#: (ViT-B shapes at 2 % and 8 %, 1024², 4096², 4096 × 14336), the miss 7 %
#: apart; 1.3 (fitted on the AMD VM before the LU change) missed 4, 1.6 missed 2.
SKINNY_PRODUCT_WEIGHT = 1.5


def _flop_parts(engine: str, m: int, n: int, k: int, niter: int, width: int) -> tuple[float, float]:
    """(matrix-product flops, factorisation flops) of one task, leading terms."""
    s, mn, l = min(m, n), m * n, width
    if engine == "exact":
        return 0.0, 4.0 * mn * s + 8.0 * s**3
    gram = mn * s * (gram_blocks(s) + 1) / gram_blocks(s)  # gram_matrix's lower triangle
    if engine == "gram":
        return gram + 2.0 * mn * k, 9.0 * s**3
    # Factorisations: an LU iteration basis of r rows r·l², the final QR (factor
    # and form Q) 4·r·l², a dense eigh 9·l³ (and the small SVD's float64 Gram 4·n·l²).
    if engine == "gram_subspace":
        # The filter: per iteration an LU basis (s·l²) and a re-basing product
        # (2·s·l²); once, the cut's two [l, l] products and its small eigvalsh.
        filter_products = 4.0 * s * l * l + 2.0 * s * l * l * max(niter - 1, 0)
        products = gram + 2.0 * s * s * l * (niter + 2) + filter_products + 2.0 * mn * k
        return products, s * l * l * niter + 4.0 * s * l * l + 18.0 * l**3
    products_with_a = 2.0 * mn * l * (1 + 2 * niter)
    if engine == "chebyshev":
        # The same filter on the m side, without a basis between Aᵀ B and A (Aᵀ B).
        filter_products = 4.0 * m * l * l + 2.0 * m * l * l * max(niter - 1, 0)
        products = products_with_a + 2.0 * mn * l + filter_products + 4.0 * n * l * l
        return products, m * l * l * niter + 4.0 * m * l * l + 40.0 * l**3
    if engine == "krylov":
        basis = l * (niter + 1)
        bases = m * l * l * (niter + 1) + 4.0 * m * basis**2
    else:
        basis = l
        bases = (m + n) * l * l * niter + 4.0 * m * l * l
    return products_with_a + 2.0 * mn * basis, bases + 4.0 * n * basis**2 + 22.0 * basis**3


def engine_flops(engine: str, m: int, n: int, k: int, niter: int, width: int) -> float:
    """Floating-point operations of one task's ``[m, n]`` top-k decomposition by
    ``engine``, leading terms (products, QR at ``4·rows·cols²``, dense
    decompositions at textbook counts). An estimate for planning, not a measurement."""
    return sum(_flop_parts(engine, m, n, k, niter, width))


def engine_cost(engine: str, m: int, n: int, k: int, niter: int, width: int) -> float:
    """:func:`engine_flops` in large-GEMM-flop equivalents (a time model):
    factorisations weighted by ``FACTORIZATION_WEIGHT``, the sketch engines'
    skinny products by ``SKINNY_PRODUCT_WEIGHT``. What ``svd="auto"`` minimises."""
    products, factorizations = _flop_parts(engine, m, n, k, niter, width)
    if engine in ("randomized", "krylov", "chebyshev"):
        products *= SKINNY_PRODUCT_WEIGHT
    return products + FACTORIZATION_WEIGHT * factorizations


def gaussian_sketch(n: int, width: int, seed: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """The shared Gaussian test matrix ``Ω`` of shape ``[n, width]``.

    Drawn on the CPU from a generator seeded with ``seed`` and then moved, so a
    seed gives the same ``Ω`` (and the same merge) on every device and does not
    depend on the order in which layers are visited.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, width, generator=generator, dtype=torch.float64)
    return omega.to(device=device, dtype=dtype)


#: The libraries that can run the engines' float32 CPU products (``csrc/cpu_matmul.h``):
#: ``"blas"`` is torch's matmul (MKL in the x86 wheels), ``"onednn"`` torch's
#: oneDNN inner product (the kernel behind ``nn.Linear``). MKL picks its
#: fastest kernels on Intel CPUs only; on the 2-core AMD EPYC (Zen 4) VM oneDNN
#: ran the engines' products 18-45 % faster (benchmarks/NOTES.md).
CPU_MATMUL_BACKENDS = ("blas", "onednn")
#: The environment variable that sets the backend at import: one of
#: :data:`CPU_MATMUL_BACKENDS`, or ``"auto"`` (the default: oneDNN on AMD CPUs,
#: the BLAS elsewhere).
CPU_MATMUL_ENV = "LOWRANK_MERGE_CPU_MATMUL"
#: Smaller products stay on the BLAS: oneDNN's ~20 µs per call loses below
#: about this many multiply-adds per matrix (AMD VM: [8, 256, 256] @ [8, 256, 32]
#: 0.20 ms BLAS, 0.32 ms oneDNN; [8, 768, 768] @ [8, 768, 32] 2.2 against 1.7 ms).
ONEDNN_MIN_MULTIPLY_ADDS = 1 << 23

_onednn_products = False


def onednn_available() -> bool:
    """Whether this torch has oneDNN's inner product kernel on the CPU."""
    try:
        return torch.backends.mkldnn.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
            "mkldnn::_linear_pointwise", "CPU"
        )
    except RuntimeError:  # no such op in this build
        return False


def _cpu_vendor() -> str:
    """The CPU's vendor string (``"AuthenticAMD"``, ``"GenuineIntel"``), or ``""``
    where ``/proc/cpuinfo`` does not say."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def default_cpu_matmul_backend() -> str:
    """``$LOWRANK_MERGE_CPU_MATMUL``, or ``"auto"`` where it is unset."""
    wanted = os.environ.get(CPU_MATMUL_ENV, "auto").strip().lower()
    if wanted != "auto" and wanted not in CPU_MATMUL_BACKENDS:
        raise ValueError(f"${CPU_MATMUL_ENV} is {wanted!r}; choose 'auto' or one of {CPU_MATMUL_BACKENDS}")
    return wanted


def _set_cpu_matmul_backend(name: str) -> None:
    """This module's half of ``lowrank_merge.set_cpu_matmul_backend``: ``"auto"``
    is oneDNN on AMD CPUs where torch has it, the BLAS elsewhere."""
    if name == "auto":
        name = "onednn" if _cpu_vendor() == "AuthenticAMD" and onednn_available() else "blas"
    if name not in CPU_MATMUL_BACKENDS:
        raise ValueError(f"unknown CPU matmul backend {name!r}; choose 'auto' or one of {CPU_MATMUL_BACKENDS}")
    if name == "onednn" and not onednn_available():
        raise ValueError("this torch build has no oneDNN inner product on the CPU; use the 'blas' backend")
    global _onednn_products
    _onednn_products = name == "onednn"


def cpu_matmul_backend() -> str:
    """The library that runs the engines' float32 CPU products: ``"blas"`` or ``"onednn"``."""
    return "onednn" if _onednn_products else "blas"


def _onednn_product(left: Tensor, right: Tensor) -> Tensor:
    """``left @ right`` for 2-D float32 CPU tensors by oneDNN's inner product
    (``X Wᵀ`` with ``W = rightᵀ``, read through its strides; ``left`` is copied
    unless contiguous)."""
    return torch.ops.mkldnn._linear_pointwise(left, right.mT, None, "none", [], None)


def _rows_contiguous(t: Tensor) -> bool:
    """Whether each matrix of ``t [..., m, k]`` is row-major and dense."""
    return t.stride(-1) == 1 and (t.shape[-2] <= 1 or t.stride(-2) == t.shape[-1])


def matrix_product(left: Tensor, right: Tensor) -> Tensor:
    """``left [..., m, k] @ right [..., k, n]`` (batch dimensions broadcast), row-major.

    Through oneDNN where the backend is ``"onednn"``, both are float32 CPU tensors,
    a matrix product has at least :data:`ONEDNN_MIN_MULTIPLY_ADDS` multiply-adds,
    ``right``'s matrices are dense and column-major and ``left`` is
    row-major or smaller than ``right`` (then copied once; one call per matrix
    of the batch); ``@`` otherwise. The twin of
    ``matrix_product`` in csrc/cpu_matmul.cpp.
    """
    wants_grad = torch.is_grad_enabled() and (left.requires_grad or right.requires_grad)  # oneDNN's op has none
    float32_cpu = left.device.type == "cpu" and left.dtype == right.dtype == torch.float32
    if not (_onednn_products and float32_cpu) or left.dim() < 2 or right.dim() < 2 or wants_grad:
        return left @ right
    m, k = left.shape[-2:]
    n = right.shape[-1]
    if m * k * n < ONEDNN_MIN_MULTIPLY_ADDS:
        return left @ right
    if not _rows_contiguous(right.mT):
        # oneDNN's fast kernels read a weight (rightᵀ) that is dense and
        # row-major: a column block of a matrix ran ~1000x slower, and a
        # column-major weight (a row-major ``right``: the projection Qᵀ A, the
        # reconstruction) 1.2-3x slower than the BLAS (benchmarks/NOTES.md,
        # 2026-12-03, sixth session).
        return left @ right
    if not _rows_contiguous(left):
        # oneDNN would copy it: worth it for a sketch or a basis beside a stack,
        # not for a stack's transpose (memory), which the BLAS reads in place.
        if left.numel() >= right.numel():
            return left @ right
        left = left.contiguous()
    if left.dim() == 2 and right.dim() == 2:
        return _onednn_product(left, right)
    batch = torch.broadcast_shapes(left.shape[:-2], right.shape[:-2])
    lefts = left.expand(*batch, m, k).reshape(-1, m, k)
    rights = right.expand(*batch, k, n).reshape(-1, k, n)
    result = left.new_empty(*batch, m, n)
    for result_matrix, left_matrix, right_matrix in zip(result.view(-1, m, n), lefts, rights):
        result_matrix.copy_(_onednn_product(left_matrix, right_matrix))
    return result


def _orthonormal_basis(Y: Tensor) -> Tensor:
    """An orthonormal basis ``Q`` ``[..., m, l]`` of the columns of ``Y``."""
    return torch.linalg.qr(Y, mode="reduced").Q


def _rows_of_interchanges(pivots: Tensor, m: int) -> Tensor:
    """``rows[b, i]``: the row of ``Y`` that row ``i`` of ``L U`` came from, for
    LAPACK's 1-based interchanges ``pivots [B, p]`` (row ``i`` swapped with row
    ``pivots[i] - 1``, for ``i = 0 … p - 1`` in order). ``[B, m]`` int64."""
    rows = []
    for swap_with in pivots.tolist():
        row_of = list(range(m))
        for i, j in enumerate(swap_with):
            if not 1 <= j <= m:  # e.g. torch 2.13's batched CPU LU on some shapes (benchmarks/NOTES.md)
                raise RuntimeError(
                    f"lowrank_merge: the LU factorisation of an iterate returned the row interchange {j} "
                    f"outside [1, {m}]: a fault of the LAPACK call (please report the layer's shape)"
                )
            row_of[i], row_of[j - 1] = row_of[j - 1], row_of[i]
        rows.append(row_of)
    return torch.tensor(rows, dtype=torch.int64, device=pivots.device).reshape(len(rows), m)


def _iteration_basis_and_factor(Y: Tensor) -> tuple[Tensor, Tensor]:
    """A basis ``B [..., m, p]`` of the columns of ``Y [..., m, p]`` for the power
    steps of the sketch engines, and the upper triangular ``R [..., p, p]`` with
    ``Y = B R``. The steps need each iterate's span and a well-conditioned basis,
    not an orthonormal one: ``B = P L`` and ``R = U`` from ``Y = P L U`` (LU with
    partial pivoting; ``L`` is unit lower trapezoidal with ``|L_ij| ≤ 1``, so
    ``P L`` has full column rank even where ``Y`` has not; ``U`` then has zero
    pivots), as in Halko et al.'s fbpca. 3-8x faster than Householder QR on the
    CPU (benchmarks/NOTES.md). A wider ``Y`` (``p > m``) gets the orthonormal
    ``[m, m]`` basis of Householder QR, and its ``R [..., m, p]``."""
    m, p = Y.shape[-2:]
    if p > m or p == 0:
        return torch.linalg.qr(Y, mode="reduced")
    Yb = Y.reshape(-1, m, p)
    # One matrix at a time: torch 2.13's batched CPU LU returned out-of-range
    # pivots for random [2 or 4, 4096, 1536] and [4, 2048, 1536] batches
    # (benchmarks/NOTES.md). No error checks: a zero pivot (Y rank deficient)
    # leaves a zero column below L's unit diagonal, and P L keeps full rank.
    factorizations = [torch.linalg.lu_factor_ex(matrix) for matrix in Yb]
    pivots = torch.stack([matrix_pivots for _, matrix_pivots, _ in factorizations])
    # Each LU is column-major, so Lᵀ [p, m] is its contiguous side: L's rows are
    # permuted as Lᵀ's columns. Lᵀ and U are taken from each LU directly.
    Lt = torch.stack([lu.mT.triu(1) for lu, _, _ in factorizations])
    Lt.diagonal(dim1=-2, dim2=-1).fill_(1)
    factor = torch.stack([lu[:p].triu() for lu, _, _ in factorizations])
    rows = _rows_of_interchanges(pivots, m)  # L's row i is row rows[i] of P L
    basis_t = torch.empty_like(Lt).scatter_(-1, rows.unsqueeze(-2).expand(-1, p, -1), Lt)
    return basis_t.mT.reshape(Y.shape), factor.reshape(*Y.shape[:-2], p, p)


def _iteration_basis(Y: Tensor) -> Tensor:
    """The basis of :func:`_iteration_basis_and_factor`, without its factor."""
    return _iteration_basis_and_factor(Y)[0]


def _column_major_product(left: Tensor, right: Tensor) -> Tensor:
    """``left @ right`` laid out column-major (its transpose contiguous), computed
    as ``(rightᵀ leftᵀ)ᵀ``: the layout in which LAPACK factorises (LU, QR)
    without first copying. The sketch engines' iterates are made this way; for
    ``Aᵀ B`` with a row-major ``A`` it is also the faster product (the BLAS
    reads ``A`` row-major: 25-45 % faster on the ViT-B and 1024² shapes)."""
    return matrix_product(right.mT, left.mT).mT


def _truncated_svd_of_projection(Q: Tensor, A: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k SVD of ``Q Qᵀ A`` for an orthonormal ``Q`` ``[..., m, l]``, through the
    float64 eigendecomposition of the ``l × l`` Gram matrix of ``B = Qᵀ A``
    (see ``gram_eigh_svd_of_projection`` in csrc/batched_steps.cpp): ``S`` are the
    row norms of ``W_kᵀ B``, sorted; rows with ``S = 0`` give zero rows of ``Vh``."""
    small = matrix_product(Q.mT, A).double()  # [..., l, n]
    W = torch.linalg.eigh(small @ small.mT).eigenvectors[..., -k:].flip(-1)  # the top k, descending
    P = W.mT @ small  # [..., k, n]
    S, W, P = _sort_by_descending_values(torch.linalg.vector_norm(P, dim=-1), (W, -1), (P, -2))
    Vh = P.div_(torch.where(S > 0, S, torch.ones_like(S)).unsqueeze(-1))  # P is this function's own
    return matrix_product(Q, W.to(A.dtype)), S.to(A.dtype).contiguous(), Vh.to(A.dtype).contiguous()


def _sort_by_descending_values(S: Tensor, *factors: tuple[Tensor, int]) -> tuple[Tensor, ...]:
    """``S [..., k]`` sorted descending, and each ``(factor, dim)`` reordered alike
    along its k axis (``dim`` -1 or -2). The factors arrive in their eigenvalues'
    descending order, which the norms ``S`` follow but for rounding among
    near-equal values, so the gathers run only when ``S`` is out of order
    (``sort_by_descending_values`` in csrc/batched_steps.cpp)."""
    k = S.shape[-1]
    if k < 2 or bool((S[..., :-1] >= S[..., 1:]).all()):
        return (S, *(factor for factor, _ in factors))
    S, order = S.sort(dim=-1, descending=True)
    return (S, *(torch.take_along_dim(f, order.unsqueeze(-2 if dim == -1 else -1), dim) for f, dim in factors))


def exact_svd(A: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return U[..., :k].contiguous(), S[..., :k].contiguous(), Vh[..., :k, :].contiguous()


def randomized_svd(A: Tensor, k: int, omega: Tensor, niter: int) -> tuple[Tensor, Tensor, Tensor]:
    Y = _column_major_product(A, omega)
    for _ in range(niter):
        Z = _column_major_product(A.mT, _iteration_basis(Y))
        Y = _column_major_product(A, _iteration_basis(Z))
    return _truncated_svd_of_projection(_orthonormal_basis(Y), A, k)


def krylov_svd(A: Tensor, k: int, omega: Tensor, niter: int) -> tuple[Tensor, Tensor, Tensor]:
    block = _iteration_basis(_column_major_product(A, omega))
    blocks = [block]
    for _ in range(niter):
        # A well-conditioned basis of each block keeps its span and the iteration
        # stable; the final basis of all blocks is orthonormalised.
        block = _iteration_basis(_column_major_product(A, _column_major_product(A.mT, block)))
        blocks.append(block)
    Q = _orthonormal_basis(torch.cat(blocks, dim=-1))
    return _truncated_svd_of_projection(Q, A, k)


def gram_svd(A: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    m, n = A.shape[-2:]
    if m <= n:
        _, eigenvectors = torch.linalg.eigh(gram_matrix(A.mT))  # A Aᵀ; ascending eigenvalues
        return _truncated_svd_of_projection(eigenvectors[..., -k:], A, k)
    U, S, Vh = gram_svd(A.mT, k)
    return Vh.mT.contiguous(), S, U.mT.contiguous()


#: ``gram_matrix`` halves ``X``'s columns until a diagonal block is at most this
#: wide. 256 measured best or near it for c = 768 … 4096 (benchmarks/NOTES.md).
GRAM_BLOCK_COLUMNS = 256


def gram_blocks(c: int) -> int:
    """How many diagonal blocks :func:`gram_matrix` forms for ``c`` columns (1: the plain product)."""
    blocks = 1
    while -(-c // blocks) > GRAM_BLOCK_COLUMNS:
        blocks *= 2
    return blocks


def gram_matrix(X: Tensor) -> Tensor:
    """``XᵀX`` ``[..., c, c]`` for ``X [..., r, c]``, exactly symmetric.

    Torch has no syrk, so the symmetry is used by hand, recursively: with the
    columns halved, ``G = [[G₁₁, G₂₁ᵀ], [G₂₁, G₂₂]]``, where ``G₂₁ = X₂ᵀX₁`` is one
    large product, ``G₁₁`` and ``G₂₂`` recurse down to blocks of at most
    ``GRAM_BLOCK_COLUMNS`` and the upper blocks are copies: about ``(B + 1) / 2B``
    of the full product's flops for B diagonal blocks (5/8 at c = 768, 17/32 at
    c = 4096). The off-diagonal products are as large as they can be, which the
    BLAS runs faster than the thin block rows of a one-level split
    ([8, 14336, 4096]: 15.0 s against 18.3 s, benchmarks/NOTES.md).
    """
    c = X.shape[-1]
    gram = X.new_empty(*X.shape[:-2], c, c)
    _fill_gram_block(X.mT, gram, 0, c)
    return gram


def _fill_gram_block(rows: Tensor, gram: Tensor, lo: int, hi: int) -> None:
    """Write the diagonal block ``gram[..., lo:hi, lo:hi]`` of ``XᵀX`` from
    ``rows = Xᵀ`` ``[..., c, r]`` (row ``i`` is column ``i`` of ``X``)."""
    if hi - lo <= GRAM_BLOCK_COLUMNS:
        gram[..., lo:hi, lo:hi] = matrix_product(rows[..., lo:hi, :], rows[..., lo:hi, :].mT)
        return
    mid = (lo + hi) // 2
    _fill_gram_block(rows, gram, lo, mid)
    _fill_gram_block(rows, gram, mid, hi)
    gram[..., mid:hi, lo:mid] = matrix_product(rows[..., mid:hi, :], rows[..., lo:mid, :].mT)
    gram[..., lo:mid, mid:hi] = gram[..., mid:hi, lo:mid].mT


def chebyshev_cut(basis: Tensor, product: Tensor, k: int) -> Tensor:
    """The cut ``b [..., 1, 1]`` of the Chebyshev filter (:func:`chebyshev_filtered_iterate`):
    the ``c``-th largest Ritz value of ``G`` on the span of ``basis [..., s, l]``,
    ``c = min(l, (k + l) // 2 + 1)``, from ``product = G · basis``.

    Ritz values are lower bounds (``θ_c ≤ λ_c``, by interlacing), so ``b`` lies
    below ``λ_k`` and the filter never damps the top k. With the basis not
    orthonormal (``P L``), they are the eigenvalues of the pencil
    ``(Bᵀ G B, Bᵀ B)``, through the Cholesky factor ``C`` of ``Bᵀ B``:
    ``eig(C⁻¹ Bᵀ G B C⁻ᵀ)``, in float64 (``l × l``). Only an estimate is needed,
    so the two ``[l, l]`` products stay in the input dtype. Where ``Bᵀ B`` is not
    numerically positive definite the cut is 0: plain power iteration.
    """
    l = basis.shape[-1]
    basis_gram = gram_matrix(basis).double()
    projected = matrix_product(basis.mT, product).double()
    factor, info = torch.linalg.cholesky_ex(basis_gram)
    usable = info == 0
    factor = torch.where(usable[..., None, None], factor, torch.eye(l, dtype=factor.dtype, device=factor.device))
    half = torch.linalg.solve_triangular(factor, projected, upper=False)  # C⁻¹ H
    pencil = torch.linalg.solve_triangular(factor, half.mT, upper=False)  # C⁻¹ Hᵀ C⁻ᵀ
    ritz = torch.linalg.eigvalsh((pencil + pencil.mT) * 0.5)  # ascending
    cut = ritz[..., l - min(l, (k + l) // 2 + 1)].clamp(min=0)
    cut = torch.where(usable & cut.isfinite(), cut, torch.zeros_like(cut))
    return cut.to(basis.dtype)[..., None, None]


def _triangular_inverse(R: Tensor) -> Tensor:
    """``R⁻¹`` of the upper triangular ``R [..., p, p]`` (the caller's own, changed),
    its diagonal entries of magnitude below ``ε · max |R_ii|`` first raised to
    that bound, so that the inverse stays finite where the iterate was rank
    deficient. Applied as a product: the ``[s, l]`` triangular solve it replaces
    ran at 15 GFLOP/s on ViT-B shapes (benchmarks/NOTES.md)."""
    diagonal = R.diagonal(dim1=-2, dim2=-1)
    bound = diagonal.abs().amax(dim=-1, keepdim=True) * torch.finfo(R.dtype).eps
    bound = torch.where(bound > 0, bound, torch.ones_like(bound))
    diagonal.copy_(torch.where(diagonal.abs() < bound, bound.expand_as(diagonal), diagonal))
    identity = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device).expand_as(R)
    return torch.linalg.solve_triangular(R, identity, upper=True)


def chebyshev_filtered_iterate(
    apply_gram: Callable[[Tensor], Tensor], start: Tensor, k: int, niter: int
) -> Tensor:
    """``niter`` filtered products with a symmetric positive semi-definite
    ``G [..., s, s]`` from ``start [..., s, l]``, where ``apply_gram(B)`` is
    ``G B``, column-major (``G`` itself, or ``A (Aᵀ B)`` without forming it):
    a column-major ``[..., s, l]`` block spanning ``p(G) · start`` for the
    degree-``niter`` Chebyshev polynomial ``p`` of the interval ``[0, b]``
    (``b``: :func:`chebyshev_cut`). Components with eigenvalues above ``b`` grow
    by ``T_j(2λ/b − 1)``, those in ``[0, b]`` stay bounded, so the top-k
    subspace converges about twice as fast per product as plain power
    iteration (``λ^j``), the special case ``b = 0``.

    The recurrence, scaled so that ``b = 0`` is that case and nothing is divided
    by ``b``: ``Z₁ = (G − b/2) Z₀``, ``Z₂ = (G − b/2) Z₁ − b²/8 · Z₀``,
    ``Z_{j+1} = (G − b/2) Z_j − b²/16 · Z_{j−1}``. Before each product ``Z_j`` is
    replaced by its basis ``Z_j R⁻¹`` and ``Z_{j−1}`` by ``Z_{j−1} R⁻¹`` (the same
    right factor, so the recurrence holds), which keeps the block well conditioned.
    The weights are applied as two factors, ``b²/8 = (b/4)(b/2)`` and
    ``b²/16 = (b/4)²``, never as ``b²``: that overflows float32 once
    ``b > 1.8e19`` (task vectors of magnitude ~1e9), where each factor and
    each product stay ~``b``.
    """
    if niter == 0:
        return start
    basis = _iteration_basis(start)
    current = apply_gram(basis)
    cut = chebyshev_cut(basis, current, k)
    half, quarter = cut / 2, cut / 4
    current.sub_(basis * half)
    previous, second_factor = basis, half
    for _ in range(niter - 1):
        basis, factor = _iteration_basis_and_factor(current)
        previous = _column_major_product(previous, _triangular_inverse(factor))
        current = apply_gram(basis)
        current.sub_(basis * half).sub_((previous * quarter).mul_(second_factor))
        previous, second_factor = basis, quarter
    return current


def gram_subspace_svd(A: Tensor, k: int, omega: Tensor, niter: int) -> tuple[Tensor, Tensor, Tensor]:
    """Chebyshev-filtered subspace iteration on the smaller Gram matrix, then
    Rayleigh–Ritz (see the module docstring and :func:`chebyshev_filtered_iterate`).

    ``omega`` is ``[n, l]``; the start is ``G Ω[:s]``, its first ``s`` rows (a
    Gaussian block too): cheaper than ``A Ω`` for a wide ``A`` and a step further
    into the top subspace (``G``'s spectrum is ``A``'s squared).
    """
    wide = A.shape[-2] <= A.shape[-1]  # a square A too: its rows are contiguous
    gram = gram_matrix(A.mT if wide else A)  # [..., s, s]
    X = _column_major_product(gram, omega[: gram.shape[-1]])
    X = chebyshev_filtered_iterate(partial(_column_major_product, gram), X, k, niter)
    X = _orthonormal_basis(X)
    X64 = X.double()
    ritz = X64.mT @ matrix_product(gram, X).double()  # [..., l, l]
    W = torch.linalg.eigh((ritz + ritz.mT) * 0.5).eigenvectors[..., -k:].flip(-1)  # the top k, descending
    E = (X64 @ W).to(A.dtype)  # top-k eigenvectors of the Gram matrix [..., s, k]
    other = matrix_product(E.mT, A) if wide else matrix_product(A, E)  # [..., k, n] or [..., m, k]
    S = torch.linalg.vector_norm(other, dim=-1 if wide else -2)
    S, E, other = _sort_by_descending_values(S, (E, -1), (other, -2 if wide else -1))
    safe_S = torch.where(S > 0, S, torch.ones_like(S))
    # other is this function's own product: normalised in place.
    if wide:
        return E.contiguous(), S.contiguous(), other.div_(safe_S.unsqueeze(-1)).contiguous()
    return other.div_(safe_S.unsqueeze(-2)).contiguous(), S.contiguous(), E.mT.contiguous()


def chebyshev_svd(A: Tensor, k: int, omega: Tensor, niter: int) -> tuple[Tensor, Tensor, Tensor]:
    """Chebyshev-filtered subspace iteration on ``G = A Aᵀ``, applied as
    ``A (Aᵀ B)`` without forming it, from ``A Ω``; then the small SVD of the
    projection, as ``randomized``. Each iteration costs ``randomized``'s two
    passes over ``A`` but converges about twice as fast; unlike ``randomized``
    it keeps no basis between ``Aᵀ B`` and ``A (Aᵀ B)``, so, as in
    ``gram_subspace``, the iteration sees ``A``'s squared spectrum."""
    X = chebyshev_filtered_iterate(
        lambda B: _column_major_product(A, _column_major_product(A.mT, B)), _column_major_product(A, omega), k, niter
    )
    return _truncated_svd_of_projection(_orthonormal_basis(X), A, k)


def check_op_arguments(
    A: Tensor, k: int, engine: str, niter: int, omega: Tensor | None, *, stack: bool = False
) -> None:
    """The ops' argument checks, for the twins and the ops' fake kernels: the
    C++ ops' errors (``RuntimeError``) and messages (``check_factor_args`` in
    csrc/low_rank.cpp). ``stack``: ``A`` must be a ``[T, m, n]`` stack."""
    if stack and A.dim() != 3:
        raise RuntimeError(f"lowrank_merge: expected a [T, m, n] stack, got {A.dim()} dims")
    if A.dim() < 2:
        raise RuntimeError(f"lowrank_merge: expected a [..., m, n] tensor, got {A.dim()} dims")
    if A.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"lowrank_merge: expected float32 or float64, got {A.dtype}")
    if not 1 <= k <= min(A.shape[-2:]):
        raise RuntimeError(f"lowrank_merge: k must be in [1, min(m, n)], got {k}")
    if niter < 0:
        raise RuntimeError(f"lowrank_merge: niter must be >= 0, got {niter}")
    if engine not in ENGINES:
        raise RuntimeError(f"lowrank_merge: unknown svd engine '{engine}'")
    if engine not in SKETCH_ENGINES:
        return
    if omega is None:
        raise RuntimeError(f"lowrank_merge: svd engine '{engine}' needs a sketch matrix omega")
    if omega.dim() != 2 or omega.shape[0] != A.shape[-1] or omega.shape[1] < k:
        raise RuntimeError(
            f"lowrank_merge: omega must be [n, l] with n = {A.shape[-1]} and l >= k = {k}, got {list(omega.shape)}"
        )
    if omega.dtype != A.dtype or omega.device != A.device:
        raise RuntimeError("lowrank_merge: omega must have A's dtype and device")


def empty_factors(A: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Uninitialised ``U [..., m, k], S [..., k], Vh [..., k, n]`` for ``A [..., m, n]``."""
    *batch, m, n = A.shape
    return A.new_empty(*batch, m, k), A.new_empty(*batch, k), A.new_empty(*batch, k, n)


def low_rank_factors(
    A: Tensor, k: int, engine: str, niter: int, omega: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k factors ``U [..., m, k], S [..., k], Vh [..., k, n]`` of ``A``.

    ``omega`` is required by the sketch engines and ignored by the others.
    """
    check_op_arguments(A, k, engine, niter, omega)
    return _checked_low_rank_factors(A, k, engine, niter, omega)


def _checked_low_rank_factors(
    A: Tensor, k: int, engine: str, niter: int, omega: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`low_rank_factors` for arguments already checked."""
    if A.numel() == 0:  # an empty batch: nothing to decompose
        return empty_factors(A, k)
    if engine == "exact":
        return exact_svd(A, k)
    if engine == "gram":
        return gram_svd(A, k)
    if engine == "randomized":
        return randomized_svd(A, k, omega, niter)
    if engine == "krylov":
        return krylov_svd(A, k, omega, niter)
    if engine == "gram_subspace":
        return gram_subspace_svd(A, k, omega, niter)
    return chebyshev_svd(A, k, omega, niter)


def task_average(stack: Tensor) -> Tensor:
    """``mean_t stack[t]`` ``[...]`` of a ``[T, ...]`` stack, as a sum divided by T.

    The same bits as ``stack.mean(dim=0)`` (checked for float32 and float64,
    T = 2 … 20), without mean's filled temporary: 0.12 against 0.41 s for
    [8, 4096, 14336] float32 on 2 cores (benchmarks/NOTES.md). The C++ CPU op's
    ``task_average`` is the same."""
    return stack.sum(dim=0).div_(stack.shape[0])


def sum_of_reconstructions(U: Tensor, S: Tensor, Vh: Tensor) -> Tensor:
    """``Σ_t U_t diag(S_t) Vh_t`` as one product of concatenated factors.

    ``U [T, m, k], S [T, k], Vh [T, k, n]`` -> ``[m, n]``.
    """
    T, m, k = U.shape
    left = (U * S.unsqueeze(-2)).transpose(0, 1).reshape(m, T * k)
    return matrix_product(left, Vh.reshape(T * k, Vh.shape[-1]))


def centered_low_rank_sum(
    stack: Tensor, k: int, engine: str, niter: int, omega: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The two parts of a CART layer: ``(θ_avg, Σ_t SVD_k(θ_t − θ_avg))``.

    ``stack`` is ``[T, m, n]`` in the compute dtype; both results are ``[m, n]``.
    The merged layer is ``average + scale * delta``.
    """
    check_op_arguments(stack, k, engine, niter, omega, stack=True)
    average = task_average(stack)
    if stack.shape[-2] * stack.shape[-1] >= PER_TASK_MIN_ELEMENTS:
        U, S, Vh = _factors_task_by_task(stack, average, k, engine, niter, omega)
    else:
        U, S, Vh = _checked_low_rank_factors(stack - average, k, engine, niter, omega)
    return average, sum_of_reconstructions(U, S, Vh)


#: :func:`centered_low_rank_sum` decomposes a stack whose matrices have at least
#: this many elements task by task, each task centered into one reused ``[m, n]``
#: buffer: no centered copy of the stack (``(T − 1) m n`` fewer elements in memory,
#: 1.6 GB for 8 × 4096 × 14336 float32, and none of that copy's first touches),
#: with the batched path's results (bit for bit where its batched products are
#: per-matrix ones, as under oneDNN). Smaller matrices are centered as one stack
#: and decomposed as one batch, whose calls cost less per matrix: on the ViT-B
#: shapes (2.4 M elements or fewer) task by task was 4–17 % slower, from
#: [8, 2048, 2048] up even or faster (benchmarks/NOTES.md). The twin of
#: ``kPerTaskMinElements`` in csrc/ops.cpp.
PER_TASK_MIN_ELEMENTS = 1 << 22


def _factors_task_by_task(
    stack: Tensor, average: Tensor, k: int, engine: str, niter: int, omega: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k factors ``[T, ...]`` of each centered task ``stack[t] − average``, one task at a time."""
    centered_task = torch.empty_like(average)
    per_task = []
    for task in stack:
        torch.sub(task, average, out=centered_task)
        per_task.append(_checked_low_rank_factors(centered_task, k, engine, niter, omega))
    U, S, Vh = (torch.stack(factor) for factor in zip(*per_task))
    return U, S, Vh
