// Device-generic ATen implementations of the per-layer ops.
//
// These mirror lowrank_merge/engines.py step for step, so that the C++ and the
// pure-torch paths agree to rounding. They are written with ATen calls only and
// therefore run on any device; device-specific kernels (the fused centering on
// CPU, csrc/cuda/ on GPU) plug in around them.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace lowrank_merge {

using Factors = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Top-k factors U [..., m, k], S [..., k], Vh [..., k, n] of A [..., m, n].
// engine: "exact", "randomized", "krylov" or "gram"; omega [n, l] is the shared
// Gaussian sketch needed by the two sketch engines.
Factors low_rank_factors_generic(
    const at::Tensor& A, int64_t k, const std::string& engine, int64_t niter,
    const std::optional<at::Tensor>& omega);

// Sum over t of U_t diag(S_t) Vh_t as one product of concatenated factors:
// U [T, m, k], S [T, k], Vh [T, k, n] -> [m, n].
at::Tensor sum_of_reconstructions(const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh);

// Argument checks shared by every device's kernels; they raise c10::Error
// (a RuntimeError in Python) with a message that says what is wrong.
void check_factor_args(
    const at::Tensor& A, int64_t k, const std::string& engine, int64_t niter,
    const std::optional<at::Tensor>& omega);

}  // namespace lowrank_merge
