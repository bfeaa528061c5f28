// Internal: portability macros and element conversions shared by the CPU and CUDA kernels.
// Every per-element formula lives in __host__ __device__ helpers so the CPU tests exercise the
// same arithmetic the GPU runs.
#ifndef DSPARK_DETAIL_HD_H_
#define DSPARK_DETAIL_HD_H_

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define DSPARK_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced: these helpers sit inside the vectorised row loops, and an out-of-line call stops the
// loop from vectorising (GCC declines to inline exp_nonpos into the larger kernels by itself).
#define DSPARK_HD inline __attribute__((always_inline))
#else
#define DSPARK_HD inline
#endif

// CPU kernels may be compiled twice (baseline x86-64-v3 and x86-64-v4/AVX-512, see
// csrc/core/cpu/isa.h). Inline header functions then live in an ISA-tagged inline namespace so the
// two copies never merge at link time (an AVX-512 copy must never serve the baseline path).
#if defined(DSPARK_ISA_AVX512)
#define DSPARK_ISA_TAG isa_avx512
#else
#define DSPARK_ISA_TAG isa_generic
#endif

namespace dspark {
namespace detail {
inline namespace DSPARK_ISA_TAG {

DSPARK_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

DSPARK_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// bfloat16 is the high half of an IEEE float: widening is exact.
DSPARK_HD float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// IEEE half -> float, exact for every value (normals, subnormals, inf, NaN).
DSPARK_HD float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  // subnormal: man * 2^-24, exact in float
  const float mag = static_cast<float>(man) * 5.9604644775390625e-8f;
  return sign ? -mag : mag;
}

// Order-preserving map of a float to uint32 (larger float -> larger key); used by radix selects.
DSPARK_HD uint32_t float_order_key(float f) {
  const uint32_t u = float_to_bits(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
DSPARK_HD float float_from_order_key(uint32_t k) {
  return bits_to_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

DSPARK_HD bool is_nan(float x) { return x != x; }

}  // namespace DSPARK_ISA_TAG
}  // namespace detail
}  // namespace dspark

#endif  // DSPARK_DETAIL_HD_H_
