// CUDA kernel of dspark_verify_tree: one block per request walks its tree. Row passes (argmax, max,
// sum, top-k radix select, top-p threshold search, the masked inverse-CDF draw) are block-wide;
// the per-child accept decisions are made by thread 0 with the same DSPARK_HD helpers as the CPU
// (detail/sampling.h, detail/philox.h, detail/tree_kv.h). No workspace, no host synchronisation.
#include <cuda_runtime.h>

#include <string>

#include "../common/status.h"
#include "../common/verify_tree_check.h"
#include "dspark/detail/philox.h"
#include "dspark/detail/sampling.h"
#include "dspark/detail/tree_kv.h"
#include "dspark/verify_tree.h"

namespace dspark {
namespace cuda {
namespace {

using detail::kNegInf;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();  // red may still be read by a previous reduction
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  T out = red[0];
#pragma unroll
  for (int i = 1; i < kWarps; ++i) out = op(out, red[i]);
  return out;
}

struct MaxF {
  __device__ float operator()(float a, float b) const { return a > b ? a : b; }
};
struct MaxU64 {
  __device__ unsigned long long operator()(unsigned long long a, unsigned long long b) const { return a > b ? a : b; }
};
struct SumD {
  __device__ double operator()(double a, double b) const { return a + b; }
};

struct Smem {
  float redf[kWarps];
  double redd[kWarps];
  unsigned long long redu[kWarps];
  int hist[256];
  double chunk[kThreads];
  uint32_t prefix;
  int remaining;
  int64_t next;       // accepted child or -1
  int num_removed;
  double w_rem;
  int stop;           // walk finished
  int valid;          // tree valid
};

template <typename T>
struct Row {
  const T* p;
  int64_t V;
  float inv_t;
  __device__ float scaled(int64_t v) const { return detail::scaled_logit(detail::load_as_float(p, v), inv_t); }
};

// First index of the maximum raw logit (NaN never wins), -1 if none exceeds -inf.
template <typename T>
__device__ int64_t block_argmax(const Row<T>& row, Smem& sm) {
  unsigned long long best = 0;
  for (int64_t v = threadIdx.x; v < row.V; v += blockDim.x) {
    const float x = detail::load_as_float(row.p, v);
    if (!(x > kNegInf)) continue;  // -inf and NaN
    const unsigned long long key = (static_cast<unsigned long long>(detail::float_order_key(x)) << 32) |
                                   static_cast<unsigned long long>(0xffffffffu - static_cast<uint32_t>(v));
    best = key > best ? key : best;
  }
  best = block_reduce(best, MaxU64(), sm.redu);
  if (best == 0) return -1;
  return static_cast<int64_t>(0xffffffffu - static_cast<uint32_t>(best & 0xffffffffu));
}

template <typename T>
__device__ float block_max_kept(const Row<T>& row, float thr, Smem& sm) {
  float m = kNegInf;
  for (int64_t v = threadIdx.x; v < row.V; v += blockDim.x) {
    const float s = row.scaled(v);
    if (s >= thr && s > m) m = s;
  }
  return block_reduce(m, MaxF(), sm.redf);
}

// sum of row_weight over kept entries whose order key is >= key_min
template <typename T>
__device__ double block_sum_weights(const Row<T>& row, float m, float thr, uint32_t key_min, Smem& sm) {
  double acc = 0.0;
  for (int64_t v = threadIdx.x; v < row.V; v += blockDim.x) {
    const float s = row.scaled(v);
    if (detail::float_order_key(s) >= key_min) acc += detail::row_weight(s, m, thr);
  }
  return block_reduce(acc, SumD(), sm.redd);
}

// k-th largest scaled logit (exact), by a 4 x 8-bit radix select on order keys.
template <typename T>
__device__ float block_kth_largest(const Row<T>& row, int32_t k, Smem& sm) {
  if (threadIdx.x == 0) {
    sm.prefix = 0;
    sm.remaining = k;
  }
  uint32_t mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) sm.hist[b] = 0;
    __syncthreads();
    const uint32_t prefix = sm.prefix;
    for (int64_t v = threadIdx.x; v < row.V; v += blockDim.x) {
      const uint32_t key = detail::float_order_key(row.scaled(v));
      if ((key & mask) == prefix) atomicAdd(&sm.hist[(key >> shift) & 255u], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int rem = sm.remaining;
      for (int b = 255; b >= 0; --b) {
        if (rem <= sm.hist[b]) {
          sm.prefix = prefix | (static_cast<uint32_t>(b) << shift);
          break;
        }
        rem -= sm.hist[b];
      }
      sm.remaining = rem;
    }
    __syncthreads();
    mask |= 255u << shift;
  }
  return detail::float_from_order_key(sm.prefix);
}

// Threshold of top-k then top-p (see row_ops.h truncation_threshold; ties at the boundary kept).
template <typename T>
__device__ float block_threshold(const Row<T>& row, int32_t top_k, float top_p, Smem& sm) {
  float thr = kNegInf;
  if (top_k > 0) thr = block_kth_largest(row, top_k, sm);
  if (top_p >= 1.0f) return thr;
  const float m = block_max_kept(row, thr, sm);
  if (!(m > kNegInf)) return thr;
  const double total = block_sum_weights(row, m, thr, 0u, sm);
  const double need = static_cast<double>(top_p) * total;
  // largest key K with mass(kept, key >= K) >= need (and > 0): bit by bit from the top
  uint32_t K = 0;
  for (int b = 31; b >= 0; --b) {
    const uint32_t cand = K | (1u << b);
    const double mass = block_sum_weights(row, m, thr, cand, sm);
    if (mass >= need && mass > 0.0) K = cand;
  }
  const float tp = detail::float_from_order_key(K);
  return tp > thr ? tp : thr;
}

__device__ bool is_removed(const int* removed, int n, int64_t v) {
  for (int i = 0; i < n; ++i)
    if (removed[i] == v) return true;
  return false;
}

// Inverse-CDF draw in index order over the kept weights, the `removed` tokens masked out when
// `mask` (target u * total); each thread owns a contiguous chunk, thread 0 finishes the scan.
template <typename T>
__device__ int64_t block_sample(const Row<T>& row, float m, float thr, const int* removed, int nr, bool mask,
                                double total, double u, Smem& sm) {
  const int64_t C = (row.V + blockDim.x - 1) / blockDim.x;
  const int64_t c0 = threadIdx.x * C, c1 = c0 + C < row.V ? c0 + C : row.V;
  double acc = 0.0;
  for (int64_t v = c0; v < c1; ++v) {
    if (mask && is_removed(removed, nr, v)) continue;
    acc += detail::row_weight(row.scaled(v), m, thr);
  }
  sm.chunk[threadIdx.x] = acc;
  __syncthreads();
  int64_t result = -1;
  if (threadIdx.x == 0) {
    const double target = u * total;
    double cum = 0.0;
    int last_chunk = -1;
    for (int i = 0; i < static_cast<int>(blockDim.x) && result < 0; ++i) {
      if (sm.chunk[i] > 0.0) last_chunk = i;
      if (cum + sm.chunk[i] > target) {
        const int64_t b0 = i * C, b1 = b0 + C < row.V ? b0 + C : row.V;
        for (int64_t v = b0; v < b1; ++v) {
          if (mask && is_removed(removed, nr, v)) continue;
          const float w = detail::row_weight(row.scaled(v), m, thr);
          if (w > 0.0f) {
            cum += w;
            if (cum > target) {
              result = v;
              break;
            }
          }
        }
        if (result < 0) last_chunk = i;  // rounding: fall through to the last positive entry
        break;
      }
      cum += sm.chunk[i];
    }
    if (result < 0 && last_chunk >= 0) {
      const int64_t b0 = last_chunk * C, b1 = b0 + C < row.V ? b0 + C : row.V;
      for (int64_t v = b0; v < b1; ++v) {
        if (mask && is_removed(removed, nr, v)) continue;
        if (detail::row_weight(row.scaled(v), m, thr) > 0.0f) result = v;
      }
    }
    sm.next = result;
  }
  __syncthreads();
  result = sm.next;
  __syncthreads();
  return result;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) verify_tree_kernel(dspark_verify_tree_params p) {
  extern __shared__ int dyn[];
  __shared__ Smem sm;
  const int M = p.max_nodes;
  int* first_child = dyn;
  int* next_sibling = dyn + M;
  int* depth = dyn + 2 * M;
  int* removed = dyn + 3 * M;
  const int r = blockIdx.x;
  const int64_t W = static_cast<int64_t>(p.max_depth) + 1;
  int64_t* out_path = p.out_path + r * W;
  int64_t* out_tok = p.out_tokens + r * W;
  for (int64_t i = threadIdx.x; i < W; i += blockDim.x) {
    out_path[i] = -1;
    out_tok[i] = -1;
  }
  const int64_t base = p.cu_nodes[r];
  const int64_t n = p.cu_nodes[r + 1] - base;
  if (threadIdx.x == 0) {
    bool ok = base >= 0 && n >= 1 && n <= M && p.cu_nodes[r + 1] <= p.num_nodes;
    for (int64_t i = 0; ok && i < n; ++i) {
      const int64_t par = p.parents[base + i];
      ok = detail::tree_parent_ok(i, par);
      first_child[i] = -1;
      next_sibling[i] = -1;
      if (ok && i > 0) {
        depth[i] = depth[par] + 1;
        ok = depth[i] <= p.max_depth;
      } else {
        depth[i] = 0;
      }
    }
    for (int64_t i = ok ? n - 1 : 0; i >= 1; --i) {
      const int64_t par = p.parents[base + i];
      next_sibling[i] = first_child[par];
      first_child[par] = static_cast<int>(i);
    }
    sm.valid = ok;
  }
  __syncthreads();
  if (!sm.valid) {
    if (threadIdx.x == 0) p.out_num_accepted[r] = 0;
    return;
  }
  const float t = p.temperature[r];
  const bool greedy = detail::is_greedy_temperature(t);
  const float inv_t = detail::inverse_temperature(t);
  const int32_t top_k = detail::effective_top_k(p.top_k, r, p.vocab_size);
  const float top_p = detail::effective_top_p(p.top_p, r);
  const int64_t seed = p.seed ? p.seed[r] : 0;
  const int64_t offset = p.offset ? p.offset[r] : 0;
  const int64_t* tokens = p.tokens + base;
  const int64_t V = p.vocab_size;

  int64_t x = 0, k = 0;
  if (threadIdx.x == 0) out_path[0] = 0;
  for (;;) {
    Row<T> row{static_cast<const T*>(p.target_logits) + (base + x) * p.target_row_stride, V, inv_t};
    if (greedy) {
      const int64_t am = block_argmax(row, sm);
      if (am < 0) break;
      int64_t next = -1;
      for (int c = first_child[x]; c >= 0; c = next_sibling[c])
        if (tokens[c] == am) {
          next = c;
          break;
        }
      if (threadIdx.x == 0) out_tok[k] = am;
      if (next < 0) break;
      x = next;
      ++k;
      if (threadIdx.x == 0) out_path[k] = x;
      continue;
    }
    const float thr = (top_k > 0 || top_p < 1.0f) ? block_threshold(row, top_k, top_p, sm) : kNegInf;
    const float m = block_max_kept(row, thr, sm);
    if (!(m > kNegInf)) break;
    const double sum = block_sum_weights(row, m, thr, 0u, sm);
    if (!(sum > 0.0)) break;
    if (threadIdx.x == 0) {
      int nr = 0;
      double w_rem = sum;
      int64_t next = -1;
      for (int c = first_child[x]; c >= 0; c = next_sibling[c]) {
        const int64_t tok = tokens[c];
        if (tok < 0 || tok >= V || is_removed(removed, nr, tok)) continue;
        const double w = detail::row_weight(row.scaled(tok), m, thr);
        const double coin = detail::philox_uniform(seed, offset, static_cast<uint32_t>(c), detail::kRngTreeCoin);
        if (detail::tree_accept(coin, w, w_rem)) {
          next = c;
          break;
        }
        removed[nr++] = static_cast<int>(tok);
        w_rem -= w;
      }
      sm.next = next;
      sm.num_removed = nr;
      sm.w_rem = w_rem;
    }
    __syncthreads();
    const int64_t next = sm.next;
    const int nr = sm.num_removed;
    const double w_rem = sm.w_rem;
    __syncthreads();
    if (next >= 0) {
      if (threadIdx.x == 0) out_tok[k] = tokens[next];
      x = next;
      ++k;
      if (threadIdx.x == 0) out_path[k] = x;
      continue;
    }
    const double u = detail::philox_uniform(seed, offset, static_cast<uint32_t>(x), detail::kRngTreeSample);
    const bool mask = nr > 0 && w_rem > 0.0;
    int64_t tok = block_sample(row, m, thr, removed, nr, mask, mask ? w_rem : sum, u, sm);
    if (tok < 0 && mask) tok = block_sample(row, m, thr, removed, nr, false, sum, u, sm);
    if (threadIdx.x == 0) out_tok[k] = tok;
    break;
  }
  if (threadIdx.x == 0) p.out_num_accepted[r] = k;
}

}  // namespace
}  // namespace cuda
}  // namespace dspark

