// CUDA kernels of dspark_dspark_draft. Per position k, three launches on the caller's stream:
//   head_kernel   one CTA per request: prev token (anchor or d_{k-1}), e = W1[prev], the gated/rnn
//                 transform -> v (workspace), the confidence c_k
//   bias_kernel   tiled GEMM z = U_k + v W2^T over (vocabulary tile, request tile), written to
//                 out_logits (the q rows)
//   sample_kernel one CTA per request: argmax or the inverse-CDF draw over its z row
// No host synchronisation, no allocation (workspace from the caller): capturable in a CUDA graph.
#include <cuda_runtime.h>

#include <string>

#include "../common/dspark_draft_check.h"
#include "../common/status.h"
#include "dspark/detail/dspark_heads.h"
#include "dspark/detail/philox.h"
#include "dspark/detail/sampling.h"
#include "dspark/dspark_draft.h"

namespace dspark {
namespace cuda {
namespace {

using detail::kNegInf;

constexpr int kHeadThreads = 256;
constexpr int kSampleThreads = 1024;
constexpr int kTileV = 64, kTileR = 16, kTileK = 32;

struct Workspace {
  float* v;        // [R, r] vector multiplied by W2
  float* state;    // [R, r] rnn state
  float* pre;      // [R, 3r] gated / rnn pre-activations
  int32_t* valid;  // [R] 1 while the request has a valid prev token
};

size_t align256(size_t x) { return (x + 255) & ~size_t{255}; }

Workspace carve(void* base, int32_t R, int32_t rank) {
  char* p = static_cast<char*>(base);
  Workspace w;
  const size_t vr = align256(sizeof(float) * static_cast<size_t>(R) * rank);
  w.v = reinterpret_cast<float*>(p);
  w.state = reinterpret_cast<float*>(p + vr);
  w.pre = reinterpret_cast<float*>(p + 2 * vr);
  w.valid = reinterpret_cast<int32_t*>(p + 2 * vr + align256(sizeof(float) * static_cast<size_t>(R) * 3 * rank));
  return w;
}

template <typename T>
__device__ __forceinline__ float ld(const void* p, int64_t i) {
  return detail::load_as_float(static_cast<const T*>(p), i);
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Block-wide sum (blockDim multiple of 32, <= 1024); every thread gets the result.
template <typename T>
__device__ T block_sum(T x, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  T t = 0;
  for (int i = 0; i < nw; ++i) t += scratch[i];
  return t;
}

// ---------------------------------------------------------------------------------------------
// head_kernel<W, H>: grid R, block kHeadThreads, dynamic shared 2 * rank floats (e, s)
// ---------------------------------------------------------------------------------------------
// Column j of z as a target token: draft_to_target[j] with a draft vocabulary (an entry outside
// [0, V_t) becomes -1: no draft, see the header), j itself without.
__device__ __forceinline__ int64_t draft_token(const dspark_dspark_draft_params& p, int64_t j) {
  if (j < 0 || !p.draft_to_target) return j;
  const int64_t t = p.draft_to_target[j];
  return t >= 0 && t < p.target_vocab_size ? t : -1;
}

template <typename W, typename H>
__global__ void head_kernel(dspark_dspark_draft_params p, Workspace ws, int32_t k) {
  extern __shared__ float sh[];
  __shared__ float red[32];
  const int32_t r = blockIdx.x;
  const int32_t Rk = p.rank, D = p.hidden_size, G = p.num_positions;
  const int tid = threadIdx.x;
  float* e = sh;
  float* s = sh + Rk;
  int64_t prev = k == 0 ? p.anchor_tokens[r] : p.out_tokens[static_cast<int64_t>(r) * G + k - 1];
  const int64_t w1_rows = p.draft_to_target ? p.target_vocab_size : p.vocab_size;
  const bool valid = (k == 0 || ws.valid[r]) && prev >= 0 && prev < w1_rows;
  __syncthreads();
  if (tid == 0) ws.valid[r] = valid ? 1 : 0;
  if (!valid) {
    if (tid == 0 && p.out_confidence) p.out_confidence[static_cast<int64_t>(r) * G + k] = 0.0f;
    return;
  }
  const int64_t hoff = (static_cast<int64_t>(r) * G + k) * D;
  for (int i = tid; i < Rk; i += blockDim.x) {
    e[i] = ld<W>(p.markov_w1, prev * Rk + i);
    s[i] = k == 0 ? 0.0f : ws.state[static_cast<int64_t>(r) * Rk + i];
  }
  __syncthreads();
  if (p.conf_weight) {
    float acc = 0.0f;
    for (int i = tid; i < D; i += blockDim.x) acc += ld<W>(p.conf_weight, i) * ld<H>(p.hidden, hoff + i);
    if (p.conf_with_markov)
      for (int i = tid; i < Rk; i += blockDim.x) acc += ld<W>(p.conf_weight, D + i) * e[i];
    const float logit = block_sum(acc, red) + ld<W>(p.conf_bias, 0);
    const float t = p.sts_temperature ? p.sts_temperature[k] : 1.0f;
    if (tid == 0 && p.out_confidence) p.out_confidence[static_cast<int64_t>(r) * G + k] = detail::sts_confidence(logit, t);
  }
  float* v = ws.v + static_cast<int64_t>(r) * Rk;
  const int lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  if (p.head_type == DSPARK_MARKOV_VANILLA) {
    for (int i = tid; i < Rk; i += blockDim.x) v[i] = e[i];
  } else if (p.head_type == DSPARK_MARKOV_GATED) {
    const int64_t K = static_cast<int64_t>(D) + Rk;  // input [h ; e]
    for (int row = warp; row < Rk; row += nwarps) {
      const int64_t wo = row * K;
      float acc = 0.0f;
      for (int i = lane; i < D; i += 32) acc += ld<W>(p.gate_weight, wo + i) * ld<H>(p.hidden, hoff + i);
      for (int i = lane; i < Rk; i += 32) acc += ld<W>(p.gate_weight, wo + D + i) * e[i];
      acc = warp_sum(acc);
      if (lane == 0) v[row] = detail::sigmoidf_(acc + ld<W>(p.gate_bias, row)) * e[row];
    }
  } else {  // RNN: [g|c|o] = J [s ; e ; h] + b
    const int64_t K = 2 * static_cast<int64_t>(Rk) + D;
    float* pre = ws.pre + static_cast<int64_t>(r) * 3 * Rk;
    for (int row = warp; row < 3 * Rk; row += nwarps) {
      const int64_t wo = row * K;
      float acc = 0.0f;
      for (int i = lane; i < Rk; i += 32) acc += ld<W>(p.joint_weight, wo + i) * s[i];
      for (int i = lane; i < Rk; i += 32) acc += ld<W>(p.joint_weight, wo + Rk + i) * e[i];
      for (int i = lane; i < D; i += 32) acc += ld<W>(p.joint_weight, wo + 2 * Rk + i) * ld<H>(p.hidden, hoff + i);
      acc = warp_sum(acc);
      if (lane == 0) pre[row] = acc + ld<W>(p.joint_bias, row);
    }
    __syncthreads();
    for (int i = tid; i < Rk; i += blockDim.x) {
      const float gt = detail::sigmoidf_(pre[i]);
      ws.state[static_cast<int64_t>(r) * Rk + i] = gt * s[i] + (1.0f - gt) * detail::tanhf_(pre[Rk + i]);
      v[i] = detail::tanhf_(pre[2 * Rk + i]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// bias_kernel<W, U>: grid (ceil(V / 64), ceil(R / 16)), block 256; each thread 4 outputs.
// ---------------------------------------------------------------------------------------------
template <typename W, typename U>
__global__ void __launch_bounds__(256) bias_kernel(dspark_dspark_draft_params p, Workspace ws, int32_t k) {
  __shared__ float wt[kTileV][kTileK + 1];
  __shared__ float vt[kTileR][kTileK + 1];
  const int32_t V = p.vocab_size, R = p.num_requests, Rk = p.rank, G = p.num_positions;
  const int64_t v0 = static_cast<int64_t>(blockIdx.x) * kTileV;
  const int32_t r0 = blockIdx.y * kTileR;
  const int tid = threadIdx.x;
  const int tv = tid & 63;         // vocabulary row within the tile
  const int tr = (tid >> 6) * 4;   // 4 requests per thread: tr .. tr+3
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int32_t c0 = 0; c0 < Rk; c0 += kTileK) {
    for (int i = tid; i < kTileV * kTileK; i += 256) {
      const int row = i / kTileK, col = i % kTileK;
      const int64_t vv = v0 + row;
      wt[row][col] = (vv < V && c0 + col < Rk) ? ld<W>(p.markov_w2, vv * Rk + c0 + col) : 0.0f;
    }
    for (int i = tid; i < kTileR * kTileK; i += 256) {
      const int row = i / kTileK, col = i % kTileK;
      const int32_t rr = r0 + row;
      vt[row][col] = (rr < R && c0 + col < Rk) ? ws.v[static_cast<int64_t>(rr) * Rk + c0 + col] : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kTileK; ++c) {
      const float w = wt[tv][c];
      for (int j = 0; j < 4; ++j) acc[j] += w * vt[tr + j][c];
    }
    __syncthreads();
  }
  const int64_t vv = v0 + tv;
  if (vv >= V) return;
  for (int j = 0; j < 4; ++j) {
    const int32_t rr = r0 + tr + j;
    if (rr >= R) continue;
    const int64_t row = static_cast<int64_t>(rr) * G + k;
    float z = kNegInf;
    if (ws.valid[rr]) z = ld<U>(p.base_logits, row * V + vv) + acc[j];
    p.out_logits[row * V + vv] = z;
  }
}

// ---------------------------------------------------------------------------------------------
// sample_kernel: grid R, block kSampleThreads.
// ---------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kSampleThreads) sample_kernel(dspark_dspark_draft_params p, Workspace ws, int32_t k) {
  __shared__ float redf[32];
  __shared__ double s_prefix[kSampleThreads];
  __shared__ long long s_arg;
  __shared__ int s_found;
  const int32_t r = blockIdx.x, V = p.vocab_size, G = p.num_positions;
  const int tid = threadIdx.x, nt = blockDim.x;
  int64_t* tok = p.out_tokens + static_cast<int64_t>(r) * G + k;
  if (!ws.valid[r]) {
    if (tid == 0) *tok = -1;
    return;
  }
  const float* z = p.out_logits + (static_cast<int64_t>(r) * G + k) * V;
  const float t = p.temperature[r];
  if (detail::is_greedy_temperature(t)) {
    // first index of the maximum; NaN never wins; -1 if nothing exceeds -inf
    float best = kNegInf;
    int64_t arg = -1;
    for (int64_t v = tid; v < V; v += nt) {
      const float x = z[v];
      if (x > best) {
        best = x;
        arg = v;
      }
    }
    // max value, then smallest index holding it
    float m = best;
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    __syncthreads();
    if ((tid & 31) == 0) redf[tid >> 5] = m;
    __syncthreads();
    float gm = kNegInf;
    for (int i = 0; i < (nt >> 5); ++i) gm = fmaxf(gm, redf[i]);
    __syncthreads();
    if (tid == 0) s_arg = V;
    __syncthreads();
    if (arg >= 0 && best == gm && gm > kNegInf) atomicMin(&s_arg, static_cast<long long>(arg));
    __syncthreads();
    if (tid == 0) *tok = (gm > kNegInf) ? draft_token(p, static_cast<int64_t>(s_arg)) : -1;
    return;
  }
  const float inv_t = detail::inverse_temperature(t);
  float m = kNegInf;
  for (int64_t v = tid; v < V; v += nt) {
    const float s = detail::scaled_logit(z[v], inv_t);
    m = s > m ? s : m;
  }
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if ((tid & 31) == 0) redf[tid >> 5] = m;
  __syncthreads();
  float gm = kNegInf;
  for (int i = 0; i < (nt >> 5); ++i) gm = fmaxf(gm, redf[i]);
  if (!(gm > kNegInf)) {
    if (tid == 0) *tok = -1;
    return;
  }
  // contiguous chunk per thread, so the cumulative sum runs in index order
  const int64_t chunk = (V + nt - 1) / nt;
  const int64_t c0 = tid * chunk < V ? tid * chunk : V;
  const int64_t c1 = c0 + chunk < V ? c0 + chunk : V;
  double local = 0.0;
  int64_t last_pos = -1;
  for (int64_t v = c0; v < c1; ++v) {
    const float w = detail::row_weight(detail::scaled_logit(z[v], inv_t), gm, kNegInf);
    local += w;
    if (w > 0.0f) last_pos = v;
  }
  s_prefix[tid] = local;
  __syncthreads();
  for (int off = 1; off < nt; off <<= 1) {
    const double add = tid >= off ? s_prefix[tid - off] : 0.0;
    __syncthreads();
    s_prefix[tid] += add;
    __syncthreads();
  }
  const double total = s_prefix[nt - 1];
  const double excl = tid > 0 ? s_prefix[tid - 1] : 0.0, incl = s_prefix[tid];
  const int64_t seed = p.seed ? p.seed[r] : 0, off = p.offset ? p.offset[r] : 0;
  const double u = detail::philox_uniform(seed, off, static_cast<uint32_t>(k), detail::kRngDraftSample);
  const double target = u * total;
  if (tid == 0) {
    s_found = 0;
    s_arg = -1;
  }
  __syncthreads();
  if (local > 0.0 && excl <= target && target < incl) {
    double cum = excl;
    int64_t found = last_pos;
    for (int64_t v = c0; v < c1; ++v) {
      const float w = detail::row_weight(detail::scaled_logit(z[v], inv_t), gm, kNegInf);
      if (w > 0.0f) {
        cum += w;
        if (cum > target) {
          found = v;
          break;
        }
      }
    }
    atomicMin(reinterpret_cast<unsigned long long*>(&s_arg), static_cast<unsigned long long>(found));
    s_found = 1;
  }
  // rounding fallback: the last positive entry of the row
  long long lp = last_pos;
  for (int o = 16; o > 0; o >>= 1) lp = max(lp, __shfl_xor_sync(0xffffffffu, lp, o));
  __shared__ long long s_last[32];
  if ((tid & 31) == 0) s_last[tid >> 5] = lp;
  __syncthreads();
  if (tid == 0) {
    long long last = -1;
    for (int i = 0; i < (nt >> 5); ++i) last = max(last, s_last[i]);
    *tok = draft_token(p, s_found ? static_cast<int64_t>(s_arg) : static_cast<int64_t>(last));
  }
}

template <typename W, typename H>
void launch_head(const dspark_dspark_draft_params& p, const Workspace& ws, int32_t k, cudaStream_t st) {
  head_kernel<W, H><<<p.num_requests, kHeadThreads, 2 * sizeof(float) * p.rank, st>>>(p, ws, k);
}

template <typename W>
void launch_head_h(const dspark_dspark_draft_params& p, const Workspace& ws, int32_t k, cudaStream_t st) {
  switch (p.hidden ? p.hidden_dtype : DSPARK_FLOAT32) {
    case DSPARK_BFLOAT16: return launch_head<W, detail::bf16_t>(p, ws, k, st);
    case DSPARK_FLOAT16: return launch_head<W, detail::fp16_t>(p, ws, k, st);
    default: return launch_head<W, float>(p, ws, k, st);
  }
}

template <typename W>
void launch_bias_u(const dspark_dspark_draft_params& p, const Workspace& ws, int32_t k, cudaStream_t st) {
  const dim3 grid((p.vocab_size + kTileV - 1) / kTileV, (p.num_requests + kTileR - 1) / kTileR);
  switch (p.logits_dtype) {
    case DSPARK_BFLOAT16: bias_kernel<W, detail::bf16_t><<<grid, 256, 0, st>>>(p, ws, k); break;
    case DSPARK_FLOAT16: bias_kernel<W, detail::fp16_t><<<grid, 256, 0, st>>>(p, ws, k); break;
    default: bias_kernel<W, float><<<grid, 256, 0, st>>>(p, ws, k); break;
  }
}

template <typename W>
void run_steps(const dspark_dspark_draft_params& p, const Workspace& ws, cudaStream_t st) {
  for (int32_t k = 0; k < p.num_positions; ++k) {
    launch_head_h<W>(p, ws, k, st);
    launch_bias_u<W>(p, ws, k, st);
    sample_kernel<<<p.num_requests, kSampleThreads, 0, st>>>(p, ws, k);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace dspark

extern "C" size_t dspark_dspark_draft_workspace_size(int32_t num_requests, int32_t rank) {
  using dspark::cuda::align256;
  const size_t R = num_requests > 0 ? num_requests : 0, r = rank > 0 ? rank : 0;
  return 2 * align256(sizeof(float) * R * r) + align256(sizeof(float) * R * 3 * r) + align256(sizeof(int32_t) * R);
}

extern "C" dspark_status dspark_dspark_draft_cuda(const dspark_dspark_draft_params* params, void* stream) {
  using namespace dspark;
  clear_error();
  const dspark_status st = check_dspark_draft_params(params, true);
  if (st != DSPARK_OK || params->num_requests == 0) return st;
  const dspark_dspark_draft_params& p = *params;
  const size_t need = dspark_dspark_draft_workspace_size(p.num_requests, p.rank);
  DSPARK_CHECK_ARG(p.workspace != nullptr && p.workspace_bytes >= need,
                   "dspark_draft: workspace must hold dspark_dspark_draft_workspace_size() = " + std::to_string(need) +
                       " bytes");
  DSPARK_CHECK_ARG(p.num_requests <= 65535 * cuda::kTileR, "dspark_draft: num_requests too large for the CUDA grid");
  const cuda::Workspace ws = cuda::carve(p.workspace, p.num_requests, p.rank);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.weight_dtype) {
    case DSPARK_BFLOAT16: cuda::run_steps<detail::bf16_t>(p, ws, s); break;
    case DSPARK_FLOAT16: cuda::run_steps<detail::fp16_t>(p, ws, s); break;
    default: cuda::run_steps<float>(p, ws, s); break;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return fail(DSPARK_ERR_CUDA, std::string("dspark_draft: kernel launch failed: ") + cudaGetErrorString(err));
  return DSPARK_OK;
}
