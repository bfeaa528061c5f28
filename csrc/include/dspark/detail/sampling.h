// Internal: the per-element arithmetic of every sampling op, shared verbatim by the CPU and CUDA
// kernels (and so exercised by the CPU tests).
//
// A row of logits z becomes a distribution in three steps:
//   s_v = z_v * inv_temperature           (NaN -> -inf)
//   kept_v = s_v >= threshold              (threshold = -inf unless top-k / top-p apply)
//   w_v = kept_v ? exp(s_v - m) : 0,  p_v = w_v / S,  m = max kept s, S = sum w
// If m is +inf the mass sits uniformly on the +inf entries (w_v = [s_v == +inf]).
#ifndef DSPARK_DETAIL_SAMPLING_H_
#define DSPARK_DETAIL_SAMPLING_H_

#include "dspark/common.h"
#include "dspark/detail/hd.h"

#include <math.h>

namespace dspark {
namespace detail {
inline namespace DSPARK_ISA_TAG {

constexpr float kNegInf = -__builtin_huge_valf();
constexpr float kPosInf = __builtin_huge_valf();

// exp(x) for x <= 0 (as used after subtracting the row max), branch-free so compilers vectorise it.
// Cody-Waite range reduction and a degree-6 polynomial: max relative error about 2 ulp on
// [-87, 0]; exactly 0 below -87.3 and for -inf.
DSPARK_HD float exp_nonpos(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693145751953125f;
  const float kLn2Lo = 1.428606765330187045e-06f;
  // Selects, not branches: with -fno-trapping-math they compile to vector blends.
  const float xc = x < -87.0f ? -87.0f : (x > 0.0f ? 0.0f : x);
  const float n = floorf(xc * kLog2e + 0.5f);
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  // exp(r) on [-ln2/2, ln2/2]: Taylor terms to r^6 are within 2^-24 relative
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t e = static_cast<int32_t>(n) + 127;  // n in [-126, 0]
  const float scale = bits_to_float(static_cast<uint32_t>(e) << 23);
  return x >= -87.0f ? p * scale : 0.0f;  // also 0 for -inf and NaN
}

template <typename T>
DSPARK_HD float load_as_float(const T* p, int64_t i);
template <>
DSPARK_HD float load_as_float<float>(const float* p, int64_t i) {
  return p[i];
}
// uint16_t carries bf16 or fp16 depending on the caller's tag types below.
struct bf16_t {
  uint16_t x;
};
struct fp16_t {
  uint16_t x;
};
template <>
DSPARK_HD float load_as_float<bf16_t>(const bf16_t* p, int64_t i) {
  return bf16_to_float(p[i].x);
}
template <>
DSPARK_HD float load_as_float<fp16_t>(const fp16_t* p, int64_t i) {
  return fp16_to_float(p[i].x);
}

// Scaled logit with NaN mapped to -inf (NaN never wins and never carries mass).
DSPARK_HD float scaled_logit(float z, float inv_t) {
  const float s = z * inv_t;
  return is_nan(s) ? kNegInf : s;
}

// Unnormalised weight of a scaled logit s for a row whose kept max is m and threshold thr.
DSPARK_HD float row_weight(float s, float m, float thr) {
  if (!(s >= thr)) return 0.0f;
  if (m == kPosInf) return s == kPosInf ? 1.0f : 0.0f;
  return exp_nonpos(s - m);
}

// A probability entry as given by a caller: negative and NaN count as 0.
DSPARK_HD float sanitize_prob(float x) { return x > 0.0f ? x : 0.0f; }

// Per-request temperature -> greedy flag and the multiplier used for every logit.
DSPARK_HD bool is_greedy_temperature(float t) { return !(t > 0.0f); }
DSPARK_HD float inverse_temperature(float t) { return t > 0.0f ? 1.0f / t : 1.0f; }

// The effective top-k: 0 means disabled.
DSPARK_HD int32_t effective_top_k(const int32_t* top_k, int32_t r, int32_t vocab) {
  if (top_k == nullptr) return 0;
  const int32_t k = top_k[r];
  return (k <= 0 || k >= vocab) ? 0 : k;
}
// The effective top-p: 1 means disabled; values <= 0 keep only the maximum.
DSPARK_HD float effective_top_p(const float* top_p, int32_t r) {
  if (top_p == nullptr) return 1.0f;
  const float p = top_p[r];
  if (!(p < 1.0f)) return 1.0f;  // also NaN
  return p > 0.0f ? p : 0.0f;
}

}  // namespace DSPARK_ISA_TAG
}  // namespace detail
}  // namespace dspark

#endif  // DSPARK_DETAIL_SAMPLING_H_
