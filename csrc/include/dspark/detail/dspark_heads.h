// Internal: per-element math of dspark_draft (Markov / confidence heads) and schedule_prefix,
// shared by the CPU and CUDA kernels.
#ifndef DSPARK_DETAIL_DSPARK_HEADS_H_
#define DSPARK_DETAIL_DSPARK_HEADS_H_

#include <math.h>

#include "dspark/detail/hd.h"

namespace dspark {
namespace detail {

DSPARK_HD float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }
DSPARK_HD float tanhf_(float x) { return tanhf(x); }

// c_k = sigmoid(logit / T_k); T_k <= 0 or NaN has no meaning and gives NaN.
DSPARK_HD float sts_confidence(float logit, float t) {
  if (!(t > 0.0f)) return __builtin_nanf("");
  return sigmoidf_(logit / t);
}

// ---- schedule_prefix -------------------------------------------------------------------------
// Fixed-point survival probability: round_half_even(a * 2^40), a in [0, 1].
constexpr double kSchedScale = 1099511627776.0;  // 2^40
DSPARK_HD int64_t sched_fixed(float a) {
  const double x = static_cast<double>(a) * kSchedScale;
#if defined(__CUDA_ARCH__)
  return __double2ll_rn(x);
#else
  return static_cast<int64_t>(nearbyint(x));  // default rounding mode: half to even
#endif
}
DSPARK_HD double sched_theta(int64_t tau_fixed, float sps) {
  return static_cast<double>(tau_fixed) * (1.0 / kSchedScale) * static_cast<double>(sps);
}
// Ascending order of this key = a descending, then r ascending, then j ascending
// (item = r * g + j < 2^32; a >= 0 so its float bits order like the value).
DSPARK_HD uint64_t sched_key(float a, uint32_t item) {
  return (static_cast<uint64_t>(~float_to_bits(a)) << 32) | item;
}
DSPARK_HD float sched_key_value(uint64_t key) { return bits_to_float(~static_cast<uint32_t>(key >> 32)); }
DSPARK_HD uint32_t sched_key_item(uint64_t key) { return static_cast<uint32_t>(key); }
// Confidence as the CUDA kernel reads it: NaN -> 0, clamped to [0, 1].
DSPARK_HD float sched_clamp_conf(float c) { return c > 0.0f ? (c < 1.0f ? c : 1.0f) : 0.0f; }

}  // namespace detail
}  // namespace dspark

#endif  // DSPARK_DETAIL_DSPARK_HEADS_H_
