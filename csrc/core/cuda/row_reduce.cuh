// Internal: CUDA building blocks for kernels that reduce or scan vocabulary rows (verify_chain,
// verify_tree, dspark_draft, ...). Everything here is deterministic: reductions use fixed
// shuffle/shared-memory trees (no atomics), so the same inputs give bit-identical results on
// every launch and every grid size that keeps the same number of splits.
//
// Requirements of the block-level helpers: blockDim.x is a multiple of 32 and <= 1024, every
// thread of the block calls them (they contain __syncthreads()), and `sm` points to shared
// memory of at least kBlockReduceSlots elements of the reduced type.
//
// Per-element math (scaled logits, weights, NaN/inf rules) comes from dspark/detail/*.h so the
// CUDA kernels compute exactly what the CPU kernels compute.
#ifndef DSPARK_CORE_CUDA_ROW_REDUCE_CUH_
#define DSPARK_CORE_CUDA_ROW_REDUCE_CUH_

#include <cuda_runtime.h>
#include <stdint.h>

#include "dspark/detail/hd.h"
#include "dspark/detail/sampling.h"

namespace dspark {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int kBlockReduceSlots = 33;  // one per warp (<= 32) + the broadcast slot

// ---------------------------------------------------------------------------------------------
// Shuffles and reductions of any trivially copyable type whose size is a multiple of 4 bytes.
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ T shfl_xor_any(const T& v, int lane_mask) {
  static_assert(sizeof(T) % 4 == 0, "shfl_xor_any: size must be a multiple of 4 bytes");
  constexpr int W = sizeof(T) / 4;
  union U {
    T t;
    int w[W];
    __device__ U() {}
  } u;
  u.t = v;
#pragma unroll
  for (int i = 0; i < W; ++i) u.w[i] = __shfl_xor_sync(0xffffffffu, u.w[i], lane_mask);
  return u.t;
}

// Butterfly reduction: every lane ends with the same value. `op` must be commutative (IEEE
// addition and the combines below are), so all lanes agree bit for bit.
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) v = op(v, shfl_xor_any(v, m));
  return v;
}

// Block reduction; the result is returned to every thread. `identity` fills missing warps.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T identity, T* sm) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int nwarps = blockDim.x / kWarpSize;
  v = warp_reduce(v, op);
  __syncthreads();  // earlier readers of sm are done
  if (lane == 0) sm[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T x = lane < nwarps ? sm[lane] : identity;
    x = warp_reduce(x, op);
    if (lane == 0) sm[kBlockReduceSlots - 1] = x;
  }
  __syncthreads();
  return sm[kBlockReduceSlots - 1];
}

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MinOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return b < a ? b : a; }
};
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return b > a ? b : a; }
};

// Exclusive prefix sum over the block in thread order (double, fixed tree). Returns the prefix of
// this thread and writes the block total to *total (same value in every thread).
__device__ __forceinline__ double block_exclusive_scan(double v, double* sm, double* total) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int nwarps = blockDim.x / kWarpSize;
  double incl = v;
#pragma unroll
  for (int d = 1; d < kWarpSize; d <<= 1) {
    const double y = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += y;
  }
  __syncthreads();  // earlier readers of sm are done
  if (lane == kWarpSize - 1) sm[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const double x = lane < nwarps ? sm[lane] : 0.0;
    double xi = x;
#pragma unroll
    for (int d = 1; d < kWarpSize; d <<= 1) {
      const double y = __shfl_up_sync(0xffffffffu, xi, d);
      if (lane >= d) xi += y;
    }
    const double xe = __shfl_up_sync(0xffffffffu, xi, 1);
    sm[lane] = lane > 0 ? xe : 0.0;  // exclusive prefix of warp `lane` (lane < 32 = kBlockReduceSlots - 1)
    if (lane == kWarpSize - 1) sm[kBlockReduceSlots - 1] = xi;
  }
  const double excl = __shfl_up_sync(0xffffffffu, incl, 1);
  __syncthreads();
  *total = sm[kBlockReduceSlots - 1];
  return sm[warp] + (lane > 0 ? excl : 0.0);
}

