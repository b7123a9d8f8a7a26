#include "batched_steps.h"

#include <vector>

#include "cpu_matmul.h"

namespace lowrank_merge {
namespace {

// ||Q1^T Q1 - I||_F above this sends a matrix to the Householder fallback. With
// ||E||_2 <= ||E||_F <= 1/2, every eigenvalue of Q1^T Q1 lies in [1/2, 3/2], so
// cond(Q1)^2 <= 3, and the second CholeskyQR pass, whose loss of orthogonality
// grows with cond(Q1), returns Q orthonormal to working precision. (This tests
// the outcome of pass 1 instead of estimating cond(Y) beforehand.)
constexpr double kMaxDeparture = 0.5;

// [..., m, p] -> [B, m, p] (a view where possible), B >= 0 even for empty batches.
at::Tensor as_batch(const at::Tensor& Y) {
  return Y.dim() == 2 ? Y.unsqueeze(0) : Y.flatten(0, -3);
}

// X^T X in float64 for X [B, m, p] of float32 or float64: the products of
// float32 entries are exact in float64, and no TF32 setting applies. The
// symmetric gram_matrix: about 3/4 of the flops above p = 256 (on the CPU the float64
// products were half of CholeskyQR2's time at [8, 4096, 496]).
at::Tensor gram64(const at::Tensor& X) {
  return gram_matrix(X.to(at::kDouble));
}

}  // namespace

// CholeskyQR2 on a batch, without a loop over its matrices:
//
//   pass 1: G1 = Y^T Y,   R1 = chol(G1) (upper),  Q1 = Y R1^-1
//   pass 2: G2 = Q1^T Q1, R2 = chol(G2),          Q  = Q1 R2^-1
//
// Y^T Y and Q1^T Q1 are batched GEMMs (at::matmul on [B, m, p] -> strided-batched
// cuBLAS), the Cholesky factorisations one batched cuSOLVER call each
// (at::linalg_cholesky_ex, which reports failures in `info` instead of raising
// and therefore does not synchronise), and Y R^-1 a batched triangular solve
// (at::linalg_solve_triangular, right side). Q spans the columns of Y; it
// differs from Householder's Q only by the signs of its columns (R here has a
// positive diagonal), which changes no projection Q Q^T and therefore no result
// of the engines.
//
// Precision. The two Gram matrices and their Cholesky factors are computed in
// float64 also for float32 input ("mixed-precision CholeskyQR", Yamazaki, Tomov
// & Dongarra 2015); the triangular solves, which touch all m x p entries, stay
// in the input dtype. Plain float32 CholeskyQR squares the condition number in
// G1 and fails beyond cond(Y) ~ 4e3, and under TF32 (when the user allows it
// for matmuls) beyond ~30, which would send most sketches of real task vectors
// to the slow fallback. With float64 Gram matrices the Cholesky succeeds up to
// cond(Y) ~ 1e7, pass 1 leaves Q1 orthonormal to about u * cond(Y) (u: the
// input's unit roundoff; the solve's error, no longer squared), and pass 2
// restores orthogonality to working precision, whatever the TF32 setting. The
// extra cost is two float64 GEMMs of p^2 m flops each, a fraction of order p/n
// of the engine's float32 GEMMs with the [m, n] matrix, run on A100/H100 at the
// float32 rate (float64 tensor cores); on GPUs with slow float64 (consumer
// cards) it is the one place where float64 throughput shows.
//
// Failure. CholeskyQR2 still breaks down when Y is rank deficient, zero,
// non-finite or too ill conditioned: then Cholesky meets a non-positive pivot
// (info != 0), or succeeds on a numerically indefinite G1 and returns a Q1 far
// from orthonormal. A matrix of the batch falls back when
//
//   info1 != 0, or info2 != 0, or not (||Q1^T Q1 - I||_F <= 1/2)
//
// (the last test is false for NaN, so non-finite results fall back too; it costs
// nothing: Q1^T Q1 is pass 2's Gram matrix). Those matrices, and only those, are
// recomputed by Householder QR (at::linalg_qr), the CPU's orthonormaliser, which
// returns an orthonormal Q for every input, rank deficient or zero included.
//
// Why not the other repair, shifting G1 by eps * trace(G1) * I ("shifted
// CholeskyQR3")? The shift makes the Cholesky succeed but does not make Q1
// orthonormal: it needs one more pass and a careful shift, and for a rank
// deficient Y (common here: a task equal to the average, centered stacks of
// T = 2, more sketch columns than the matrix's rank) Q1 = Y R1^-1 is itself rank
// deficient, so no number of further CholeskyQR passes can make it orthonormal.
// Householder is exact in all these cases and the fallback only runs where needed.
//
// One host synchronisation per call decides whether any matrix fell back.
OrthonormalBasis cholesky_qr2(const at::Tensor& Y) {
  TORCH_CHECK(Y.dim() >= 2, "lowrank_merge: cholesky_qr2 expects [..., m, p], got ", Y.dim(), " dims");
  const auto m = Y.size(-2), p = Y.size(-1);
  auto batch_sizes = Y.sizes().slice(0, Y.dim() - 2);
  if (p > m || p == 0) {
    // More columns than rows: Y^T Y is singular, so CholeskyQR cannot apply, and
    // Householder returns the [m, m] basis the CPU returns. (Krylov's final
    // basis [A Omega, (A A^T) A Omega, ...] can be wider than a small matrix.)
    return {householder_orthonormal_basis(Y), at::ones(batch_sizes, Y.options().dtype(at::kBool))};
  }
  const auto dtype = Y.scalar_type();
  const auto Yb = as_batch(Y);  // [B, m, p]

  // Pass 1.
  auto G1 = gram64(Yb);
  auto [R1, info1] = at::linalg_cholesky_ex(G1, /*upper=*/true, /*check_errors=*/false);
  auto Q1 = at::linalg_solve_triangular(R1.to(dtype), Yb, /*upper=*/true, /*left=*/false);

  // Pass 2.
  auto G2 = gram64(Q1);
  auto [R2, info2] = at::linalg_cholesky_ex(G2, /*upper=*/true, /*check_errors=*/false);
  auto Q = at::linalg_solve_triangular(R2.to(dtype), Q1, /*upper=*/true, /*left=*/false);

  // How far Q1 is from orthonormal, per matrix, from pass 2's Gram matrix.
  auto departure = at::linalg_matrix_norm(G2 - at::eye(p, G2.options()), "fro");  // [B]
  auto fell_back = (info1 != 0).logical_or_(info2 != 0).logical_or_(departure.le(kMaxDeparture).logical_not_());

  if (fell_back.any().item<bool>()) {  // the one synchronisation
    auto which = fell_back.nonzero().squeeze(-1);
    Q.index_copy_(0, which, householder_orthonormal_basis(Yb.index_select(0, which)));
  }
  return {Q.reshape(Y.sizes()), fell_back.reshape(batch_sizes)};
}

at::Tensor cholesky_qr2_orthonormal_basis(const at::Tensor& Y) {
  return cholesky_qr2(Y).Q;
}

// R = triu(Q^T Y): one small GEMM instead of carrying R2 R1 and the fallback's R
// out of cholesky_qr2 (Q is orthonormal and spans Y, so Q^T Y is R to rounding).
std::tuple<at::Tensor, at::Tensor> cholesky_qr2_basis_and_factor(const at::Tensor& Y) {
  auto Q = cholesky_qr2(Y).Q;
  auto R = at::matmul(Q.mT(), Y).triu();
  return {std::move(Q), std::move(R)};
}

// Top-k SVD of Q Q^T A through the l x l Gram matrix of B = Q^T A [..., l, n]:
//
//   B = Q^T A                     (batched GEMM in A's dtype: the big product)
//   G = B B^T = W diag(s^2) W^T   (l x l, formed and decomposed in float64)
//   P = W_k^T B  [..., k, n]      (row i is s_i v_i^T; float64)
//   S = row norms of P,  Vh = P / S,  U = Q W_k
//
// so that U diag(S) Vh = Q W_k W_k^T Q^T A, the rank-k truncation of Q Q^T A,
// whatever the values of S. This replaces the dense SVD of the wide [l, n]
// matrix (cuSOLVER's Jacobi SVD, one matrix at a time) by one [l, l]
// eigendecomposition per matrix; l is the basis width: k + oversample for
// subspace iteration, (niter + 1) k for block Krylov, k for the gram engine.
//
// Accuracy. Squaring B would lose the small singular values in float32, so G is
// formed from B cast to float64 (2 l^2 n flops, a fraction l/m of the GEMM
// that produced B; on A100/H100 float64 GEMMs run at the float32 non-tensor-core
// rate) and decomposed in float64: its eigenvalues carry absolute errors of
// about 1e-16 s_1^2, so the top-k subspace W_k is as accurate as a float32 SVD
// of B would give unless s_k < ~1e-8 s_1 (for float64 input, W_k is accurate
// to about u * s_1 / s_k relative to a float64 SVD's). S is the row norms of P,
// not sqrt(eigenvalues), which keeps small singular values accurate too.
// Rows are sorted by S (descending): with near-equal values the norms can come
// out in a different order than the eigenvalues (sort_by_descending_values).
//
// Where S_i = 0 exactly (A of rank < k), Vh's row i is set to zero instead of
// an arbitrary unit vector orthogonal to the others (LAPACK's choice); U S Vh,
// the only thing the merge uses, is unaffected.
Factors gram_eigh_svd_of_projection(const at::Tensor& Q, const at::Tensor& A, int64_t k) {
  const auto l = Q.size(-1);
  TORCH_CHECK(
      k >= 1 && k <= l, "lowrank_merge: the sketch has ", l, " columns, fewer than the rank k = ", k,
      "; omega must be at least k wide");
  const auto dtype = A.scalar_type();
  const auto small = matrix_product(Q.mT(), A).to(at::kDouble);  // [..., l, n]
  const auto gram = at::matmul(small, small.mT());            // [..., l, l]
  // linalg_eigh: eigenvalues ascending, so the top k are the last k columns, flipped.
  auto W = std::get<1>(at::linalg_eigh(gram)).narrow(-1, l - k, k).flip(-1);  // [..., l, k]
  auto P = at::matmul(W.mT(), small);                                          // [..., k, n]
  auto S = at::linalg_vector_norm(P, 2, at::IntArrayRef{-1});
  sort_by_descending_values(S, {{&W, -1}, {&P, -2}});
  auto Vh = P.div_(at::where(S > 0, S, at::ones_like(S)).unsqueeze(-1));  // P is this function's own
  return {matrix_product(Q, W.to(dtype)), S.to(dtype).contiguous(), Vh.to(dtype).contiguous()};
}

void sort_by_descending_values(at::Tensor& S, std::initializer_list<FactorAxis> factors) {
  const auto k = S.size(-1);
  if (k < 2 || S.narrow(-1, 0, k - 1).ge(S.narrow(-1, 1, k - 1)).all().item<bool>()) return;
  auto [sorted, order] = S.sort(/*dim=*/-1, /*descending=*/true);
  S = sorted;
  for (const auto& axis : factors) {
    *axis.factor = at::take_along_dim(*axis.factor, order.unsqueeze(axis.dim == -1 ? -2 : -1), axis.dim);
  }
}

EngineSteps batched_engine_steps() {
  EngineSteps steps;
  steps.orthonormal_basis = cholesky_qr2_orthonormal_basis;  // the small SVD is the default
  steps.iteration_basis = cholesky_qr2_orthonormal_basis;
  steps.iteration_basis_and_factor = cholesky_qr2_basis_and_factor;
  return steps;
}

}  // namespace lowrank_merge
