// guidance.cu — CUDA kernel for the CFG combine; CPU reference in ../guidance.cpp.
// Compiled in CI with nvcc; executed only on a user's GPU (benchmarks/gpu_validate.py).
#include <cuda_runtime.h>
#include "guidance.h"

namespace skyrt {
namespace cuda {

__global__ void cfg_combine_kernel(const float* cond, const float* uncond, float* out, std::size_t n,
                                   float scale) {
  std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i < n) out[i] = cfg_combine_one(cond[i], uncond[i], scale);
}

int cfg_combine(const float* cond, const float* uncond, float* out, std::size_t n, float scale,
                void* stream) {
  if (n == 0) return kOk;
  if (cond == nullptr || uncond == nullptr || out == nullptr) return kInvalidArgument;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((n + threads - 1) / threads);
  cfg_combine_kernel<<<blocks, threads, 0, static_cast<cudaStream_t>(stream)>>>(cond, uncond, out, n,
                                                                                 scale);
  return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
}

}  // namespace cuda
}  // namespace skyrt