// ---------------------------------------------------------------------------------------------
// Online max / sum of weights (softmax normaliser) with the exact rules of detail/sampling.h:
// the weight of s in a row with max m is row_weight(s, m, thr); when m is +inf the mass sits on
// the +inf entries. Partial results over disjoint parts of a row combine exactly like the
// CPU's single pass up to the rounding of the rescale factor exp_nonpos(m_part - m).
// ---------------------------------------------------------------------------------------------
// Factor that moves a sum of weights relative to m_old to one relative to m_new >= m_old.
__device__ __forceinline__ float rescale_factor(float m_old, float m_new) {
  if (m_new == detail::kPosInf) return m_old == detail::kPosInf ? 1.0f : 0.0f;
  return detail::exp_nonpos(m_old - m_new);  // NaN (-inf - -inf) and -inf give 0
}

struct MaxSum {
  float m;   // max kept scaled logit (-inf: none)
  float pad;
  double s;  // sum of weights relative to m
};

__device__ __forceinline__ MaxSum maxsum_identity() {
  MaxSum r;
  r.m = detail::kNegInf;
  r.pad = 0.0f;
  r.s = 0.0;
  return r;
}

struct MaxSumOp {
  __device__ __forceinline__ MaxSum operator()(const MaxSum& a, const MaxSum& b) const {
    MaxSum r;
    r.m = b.m > a.m ? b.m : a.m;
    r.pad = 0.0f;
    // Empty sides (s == 0) contribute nothing whatever their factor.
    const double fa = a.s != 0.0 ? static_cast<double>(rescale_factor(a.m, r.m)) : 0.0;
    const double fb = b.s != 0.0 ? static_cast<double>(rescale_factor(b.m, r.m)) : 0.0;
    r.s = a.s * fa + b.s * fb;
    return r;
  }
};

// Per-thread accumulator of kept scaled logits (float sum; thread chunks are short).
struct MaxSumAcc {
  float m = detail::kNegInf;
  float s = 0.0f;

  // Adds n scaled logits; entries with !(x >= thr) are not kept.
  template <int N>
  __device__ __forceinline__ void add(const float (&x)[N], int n, float thr) {
    float vm = detail::kNegInf;
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (i < n && x[i] >= thr && x[i] > vm) vm = x[i];
    if (vm > m) {
      s = s != 0.0f ? s * rescale_factor(m, vm) : 0.0f;
      m = vm;
    }
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (i < n) s += detail::row_weight(x[i], m, thr);
  }
  __device__ __forceinline__ MaxSum result() const {
    MaxSum r;
    r.m = m;
    r.pad = 0.0f;
    r.s = static_cast<double>(s);
    return r;
  }
};

// ---------------------------------------------------------------------------------------------
// First argmax (NaN never wins, lowest index among equal maxima, -1 when nothing beats -inf).
// ---------------------------------------------------------------------------------------------
struct ArgMax {
  float v;
  int32_t idx;
};
__device__ __forceinline__ ArgMax argmax_identity() {
  ArgMax a;
  a.v = detail::kNegInf;
  a.idx = -1;
  return a;
}
__device__ __forceinline__ bool argmax_better(float v, int32_t idx, const ArgMax& cur) {
  if (idx < 0) return false;
  if (v > cur.v) return true;
  return v == cur.v && cur.idx >= 0 && idx < cur.idx;  // -inf == -inf only matters with cur.idx >= 0
}
struct ArgMaxOp {
  __device__ __forceinline__ ArgMax operator()(const ArgMax& a, const ArgMax& b) const {
    return argmax_better(b.v, b.idx, a) ? b : a;
  }
};
// Note: with v == -inf, argmax_better(-inf, i, {-inf, -1}) is false, so an all -inf/NaN row
// keeps idx -1, as detail's rule requires.

// ---------------------------------------------------------------------------------------------
// Loads: ITEMS consecutive elements starting at v0 (a multiple of ITEMS), widened to float.
// `vec_ok` says the row start is 16-byte aligned; then every group is, and it is read with
// 16-byte loads. Elements at or past V are returned as -inf (callers mask them by index).
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ bool row_vec_ok(const T* row) {
  return (reinterpret_cast<uintptr_t>(row) & 15u) == 0;
}

template <typename T, int ITEMS>
__device__ __forceinline__ void load_items(const T* __restrict__ row, int64_t v0, int64_t V, bool vec_ok,
                                           float (&out)[ITEMS]) {
  static_assert((ITEMS * sizeof(T)) % 16 == 0, "load_items: ITEMS elements must span whole 16-byte words");
  constexpr int kPerVec = 16 / sizeof(T);
  constexpr int kVecs = ITEMS / kPerVec;
  if (vec_ok && v0 + ITEMS <= V) {
    const uint4* p = reinterpret_cast<const uint4*>(row + v0);
#pragma unroll
    for (int j = 0; j < kVecs; ++j) {
      const uint4 raw = __ldg(p + j);
      union {
        uint4 u;
        T t[kPerVec];
      } cvt;
      cvt.u = raw;
#pragma unroll
      for (int i = 0; i < kPerVec; ++i) out[j * kPerVec + i] = detail::load_as_float(cvt.t, i);
    }
  } else {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i)
      out[i] = v0 + i < V ? detail::load_as_float(row, v0 + i) : detail::kNegInf;
  }
}

