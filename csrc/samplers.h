// samplers.h — per-frame samplers for diffusion forcing as fused elementwise kernels.
//
// In diffusion forcing every latent frame is at its own step, so each frame has its own
// coefficients; one call updates many frames at once. Arrays are float32 and C-contiguous with a
// frame axis: element i belongs to frame (i / inner) % frames, i.e. the shape is
// [outer, frames, inner] (latents [C, F, H, W]: outer = C, inner = H*W).
//
//   flow_euler          out = x + dt[f] * v                   (flow matching Euler; dt = σ_next - σ)
//   flow_unipc          one step of the official FlowUniPCMultistepScheduler (order 2, bh2,
//                       predict_x0, flow_prediction): x0 conversion m = x - σ_k v, the UniC
//                       corrector (steps k >= 1), then the UniP predictor; per-frame coefficients
//                       come from unipc_frame_coeffs (host, double), the kernel does the elementwise
//                       part and keeps each frame's history (last sample, two last x0 predictions)
//   addnoise_condition  out = x * (1 - a) + noise * a on frames [frame_begin, frame_end)
//                       (official prefix conditioning, a = 0.001 * addnoise_condition)
//   flow_fewstep        one step of the causal Wan family's few-step sampler (Self-Forcing, CausVid,
//                       LongLive): x0 = x - σ v in float64, rounded to float32 (their flow -> x0
//                       conversion), then, unless it is the block's last step, re-noised to the next
//                       step from fresh noise, out = (1 - σ') x0 + σ' noise in float32 (their
//                       add_noise); on the last step out = x0. One σ for the whole array (a block).
//   addnoise_prefix     the same in place on the first `prefix` frames of x [outer, frames, inner] from
//                       noise [noise_outer, prefix, inner], repeated over outer / noise_outer (window
//                       mode: the prefix frames of latents_in [B, C, F, hw], one noise [C, P, hw] for
//                       every prompt context)
//
// Frames that do not update this step are copied (out = x) and keep their history. `out` may alias
// `x`. CPU references (samplers.cpp) and CUDA kernels (cuda/samplers.cu) share the *_one functions
// below and take the same arguments (the CUDA ones add a stream).
#pragma once
#include <cstdint>
#include "common.h"

