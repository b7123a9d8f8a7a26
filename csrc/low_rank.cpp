#include "low_rank.h"

#include "batched_steps.h"

#include <algorithm>
#include <vector>

namespace lowrank_merge {

at::Tensor householder_orthonormal_basis(const at::Tensor& Y) {
  return std::get<0>(at::linalg_qr(Y, "reduced"));
}

// Torch has no syrk, so the symmetry is used by hand: with the columns in B
// blocks of kGramBlockColumns (the last one narrower), block row i is one
// product X_i^T [X_0 ... X_i] and the blocks above the diagonal are copies,
// about (B + 1) / 2B of the full product's flops (2/3 at c = 768, 17/32 at
// c = 4096; [2, 14336, 4096]: 5.3 s plain, 2.9 s blocked; 256 measured best or
// near it against 128 ... 512, benchmarks/NOTES.md). The twin:
// lowrank_merge.engines.gram_matrix, with the same block width.
constexpr int64_t kGramBlockColumns = 256;

at::Tensor gram_matrix(const at::Tensor& X) {
  const auto c = X.size(-1);
  if (c <= kGramBlockColumns) return at::matmul(X.mT(), X);
  auto sizes = X.sizes().vec();
  sizes[sizes.size() - 2] = c;
  auto gram = at::empty(sizes, X.options());
  for (int64_t lo = 0; lo < c; lo += kGramBlockColumns) {
    const auto hi = std::min(c, lo + kGramBlockColumns);
    auto block_row = gram.narrow(-2, lo, hi - lo);
    block_row.narrow(-1, 0, hi).copy_(at::matmul(X.narrow(-1, lo, hi - lo).mT(), X.narrow(-1, 0, hi)));
    gram.narrow(-2, 0, lo).narrow(-1, lo, hi - lo).copy_(block_row.narrow(-1, 0, lo).mT());
  }
  return gram;
}

namespace {

Factors exact_svd(const at::Tensor& A, int64_t k) {
  auto [U, S, Vh] = at::linalg_svd(A, /*full_matrices=*/false);
  return {U.narrow(-1, 0, k).contiguous(), S.narrow(-1, 0, k).contiguous(), Vh.narrow(-2, 0, k).contiguous()};
}

Factors randomized_svd(
    const at::Tensor& A, int64_t k, const at::Tensor& omega, int64_t niter, const EngineSteps& steps) {
  auto Q = steps.orthonormal_basis(at::matmul(A, omega));
  for (int64_t i = 0; i < niter; ++i) {
    Q = steps.orthonormal_basis(at::matmul(A, steps.orthonormal_basis(at::matmul(A.mT(), Q))));
  }
  return steps.truncated_svd_of_projection(Q, A, k);
}

Factors krylov_svd(
    const at::Tensor& A, int64_t k, const at::Tensor& omega, int64_t niter, const EngineSteps& steps) {
  auto block = steps.orthonormal_basis(at::matmul(A, omega));
  std::vector<at::Tensor> blocks{block};
  for (int64_t i = 0; i < niter; ++i) {
    // Orthonormalising each block keeps its span and the iteration stable.
    block = steps.orthonormal_basis(at::matmul(A, at::matmul(A.mT(), block)));
    blocks.push_back(block);
  }
  return steps.truncated_svd_of_projection(steps.orthonormal_basis(at::cat(blocks, -1)), A, k);
}

Factors gram_svd(const at::Tensor& A, int64_t k, const EngineSteps& steps) {
  const auto m = A.size(-2), n = A.size(-1);
  if (m > n) {
    auto [U, S, Vh] = gram_svd(A.mT(), k, steps);
    return {Vh.mT().contiguous(), S, U.mT().contiguous()};
  }
  auto eigenvectors = std::get<1>(at::linalg_eigh(gram_matrix(A.mT())));  // A A^T; ascending
  return steps.truncated_svd_of_projection(eigenvectors.narrow(-1, m - k, k), A, k);
}

// Subspace iteration on the smaller Gram matrix G (A^T A for a tall or square A,
// A A^T for a wide one, s x s with s = min(m, n)), then Rayleigh-Ritz:
//
//   X = orth(G Omega[:s]) (the first s rows of the [n, l] sketch: a Gaussian
//       block too; for a wide A cheaper than A Omega, and one step further
//       into the top subspace, as G's spectrum is A's squared),
//   niter x X = orth(G X),
//   H = X^T G X (l x l, float64) = W diag(s^2) W^T,  E = X W_k [s, k]
//
// E holds the top-k eigenvectors of G: the right singular vectors of a tall A,
// the left ones of a wide A. The other side comes from one product with A
// (A E for a tall A, E^T A for a wide one), whose column (row) norms are S.
//
// Why: after the one product that forms G (m n s (B + 1) / B flops in large
// GEMMs, see gram_matrix), every iteration costs 2 s^2 l instead of the 4 m n l of a power
// iteration on A, so many iterations are cheap and the top-k subspace comes out
// as accurate as a dense SVD's on slowly decaying spectra (where the randomized
// engine's rank-k truncation is off by 10-20 %). Forming G squares the condition
// number; on float32 that limits the accuracy of singular values below about
// 1e-3 sigma_1, far below the ones a rank-k truncation keeps (the same floor as
// the gram engine). H is formed and decomposed in float64.
//
// The iterations orthonormalise with the device's steps.orthonormal_basis, as
// the other engines: Householder QR on the CPU (within 10 % of CholeskyQR2 either
// way inside this engine, on ViT-B shapes and on [8, 4096, 14336];
// benchmarks/NOTES.md), CholeskyQR2 on CUDA.
Factors gram_subspace_svd(
    const at::Tensor& A, int64_t k, const at::Tensor& omega, int64_t niter, const EngineSteps& steps) {
  const auto dtype = A.scalar_type();
  const bool wide = A.size(-2) < A.size(-1);
  const auto gram = gram_matrix(wide ? A.mT() : A);  // [..., s, s]
  auto X = steps.orthonormal_basis(at::matmul(gram, omega.narrow(0, 0, gram.size(-1))));
  for (int64_t i = 0; i < niter; ++i) {
    X = steps.orthonormal_basis(at::matmul(gram, X));
  }
  const auto X64 = X.to(at::kDouble);
  const auto ritz = at::matmul(X64.mT(), at::matmul(gram, X).to(at::kDouble));  // [..., l, l]
  const auto l = X.size(-1);
  // linalg_eigh: eigenvalues ascending, so the top k are the last k columns, flipped.
  const auto W = std::get<1>(at::linalg_eigh((ritz + ritz.mT()) * 0.5)).narrow(-1, l - k, k).flip(-1);
  auto E = at::matmul(X64, W).to(dtype);                                     // [..., s, k]
  auto other = wide ? at::matmul(E.mT(), A) : at::matmul(A, E);             // [..., k, n] or [..., m, k]
  auto S = at::linalg_vector_norm(other, 2, at::IntArrayRef{wide ? -1 : -2});
  sort_by_descending_values(S, {{&E, -1}, {&other, wide ? -2 : -1}});
  const auto safe_S = at::where(S > 0, S, at::ones_like(S));
  if (wide) {
    return {E.contiguous(), S.contiguous(), (other / safe_S.unsqueeze(-1)).contiguous()};
  }
  return {(other / safe_S.unsqueeze(-2)).contiguous(), S.contiguous(), E.mT().contiguous()};
}

bool is_sketch_engine(const std::string& engine) {
  return engine == "randomized" || engine == "krylov" || engine == "gram_subspace";
}

}  // namespace

void check_factor_args(
    const at::Tensor& A, int64_t k, const std::string& engine, int64_t niter,
    const std::optional<at::Tensor>& omega) {
  TORCH_CHECK(A.dim() >= 2, "lowrank_merge: expected a [..., m, n] tensor, got ", A.dim(), " dims");
  TORCH_CHECK(
      A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
      "lowrank_merge: expected float32 or float64, got ", A.scalar_type());
  TORCH_CHECK(
      k >= 1 && k <= std::min(A.size(-2), A.size(-1)), "lowrank_merge: k must be in [1, min(m, n)], got ", k);
  TORCH_CHECK(niter >= 0, "lowrank_merge: niter must be >= 0, got ", niter);
  TORCH_CHECK(
      engine == "exact" || engine == "gram" || is_sketch_engine(engine),
      "lowrank_merge: unknown svd engine '", engine, "'");
  if (is_sketch_engine(engine)) {
    TORCH_CHECK(omega.has_value(), "lowrank_merge: svd engine '", engine, "' needs a sketch matrix omega");
    TORCH_CHECK(
        omega->dim() == 2 && omega->size(0) == A.size(-1) && omega->size(1) >= k,
        "lowrank_merge: omega must be [n, l] with n = ", A.size(-1), " and l >= k = ", k, ", got ", omega->sizes());
    TORCH_CHECK(
        omega->scalar_type() == A.scalar_type() && omega->device() == A.device(),
        "lowrank_merge: omega must have A's dtype and device");
  }
}

Factors low_rank_factors_generic(
    const at::Tensor& A, int64_t k, const std::string& engine, int64_t niter,
    const std::optional<at::Tensor>& omega, const EngineSteps& steps) {
  if (engine == "exact") return exact_svd(A, k);
  if (engine == "gram") return gram_svd(A, k, steps);
  if (engine == "randomized") return randomized_svd(A, k, *omega, niter, steps);
  if (engine == "gram_subspace") return gram_subspace_svd(A, k, *omega, niter, steps);
  return krylov_svd(A, k, *omega, niter, steps);
}

at::Tensor sum_of_reconstructions(const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh) {
  const auto T = U.size(0), m = U.size(1), k = U.size(2), n = Vh.size(2);
  auto left = (U * S.unsqueeze(-2)).transpose(0, 1).reshape({m, T * k});
  return at::matmul(left, Vh.reshape({T * k, n}));
}

}  // namespace lowrank_merge