// ---------------------------------------------------------------------------------------------
// Block-wide inverse-CDF scan, the CUDA twin of cpu::scan_blocks: returns the first index v whose
// cumulative weight (index order, double accumulation) exceeds `target`, else the last index with
// a positive weight, else -1. `fill(v0, w)` writes the ITEMS weights of v0 .. v0+ITEMS-1 (0 past
// V). Each thread owns ITEMS consecutive indices of a tile of blockDim.x * ITEMS, so thread order
// is index order; the scan stops at the tile that holds the crossing. Every thread gets the result.
// `sm_d` holds kBlockReduceSlots doubles, `sm_i` kBlockReduceSlots int64s.
// ---------------------------------------------------------------------------------------------
template <int ITEMS, typename Fill>
__device__ int64_t block_inverse_cdf(int64_t V, double target, Fill&& fill, double* sm_d, int64_t* sm_i) {
  const int64_t tile = static_cast<int64_t>(blockDim.x) * ITEMS;
  double cum = 0.0;  // same value in every thread
  int64_t last_pos = -1;
  for (int64_t t0 = 0; t0 < V; t0 += tile) {
    const int64_t v0 = t0 + static_cast<int64_t>(threadIdx.x) * ITEMS;
    float w[ITEMS];
    fill(v0, w);
    double local = 0.0;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (w[i] > 0.0f) {
        local += w[i];
        last_pos = v0 + i;
      }
    }
    double tile_total;
    const double before = cum + block_exclusive_scan(local, sm_d, &tile_total);
    int64_t cand = INT64_MAX;
    if (before + local > target) {
      double c = before;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        if (cand == INT64_MAX && w[i] > 0.0f) {
          c += w[i];
          if (c > target) cand = v0 + i;
        }
      }
    }
    const int64_t found = block_reduce(cand, MinOp(), static_cast<int64_t>(INT64_MAX), sm_i);
    if (found != INT64_MAX) return found;
    cum += tile_total;
  }
  return block_reduce(last_pos, MaxOp(), static_cast<int64_t>(-1), sm_i);
}

// ---------------------------------------------------------------------------------------------
// Two-level inverse-CDF draw for rows of up to MAX_TILES * 32 * ITEMS entries (the fast path of
// one draw per CTA): pass 1 streams the row once with every warp of the block, each warp summing
// whole warp-tiles of 32 * ITEMS indices (no block barrier per tile, so loads stay in flight);
// then warp 0 finds the tile where the cumulative sum (tile sums in index order, double) crosses
// the target and scans only that tile (and the next ones if rounding pushes the crossing on).
// Same result rule as block_inverse_cdf. Lives in shared memory (about 12 KB for 1024 tiles).
// Usage, by every thread of the block: `if (d.tile_sums(V, fill)) idx = d.find(V, target, fill);`
// else fall back to block_inverse_cdf. `total()` is the row's weight sum after tile_sums().
// ---------------------------------------------------------------------------------------------
template <int ITEMS, int MAX_TILES>
struct TiledInverseCdf {
  static constexpr int64_t kTile = static_cast<int64_t>(kWarpSize) * ITEMS;
  double tile_sum[MAX_TILES];
  int32_t tile_last[MAX_TILES];  // last index with a positive weight in the tile, -1 if none
  double total_;
  int64_t result;
  int32_t ntiles;

  __device__ double total() const { return total_; }

