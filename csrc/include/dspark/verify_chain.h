/*
 * dspark/verify_chain.h: fused chain (block) verification with lossless rejection sampling.
 *
 * Ragged layout. Request r (0 <= r < R) verifies l_r = cu_target_rows[r+1] - cu_target_rows[r] - 1
 * drafts (0 <= l_r <= max_drafts). It owns target rows cu_target_rows[r] .. cu_target_rows[r+1]-1
 * (one per draft position plus the bonus position) and draft rows
 * cu_target_rows[r] - r .. cu_target_rows[r+1] - r - 2 (draft row index = target row index - r).
 * N = cu_target_rows[R] target rows, N - R draft rows.
 *
 * Semantics, per request, with p_k the target distribution of row k after temperature, top-k and
 * top-p, and q_k the draft distribution:
 *  - temperature[r] == 0 (greedy): draft k is accepted iff it equals argmax of target row k
 *    (lowest index among equal maxima, NaN never wins); the first mismatch emits that argmax; if all
 *    l_r drafts match, the bonus token is argmax of row l_r.
 *  - temperature[r] > 0: draft k is accepted iff u_k * q_k(d_k) < p_k(d_k) with u_k uniform on
 *    [0, 1) (53-bit), i.e. with probability min(1, p/q) and never when p_k(d_k) == 0. At the first
 *    rejection a token is drawn from normalize(max(0, p_k - q_k)) (from p_k if that mass is 0 in
 *    floating point); if all are accepted a bonus token is drawn from p_{l_r}.
 *  - q_k: DSPARK_DRAFT_ONE_HOT: q_k = onehot(d_k); DSPARK_DRAFT_LOGITS: q_k = softmax(draft row / T);
 *    DSPARK_DRAFT_PROBS: the row as given (negative or NaN entries count as 0; the row is not
 *    renormalised). top-k/top-p never apply to q.
 *  - top-k (1 <= k < V): keep tokens whose scaled logit is >= the k-th largest (ties at the
 *    boundary are kept). top-p (0 < p < 1), applied after top-k: keep the smallest set of highest
 *    tokens whose renormalised mass reaches p (ties at the boundary kept). Others get p = 0.
 *  - Non-finite input: NaN logits count as -inf. A row with +inf entries puts its mass uniformly on
 *    them. A target row with no finite logit (all NaN / -inf) has no distribution: verification of
 *    that request stops there, the slot gets -1 and num_accepted counts only drafts before it.
 *  - Draft token ids outside [0, V) are rejected (never accepted); a request with l_r > max_drafts
 *    or a non-monotone cu_target_rows makes the call fail (CPU) / the request emit nothing (CUDA,
 *    where the check runs on the device: all its tokens -1 and num_accepted 0).
 *  - Randomness: Philox4x32-10 keyed by seed[r]; counter (offset[r] low, offset[r] high, position,
 *    purpose). The same (seed, offset) gives the same tokens on CPU and CUDA up to floating-point
 *    ties. Advance offset[r] by one per call to get fresh draws (on the device, inside a captured
 *    CUDA graph, if desired).
 */
#ifndef DSPARK_VERIFY_CHAIN_H_
#define DSPARK_VERIFY_CHAIN_H_

#include "dspark/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum dspark_draft_kind {
  DSPARK_DRAFT_ONE_HOT = 0, /* no draft distribution: deterministic drafts (greedy, n-gram, ...) */
  DSPARK_DRAFT_LOGITS = 1,  /* draft logits, divided by the request's temperature */
  DSPARK_DRAFT_PROBS = 2    /* draft probabilities, used as given */
} dspark_draft_kind;

typedef struct dspark_verify_chain_params {
  /* --- sizes --- */
  int32_t num_requests; /* R >= 0 (0 is a no-op) */
  int32_t vocab_size;   /* V >= 1 */
  int32_t max_drafts;   /* gamma >= 0: the width of out_tokens is gamma + 1 */

  /* --- ragged layout --- */
  const int64_t* cu_target_rows; /* [R + 1] int64, cu[0] = 0, non-decreasing, cu[R] = N */

  /* --- target --- */
  const void* target_logits;      /* [N, V] rows of target logits, dtype target_dtype */
  dspark_dtype target_dtype;      /* FLOAT32, FLOAT16 or BFLOAT16 */
  int64_t target_row_stride;      /* elements between consecutive rows (>= V); columns contiguous */

  /* --- drafts --- */
  const int64_t* draft_tokens;    /* [N - R] int64 draft token ids, ragged as described above */
  dspark_draft_kind draft_kind;
  const void* draft;              /* [N - R, V] draft logits or probs (NULL for ONE_HOT) */
  dspark_dtype draft_dtype;       /* dtype of `draft` */
  int64_t draft_row_stride;       /* elements between draft rows (>= V) */

  /* --- per-request sampling parameters --- */
  const float* temperature;       /* [R] float32; 0 = greedy, > 0 sampled; NaN/negative -> greedy */
  const int32_t* top_k;           /* [R] int32 or NULL; <= 0 or >= V disables */
  const float* top_p;             /* [R] float32 or NULL; >= 1 (or NaN) disables, <= 0 keeps the max */
  const int64_t* seed;            /* [R] int64 Philox key (may be NULL if every request is greedy) */
  const int64_t* offset;          /* [R] int64 Philox counter offset (NULL allowed as for seed) */

  /* --- outputs --- */
  int64_t* out_tokens;            /* [R, gamma + 1] int64: emitted tokens, -1 padded */
  int64_t* out_num_accepted;      /* [R] int64: accepted drafts (emitted = accepted + 1 normally) */
  float* out_accept_prob;         /* [N - R] float32 or NULL: sum_v min(p_k, q_k) per draft row
                                     (greedy: 1 if the draft is the argmax else 0); rows after a
                                     request's first rejection are computed too */

  /* --- scratch (CUDA only) --- */
  void* workspace;                /* device scratch of dspark_verify_chain_workspace_size() bytes */
  size_t workspace_bytes;
} dspark_verify_chain_params;

/* Run on the host. Pointers are host pointers. Uses up to `dspark_set_num_threads` threads. */
DSPARK_API dspark_status dspark_verify_chain_cpu(const dspark_verify_chain_params* params);

/* Enqueue on `stream` (a cudaStream_t, NULL = legacy default stream). Pointers are device pointers.
 * No host synchronisation; capturable in a CUDA graph. Returns DSPARK_ERR_UNSUPPORTED when the
 * library was built without CUDA. */
DSPARK_API dspark_status dspark_verify_chain_cuda(const dspark_verify_chain_params* params,
                                                  void* stream);

/* Bytes of device workspace the CUDA entry point needs for this problem size. */
DSPARK_API size_t dspark_verify_chain_workspace_size(int32_t num_requests, int64_t num_rows,
                                                     int32_t vocab_size);

/* Host threads used by *_cpu entry points (default: hardware concurrency). n <= 0 restores it. */
DSPARK_API void dspark_set_num_threads(int n);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* DSPARK_VERIFY_CHAIN_H_ */
