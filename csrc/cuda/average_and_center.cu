#include "average_and_center.h"

#include <algorithm>
#include <cstdint>

namespace lowrank_merge {
namespace {

constexpr int kThreads = 256;

// kVec consecutive elements moved as one 16-byte (or, for kVec = 1, scalar)
// load/store: float4-like for float32, double2-like for float64.
template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

// Grid-stride loop over the packs of one [m, n] matrix. For pack i it reads the
// T packs stack[t][i], writes their mean to average[i] and the T differences
// to centered[t][i].
//
// kCache > 0 (requires tasks <= kCache): the T packs stay in registers between
// the sum and the subtraction, so every input byte is read from memory once.
// kCache == 0 (any T): the second loop reads the inputs again; those reads are
// recent and mostly hit L2.
//
// The arithmetic: sum = 0, then sum += x_t in task order, mean = sum / T (an
// IEEE division, not a multiplication by 1/T; nvcc keeps '/' correctly rounded
// unless -use_fast_math or -prec-div=false), centered = x_t - mean. It agrees
// with the CPU's ATen mean (csrc/ops.cpp) to rounding: ATen may sum in another
// order.
template <typename scalar_t, int kVec, int kCache>
__global__ void __launch_bounds__(kThreads) average_and_center_kernel(
    const scalar_t* __restrict__ stack, scalar_t* __restrict__ average, scalar_t* __restrict__ centered,
    int64_t tasks, int64_t packs) {
  using pack_t = Pack<scalar_t, kVec>;
  const auto* in = reinterpret_cast<const pack_t*>(stack);
  auto* avg = reinterpret_cast<pack_t*>(average);
  auto* out = reinterpret_cast<pack_t*>(centered);
  const auto divisor = static_cast<scalar_t>(tasks);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;

  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < packs; i += stride) {
    pack_t sum, mean;
#pragma unroll
    for (int j = 0; j < kVec; ++j) sum.v[j] = scalar_t(0);

    if constexpr (kCache > 0) {
      pack_t cache[kCache];
#pragma unroll
      for (int t = 0; t < kCache; ++t) {
        if (t < tasks) {
          cache[t] = in[t * packs + i];
#pragma unroll
          for (int j = 0; j < kVec; ++j) sum.v[j] += cache[t].v[j];
        }
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) mean.v[j] = sum.v[j] / divisor;
      avg[i] = mean;
#pragma unroll
      for (int t = 0; t < kCache; ++t) {
        if (t < tasks) {
          pack_t diff;
#pragma unroll
          for (int j = 0; j < kVec; ++j) diff.v[j] = cache[t].v[j] - mean.v[j];
          out[t * packs + i] = diff;
        }
      }
    } else {
      for (int64_t t = 0; t < tasks; ++t) {
        const pack_t x = in[t * packs + i];
#pragma unroll
        for (int j = 0; j < kVec; ++j) sum.v[j] += x.v[j];
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) mean.v[j] = sum.v[j] / divisor;
      avg[i] = mean;
      for (int64_t t = 0; t < tasks; ++t) {
        const pack_t x = in[t * packs + i];
        pack_t diff;
#pragma unroll
        for (int j = 0; j < kVec; ++j) diff.v[j] = x.v[j] - mean.v[j];
        out[t * packs + i] = diff;
      }
    }
  }
}

template <typename scalar_t, int kVec>
void launch(
    const scalar_t* stack, scalar_t* average, scalar_t* centered, int64_t tasks, int64_t size,
    int multiprocessors, cudaStream_t stream) {
  const int64_t packs = size / kVec;
  // Enough blocks to fill the GPU several times over; the grid-stride loop
  // covers the rest (and keeps the grid within limits for any size).
  const int64_t max_blocks = static_cast<int64_t>(std::max(multiprocessors, 1)) * 16;
  const auto blocks =
      static_cast<unsigned int>(std::max<int64_t>(1, std::min((packs + kThreads - 1) / kThreads, max_blocks)));
  if (tasks <= 8) {
    average_and_center_kernel<scalar_t, kVec, 8><<<blocks, kThreads, 0, stream>>>(stack, average, centered, tasks, packs);
  } else if (tasks <= 16) {
    average_and_center_kernel<scalar_t, kVec, 16><<<blocks, kThreads, 0, stream>>>(stack, average, centered, tasks, packs);
  } else if (tasks <= 32) {
    average_and_center_kernel<scalar_t, kVec, 32><<<blocks, kThreads, 0, stream>>>(stack, average, centered, tasks, packs);
  } else {
    average_and_center_kernel<scalar_t, kVec, 0><<<blocks, kThreads, 0, stream>>>(stack, average, centered, tasks, packs);
  }
}

bool is_aligned(const void* pointer, std::uintptr_t bytes) {
  return reinterpret_cast<std::uintptr_t>(pointer) % bytes == 0;
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_average_and_center(
    const scalar_t* stack, scalar_t* average, scalar_t* centered, int64_t tasks, int64_t size,
    int multiprocessors, cudaStream_t stream) {
  if (size <= 0 || tasks <= 0) return cudaGetLastError();  // nothing to launch
  constexpr int kVec = 16 / sizeof(scalar_t);  // 4 floats or 2 doubles
  // Every matrix of the stack starts at a multiple of `size` elements, so when
  // size is a multiple of kVec and the three base pointers are 16-byte aligned
  // (fresh allocations are; a view at an offset may not be), every pack is.
  if (size % kVec == 0 && is_aligned(stack, 16) && is_aligned(average, 16) && is_aligned(centered, 16)) {
    launch<scalar_t, kVec>(stack, average, centered, tasks, size, multiprocessors, stream);
  } else {
    launch<scalar_t, 1>(stack, average, centered, tasks, size, multiprocessors, stream);
  }
  return cudaGetLastError();
}

template cudaError_t launch_average_and_center<float>(
    const float*, float*, float*, int64_t, int64_t, int, cudaStream_t);
template cudaError_t launch_average_and_center<double>(
    const double*, double*, double*, int64_t, int64_t, int, cudaStream_t);

}  // namespace lowrank_merge
