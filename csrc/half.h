// half.h — a 16-bit IEEE float storage type (`skyrt::f16`) usable from plain C++ and CUDA.
// Kernels load it into float, compute in float and store it back (round to nearest even). On the
// device the conversions are the CUDA intrinsics; on the host they are the bit manipulations below,
// which tests/test_core_kv_cache.py checks against numpy.float16 for every finite value.
#pragma once
#include <cstdint>
#include "common.h"

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

namespace skyrt {

struct f16 {
  uint16_t bits;
};
static_assert(sizeof(f16) == 2, "f16 must be 2 bytes (numpy.float16 layout)");

// The same 4 bytes read as another type (std::bit_cast, which device code lacks; the builtin memcpy
// of a register-sized value compiles to a move on host and device alike).
template <typename To, typename From>
SKYRT_HD To same_bits(From from) {
  static_assert(sizeof(To) == sizeof(From), "same_bits needs types of one size");
  To to;
  __builtin_memcpy(&to, &from, sizeof(To));
  return to;
}

SKYRT_HD float bits_to_float(uint32_t u) { return same_bits<float>(u); }
SKYRT_HD uint32_t float_to_bits(float f) { return same_bits<uint32_t>(f); }

// f16 -> float, exact for every input (normals, subnormals, zeros, inf, NaN).
SKYRT_HD float half_to_float_sw(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  if (man == 0) return bits_to_float(sign);  // signed zero
  int e = -1;  // subnormal: normalise the mantissa
  do {
    ++e;
    man <<= 1;
  } while ((man & 0x400u) == 0);
  return bits_to_float(sign | ((112u - static_cast<uint32_t>(e)) << 23) | ((man & 0x3ffu) << 13));
}

// float -> f16 with round-to-nearest-even; overflow gives inf, NaN stays NaN.
SKYRT_HD uint16_t float_to_half_sw(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {                                                 // below 2^-14: subnormal or zero
    if (abs < 0x33000000u) return sign;                                  // below half the smallest subnormal
    const uint32_t exp = abs >> 23;
    const uint32_t man = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exp;  // value = man * 2^(exp-150); in units of 2^-24: >> (126 - exp)
    uint32_t half_man = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (half_man & 1u))) ++half_man;
    return static_cast<uint16_t>(sign | half_man);
  }
  uint32_t h = ((abs >> 13) - (112u << 10));  // rebias exponent, keep 10 mantissa bits
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent: still right
  return static_cast<uint16_t>(sign | h);
}

SKYRT_HD float load_float(float x) { return x; }
SKYRT_HD void store_float(float* p, float x) { *p = x; }

SKYRT_HD float load_float(f16 x) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(x.bits));
#else
  return half_to_float_sw(x.bits);
#endif
}

SKYRT_HD void store_float(f16* p, float x) {
#if defined(__CUDA_ARCH__)
  p->bits = __half_as_ushort(__float2half_rn(x));
#else
  p->bits = float_to_half_sw(x);
#endif
}

}  // namespace skyrt
