// CPU kernel of dspark_verify_tree: one request per task; only the rows on the walked path are
// read (each once for greedy, two or three passes for sampling).
#include <algorithm>
#include <new>
#include <string>
#include <vector>

#include "../common/status.h"
#include "../common/verify_tree_check.h"
#include "dspark/detail/philox.h"
#include "dspark/detail/sampling.h"
#include "dspark/detail/tree_kv.h"
#include "dspark/verify_tree.h"
#include "parallel.h"
#include "row_ops.h"

namespace dspark {
namespace cpu {
namespace {

using detail::kNegInf;

struct TreeScratch {
  std::vector<float> trunc;        // truncation_threshold scratch
  std::vector<int64_t> first_child;
  std::vector<int64_t> next_sibling;
  std::vector<int64_t> removed;    // tokens rejected at the current node (sorted when sampling)
};

template <typename T>
struct TreeTask {
  const dspark_verify_tree_params& p;
  TreeScratch& s;

  const T* row(int64_t global) const { return static_cast<const T*>(p.target_logits) + global * p.target_row_stride; }

  float weight(const T* trow, int64_t v, float inv_t, const RowDist& d) const {
    return detail::row_weight(detail::scaled_logit(detail::load_as_float(trow, v), inv_t), d.m, d.thr);
  }

  // Inverse-CDF draw from the row weights with the `removed` tokens (sorted) masked out; the
  // target is u * w_rem. Falls back to the unmasked row when nothing positive remains.
  int64_t sample_masked(const T* trow, float inv_t, const RowDist& d, double w_rem, double u) const {
    const int64_t V = p.vocab_size;
    if (s.removed.empty() || !(w_rem > 0.0)) return sample_from(trow, V, inv_t, d, u);
    std::sort(s.removed.begin(), s.removed.end());
    const std::vector<int64_t>& rm = s.removed;
    const int64_t v = scan_blocks(V, u * w_rem, [&](int64_t v0, int64_t n, float* w) {
      if (d.m == detail::kPosInf) {
        for (int64_t i = 0; i < n; ++i) w[i] = weight(trow, v0 + i, inv_t, d);
      } else {  // branch-free form of row_weight (vectorises)
        for (int64_t i = 0; i < n; ++i) {
          const float sc = detail::scaled_logit(detail::load_as_float(trow, v0 + i), inv_t);
          const float e = detail::exp_nonpos(sc - d.m);
          w[i] = sc >= d.thr ? e : 0.0f;
        }
      }
      // mask the rejected tokens of this block (rm is sorted)
      for (auto it = std::lower_bound(rm.begin(), rm.end(), v0); it != rm.end() && *it < v0 + n; ++it) w[*it - v0] = 0.0f;
    });
    return v >= 0 ? v : sample_from(trow, V, inv_t, d, u);
  }

