// Op schemas and their CPU kernels.
//
// lowrank_merge::low_rank_factors(Tensor A, int k, str engine, int niter, Tensor? omega)
//     -> (Tensor U, Tensor S, Tensor Vh)
// lowrank_merge::centered_low_rank_sum(Tensor stack, int k, str engine, int niter, Tensor? omega)
//     -> (Tensor average, Tensor delta)
//
// The CUDA kernels of the same ops live in csrc/cuda/ and are registered there.
#include <Python.h>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "low_rank.h"

namespace lowrank_merge {
namespace {

// One pass over the T inputs: for each element, read its T values, write their
// mean and the T centered values. stack is [T, m, n], contiguous.
template <typename scalar_t>
void average_and_center_kernel(
    const scalar_t* stack, scalar_t* average, scalar_t* centered, int64_t tasks, int64_t size) {
  at::parallel_for(0, size, /*grain_size=*/4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scalar_t sum = 0;
      for (int64_t t = 0; t < tasks; ++t) sum += stack[t * size + i];
      const scalar_t mean = sum / static_cast<scalar_t>(tasks);
      average[i] = mean;
      for (int64_t t = 0; t < tasks; ++t) centered[t * size + i] = stack[t * size + i] - mean;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> average_and_center_cpu(const at::Tensor& stack_in) {
  auto stack = stack_in.contiguous();
  auto average = at::empty({stack.size(1), stack.size(2)}, stack.options());
  auto centered = at::empty_like(stack);
  AT_DISPATCH_FLOATING_TYPES(stack.scalar_type(), "average_and_center_cpu", [&] {
    average_and_center_kernel<scalar_t>(
        stack.const_data_ptr<scalar_t>(), average.mutable_data_ptr<scalar_t>(),
        centered.mutable_data_ptr<scalar_t>(), stack.size(0), average.numel());
  });
  return {average, centered};
}

Factors low_rank_factors_cpu(
    const at::Tensor& A, int64_t k, c10::string_view engine, int64_t niter, const std::optional<at::Tensor>& omega) {
  const std::string engine_name(engine);
  check_factor_args(A, k, engine_name, niter, omega);
  return low_rank_factors_generic(A, k, engine_name, niter, omega);
}

std::tuple<at::Tensor, at::Tensor> centered_low_rank_sum_cpu(
    const at::Tensor& stack, int64_t k, c10::string_view engine, int64_t niter,
    const std::optional<at::Tensor>& omega) {
  const std::string engine_name(engine);
  TORCH_CHECK(stack.dim() == 3, "lowrank_merge: expected a [T, m, n] stack, got ", stack.dim(), " dims");
  check_factor_args(stack, k, engine_name, niter, omega);
  auto [average, centered] = average_and_center_cpu(stack);
  auto [U, S, Vh] = low_rank_factors_generic(centered, k, engine_name, niter, omega);
  return {average, sum_of_reconstructions(U, S, Vh)};
}

}  // namespace

TORCH_LIBRARY(lowrank_merge, m) {
  m.def("low_rank_factors(Tensor A, int k, str engine, int niter, Tensor? omega) -> (Tensor, Tensor, Tensor)");
  m.def("centered_low_rank_sum(Tensor stack, int k, str engine, int niter, Tensor? omega) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lowrank_merge, CPU, m) {
  m.impl("low_rank_factors", &low_rank_factors_cpu);
  m.impl("centered_low_rank_sum", &centered_low_rank_sum_cpu);
}

}  // namespace lowrank_merge

// A bare Python module: importing lowrank_merge._C runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
