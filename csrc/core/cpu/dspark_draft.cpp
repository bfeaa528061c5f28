// CPU kernel of dspark_dspark_draft: the DSpark sequential stage + confidence head.
//
// Per position k the work is (i) the head's small per-request transforms, (ii) the bias GEMM
// Z = U_k + V W2^T for all R requests at once, with W2 streamed once per step (blocked over the
// vocabulary, each block widened to fp32 once and reused by every request), and (iii) one sampling
// pass per request over its row of Z (cpu/row_ops.h: the same row_distribution / sample_from as
// verify_chain, reading the fp32 row that is returned as q).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "../common/dspark_draft_check.h"
#include "../common/status.h"
#include "dspark/detail/dspark_heads.h"
#include "dspark/detail/philox.h"
#include "dspark/detail/sampling.h"
#include "dspark/dspark_draft.h"
#include "parallel.h"
#include "row_ops.h"

namespace dspark {

static bool valid_dtype(dspark_dtype d) {
  return d == DSPARK_FLOAT32 || d == DSPARK_FLOAT16 || d == DSPARK_BFLOAT16;
}

dspark_status check_dspark_draft_params(const dspark_dspark_draft_params* p, bool need_out_logits) {
  DSPARK_CHECK_ARG(p != nullptr, "dspark_draft: params is NULL");
  DSPARK_CHECK_ARG(p->num_requests >= 0, "dspark_draft: num_requests must be >= 0");
  if (p->num_requests == 0) return DSPARK_OK;
  DSPARK_CHECK_ARG(p->num_positions >= 1, "dspark_draft: num_positions (g) must be >= 1");
  DSPARK_CHECK_ARG(p->vocab_size >= 1, "dspark_draft: vocab_size must be >= 1");
  DSPARK_CHECK_ARG(p->rank >= 1 && p->rank <= 4096, "dspark_draft: rank must be in [1, 4096]");
  DSPARK_CHECK_ARG(p->head_type == DSPARK_MARKOV_VANILLA || p->head_type == DSPARK_MARKOV_GATED ||
                       p->head_type == DSPARK_MARKOV_RNN,
                   "dspark_draft: head_type must be VANILLA (0), GATED (1) or RNN (2)");
  DSPARK_CHECK_ARG(p->base_logits != nullptr, "dspark_draft: base_logits is NULL (expected [R, g, V])");
  DSPARK_CHECK_ARG(valid_dtype(p->logits_dtype), "dspark_draft: logits_dtype must be FLOAT32, FLOAT16 or BFLOAT16");
  DSPARK_CHECK_ARG(valid_dtype(p->weight_dtype), "dspark_draft: weight_dtype must be FLOAT32, FLOAT16 or BFLOAT16");
  DSPARK_CHECK_ARG(p->anchor_tokens != nullptr, "dspark_draft: anchor_tokens is NULL (expected [R] int64)");
  DSPARK_CHECK_ARG(p->markov_w1 != nullptr, "dspark_draft: markov_w1 is NULL (expected [V, r])");
  if (p->draft_to_target != nullptr)
    DSPARK_CHECK_ARG(p->target_vocab_size >= 1,
                     "dspark_draft: target_vocab_size must be >= 1 when draft_to_target is given");
  DSPARK_CHECK_ARG(p->markov_w2 != nullptr, "dspark_draft: markov_w2 is NULL (expected [V, r])");
  const bool need_hidden = p->head_type != DSPARK_MARKOV_VANILLA || p->conf_weight != nullptr;
  if (need_hidden) {
    DSPARK_CHECK_ARG(p->hidden != nullptr,
                     "dspark_draft: hidden is NULL but the gated/rnn head or the confidence head needs h [R, g, d]");
    DSPARK_CHECK_ARG(valid_dtype(p->hidden_dtype), "dspark_draft: hidden_dtype must be FLOAT32, FLOAT16 or BFLOAT16");
    DSPARK_CHECK_ARG(p->hidden_size >= 1, "dspark_draft: hidden_size must be >= 1");
  }
  if (p->head_type == DSPARK_MARKOV_GATED) {
    DSPARK_CHECK_ARG(p->gate_weight != nullptr, "dspark_draft: gate_weight is NULL (GATED head needs [r, d + r])");
    DSPARK_CHECK_ARG(p->gate_bias != nullptr, "dspark_draft: gate_bias is NULL (GATED head needs [r])");
  }
  if (p->head_type == DSPARK_MARKOV_RNN) {
    DSPARK_CHECK_ARG(p->joint_weight != nullptr, "dspark_draft: joint_weight is NULL (RNN head needs [3r, 2r + d])");
    DSPARK_CHECK_ARG(p->joint_bias != nullptr, "dspark_draft: joint_bias is NULL (RNN head needs [3r])");
  }
  if (p->conf_weight != nullptr) {
    DSPARK_CHECK_ARG(p->conf_bias != nullptr, "dspark_draft: conf_bias is NULL but conf_weight is given");
  } else {
    DSPARK_CHECK_ARG(p->out_confidence == nullptr,
                     "dspark_draft: out_confidence is given but there is no confidence head (conf_weight NULL)");
  }
  DSPARK_CHECK_ARG(p->temperature != nullptr, "dspark_draft: temperature is NULL (expected [R] float32)");
  DSPARK_CHECK_ARG(p->out_tokens != nullptr, "dspark_draft: out_tokens is NULL (expected [R, g] int64)");
  if (need_out_logits)
    DSPARK_CHECK_ARG(p->out_logits != nullptr, "dspark_draft: out_logits is NULL (expected [R, g, V] float32)");
  return DSPARK_OK;
}

namespace cpu {
namespace {

using detail::kNegInf;

// ---------------------------------------------------------------------------------------------
// fp32 GEMM out[n, m] = sum_t A[n, t] * W[m, t] (A fp32 rows at A + n * lda, W [M, K] of any
// element type). W is processed in blocks of MB rows, each widened to fp32 and transposed once
// into Wt[t][MB] (zero padded to a multiple of 16); a 6 x 16 register tile (12 8-wide GCC vector
// accumulators: AVX2 FMAs with the x86-64-v3 flags) broadcasts A[n, t] against two vectors of Wt
// row t. Results leave through the caller's store(n, m, cnt, values): values[i] is out[n, m + i]
// for i < cnt (<= 16); every (listed n, m) is stored exactly once.
// ---------------------------------------------------------------------------------------------
typedef float v8f __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int NA>
inline void micro16(const float* Wt, int64_t ld, int64_t K, const float* const* a, float (*res)[16]) {
  v8f acc[NA][2];
  for (int j = 0; j < NA; ++j) acc[j][0] = acc[j][1] = v8f{0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t t = 0; t < K; ++t) {
    const v8f w0 = load8(Wt + t * ld), w1 = load8(Wt + t * ld + 8);
    for (int j = 0; j < NA; ++j) {
      const float x = a[j][t];
      acc[j][0] += w0 * x;
      acc[j][1] += w1 * x;
    }
  }
  for (int j = 0; j < NA; ++j) {
    std::memcpy(res[j], &acc[j][0], sizeof(v8f));
    std::memcpy(res[j] + 8, &acc[j][1], sizeof(v8f));
  }
}

inline void micro16_na(int na, const float* Wt, int64_t ld, int64_t K, const float* const* a, float (*res)[16]) {
  switch (na) {
    case 6: return micro16<6>(Wt, ld, K, a, res);
    case 5: return micro16<5>(Wt, ld, K, a, res);
    case 4: return micro16<4>(Wt, ld, K, a, res);
    case 3: return micro16<3>(Wt, ld, K, a, res);
    case 2: return micro16<2>(Wt, ld, K, a, res);
    default: return micro16<1>(Wt, ld, K, a, res);
  }
}

// Wt[t * mbp + i] = W[m0 + i, t] for i < mcount, 0 for mcount <= i < mbp. Rows are read in
// groups of 16 (16 sequential streams) and written as contiguous 16-float runs.
template <typename T>
inline void pack_transposed(const T* w, int64_t K, int64_t m0, int64_t mcount, int64_t mbp, float* Wt) {
  for (int64_t i0 = 0; i0 < mbp; i0 += 16) {
    const T* src[16];
    const int64_t n = std::min<int64_t>(16, std::max<int64_t>(0, mcount - i0));
    for (int64_t i = 0; i < n; ++i) src[i] = w + (m0 + i0 + i) * K;
    for (int64_t t = 0; t < K; ++t) {
      float* dst = Wt + t * mbp + i0;
      if (n == 16) {
        for (int i = 0; i < 16; ++i) dst[i] = detail::load_as_float(src[i], t);
      } else {
        for (int64_t i = 0; i < 16; ++i) dst[i] = i < n ? detail::load_as_float(src[i], t) : 0.0f;
      }
    }
  }
}

// Few requests (R < 6, memory-bound): dot-product form over contiguous widened rows, NW x NA
// tile with horizontal sums (no transposed packing, which would cost as much as the FMAs here).
inline float hsum8(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

template <int NW, int NA, typename Store>
inline void micro_dot(const float* W, int64_t K, const float* const* a, int64_t m0, const int64_t* n_idx,
                      Store& store) {
  v8f acc[NW][NA];
  for (int i = 0; i < NW; ++i)
    for (int j = 0; j < NA; ++j) acc[i][j] = v8f{0, 0, 0, 0, 0, 0, 0, 0};
  int64_t t = 0;
  for (; t + 8 <= K; t += 8) {
    v8f w[NW], x[NA];
    for (int i = 0; i < NW; ++i) w[i] = load8(W + i * K + t);
    for (int j = 0; j < NA; ++j) x[j] = load8(a[j] + t);
    for (int i = 0; i < NW; ++i)
      for (int j = 0; j < NA; ++j) acc[i][j] += w[i] * x[j];
  }
  for (int j = 0; j < NA; ++j) {
    float out[NW];
    for (int i = 0; i < NW; ++i) {
      float s = 0.0f;
      for (int64_t q = t; q < K; ++q) s += W[i * K + q] * a[j][q];
      out[i] = hsum8(acc[i][j]) + s;
    }
    store(n_idx[j], m0, NW, out);
  }
}

template <int NW, typename Store>
inline void micro_dot_na(int na, const float* W, int64_t K, const float* const* a, int64_t m0, const int64_t* n_idx,
                         Store& store) {
  switch (na) {
    case 5: return micro_dot<NW, 5>(W, K, a, m0, n_idx, store);
    case 4: return micro_dot<NW, 4>(W, K, a, m0, n_idx, store);
    case 3: return micro_dot<NW, 3>(W, K, a, m0, n_idx, store);
    case 2: return micro_dot<NW, 2>(W, K, a, m0, n_idx, store);
    default: return micro_dot<NW, 1>(W, K, a, m0, n_idx, store);
  }
}

template <typename T, typename Store>
void gemm_nt_few_portable(const float* A, int64_t lda, const std::vector<int64_t>& rows, const T* W, int64_t M, int64_t K,
                 Store store) {
  int64_t mb = std::max<int64_t>(4, (16384 / std::max<int64_t>(K, 1)) / 4 * 4);
  mb = std::min<int64_t>(mb, (M + 3) / 4 * 4);
  const int64_t nblocks = (M + mb - 1) / mb;
  const int na = static_cast<int>(rows.size());
  const float* a[5];
  int64_t n_idx[5];
  for (int j = 0; j < na; ++j) {
    n_idx[j] = rows[j];
    a[j] = A + rows[j] * lda;
  }
  parallel_for(nblocks, static_cast<double>(mb) * K * na, [&](int64_t b0, int64_t b1) {
    std::vector<float> wf(static_cast<size_t>(mb * K));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t m0 = b * mb, mcount = std::min(mb, M - m0);
      const T* src = W + m0 * K;
      const int64_t n = mcount * K;
      for (int64_t i = 0; i < n; ++i) wf[i] = detail::load_as_float(src, i);
      int64_t i = 0;
      for (; i + 4 <= mcount; i += 4) micro_dot_na<4>(na, wf.data() + i * K, K, a, m0 + i, n_idx, store);
      for (; i < mcount; ++i) micro_dot_na<1>(na, wf.data() + i * K, K, a, m0 + i, n_idx, store);
    }
  });
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// Few requests on AVX2: 8 weight rows at a time, each widened in registers (bf16: zero-extend and
// shift; fp16: F16C) and multiplied into its own accumulator; one 8 x 8 transpose-add gives the 8
// dot products at once. This is what makes the sequential stage cheap at batch 1: W2 of a draft
// vocabulary (16k x 64 bf16, 2 MiB) streams from L2/L3 per position at a few FLOPs per byte, where
// widening it into a scratch row first and reducing every row on its own cost ~10x more.
inline __m256 widen8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 widen8(const detail::bf16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 widen8(const detail::fp16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// lane i = horizontal sum of a[i]
inline __m256 hsum8x8(const __m256* a) {
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

template <typename T, typename Store>
void gemm_nt_few(const float* A, int64_t lda, const std::vector<int64_t>& rows, const T* W, int64_t M, int64_t K,
                 Store store) {
  const int64_t K8 = K / 8 * 8;
  const int64_t mb = 512;  // rows per task: 64 KiB of bf16 W2 at r = 64
  const int64_t nblocks = (M + mb - 1) / mb;
  // One core does this at ~10 GFLOP/s: below ~4 M multiply-adds (0.4 ms) a second thread costs
  // more than it saves once its start-up (a fresh std::thread, competing with torch's spinning
  // OpenMP workers right after the backbone's GEMMs) is counted. Batch 1 over a 16k draft
  // vocabulary at r = 64 is 1 M.
  const double work = static_cast<double>(M) * K * rows.size();
  const double cost = work < 4e6 ? 0.0 : static_cast<double>(mb) * K * rows.size();
  parallel_for(nblocks, cost, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t m0 = b * mb, m1 = std::min(M, m0 + mb);
      for (const int64_t n : rows) {
        const float* a = A + n * lda;
        int64_t m = m0;
        for (; m + 8 <= m1; m += 8) {
          __m256 acc[8];
          for (int q = 0; q < 8; ++q) acc[q] = _mm256_setzero_ps();
          for (int64_t t = 0; t < K8; t += 8) {
            const __m256 x = _mm256_loadu_ps(a + t);
            for (int q = 0; q < 8; ++q) acc[q] = _mm256_fmadd_ps(widen8(W + (m + q) * K + t), x, acc[q]);
          }
          float out[8];
          _mm256_storeu_ps(out, hsum8x8(acc));
          if (K8 < K)
            for (int q = 0; q < 8; ++q)
              for (int64_t t = K8; t < K; ++t) out[q] += detail::load_as_float(W + (m + q) * K, t) * a[t];
          store(n, m, 8, out);
        }
        for (; m < m1; ++m) {  // the last M % 8 rows
          float v = 0.0f;
          for (int64_t t = 0; t < K; ++t) v += detail::load_as_float(W + m * K, t) * a[t];
          store(n, m, 1, &v);
        }
      }
    }
  });
}
#else
template <typename T, typename Store>
void gemm_nt_few(const float* A, int64_t lda, const std::vector<int64_t>& rows, const T* W, int64_t M, int64_t K,
                 Store store) {
  gemm_nt_few_portable(A, lda, rows, W, M, K, store);
}
#endif

template <typename T, typename Store>
void gemm_nt(const float* A, int64_t lda, const std::vector<int64_t>& rows, const T* W, int64_t M, int64_t K,
             Store store) {
  if (rows.empty() || M == 0) return;
  if (rows.size() < 6) return gemm_nt_few(A, lda, rows, W, M, K, store);
  constexpr int NA = 6;
  // ~64 KiB of packed weights per block (L2-resident while every request tile streams over it)
  int64_t mb = (16384 / std::max<int64_t>(K, 1)) / 16 * 16;
  mb = std::max<int64_t>(16, std::min<int64_t>(mb, 128));
  mb = std::min<int64_t>(mb, (M + 15) / 16 * 16);
  const int64_t nblocks = (M + mb - 1) / mb;
  const double cost = static_cast<double>(mb) * K * rows.size();
  parallel_for(nblocks, cost, [&](int64_t b0, int64_t b1) {
    std::vector<float> wt(static_cast<size_t>(mb * K));
    float res[NA][16];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t m0 = b * mb, mcount = std::min(mb, M - m0);
      const int64_t mbp = (mcount + 15) / 16 * 16;
      pack_transposed(W, K, m0, mcount, mbp, wt.data());
      for (size_t j0 = 0; j0 < rows.size(); j0 += NA) {
        const int na = static_cast<int>(std::min<size_t>(NA, rows.size() - j0));
        const float* a[NA];
        for (int j = 0; j < na; ++j) a[j] = A + rows[j0 + j] * lda;
        for (int64_t s0 = 0; s0 < mbp; s0 += 16) {
          micro16_na(na, wt.data() + s0, mbp, K, a, res);
          const int64_t cnt = std::min<int64_t>(16, mcount - s0);
          for (int j = 0; j < na; ++j) store(rows[j0 + j], m0 + s0, cnt, res[j]);
        }
      }
    }
  });
}

inline float load_any(const void* p, dspark_dtype dt, int64_t i) {
  switch (dt) {
    case DSPARK_BFLOAT16: return detail::load_as_float(static_cast<const detail::bf16_t*>(p), i);
    case DSPARK_FLOAT16: return detail::load_as_float(static_cast<const detail::fp16_t*>(p), i);
    default: return static_cast<const float*>(p)[i];
  }
}

template <typename W, typename U>
struct Drafter {
  const dspark_dspark_draft_params& p;
  int32_t R, G, V, D, Rk;
  std::vector<float> zbuf;  // [R, V] when out_logits is NULL

  float* zrow(int32_t r, int32_t k) {
    if (p.out_logits) return p.out_logits + (static_cast<int64_t>(r) * G + k) * V;
    return zbuf.data() + static_cast<int64_t>(r) * V;
  }

  void run() {
    const W* w1 = static_cast<const W*>(p.markov_w1);
    const W* w2 = static_cast<const W*>(p.markov_w2);
    const U* base = static_cast<const U*>(p.base_logits);
    const int64_t* map = p.draft_to_target;
    const bool gated = p.head_type == DSPARK_MARKOV_GATED, rnn = p.head_type == DSPARK_MARKOV_RNN;
    const bool conf = p.conf_weight != nullptr;
    const bool need_h = gated || rnn || conf;
    if (!p.out_logits) zbuf.assign(static_cast<size_t>(R) * V, 0.0f);
    // per request: [s (rnn) ; e ; h] with e at offset eo and h at offset ho
    const int64_t eo = rnn ? Rk : 0, ho = rnn ? 2 * Rk : Rk;
    const int64_t X = need_h ? ho + D : ho;  // gated: [e ; h]... see below
    std::vector<float> xin(static_cast<size_t>(R) * X, 0.0f);   // rnn: [s; e; h]; else [e; h]
    std::vector<float> gin;                                      // gated: [h; e] (G's input order)
    std::vector<float> pre;                                      // gated [R, r] / rnn [R, 3r] pre-activations
    std::vector<float> vin(static_cast<size_t>(R) * Rk, 0.0f);  // the vector W2 multiplies
    if (gated) {
      gin.assign(static_cast<size_t>(R) * (D + Rk), 0.0f);
      pre.assign(static_cast<size_t>(R) * Rk, 0.0f);
    }
    if (rnn) pre.assign(static_cast<size_t>(R) * 3 * Rk, 0.0f);
    std::vector<int64_t> prev(R);
    std::vector<char> valid(R, 1);
    for (int32_t r = 0; r < R; ++r) prev[r] = p.anchor_tokens[r];
    const float* temps = p.temperature;
    std::vector<int64_t> active;
    active.reserve(R);

    for (int32_t k = 0; k < G; ++k) {
      active.clear();
      for (int32_t r = 0; r < R; ++r)
        if (valid[r]) active.push_back(r);
      // (i) gather e = W1[prev] and h_k
      for (int64_t r : active) {
        float* x = xin.data() + r * X;
        const W* e = w1 + prev[r] * Rk;
        for (int64_t i = 0; i < Rk; ++i) x[eo + i] = detail::load_as_float(e, i);
        if (need_h) {
          const int64_t hoff = (r * G + k) * static_cast<int64_t>(D);
          for (int64_t i = 0; i < D; ++i) x[ho + i] = load_any(p.hidden, p.hidden_dtype, hoff + i);
        }
      }
      // confidence head: c = sigmoid((w . [h ; e] + b) / T_k)
      if (conf) {
        const W* cw = static_cast<const W*>(p.conf_weight);
        const float cb = detail::load_as_float(static_cast<const W*>(p.conf_bias), 0);
        const float tk = p.sts_temperature ? p.sts_temperature[k] : 1.0f;
        for (int32_t r = 0; r < R; ++r) {
          float c = 0.0f;
          if (valid[r]) {
            const float* x = xin.data() + static_cast<int64_t>(r) * X;
            float acc[8] = {0};
            int64_t i = 0;
            for (; i + 8 <= D; i += 8)
              for (int j = 0; j < 8; ++j) acc[j] += detail::load_as_float(cw, i + j) * x[ho + i + j];
            float s = 0.0f;
            for (; i < D; ++i) s += detail::load_as_float(cw, i) * x[ho + i];
            if (p.conf_with_markov)
              for (int64_t q = 0; q < Rk; ++q) s += detail::load_as_float(cw, D + q) * x[eo + q];
            for (int j = 0; j < 8; ++j) s += acc[j];
            c = detail::sts_confidence(s + cb, tk);
          }
          p.out_confidence[static_cast<int64_t>(r) * G + k] = c;
        }
      }
      // (ii) head transform -> vin
      if (!gated && !rnn) {
        for (int64_t r : active) std::memcpy(vin.data() + r * Rk, xin.data() + r * X + eo, sizeof(float) * Rk);
      } else if (gated) {
        const int64_t K = D + Rk;
        for (int64_t r : active) {  // G's input is [h ; e]
          float* gx = gin.data() + r * K;
          std::memcpy(gx, xin.data() + r * X + ho, sizeof(float) * D);
          std::memcpy(gx + D, xin.data() + r * X + eo, sizeof(float) * Rk);
        }
        const W* gb = static_cast<const W*>(p.gate_bias);
        float* pr = pre.data();
        const int64_t rk = Rk;
        gemm_nt(gin.data(), K, active, static_cast<const W*>(p.gate_weight), Rk, K,
                [pr, rk, gb](int64_t n, int64_t m, int64_t cnt, const float* v) {
                  for (int64_t i = 0; i < cnt; ++i) pr[n * rk + m + i] = v[i] + detail::load_as_float(gb, m + i);
                });
        for (int64_t r : active)
          for (int64_t i = 0; i < Rk; ++i)
            vin[r * Rk + i] = detail::sigmoidf_(pre[r * Rk + i]) * xin[r * X + eo + i];
      } else {  // rnn: [g|c|o] = J [s ; e ; h] + b
        const W* jb = static_cast<const W*>(p.joint_bias);
        float* pr = pre.data();
        const int64_t m3 = 3 * Rk;
        gemm_nt(xin.data(), X, active, static_cast<const W*>(p.joint_weight), m3, X,
                [pr, m3, jb](int64_t n, int64_t m, int64_t cnt, const float* v) {
                  for (int64_t i = 0; i < cnt; ++i) pr[n * m3 + m + i] = v[i] + detail::load_as_float(jb, m + i);
                });
        for (int64_t r : active) {
          float* s = xin.data() + r * X;  // the state lives at the front of the row
          const float* gco = pre.data() + r * m3;
          for (int64_t i = 0; i < Rk; ++i) {
            const float gate = detail::sigmoidf_(gco[i]);
            s[i] = gate * s[i] + (1.0f - gate) * detail::tanhf_(gco[Rk + i]);
            vin[r * Rk + i] = detail::tanhf_(gco[2 * Rk + i]);
          }
        }
      }
      // (iii) z = U_k + W2 v, written straight into the output rows
      {
        const int32_t kk = k;
        const int64_t GV = static_cast<int64_t>(G) * V;
        const int32_t VV = V;
        const bool direct = p.out_logits != nullptr;
        float* outz = direct ? p.out_logits + static_cast<int64_t>(k) * V : zbuf.data();
        const int64_t ldo = direct ? GV : V;
        gemm_nt(vin.data(), Rk, active, w2, V, Rk,
                [outz, ldo, base, GV, kk, VV](int64_t n, int64_t m, int64_t cnt, const float* v) {
                  float* o = outz + n * ldo + m;
                  const U* u = base + n * GV + static_cast<int64_t>(kk) * VV + m;
                  for (int64_t i = 0; i < cnt; ++i) o[i] = v[i] + detail::load_as_float(u, i);
                });
      }
      // (iv) sample d_k per request and advance prev
      const double cost = static_cast<double>(V) * 3.0;
      parallel_for(R, cost, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          int64_t* tok = p.out_tokens + r * G + k;
          float* z = zrow(static_cast<int32_t>(r), k);
          if (!valid[r]) {
            *tok = -1;
            std::fill(z, z + V, kNegInf);
            continue;
          }
          const float t = temps[r];
          int64_t d;
          if (detail::is_greedy_temperature(t)) {
            d = row_argmax(z, V);
          } else {
            const float inv_t = detail::inverse_temperature(t);
            const RowDist dist = row_distribution(z, V, inv_t, kNegInf);
            if (!dist.valid) {
              d = -1;
            } else {
              const int64_t seed = p.seed ? p.seed[r] : 0, off = p.offset ? p.offset[r] : 0;
              const double u = detail::philox_uniform(seed, off, static_cast<uint32_t>(k), detail::kRngDraftSample);
              d = sample_from(z, V, inv_t, dist, u);
            }
          }
          if (d >= 0 && map) d = map[d];  // the draft as a target token (map checked on entry)
          *tok = d;
          if (d < 0) {
            valid[r] = 0;
          } else {
            prev[r] = d;
          }
        }
      });
    }
  }
};

template <typename W>
void dispatch_logits(const dspark_dspark_draft_params& p) {
  auto go = [&](auto tag) {
    using U = decltype(tag);
    Drafter<W, U> d{p, p.num_requests, p.num_positions, p.vocab_size, p.hidden_size, p.rank, {}};
    d.run();
  };
  switch (p.logits_dtype) {
    case DSPARK_FLOAT32: return go(float{});
    case DSPARK_BFLOAT16: return go(detail::bf16_t{});
    case DSPARK_FLOAT16: return go(detail::fp16_t{});
  }
}

}  // namespace
}  // namespace cpu
}  // namespace dspark