  void run(int32_t r) {
    const int64_t V = p.vocab_size;
    const int64_t W = static_cast<int64_t>(p.max_depth) + 1;
    int64_t* path = p.out_path + r * W;
    int64_t* toks = p.out_tokens + r * W;
    const int64_t base = p.cu_nodes[r];
    const int64_t n = p.cu_nodes[r + 1] - base;
    const float t = p.temperature[r];
    const bool greedy = detail::is_greedy_temperature(t);
    const float inv_t = detail::inverse_temperature(t);
    const int32_t top_k = detail::effective_top_k(p.top_k, r, p.vocab_size);
    const float top_p = detail::effective_top_p(p.top_p, r);
    const int64_t seed = p.seed ? p.seed[r] : 0;
    const int64_t offset = p.offset ? p.offset[r] : 0;
    const int64_t* parents = p.parents + base;
    const int64_t* tokens = p.tokens + base;

    // children in increasing index: push in decreasing order onto per-node lists
    s.first_child.assign(static_cast<size_t>(n), -1);
    s.next_sibling.assign(static_cast<size_t>(n), -1);
    for (int64_t i = n - 1; i >= 1; --i) {
      const int64_t par = parents[i];
      s.next_sibling[i] = s.first_child[par];
      s.first_child[par] = i;
    }

    int64_t x = 0, k = 0;
    path[0] = 0;
    for (;;) {
      const T* trow = row(base + x);
      if (greedy) {
        const int64_t am = row_argmax(trow, V);
        if (am < 0) break;  // no finite logit: nothing to emit
        int64_t next = -1;
        for (int64_t c = s.first_child[x]; c >= 0; c = s.next_sibling[c])
          if (tokens[c] == am) {
            next = c;
            break;
          }
        toks[k] = am;
        if (next < 0) break;
        x = next;
        path[++k] = x;
        continue;
      }
      const float thr = (top_k > 0 || top_p < 1.0f)
                            ? truncation_threshold(trow, V, inv_t, top_k, top_p, s.trunc)
                            : kNegInf;
      const RowDist d = row_distribution(trow, V, inv_t, thr);
      if (!d.valid) break;
      s.removed.clear();
      double w_rem = d.sum;
      int64_t next = -1;
      for (int64_t c = s.first_child[x]; c >= 0; c = s.next_sibling[c]) {
        const int64_t tok = tokens[c];
        if (tok < 0 || tok >= V) continue;
        if (std::find(s.removed.begin(), s.removed.end(), tok) != s.removed.end()) continue;
        const double w = weight(trow, tok, inv_t, d);
        const double coin = detail::philox_uniform(seed, offset, static_cast<uint32_t>(c), detail::kRngTreeCoin);
        if (detail::tree_accept(coin, w, w_rem)) {
          next = c;
          break;
        }
        s.removed.push_back(tok);
        w_rem -= w;
      }
      if (next >= 0) {
        toks[k] = tokens[next];
        x = next;
        path[++k] = x;
        continue;
      }
      const double u = detail::philox_uniform(seed, offset, static_cast<uint32_t>(x), detail::kRngTreeSample);
      toks[k] = sample_masked(trow, inv_t, d, w_rem, u);
      break;
    }
    p.out_num_accepted[r] = k;
  }
};

template <typename T>
void run_requests(const dspark_verify_tree_params& p) {
  const double cost = static_cast<double>(p.vocab_size) * 3.0 * (p.max_depth + 1);
  parallel_for(p.num_requests, cost, [&](int64_t b, int64_t e) {
    TreeScratch scratch;
    TreeTask<T> task{p, scratch};
    for (int64_t r = b; r < e; ++r) task.run(static_cast<int32_t>(r));
  });
}

bool valid_dtype(dspark_dtype d) { return d == DSPARK_FLOAT32 || d == DSPARK_FLOAT16 || d == DSPARK_BFLOAT16; }

}  // namespace
}  // namespace cpu

// Host-side checks shared by both entry points (no device data read).
dspark_status check_verify_tree_params(const dspark_verify_tree_params* p) {
  DSPARK_CHECK_ARG(p != nullptr, "verify_tree: params is NULL");
  DSPARK_CHECK_ARG(p->num_requests >= 0, "verify_tree: num_requests must be >= 0");
  if (p->num_requests == 0) return DSPARK_OK;
  DSPARK_CHECK_ARG(p->vocab_size >= 1, "verify_tree: vocab_size must be >= 1");
  DSPARK_CHECK_ARG(p->max_nodes >= 1, "verify_tree: max_nodes must be >= 1");
  DSPARK_CHECK_ARG(p->max_depth >= 0 && p->max_depth < p->max_nodes,
                   "verify_tree: max_depth must be in [0, max_nodes - 1]");
  DSPARK_CHECK_ARG(p->num_nodes >= p->num_requests, "verify_tree: num_nodes must be >= num_requests");
  DSPARK_CHECK_ARG(p->cu_nodes != nullptr, "verify_tree: cu_nodes is NULL (expected [R+1] int64)");
  DSPARK_CHECK_ARG(p->parents != nullptr, "verify_tree: parents is NULL (expected [N] int64)");
  DSPARK_CHECK_ARG(p->tokens != nullptr, "verify_tree: tokens is NULL (expected [N] int64)");
  DSPARK_CHECK_ARG(p->target_logits != nullptr, "verify_tree: target_logits is NULL (expected [N, V])");
  DSPARK_CHECK_ARG(cpu::valid_dtype(p->target_dtype), "verify_tree: target_dtype must be FLOAT32, FLOAT16 or BFLOAT16");
  DSPARK_CHECK_ARG(p->target_row_stride >= p->vocab_size, "verify_tree: target_row_stride must be >= vocab_size");
  DSPARK_CHECK_ARG(p->temperature != nullptr, "verify_tree: temperature is NULL (expected [R] float32)");
  DSPARK_CHECK_ARG(p->out_path != nullptr, "verify_tree: out_path is NULL (expected [R, max_depth + 1] int64)");
  DSPARK_CHECK_ARG(p->out_tokens != nullptr, "verify_tree: out_tokens is NULL (expected [R, max_depth + 1] int64)");
  DSPARK_CHECK_ARG(p->out_num_accepted != nullptr, "verify_tree: out_num_accepted is NULL (expected [R] int64)");
  DSPARK_CHECK_ARG((p->seed == nullptr) == (p->offset == nullptr),
                   "verify_tree: seed and offset must both be given or both be NULL");
  return DSPARK_OK;
}

}  // namespace dspark

