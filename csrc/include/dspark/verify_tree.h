/*
 * dspark/verify_tree.h: fused token-tree verification (greedy and lossless stochastic, one-hot
 * drafts).
 *
 * Ragged layout. Request r (0 <= r < R) verifies a tree of n_r = cu_nodes[r+1] - cu_nodes[r] nodes
 * (1 <= n_r <= max_nodes). Its nodes have local indices 0 .. n_r - 1 and global (row) indices
 * cu_nodes[r] + local. Node 0 is the root: the anchor token whose successor is being verified (its
 * token is not read). Every other node i carries a draft token tokens[cu_nodes[r] + i] and a parent
 * parents[cu_nodes[r] + i] (a LOCAL index). Target row cu_nodes[r] + i holds the target logits that
 * follow the token path root .. i (one row per node, N = cu_nodes[R] rows).
 *
 * Tree rules (the contract; checked on the host by the CPU entry point, on the device by CUDA):
 *  - parents[root] == -1 and 0 <= parents[i] < i for i >= 1 (parents come before children, so a
 *    cycle or a self-parent is impossible: both violate the rule and are rejected);
 *  - depth(i) = depth(parent) + 1 <= max_depth for every node;
 *  - children of a node are tried in increasing local index ("their given order").
 *  CPU: a violation fails the call (DSPARK_ERR_INVALID_ARGUMENT, message names `parents` or
 *  `cu_nodes` and the request), nothing is written. CUDA: the offending request emits nothing
 *  (path, tokens all -1, num_accepted 0); other requests are unaffected.
 *
 * Semantics, per request, with p_x the target distribution of node x's row after temperature,
 * top-k and top-p (exactly the rules of verify_chain / detail/sampling.h):
 *  - temperature[r] == 0 (greedy): starting at the root, a = argmax of row x (lowest index among
 *    equal maxima, NaN never wins); move to the first child (lowest index) whose token == a and
 *    repeat; when no child matches (or x is a leaf), emit a and stop.
 *  - temperature[r] > 0 (lossless, one-hot drafts; Spector & Re / SpecInfer multi-draft rule):
 *    at node x let p' = p_x. For each child c in order with token t: accept c with probability
 *    p'(t); on rejection set p'(t) = 0 and renormalise p'. On acceptance move to c and repeat. If
 *    every child is rejected, or x is a leaf, emit a token drawn from the final p' and stop. This
 *    preserves the target distribution for any tree.
 *    Duplicate sibling tokens are allowed: after the first copy of t is rejected p'(t) = 0, so a
 *    later copy is never accepted (and removes no further mass); with greedy the first copy wins.
 *    Tokens outside [0, V) are never accepted and remove no mass. If all of p' has been removed in
 *    floating point, the final token is drawn from p_x.
 *  - Non-finite rows: as verify_chain. A row with no finite logit (all NaN / -inf) has no
 *    distribution: the walk stops at that node without emitting (its token slot stays -1).
 *  - Randomness: Philox4x32-10 keyed by seed[r], counter (offset[r] lo, offset[r] hi, position,
 *    purpose) with position = the LOCAL index of the node concerned: the accept coin of child c
 *    uses (c, DSPARK_RNG_TREE_COIN = 16), the final draw at node x uses (x, DSPARK_RNG_TREE_SAMPLE =
 *    17). Every node is tried at most once, so no draw is reused. Same (seed, offset) -> same
 *    tokens on CPU and CUDA up to floating-point ties.
 *
 * Outputs (width W = max_depth + 1):
 *  - out_path[r, 0..a_r] = the accepted node path (local indices), out_path[r, 0] = 0 (the root is
 *    always kept: it is the anchor, its KV entry is valid), -1 padded. Strictly increasing, so it
 *    feeds dspark_kv_compact's `accepted` directly.
 *  - out_num_accepted[r] = a_r, the number of accepted draft nodes.
 *  - out_tokens[r, 0..a_r] = tokens of the accepted nodes then the emitted (correction / bonus)
 *    token; -1 padded (the last slot stays -1 when the walk stopped at a row with no distribution).
 */
#ifndef DSPARK_VERIFY_TREE_H_
#define DSPARK_VERIFY_TREE_H_

#include "dspark/common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define DSPARK_RNG_TREE_COIN 16
#define DSPARK_RNG_TREE_SAMPLE 17
/* Largest max_nodes the CUDA kernel accepts (per-request child lists live in shared memory). */
#define DSPARK_VERIFY_TREE_CUDA_MAX_NODES 1024

typedef struct dspark_verify_tree_params {
  /* --- sizes --- */
  int32_t num_requests; /* R >= 0 (0 is a no-op) */
  int32_t vocab_size;   /* V >= 1 */
  int32_t max_nodes;    /* M >= 1: upper bound of n_r (CUDA: <= DSPARK_VERIFY_TREE_CUDA_MAX_NODES) */
  int32_t max_depth;    /* D, 0 <= D < M: the output width is D + 1; deeper trees are invalid */

  /* --- tree --- */
  int64_t num_nodes;       /* N: rows of target_logits / entries of parents and tokens; a tree
                              reaching past N is invalid (nothing beyond row N - 1 is read) */
  const int64_t* cu_nodes; /* [R + 1] int64, cu[0] = 0, non-decreasing, each n_r in [1, M], cu[R] <= N */
  const int64_t* parents;  /* [N] int64 local parent index (-1 for each root), see the rules */
  const int64_t* tokens;   /* [N] int64 draft token of each node (root entries not read) */

  /* --- target --- */
  const void* target_logits; /* [N, V] one row per node, dtype target_dtype */
  dspark_dtype target_dtype; /* FLOAT32, FLOAT16 or BFLOAT16 */
  int64_t target_row_stride; /* elements between rows (>= V); columns contiguous */

  /* --- per-request sampling parameters (as verify_chain) --- */
  const float* temperature; /* [R] float32; 0 = greedy, > 0 sampled; NaN/negative -> greedy */
  const int32_t* top_k;     /* [R] int32 or NULL; <= 0 or >= V disables */
  const float* top_p;       /* [R] float32 or NULL; >= 1 (or NaN) disables, <= 0 keeps the max */
  const int64_t* seed;      /* [R] int64 Philox key, or NULL (then offset is NULL too: key 0) */
  const int64_t* offset;    /* [R] int64 Philox counter offset, or NULL */

  /* --- outputs --- */
  int64_t* out_path;         /* [R, D + 1] int64 accepted local node indices, -1 padded */
  int64_t* out_num_accepted; /* [R] int64 accepted draft nodes */
  int64_t* out_tokens;       /* [R, D + 1] int64 emitted tokens, -1 padded */
} dspark_verify_tree_params;

/* Run on the host (host pointers). Uses up to dspark_set_num_threads threads. */
DSPARK_API dspark_status dspark_verify_tree_cpu(const dspark_verify_tree_params* params);

/* Enqueue on `stream` (cudaStream_t, NULL = legacy default). Device pointers; no workspace, no host
 * synchronisation, capturable in a CUDA graph. DSPARK_ERR_UNSUPPORTED in builds without CUDA. */
DSPARK_API dspark_status dspark_verify_tree_cuda(const dspark_verify_tree_params* params, void* stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* DSPARK_VERIFY_TREE_H_ */
