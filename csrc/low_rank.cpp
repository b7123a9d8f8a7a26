#include "low_rank.h"

#include <algorithm>
#include <vector>

namespace lowrank_merge {

at::Tensor householder_orthonormal_basis(const at::Tensor& Y) {
  return std::get<0>(at::linalg_qr(Y, "reduced"));
}

Factors dense_svd_of_projection(const at::Tensor& Q, const at::Tensor& A, int64_t k) {
  auto small = at::matmul(Q.mT(), A);  // [..., l, n]
  auto [U_small, S, Vh] = at::linalg_svd(small, /*full_matrices=*/false);
  return {at::matmul(Q, U_small.narrow(-1, 0, k)), S.narrow(-1, 0, k).contiguous(), Vh.narrow(-2, 0, k).contiguous()};
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
  auto eigenvectors = std::get<1>(at::linalg_eigh(at::matmul(A, A.mT())));  // ascending
  return steps.truncated_svd_of_projection(eigenvectors.narrow(-1, m - k, k), A, k);
}

bool is_sketch_engine(const std::string& engine) {
  return engine == "randomized" || engine == "krylov";
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
  return krylov_svd(A, k, *omega, niter, steps);
}

at::Tensor sum_of_reconstructions(const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh) {
  const auto T = U.size(0), m = U.size(1), k = U.size(2), n = Vh.size(2);
  auto left = (U * S.unsqueeze(-2)).transpose(0, 1).reshape({m, T * k});
  return at::matmul(left, Vh.reshape({T * k, n}));
}

}  // namespace lowrank_merge
