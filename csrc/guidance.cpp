// guidance.cpp — CPU reference for the CFG combine (see guidance.h).
#include "guidance.h"

namespace skyrt {
namespace cpu {

int cfg_combine(const float* cond, const float* uncond, float* out, std::size_t n, float scale) {
  if (n > 0 && (cond == nullptr || uncond == nullptr || out == nullptr)) return kInvalidArgument;
  for (std::size_t i = 0; i < n; ++i) out[i] = cfg_combine_one(cond[i], uncond[i], scale);
  return kOk;
}

}  // namespace cpu

#ifndef SKYRT_WITH_CUDA
namespace cuda {
int cfg_combine(const float*, const float*, float*, std::size_t, float, void*) { return kNotCompiled; }
}  // namespace cuda
#endif

}  // namespace skyrt
