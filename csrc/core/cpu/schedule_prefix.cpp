// CPU kernel of dspark_schedule_prefix: Algorithm 1, sequentially (sort + scan).
#include <algorithm>
#include <cmath>
#include <new>
#include <string>
#include <vector>

#include "../common/schedule_prefix_check.h"
#include "../common/status.h"
#include "dspark/detail/dspark_heads.h"
#include "dspark/schedule_prefix.h"

namespace dspark {

dspark_status check_schedule_prefix_params(const dspark_schedule_prefix_params* p) {
  DSPARK_CHECK_ARG(p != nullptr, "schedule_prefix: params is NULL");
  DSPARK_CHECK_ARG(p->num_requests >= 0, "schedule_prefix: num_requests must be >= 0");
  DSPARK_CHECK_ARG(p->num_positions >= 0, "schedule_prefix: num_positions must be >= 0");
  DSPARK_CHECK_ARG(p->mode == DSPARK_SCHEDULE_CAUSAL || p->mode == DSPARK_SCHEDULE_GLOBAL,
                   "schedule_prefix: mode must be CAUSAL (0) or GLOBAL (1)");
  if (p->num_requests == 0) return DSPARK_OK;
  const int64_t R = p->num_requests, g = p->num_positions;
  DSPARK_CHECK_ARG(R * g < (int64_t{1} << 31), "schedule_prefix: num_requests * num_positions must be < 2^31");
  DSPARK_CHECK_ARG(g == 0 || p->confidences != nullptr, "schedule_prefix: confidences is NULL (expected [R, g] float32)");
  DSPARK_CHECK_ARG(p->out_lengths != nullptr, "schedule_prefix: out_lengths is NULL (expected [R] int64)");
  DSPARK_CHECK_ARG(p->token_budget <= 0 || p->token_budget >= R,
                   "schedule_prefix: token_budget must be <= 0 (none) or >= num_requests (" + std::to_string(R) +
                       "), got " + std::to_string(p->token_budget));
  int64_t need = R * (1 + g);
  if (p->token_budget > 0) need = std::min(need, p->token_budget);
  DSPARK_CHECK_ARG(p->sps_table != nullptr && p->sps_len >= need,
                   "schedule_prefix: sps_table has " + std::to_string(p->sps_table ? p->sps_len : 0) +
                       " entries but the batch may need SPS at up to " + std::to_string(need) +
                       " tokens (min(R * (1 + g), token_budget)); profile a longer table or set token_budget");
  return DSPARK_OK;
}

namespace cpu {
namespace {

dspark_status run(const dspark_schedule_prefix_params& p) {
  const int32_t R = p.num_requests, g = p.num_positions;
  std::vector<int32_t> lo(R), hi(R);
  for (int32_t r = 0; r < R; ++r) {
    hi[r] = p.max_len ? std::max(0, std::min(p.max_len[r], g)) : g;
    const int32_t mn = p.min_len ? std::max(0, p.min_len[r]) : 0;
    if (p.min_len && p.max_len && p.min_len[r] > p.max_len[r])
      return fail(DSPARK_ERR_INVALID_ARGUMENT, "schedule_prefix: min_len[" + std::to_string(r) + "] = " +
                                                   std::to_string(p.min_len[r]) + " exceeds max_len[" +
                                                   std::to_string(r) + "] = " + std::to_string(p.max_len[r]));
    lo[r] = std::min(mn, hi[r]);
  }
  // survival probabilities, base state and candidates
  int64_t B = R, tau = static_cast<int64_t>(R) << 40;
  std::vector<uint64_t> keys;
  keys.reserve(static_cast<size_t>(R) * g);
  for (int32_t r = 0; r < R; ++r) {
    float a = 1.0f;
    for (int32_t j = 0; j < g; ++j) {
      a *= p.confidences[static_cast<int64_t>(r) * g + j];
      if (j < lo[r]) {
        tau += detail::sched_fixed(a);
        ++B;
      } else if (j < hi[r] && a > 0.0f) {
        keys.push_back(detail::sched_key(a, static_cast<uint32_t>(r * g + j)));
      }
    }
  }
  std::sort(keys.begin(), keys.end());
  const int64_t budget = p.token_budget > 0 ? std::max<int64_t>(p.token_budget, B) : INT64_MAX;
  double best = detail::sched_theta(tau, p.sps_table[B - 1]);
  int64_t best_tau = tau;
  size_t admitted = 0;  // the first `admitted` candidates form l*
  for (size_t i = 0; i < keys.size(); ++i) {
    if (B + 1 > budget) break;
    ++B;
    tau += detail::sched_fixed(detail::sched_key_value(keys[i]));
    const double theta = detail::sched_theta(tau, p.sps_table[B - 1]);
    if (theta > best) {
      best = theta;
      best_tau = tau;
      admitted = i + 1;
    } else if (p.mode == DSPARK_SCHEDULE_CAUSAL) {
      break;
    }
  }
  for (int32_t r = 0; r < R; ++r) p.out_lengths[r] = lo[r];
  for (size_t i = 0; i < admitted; ++i) {
    const uint32_t item = detail::sched_key_item(keys[i]);
    const int32_t r = static_cast<int32_t>(item / g), j = static_cast<int32_t>(item % g);
    p.out_lengths[r] = std::max<int64_t>(p.out_lengths[r], j + 1);
  }
  if (p.out_throughput) {
    p.out_throughput[0] = static_cast<float>(best);
    p.out_throughput[1] = static_cast<float>(static_cast<double>(best_tau) / detail::kSchedScale);
  }
  return DSPARK_OK;
}

}  // namespace
}  // namespace cpu
}  // namespace dspark

