/* A C program that links only libdspark_core (no torch, no Python): greedy tree verification, its
 * hostile-input error, and kv_compact on a contiguous cache (including a rejected bad call that
 * writes nothing). Exit status 0 on success; prints "N passed, N failed".
 * Built and run by tests/test_kv_compact.py::test_c_api_program (cc + the built libdspark_core). */
#include <stdio.h>
#include <string.h>

#include <dspark/kv_compact.h>
#include <dspark/verify_tree.h>

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

enum { V = 4, N = 4 };

int main(void) {
  /* tree: 0 -> {1 (tok 2), 2 (tok 1)}, 2 -> {3 (tok 3)}; argmax row0 = 1, row2 = 3, row3 = 0 */
  const int64_t cu[2] = {0, N};
  const int64_t parents[N] = {-1, 0, 0, 2};
  const int64_t tokens[N] = {0, 2, 1, 3};
  const float logits[N][V] = {{0, 5, 1, 0}, {1, 0, 0, 0}, {0, 0, 0, 4}, {6, 0, 0, 0}};
  const float temperature[1] = {0.0f};
  int64_t path[N], toks[N], acc[1];
  dspark_verify_tree_params p;
  memset(&p, 0, sizeof p);
  p.num_requests = 1;
  p.vocab_size = V;
  p.max_nodes = N;
  p.max_depth = N - 1;
  p.num_nodes = N;
  p.cu_nodes = cu;
  p.parents = parents;
  p.tokens = tokens;
  p.target_logits = logits;
  p.target_dtype = DSPARK_FLOAT32;
  p.target_row_stride = V;
  p.temperature = temperature;
  p.out_path = path;
  p.out_tokens = toks;
  p.out_num_accepted = acc;
  CHECK(dspark_verify_tree_cpu(&p) == DSPARK_OK, "verify_tree ok");
  CHECK(acc[0] == 2 && path[0] == 0 && path[1] == 2 && path[2] == 3 && path[3] == -1, "greedy path");
  CHECK(toks[0] == 1 && toks[1] == 3 && toks[2] == 0 && toks[3] == -1, "greedy tokens");
  {
    const int64_t bad[N] = {-1, 0, 3, 2}; /* node 2's parent comes after it */
    p.parents = bad;
    CHECK(dspark_verify_tree_cpu(&p) == DSPARK_ERR_INVALID_ARGUMENT, "bad parents rejected");
    CHECK(strstr(dspark_last_error(), "parents") != NULL, "error names parents");
    p.parents = parents;
  }
#ifndef DSPARK_EXPECT_CUDA
  CHECK(dspark_has_cuda() || dspark_verify_tree_cuda(&p, NULL) == DSPARK_ERR_UNSUPPORTED, "cuda stub");
#endif

  /* kv_compact: 1 layer, 2 slots, 1 head, 8 positions, head_dim 2 (float) */
  float k[2][1][8][2], v[2][1][8][2];
  for (int s = 0; s < 2; ++s)
    for (int t = 0; t < 8; ++t)
      for (int e = 0; e < 2; ++e) {
        k[s][0][t][e] = (float)(100 * s + 10 * t + e);
        v[s][0][t][e] = -(float)(100 * s + 10 * t + e);
      }
  void* kl[1] = {k};
  void* vl[1] = {v};
  const int64_t old[1] = {2};
  const int64_t accepted[1][4] = {{0, 2, 3, -1}}; /* keep nodes 0, 2, 3 of slot 1 */
  const int64_t slots[1] = {1};
  int64_t new_len[1] = {0};
  dspark_kv_compact_params q;
  memset(&q, 0, sizeof q);
  q.num_requests = 1;
  q.num_layers = 1;
  q.num_heads = 1;
  q.head_dim = 2;
  q.element_bytes = 4;
  q.k_layers = kl;
  q.v_layers = vl;
  q.stride_page = 8 * 2;
  q.stride_pos = 2;
  q.stride_head = 8 * 2;
  q.capacity = 8;
  q.num_pages = 2;
  q.slots = slots;
  q.old_lengths = old;
  q.accepted = &accepted[0][0];
  q.accepted_width = 4;
  q.out_new_lengths = new_len;
  CHECK(dspark_kv_compact_cpu(&q) == DSPARK_OK, "kv_compact ok");
  CHECK(new_len[0] == 5, "new length");
  CHECK(k[1][0][3][0] == 140.0f && k[1][0][4][1] == 151.0f && v[1][0][3][0] == -140.0f, "moved entries");
  CHECK(k[1][0][2][0] == 120.0f && k[0][0][3][0] == 30.0f, "untouched entries");
  {
    const int64_t bad[1][4] = {{0, 3, 2, -1}};
    float before = k[1][0][2][0];
    q.accepted = &bad[0][0];
    CHECK(dspark_kv_compact_cpu(&q) == DSPARK_ERR_INVALID_ARGUMENT, "non-increasing rejected");
    CHECK(strstr(dspark_last_error(), "accepted") != NULL, "error names accepted");
    CHECK(k[1][0][2][0] == before, "nothing written on error");
  }
  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
