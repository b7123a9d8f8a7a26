// The fused centering kernel of the CUDA path. Plain CUDA, no ATen: the .cu
// file stays quick to compile; the ATen wrapper (checks, allocation, dtype
// dispatch, current stream) is average_and_center_cuda in cuda_ops.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace lowrank_merge {

// One pass over a contiguous stack [T, m, n] of `size` = m * n elements per
// matrix: average[i] = (sum over t in task order of stack[t][i]) / T and
// centered[t][i] = stack[t][i] - average[i], in the input precision (equal to
// the CPU's ATen mean and subtraction up to the order of the T additions).
// Launched on `stream`; returns cudaGetLastError() after the launch. Uses
// 16-byte loads and stores when size is a multiple of 16 / sizeof(scalar_t)
// and the three pointers are 16-byte aligned. Instantiated for float and double.
template <typename scalar_t>
cudaError_t launch_average_and_center(
    const scalar_t* stack, scalar_t* average, scalar_t* centered, int64_t tasks, int64_t size,
    int multiprocessors, cudaStream_t stream);

}  // namespace lowrank_merge
