// samplers.cpp — per-frame UniPC coefficients (host, double) and the CPU references of the
// sampler kernels (see samplers.h; CUDA kernels in cuda/samplers.cu).
#include "samplers.h"

#include <algorithm>
#include <cmath>

namespace skyrt {

namespace {

double lambda_of(double sigma) { return std::log(1.0 - sigma) - std::log(sigma); }

// Official order at step j of S: warm-up min(j, 2) + 1, lower_order_final min(2, S - j).
int64_t solver_order_at(int64_t j, int64_t steps) {
  return std::min(std::min(int64_t{2}, steps - j), std::min(j, int64_t{2}) + 1);
}

// UniP from σ_k to σ_{k+1}, order 1 or 2 (order 2 uses ρ = 0.5, as the official "simplified" form).
void predictor_coeffs(const double* s, int64_t k, int64_t order, UniPCFrameCoeffs* c) {
  const double sigma_t = s[k + 1], sigma_s0 = s[k], alpha_t = 1.0 - sigma_t;
  const double h = lambda_of(sigma_t) - lambda_of(sigma_s0);  // +inf at the last step (σ = 0)
  const double h_phi_1 = std::expm1(-h), b_h = h_phi_1;
  c->predictor = static_cast<float>(order);
  c->p_scale = static_cast<float>(sigma_t / sigma_s0);
  c->p_alpha_phi = static_cast<float>(alpha_t * h_phi_1);
  c->p_alpha_bh_rho = 0.0f;
  if (order == 2) {
    const double r = (lambda_of(s[k - 1]) - lambda_of(sigma_s0)) / h;
    c->p_alpha_bh_rho = static_cast<float>(alpha_t * b_h * 0.5 / r);
  }
}

// UniC at step k (k >= 1), correcting the prediction made from σ_{k-1}; order 1 or 2.
void corrector_coeffs(const double* s, int64_t k, int64_t order, UniPCFrameCoeffs* c) {
  const double sigma_t = s[k], sigma_s0 = s[k - 1], alpha_t = 1.0 - sigma_t;
  const double h = lambda_of(sigma_t) - lambda_of(sigma_s0), hh = -h;
  const double h_phi_1 = std::expm1(hh), b_h = h_phi_1;
  // b_i = h_phi_i * i! / B(h), h_phi_{i+1} = h_phi_i / hh - 1 / (i+1)!
  const double h_phi_k1 = h_phi_1 / hh - 1.0;
  const double b1 = h_phi_k1 / b_h;
  const double b2 = (h_phi_k1 / hh - 0.5) * 2.0 / b_h;
  c->corrector = static_cast<float>(order);
  c->c_scale = static_cast<float>(sigma_t / sigma_s0);
  c->c_alpha_phi = static_cast<float>(alpha_t * h_phi_1);
  c->c_alpha_bh = static_cast<float>(alpha_t * b_h);
  if (order == 1) {
    c->c_rho_d1 = 0.0f;
    c->c_rho_t = 0.5f;
    return;
  }
  // Solve [[1, 1], [r, 1]] [ρ0, ρ1] = [b1, b2].
  const double r = (lambda_of(s[k - 2]) - lambda_of(sigma_s0)) / h;
  const double rho0 = (b1 - b2) / (1.0 - r), rho1 = b1 - rho0;
  c->c_rho_d1 = static_cast<float>(rho0 / r);
  c->c_rho_t = static_cast<float>(rho1);
}

bool sigmas_ok(const double* sigmas, int64_t num_sigmas) {
  if (sigmas == nullptr || num_sigmas < 2) return false;
  for (int64_t i = 0; i + 1 < num_sigmas; ++i)
    if (!(sigmas[i] > 0.0 && sigmas[i] < 1.0)) return false;
  return sigmas[num_sigmas - 1] >= 0.0 && sigmas[num_sigmas - 1] < 1.0;
}

}  // namespace

int unipc_frame_coeffs(const double* sigmas, int64_t num_sigmas, const int64_t* steps, int64_t frames,
                       UniPCFrameCoeffs* out) {
  if (frames < 0 || (frames > 0 && (steps == nullptr || out == nullptr))) return kInvalidArgument;
  if (!sigmas_ok(sigmas, num_sigmas)) return kInvalidArgument;
  const int64_t total = num_sigmas - 1;
  for (int64_t f = 0; f < frames; ++f) {
    UniPCFrameCoeffs c{};
    const int64_t k = steps[f];
    if (k >= total) return kInvalidArgument;
    if (k >= 0) {
      c.update = 1.0f;
      c.sigma = static_cast<float>(sigmas[k]);
      if (k >= 1) corrector_coeffs(sigmas, k, solver_order_at(k - 1, total), &c);
      predictor_coeffs(sigmas, k, solver_order_at(k, total), &c);
    }
    out[f] = c;
  }
  return kOk;
}

// ---- CPU references --------------------------------------------------------------------------------

namespace cpu {

int flow_euler(const float* x, const float* v, float* out, const float* dt, const uint8_t* update, int64_t outer,
               int64_t frames, int64_t inner) {
  if (frame_layout_check(outer, frames, inner) != kOk) return kInvalidArgument;
  const int64_t n = outer * frames * inner;
  if (n > 0 && (x == nullptr || v == nullptr || out == nullptr || dt == nullptr)) return kInvalidArgument;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t f = frame_of(i, frames, inner);
    out[i] = (update == nullptr || update[f]) ? flow_euler_one(x[i], v[i], dt[f]) : x[i];
  }
  return kOk;
}

int flow_unipc(const float* x, const float* v, float* out, float* x_last, float* m1, float* m2,
               const UniPCFrameCoeffs* coeffs, int64_t outer, int64_t frames, int64_t inner,
               bool official_df_aliasing) {
  if (frame_layout_check(outer, frames, inner) != kOk) return kInvalidArgument;
  const int64_t n = outer * frames * inner;
  if (n > 0 && (x == nullptr || v == nullptr || out == nullptr || x_last == nullptr || m1 == nullptr ||
                m2 == nullptr || coeffs == nullptr))
    return kInvalidArgument;
  for (int64_t i = 0; i < n; ++i) {
    const UniPCFrameCoeffs& c = coeffs[frame_of(i, frames, inner)];
    out[i] = c.update != 0.0f ? flow_unipc_one(c, x[i], v[i], &x_last[i], &m1[i], &m2[i], official_df_aliasing) : x[i];
  }
  return kOk;
}

int addnoise_condition(const float* x, const float* noise, float* out, int64_t outer, int64_t frames, int64_t inner,
                       int64_t frame_begin, int64_t frame_end, double factor) {
  if (frame_layout_check(outer, frames, inner) != kOk) return kInvalidArgument;
  const int64_t n = outer * frames * inner;
  if (n > 0 && (x == nullptr || noise == nullptr || out == nullptr)) return kInvalidArgument;
  const float keep = addnoise_keep(factor), a = static_cast<float>(factor);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t f = frame_of(i, frames, inner);
    out[i] = (f >= frame_begin && f < frame_end) ? addnoise_one(x[i], noise[i], keep, a) : x[i];
  }
  return kOk;
}

