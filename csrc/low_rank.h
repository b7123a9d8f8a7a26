// Device-generic ATen implementations of the per-layer ops.
//
// These mirror lowrank_merge/engines.py step for step, so that the C++ and the
// pure-torch paths agree to rounding. They are written with ATen calls only and
// therefore run on any device; device-specific kernels (the fused centering on
// CPU, csrc/cuda/ on GPU) plug in around them.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace lowrank_merge {

using Factors = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// An orthonormal basis Q [..., m, min(m, p)] of the columns of Y [..., m, p]
// by Householder QR (at::linalg_qr, "reduced"): the CPU's orthonormaliser.
at::Tensor householder_orthonormal_basis(const at::Tensor& Y);

// A basis [..., m, p] of the columns of Y [..., m, p] (m >= p) for the power
// steps of the sketch engines, which need the span of each iterate and a basis
// well conditioned enough to multiply with, not an orthonormal one: P L from
// Y = P L U (LU with partial pivoting; L is unit lower trapezoidal, |L_ij| <= 1,
// so P L has full column rank even where Y has not), as in Halko et al.'s fbpca.
// Three to eight times faster than Householder QR on the CPU (benchmarks/NOTES.md).
// Wider Y (p > m) gets householder_orthonormal_basis's [m, m] basis.
at::Tensor lu_iteration_basis(const at::Tensor& Y);

// lu_iteration_basis(Y) and the upper triangular R [..., p, p] with Y = basis R
// (U of the LU factorisation; it has zero pivots where Y is rank deficient). A
// wider Y gets Householder QR's Q and R [..., m, p].
std::tuple<at::Tensor, at::Tensor> lu_iteration_basis_and_factor(const at::Tensor& Y);

// left @ right [..., m, p] laid out column-major (its transpose contiguous),
// computed as (right^T left^T)^T: the layout in which LAPACK factorises (LU,
// QR) without first copying. The sketch engines' iterates are made this way.
at::Tensor column_major_product(const at::Tensor& left, const at::Tensor& right);

// X^T X [..., c, c] for X [..., r, c], exactly symmetric, in about (B + 1) / 2B
// of the flops of the plain product (its block lower triangle in B column blocks).
at::Tensor gram_matrix(const at::Tensor& X);

// Top-k factors of Q Q^T A for an orthonormal Q [..., m, l], from the float64
// eigendecomposition of the l x l Gram matrix of B = Q^T A (defined in
// batched_steps.cpp): the last step of the engines on every device. It replaced
// LAPACK's dense SVD of B on the CPU: 0.65 against 1.65 s for B [8, 337, 14336],
// 0.24 against 1.12 s for [8, 337, 4096] (benchmarks/NOTES.md, 2026-12-02).
Factors gram_eigh_svd_of_projection(const at::Tensor& Q, const at::Tensor& A, int64_t k);

// The steps of the engines that a device may run its own way. The engines
// themselves (which products, how many passes, in what order) stay shared, so a
// device differs from the CPU only in these functions. The defaults are what
// the CPU runs; csrc/cuda/ passes CholeskyQR2 for both bases.
struct EngineSteps {
  // Y [..., m, p] -> an orthonormal basis Q [..., m, min(m, p)] of its columns:
  // the last basis of an iteration, on which the small SVD projects.
  at::Tensor (*orthonormal_basis)(const at::Tensor& Y) = householder_orthonormal_basis;
  // Y [..., m, p] -> a well-conditioned basis of its columns for the steps before.
  at::Tensor (*iteration_basis)(const at::Tensor& Y) = lu_iteration_basis;
  // The same basis B and the upper triangular R [..., p, p] with Y = B R, for the
  // filtered iteration of gram_subspace and chebyshev (p <= m there).
  std::tuple<at::Tensor, at::Tensor> (*iteration_basis_and_factor)(const at::Tensor& Y) =
      lu_iteration_basis_and_factor;
  // (Q [..., m, l] orthonormal, A [..., m, n], k) -> top-k factors of Q Q^T A.
  Factors (*truncated_svd_of_projection)(const at::Tensor& Q, const at::Tensor& A, int64_t k) =
      gram_eigh_svd_of_projection;
};

// Top-k factors U [..., m, k], S [..., k], Vh [..., k, n] of A [..., m, n].
// engine: "exact", "randomized", "krylov", "gram", "gram_subspace" or "chebyshev";
// omega [n, l] is the shared Gaussian sketch needed by the four sketch engines. steps: see EngineSteps.
Factors low_rank_factors_generic(
    const at::Tensor& A, int64_t k, const std::string& engine, int64_t niter,
    const std::optional<at::Tensor>& omega, const EngineSteps& steps = EngineSteps{});

// Sum over t of U_t diag(S_t) Vh_t as one product of concatenated factors:
// U [T, m, k], S [T, k], Vh [T, k, n] -> [m, n].
at::Tensor sum_of_reconstructions(const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh);

// Argument checks shared by every device's kernels; they raise c10::Error
// (a RuntimeError in Python) with a message that says what is wrong.
void check_factor_args(
    const at::Tensor& A, int64_t k, const std::string& engine, int64_t niter,
    const std::optional<at::Tensor>& omega);

}  // namespace lowrank_merge
