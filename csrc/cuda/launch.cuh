// launch.cuh — launch helpers shared by the CUDA kernels: grid size, grid-stride loop, status.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include "common.h"

namespace skyrt {
namespace cuda {

constexpr int kThreads = 256;

// Blocks for n elements, capped; kernels use grid-stride loops to cover the rest.
inline unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 * 16 ? blocks : 65535 * 16);
}

inline int launch_status() { return cudaGetLastError() == cudaSuccess ? kOk : kCudaError; }

#define SKYRT_GRID_STRIDE(i, n)                                                                       \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n);              \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

}  // namespace cuda
}  // namespace skyrt
