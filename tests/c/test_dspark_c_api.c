/* A C program that links only libdspark_core (no torch, no Python): runs the CPU dspark_draft
 * (greedy, vanilla Markov head with a confidence head) and schedule_prefix (paper Appendix A's
 * numbers) and checks their results, the error paths naming the field, and the CUDA entry points
 * of a CPU-only build. Exit status 0 on success; prints "N passed, N failed". */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <dspark/dspark_draft.h>
#include <dspark/schedule_prefix.h>

static int passed = 0, failed = 0;
#define CHECK(cond, what)                                       \
  do {                                                          \
    if (cond) {                                                 \
      ++passed;                                                 \
    } else {                                                    \
      ++failed;                                                 \
      fprintf(stderr, "FAILED %s (line %d)\n", what, __LINE__); \
    }                                                           \
  } while (0)

enum { V = 4, G = 2, RK = 2, D = 1 };

int main(void) {
  /* W1 rows: token t -> (t == 1, t == 2); W2 rows: token v gets 10 * x_0 (v == 3) or 10 * x_1 (v == 0).
   * U prefers token 2 at position 0 and token 1 at position 1 unless the bias says otherwise. */
  const float w1[V][RK] = {{0, 0}, {1, 0}, {0, 1}, {0, 0}};
  const float w2[V][RK] = {{0, 10}, {0, 0}, {0, 0}, {10, 0}};
  const float U[1][G][V] = {{{0, 1, 2, 0}, {0, 1, 0, 0}}};
  const float h[1][G][D] = {{{0.5f}, {-0.5f}}};
  const float conf_w[D + RK] = {1.0f, 0.0f, 2.0f};
  const float conf_b[1] = {0.25f};
  const int64_t anchor[1] = {1};
  const float temperature[1] = {0.0f};
  int64_t tokens[1][G];
  float logits[1][G][V];
  float conf[1][G];

  dspark_dspark_draft_params p;
  memset(&p, 0, sizeof p);
  p.num_requests = 1;
  p.num_positions = G;
  p.vocab_size = V;
  p.hidden_size = D;
  p.rank = RK;
  p.head_type = DSPARK_MARKOV_VANILLA;
  p.base_logits = U;
  p.logits_dtype = DSPARK_FLOAT32;
  p.hidden = h;
  p.hidden_dtype = DSPARK_FLOAT32;
  p.anchor_tokens = anchor;
  p.weight_dtype = DSPARK_FLOAT32;
  p.markov_w1 = w1;
  p.markov_w2 = w2;
  p.conf_weight = conf_w;
  p.conf_bias = conf_b;
  p.conf_with_markov = 1;
  p.temperature = temperature;
  p.out_tokens = &tokens[0][0];
  p.out_logits = &logits[0][0][0];
  p.out_confidence = &conf[0][0];
  CHECK(dspark_dspark_draft_cpu(&p) == DSPARK_OK, "dspark_draft ok");
  /* k = 0: prev = 1 -> e = (1, 0) -> bias on token 3 = 10 -> d_0 = 3; k = 1: prev = 3 -> e = 0 -> d_1 = 1 */
  CHECK(tokens[0][0] == 3 && tokens[0][1] == 1, "greedy drafts");
  CHECK(fabsf(logits[0][0][3] - 10.0f) < 1e-6f && fabsf(logits[0][1][1] - 1.0f) < 1e-6f, "q rows");
  CHECK(fabsf(conf[0][0] - 1.0f / (1.0f + expf(-(0.5f + 0.25f)))) < 1e-6f, "c_0 = sigmoid(h + b)");
  CHECK(fabsf(conf[0][1] - 1.0f / (1.0f + expf(-(-0.5f + 0.25f)))) < 1e-6f, "c_1 (prev 3: no Markov term)");

  const int64_t bad_anchor[1] = {V};
  p.anchor_tokens = bad_anchor;
  CHECK(dspark_dspark_draft_cpu(&p) == DSPARK_ERR_INVALID_ARGUMENT, "anchor out of range rejected");
  CHECK(strstr(dspark_last_error(), "anchor_tokens") != NULL, "error names anchor_tokens");
  p.anchor_tokens = anchor;
  p.markov_w2 = NULL;
  CHECK(dspark_dspark_draft_cpu(&p) == DSPARK_ERR_INVALID_ARGUMENT, "NULL markov_w2 rejected");
  CHECK(strstr(dspark_last_error(), "markov_w2") != NULL, "error names markov_w2");
  p.markov_w2 = w2;
  CHECK(dspark_dspark_draft_cuda(&p, NULL) == DSPARK_ERR_UNSUPPORTED || dspark_has_cuda(), "CUDA stub");

  /* schedule_prefix: Appendix A, c = (0.8, 0.9), SPS = (1, 0.5, 0.45) */
  const float c[2] = {0.8f, 0.9f};
  const float sps[3] = {1.0f, 0.5f, 0.45f};
  int64_t len[1] = {-1};
  float thr[2];
  dspark_schedule_prefix_params s;
  memset(&s, 0, sizeof s);
  s.num_requests = 1;
  s.num_positions = 2;
  s.confidences = c;
  s.sps_table = sps;
  s.sps_len = 3;
  s.mode = DSPARK_SCHEDULE_CAUSAL;
  s.out_lengths = len;
  s.out_throughput = thr;
  CHECK(dspark_schedule_prefix_cpu(&s) == DSPARK_OK && len[0] == 0, "causal stops at l = 0");
  s.mode = DSPARK_SCHEDULE_GLOBAL;
  CHECK(dspark_schedule_prefix_cpu(&s) == DSPARK_OK && len[0] == 2, "global search picks l = 2");
  CHECK(fabsf(thr[0] - 1.134f) < 1e-5f, "theta of l = 2");
  s.sps_len = 2;
  CHECK(dspark_schedule_prefix_cpu(&s) == DSPARK_ERR_INVALID_ARGUMENT, "short table rejected");
  CHECK(strstr(dspark_last_error(), "sps_table") != NULL, "error names sps_table");
  s.sps_len = 3;
  const float nan_c[2] = {0.8f, NAN};
  s.confidences = nan_c;
  CHECK(dspark_schedule_prefix_cpu(&s) == DSPARK_ERR_INVALID_ARGUMENT, "NaN confidence rejected");
  CHECK(strstr(dspark_last_error(), "confidences") != NULL, "error names confidences");

  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
