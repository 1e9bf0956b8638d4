// guidance.h — classifier-free guidance combine: out = uncond + scale * (cond - uncond).
// CPU reference `cfg_combine` (guidance.cpp) and CUDA kernel `cfg_combine` (cuda/guidance.cu) share
// cfg_combine_one and take the same arguments: raw float32 pointers, an element count, a stream.
#pragma once
#include <cstddef>
#include "common.h"

namespace skyrt {

SKYRT_HD float cfg_combine_one(float cond, float uncond, float scale) {
  return uncond + scale * (cond - uncond);
}

namespace cpu {
int cfg_combine(const float* cond, const float* uncond, float* out, std::size_t n, float scale);
}  // namespace cpu

namespace cuda {
// `stream` is a cudaStream_t passed as an opaque pointer so this header needs no CUDA includes.
int cfg_combine(const float* cond, const float* uncond, float* out, std::size_t n, float scale,
                void* stream);
}  // namespace cuda

}  // namespace skyrt
