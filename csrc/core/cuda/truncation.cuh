// Internal: block-wide top-k / top-p truncation threshold of one logit row, the CUDA twin of
// cpu::truncation_threshold (row_ops.h). Reusable by every sampling op's CUDA kernel.
//
// top-k: radix select (4 passes of 8 bits over detail::float_order_key of the scaled logits) for
// the k-th largest scaled logit; ties at the boundary are kept by the caller's `s >= thr`.
// top-p (after top-k): among candidates s >= thr_k, with m their max and need = top_p * sum of
// weights, the threshold is the largest candidate value x whose kept mass (sum of weights of
// s >= x) reaches need. That is exactly the value at which the CPU's sorted prefix sum first
// reaches need (a tie group either crosses as a whole or not at all), found by a 4-level radix
// search over bucket counts and masses instead of a sort. If rounding leaves need unreached the
// smallest candidate is taken, as on the CPU.
//
// The row is re-read once per pass (it stays in L2 for realistic vocabularies). The bucket masses
// use double atomics in shared memory; the order of those additions may vary between runs, which
// can only matter when a boundary mass equals need to within ~1e-16 relative.
#ifndef DSPARK_CORE_CUDA_TRUNCATION_CUH_
#define DSPARK_CORE_CUDA_TRUNCATION_CUH_

#include "row_reduce.cuh"

namespace dspark {
namespace cuda {

struct TruncationSmem {
  unsigned int cnt[256];
  double mass[256];
  double red_d[kBlockReduceSlots];
  float red_f[kBlockReduceSlots];
  uint32_t prefix;
  uint32_t rank;
};

// Every thread of the block must call it; returns the threshold (kNegInf: no truncation) to all.
// `top_k` as from detail::effective_top_k (0: off), `top_p` from detail::effective_top_p (1: off).
template <typename T, int ITEMS>
__device__ float block_truncation_threshold(const T* __restrict__ row, int64_t V, float inv_t, int32_t top_k,
                                            float top_p, TruncationSmem& sm) {
  const bool vec_ok = row_vec_ok(row);
  const int64_t step = static_cast<int64_t>(blockDim.x) * ITEMS;
  float thr = detail::kNegInf;

  if (top_k > 0) {
    uint32_t prefix = 0, rank = static_cast<uint32_t>(top_k);
    for (int shift = 24; shift >= 0; shift -= 8) {
      const uint32_t hi_mask = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
      __syncthreads();  // readers of sm from the previous pass / call are done
      for (int b = threadIdx.x; b < 256; b += blockDim.x) sm.cnt[b] = 0;
      __syncthreads();
      for (int64_t v0 = static_cast<int64_t>(threadIdx.x) * ITEMS; v0 < V; v0 += step) {
        float x[ITEMS];
        load_items<T, ITEMS>(row, v0, V, vec_ok, x);
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
          if (v0 + i >= V) continue;
          const uint32_t key = detail::float_order_key(detail::scaled_logit(x[i], inv_t));
          if ((key & hi_mask) == (prefix & hi_mask)) atomicAdd(&sm.cnt[(key >> shift) & 255u], 1u);
        }
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        uint32_t acc = 0;
        for (int b = 255; b >= 0; --b) {
          const uint32_t c = sm.cnt[b];
          if (acc + c >= rank) {  // the rank-th largest remaining key has this digit
            prefix |= static_cast<uint32_t>(b) << shift;
            rank -= acc;
            break;
          }
          acc += c;
        }
        sm.prefix = prefix;
        sm.rank = rank;
      }
      __syncthreads();
      prefix = sm.prefix;
      rank = sm.rank;
    }
    thr = detail::float_from_order_key(prefix);
  }

  if (top_p < 1.0f) {
    float lm = detail::kNegInf;
    for (int64_t v0 = static_cast<int64_t>(threadIdx.x) * ITEMS; v0 < V; v0 += step) {
      float x[ITEMS];
      load_items<T, ITEMS>(row, v0, V, vec_ok, x);
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const float s = detail::scaled_logit(x[i], inv_t);  // -inf past V
        if (s >= thr && s > lm) lm = s;
      }
    }
    const float m = block_reduce(lm, MaxOp(), detail::kNegInf, sm.red_f);
    if (!(m > detail::kNegInf)) return thr;  // uniform: every thread has the same m
    double lt = 0.0;
    for (int64_t v0 = static_cast<int64_t>(threadIdx.x) * ITEMS; v0 < V; v0 += step) {
      float x[ITEMS];
      load_items<T, ITEMS>(row, v0, V, vec_ok, x);
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const float s = detail::scaled_logit(x[i], inv_t);
        if (v0 + i < V && s >= thr) lt += detail::row_weight(s, m, detail::kNegInf);
      }
    }
    const double total = block_reduce(lt, SumOp(), 0.0, sm.red_d);
    const double need = static_cast<double>(top_p) * total;

    uint32_t prefix = 0;
    double above = 0.0;     // mass of candidates above the current prefix range (thread 0 only)
    bool low_mode = false;  // need unreachable by rounding: follow the smallest candidate
    for (int shift = 24; shift >= 0; shift -= 8) {
      const uint32_t hi_mask = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
      __syncthreads();
      for (int b = threadIdx.x; b < 256; b += blockDim.x) {
        sm.cnt[b] = 0;
        sm.mass[b] = 0.0;
      }
      __syncthreads();
      for (int64_t v0 = static_cast<int64_t>(threadIdx.x) * ITEMS; v0 < V; v0 += step) {
        float x[ITEMS];
        load_items<T, ITEMS>(row, v0, V, vec_ok, x);
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
          const float s = detail::scaled_logit(x[i], inv_t);
          if (v0 + i >= V || !(s >= thr)) continue;
          const uint32_t key = detail::float_order_key(s);
          if ((key & hi_mask) != (prefix & hi_mask)) continue;
          const uint32_t b = (key >> shift) & 255u;
          atomicAdd(&sm.cnt[b], 1u);
          const float w = detail::row_weight(s, m, detail::kNegInf);
          if (w > 0.0f) atomicAdd(&sm.mass[b], static_cast<double>(w));
        }
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        int chosen = -1;
        if (!low_mode) {
          double acc = above;
          for (int b = 255; b >= 0; --b) {
            if (sm.cnt[b] == 0) continue;
            if (acc + sm.mass[b] >= need) {
              chosen = b;
              break;
            }
            acc += sm.mass[b];
          }
          if (chosen >= 0) above = acc;
          else low_mode = true;
        }
        if (low_mode) {
          for (int b = 0; b < 256; ++b)
            if (sm.cnt[b] != 0) {
              chosen = b;
              break;
            }
        }
        // chosen >= 0 always: the prefix range holds at least one candidate (m exists)
        if (chosen < 0) chosen = 0;
        prefix |= static_cast<uint32_t>(chosen) << shift;
        sm.prefix = prefix;
      }
      __syncthreads();
      prefix = sm.prefix;
    }
    const float x = detail::float_from_order_key(prefix);
    thr = thr < x ? x : thr;  // std::max(thr, x)
  }
  __syncthreads();  // sm may be reused by the caller right after
  return thr;
}

}  // namespace cuda
}  // namespace dspark

#endif  // DSPARK_CORE_CUDA_TRUNCATION_CUH_