namespace skyrt {

// ---- per-frame UniPC coefficients ------------------------------------------------------------------
// Step k of a frame with sigmas σ_0 > ... > σ_S = 0, α = 1 - σ, λ = log α - log σ:
//   m  = x - σ_k v                                               (x0 prediction)
//   xc = c_scale x_last - c_alpha_phi m1                          (corrector, if corrector != 0)
//        - c_alpha_bh (c_rho_d1 (m2 - m1) + c_rho_t (m - m1))
//   x' = p_scale xc - p_alpha_phi m - p_alpha_bh_rho (m1 - m)      (predictor)
// with m1, m2 the frame's x0 predictions of steps k-1, k-2 and x_last its xc of step k-1; then
// x_last = xc, m2 = m1, m1 = m. Orders follow the official warm-up and lower_order_final rules.
//
// official_df_aliasing: what the official DF loop (and diffusers' port) really computes. It hands
// the scheduler a view of its latent buffer as `sample` and writes the result into that view; the
// scheduler keeps `sample` as its last sample, so after the FIRST step (no corrector yet) the
// kept sample is the step's output x_{k+1}, not its input. With the flag, x_last = out on a frame's
// first step (the corrector of step 1 then starts from x_1; ~1e-2 apart from the plain scheduler).
// tests/window_numpy_reference.py FlowUniPCScheduler(official_df_aliasing=True) is the numpy twin (the
// host engine window mode ran before the core).
struct UniPCFrameCoeffs {
  float update;          // 1: step this frame; 0: out = x, history untouched
  float sigma;           // σ_k
  float corrector;       // 0 (k = 0), 1 or 2: UniC order (2 reads m2)
  float c_scale;         // σ_k / σ_{k-1}
  float c_alpha_phi;     // α_k expm1(-h),  h = λ_k - λ_{k-1}
  float c_alpha_bh;      // α_k B(h), B(h) = expm1(-h) (bh2)
  float c_rho_d1;        // ρ_0 / r_1 (order 2), 0 otherwise
  float c_rho_t;         // ρ_last (0.5 for order 1)
  float predictor;       // 1 or 2: UniP order (2 reads m1)
  float p_scale;         // σ_{k+1} / σ_k
  float p_alpha_phi;     // α_{k+1} expm1(-h),  h = λ_{k+1} - λ_k
  float p_alpha_bh_rho;  // α_{k+1} B(h) 0.5 / r_1 (order 2), 0 otherwise
};
constexpr int kUniPCCoeffs = 12;
static_assert(sizeof(UniPCFrameCoeffs) == kUniPCCoeffs * sizeof(float), "UniPCFrameCoeffs is a float row");

// Coefficients for `frames` frames; steps[f] is frame f's step k in [0, S), or < 0 for "no update".
// sigmas: [num_sigmas = S + 1] with σ_0..σ_{S-1} in (0, 1) and σ_S in [0, 1). Host only.
int unipc_frame_coeffs(const double* sigmas, int64_t num_sigmas, const int64_t* steps, int64_t frames,
                       UniPCFrameCoeffs* out);

// ---- per-element math shared by host and device ----------------------------------------------------

SKYRT_HD float flow_euler_one(float x, float v, float dt) { return x + dt * v; }

SKYRT_HD float addnoise_one(float x, float noise, float keep, float factor) { return x * keep + noise * factor; }

// One UniPC step of one element; updates the history in place and returns the new sample.
SKYRT_HD float flow_unipc_one(const UniPCFrameCoeffs& c, float x, float v, float* x_last, float* m1, float* m2,
                              bool official_df_aliasing) {
  const float m = x - c.sigma * v;
  const float prev_m1 = *m1;
  float xc = x;
  if (c.corrector != 0.0f) {
    const float corr = c.corrector == 2.0f ? c.c_rho_d1 * (*m2 - prev_m1) : 0.0f;
    xc = c.c_scale * *x_last - c.c_alpha_phi * prev_m1 - c.c_alpha_bh * (corr + c.c_rho_t * (m - prev_m1));
  }
  float out = c.p_scale * xc - c.p_alpha_phi * m;
  if (c.predictor == 2.0f) out -= c.p_alpha_bh_rho * (prev_m1 - m);
  *x_last = (official_df_aliasing && c.corrector == 0.0f) ? out : xc;
  *m2 = prev_m1;
  *m1 = m;
  return out;
}

// Products and sums rounded one at a time, as separate torch ops round them (nvcc would otherwise fuse
// a * b + c into one FMA with one rounding; host builds target no FMA, so plain operators do the same).
SKYRT_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
SKYRT_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
SKYRT_HD double dmul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
SKYRT_HD double dsub_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

// Few-step x0 prediction: their `xt.double() - sigma.double() * flow_pred.double()`, back to float32.
SKYRT_HD float fewstep_x0_one(float x, float v, float sigma) {
  return static_cast<float>(dsub_rn(static_cast<double>(x), dmul_rn(static_cast<double>(sigma), static_cast<double>(v))));
}

// Their add_noise in float32: (1 - σ) x0 + σ noise, keep = 1 - σ computed in float32 by the caller.
SKYRT_HD float renoise_one(float x0, float noise, float keep, float sigma) {
  return add_rn(mul_rn(keep, x0), mul_rn(sigma, noise));
}

SKYRT_HD int64_t frame_of(int64_t i, int64_t frames, int64_t inner) { return (i / inner) % frames; }

// Element i of the prefix's [outer, prefix, inner] -> its index in x [outer, frames, inner].
SKYRT_HD int64_t prefix_element(int64_t i, int64_t frames, int64_t prefix, int64_t inner) {
  const int64_t per_outer = prefix * inner;
  return (i / per_outer) * frames * inner + i % per_outer;
}

// ---- CPU references and CUDA kernels ---------------------------------------------------------------
// dt: [frames]; update: [frames] or nullptr (all frames update); coeffs: [frames].
// x, v, out, x_last, m1, m2, noise: [outer * frames * inner].

namespace cpu {
int flow_euler(const float* x, const float* v, float* out, const float* dt, const uint8_t* update, int64_t outer,
               int64_t frames, int64_t inner);
int flow_unipc(const float* x, const float* v, float* out, float* x_last, float* m1, float* m2,
               const UniPCFrameCoeffs* coeffs, int64_t outer, int64_t frames, int64_t inner,
               bool official_df_aliasing);
int addnoise_condition(const float* x, const float* noise, float* out, int64_t outer, int64_t frames, int64_t inner,
                       int64_t frame_begin, int64_t frame_end, double factor);
// n elements; noise == nullptr: the last step (out = x0), else re-noised to next_sigma. out may alias x.
int flow_fewstep(const float* x, const float* v, const float* noise, float* out, int64_t n, float sigma,
                 float next_sigma);
int addnoise_prefix(float* x, const float* noise, int64_t outer, int64_t frames, int64_t prefix, int64_t inner,
                    int64_t noise_outer, double factor);
}  // namespace cpu

namespace cuda {
int flow_euler(const float* x, const float* v, float* out, const float* dt, const uint8_t* update, int64_t outer,
               int64_t frames, int64_t inner, void* stream);
int flow_unipc(const float* x, const float* v, float* out, float* x_last, float* m1, float* m2,
               const UniPCFrameCoeffs* coeffs, int64_t outer, int64_t frames, int64_t inner,
               bool official_df_aliasing, void* stream);
int addnoise_condition(const float* x, const float* noise, float* out, int64_t outer, int64_t frames, int64_t inner,
                       int64_t frame_begin, int64_t frame_end, double factor, void* stream);
int flow_fewstep(const float* x, const float* v, const float* noise, float* out, int64_t n, float sigma,
                 float next_sigma, void* stream);
int addnoise_prefix(float* x, const float* noise, int64_t outer, int64_t frames, int64_t prefix, int64_t inner,
                    int64_t noise_outer, double factor, void* stream);
}  // namespace cuda

// Shared argument checks.
inline int frame_layout_check(int64_t outer, int64_t frames, int64_t inner) {
  return (outer < 0 || frames < 0 || inner < 0) ? kInvalidArgument : kOk;
}

// addnoise_prefix's layout: outer a whole multiple of noise_outer, prefix <= frames.
inline int prefix_layout_check(int64_t outer, int64_t frames, int64_t prefix, int64_t inner, int64_t noise_outer) {
  if (frame_layout_check(outer, frames, inner) != kOk || prefix < 0 || prefix > frames || noise_outer < 1 ||
      outer % noise_outer != 0)
    return kInvalidArgument;
  return kOk;
}

// keep = 1 - factor rounded once from double, as torch does for `latent * (1.0 - factor)`.
inline float addnoise_keep(double factor) { return static_cast<float>(1.0 - factor); }

// keep = 1 - σ' in float32, as their `1 - sigma` on a float32 tensor.
inline float renoise_keep(float sigma) { return 1.0f - sigma; }

inline bool fewstep_args_ok(const float* x, const float* v, const float* out, int64_t n, float sigma, float next_sigma) {
  return n >= 0 && (n == 0 || (x != nullptr && v != nullptr && out != nullptr)) && sigma >= 0.0f && sigma <= 1.0f &&
         next_sigma >= 0.0f && next_sigma <= 1.0f;
}

}  // namespace skyrt
