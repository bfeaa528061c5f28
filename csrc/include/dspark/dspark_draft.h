/*
 * dspark/dspark_draft.h: the DSpark sequential stage (Markov head) and confidence head, fused.
 *
 * Given the parallel backbone's outputs for R requests and g draft positions (base logits U and
 * hidden states h), this op runs the sequential stage left to right for every request
 * (paper Eq. 4-7, docs/ops_dspark.md):
 *
 *   prev_0 = anchor[r];  s_0 = 0 (rnn state)
 *   for k = 0 .. g-1:
 *     e_k  = W1[prev_k]                                   (markov_w1 row, fp32)
 *     head VANILLA: b_k = W2 e_k
 *     head GATED:   b_k = W2 (sigmoid(G [h_k ; e_k] + g_b) * e_k)
 *     head RNN:     [g | c | o] = J [s ; e_k ; h_k] + j_b   (rows 0..r-1, r..2r-1, 2r..3r-1 of J)
 *                   s = sigmoid(g) * s + (1 - sigmoid(g)) * tanh(c);  b_k = W2 tanh(o)
 *     z_k  = U_k + b_k                                     (fp32, written to out_logits)
 *     d_k  = argmax z_k (temperature 0)  or  d_k ~ softmax(z_k / T)  (inverse-CDF, see below)
 *     c_k  = sigmoid((w . [h_k ; e_k] + w_b) / T_k)        (fp32; [h_k] only when conf_with_markov
 *                                                           is 0; T_k = sts_temperature[k] or 1)
 *     prev_{k+1} = d_k
 *
 * Draft vocabulary (draft_to_target != NULL): the drafter proposes from a subset of N = vocab_size
 * of the target's V_t = target_vocab_size tokens (EAGLE-3 / FR-Spec style). U, W2, z and the sampler
 * run over the N subset columns; column j stands for target token draft_to_target[j]. W1 stays over
 * the target vocabulary ([V_t, r]), the anchor is a target token in [0, V_t), and
 * prev_{k+1} = draft_to_target[d_k]: out_tokens holds target token ids, out_logits the N-column
 * rows the sampler read (q is zero outside the subset; the caller scatters it to V_t columns for
 * verify_chain, or passes no q at temperature 0).
 *
 * All arithmetic is fp32 (weights and activations are widened on load); c_k does not depend on the
 * sampling temperature. The logits row written to out_logits is exactly the row the sampler read:
 * verify_chain(draft_logits = out_logits, temperature = T) evaluates q_k with the same numbers.
 *
 * Sampling (temperature[r] > 0): the distribution of z_k / T follows detail/sampling.h (NaN counts
 * as -inf, +inf entries share the mass, no top-k/top-p), and d_k is the first index whose
 * cumulative weight (index order) exceeds u * S with u = philox_uniform(seed[r], offset[r], k,
 * kRngDraftSample). The same (seed, offset) gives the same drafts on CPU and CUDA up to
 * floating-point ties. Greedy (temperature 0): d_k is the lowest index of the maximum of z_k (NaN
 * never wins).
 *
 * Hostile input:
 *  - z_k with no finite or +inf entry (all NaN / -inf): d_k = -1; every later position j > k of
 *    that request gets d_j = -1, c_j = 0 and a logit row of -inf (no distribution to draft from).
 *  - draft_to_target with an entry outside [0, V_t) or a repeated entry: CPU fails naming
 *    draft_to_target (checked on every call: O(N + V_t) bytes); CUDA does not check for repeats
 *    (the caller validates the map once, as the torch wrapper's drafter loader does) and turns a
 *    draft whose entry is out of range into -1 (handled as above from the next position).
 *  - anchor outside [0, V) (V_t with a draft vocabulary): CPU fails with DSPARK_ERR_INVALID_ARGUMENT naming anchor_tokens; CUDA
 *    (where the check runs on the device) treats the request as above from position 0: all drafts
 *    -1, confidences 0, logit rows -inf.
 *  - temperature negative or NaN: CPU fails naming temperature; CUDA drafts greedily.
 *    sts_temperature <= 0 or NaN: CPU fails naming sts_temperature; CUDA writes c_k = NaN.
 *  - NaN in weights or hidden states propagates (a NaN confidence, NaN logits -> -inf for sampling).
 */
#ifndef DSPARK_DSPARK_DRAFT_H_
#define DSPARK_DSPARK_DRAFT_H_

#include "dspark/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum dspark_markov_head {
  DSPARK_MARKOV_VANILLA = 0, /* b = W2 W1[prev] */
  DSPARK_MARKOV_GATED = 1,   /* b = W2 (sigmoid(G [h; W1[prev]] + bias) * W1[prev]) */
  DSPARK_MARKOV_RNN = 2      /* recurrent state, see above */
} dspark_markov_head;

