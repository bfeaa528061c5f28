/*
 * dspark/schedule_prefix.h: the hardware-aware prefix scheduler (paper Algorithm 1).
 *
 * Input: per-position confidences c[r, i] (R requests, g positions) and a steps-per-second table
 * SPS (entry t = SPS at t + 1 batch tokens). Output: verification lengths l_r (drafts to verify).
 *
 *   a[r, j] = prod_{i <= j} c[r, i]   (fp32, left to right); l = j + 1 verifies drafts 0..j
 *   lo_r = clamp(min_len[r], 0, hi_r), hi_r = clamp(max_len[r], 0, g)   (no arrays: 0 and g)
 *   start: l_r = lo_r, B = R + sum lo_r, tau = R + sum_r sum_{j < lo_r} a[r, j],
 *          best = tau * SPS(B)
 *   candidates: (r, j) with lo_r <= j < hi_r and a[r, j] > 0, sorted by a descending, then r
 *          ascending, then j ascending (deterministic; since a is non-increasing in j every prefix
 *          of the order extends prefixes)
 *   admit in order: B += 1 (stop before B would exceed token_budget when token_budget > 0),
 *          tau += a, theta = tau * SPS(B);
 *          theta > best: keep (best = theta, l* = current lengths)
 *          else CAUSAL: stop (Algorithm 1's break: admission of draft j never looks at a[r, j']
 *                       for any later candidate, which keeps verification lossless)
 *               GLOBAL: continue scanning (retrospective search; lossless only when the
 *                       confidences come from earlier rounds, paper Section 5.2)
 *   return l*.
 *
 * Arithmetic (identical on CPU and CUDA, so both return the same lengths): tau is accumulated in
 * fixed point, round_half_even(a * 2^40) as int64 (exact and order-independent), and
 * theta = double(tau_fixed) * 2^-40 * double(SPS(B)).
 *
 * Hostile input:
 *  - confidences NaN or outside [0, 1]: CPU fails naming confidences; CUDA clamps to [0, 1] with
 *    NaN -> 0.
 *  - SPS table shorter than min(R * (1 + g), token_budget) entries (empty included): both entry
 *    points fail naming sps_table (the length is known on the host). Entries that are NaN or <= 0:
 *    CPU fails naming sps_table; CUDA uses 0 for them (no throughput: never admitted).
 *  - min_len[r] > max_len[r]: CPU fails naming min_len; CUDA uses lo_r = hi_r. The forced minimums
 *    are kept even if they exceed token_budget.
 *  - 0 < token_budget < R: fails naming token_budget.
 */
#ifndef DSPARK_SCHEDULE_PREFIX_H_
#define DSPARK_SCHEDULE_PREFIX_H_

#include "dspark/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum dspark_schedule_mode {
  DSPARK_SCHEDULE_CAUSAL = 0, /* Algorithm 1 with the early stop (lossless on current confidences) */
  DSPARK_SCHEDULE_GLOBAL = 1  /* no early stop: the best prefix of the whole sorted order */
} dspark_schedule_mode;

typedef struct dspark_schedule_prefix_params {
  int32_t num_requests;  /* R >= 0 (0 is a no-op) */
  int32_t num_positions; /* g >= 0 */
  const float* confidences; /* [R, g] float32 contiguous: c[r, i] in [0, 1] */
  const float* sps_table;   /* [T] float32: steps per second at t + 1 batch tokens, > 0 */
  int64_t sps_len;          /* T >= min(R * (1 + g), token_budget if > 0) */
  const int32_t* min_len;   /* [R] int32 per-request minimum l_r, or NULL (0) */
  const int32_t* max_len;   /* [R] int32 per-request maximum l_r, or NULL (g) */
  int64_t token_budget;     /* max total batch tokens B = sum (1 + l_r); <= 0: no budget */
  dspark_schedule_mode mode;

  int64_t* out_lengths;     /* [R] int64 l_r */
  float* out_throughput;    /* [2] float32 or NULL: (best theta, expected tokens tau of l*) */

  void* workspace;          /* CUDA only: dspark_schedule_prefix_workspace_size() bytes */
  size_t workspace_bytes;
} dspark_schedule_prefix_params;

DSPARK_API dspark_status dspark_schedule_prefix_cpu(const dspark_schedule_prefix_params* params);

/* One CTA, one launch, no host synchronisation: capturable in a CUDA graph. */
DSPARK_API dspark_status dspark_schedule_prefix_cuda(const dspark_schedule_prefix_params* params, void* stream);

DSPARK_API size_t dspark_schedule_prefix_workspace_size(int32_t num_requests, int32_t num_positions);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* DSPARK_SCHEDULE_PREFIX_H_ */
