// CUDA kernel of dspark_schedule_prefix: one CTA, one launch, no host synchronisation.
// Keys (a desc, r asc, j asc) are bitonic-sorted in shared memory (global workspace when R * g >
// 4096), then the admission scan runs as a block-wide prefix sum of the fixed-point survival
// probabilities: with the running sums every candidate's theta is known, the causal stop is the
// first i with theta_i <= theta_{i-1} and the global search is the first argmax.
#include <cuda_runtime.h>

#include <string>

#include "../common/schedule_prefix_check.h"
#include "../common/status.h"
#include "dspark/detail/dspark_heads.h"
#include "dspark/detail/sampling.h"
#include "dspark/schedule_prefix.h"

namespace dspark {
namespace cuda {
namespace {

constexpr int kThreads = 512;  // shared: 32 KiB keys + 10 KiB scan/argmax scratch
constexpr int kSharedKeys = 4096;

__device__ __forceinline__ float sps_at(const float* sps, int64_t len, int64_t B) {
  if (B < 1 || B > len) return 0.0f;
  const float s = sps[B - 1];
  return (s > 0.0f && s < detail::kPosInf) ? s : 0.0f;  // NaN, <= 0 and inf: no throughput
}

__device__ __forceinline__ void bounds(const dspark_schedule_prefix_params& p, int32_t r, int32_t* lo, int32_t* hi) {
  const int32_t g = p.num_positions;
  int32_t h = p.max_len ? p.max_len[r] : g;
  h = h < 0 ? 0 : (h > g ? g : h);
  int32_t l = p.min_len ? p.min_len[r] : 0;
  l = l < 0 ? 0 : (l > h ? h : l);
  *lo = l;
  *hi = h;
}

__global__ void __launch_bounds__(kThreads) schedule_kernel(dspark_schedule_prefix_params p, int npad,
                                                           uint64_t* global_keys) {
  extern __shared__ uint64_t smem_keys[];
  uint64_t* keys = global_keys ? global_keys : smem_keys;
  __shared__ unsigned long long s_tau0, s_B0;
  __shared__ int s_count, s_first;
  __shared__ long long s_scan[kThreads];
  __shared__ double s_best[kThreads];
  __shared__ int s_best_i[kThreads];
  const int tid = threadIdx.x;
  const int32_t R = p.num_requests, g = p.num_positions;
  if (tid == 0) {
    s_tau0 = static_cast<unsigned long long>(R) << 40;
    s_B0 = static_cast<unsigned long long>(R);
    s_count = npad;
    s_first = INT_MAX;
  }
  for (int i = tid; i < npad; i += kThreads) keys[i] = ~0ull;
  __syncthreads();
  // 1. survival probabilities, forced minimums, candidate keys
  for (int32_t r = tid; r < R; r += kThreads) {
    int32_t lo, hi;
    bounds(p, r, &lo, &hi);
    float a = 1.0f;
    unsigned long long tau = 0;
    for (int32_t j = 0; j < g; ++j) {
      a = a * detail::sched_clamp_conf(p.confidences[static_cast<int64_t>(r) * g + j]);
      const uint32_t item = static_cast<uint32_t>(r) * g + j;
      if (j < lo) {
        tau += static_cast<unsigned long long>(detail::sched_fixed(a));
      } else if (j < hi && a > 0.0f) {
        keys[item] = detail::sched_key(a, item);
      }
    }
    if (lo > 0) {
      atomicAdd(&s_tau0, tau);
      atomicAdd(&s_B0, static_cast<unsigned long long>(lo));
    }
  }
  __syncthreads();
  // 2. bitonic sort, ascending
  for (int size = 2; size <= npad; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = tid; i < npad / 2; i += kThreads) {
        const int lo_i = 2 * i - (i & (stride - 1));
        const int hi_i = lo_i + stride;
        const bool up = (lo_i & size) == 0;
        const uint64_t x = keys[lo_i], y = keys[hi_i];
        if ((x > y) == up) {
          keys[lo_i] = y;
          keys[hi_i] = x;
        }
      }
      __syncthreads();
    }
  }
  // 3. candidates = keys before the first ~0
  for (int i = tid; i < npad; i += kThreads)
    if (keys[i] == ~0ull && (i == 0 || keys[i - 1] != ~0ull)) s_count = i;
  __syncthreads();
  const int64_t B0 = static_cast<int64_t>(s_B0);
  const int64_t tau0 = static_cast<int64_t>(s_tau0);
  int64_t L = s_count;
  if (p.token_budget > 0) {
    const int64_t cap = p.token_budget > B0 ? p.token_budget : B0;
    if (L > cap - B0) L = cap - B0;
  }
  const double base = detail::sched_theta(tau0, sps_at(p.sps_table, p.sps_len, B0));
  // 4. block prefix sum over contiguous chunks
  const int64_t chunk = (L + kThreads - 1) / kThreads;
  const int64_t c0 = tid * chunk < L ? tid * chunk : L;
  const int64_t c1 = c0 + chunk < L ? c0 + chunk : L;
  long long local = 0;
  for (int64_t i = c0; i < c1; ++i) local += detail::sched_fixed(detail::sched_key_value(keys[i]));
  s_scan[tid] = local;
  __syncthreads();
  for (int off = 1; off < kThreads; off <<= 1) {
    const long long add = tid >= off ? s_scan[tid - off] : 0;
    __syncthreads();
    s_scan[tid] += add;
    __syncthreads();
  }
  const long long excl = s_scan[tid] - local;
  // 5. theta along the chunk: causal first drop / global first argmax
  int64_t tau = tau0 + excl;
  double prev_theta = c0 == 0 ? base : detail::sched_theta(tau, sps_at(p.sps_table, p.sps_len, B0 + c0));
  double best = -1.0;
  int best_i = -1;
  bool dropped = false;
  for (int64_t i = c0; i < c1; ++i) {
    tau += detail::sched_fixed(detail::sched_key_value(keys[i]));
    const double theta = detail::sched_theta(tau, sps_at(p.sps_table, p.sps_len, B0 + i + 1));
    if (!dropped && !(theta > prev_theta)) {
      atomicMin(&s_first, static_cast<int>(i));
      dropped = true;
    }
    if (theta > best) {
      best = theta;
      best_i = static_cast<int>(i);
    }
    prev_theta = theta;
  }
  s_best[tid] = best;
  s_best_i[tid] = best_i;
  __syncthreads();
  for (int off = kThreads / 2; off > 0; off >>= 1) {
    if (tid < off) {
      const double ob = s_best[tid + off];
      const int oi = s_best_i[tid + off];
      if (oi >= 0 && (s_best_i[tid] < 0 || ob > s_best[tid] || (ob == s_best[tid] && oi < s_best_i[tid]))) {
        s_best[tid] = ob;
        s_best_i[tid] = oi;
      }
    }
    __syncthreads();
  }
  int64_t admitted;
  if (p.mode == DSPARK_SCHEDULE_CAUSAL) {
    admitted = s_first < L ? s_first : L;
  } else {
    admitted = (s_best_i[0] >= 0 && s_best[0] > base) ? s_best_i[0] + 1 : 0;
  }
  // 6. lengths: the forced minimum, raised by every admitted candidate
  for (int32_t r = tid; r < R; r += kThreads) {
    int32_t lo, hi;
    bounds(p, r, &lo, &hi);
    p.out_lengths[r] = lo;
  }
  __syncthreads();
  for (int64_t i = tid; i < admitted; i += kThreads) {
    const uint32_t item = detail::sched_key_item(keys[i]);
    atomicMax(reinterpret_cast<unsigned long long*>(p.out_lengths + item / g),
              static_cast<unsigned long long>(item % g + 1));
  }
  if (p.out_throughput) {
    // theta and tau of l*, from the chunk that holds the last admitted candidate
    if (admitted == 0) {
      if (tid == 0) {
        p.out_throughput[0] = static_cast<float>(base);
        p.out_throughput[1] = static_cast<float>(static_cast<double>(tau0) / detail::kSchedScale);
      }
    } else if (admitted - 1 >= c0 && admitted - 1 < c1) {
      long long t = tau0 + excl;
      for (int64_t i = c0; i < admitted; ++i) t += detail::sched_fixed(detail::sched_key_value(keys[i]));
      p.out_throughput[0] = static_cast<float>(detail::sched_theta(t, sps_at(p.sps_table, p.sps_len, B0 + admitted)));
      p.out_throughput[1] = static_cast<float>(static_cast<double>(t) / detail::kSchedScale);
    }
  }
}

int pad_pow2(int64_t n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p < 2 ? 2 : p;
}

}  // namespace
}  // namespace cuda
}  // namespace dspark

