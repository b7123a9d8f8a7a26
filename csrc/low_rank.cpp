#include "low_rank.h"

#include "batched_steps.h"
#include "cpu_matmul.h"

#include <algorithm>
#include <functional>
#include <limits>
#include <vector>

namespace lowrank_merge {

at::Tensor householder_orthonormal_basis(const at::Tensor& Y) {
  return std::get<0>(at::linalg_qr(Y, "reduced"));
}

namespace {

// rows[b][i]: the row of Y that row i of L U came from, for each matrix b of a
// batch, from LAPACK's 1-based interchanges `pivots` [B, p] (row i was swapped
// with row pivots[i] - 1, for i = 0 .. p - 1 in order).
at::Tensor rows_of_interchanges(const at::Tensor& pivots, int64_t m) {
  const auto pivots_cpu = pivots.to(at::kCPU, at::kInt).contiguous();
  const auto batch = pivots_cpu.size(0), p = pivots_cpu.size(1);
  auto rows = at::arange(m, at::kLong).repeat({batch, 1});
  auto row_of = rows.accessor<int64_t, 2>();
  const auto swap_with = pivots_cpu.accessor<int32_t, 2>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < p; ++i) {
      // An out-of-range interchange (torch 2.13's batched CPU LU returned some
      // for some shapes, benchmarks/NOTES.md): an error, not a write out of bounds.
      TORCH_CHECK(
          swap_with[b][i] >= 1 && swap_with[b][i] <= m, "lowrank_merge: the LU factorisation of an iterate returned ",
          "the row interchange ", swap_with[b][i], " outside [1, ", m,
          "]: a fault of the LAPACK call (please report the layer's shape)");
      std::swap(row_of[b][i], row_of[b][swap_with[b][i] - 1]);
    }
  }
  return rows.to(pivots.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lu_iteration_basis_and_factor(const at::Tensor& Y) {
  const auto m = Y.size(-2), p = Y.size(-1);
  if (p > m || p == 0) return at::linalg_qr(Y, "reduced");
  const auto Yb = Y.dim() == 2 ? Y.unsqueeze(0) : Y.flatten(0, -3);  // [B, m, p]
  // One matrix at a time: torch 2.13's batched CPU LU returned out-of-range
  // pivots for random [2 or 4, 4096, 1536] and [4, 2048, 1536] batches (not for
  // [3, 4096, 1536], [4, 4096, 1024] or [8, 4096, 496]; benchmarks/NOTES.md).
  // No error checks: a zero pivot (Y rank deficient) leaves a zero column below
  // L's unit diagonal, and P L keeps full rank.
  // Each LU is column-major, so L^T [p, m] is its contiguous side: L's rows are
  // permuted as L^T's columns (2-3x faster than tril and a row scatter on [B, m, p]).
  // L^T and U are taken from each LU directly.
  std::vector<at::Tensor> Lts, factors, pivots_per_matrix;
  for (int64_t b = 0; b < Yb.size(0); ++b) {
    auto [lu, matrix_pivots, info] = at::linalg_lu_factor_ex(Yb[b], /*pivot=*/true, /*check_errors=*/false);
    Lts.push_back(lu.mT().triu(1));
    factors.push_back(lu.narrow(0, 0, p).triu());
    pivots_per_matrix.push_back(matrix_pivots);
  }
  auto Lt = at::stack(Lts);  // [B, p, m]
  Lt.diagonal(0, -2, -1).fill_(1);
  const auto rows = rows_of_interchanges(at::stack(pivots_per_matrix), m);  // L's row i is row rows[i] of P L
  auto basis_t = at::empty_like(Lt).scatter_(-1, rows.unsqueeze(-2).expand({-1, p, -1}), Lt);
  auto factor_sizes = Y.sizes().vec();
  factor_sizes[factor_sizes.size() - 2] = p;
  return {basis_t.mT().reshape(Y.sizes()), at::stack(factors).reshape(factor_sizes)};
}

at::Tensor lu_iteration_basis(const at::Tensor& Y) {
  return std::get<0>(lu_iteration_basis_and_factor(Y));
}

at::Tensor column_major_product(const at::Tensor& left, const at::Tensor& right) {
  return matrix_product(right.mT(), left.mT()).mT();
}

// Torch has no syrk, so the symmetry is used by hand, recursively: with the
// columns halved, G = [[G11, G21^T], [G21, G22]], where G21 = X2^T X1 is one
// large product, G11 and G22 recurse down to blocks of at most
// kGramBlockColumns and the upper blocks are copies: about (B + 1) / 2B of the
// full product's flops for B diagonal blocks (17/32 at c = 4096). The large
// off-diagonal products run faster than the thin block rows of a one-level
// split ([8, 14336, 4096]: 15.0 s against 18.3 s, benchmarks/NOTES.md). The
// twin: lowrank_merge.engines.gram_matrix, with the same block width.
constexpr int64_t kGramBlockColumns = 256;

namespace {

// Writes the diagonal block [lo, hi) x [lo, hi) of X^T X into gram, from
// rows = X^T [..., c, r] (row i is column i of X).
void fill_gram_block(const at::Tensor& rows, at::Tensor& gram, int64_t lo, int64_t hi) {
  const auto rows_of = [&](int64_t from, int64_t to) { return rows.narrow(-2, from, to - from); };
  const auto block = [&](int64_t row_lo, int64_t row_hi, int64_t col_lo, int64_t col_hi) {
    return gram.narrow(-2, row_lo, row_hi - row_lo).narrow(-1, col_lo, col_hi - col_lo);
  };
  if (hi - lo <= kGramBlockColumns) {
    block(lo, hi, lo, hi).copy_(matrix_product(rows_of(lo, hi), rows_of(lo, hi).mT()));
    return;
  }
  const auto mid = (lo + hi) / 2;
  fill_gram_block(rows, gram, lo, mid);
  fill_gram_block(rows, gram, mid, hi);
  block(mid, hi, lo, mid).copy_(matrix_product(rows_of(mid, hi), rows_of(lo, mid).mT()));
  block(lo, mid, mid, hi).copy_(block(mid, hi, lo, mid).mT());
}

}  // namespace

at::Tensor gram_matrix(const at::Tensor& X) {
  const auto c = X.size(-1);
  auto sizes = X.sizes().vec();
  sizes[sizes.size() - 2] = c;
  auto gram = at::empty(sizes, X.options());
  fill_gram_block(X.mT(), gram, 0, c);
  return gram;
}

namespace {

Factors exact_svd(const at::Tensor& A, int64_t k) {
  auto [U, S, Vh] = at::linalg_svd(A, /*full_matrices=*/false);
  return {U.narrow(-1, 0, k).contiguous(), S.narrow(-1, 0, k).contiguous(), Vh.narrow(-2, 0, k).contiguous()};
}

// Only the last basis, on which the small SVD projects, is orthonormalised;
// the power steps before it take steps.iteration_basis (the same span).
Factors randomized_svd(
    const at::Tensor& A, int64_t k, const at::Tensor& omega, int64_t niter, const EngineSteps& steps) {
  auto Y = column_major_product(A, omega);
  for (int64_t i = 0; i < niter; ++i) {
    const auto Z = column_major_product(A.mT(), steps.iteration_basis(Y));
    Y = column_major_product(A, steps.iteration_basis(Z));
  }
  return steps.truncated_svd_of_projection(steps.orthonormal_basis(Y), A, k);
}

Factors krylov_svd(
    const at::Tensor& A, int64_t k, const at::Tensor& omega, int64_t niter, const EngineSteps& steps) {
  auto block = steps.iteration_basis(column_major_product(A, omega));
  std::vector<at::Tensor> blocks{block};
  for (int64_t i = 0; i < niter; ++i) {
    // A well-conditioned basis of each block keeps its span and the iteration
    // stable; the final basis of all blocks is orthonormalised.
    block = steps.iteration_basis(column_major_product(A, column_major_product(A.mT(), block)));
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

// The cut b of the Chebyshev filter below: the c-th largest Ritz value of G on
// the span of basis [..., s, l], c = min(l, (k + l) / 2 + 1), from
// product = G basis. Ritz values are lower bounds (theta_c <= lambda_c, by
// interlacing), so b lies below lambda_k and the filter never damps the top k.
// For a basis that is not orthonormal (P L) they are the eigenvalues of the
// pencil (B^T G B, B^T B), through the Cholesky factor C of B^T B:
// eig(C^-1 B^T G B C^-T), in float64 (l x l). Only an estimate is needed, so the
// two [l, l] products stay in the input dtype. Where B^T B is not numerically
// positive definite the cut is 0: plain power iteration. Returns [..., 1, 1].
// The twin: lowrank_merge.engines.chebyshev_cut.
at::Tensor chebyshev_cut(const at::Tensor& basis, const at::Tensor& product, int64_t k) {
  const auto l = basis.size(-1);
  const auto basis_gram = gram_matrix(basis).to(at::kDouble);
  const auto projected = matrix_product(basis.mT(), product).to(at::kDouble);
  auto [factor, info] = at::linalg_cholesky_ex(basis_gram, /*upper=*/false, /*check_errors=*/false);
  const auto usable = info.eq(0);
  factor = at::where(usable.unsqueeze(-1).unsqueeze(-1), factor, at::eye(l, factor.options()));
  const auto half = at::linalg_solve_triangular(factor, projected, /*upper=*/false);    // C^-1 H
  const auto pencil = at::linalg_solve_triangular(factor, half.mT(), /*upper=*/false);  // C^-1 H^T C^-T
  const auto ritz = at::linalg_eigvalsh((pencil + pencil.mT()) * 0.5);                  // ascending
  auto cut = ritz.select(-1, l - std::min(l, (k + l) / 2 + 1)).clamp_min(0);
  cut = at::where(usable.logical_and(cut.isfinite()), cut, at::zeros_like(cut));
  return cut.to(basis.scalar_type()).unsqueeze(-1).unsqueeze(-1);
}

// R^-1 of the upper triangular R [..., p, p] (the caller's own, changed), its
// diagonal entries of magnitude below eps * max |R_ii| first raised to that
// bound, so that the inverse stays finite where the iterate was rank deficient.
// Applied as a product: the [s, l] triangular solve it replaces ran at 15 GFLOP/s
// on ViT-B shapes (benchmarks/NOTES.md). The twin: engines._triangular_inverse.
at::Tensor triangular_inverse(at::Tensor R) {
  auto diagonal = R.diagonal(0, -2, -1);
  auto bound = diagonal.abs().amax(-1, /*keepdim=*/true) *
               (R.scalar_type() == at::kDouble ? std::numeric_limits<double>::epsilon()
                                               : std::numeric_limits<float>::epsilon());
  bound = at::where(bound > 0, bound, at::ones_like(bound));
  diagonal.copy_(at::where(diagonal.abs() < bound, bound.expand_as(diagonal), diagonal));
  const auto identity = at::eye(R.size(-1), R.options()).expand_as(R);
  return at::linalg_solve_triangular(R, identity, /*upper=*/true);
}

// niter filtered products with a symmetric positive semi-definite G [..., s, s]
// from start [..., s, l], where apply_gram(B) is G B, column-major (G itself, or
// A (A^T B) without forming it): a column-major [..., s, l] block spanning p(G) start for the degree-niter
// Chebyshev polynomial p of the interval [0, b] (b: chebyshev_cut). Components
// with eigenvalues above b grow by T_j(2 lambda / b - 1), those in [0, b] stay
// bounded, so the top-k subspace converges about twice as fast per product as
// plain power iteration (lambda^j), the special case b = 0 (benchmarks/NOTES.md,
// 2026-12-03, fifth session: at 3 products the rank-k sum is as close to the
// float64 one as plain iteration's at 5).
//
// The recurrence, scaled so that b = 0 is that case and nothing is divided by b:
//   Z1 = (G - b/2) Z0,  Z2 = (G - b/2) Z1 - b^2/8 Z0,  Z_{j+1} = (G - b/2) Z_j - b^2/16 Z_{j-1}.
// Before each product Z_j is replaced by its basis Z_j R^-1 (steps.iteration_basis_and_factor)
// and Z_{j-1} by Z_{j-1} R^-1 (the same right factor, so the recurrence holds),
// which keeps the block well conditioned. The weights are applied as two factors,
// b^2/8 = (b/4)(b/2) and b^2/16 = (b/4)^2, never as b^2: that overflows float32
// once b > 1.8e19 (task vectors of magnitude ~1e9), where each factor and each
// product stay ~b. The twin: lowrank_merge.engines.chebyshev_filtered_iterate.
at::Tensor chebyshev_filtered_iterate(
    const std::function<at::Tensor(const at::Tensor&)>& apply_gram, const at::Tensor& start, int64_t k,
    int64_t niter, const EngineSteps& steps) {
  if (niter == 0) return start;
  auto basis = steps.iteration_basis(start);
  auto current = apply_gram(basis);
  const auto cut = chebyshev_cut(basis, current, k);
  const auto half = cut * 0.5;
  const auto quarter = cut * 0.25;
  current.sub_(basis * half);
  auto previous = basis;
  auto second_factor = half;
  for (int64_t i = 1; i < niter; ++i) {
    at::Tensor factor;
    std::tie(basis, factor) = steps.iteration_basis_and_factor(current);
    previous = column_major_product(previous, triangular_inverse(factor));
    current = apply_gram(basis);
    current.sub_(basis * half).sub_((previous * quarter).mul_(second_factor));
    previous = basis;
    second_factor = quarter;
  }
  return current;
}

// Chebyshev-filtered subspace iteration on the smaller Gram matrix G (A^T A for
// a tall A, A A^T for a wide or square one: from A's rows, which the products
// read contiguously; s x s with s = min(m, n)), then Rayleigh-Ritz:
//
//   X = G Omega[:s] (the first s rows of the [n, l] sketch: a Gaussian
//       block too; for a wide A cheaper than A Omega, and one step further
//       into the top subspace, as G's spectrum is A's squared),
//   X = chebyshev_filtered_iterate(G, X) (niter products),  then X = orth(X),
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
// The bases: the device's steps.iteration_basis(_and_factor) (LU on the CPU,
// CholeskyQR2 on CUDA) in the iteration; orth: its steps.orthonormal_basis
// (Householder QR on the CPU, CholeskyQR2 on CUDA; on the CPU CholeskyQR2 was
// within 10 % of Householder either way inside this engine, on ViT-B shapes and
// on [8, 4096, 14336]; benchmarks/NOTES.md).
Factors gram_subspace_svd(
    const at::Tensor& A, int64_t k, const at::Tensor& omega, int64_t niter, const EngineSteps& steps) {
  const auto dtype = A.scalar_type();
  const bool wide = A.size(-2) <= A.size(-1);
  const auto gram = gram_matrix(wide ? A.mT() : A);  // [..., s, s]
  const auto apply_gram = [&gram](const at::Tensor& basis) { return column_major_product(gram, basis); };
  auto X = column_major_product(gram, omega.narrow(0, 0, gram.size(-1)));
  X = chebyshev_filtered_iterate(apply_gram, X, k, niter, steps);
  X = steps.orthonormal_basis(X);
  const auto X64 = X.to(at::kDouble);
  const auto ritz = at::matmul(X64.mT(), matrix_product(gram, X).to(at::kDouble));  // [..., l, l]
  const auto l = X.size(-1);
  // linalg_eigh: eigenvalues ascending, so the top k are the last k columns, flipped.
  const auto W = std::get<1>(at::linalg_eigh((ritz + ritz.mT()) * 0.5)).narrow(-1, l - k, k).flip(-1);
  auto E = at::matmul(X64, W).to(dtype);                                     // [..., s, k]
  auto other = wide ? matrix_product(E.mT(), A) : matrix_product(A, E);  // [..., k, n] or [..., m, k]
  auto S = at::linalg_vector_norm(other, 2, at::IntArrayRef{wide ? -1 : -2});
  sort_by_descending_values(S, {{&E, -1}, {&other, wide ? -2 : -1}});
  const auto safe_S = at::where(S > 0, S, at::ones_like(S));
  // other is this function's own product: normalised in place.
  if (wide) {
    return {E.contiguous(), S.contiguous(), other.div_(safe_S.unsqueeze(-1)).contiguous()};
  }
  return {other.div_(safe_S.unsqueeze(-2)).contiguous(), S.contiguous(), E.mT().contiguous()};
}

// Chebyshev-filtered subspace iteration on G = A A^T, applied as A (A^T B)
// without forming it, from A Omega; then the small SVD of the projection, as
// randomized. Each iteration costs randomized's two passes over A but converges
// about twice as fast; unlike randomized it keeps no basis between A^T B and
// A (A^T B), so, as in gram_subspace, the iteration sees A's squared spectrum.
// The twin: lowrank_merge.engines.chebyshev_svd.
Factors chebyshev_svd(
    const at::Tensor& A, int64_t k, const at::Tensor& omega, int64_t niter, const EngineSteps& steps) {
  // A^T B as (B^T A)^T: the BLAS reads A row-major, 25-45 % faster on the
  // ViT-B and 1024^2 shapes than through A^T's strides (benchmarks/NOTES.md).
  const auto apply_gram = [&A](const at::Tensor& basis) {
    return column_major_product(A, column_major_product(A.mT(), basis));
  };
  const auto X = chebyshev_filtered_iterate(apply_gram, column_major_product(A, omega), k, niter, steps);
  return steps.truncated_svd_of_projection(steps.orthonormal_basis(X), A, k);
}

bool is_sketch_engine(const std::string& engine) {
  return engine == "randomized" || engine == "krylov" || engine == "gram_subspace" || engine == "chebyshev";
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
  if (A.numel() == 0) {  // an empty batch: nothing to decompose (the LU bases would stack no matrices)
    auto shape = A.sizes().vec();
    const auto m = shape[shape.size() - 2], n = shape.back();
    shape.resize(shape.size() - 2);
    auto with = [&shape](std::initializer_list<int64_t> tail) {
      auto sizes = shape;
      sizes.insert(sizes.end(), tail);
      return sizes;
    };
    return {at::empty(with({m, k}), A.options()), at::empty(with({k}), A.options()), at::empty(with({k, n}), A.options())};
  }
  if (engine == "exact") return exact_svd(A, k);
  if (engine == "gram") return gram_svd(A, k, steps);
  if (engine == "randomized") return randomized_svd(A, k, *omega, niter, steps);
  if (engine == "gram_subspace") return gram_subspace_svd(A, k, *omega, niter, steps);
  if (engine == "chebyshev") return chebyshev_svd(A, k, *omega, niter, steps);
  return krylov_svd(A, k, *omega, niter, steps);
}

at::Tensor sum_of_reconstructions(const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh) {
  const auto T = U.size(0), m = U.size(1), k = U.size(2), n = Vh.size(2);
  auto left = (U * S.unsqueeze(-2)).transpose(0, 1).reshape({m, T * k});
  return matrix_product(left, Vh.reshape({T * k, n}));
}

}  // namespace lowrank_merge