typedef struct dspark_dspark_draft_params {
  /* --- sizes --- */
  int32_t num_requests;  /* R >= 0 (0 is a no-op) */
  int32_t num_positions; /* g >= 1: drafts per request */
  int32_t vocab_size;    /* V >= 1: columns of U, W2 and z (N, the subset size, with draft_to_target) */
  int32_t hidden_size;   /* d >= 1 (may be anything >= 1 when hidden is NULL) */
  int32_t rank;          /* r, 1 <= r <= 4096 */
  dspark_markov_head head_type;

  /* --- backbone outputs --- */
  const void* base_logits;   /* [R, g, V] contiguous, dtype logits_dtype: U */
  dspark_dtype logits_dtype; /* FLOAT32, FLOAT16 or BFLOAT16 */
  const void* hidden;        /* [R, g, d] contiguous, dtype hidden_dtype: h. Required by the GATED
                                and RNN heads and by the confidence head; NULL otherwise allowed */
  dspark_dtype hidden_dtype;
  const int64_t* anchor_tokens; /* [R] int64: prev_0, the last committed token */

  /* --- draft vocabulary (optional) --- */
  const int64_t* draft_to_target; /* [V] int64 target token of each subset column, distinct, in
                                     [0, target_vocab_size); NULL = full vocabulary (identity) */
  int32_t target_vocab_size;      /* V_t >= 1: rows of markov_w1 when draft_to_target is given
                                     (ignored, = V, without it) */

  /* --- weights (DeepSpec layout), all of dtype weight_dtype, contiguous --- */
  dspark_dtype weight_dtype;
  const void* markov_w1;   /* [V, r] embedding table W1 ([V_t, r] with draft_to_target) */
  const void* markov_w2;   /* [V, r] W2 (linear r -> V, no bias): b_v = sum_i W2[v, i] x_i */
  const void* gate_weight; /* [r, d + r] G (GATED only, else ignored), input [h ; e] */
  const void* gate_bias;   /* [r] (GATED only) */
  const void* joint_weight; /* [3r, 2r + d] J (RNN only), input [s ; e ; h] */
  const void* joint_bias;   /* [3r] (RNN only) */
  const void* conf_weight; /* [d + r] (conf_with_markov = 1) or [d] (0): confidence head row w;
                              NULL = no confidence head (out_confidence must then be NULL) */
  const void* conf_bias;   /* [1] confidence bias (required with conf_weight) */
  int32_t conf_with_markov; /* 1: c uses [h ; W1[prev]] (DeepSpec default), 0: c uses h only */
  const float* sts_temperature; /* [g] float32 per-position STS temperatures T_k > 0, or NULL (1) */

  /* --- per-request sampling parameters --- */
  const float* temperature; /* [R] float32: 0 = greedy, > 0 = sample from softmax(z / T) */
  const int64_t* seed;      /* [R] int64 Philox key, or NULL (0) */
  const int64_t* offset;    /* [R] int64 Philox counter offset, or NULL (0) */

  /* --- outputs --- */
  int64_t* out_tokens;   /* [R, g] int64 drafts d_k as target token ids (-1: none, see hostile input) */
  float* out_logits;     /* [R, g, V] float32 z_k, exactly what the sampler used; NULL allowed on
                            CPU (then a per-thread scratch row is used); required on CUDA */
  float* out_confidence; /* [R, g] float32 c_k, or NULL (must be NULL without conf_weight) */

  /* --- scratch (CUDA only) --- */
  void* workspace; /* device scratch of dspark_dspark_draft_workspace_size() bytes */
  size_t workspace_bytes;
} dspark_dspark_draft_params;

/* Run on the host (pointers are host pointers), up to dspark_set_num_threads threads. */
DSPARK_API dspark_status dspark_dspark_draft_cpu(const dspark_dspark_draft_params* params);

/* Enqueue on `stream` (cudaStream_t, NULL = legacy default). Device pointers. g steps of three
 * kernels each; no host synchronisation, no allocation; capturable in a CUDA graph.
 * DSPARK_ERR_UNSUPPORTED when built without CUDA. */
DSPARK_API dspark_status dspark_dspark_draft_cuda(const dspark_dspark_draft_params* params, void* stream);

/* Bytes of device workspace dspark_dspark_draft_cuda needs. */
DSPARK_API size_t dspark_dspark_draft_workspace_size(int32_t num_requests, int32_t rank);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* DSPARK_DSPARK_DRAFT_H_ */