extern "C" dspark_status dspark_verify_tree_cuda(const dspark_verify_tree_params* params, void* stream) {
  using namespace dspark;
  clear_error();
  const dspark_status st = check_verify_tree_params(params);
  if (st != DSPARK_OK || params->num_requests == 0) return st;
  const dspark_verify_tree_params& p = *params;
  DSPARK_CHECK_ARG(p.max_nodes <= DSPARK_VERIFY_TREE_CUDA_MAX_NODES,
                   "verify_tree: max_nodes must be <= " + std::to_string(DSPARK_VERIFY_TREE_CUDA_MAX_NODES) + " on CUDA");
  const size_t smem = sizeof(int) * 4 * static_cast<size_t>(p.max_nodes);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(p.num_requests));
  switch (p.target_dtype) {
    case DSPARK_FLOAT32: cuda::verify_tree_kernel<float><<<grid, cuda::kThreads, smem, s>>>(p); break;
    case DSPARK_BFLOAT16: cuda::verify_tree_kernel<detail::bf16_t><<<grid, cuda::kThreads, smem, s>>>(p); break;
    case DSPARK_FLOAT16: cuda::verify_tree_kernel<detail::fp16_t><<<grid, cuda::kThreads, smem, s>>>(p); break;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return fail(DSPARK_ERR_CUDA, std::string("verify_tree: kernel launch failed: ") + cudaGetErrorString(err));
  return DSPARK_OK;
}
