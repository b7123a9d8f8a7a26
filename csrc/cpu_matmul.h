// The engines' matrix products, and on the CPU the library that runs them.
//
// torch's CPU matmul calls the BLAS (MKL in the x86 wheels). MKL picks its
// fastest kernels on Intel CPUs; on the 2-core AMD EPYC (Zen 4) VM its float32
// products ran at 115-170 GFLOP/s where oneDNN's inner product, the JIT'd
// kernel torch ships for nn.Linear, ran the same products at 135-204 (the
// engines' shapes, 18-45 % faster; benchmarks/NOTES.md, 2026-12-03 second
// session). Both compute in float32 (oneDNN's default "strict" math mode;
// reduced precision only where the user allowed it for torch's own float32
// matmuls through torch.backends.mkldnn, as for torch.matmul).
//
// The backend is chosen by the Python layer (lowrank_merge.set_cpu_matmul_backend:
// oneDNN by default on AMD CPUs, the BLAS elsewhere) through the private op
// _set_cpu_matmul_backend. The twin: lowrank_merge.engines.matrix_product.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace lowrank_merge {

// "blas" or "onednn"; raises for other names, or "onednn" where this torch
// has no oneDNN inner product kernel on the CPU.
void set_cpu_matmul_backend(const std::string& name);

// left [..., m, k] @ right [..., k, n] (batch dimensions broadcast), row-major
// like at::matmul's result. Through oneDNN where the backend is "onednn", both
// are float32 CPU tensors, a matrix product has at least
// kOneDnnMinMultiplyAdds multiply-adds (smaller ones: its ~20 us per call
// loses to the BLAS), right's matrices are dense and column-major, and
// left is row-major or smaller than right (then copied once); at::matmul
// otherwise.
at::Tensor matrix_product(const at::Tensor& left, const at::Tensor& right);

// Measured on the AMD VM: [8, 256, 256] @ [8, 256, 32] (2.1 M multiply-adds per
// matrix) 0.20 ms BLAS against 0.32 oneDNN; [8, 768, 768] @ [8, 768, 32] (18.9 M)
// 2.2 against 1.7 ms.
constexpr int64_t kOneDnnMinMultiplyAdds = int64_t{1} << 23;

}  // namespace lowrank_merge
