#include "cpu_matmul.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <atomic>
#include <optional>

namespace lowrank_merge {
namespace {

std::atomic<bool> onednn_backend{false};

// mkldnn::_linear_pointwise(X [M, K], W [N, K], bias, "none", [], None) = X W^T:
// torch's oneDNN inner product (registered for the CPU by libtorch). X is
// copied unless contiguous; W is read through its strides.
using LinearSignature = at::Tensor(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
    c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>);

const std::optional<c10::TypedOperatorHandle<LinearSignature>>& onednn_linear() {
  static const auto handle = []() -> std::optional<c10::TypedOperatorHandle<LinearSignature>> {
    const auto op = c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
    if (!op.has_value() || !op->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return std::nullopt;
    return op->typed<LinearSignature>();
  }();
  return handle;
}

// Whether each matrix of t [..., m, k] is row-major and dense.
bool rows_contiguous(const at::Tensor& t) {
  return t.stride(-1) == 1 && (t.size(-2) <= 1 || t.stride(-2) == t.size(-1));
}

at::Tensor onednn_product(const at::Tensor& left, const at::Tensor& right) {
  return onednn_linear()->call(
      left, right.mT(), std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

}  // namespace

void set_cpu_matmul_backend(const std::string& name) {
  TORCH_CHECK(
      name == "blas" || name == "onednn", "lowrank_merge: unknown CPU matmul backend '", name,
      "'; choose 'blas' or 'onednn'");
  TORCH_CHECK(
      name == "blas" || onednn_linear().has_value(),
      "lowrank_merge: this torch build has no oneDNN inner product on the CPU; use the 'blas' backend");
  onednn_backend = name == "onednn";
}

at::Tensor matrix_product(const at::Tensor& left, const at::Tensor& right) {
  if (!onednn_backend || !left.device().is_cpu() || left.scalar_type() != at::kFloat ||
      right.scalar_type() != at::kFloat || left.dim() < 2 || right.dim() < 2) {
    return at::matmul(left, right);
  }
  const auto m = left.size(-2), k = left.size(-1), n = right.size(-1);
  if (m * k * n < kOneDnnMinMultiplyAdds) return at::matmul(left, right);
  // oneDNN's fast kernels read a weight (right^T) that is dense and row-major:
  // a column block of a matrix ran ~1000x slower, and a column-major weight (a
  // row-major right: the projection Q^T A, the reconstruction) 1.2-3x slower
  // than the BLAS (benchmarks/NOTES.md, 2026-12-03, sixth session).
  if (!rows_contiguous(right.mT())) return at::matmul(left, right);
  if (!rows_contiguous(left)) {
    // oneDNN would copy it: worth it for a sketch or a basis beside a stack,
    // not for a stack's transpose (memory), which the BLAS reads in place.
    if (left.numel() >= right.numel()) return at::matmul(left, right);
    return matrix_product(left.contiguous(), right);
  }
  if (left.dim() == 2 && right.dim() == 2) return onednn_product(left, right);
  // One inner product per matrix of the broadcast batch, written into one result.
  const auto left_batch = left.sizes().slice(0, left.dim() - 2);
  const auto right_batch = right.sizes().slice(0, right.dim() - 2);
  auto batch = at::infer_size(left_batch, right_batch);
  auto left_sizes = batch, right_sizes = batch, result_sizes = batch;
  left_sizes.insert(left_sizes.end(), {m, k});
  right_sizes.insert(right_sizes.end(), {k, n});
  result_sizes.insert(result_sizes.end(), {m, n});
  const auto lefts = left.expand(left_sizes).reshape({-1, m, k});
  const auto rights = right.expand(right_sizes).reshape({-1, k, n});
  auto result = at::empty(result_sizes, left.options());
  auto results = result.view({-1, m, n});
  for (int64_t b = 0; b < results.size(0); ++b) results[b].copy_(onednn_product(lefts[b], rights[b]));
  return result;
}

}  // namespace lowrank_merge