extern "C" dspark_status dspark_verify_tree_cpu(const dspark_verify_tree_params* params) {
  using namespace dspark;
  clear_error();
  const dspark_status st = check_verify_tree_params(params);
  if (st != DSPARK_OK || params->num_requests == 0) return st;
  const dspark_verify_tree_params& p = *params;
  if (p.cu_nodes[0] != 0) return fail(DSPARK_ERR_INVALID_ARGUMENT, "verify_tree: cu_nodes[0] must be 0");
  std::vector<int32_t> depth;
  for (int32_t r = 0; r < p.num_requests; ++r) {
    const int64_t base = p.cu_nodes[r], n = p.cu_nodes[r + 1] - base;
    if (p.cu_nodes[r + 1] > p.num_nodes)
      return fail(DSPARK_ERR_INVALID_ARGUMENT, "verify_tree: cu_nodes[" + std::to_string(r + 1) + "] = " +
                                                   std::to_string(p.cu_nodes[r + 1]) + " exceeds num_nodes = " +
                                                   std::to_string(p.num_nodes));
    if (n < 1 || n > p.max_nodes)
      return fail(DSPARK_ERR_INVALID_ARGUMENT, "verify_tree: request " + std::to_string(r) + " has " +
                                                   std::to_string(n) + " nodes (cu_nodes), expected 1.." +
                                                   std::to_string(p.max_nodes) + " (max_nodes)");
    depth.assign(static_cast<size_t>(n), 0);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t par = p.parents[base + i];
      if (!detail::tree_parent_ok(i, par))
        return fail(DSPARK_ERR_INVALID_ARGUMENT,
                    "verify_tree: parents of request " + std::to_string(r) + ", node " + std::to_string(i) + " is " +
                        std::to_string(par) +
                        (i == 0 ? "; the root (node 0) must have parent -1"
                                : "; expected 0 <= parent < node index (parents before children, no cycles)"));
      if (i > 0) {
        depth[i] = depth[par] + 1;
        if (depth[i] > p.max_depth)
          return fail(DSPARK_ERR_INVALID_ARGUMENT, "verify_tree: parents of request " + std::to_string(r) +
                                                       " make node " + std::to_string(i) + " deeper than max_depth = " +
                                                       std::to_string(p.max_depth));
      }
    }
  }
  const int64_t W = static_cast<int64_t>(p.max_depth) + 1;
  std::fill(p.out_path, p.out_path + p.num_requests * W, int64_t{-1});
  std::fill(p.out_tokens, p.out_tokens + p.num_requests * W, int64_t{-1});
  try {
    switch (p.target_dtype) {
      case DSPARK_FLOAT32: cpu::run_requests<float>(p); break;
      case DSPARK_BFLOAT16: cpu::run_requests<detail::bf16_t>(p); break;
      case DSPARK_FLOAT16: cpu::run_requests<detail::fp16_t>(p); break;
    }
  } catch (const std::bad_alloc&) {
    return fail(DSPARK_ERR_OUT_OF_MEMORY, "verify_tree: out of host memory for scratch");
  } catch (const std::exception& e) {
    return fail(DSPARK_ERR_INTERNAL, std::string("verify_tree: ") + e.what());
  }
  return DSPARK_OK;
}

#ifndef DSPARK_WITH_CUDA
extern "C" dspark_status dspark_verify_tree_cuda(const dspark_verify_tree_params*, void*) {
  return dspark::fail(DSPARK_ERR_UNSUPPORTED, "verify_tree: this build of libdspark_core has no CUDA kernels");
}
#endif
