// Internal: per-element rules of verify_tree and kv_compact shared verbatim by the CPU and CUDA
// kernels (so the CPU tests exercise the arithmetic the GPU runs).
#ifndef DSPARK_DETAIL_TREE_KV_H_
#define DSPARK_DETAIL_TREE_KV_H_

#include "dspark/detail/hd.h"

namespace dspark {
namespace detail {

// Philox purposes of verify_tree (philox.h's RngPurpose owns 0..15); position = local node index.
enum TreeRngPurpose : uint32_t {
  kRngTreeCoin = 16,    // accept coin of the child at that node index
  kRngTreeSample = 17,  // final (correction / bonus) draw at that node index
};

// Multi-draft accept test with one-hot drafts: child token of unnormalised target weight w is
// accepted with probability w / w_rem, w_rem = the weight not yet removed by rejected siblings.
// A zero weight is never accepted (coin == 0 included).
DSPARK_HD bool tree_accept(double coin, double w, double w_rem) { return w > 0.0 && coin * w_rem < w; }

// Parent rule of a node with local index i: the root has -1, every other node an earlier node.
DSPARK_HD bool tree_parent_ok(int64_t i, int64_t parent) { return i == 0 ? parent == -1 : (parent >= 0 && parent < i); }

// Length k of request r's accepted list (prefix of entries >= 0), or -1 if it is invalid: not
// strictly increasing, beyond the capacity or (n >= 0) beyond the verified nodes.
DSPARK_HD int64_t kv_accepted_count(const int64_t* acc, int32_t width, int64_t old_len, int64_t capacity,
                                    int64_t n_verified) {
  if (old_len < 0 || old_len > capacity) return -1;
  int64_t k = 0, prev = -1;
  for (; k < width; ++k) {
    const int64_t a = acc[k];
    if (a < 0) break;
    if (a <= prev || a >= capacity - old_len) return -1;
    if (n_verified >= 0 && a >= n_verified) return -1;
    prev = a;
  }
  return k;
}

// Element offset of (page, position t, head h) given the layout strides (see kv_compact.h).
DSPARK_HD int64_t kv_entry_offset(int64_t page, int64_t t_in_page, int64_t h, int64_t stride_page,
                                  int64_t stride_pos, int64_t stride_head) {
  return page * stride_page + t_in_page * stride_pos + h * stride_head;
}

DSPARK_HD int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace detail
}  // namespace dspark

#endif  // DSPARK_DETAIL_TREE_KV_H_
