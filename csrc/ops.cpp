// Op schemas and their CPU kernels.
//
// lowrank_merge::low_rank_factors(Tensor A, int k, str engine, int niter, Tensor? omega)
//     -> (Tensor U, Tensor S, Tensor Vh)
// lowrank_merge::centered_low_rank_sum(Tensor stack, int k, str engine, int niter, Tensor? omega)
//     -> (Tensor average, Tensor delta)
//
// and private ops: _cholesky_qr2 and _low_rank_factors_batched_steps for the tests; _begin_huge_pages,
// _end_huge_pages and _set_cpu_matmul_backend for the Python layer.
//
// The CUDA kernels of the same ops live in csrc/cuda/ and are registered there.
#include <Python.h>

#include <torch/library.h>

#include "batched_steps.h"
#include "cpu_matmul.h"
#include "huge_pages.h"
#include "low_rank.h"

#include <vector>

namespace lowrank_merge {
namespace {

// The average [m, n] of a stack [T, m, n], as a sum divided by T: the same bits
// as stack.mean(0) without mean's filled temporary (0.12 against 0.41 s for
// [8, 4096, 14336] float32); the twin is lowrank_merge.engines.task_average.
// The centering below is ATen's vectorised subtraction: with the sum, two
// passes, but measured twice as fast (33 vs 70 ms for 8 x 3072 x 768 fp32 on 2
// cores) as a fused one-pass loop compiled for the baseline x86-64 ISA, because
// ATen's kernels are dispatched to AVX2/AVX-512. The GPU path fuses both into
// one kernel (csrc/cuda/average_and_center.cu), where the pass count matters.
at::Tensor task_average(const at::Tensor& stack) {
  return stack.sum(0).div_(stack.size(0));
}

// A stack whose matrices have at least this many elements is decomposed task by
// task, each task centered into one reused [m, n] buffer: no centered copy of
// the stack ((T - 1) m n fewer elements in memory, 1.6 GB for 8 x 4096 x 14336
// fp32, and none of that copy's first touches), with the batched path's results
// (bit for bit where its batched products are per-matrix ones, as under oneDNN).
// Smaller matrices are centered as one stack and decomposed as one batch, whose
// calls cost less per matrix: on the ViT-B shapes (2.4 M elements or fewer) task
// by task was 4-17 % slower, from [8, 2048, 2048] up even or faster
// (benchmarks/NOTES.md). The twin: lowrank_merge.engines.PER_TASK_MIN_ELEMENTS.
constexpr int64_t kPerTaskMinElements = int64_t{1} << 22;

Factors stacked(const std::vector<Factors>& per_task) {
  std::vector<at::Tensor> U, S, Vh;
  for (const auto& [u, s, vh] : per_task) {
    U.push_back(u);
    S.push_back(s);
    Vh.push_back(vh);
  }
  return {at::stack(U), at::stack(S), at::stack(Vh)};
}

// Top-k factors [T, ...] of each centered task stack[t] - average, one task at a time.
Factors factors_task_by_task(
    const at::Tensor& stack, const at::Tensor& average, int64_t k, const std::string& engine, int64_t niter,
    const std::optional<at::Tensor>& omega) {
  auto centered_task = at::empty_like(average);
  std::vector<Factors> per_task;
  for (int64_t t = 0; t < stack.size(0); ++t) {
    at::sub_out(centered_task, stack[t], average);
    per_task.push_back(low_rank_factors_generic(centered_task, k, engine, niter, omega));
  }
  return stacked(per_task);
}

Factors low_rank_factors_cpu(
    const at::Tensor& A, int64_t k, c10::string_view engine, int64_t niter, const std::optional<at::Tensor>& omega) {
  const std::string engine_name(engine);
  check_factor_args(A, k, engine_name, niter, omega);
  HugePageScope huge_pages;
  return low_rank_factors_generic(A, k, engine_name, niter, omega);
}

std::tuple<at::Tensor, at::Tensor> centered_low_rank_sum_cpu(
    const at::Tensor& stack, int64_t k, c10::string_view engine, int64_t niter,
    const std::optional<at::Tensor>& omega) {
  const std::string engine_name(engine);
  TORCH_CHECK(stack.dim() == 3, "lowrank_merge: expected a [T, m, n] stack, got ", stack.dim(), " dims");
  check_factor_args(stack, k, engine_name, niter, omega);
  HugePageScope huge_pages;
  const auto average = task_average(stack);
  const auto [U, S, Vh] = stack.size(1) * stack.size(2) >= kPerTaskMinElements
      ? factors_task_by_task(stack, average, k, engine_name, niter, omega)
      : low_rank_factors_generic(stack - average, k, engine_name, niter, omega);
  return {average, sum_of_reconstructions(U, S, Vh)};
}

std::tuple<at::Tensor, at::Tensor> cholesky_qr2_cpu(const at::Tensor& Y) {
  TORCH_CHECK(Y.dim() >= 2, "lowrank_merge::_cholesky_qr2: expected [..., m, p], got ", Y.dim(), " dims");
  TORCH_CHECK(
      Y.scalar_type() == at::kFloat || Y.scalar_type() == at::kDouble,
      "lowrank_merge::_cholesky_qr2: expected float32 or float64, got ", Y.scalar_type());
  auto basis = cholesky_qr2(Y);
  return {basis.Q, basis.fell_back};
}

// low_rank_factors with the CUDA path's EngineSteps (CholeskyQR2 bases), on CPU
// tensors: the CUDA engines' numerics, checked on a machine without a GPU.
Factors low_rank_factors_batched_steps_cpu(
    const at::Tensor& A, int64_t k, c10::string_view engine, int64_t niter, const std::optional<at::Tensor>& omega) {
  const std::string engine_name(engine);
  check_factor_args(A, k, engine_name, niter, omega);
  return low_rank_factors_generic(A, k, engine_name, niter, omega, batched_engine_steps());
}

}  // namespace

TORCH_LIBRARY(lowrank_merge, m) {
  m.def("low_rank_factors(Tensor A, int k, str engine, int niter, Tensor? omega) -> (Tensor, Tensor, Tensor)");
  m.def("centered_low_rank_sum(Tensor stack, int k, str engine, int niter, Tensor? omega) -> (Tensor, Tensor)");
  // Private: the CholeskyQR2 orthonormaliser alone, and which matrices of the
  // batch fell back to Householder QR. For tests (test_extension.py, test_cuda.py).
  m.def("_cholesky_qr2(Tensor Y) -> (Tensor Q, Tensor fell_back)");
  // Private: low_rank_factors with the CUDA path's steps, on the CPU (tests).
  m.def(
      "_low_rank_factors_batched_steps(Tensor A, int k, str engine, int niter, Tensor? omega) "
      "-> (Tensor, Tensor, Tensor)");
  // Private: open and close a huge-page scope (csrc/huge_pages.h) around the
  // Python layer's per-layer work (lowrank_merge._ops.huge_page_allocations).
  m.def("_begin_huge_pages() -> ()", &begin_huge_pages);
  m.def("_end_huge_pages() -> ()", &end_huge_pages);
  m.def("_huge_page_pool_bytes() -> (int idle, int live, int peak_live)", &huge_page_pool_bytes);
  // Private: which library runs the float32 CPU products (csrc/cpu_matmul.h);
  // set by lowrank_merge.set_cpu_matmul_backend.
  m.def("_set_cpu_matmul_backend(str name) -> ()", [](c10::string_view name) {
    set_cpu_matmul_backend(std::string(name));
  });
}

TORCH_LIBRARY_IMPL(lowrank_merge, CPU, m) {
  m.impl("low_rank_factors", &low_rank_factors_cpu);
  m.impl("centered_low_rank_sum", &centered_low_rank_sum_cpu);
  m.impl("_cholesky_qr2", &cholesky_qr2_cpu);
  m.impl("_low_rank_factors_batched_steps", &low_rank_factors_batched_steps_cpu);
}

}  // namespace lowrank_merge

// A bare Python module: importing lowrank_merge._C runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