  template <typename Fill>
  __device__ bool tile_sums(int64_t V, Fill& fill) {
    const int64_t nt = (V + kTile - 1) / kTile;
    if (nt > MAX_TILES || V >= (int64_t{1} << 31)) return false;  // uniform
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    const int nwarps = blockDim.x / kWarpSize;
    __syncthreads();  // earlier readers of this struct are done
#pragma unroll 2
    for (int64_t t = warp; t < nt; t += nwarps) {
      const int64_t v0 = t * kTile + static_cast<int64_t>(lane) * ITEMS;
      float w[ITEMS];
      fill(v0, w);
      double local = 0.0;
      int64_t last = -1;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        if (w[i] > 0.0f) {
          local += w[i];
          last = v0 + i;
        }
      }
      local = warp_reduce(local, SumOp());
      last = warp_reduce(last, MaxOp());
      if (lane == 0) {
        tile_sum[t] = local;
        tile_last[t] = static_cast<int32_t>(last);
      }
    }
    __syncthreads();
    if (warp == 0) {  // ordered total: lane-contiguous groups of tiles, then a fixed tree
      const int64_t per = (nt + kWarpSize - 1) / kWarpSize;
      const int64_t b = lane * per, e = b + per < nt ? b + per : nt;
      double g = 0.0;
      for (int64_t t = b; t < e; ++t) g += tile_sum[t];
      g = warp_reduce(g, SumOp());
      if (lane == 0) {
        total_ = g;
        ntiles = static_cast<int32_t>(nt);
      }
    }
    __syncthreads();
    return true;
  }

  // First index whose cumulative weight exceeds target (else the last positive, else -1); call
  // after tile_sums() returned true, with the same fill.
  template <typename Fill>
  __device__ int64_t find(int64_t V, double target, Fill& fill) {
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    if (warp == 0) {
      const int64_t nt = ntiles;
      // 1. the crossing tile: lane-contiguous groups, exclusive scan of group sums
      const int64_t per = (nt + kWarpSize - 1) / kWarpSize;
      const int64_t b = lane * per, e = b + per < nt ? b + per : nt;
      double g = 0.0;
      for (int64_t t = b; t < e; ++t) g += tile_sum[t];
      double incl = g;
#pragma unroll
      for (int d = 1; d < kWarpSize; d <<= 1) {
        const double y = __shfl_up_sync(0xffffffffu, incl, d);
        if (lane >= d) incl += y;
      }
      const double ex = __shfl_up_sync(0xffffffffu, incl, 1);
      double c = lane > 0 ? ex : 0.0;
      int64_t my_tile = -1;
      double my_cum = 0.0;
      if (c + g > target) {
        for (int64_t t = b; t < e; ++t) {
          if (c + tile_sum[t] > target) {
            my_tile = t;
            my_cum = c;
            break;
          }
          c += tile_sum[t];
        }
      }
      const unsigned hit = __ballot_sync(0xffffffffu, my_tile >= 0);
      int64_t t0 = -1;
      double cum = 0.0;
      if (hit != 0u) {
        const int src = __ffs(hit) - 1;
        t0 = __shfl_sync(0xffffffffu, my_tile, src);
        cum = __shfl_sync(0xffffffffu, my_cum, src);
      }
      // 2. scan from the crossing tile on (normally one tile)
      int64_t found = -1;
      for (int64_t t = t0; t >= 0 && t < nt; ++t) {
        const int64_t v0 = t * kTile + static_cast<int64_t>(lane) * ITEMS;
        float w[ITEMS];
        fill(v0, w);
        double local = 0.0;
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) local += w[i] > 0.0f ? static_cast<double>(w[i]) : 0.0;
        double li = local;
#pragma unroll
        for (int d = 1; d < kWarpSize; d <<= 1) {
          const double y = __shfl_up_sync(0xffffffffu, li, d);
          if (lane >= d) li += y;
        }
        const double lx = __shfl_up_sync(0xffffffffu, li, 1);
        double cc = cum + (lane > 0 ? lx : 0.0);
        int64_t cand = -1;
        if (cc + local > target) {
#pragma unroll
          for (int i = 0; i < ITEMS; ++i) {
            if (cand < 0 && w[i] > 0.0f) {
              cc += w[i];
              if (cc > target) cand = v0 + i;
            }
          }
        }
        const unsigned h = __ballot_sync(0xffffffffu, cand >= 0);
        if (h != 0u) {
          found = __shfl_sync(0xffffffffu, cand, __ffs(h) - 1);
          break;
        }
        cum += tile_sum[t];
      }
      // 3. rounding left the target unreached: the last positive entry
      if (found < 0) {
        int64_t last = -1;
        for (int64_t t = lane; t < nt; t += kWarpSize) last = tile_last[t] > last ? tile_last[t] : last;
        found = warp_reduce(last, MaxOp());
      }
      if (lane == 0) result = found;
    }
    __syncthreads();
    const int64_t r = result;
    __syncthreads();  // everyone has read result before the struct is reused
    return r;
  }
};

}  // namespace cuda
}  // namespace dspark

#endif  // DSPARK_CORE_CUDA_ROW_REDUCE_CUH_
