/* A C program that links only libdspark_core (no torch, no Python): runs CPU chain verification
 * and checks its result, the error path, and the CUDA entry point of a CPU-only build.
 * Exit status 0 on success; prints "N passed, N failed". */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <dspark/verify_chain.h>

static int passed = 0, failed = 0;
#define CHECK(cond, what)                                   \
  do {                                                      \
    if (cond) {                                             \
      ++passed;                                             \
    } else {                                                \
      ++failed;                                             \
      fprintf(stderr, "FAILED %s (line %d)\n", what, __LINE__); \
    }                                                       \
  } while (0)

enum { V = 5, G = 3 };

int main(void) {
  /* Two requests: r0 has 3 drafts, r1 has 1. Rows: r0 -> 0..3, r1 -> 4..5. */
  const int64_t cu[3] = {0, 4, 6};
  float logits[6][V] = {
      {0, 5, 1, 0, 0}, /* argmax 1 */
      {0, 0, 0, 7, 0}, /* argmax 3 */
      {2, 0, 0, 0, 1}, /* argmax 0 */
      {0, 0, 9, 0, 0}, /* bonus: 2 */
      {1, 0, 0, 0, 3}, /* argmax 4 */
      {0, 8, 0, 0, 0}, /* bonus: 1 */
  };
  const int64_t drafts[4] = {1, 3, 4, /* r1: */ 4}; /* r0 rejects at k=2 (4 != 0) */
  const float temperature[2] = {0.0f, 0.0f};
  int64_t tokens[2][G + 1];
  int64_t accepted[2];
  float accept_prob[4];

  dspark_verify_chain_params p;
  memset(&p, 0, sizeof p);
  p.num_requests = 2;
  p.vocab_size = V;
  p.max_drafts = G;
  p.cu_target_rows = cu;
  p.target_logits = logits;
  p.target_dtype = DSPARK_FLOAT32;
  p.target_row_stride = V;
  p.draft_tokens = drafts;
  p.draft_kind = DSPARK_DRAFT_ONE_HOT;
  p.temperature = temperature;
  p.out_tokens = &tokens[0][0];
  p.out_num_accepted = accepted;
  p.out_accept_prob = accept_prob;

  dspark_status st = dspark_verify_chain_cpu(&p);
  CHECK(st == DSPARK_OK, "greedy call succeeds");
  CHECK(accepted[0] == 2 && accepted[1] == 1, "greedy accepted counts");
  CHECK(tokens[0][0] == 1 && tokens[0][1] == 3 && tokens[0][2] == 0 && tokens[0][3] == -1, "greedy tokens r0");
  CHECK(tokens[1][0] == 4 && tokens[1][1] == 1 && tokens[1][2] == -1, "greedy tokens r1 (bonus)");
  CHECK(accept_prob[0] == 1.0f && accept_prob[2] == 0.0f && accept_prob[3] == 1.0f, "greedy accept_prob");

  /* Sampled: one-hot drafts with overwhelming target mass on them are accepted; the result is a
   * pure function of (seed, offset). */
  const float temp1[2] = {1.0f, 1.0f};
  const int64_t seed[2] = {42, 43}, offset[2] = {0, 0};
  float sharp[6][V];
  for (int i = 0; i < 6; ++i)
    for (int v = 0; v < V; ++v) sharp[i][v] = logits[i][v] * 10.0f;
  const int64_t good_drafts[4] = {1, 3, 0, 4};
  p.target_logits = sharp;
  p.draft_tokens = good_drafts;
  p.temperature = temp1;
  p.seed = seed;
  p.offset = offset;
  st = dspark_verify_chain_cpu(&p);
  CHECK(st == DSPARK_OK, "sampled call succeeds");
  CHECK(accepted[0] == 3 && accepted[1] == 1, "sampled: near-certain drafts accepted");
  CHECK(tokens[0][3] == 2 && tokens[1][1] == 1, "sampled: bonus tokens from near-one-hot rows");
  CHECK(fabsf(accept_prob[0] - 1.0f) < 1e-6f, "sampled accept_prob = p(d) for one-hot drafts");

  /* Errors name the field and leave outputs alone. */
  const int64_t bad_cu[3] = {0, 9, 10}; /* request 0 owns 9 rows > max_drafts + 1 */
  tokens[0][0] = 1234;
  p.cu_target_rows = bad_cu;
  st = dspark_verify_chain_cpu(&p);
  CHECK(st == DSPARK_ERR_INVALID_ARGUMENT, "bad cu_target_rows rejected");
  CHECK(strstr(dspark_last_error(), "cu_target_rows") != NULL, "error names cu_target_rows");
  CHECK(tokens[0][0] == 1234, "outputs untouched on error");
  p.cu_target_rows = cu;
  p.target_dtype = (dspark_dtype)7;
  st = dspark_verify_chain_cpu(&p);
  CHECK(st == DSPARK_ERR_INVALID_ARGUMENT && strstr(dspark_last_error(), "target_dtype") != NULL, "bad dtype named");
  CHECK(dspark_verify_chain_cpu(NULL) == DSPARK_ERR_INVALID_ARGUMENT, "NULL params rejected");
  CHECK(strcmp(dspark_status_string(DSPARK_ERR_CUDA), "DSPARK_ERR_CUDA") == 0, "status names");

  if (!dspark_has_cuda()) {
    p.target_dtype = DSPARK_FLOAT32;
    CHECK(dspark_verify_chain_cuda(&p, NULL) == DSPARK_ERR_UNSUPPORTED, "CPU-only build: CUDA entry says unsupported");
  }
  CHECK(dspark_version() == DSPARK_VERSION_MAJOR * 10000 + DSPARK_VERSION_MINOR * 100 + DSPARK_VERSION_PATCH, "version");

  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
