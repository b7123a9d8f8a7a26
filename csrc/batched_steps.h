// Batched steps without a loop over the matrices of a batch: a CholeskyQR2
// orthonormaliser and a small SVD through the eigendecomposition of an l x l
// Gram matrix. The CUDA path runs both as its EngineSteps (see low_rank.h); the
// gram_subspace engine orthonormalises its iterations with CholeskyQR2 on every
// device (on the CPU it beats Householder QR on those [s, l] blocks: 83 against
// 95 ms for the whole 768 x 768, 8-task engine, benchmarks/NOTES.md).
//
// Both are written with ATen calls only: on CUDA tensors every call below is a
// batched cuBLAS / cuSOLVER call on torch's own handles and current stream.
// Being device-generic, they also run on CPU tensors, which is how their
// numerics are checked on a machine without a GPU (tests/test_extension.py).
#pragma once

#include <ATen/ATen.h>

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

// Top-k factors of Q Q^T A for an orthonormal Q [..., m, l], from the
// eigendecomposition of the l x l Gram matrix of B = Q^T A (formed and
// decomposed in float64): the EngineSteps::truncated_svd_of_projection of the
// CUDA path.
Factors gram_eigh_svd_of_projection(const at::Tensor& Q, const at::Tensor& A, int64_t k);

// The EngineSteps of the CUDA path: {cholesky_qr2_orthonormal_basis,
// gram_eigh_svd_of_projection}.
EngineSteps batched_engine_steps();

}  // namespace lowrank_merge
