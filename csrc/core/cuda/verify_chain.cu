// CUDA kernel of dspark_verify_chain (semantics: csrc/include/dspark/verify_chain.h; the CPU twin
// is csrc/core/cpu/verify_chain.cpp and every per-element formula comes from detail/*.h).
//
// Launches (all on the caller's stream, no host synchronisation, no allocation):
//   [threshold]  only when top_k or top_p is given: one CTA per target row of a sampled request
//                with truncation; radix select / search of the top-k / top-p threshold.
//   stats        grid = (request slot r*(gamma+1)+k) x (split of V). Each CTA reduces one V-chunk
//                of one row: greedy -> first argmax; sampled -> online (max, sum of weights) of the
//                target row (and of the draft row for DSPARK_DRAFT_LOGITS). Small batches get many
//                splits per row, so the whole GPU streams the logits.
//   [overlap]    only when accept probabilities are requested for LOGITS / PROBS drafts: same grid,
//                per-chunk sum min(p, q) and sum max(0, p - q) with the combined row statistics.
//   final        one CTA per request: combines the split partials of its rows (one warp per row,
//                fixed reduction order), walks the accept tests sequentially, writes tokens and
//                accept probabilities, and makes the one residual / bonus draw with a block-wide
//                chunked inverse-CDF scan (double accumulation, index order).
// Workspace (caller-given, dspark_verify_chain_workspace_size): per target row S = max_splits(V)
// stats partials (48 B), S overlap partials (16 B) and one float threshold.
#include <cuda_runtime.h>

#include <string>

#include "../common/status.h"
#include "../common/verify_chain_check.h"
#include "dspark/detail/philox.h"
#include "dspark/detail/sampling.h"
#include "dspark/verify_chain.h"
#include "row_reduce.cuh"
#include "truncation.cuh"