extern "C" dspark_status dspark_dspark_draft_cpu(const dspark_dspark_draft_params* params) {
  using namespace dspark;
  clear_error();
  const dspark_status st = check_dspark_draft_params(params, false);
  if (st != DSPARK_OK || params->num_requests == 0) return st;
  const dspark_dspark_draft_params& p = *params;
  const int64_t v_anchor = p.draft_to_target ? p.target_vocab_size : p.vocab_size;
  if (p.draft_to_target) {
    // every column must name a distinct target token: a repeat would give that token the summed
    // mass of two columns, which q (one column per draft) would not show
    std::vector<char> seen(static_cast<size_t>(p.target_vocab_size), 0);
    for (int32_t j = 0; j < p.vocab_size; ++j) {
      const int64_t t = p.draft_to_target[j];
      if (t < 0 || t >= p.target_vocab_size)
        return fail(DSPARK_ERR_INVALID_ARGUMENT, "dspark_draft: draft_to_target[" + std::to_string(j) + "] = " +
                                                     std::to_string(t) + " is outside [0, target_vocab_size = " +
                                                     std::to_string(p.target_vocab_size) + ")");
      if (seen[t])
        return fail(DSPARK_ERR_INVALID_ARGUMENT, "dspark_draft: draft_to_target repeats target token " +
                                                     std::to_string(t) + " (at column " + std::to_string(j) +
                                                     "); entries must be distinct");
      seen[t] = 1;
    }
  }
  for (int32_t r = 0; r < p.num_requests; ++r) {
    const int64_t a = p.anchor_tokens[r];
    if (a < 0 || a >= v_anchor)
      return fail(DSPARK_ERR_INVALID_ARGUMENT, "dspark_draft: anchor_tokens[" + std::to_string(r) + "] = " +
                                                   std::to_string(a) + " is outside [0, " +
                                                   (p.draft_to_target ? "target_vocab_size" : "vocab_size") +
                                                   " = " + std::to_string(v_anchor) + ")");
    const float t = p.temperature[r];
    if (!(t >= 0.0f))
      return fail(DSPARK_ERR_INVALID_ARGUMENT, "dspark_draft: temperature[" + std::to_string(r) + "] = " +
                                                   std::to_string(t) + " must be >= 0 (0 = greedy)");
  }
  if (p.sts_temperature)
    for (int32_t k = 0; k < p.num_positions; ++k)
      if (!(p.sts_temperature[k] > 0.0f) || std::isinf(p.sts_temperature[k]))
        return fail(DSPARK_ERR_INVALID_ARGUMENT, "dspark_draft: sts_temperature[" + std::to_string(k) + "] = " +
                                                     std::to_string(p.sts_temperature[k]) +
                                                     " must be a positive finite temperature");
  try {
    switch (p.weight_dtype) {
      case DSPARK_FLOAT32: cpu::dispatch_logits<float>(p); break;
      case DSPARK_BFLOAT16: cpu::dispatch_logits<detail::bf16_t>(p); break;
      case DSPARK_FLOAT16: cpu::dispatch_logits<detail::fp16_t>(p); break;
    }
  } catch (const std::bad_alloc&) {
    return fail(DSPARK_ERR_OUT_OF_MEMORY, "dspark_draft: out of host memory for scratch");
  } catch (const std::exception& e) {
    return fail(DSPARK_ERR_INTERNAL, std::string("dspark_draft: ") + e.what());
  }
  return DSPARK_OK;
}

#ifndef DSPARK_WITH_CUDA
extern "C" dspark_status dspark_dspark_draft_cuda(const dspark_dspark_draft_params*, void*) {
  return dspark::fail(DSPARK_ERR_UNSUPPORTED, "dspark_draft: this build of libdspark_core has no CUDA kernels");
}
extern "C" size_t dspark_dspark_draft_workspace_size(int32_t, int32_t) { return 0; }
#endif
