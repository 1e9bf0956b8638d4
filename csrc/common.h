// common.h — shared definitions for the skyrt core.
// SKYRT_HD marks per-element math that both the CPU references and the CUDA kernels call, so the
// two can never drift apart: a kernel differs from its reference only in how it walks the data.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define SKYRT_HD __host__ __device__ __forceinline__
#else
#define SKYRT_HD inline
#endif

namespace skyrt {

// Every kernel and CPU reference returns one of these; only the binding layer turns them into
// Python exceptions.
enum Status : int {
  kOk = 0,
  kInvalidArgument = 1,
  kCudaError = 2,
  kNotCompiled = 3,
};

inline const char* status_message(int status) {
  switch (status) {
    case kOk: return "ok";
    case kInvalidArgument: return "invalid argument";
    case kCudaError: return "CUDA error";
    case kNotCompiled: return "this build of skyrt._core has no CUDA kernels (rebuild with the CUDA toolkit)";
    default: return "unknown status";
  }
}

}  // namespace skyrt