namespace dspark {
namespace cuda {
namespace {

using detail::kNegInf;
using detail::kPosInf;

constexpr int kItems = 8;  // elements per thread and load group (fp32: 2 x 16 B, 16-bit: 1 x 16 B)
constexpr int kStatsThreads = 256;
constexpr int kThrThreads = 512;
constexpr int kFinalThreads = 512;
constexpr int kFinalWarps = kFinalThreads / kWarpSize;
constexpr int64_t kMinSplitElems = 2048;  // smallest V-chunk of one stats CTA
constexpr int64_t kMaxGrid = 0x7fffffff;
constexpr int kDrawItems = 16;      // elements per thread in the final draw (64 B fp32, 32 B 16-bit)
constexpr int kMaxDrawTiles = 1024;  // two-level draw for V <= 1024 * 32 * kDrawItems (524288)

struct RowPartial {
  MaxSum t;   // target row (sampled requests)
  MaxSum q;   // draft row (LOGITS drafts, k < l)
  ArgMax am;  // target row (greedy requests)
  int32_t pad[2];
};
static_assert(sizeof(RowPartial) == 48, "RowPartial layout");

struct Overlap {
  double mn;   // sum min(p, q)
  double res;  // sum max(0, p - q)
};
struct OverlapSumOp {
  __device__ __forceinline__ Overlap operator()(const Overlap& a, const Overlap& b) const {
    Overlap r;
    r.mn = a.mn + b.mn;
    r.res = a.res + b.res;
    return r;
  }
};

__host__ __device__ inline int64_t max_splits(int32_t V) {
  const int64_t s = (static_cast<int64_t>(V) + kMinSplitElems - 1) / kMinSplitElems;
  return s < 1 ? 1 : s;
}
__host__ __device__ inline int64_t bytes_per_row(int32_t V) {
  return max_splits(V) * static_cast<int64_t>(sizeof(RowPartial) + sizeof(Overlap)) + static_cast<int64_t>(sizeof(float));
}

struct Layout {
  RowPartial* part;  // [ncap][nsplit]
  Overlap* ovl;      // [ncap][nsplit]
  float* thr;        // [ncap]
  int64_t ncap;      // target rows the workspace holds (rows >= ncap make a request invalid)
  int32_t nsplit;    // V-chunks per row in this launch (<= max_splits(V))
};

// ---------------------------------------------------------------------------------------------
// Per-request facts, recomputed identically by every kernel from device data.
// ---------------------------------------------------------------------------------------------
struct Req {
  bool valid;
  int64_t base;   // first target row
  int64_t l;      // drafts
  int64_t dbase;  // first draft row
};

__device__ __forceinline__ Req request_info(const dspark_verify_chain_params& p, int32_t r, int64_t ncap) {
  Req q;
  const int64_t* cu = p.cu_target_rows;
  const int64_t b = cu[r], e = cu[r + 1];
  const int64_t R = p.num_requests;
  // Order matters: bound b and e before subtracting (no signed overflow on hostile values).
  q.valid = cu[0] == 0 && b >= r && b <= ncap && e <= ncap && e > b && e - b - 1 <= p.max_drafts &&
            e - r - 1 <= ncap - R;  // draft rows (and accept_prob entries) stay below ncap - R
  q.base = b;
  q.l = q.valid ? e - b - 1 : 0;
  q.dbase = b - r;
  if (q.valid && q.l > 0 && p.draft_tokens == nullptr) q.valid = false;
  return q;
}

struct ReqParams {
  bool greedy;
  bool trunc;
  float inv_t;
  int32_t top_k;
  float top_p;
  int64_t seed;
  int64_t offset;
};

__device__ __forceinline__ ReqParams request_params(const dspark_verify_chain_params& p, int32_t r) {
  ReqParams rp;
  const float t = p.temperature[r];
  rp.greedy = detail::is_greedy_temperature(t);
  rp.inv_t = detail::inverse_temperature(t);
  rp.top_k = detail::effective_top_k(p.top_k, r, p.vocab_size);
  rp.top_p = detail::effective_top_p(p.top_p, r);
  rp.trunc = !rp.greedy && (rp.top_k > 0 || rp.top_p < 1.0f);
  rp.seed = p.seed ? p.seed[r] : 0;
  rp.offset = p.offset ? p.offset[r] : 0;
  return rp;
}

template <typename T>
__device__ __forceinline__ const T* target_row(const dspark_verify_chain_params& p, int64_t row) {
  return static_cast<const T*>(p.target_logits) + row * p.target_row_stride;
}
template <typename D>
__device__ __forceinline__ const D* draft_row(const dspark_verify_chain_params& p, int64_t drow) {
  return static_cast<const D*>(p.draft) + drow * p.draft_row_stride;
}

// p_v or q_v in probability units, as cpu::probability: float(row_weight / sum).
__device__ __forceinline__ float prob_of(float s, float m, float thr, double sum) {
  return static_cast<float>(static_cast<double>(detail::row_weight(s, m, thr)) / sum);
}

// Split-V chunk [g0, g1) of kItems-groups for `split`.
__device__ __forceinline__ void split_range(int64_t V, int32_t nsplit, int32_t split, int64_t* g0, int64_t* g1) {
  const int64_t ngroups = (V + kItems - 1) / kItems;
  const int64_t per = (ngroups + nsplit - 1) / nsplit;
  int64_t b = static_cast<int64_t>(split) * per;
  int64_t e = b + per;
  if (b > ngroups) b = ngroups;
  if (e > ngroups) e = ngroups;
  *g0 = b;
  *g1 = e;
}

// One warp combines the nsplit partials of a row (fixed order: lane-strided, then butterfly).
struct RowStats {
  MaxSum t, q;
  ArgMax am;
};
__device__ __forceinline__ RowStats warp_combine_row(const RowPartial* __restrict__ parts, int32_t nsplit) {
  const int lane = threadIdx.x % kWarpSize;
  RowStats s;
  s.t = maxsum_identity();
  s.q = maxsum_identity();
  s.am = argmax_identity();
  for (int j = lane; j < nsplit; j += kWarpSize) {
    const RowPartial x = parts[j];
    s.t = MaxSumOp()(s.t, x.t);
    s.q = MaxSumOp()(s.q, x.q);
    s.am = ArgMaxOp()(s.am, x.am);
  }
  s.t = warp_reduce(s.t, MaxSumOp());
  s.q = warp_reduce(s.q, MaxSumOp());
  s.am = warp_reduce(s.am, ArgMaxOp());
  return s;
}
__device__ __forceinline__ Overlap warp_combine_overlap(const Overlap* __restrict__ parts, int32_t nsplit) {
  const int lane = threadIdx.x % kWarpSize;
  Overlap o;
  o.mn = 0.0;
  o.res = 0.0;
  for (int j = lane; j < nsplit; j += kWarpSize) o = OverlapSumOp()(o, parts[j]);
  return warp_reduce(o, OverlapSumOp());
}

__device__ __forceinline__ bool dist_valid(const MaxSum& d) { return d.m > kNegInf && d.s > 0.0; }

// ---------------------------------------------------------------------------------------------
// Kernel 0: truncation thresholds.
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThrThreads) threshold_kernel(const dspark_verify_chain_params p, const Layout L,
                                                                int64_t slots) {
  __shared__ TruncationSmem sm;
  const int64_t G1 = static_cast<int64_t>(p.max_drafts) + 1;
  for (int64_t item = blockIdx.x; item < slots; item += gridDim.x) {
    const int32_t r = static_cast<int32_t>(item / G1);
    const int64_t k = item % G1;
    const Req q = request_info(p, r, L.ncap);
    if (!q.valid || k > q.l) continue;  // uniform over the block
    const ReqParams rp = request_params(p, r);
    if (!rp.trunc) continue;
    const int64_t row = q.base + k;
    const float thr = block_truncation_threshold<T, kItems>(target_row<T>(p, row), p.vocab_size, rp.inv_t,
                                                            rp.top_k, rp.top_p, sm);
    if (threadIdx.x == 0) L.thr[row] = thr;
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel 1: per-chunk row statistics.
// ---------------------------------------------------------------------------------------------
template <typename R>
__device__ __forceinline__ MaxSum chunk_maxsum(const R* __restrict__ row, int64_t V, int64_t g0, int64_t g1,
                                               float inv_t, float thr, MaxSum* sm) {
  const bool vec_ok = row_vec_ok(row);
  MaxSumAcc acc;
#pragma unroll 2
  for (int64_t g = g0 + threadIdx.x; g < g1; g += blockDim.x) {
    const int64_t v0 = g * kItems;
    float x[kItems];
    load_items<R, kItems>(row, v0, V, vec_ok, x);
#pragma unroll
    for (int i = 0; i < kItems; ++i) x[i] = detail::scaled_logit(x[i], inv_t);
    const int64_t left = V - v0;
    acc.add(x, left < kItems ? static_cast<int>(left) : kItems, thr);
  }
  return block_reduce(acc.result(), MaxSumOp(), maxsum_identity(), sm);
}

template <typename T, typename D>
__global__ void __launch_bounds__(kStatsThreads) stats_kernel(const dspark_verify_chain_params p, const Layout L,
                                                              int64_t slots) {
  __shared__ MaxSum sm_ms[kBlockReduceSlots];
  __shared__ ArgMax sm_am[kBlockReduceSlots];
  const int64_t G1 = static_cast<int64_t>(p.max_drafts) + 1;
  const int64_t V = p.vocab_size;
  const int64_t total = slots * L.nsplit;
  for (int64_t item = blockIdx.x; item < total; item += gridDim.x) {
    const int64_t slot = item / L.nsplit;
    const int32_t split = static_cast<int32_t>(item % L.nsplit);
    const int32_t r = static_cast<int32_t>(slot / G1);
    const int64_t k = slot % G1;
    const Req q = request_info(p, r, L.ncap);
    if (!q.valid || k > q.l) continue;  // uniform over the block
    const ReqParams rp = request_params(p, r);
    const int64_t row = q.base + k;
    int64_t g0, g1;
    split_range(V, L.nsplit, split, &g0, &g1);
    RowPartial out;
    out.t = maxsum_identity();
    out.q = maxsum_identity();
    out.am = argmax_identity();
    out.pad[0] = out.pad[1] = 0;
    const T* trow = target_row<T>(p, row);
    if (rp.greedy) {
      const bool vec_ok = row_vec_ok(trow);
      ArgMax a = argmax_identity();
#pragma unroll 2
      for (int64_t g = g0 + threadIdx.x; g < g1; g += blockDim.x) {
        const int64_t v0 = g * kItems;
        float x[kItems];
        load_items<T, kItems>(trow, v0, V, vec_ok, x);
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          const int32_t idx = static_cast<int32_t>(v0 + i);  // < V <= INT32_MAX when in range
          if (v0 + i < V && argmax_better(x[i], idx, a)) {
            a.v = x[i];
            a.idx = idx;
          }
        }
      }
      out.am = block_reduce(a, ArgMaxOp(), argmax_identity(), sm_am);
    } else {
      const float thr = rp.trunc ? L.thr[row] : kNegInf;
      out.t = chunk_maxsum<T>(trow, V, g0, g1, rp.inv_t, thr, sm_ms);
      if (p.draft_kind == DSPARK_DRAFT_LOGITS && k < q.l)
        out.q = chunk_maxsum<D>(draft_row<D>(p, q.dbase + k), V, g0, g1, rp.inv_t, kNegInf, sm_ms);
    }
    if (threadIdx.x == 0) L.part[row * L.nsplit + split] = out;
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel 1b: per-chunk overlap sums (accept probabilities of LOGITS / PROBS drafts).
// ---------------------------------------------------------------------------------------------
template <typename T, typename D>
__global__ void __launch_bounds__(kStatsThreads) overlap_kernel(const dspark_verify_chain_params p, const Layout L,
                                                                int64_t slots) {
  __shared__ Overlap sm_o[kBlockReduceSlots];
  __shared__ RowStats sm_stats;
  const int64_t G1 = static_cast<int64_t>(p.max_drafts) + 1;
  const int64_t V = p.vocab_size;
  const int64_t total = slots * L.nsplit;
  for (int64_t item = blockIdx.x; item < total; item += gridDim.x) {
    const int64_t slot = item / L.nsplit;
    const int32_t split = static_cast<int32_t>(item % L.nsplit);
    const int32_t r = static_cast<int32_t>(slot / G1);
    const int64_t k = slot % G1;
    const Req q = request_info(p, r, L.ncap);
    if (!q.valid || k >= q.l) continue;  // draft rows only
    const ReqParams rp = request_params(p, r);
    if (rp.greedy) continue;
    const int64_t row = q.base + k;
    __syncthreads();  // readers of sm_stats from the previous item are done
    if (threadIdx.x < kWarpSize) {
      const RowStats s = warp_combine_row(L.part + row * L.nsplit, L.nsplit);
      if (threadIdx.x == 0) sm_stats = s;
    }
    __syncthreads();
    const MaxSum pt = sm_stats.t, pq = sm_stats.q;
    if (!dist_valid(pt)) continue;  // accept_prob 0, written by the final kernel
    const bool logits = p.draft_kind == DSPARK_DRAFT_LOGITS;
    if (logits && !dist_valid(pq)) continue;  // q = 0: min 0, residual 1 (final kernel)
    const float thr = rp.trunc ? L.thr[row] : kNegInf;
    const float ip = static_cast<float>(1.0 / pt.s);
    const float iq = logits ? static_cast<float>(1.0 / pq.s) : 0.0f;
    const bool fast = logits && pt.m != kPosInf && pq.m != kPosInf;
    const T* trow = target_row<T>(p, row);
    const D* qrow = draft_row<D>(p, q.dbase + k);
    const bool tvec = row_vec_ok(trow), qvec = row_vec_ok(qrow);
    int64_t g0, g1;
    split_range(V, L.nsplit, split, &g0, &g1);
    Overlap acc;
    acc.mn = 0.0;
    acc.res = 0.0;
    for (int64_t g = g0 + threadIdx.x; g < g1; g += blockDim.x) {
      const int64_t v0 = g * kItems;
      float x[kItems], y[kItems];
      load_items<T, kItems>(trow, v0, V, tvec, x);
      load_items<D, kItems>(qrow, v0, V, qvec, y);
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        if (v0 + i >= V) continue;
        const float s = detail::scaled_logit(x[i], rp.inv_t);
        float pv, qv;
        if (fast) {  // cpu::overlap_logits' vector path
          pv = s >= thr ? detail::exp_nonpos(s - pt.m) * ip : 0.0f;
          qv = detail::exp_nonpos(detail::scaled_logit(y[i], rp.inv_t) - pq.m) * iq;
        } else if (logits) {
          pv = prob_of(s, pt.m, thr, pt.s);
          qv = prob_of(detail::scaled_logit(y[i], rp.inv_t), pq.m, kNegInf, pq.s);
        } else {  // PROBS
          pv = prob_of(s, pt.m, thr, pt.s);
          qv = detail::sanitize_prob(y[i]);
        }
        acc.mn += pv < qv ? pv : qv;
        acc.res += pv > qv ? pv - qv : 0.0f;
      }
    }
    const Overlap o = block_reduce(acc, OverlapSumOp(), Overlap{0.0, 0.0}, sm_o);
    if (threadIdx.x == 0) L.ovl[row * L.nsplit + split] = o;
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel 2: accept walk and the one draw per request.
// ---------------------------------------------------------------------------------------------
struct RowRec {
  MaxSum t, q;      // combined target / draft statistics (sampled)
  double p_d, q_d;  // p_k(d_k), q_k(d_k) (0 when d_k is out of range)
  double coin;      // accept uniform
  double min_sum, res_sum;
  int64_t d;        // draft token (-1 at the bonus row)
  float thr;
  int32_t am;       // greedy argmax (-1: no finite logit)
  int32_t has_res;  // res_sum is known (ONE_HOT, invalid q, or the overlap kernel ran)
  int32_t pad;
};

enum DrawMode : int { kDrawNone = 0, kDrawFromP = 1, kDrawResidual = 2 };
enum ResidualMode : int { kResOneHotFast = 0, kResLogitsFast = 1, kResProbsFast = 2, kResGeneric = 3 };

// Weights of normalize(max(0, p - q)) (unnormalised, probability units) for kItems indices, as in
// cpu::ChainTask::sample_residual (same branch choice, same float expressions).
template <typename T, typename D>
struct ResidualFill {
  const T* trow;
  const D* qrow;  // NULL for ONE_HOT
  bool tvec, qvec;
  int64_t V;
  int mode;
  int draft_kind;
  int64_t token;
  float inv_t, m, thr, ip, mq, iq;
  double st, sq;

  template <int N>
  __device__ __forceinline__ void operator()(int64_t v0, float (&w)[N]) const {
    float x[N], y[N];
    load_items<T, N>(trow, v0, V, tvec, x);
    if (qrow != nullptr) {
      load_items<D, N>(qrow, v0, V, qvec, y);
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) y[i] = 0.0f;
    }
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int64_t v = v0 + i;
      const float s = detail::scaled_logit(x[i], inv_t);
      float wv;
      if (mode == kResGeneric) {
        const float pv = prob_of(s, m, thr, st);
        float qa;
        if (draft_kind == DSPARK_DRAFT_ONE_HOT) qa = v == token ? 1.0f : 0.0f;
        else if (draft_kind == DSPARK_DRAFT_LOGITS) qa = prob_of(detail::scaled_logit(y[i], inv_t), mq, kNegInf, sq);
        else qa = detail::sanitize_prob(y[i]);
        const float d = pv - qa;
        wv = d > 0.0f ? d : 0.0f;
      } else {
        const float e = detail::exp_nonpos(s - m) * ip;
        const float pb = s >= thr ? e : 0.0f;
        if (mode == kResOneHotFast) {
          wv = v == token ? (pb - 1.0f > 0.0f ? pb - 1.0f : 0.0f) : pb;
        } else {
          const float qv = mode == kResLogitsFast ? detail::exp_nonpos(detail::scaled_logit(y[i], inv_t) - mq) * iq
                                                  : detail::sanitize_prob(y[i]);
          const float d = pb - qv;
          wv = d > 0.0f ? d : 0.0f;
        }
      }
      w[i] = v < V ? wv : 0.0f;
    }
  }
};

template <typename T>
struct TargetFill {
  const T* trow;
  bool tvec;
  int64_t V;
  float inv_t, m, thr;
  template <int N>
  __device__ __forceinline__ void operator()(int64_t v0, float (&w)[N]) const {
    float x[N];
    load_items<T, N>(trow, v0, V, tvec, x);
#pragma unroll
    for (int i = 0; i < N; ++i)
      w[i] = v0 + i < V ? detail::row_weight(detail::scaled_logit(x[i], inv_t), m, thr) : 0.0f;
  }
};

template <typename T, typename D>
__global__ void __launch_bounds__(kFinalThreads) final_kernel(const dspark_verify_chain_params p, const Layout L) {
  __shared__ RowRec recs[kFinalWarps];
  __shared__ RowRec draw_rec;
  __shared__ double sm_d[kBlockReduceSlots];
  __shared__ int64_t sm_i[kBlockReduceSlots];
  __shared__ int s_done, s_mode;
  __shared__ int64_t s_k;
  __shared__ TiledInverseCdf<kDrawItems, kMaxDrawTiles> cdf;

  const int32_t r = blockIdx.x;
  const int64_t G1 = static_cast<int64_t>(p.max_drafts) + 1;
  const int64_t V = p.vocab_size;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  int64_t* tokens = p.out_tokens + static_cast<int64_t>(r) * G1;
  for (int64_t j = threadIdx.x; j < G1; j += blockDim.x) tokens[j] = -1;
  const Req q = request_info(p, r, L.ncap);
  if (!q.valid) {  // uniform: the whole block leaves
    if (threadIdx.x == 0) p.out_num_accepted[r] = 0;
    return;
  }
  const ReqParams rp = request_params(p, r);
  const int kind = p.draft_kind;
  float* accept_prob = p.out_accept_prob;
  const bool have_overlap = accept_prob != nullptr && kind != DSPARK_DRAFT_ONE_HOT;
  if (threadIdx.x == 0) {
    s_done = 0;
    s_mode = kDrawNone;
    s_k = 0;
  }
  __syncthreads();  // the -1 fill is visible before thread 0 writes tokens

  int64_t accepted = 0;  // thread 0's walk state
  bool accepting = true;
  for (int64_t k0 = 0; k0 <= q.l; k0 += kFinalWarps) {
    // --- one warp per row: combine partials, per-row scalars ---
    const int64_t k = k0 + warp;
    if (k <= q.l) {  // warp-uniform
      const int64_t row = q.base + k;
      const RowStats s = warp_combine_row(L.part + row * L.nsplit, L.nsplit);
      RowRec rec;
      rec.t = s.t;
      rec.q = s.q;
      rec.am = s.am.idx;
      rec.d = k < q.l ? p.draft_tokens[q.dbase + k] : -1;
      rec.thr = rp.trunc ? L.thr[row] : kNegInf;
      rec.p_d = rec.q_d = rec.coin = rec.min_sum = rec.res_sum = 0.0;
      rec.has_res = 0;
      rec.pad = 0;
      const bool in_range = rec.d >= 0 && rec.d < V;
      const bool tvalid = dist_valid(rec.t);
      if (!rp.greedy && tvalid && k < q.l) {
        if (lane == 0) {
          if (in_range) {
            const T* trow = target_row<T>(p, row);
            rec.p_d = prob_of(detail::scaled_logit(detail::load_as_float(trow, rec.d), rp.inv_t), rec.t.m, rec.thr,
                              rec.t.s);
            if (kind == DSPARK_DRAFT_ONE_HOT) {
              rec.q_d = 1.0;
            } else {
              const D* qrow = draft_row<D>(p, q.dbase + k);
              const float y = detail::load_as_float(qrow, rec.d);
              rec.q_d = kind == DSPARK_DRAFT_LOGITS
                            ? static_cast<double>(prob_of(detail::scaled_logit(y, rp.inv_t), rec.q.m, kNegInf, rec.q.s))
                            : static_cast<double>(detail::sanitize_prob(y));
            }
          }
          rec.coin = detail::philox_uniform(rp.seed, rp.offset, static_cast<uint32_t>(k), detail::kRngAcceptCoin);
        }
        if (kind == DSPARK_DRAFT_ONE_HOT) {
          rec.min_sum = rec.p_d;  // lane 0's value is the one stored
          rec.res_sum = 1.0 - rec.p_d > 0.0 ? 1.0 - rec.p_d : 0.0;
          rec.has_res = 1;
        } else if (kind == DSPARK_DRAFT_LOGITS && !dist_valid(rec.q)) {
          rec.min_sum = 0.0;
          rec.res_sum = 1.0;
          rec.has_res = 1;
        } else if (have_overlap) {
          const Overlap o = warp_combine_overlap(L.ovl + row * L.nsplit, L.nsplit);
          rec.min_sum = o.mn;
          rec.res_sum = o.res;
          rec.has_res = 1;
        }
      }
      if (lane == 0) recs[warp] = rec;
    }
    __syncthreads();
    // --- thread 0: the sequential accept walk over this batch of rows ---
    if (threadIdx.x == 0) {
      const int64_t k1 = k0 + kFinalWarps - 1 < q.l ? k0 + kFinalWarps - 1 : q.l;
      for (int64_t kk = k0; kk <= k1 && !s_done; ++kk) {
        const RowRec& rec = recs[kk - k0];
        const bool need_prob = accept_prob != nullptr && kk < q.l;
        if (!accepting && !need_prob) {
          s_done = 1;
          break;
        }
        const int64_t d = rec.d;
        const bool d_in_range = d >= 0 && d < V;
        if (rp.greedy) {
          const int64_t am = rec.am;
          if (need_prob) accept_prob[q.dbase + kk] = (am >= 0 && d == am) ? 1.0f : 0.0f;
          if (!accepting) continue;
          if (am < 0) {  // no finite logit: nothing to emit
            accepting = false;
            continue;
          }
          if (kk < q.l && d == am) {
            tokens[kk] = d;
            ++accepted;
          } else {
            tokens[kk] = am;
            accepting = false;
          }
          continue;
        }
        if (!dist_valid(rec.t)) {
          if (need_prob) accept_prob[q.dbase + kk] = 0.0f;
          accepting = false;
          continue;
        }
        if (kk == q.l) {  // every draft accepted: bonus token from p_l
          s_mode = kDrawFromP;
          s_k = kk;
          draw_rec = rec;
          s_done = 1;
          break;
        }
        if (need_prob) accept_prob[q.dbase + kk] = static_cast<float>(rec.min_sum);
        if (!accepting) continue;
        if (d_in_range && rec.coin * rec.q_d < rec.p_d) {
          tokens[kk] = d;
          ++accepted;
          continue;
        }
        s_mode = kDrawResidual;
        s_k = kk;
        draw_rec = rec;
        accepting = false;
      }
      if (!accepting && accept_prob == nullptr) s_done = 1;
    }
    __syncthreads();
    if (s_done) break;  // uniform: read after the barrier
  }
  if (threadIdx.x == 0) p.out_num_accepted[r] = accepted;
  __syncthreads();  // draw_rec / s_mode / s_k visible to all

  int mode = s_mode;
  if (mode == kDrawNone) return;  // uniform
  const int64_t k = s_k;
  const RowRec rec = draw_rec;
  const int64_t row = q.base + k;
  const T* trow = target_row<T>(p, row);
  const bool tvec = row_vec_ok(trow);
  const double u = detail::philox_uniform(rp.seed, rp.offset, static_cast<uint32_t>(k), detail::kRngSample);
  int64_t tok = -1;
  if (mode == kDrawResidual) {
    const bool logits_invalid_q = kind == DSPARK_DRAFT_LOGITS && !dist_valid(rec.q);
    if (logits_invalid_q) {
      mode = kDrawFromP;  // q carries no mass: the CPU's residual weights are all 0 -> from p
    } else {
      ResidualFill<T, D> f;
      f.trow = trow;
      f.qrow = kind == DSPARK_DRAFT_ONE_HOT ? nullptr : draft_row<D>(p, q.dbase + k);
      f.tvec = tvec;
      f.qvec = f.qrow != nullptr && row_vec_ok(f.qrow);
      f.V = V;
      f.draft_kind = kind;
      f.token = rec.d;
      f.inv_t = rp.inv_t;
      f.m = rec.t.m;
      f.thr = rec.thr;
      f.st = rec.t.s;
      f.ip = static_cast<float>(1.0 / rec.t.s);
      f.mq = rec.q.m;
      f.sq = rec.q.s;
      f.iq = kind == DSPARK_DRAFT_LOGITS ? static_cast<float>(1.0 / rec.q.s) : 0.0f;
      const bool finite_p = rec.t.m != kPosInf;
      if (finite_p && kind == DSPARK_DRAFT_ONE_HOT) f.mode = kResOneHotFast;
      else if (finite_p && kind == DSPARK_DRAFT_LOGITS && rec.q.m != kPosInf) f.mode = kResLogitsFast;
      else if (finite_p && kind == DSPARK_DRAFT_PROBS) f.mode = kResProbsFast;
      else f.mode = kResGeneric;
      // One streaming pass gives the per-tile sums (and the residual mass when the overlap kernel
      // did not run: the same weights the scan uses); the scan then reads only the crossing tile.
      const bool tiled = cdf.tile_sums(V, f);
      double rsum = rec.res_sum;
      if (!rec.has_res) {
        if (tiled) {
          rsum = cdf.total();
        } else {
          double local = 0.0;
          for (int64_t v0 = static_cast<int64_t>(threadIdx.x) * kDrawItems; v0 < V;
               v0 += static_cast<int64_t>(blockDim.x) * kDrawItems) {
            float w[kDrawItems];
            f(v0, w);
#pragma unroll
            for (int i = 0; i < kDrawItems; ++i) local += w[i];
          }
          rsum = block_reduce(local, SumOp(), 0.0, sm_d);
        }
      }
      if (rsum > 0.0)
        tok = tiled ? cdf.find(V, u * rsum, f) : block_inverse_cdf<kDrawItems>(V, u * rsum, f, sm_d, sm_i);
      if (tok < 0) mode = kDrawFromP;
    }
  }
  if (mode == kDrawFromP) {
    TargetFill<T> f;
    f.trow = trow;
    f.tvec = tvec;
    f.V = V;
    f.inv_t = rp.inv_t;
    f.m = rec.t.m;
    f.thr = rec.thr;
    if (cdf.tile_sums(V, f)) tok = cdf.find(V, u * rec.t.s, f);
    else tok = block_inverse_cdf<kDrawItems>(V, u * rec.t.s, f, sm_d, sm_i);
  }
  if (threadIdx.x == 0) tokens[k] = tok;
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
dspark_status launch_check(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    return fail(DSPARK_ERR_CUDA, std::string("verify_chain: launch of the ") + what + " kernel failed: " +
                                     cudaGetErrorString(e));
  return DSPARK_OK;
}

unsigned int grid_for(int64_t items) {
  return static_cast<unsigned int>(items < 1 ? 1 : (items > kMaxGrid ? kMaxGrid : items));
}

template <typename T, typename D>
dspark_status launch_all(const dspark_verify_chain_params& p, const Layout& L, int64_t slots, cudaStream_t stream) {
  if (p.top_k != nullptr || p.top_p != nullptr) {
    threshold_kernel<T><<<grid_for(slots), kThrThreads, 0, stream>>>(p, L, slots);
    if (const dspark_status st = launch_check("threshold")) return st;
  }
  const int64_t items = slots * L.nsplit;
  stats_kernel<T, D><<<grid_for(items), kStatsThreads, 0, stream>>>(p, L, slots);
  if (const dspark_status st = launch_check("stats")) return st;
  if (p.out_accept_prob != nullptr && p.draft_kind != DSPARK_DRAFT_ONE_HOT) {
    overlap_kernel<T, D><<<grid_for(items), kStatsThreads, 0, stream>>>(p, L, slots);
    if (const dspark_status st = launch_check("overlap")) return st;
  }
  final_kernel<T, D><<<static_cast<unsigned int>(p.num_requests), kFinalThreads, 0, stream>>>(p, L);
  return launch_check("final");
}

template <typename T>
dspark_status dispatch_draft(const dspark_verify_chain_params& p, const Layout& L, int64_t slots,
                             cudaStream_t stream) {
  if (p.draft_kind == DSPARK_DRAFT_ONE_HOT) return launch_all<T, float>(p, L, slots, stream);
  switch (p.draft_dtype) {
    case DSPARK_FLOAT32: return launch_all<T, float>(p, L, slots, stream);
    case DSPARK_BFLOAT16: return launch_all<T, detail::bf16_t>(p, L, slots, stream);
    case DSPARK_FLOAT16: return launch_all<T, detail::fp16_t>(p, L, slots, stream);
  }
  return fail(DSPARK_ERR_INTERNAL, "verify_chain: unhandled draft_dtype");
}

}  // namespace
}  // namespace cuda
}  // namespace dspark

extern "C" size_t dspark_verify_chain_workspace_size(int32_t num_requests, int64_t num_rows, int32_t vocab_size) {
  if (num_requests <= 0 || vocab_size <= 0) return 0;
  const int64_t rows = num_rows > num_requests ? num_rows : num_requests;  // each request owns >= 1 row
  return static_cast<size_t>(rows) * static_cast<size_t>(dspark::cuda::bytes_per_row(vocab_size));
}

extern "C" dspark_status dspark_verify_chain_cuda(const dspark_verify_chain_params* params, void* stream) {
  using namespace dspark;
  clear_error();
  const dspark_status st = check_verify_chain_params(params);
  if (st != DSPARK_OK || params->num_requests == 0) return st;
  const dspark_verify_chain_params& p = *params;
  const int64_t R = p.num_requests;
  const int64_t G1 = static_cast<int64_t>(p.max_drafts) + 1;
  const int64_t slots = R * G1;
  const int64_t bpr = cuda::bytes_per_row(p.vocab_size);
  const int64_t need_min = static_cast<int64_t>(dspark_verify_chain_workspace_size(p.num_requests, R, p.vocab_size));
  if (p.workspace == nullptr || p.workspace_bytes < static_cast<size_t>(need_min))
    return fail(DSPARK_ERR_INVALID_ARGUMENT,
                "verify_chain: workspace_bytes (" + std::to_string(p.workspace_bytes) +
                    ") is too small or workspace is NULL: pass dspark_verify_chain_workspace_size(num_requests, "
                    "num_rows, vocab_size) bytes (at least " + std::to_string(need_min) + " here)");
  if ((reinterpret_cast<uintptr_t>(p.workspace) & 15u) != 0)
    return fail(DSPARK_ERR_INVALID_ARGUMENT, "verify_chain: workspace must be 16-byte aligned");

  cuda::Layout L;
  int64_t ncap = static_cast<int64_t>(p.workspace_bytes / static_cast<size_t>(bpr));
  if (ncap > slots) ncap = slots;  // more rows than R * (gamma + 1) can never be valid
  const int64_t S = cuda::max_splits(p.vocab_size);
  char* ws = static_cast<char*>(p.workspace);
  L.part = reinterpret_cast<cuda::RowPartial*>(ws);
  L.ovl = reinterpret_cast<cuda::Overlap*>(ws + ncap * S * static_cast<int64_t>(sizeof(cuda::RowPartial)));
  L.thr = reinterpret_cast<float*>(ws + ncap * S * static_cast<int64_t>(sizeof(cuda::RowPartial) + sizeof(cuda::Overlap)));
  L.ncap = ncap;

  // Splits per row: enough stats CTAs to fill the GPU (about 8 per SM) when rows are few.
  int device = 0, sms = 132;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e != cudaSuccess)
    return fail(DSPARK_ERR_CUDA, std::string("verify_chain: cannot query the device: ") + cudaGetErrorString(e));
  const int64_t want = static_cast<int64_t>(sms) * 8;
  int64_t nsplit = (want + slots - 1) / slots;
  if (nsplit > S) nsplit = S;
  if (nsplit < 1) nsplit = 1;
  L.nsplit = static_cast<int32_t>(nsplit);

  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.target_dtype) {
    case DSPARK_FLOAT32: return cuda::dispatch_draft<float>(p, L, slots, s);
    case DSPARK_BFLOAT16: return cuda::dispatch_draft<detail::bf16_t>(p, L, slots, s);
    case DSPARK_FLOAT16: return cuda::dispatch_draft<detail::fp16_t>(p, L, slots, s);
  }
  return fail(DSPARK_ERR_INTERNAL, "verify_chain: unhandled target_dtype");
}
