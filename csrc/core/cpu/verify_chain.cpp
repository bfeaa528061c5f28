// CPU kernel of dspark_verify_chain: one request per task, rows read lazily (a row after the
// first rejection is read only when accept probabilities are requested).
// DSPARK_ISA_VARIANTS: compiled for the baseline and AVX-512 (see isa.h).
#include <algorithm>
#include <cmath>
#include <new>
#include <string>
#include <vector>

#include "../common/status.h"
#include "../common/verify_chain_check.h"
#include "dspark/detail/philox.h"
#include "dspark/detail/sampling.h"
#include "dspark/verify_chain.h"
#include "isa.h"
#include "parallel.h"
#include "row_ops.h"

namespace dspark {
namespace cpu {
inline namespace DSPARK_ISA_TAG {
namespace {

using detail::kNegInf;

template <typename T, typename D>
struct ChainTask {
  const dspark_verify_chain_params& p;
  std::vector<float>& scratch;

  const T* target_row(int64_t row) const {
    return static_cast<const T*>(p.target_logits) + row * p.target_row_stride;
  }
  const D* draft_row(int64_t row) const {
    return static_cast<const D*>(p.draft) + row * p.draft_row_stride;
  }

  // q_k(v) for the draft row `drow` (probability units).
  struct DraftDist {
    const D* row = nullptr;
    RowDist dist;   // for LOGITS
    int64_t token;  // for ONE_HOT
  };

  DraftDist draft_dist(int64_t drow, int64_t token, float inv_t) const {
    DraftDist q;
    q.token = token;
    if (p.draft_kind == DSPARK_DRAFT_ONE_HOT) return q;
    q.row = draft_row(drow);
    if (p.draft_kind == DSPARK_DRAFT_LOGITS) q.dist = row_distribution(q.row, p.vocab_size, inv_t, kNegInf);
    return q;
  }

  float q_at(const DraftDist& q, int64_t v, float inv_t) const {
    switch (p.draft_kind) {
      case DSPARK_DRAFT_ONE_HOT: return v == q.token ? 1.0f : 0.0f;
      case DSPARK_DRAFT_LOGITS: return probability(q.row, v, inv_t, q.dist);
      default: return detail::sanitize_prob(detail::load_as_float(q.row, v));
    }
  }

  // sum_v min(p_v, q_v) and sum_v max(0, p_v - q_v) in one pass.
  void overlap(const T* trow, const RowDist& pd, const DraftDist& q, float inv_t, double* min_sum,
               double* residual_sum) const {
    const int64_t V = p.vocab_size;
    if (p.draft_kind == DSPARK_DRAFT_ONE_HOT) {
      const double pd_tok = (q.token >= 0 && q.token < V) ? probability(trow, q.token, inv_t, pd) : 0.0;
      *min_sum = pd_tok;
      *residual_sum = std::max(0.0, 1.0 - pd_tok);
      return;
    }
    if (p.draft_kind == DSPARK_DRAFT_LOGITS) {
      overlap_logits(trow, pd, q.row, q.dist, V, inv_t, min_sum, residual_sum);
    } else {
      overlap_probs(trow, pd, q.row, V, inv_t, min_sum, residual_sum);
    }
  }

  // Draw from normalize(max(0, p - q)) with inverse-CDF uniform u (probability units).
  int64_t sample_residual(const T* trow, const RowDist& pd, const DraftDist& q, float inv_t,
                          double residual_sum, double u) const {
    const int64_t V = p.vocab_size;
    if (!(residual_sum > 0.0)) return sample_from(trow, V, inv_t, pd, u);
    const double target = u * residual_sum;
    const float ip = static_cast<float>(1.0 / pd.sum);
    const bool finite_p = pd.m != detail::kPosInf;
    auto p_block = [&](int64_t v0, int64_t n, float* w) {
      for (int64_t i = 0; i < n; ++i) {
        const float s = detail::scaled_logit(detail::load_as_float(trow, v0 + i), inv_t);
        const float e = detail::exp_nonpos(s - pd.m) * ip;
        w[i] = s >= pd.thr ? e : 0.0f;
      }
    };
    int64_t v = -1;
    if (finite_p && p.draft_kind == DSPARK_DRAFT_ONE_HOT) {
      v = scan_blocks(V, target, [&](int64_t v0, int64_t n, float* w) {
        p_block(v0, n, w);
        if (q.token >= v0 && q.token < v0 + n) w[q.token - v0] = std::max(0.0f, w[q.token - v0] - 1.0f);
      });
    } else if (finite_p && p.draft_kind == DSPARK_DRAFT_LOGITS && q.dist.valid && q.dist.m != detail::kPosInf) {
      const float iq = static_cast<float>(1.0 / q.dist.sum);
      v = scan_blocks(V, target, [&](int64_t v0, int64_t n, float* w) {
        p_block(v0, n, w);
        for (int64_t i = 0; i < n; ++i) {
          const float sq = detail::scaled_logit(detail::load_as_float(q.row, v0 + i), inv_t);
          const float d = w[i] - detail::exp_nonpos(sq - q.dist.m) * iq;
          w[i] = d > 0.0f ? d : 0.0f;
        }
      });
    } else if (finite_p && p.draft_kind == DSPARK_DRAFT_PROBS) {
      v = scan_blocks(V, target, [&](int64_t v0, int64_t n, float* w) {
        p_block(v0, n, w);
        for (int64_t i = 0; i < n; ++i) {
          const float d = w[i] - detail::sanitize_prob(detail::load_as_float(q.row, v0 + i));
          w[i] = d > 0.0f ? d : 0.0f;
        }
      });
    } else {  // +inf rows or an invalid draft row: the exact but slower per-element path
      v = scan_blocks(V, target, [&](int64_t v0, int64_t n, float* w) {
        for (int64_t i = 0; i < n; ++i) {
          const float d = probability(trow, v0 + i, inv_t, pd) - q_at(q, v0 + i, inv_t);
          w[i] = d > 0.0f ? d : 0.0f;
        }
      });
    }
    return v >= 0 ? v : sample_from(trow, V, inv_t, pd, u);
  }

  RowDist target_dist(const T* trow, float inv_t, int32_t top_k, float top_p) const {
    const float thr = (top_k > 0 || top_p < 1.0f)
                          ? truncation_threshold(trow, p.vocab_size, inv_t, top_k, top_p, scratch)
                          : kNegInf;
    return row_distribution(trow, p.vocab_size, inv_t, thr);
  }

  void run(int32_t r) {
    const int64_t V = p.vocab_size;
    const int32_t G1 = p.max_drafts + 1;
    int64_t* tokens = p.out_tokens + static_cast<int64_t>(r) * G1;
    const int64_t base = p.cu_target_rows[r];
    const int64_t l = p.cu_target_rows[r + 1] - base - 1;
    const int64_t dbase = base - r;
    const float t = p.temperature[r];
    const bool greedy = detail::is_greedy_temperature(t);
    const float inv_t = detail::inverse_temperature(t);
    const int32_t top_k = detail::effective_top_k(p.top_k, r, p.vocab_size);
    const float top_p = detail::effective_top_p(p.top_p, r);
    const int64_t seed = p.seed ? p.seed[r] : 0;
    const int64_t offset = p.offset ? p.offset[r] : 0;
    float* accept_prob = p.out_accept_prob;

    int64_t accepted = 0;
    bool accepting = true;
    for (int64_t k = 0; k <= l; ++k) {
      const bool need_prob = accept_prob != nullptr && k < l;
      if (!accepting && !need_prob) break;
      const T* trow = target_row(base + k);
      const int64_t d = k < l ? p.draft_tokens[dbase + k] : -1;
      const bool d_in_range = d >= 0 && d < V;
      if (greedy) {
        const int64_t am = row_argmax(trow, V);
        if (need_prob) accept_prob[dbase + k] = (am >= 0 && d == am) ? 1.0f : 0.0f;
        if (!accepting) continue;
        if (am < 0) {  // no finite logit: no distribution to emit from
          accepting = false;
          continue;
        }
        if (k < l && d == am) {
          tokens[k] = d;
          ++accepted;
        } else {
          tokens[k] = am;
          accepting = false;
        }
        continue;
      }
      const RowDist pd = target_dist(trow, inv_t, top_k, top_p);
      if (!pd.valid) {
        if (need_prob) accept_prob[dbase + k] = 0.0f;
        accepting = false;
        continue;
      }
      if (k == l) {  // every draft accepted: bonus token from p_l
        const double u = detail::philox_uniform(seed, offset, static_cast<uint32_t>(k), detail::kRngSample);
        tokens[k] = sample_from(trow, V, inv_t, pd, u);
        break;
      }
      const DraftDist q = draft_dist(dbase + k, d, inv_t);
      double min_sum = 0.0, residual_sum = 0.0;
      const bool need_overlap = need_prob || accepting;
      if (need_overlap && (need_prob || p.draft_kind == DSPARK_DRAFT_ONE_HOT)) {
        overlap(trow, pd, q, inv_t, &min_sum, &residual_sum);
        if (need_prob) accept_prob[dbase + k] = static_cast<float>(min_sum);
      }
      if (!accepting) continue;
      const double p_d = d_in_range ? probability(trow, d, inv_t, pd) : 0.0;
      const double q_d = d_in_range ? q_at(q, d, inv_t) : 0.0;
      const double coin = detail::philox_uniform(seed, offset, static_cast<uint32_t>(k), detail::kRngAcceptCoin);
      if (d_in_range && coin * q_d < p_d) {
        tokens[k] = d;
        ++accepted;
        continue;
      }
      if (!need_prob && p.draft_kind != DSPARK_DRAFT_ONE_HOT)
        overlap(trow, pd, q, inv_t, &min_sum, &residual_sum);
      const double u = detail::philox_uniform(seed, offset, static_cast<uint32_t>(k), detail::kRngSample);
      tokens[k] = sample_residual(trow, pd, q, inv_t, residual_sum, u);
      accepting = false;
    }
    p.out_num_accepted[r] = accepted;
  }
};

template <typename T, typename D>
void run_requests(const dspark_verify_chain_params& p) {
  const double cost = static_cast<double>(p.vocab_size) * (p.max_drafts + 1) * 2.0;
  parallel_for(p.num_requests, cost, [&](int64_t b, int64_t e) {
    std::vector<float> scratch;
    ChainTask<T, D> task{p, scratch};
    for (int64_t r = b; r < e; ++r) task.run(static_cast<int32_t>(r));
  });
}

template <typename T>
void dispatch_draft(const dspark_verify_chain_params& p) {
  if (p.draft_kind == DSPARK_DRAFT_ONE_HOT) return run_requests<T, float>(p);
  switch (p.draft_dtype) {
    case DSPARK_FLOAT32: return run_requests<T, float>(p);
    case DSPARK_BFLOAT16: return run_requests<T, detail::bf16_t>(p);
    case DSPARK_FLOAT16: return run_requests<T, detail::fp16_t>(p);
  }
}

}  // namespace

void verify_chain_kernel(const dspark_verify_chain_params& p) {
  switch (p.target_dtype) {
    case DSPARK_FLOAT32: dispatch_draft<float>(p); break;
    case DSPARK_BFLOAT16: dispatch_draft<detail::bf16_t>(p); break;
    case DSPARK_FLOAT16: dispatch_draft<detail::fp16_t>(p); break;
  }
}

}  // namespace DSPARK_ISA_TAG
}  // namespace cpu
}  // namespace dspark

