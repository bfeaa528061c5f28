// Internal: Philox4x32-10 (Salmon et al., SC'11), the counter-based generator every sampling op
// uses. A draw is a pure function of (key, counter), so CPU and CUDA produce the same numbers and
// a captured CUDA graph gets fresh ones when the offset tensor it reads changes.
#ifndef DSPARK_DETAIL_PHILOX_H_
#define DSPARK_DETAIL_PHILOX_H_

#include "dspark/detail/hd.h"

namespace dspark {
namespace detail {
inline namespace DSPARK_ISA_TAG {

struct Philox4 {
  uint32_t v[4];
};

DSPARK_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

DSPARK_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                uint32_t k1) {
  const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  const uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(M0, c0, &hi0, &lo0);
    mulhilo32(M1, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += W0;
    k1 += W1;
  }
  Philox4 r;
  r.v[0] = c0;
  r.v[1] = c1;
  r.v[2] = c2;
  r.v[3] = c3;
  return r;
}

// What a draw is for; part of the counter so the streams never overlap.
enum RngPurpose : uint32_t {
  kRngAcceptCoin = 0,   // u_k of the accept test at draft position k
  kRngSample = 1,       // the inverse-CDF uniform of the residual / bonus draw at position k
  kRngDraftSample = 2,  // used by dspark_draft for d_k
};

// Uniform double in [0, 1) with 53 random bits, for (seed, offset, position, purpose).
DSPARK_HD double philox_uniform(int64_t seed, int64_t offset, uint32_t position, uint32_t purpose) {
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint64_t o = static_cast<uint64_t>(offset);
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(o), static_cast<uint32_t>(o >> 32), position,
                                  purpose, static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
  const uint64_t bits = (static_cast<uint64_t>(r.v[0] >> 5) << 26) | static_cast<uint64_t>(r.v[1] >> 6);
  return static_cast<double>(bits) * (1.0 / 9007199254740992.0);
}

}  // namespace DSPARK_ISA_TAG
}  // namespace detail
}  // namespace dspark

#endif  // DSPARK_DETAIL_PHILOX_H_