extern "C" size_t dspark_schedule_prefix_workspace_size(int32_t num_requests, int32_t num_positions) {
  const int64_t n = static_cast<int64_t>(num_requests) * (num_positions > 0 ? num_positions : 0);
  if (n <= dspark::cuda::kSharedKeys) return 0;
  return static_cast<size_t>(dspark::cuda::pad_pow2(n)) * sizeof(uint64_t);
}

extern "C" dspark_status dspark_schedule_prefix_cuda(const dspark_schedule_prefix_params* params, void* stream) {
  using namespace dspark;
  clear_error();
  const dspark_status st = check_schedule_prefix_params(params);
  if (st != DSPARK_OK || params->num_requests == 0) return st;
  const dspark_schedule_prefix_params& p = *params;
  const int64_t n = static_cast<int64_t>(p.num_requests) * p.num_positions;
  const int npad = cuda::pad_pow2(n);
  uint64_t* gkeys = nullptr;
  size_t shmem = static_cast<size_t>(npad) * sizeof(uint64_t);
  if (n > cuda::kSharedKeys) {
    const size_t need = dspark_schedule_prefix_workspace_size(p.num_requests, p.num_positions);
    DSPARK_CHECK_ARG(p.workspace != nullptr && p.workspace_bytes >= need,
                     "schedule_prefix: workspace must hold dspark_schedule_prefix_workspace_size() = " +
                         std::to_string(need) + " bytes");
    gkeys = static_cast<uint64_t*>(p.workspace);
    shmem = 0;
  }
  cuda::schedule_kernel<<<1, cuda::kThreads, shmem, static_cast<cudaStream_t>(stream)>>>(p, npad, gkeys);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return fail(DSPARK_ERR_CUDA, std::string("schedule_prefix: kernel launch failed: ") + cudaGetErrorString(err));
  return DSPARK_OK;
}
