// Batched steps without a loop over the matrices of a batch: a CholeskyQR2
// orthonormaliser and a small SVD through the eigendecomposition of an l x l
// Gram matrix. The CUDA path runs both as its EngineSteps, the CPU the second
// (see low_rank.h): on the CPU, Householder QR is about as fast for the last
// basis and LU faster for the power steps' (benchmarks/NOTES.md).
//
// Both are written with ATen calls only: on CUDA tensors every call below is a
// batched cuBLAS / cuSOLVER call on torch's own handles and current stream.
// Being device-generic, they also run on CPU tensors, which is how their
// numerics are checked on a machine without a GPU (tests/test_extension.py).
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <tuple>

#include "low_rank.h"

namespace lowrank_merge {

// An orthonormal basis of the columns of Y [..., m, p] and, per matrix of the
// batch ([...], bool), whether that matrix fell back to Householder QR.
struct OrthonormalBasis {
  at::Tensor Q;          // [..., m, min(m, p)]
  at::Tensor fell_back;  // [...], bool
};

// CholeskyQR2 (Fukaya, Nakatsukasa, Yanagisawa & Yamamoto 2014) with a
// per-matrix Householder fallback; see batched_steps.cpp for when it falls back.
OrthonormalBasis cholesky_qr2(const at::Tensor& Y);

// cholesky_qr2(Y).Q: the EngineSteps::orthonormal_basis of the CUDA path.
at::Tensor cholesky_qr2_orthonormal_basis(const at::Tensor& Y);

// That Q and R [..., p, p] with Y = Q R: the EngineSteps::iteration_basis_and_factor
// of the CUDA path.
std::tuple<at::Tensor, at::Tensor> cholesky_qr2_basis_and_factor(const at::Tensor& Y);

// (gram_eigh_svd_of_projection, the small SVD of every device, is declared in
// low_rank.h.)

// A factor [..., k] (dim = -1, e.g. U) or [..., k, n] (dim = -2, e.g. Vh) whose
// k axis follows the order of the singular values.
struct FactorAxis {
  at::Tensor* factor;
  int64_t dim;
};

// Sorts S [..., k] descending and reorders every factor's k axis alike. The
// factors arrive in the order of the eigenvalues they came from (descending),
// which the norms S follow but for rounding among near-equal values, so the
// gathers (one pass over each factor, the [k, n] side as costly as a small GEMM)
// run only when S is out of order; checking costs one host synchronisation.
void sort_by_descending_values(at::Tensor& S, std::initializer_list<FactorAxis> factors);

// The EngineSteps of the CUDA path: CholeskyQR2 for both bases, and the default small SVD.
EngineSteps batched_engine_steps();

}  // namespace lowrank_merge
