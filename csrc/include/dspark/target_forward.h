/*
 * dspark/target_forward.h: the whole forward of a Llama / Qwen3-family target over a ragged batch
 * of chain blocks, in one call, on the CPU: what a speculative round's verification (and a plain
 * decode step) costs once Python, per-op dispatch and per-call GEMM set-up are gone.
 *
 * Why a whole-forward call. At batch 1 a 135M-parameter target's step is bound by streaming its
 * weights (270 MB in bf16, ~9 ms at 30 GB/s), but issued as ~25 framework ops per layer it costs
 * 2-3x that on a 2-core CPU (docs/models.md has the profile). Here every GEMM streams its weight
 * once for all T rows (1..16 rows cost about the same: verification is nearly free), the small
 * ops run between spin barriers of a fixed thread team, and no memory is allocated per layer.
 *
 * Math (per layer l, rows t of the batch; H hidden, d head_dim, Hq / Hkv heads, I intermediate):
 *   x    = rmsnorm(h) * input_norm                         (fp32, then rounded to bf16)
 *   q,k,v = x W_qkv^T (+ qkv_bias)                         (bf16 x bf16 -> fp32)
 *   q,k  = rmsnorm_per_head(q,k) * {q,k}_norm  (Qwen3 only), then rotate-half RoPE at positions[t]
 *   K/V of row t -> cache slot slots[r], position base[r] + (t - cu[r])
 *   a    = softmax(q K^T / sqrt(d)) V over cached positions 0 .. base[r] + (t - cu[r]) (causal),
 *          or with block_attention over 0 .. base[r] + rows(r) - 1: every row of a request sees
 *          its whole block (the parallel block of a DFlash / DSpark drafter's backbone)
 *   h   += bf16(a) W_o^T
 *   x    = rmsnorm(h) * post_norm;  h += bf16(silu(x W_gate^T) * (x W_up^T)) W_down^T
 * then logits[i] = bf16(rmsnorm(h[logit_rows[i]]) * final_norm) W_head^T (fp32 out).
 * Every GEMM rounds its input to bf16 and accumulates in fp32; a row's result does not depend on
 * the other rows of the call (the reduction order over K is fixed), so a block verified in one
 * call gives the logits the same rows give one at a time.
 *
 * Packed weight layout ("panels"): W [N, K] (row n = output feature n) is stored as
 * ceil(N / 16) panels; panel p holds, for each pair j < ceil(K / 2), the 16 output features
 * 16p .. 16p+15 as (W[n][2j], W[n][2j+1]) bf16 pairs: element (p, j, c, e) at
 * ((p * K2 + j) * 16 + c) * 2 + e, zero padded past N and K (dspark_target_panel_elements gives
 * the size). The gate/up weight of a layer is one panel array whose panels alternate gate panel
 * p, up panel p (2 * ceil(I / 16) panels, I a multiple of 16).
 *
 * Restrictions: fp32 residual stream, KV cache and logits; head_dim even and <= 256; chain blocks,
 * causal or whole-block (no tree masks); intermediate_size a multiple of 16.
 *
 * A drafter's block: with block_attention = 1 the same call is the backbone forward of a
 * DFlash-style drafter over [anchor, mask, ...] rows whose context K/V the caller has cached.
 * Its block K/V are still written at base[r] .. (past the cached length), which the caller
 * treats as scratch: its next append overwrites them.
 */
#ifndef DSPARK_TARGET_FORWARD_H_
#define DSPARK_TARGET_FORWARD_H_

#include "dspark/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct dspark_target_layer {
  const uint16_t* qkv;       /* panels of [(Hq + 2 Hkv) d, H]: q rows, then k rows, then v rows */
  const uint16_t* o;         /* panels of [H, Hq d] */
  const uint16_t* gate_up;   /* alternating gate / up panels of [I, H] each */
  const uint16_t* down;      /* panels of [H, I] */
  const float* input_norm;   /* [H] */
  const float* post_norm;    /* [H] */
  const float* q_norm;       /* [d] per-head q RMSNorm weight (Qwen3), or NULL */
  const float* k_norm;       /* [d] per-head k RMSNorm weight (Qwen3), or NULL */
  const float* qkv_bias;     /* [(Hq + 2 Hkv) d] bias added to q,k,v before norm / RoPE (Qwen2), or NULL */
} dspark_target_layer;