#ifndef DSPARK_ISA_AVX512
DSPARK_DECLARE_AVX512_VARIANT(void, verify_chain_kernel, (const dspark_verify_chain_params&))

extern "C" dspark_status dspark_verify_chain_cpu(const dspark_verify_chain_params* params) {
  using namespace dspark;
  clear_error();
  const dspark_status st = check_verify_chain_params(params);
  if (st != DSPARK_OK || params->num_requests == 0) return st;
  const dspark_verify_chain_params& p = *params;
  // Host-visible layout checks: the CPU path can afford them and they guard every row access.
  if (p.cu_target_rows[0] != 0)
    return fail(DSPARK_ERR_INVALID_ARGUMENT, "verify_chain: cu_target_rows[0] must be 0");
  for (int32_t r = 0; r < p.num_requests; ++r) {
    const int64_t n = p.cu_target_rows[r + 1] - p.cu_target_rows[r];
    if (n < 1 || n - 1 > p.max_drafts)
      return fail(DSPARK_ERR_INVALID_ARGUMENT,
                  "verify_chain: request " + std::to_string(r) + " owns " + std::to_string(n) +
                      " target rows (cu_target_rows), expected 1.." + std::to_string(p.max_drafts + 1) +
                      " (l_r + 1 with 0 <= l_r <= max_drafts)");
  }
  const int64_t num_drafts = p.cu_target_rows[p.num_requests] - p.num_requests;
  if (num_drafts > 0 && p.draft_tokens == nullptr)
    return fail(DSPARK_ERR_INVALID_ARGUMENT, "verify_chain: draft_tokens is NULL but requests have drafts");
  const int64_t width = static_cast<int64_t>(p.max_drafts) + 1;
  std::fill(p.out_tokens, p.out_tokens + p.num_requests * width, int64_t{-1});
  try {
    DSPARK_ISA_CALL(verify_chain_kernel, p);
  } catch (const std::bad_alloc&) {
    return fail(DSPARK_ERR_OUT_OF_MEMORY, "verify_chain: out of host memory for scratch");
  } catch (const std::exception& e) {
    return fail(DSPARK_ERR_INTERNAL, std::string("verify_chain: ") + e.what());
  }
  return DSPARK_OK;
}

#endif  // DSPARK_ISA_AVX512

#if !defined(DSPARK_WITH_CUDA) && !defined(DSPARK_ISA_AVX512)
// CPU-only build: the CUDA entry points exist so C++ engines link the same symbols against every
// build, and they say clearly that this build has no CUDA kernels.
extern "C" dspark_status dspark_verify_chain_cuda(const dspark_verify_chain_params*, void*) {
  return dspark::fail(DSPARK_ERR_UNSUPPORTED, "verify_chain: this build of libdspark_core has no CUDA kernels");
}
extern "C" size_t dspark_verify_chain_workspace_size(int32_t, int64_t, int32_t) { return 0; }
#endif