int flow_fewstep(const float* x, const float* v, const float* noise, float* out, int64_t n, float sigma,
                 float next_sigma) {
  if (!fewstep_args_ok(x, v, out, n, sigma, next_sigma)) return kInvalidArgument;
  const float keep = renoise_keep(next_sigma);
  for (int64_t i = 0; i < n; ++i) {
    const float x0 = fewstep_x0_one(x[i], v[i], sigma);
    out[i] = noise == nullptr ? x0 : renoise_one(x0, noise[i], keep, next_sigma);
  }
  return kOk;
}

int addnoise_prefix(float* x, const float* noise, int64_t outer, int64_t frames, int64_t prefix, int64_t inner,
                    int64_t noise_outer, double factor) {
  if (prefix_layout_check(outer, frames, prefix, inner, noise_outer) != kOk) return kInvalidArgument;
  const int64_t n = outer * prefix * inner, noise_n = noise_outer * prefix * inner;
  if (n > 0 && (x == nullptr || noise == nullptr)) return kInvalidArgument;
  const float keep = addnoise_keep(factor), a = static_cast<float>(factor);
  for (int64_t i = 0; i < n; ++i) {
    float& xi = x[prefix_element(i, frames, prefix, inner)];
    xi = addnoise_one(xi, noise[i % noise_n], keep, a);
  }
  return kOk;
}

}  // namespace cpu

#ifndef SKYRT_WITH_CUDA
namespace cuda {
int flow_euler(const float*, const float*, float*, const float*, const uint8_t*, int64_t, int64_t, int64_t, void*) {
  return kNotCompiled;
}
int flow_unipc(const float*, const float*, float*, float*, float*, float*, const UniPCFrameCoeffs*, int64_t, int64_t,
               int64_t, bool, void*) {
  return kNotCompiled;
}
int addnoise_condition(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t, double,
                       void*) {
  return kNotCompiled;
}
int flow_fewstep(const float*, const float*, const float*, float*, int64_t, float, float, void*) { return kNotCompiled; }

int addnoise_prefix(float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, double, void*) {
  return kNotCompiled;
}
}  // namespace cuda
#endif

}  // namespace skyrt
