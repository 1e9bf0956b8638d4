// samplers.cu — CUDA kernels for the samplers: flow_euler, flow_unipc, addnoise_condition, flow_fewstep,
// addnoise_prefix.
// CPU references with the same names and arguments in ../samplers.cpp; the per-element math is
// shared through samplers.h. Per-frame arrays (dt, update, coeffs) are device pointers.
// Compiled in CI with nvcc; executed only on a user's GPU.
#include <cuda_runtime.h>
#include "cuda/launch.cuh"
#include "samplers.h"

namespace skyrt {
namespace cuda {

namespace {

__global__ void flow_euler_kernel(const float* x, const float* v, float* out, const float* dt, const uint8_t* update,
                                  int64_t frames, int64_t inner, int64_t n) {
  SKYRT_GRID_STRIDE(i, n) {
    const int64_t f = frame_of(i, frames, inner);
    out[i] = (update == nullptr || update[f]) ? flow_euler_one(x[i], v[i], dt[f]) : x[i];
  }
}

__global__ void flow_unipc_kernel(const float* x, const float* v, float* out, float* x_last, float* m1, float* m2,
                                  const UniPCFrameCoeffs* coeffs, int64_t frames, int64_t inner, int64_t n,
                                  bool official_df_aliasing) {
  SKYRT_GRID_STRIDE(i, n) {
    const UniPCFrameCoeffs c = coeffs[frame_of(i, frames, inner)];
    out[i] = c.update != 0.0f ? flow_unipc_one(c, x[i], v[i], &x_last[i], &m1[i], &m2[i], official_df_aliasing) : x[i];
  }
}

__global__ void addnoise_condition_kernel(const float* x, const float* noise, float* out, int64_t frames,
                                          int64_t inner, int64_t frame_begin, int64_t frame_end, float keep,
                                          float factor, int64_t n) {
  SKYRT_GRID_STRIDE(i, n) {
    const int64_t f = frame_of(i, frames, inner);
    out[i] = (f >= frame_begin && f < frame_end) ? addnoise_one(x[i], noise[i], keep, factor) : x[i];
  }
}

__global__ void flow_fewstep_kernel(const float* x, const float* v, const float* noise, float* out, int64_t n,
                                    float sigma, float keep, float next_sigma) {
  SKYRT_GRID_STRIDE(i, n) {
    const float x0 = fewstep_x0_one(x[i], v[i], sigma);
    out[i] = noise == nullptr ? x0 : renoise_one(x0, noise[i], keep, next_sigma);
  }
}

__global__ void addnoise_prefix_kernel(float* x, const float* noise, int64_t frames, int64_t prefix, int64_t inner,
                                       int64_t noise_n, float keep, float factor, int64_t n) {
  SKYRT_GRID_STRIDE(i, n) {
    float& xi = x[prefix_element(i, frames, prefix, inner)];
    xi = addnoise_one(xi, noise[i % noise_n], keep, factor);
  }
}

#undef SKYRT_GRID_STRIDE

}  // namespace

int flow_euler(const float* x, const float* v, float* out, const float* dt, const uint8_t* update, int64_t outer,
               int64_t frames, int64_t inner, void* stream) {
  if (frame_layout_check(outer, frames, inner) != kOk) return kInvalidArgument;
  const int64_t n = outer * frames * inner;
  if (n == 0) return kOk;
  if (x == nullptr || v == nullptr || out == nullptr || dt == nullptr) return kInvalidArgument;
  flow_euler_kernel<<<grid_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(x, v, out, dt, update, frames,
                                                                                      inner, n);
  return launch_status();
}

int flow_unipc(const float* x, const float* v, float* out, float* x_last, float* m1, float* m2,
               const UniPCFrameCoeffs* coeffs, int64_t outer, int64_t frames, int64_t inner, bool official_df_aliasing,
               void* stream) {
  if (frame_layout_check(outer, frames, inner) != kOk) return kInvalidArgument;
  const int64_t n = outer * frames * inner;
  if (n == 0) return kOk;
  if (x == nullptr || v == nullptr || out == nullptr || x_last == nullptr || m1 == nullptr || m2 == nullptr ||
      coeffs == nullptr)
    return kInvalidArgument;
  flow_unipc_kernel<<<grid_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(x, v, out, x_last, m1, m2,
                                                                                      coeffs, frames, inner, n,
                                                                                      official_df_aliasing);
  return launch_status();
}

int addnoise_condition(const float* x, const float* noise, float* out, int64_t outer, int64_t frames, int64_t inner,
                       int64_t frame_begin, int64_t frame_end, double factor, void* stream) {
  if (frame_layout_check(outer, frames, inner) != kOk) return kInvalidArgument;
  const int64_t n = outer * frames * inner;
  if (n == 0) return kOk;
  if (x == nullptr || noise == nullptr || out == nullptr) return kInvalidArgument;
  addnoise_condition_kernel<<<grid_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      x, noise, out, frames, inner, frame_begin, frame_end, addnoise_keep(factor), static_cast<float>(factor), n);
  return launch_status();
}

int flow_fewstep(const float* x, const float* v, const float* noise, float* out, int64_t n, float sigma,
                 float next_sigma, void* stream) {
  if (!fewstep_args_ok(x, v, out, n, sigma, next_sigma)) return kInvalidArgument;
  if (n == 0) return kOk;
  flow_fewstep_kernel<<<grid_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      x, v, noise, out, n, sigma, renoise_keep(next_sigma), next_sigma);
  return launch_status();
}

int addnoise_prefix(float* x, const float* noise, int64_t outer, int64_t frames, int64_t prefix, int64_t inner,
                    int64_t noise_outer, double factor, void* stream) {
  if (prefix_layout_check(outer, frames, prefix, inner, noise_outer) != kOk) return kInvalidArgument;
  const int64_t n = outer * prefix * inner;
  if (n == 0) return kOk;
  if (x == nullptr || noise == nullptr) return kInvalidArgument;
  addnoise_prefix_kernel<<<grid_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      x, noise, frames, prefix, inner, noise_outer * prefix * inner, addnoise_keep(factor), static_cast<float>(factor),
      n);
  return launch_status();
}

}  // namespace cuda
}  // namespace skyrt
