// CUDA kernels of the two ops (schemas and CPU kernels: csrc/ops.cpp):
//
// lowrank_merge::low_rank_factors(Tensor A, int k, str engine, int niter, Tensor? omega)
//     -> (Tensor U, Tensor S, Tensor Vh)
// lowrank_merge::centered_low_rank_sum(Tensor stack, int k, str engine, int niter, Tensor? omega)
//     -> (Tensor average, Tensor delta)
//
// and the private op _cholesky_qr2 (defined in csrc/ops.cpp) for the tests.
//
// The engines are the CPU's (low_rank_factors_generic in csrc/low_rank.cpp, the
// same products in the same order) with the bases swapped for a batched GPU
// one (csrc/batched_steps.cpp): CholeskyQR2 instead of Householder QR for the
// last basis and of LU for the power steps' (the small SVD, through an l x l
// Gram eigendecomposition, is every device's). The "exact"
// engine is at::linalg_svd on the whole [T, m, n] batch, as on the CPU. Every
// ATen call runs on torch's cuBLAS/cuSOLVER handles and the current CUDA
// stream; the centering kernel is launched on that stream too.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <limits>
#include <string>

#include "average_and_center.h"
#include "batched_steps.h"
#include "low_rank.h"

namespace lowrank_merge {
namespace {

// One pass over a CUDA stack [T, m, n] (float32 or float64): the average [m, n]
// and the centered stack [T, m, n], equal to the CPU kernel's to rounding, computed
// on the current CUDA stream (kernel: average_and_center.cu).
std::tuple<at::Tensor, at::Tensor> average_and_center_cuda(const at::Tensor& stack_in) {
  const auto stack = stack_in.contiguous();
  auto average = at::empty({stack.size(1), stack.size(2)}, stack.options());
  auto centered = at::empty_like(stack, at::MemoryFormat::Contiguous);
  const int64_t tasks = stack.size(0), size = average.numel();
  if (tasks == 0) {
    average.fill_(std::numeric_limits<double>::quiet_NaN());  // 0 / 0, as on the CPU
    return {average, centered};
  }
  const int multiprocessors = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(stack.scalar_type(), "average_and_center_cuda", [&] {
    C10_CUDA_CHECK(launch_average_and_center<scalar_t>(
        stack.const_data_ptr<scalar_t>(), average.mutable_data_ptr<scalar_t>(),
        centered.mutable_data_ptr<scalar_t>(), tasks, size, multiprocessors, stream));
  });
  return {average, centered};
}

double gibibytes(int64_t elements, const at::Tensor& like) {
  return static_cast<double>(elements) * static_cast<double>(like.element_size()) / (1024.0 * 1024.0 * 1024.0);
}

// "T=8, m=4096, n=14336, k=327 (Float, engine 'randomized', niter=2, sketch width 337)"
std::string describe(
    const at::Tensor& A, int64_t k, const std::string& engine, int64_t niter, const std::optional<at::Tensor>& omega) {
  const auto m = A.size(-2), n = A.size(-1);
  const auto T = m * n == 0 ? 0 : A.numel() / (m * n);
  std::string text = c10::str("T=", T, ", m=", m, ", n=", n, ", k=", k, " (", A.scalar_type(), ", engine '", engine, "'");
  if (omega.has_value()) text += c10::str(", niter=", niter, ", sketch width ", omega->size(-1));
  return text + ")";
}

// Rethrows a CUDA out-of-memory error as one (torch.OutOfMemoryError in Python)
// whose message says which op ran on what sizes.
[[noreturn]] void rethrow_out_of_memory(
    const c10::OutOfMemoryError& error, const char* op, const at::Tensor& A, int64_t k, const std::string& engine,
    int64_t niter, const std::optional<at::Tensor>& omega) {
  const auto m = A.size(-2), n = A.size(-1);
  const auto T = m * n == 0 ? 0 : A.numel() / (m * n);
  std::string needs;
  if (std::string(op) == "centered_low_rank_sum") {
    needs = c10::str(
        "; besides its input (", gibibytes(A.numel(), A), " GiB) the op needs at least ",
        gibibytes((T + 2) * m * n, A), " GiB for the centered copy, the average and the delta, plus the engine's workspace");
  } else {
    needs = c10::str("; the input takes ", gibibytes(A.numel(), A), " GiB");
  }
  C10_THROW_ERROR(
      OutOfMemoryError,
      c10::str(
          "lowrank_merge::", op, ": out of CUDA memory for ", describe(A, k, engine, niter, omega), needs,
          ". Free GPU memory, lower the rank, or run this layer on the CPU. ", error.what_without_backtrace()));
}

void check_on_cuda(const at::Tensor& A, const char* op) {
  TORCH_CHECK(A.is_cuda(), "lowrank_merge::", op, " (CUDA kernel): expected a CUDA tensor, got one on ", A.device());
}

Factors low_rank_factors_cuda(
    const at::Tensor& A, int64_t k, c10::string_view engine, int64_t niter, const std::optional<at::Tensor>& omega) {
  const std::string engine_name(engine);
  check_on_cuda(A, "low_rank_factors");
  check_factor_args(A, k, engine_name, niter, omega);
  const c10::cuda::CUDAGuard device_guard(A.device());
  try {
    return low_rank_factors_generic(A, k, engine_name, niter, omega, batched_engine_steps());
  } catch (const c10::OutOfMemoryError& error) {
    rethrow_out_of_memory(error, "low_rank_factors", A, k, engine_name, niter, omega);
  }
}

std::tuple<at::Tensor, at::Tensor> centered_low_rank_sum_cuda(
    const at::Tensor& stack, int64_t k, c10::string_view engine, int64_t niter,
    const std::optional<at::Tensor>& omega) {
  const std::string engine_name(engine);
  check_on_cuda(stack, "centered_low_rank_sum");
  TORCH_CHECK(stack.dim() == 3, "lowrank_merge: expected a [T, m, n] stack, got ", stack.dim(), " dims");
  check_factor_args(stack, k, engine_name, niter, omega);
  const c10::cuda::CUDAGuard device_guard(stack.device());
  try {
    // Centering in the stack's dtype (float32 or float64): the average is never
    // rounded to a narrower type before it is subtracted.
    auto [average, centered] = average_and_center_cuda(stack);
    auto [U, S, Vh] = low_rank_factors_generic(centered, k, engine_name, niter, omega, batched_engine_steps());
    centered.reset();  // the largest temporary, no longer needed by the final product
    // Sum over the T tasks as one [m, T k] x [T k, n] GEMM. The merged layer is
    // average + scale * delta, formed by the caller (lowrank_merge.merge), which
    // can then try several scales without decomposing again.
    return {average, sum_of_reconstructions(U, S, Vh)};
  } catch (const c10::OutOfMemoryError& error) {
    rethrow_out_of_memory(error, "centered_low_rank_sum", stack, k, engine_name, niter, omega);
  }
}

std::tuple<at::Tensor, at::Tensor> cholesky_qr2_cuda(const at::Tensor& Y) {
  check_on_cuda(Y, "_cholesky_qr2");
  TORCH_CHECK(Y.dim() >= 2, "lowrank_merge::_cholesky_qr2: expected [..., m, p], got ", Y.dim(), " dims");
  TORCH_CHECK(
      Y.scalar_type() == at::kFloat || Y.scalar_type() == at::kDouble,
      "lowrank_merge::_cholesky_qr2: expected float32 or float64, got ", Y.scalar_type());
  const c10::cuda::CUDAGuard device_guard(Y.device());
  auto basis = cholesky_qr2(Y);
  return {basis.Q, basis.fell_back};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_merge, CUDA, m) {
  m.impl("low_rank_factors", &low_rank_factors_cuda);
  m.impl("centered_low_rank_sum", &centered_low_rank_sum_cuda);
  m.impl("_cholesky_qr2", &cholesky_qr2_cuda);
}

}  // namespace lowrank_merge