typedef struct dspark_target_forward_params {
  /* --- model --- */
  int32_t num_layers;        /* >= 1 */
  int32_t hidden_size;       /* H >= 1 */
  int32_t intermediate_size; /* I, a multiple of 16 */
  int32_t num_heads;         /* Hq >= 1 */
  int32_t num_kv_heads;      /* Hkv >= 1, divides Hq */
  int32_t head_dim;          /* d, even, <= 256 */
  int32_t vocab_size;        /* V >= 1 (rows of the LM head) */
  float rms_norm_eps;        /* > 0 */
  const float* inv_freq;     /* [d / 2] RoPE inverse frequencies, scaling (e.g. Llama 3) applied:
                                angle = position * inv_freq[i] */
  const dspark_target_layer* layers; /* [num_layers] */
  const uint16_t* lm_head;   /* panels of [V, H] */
  const float* final_norm;   /* [H] */

  /* --- batch: R requests, T rows; request r owns rows cu_seqlens[r] .. cu_seqlens[r+1]-1 --- */
  int32_t num_requests;      /* R >= 0 */
  int64_t num_rows;          /* T >= 0 */
  const int64_t* cu_seqlens; /* [R + 1] non-decreasing, cu[0] = 0, cu[R] = T */
  const int64_t* slots;      /* [R] distinct cache slots in [0, max_requests) */
  const int64_t* base;       /* [R] cached positions of each request before this call */
  const int64_t* positions;  /* [T] RoPE position of each row */
  float* h;                  /* [T, H] in: embeddings; out: the last layer's output (pre-norm) */

  /* --- KV cache: [num_layers, max_requests, Hkv, max_seq, d] fp32, contiguous --- */
  float* k_cache;
  float* v_cache;
  int64_t max_requests;
  int64_t max_seq;           /* base[r] + rows of r must be <= max_seq */

  /* --- outputs --- */
  int32_t num_feature_layers;      /* F >= 0 */
  const int32_t* feature_layers;   /* [F] layer ids in [0, num_layers): their outputs are copied */
  float* features;                 /* [T, F * H] (layer feature_layers[f] at columns f*H..), or NULL if F = 0 */
  int64_t num_logit_rows;          /* n >= 0 */
  const int64_t* logit_rows;       /* [n] rows in [0, T) that get logits */
  float* logits;                   /* [n, V] fp32, or NULL if n = 0 */

  int32_t num_threads;       /* threads to use, 0 = dspark_set_num_threads' value / all cores */
  int32_t block_attention;   /* 0: causal rows; 1: each row attends to its request's whole block */
} dspark_target_forward_params;

/*
 * Drafter context injection (DFlash's "KV injection"): a DFlash / DSpark drafter's layers see the
 * target's context only through K/V cached from the target's features. For N context rows
 * (request r owns rows cu_seqlens[r] .. cu_seqlens[r+1]-1, at cache positions base[r] + (t - cu[r])):
 *   c     = bf16(rmsnorm(bf16(features[t]) W_fc^T) * context_norm)          (fc, then hidden_norm)
 *   k, v  = c W_{k,v}^T (+ qkv_bias), per layer l: the k and v rows of layers[l].qkv
 *   k     = rmsnorm_per_head(k) * k_norm (Qwen3 only), then rotate-half RoPE at positions[t]
 *   -> layer l's cache, slot slots[r], position base[r] + (t - cu[r]).
 * Context rows bypass the layers' input norm: c is written as is (the drafter's hidden_norm
 * plays that part). Only qkv, k_norm and qkv_bias of each layer are read. Same GEMM rounding as
 * dspark_target_forward_cpu (bf16 inputs, fp32 accumulation, fixed order: a row's K/V do not
 * depend on the other rows). Restrictions: num_heads * head_dim a multiple of 16 (the k rows
 * start a panel), head_dim even and <= 256, fp32 cache.
 */
typedef struct dspark_inject_context_params {
  int32_t num_layers;        /* >= 1 */
  int32_t hidden_size;       /* H >= 1 */
  int32_t num_heads;         /* Hq >= 1; Hq d a multiple of 16 */
  int32_t num_kv_heads;      /* Hkv >= 1, divides Hq */
  int32_t head_dim;          /* d, even, <= 256 */
  float rms_norm_eps;        /* > 0 */
  const float* inv_freq;     /* [d / 2] RoPE inverse frequencies (scaling applied) */
  const dspark_target_layer* layers; /* [num_layers]: qkv panels of [(Hq + 2 Hkv) d, H], k_norm, qkv_bias */
  int64_t feature_size;      /* F >= 1: columns of features (k target layers x H) */
  const uint16_t* fc;        /* panels of [H, F] */
  const float* context_norm; /* [H] */

  int32_t num_requests;      /* R >= 0 */
  int64_t num_rows;          /* N >= 0 */
  const int64_t* cu_seqlens; /* [R + 1] non-decreasing, cu[0] = 0, cu[R] = N */
  const int64_t* slots;      /* [R] distinct cache slots in [0, max_requests) */
  const int64_t* base;       /* [R] cached positions of each request before this call */
  const int64_t* positions;  /* [N] RoPE position of each row */
  const float* features;     /* [N, F] fp32 target features */

  float* k_cache;            /* [num_layers, max_requests, Hkv, max_seq, d] fp32, contiguous */
  float* v_cache;
  int64_t max_requests;
  int64_t max_seq;           /* base[r] + rows of r must be <= max_seq */
  int32_t num_threads;       /* 0 = dspark_set_num_threads' value / all cores */
} dspark_inject_context_params;

/* Appends the context rows' K/V; on error nothing is written (all checks precede the work). */
DSPARK_API dspark_status dspark_inject_context_cpu(const dspark_inject_context_params* params);

/* Elements (uint16) of the panel array of a [n, k] weight (16-row panels of k/2 bf16 pairs). */
DSPARK_API int64_t dspark_target_panel_elements(int64_t n, int64_t k);

/* Runs the forward; on error nothing is written (all checks precede the work). */
DSPARK_API dspark_status dspark_target_forward_cpu(const dspark_target_forward_params* params);

/* Which GEMM micro-kernel this CPU runs: "avx512-bf16", "avx512", "avx2" or "generic". */
DSPARK_API const char* dspark_target_forward_isa(void);

#ifdef __cplusplus
}
#endif

#endif /* DSPARK_TARGET_FORWARD_H_ */