extern "C" dspark_status dspark_schedule_prefix_cpu(const dspark_schedule_prefix_params* params) {
  using namespace dspark;
  clear_error();
  const dspark_status st = check_schedule_prefix_params(params);
  if (st != DSPARK_OK || params->num_requests == 0) return st;
  const dspark_schedule_prefix_params& p = *params;
  const int64_t n = static_cast<int64_t>(p.num_requests) * p.num_positions;
  for (int64_t i = 0; i < n; ++i) {
    const float c = p.confidences[i];
    if (!(c >= 0.0f && c <= 1.0f))
      return fail(DSPARK_ERR_INVALID_ARGUMENT,
                  "schedule_prefix: confidences[" + std::to_string(i / p.num_positions) + ", " +
                      std::to_string(i % p.num_positions) + "] = " + std::to_string(c) +
                      " is not a probability in [0, 1] (NaN included)");
  }
  int64_t need = static_cast<int64_t>(p.num_requests) * (1 + p.num_positions);
  if (p.token_budget > 0) need = std::min(need, p.token_budget);
  // the minimums may push B past the budget: check what the scan can read
  int64_t need_min = p.num_requests;
  if (p.min_len)
    for (int32_t r = 0; r < p.num_requests; ++r) need_min += std::max(0, std::min(p.min_len[r], p.num_positions));
  need = std::max(need, need_min);
  for (int64_t t = 0; t < std::min(need, p.sps_len); ++t)
    if (!(p.sps_table[t] > 0.0f) || std::isinf(p.sps_table[t]))
      return fail(DSPARK_ERR_INVALID_ARGUMENT, "schedule_prefix: sps_table[" + std::to_string(t) + "] = " +
                                                   std::to_string(p.sps_table[t]) +
                                                   " must be a positive finite steps-per-second value");
  if (need > p.sps_len)
    return fail(DSPARK_ERR_INVALID_ARGUMENT, "schedule_prefix: sps_table has " + std::to_string(p.sps_len) +
                                                 " entries but min_len forces a batch of " + std::to_string(need) +
                                                 " tokens");
  try {
    return cpu::run(p);
  } catch (const std::bad_alloc&) {
    return fail(DSPARK_ERR_OUT_OF_MEMORY, "schedule_prefix: out of host memory");
  }
}

#ifndef DSPARK_WITH_CUDA
extern "C" dspark_status dspark_schedule_prefix_cuda(const dspark_schedule_prefix_params*, void*) {
  return dspark::fail(DSPARK_ERR_UNSUPPORTED, "schedule_prefix: this build of libdspark_core has no CUDA kernels");
}
extern "C" size_t dspark_schedule_prefix_workspace_size(int32_t, int32_t) { return 0; }
#endif
