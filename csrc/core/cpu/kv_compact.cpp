// CPU kernel of dspark_kv_compact: every request is validated first (nothing is written on a bad
// call), then (layer, K/V, request) tasks move their entries in increasing order with memcpy.
#include <algorithm>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "../common/status.h"
#include "../common/verify_tree_check.h"
#include "dspark/detail/tree_kv.h"
#include "dspark/kv_compact.h"
#include "parallel.h"

namespace dspark {

dspark_status check_kv_compact_params(const dspark_kv_compact_params* p) {
  DSPARK_CHECK_ARG(p != nullptr, "kv_compact: params is NULL");
  DSPARK_CHECK_ARG(p->num_requests >= 0, "kv_compact: num_requests must be >= 0");
  if (p->num_requests == 0) return DSPARK_OK;
  DSPARK_CHECK_ARG(p->old_lengths != nullptr, "kv_compact: old_lengths is NULL (expected [R] int64)");
  DSPARK_CHECK_ARG(p->out_new_lengths != nullptr, "kv_compact: out_new_lengths is NULL (expected [R] int64)");
  DSPARK_CHECK_ARG(p->out_new_lengths != p->old_lengths, "kv_compact: out_new_lengths must not alias old_lengths");
  DSPARK_CHECK_ARG(p->capacity >= 0, "kv_compact: capacity must be >= 0");
  if (p->accepted == nullptr) {
    DSPARK_CHECK_ARG(p->num_kept != nullptr, "kv_compact: accepted and num_kept are both NULL (one is needed)");
    return DSPARK_OK;  // length-only mode touches no cache memory
  }
  DSPARK_CHECK_ARG(p->accepted_width >= 0, "kv_compact: accepted_width must be >= 0");
  DSPARK_CHECK_ARG(p->num_layers >= 1, "kv_compact: num_layers must be >= 1");
  DSPARK_CHECK_ARG(p->num_heads >= 1, "kv_compact: num_heads must be >= 1");
  DSPARK_CHECK_ARG(p->head_dim >= 1, "kv_compact: head_dim must be >= 1");
  DSPARK_CHECK_ARG(p->element_bytes == 1 || p->element_bytes == 2 || p->element_bytes == 4 || p->element_bytes == 8,
                   "kv_compact: element_bytes must be 1, 2, 4 or 8");
  DSPARK_CHECK_ARG(p->k_layers != nullptr, "kv_compact: k_layers is NULL (expected a host array of num_layers pointers)");
  for (int32_t l = 0; l < p->num_layers; ++l) {
    DSPARK_CHECK_ARG(p->k_layers[l] != nullptr, "kv_compact: k_layers[" + std::to_string(l) + "] is NULL");
    if (p->v_layers) DSPARK_CHECK_ARG(p->v_layers[l] != nullptr, "kv_compact: v_layers[" + std::to_string(l) + "] is NULL");
  }
  DSPARK_CHECK_ARG(p->num_pages >= 1, "kv_compact: num_pages must be >= 1");
  if (p->block_table != nullptr) {
    DSPARK_CHECK_ARG(p->page_size >= 1, "kv_compact: page_size must be >= 1 for the paged layout");
    DSPARK_CHECK_ARG(p->block_table_stride >= 1, "kv_compact: block_table_stride must be >= 1");
    DSPARK_CHECK_ARG(p->capacity <= p->block_table_stride * p->page_size,
                     "kv_compact: capacity exceeds block_table_stride * page_size");
  }
  return DSPARK_OK;
}

namespace cpu {
namespace {

int64_t page_of(const dspark_kv_compact_params& p, int32_t r, int64_t t, int64_t* t_in_page) {
  if (p.block_table == nullptr) {
    *t_in_page = t;
    return p.slots ? p.slots[r] : r;
  }
  *t_in_page = t % p.page_size;
  return p.block_table[r * p.block_table_stride + t / p.page_size];
}

}  // namespace
}  // namespace cpu
}  // namespace dspark

extern "C" dspark_status dspark_kv_compact_cpu(const dspark_kv_compact_params* params) {
  using namespace dspark;
  clear_error();
  const dspark_status st = check_kv_compact_params(params);
  if (st != DSPARK_OK || params->num_requests == 0) return st;
  const dspark_kv_compact_params& p = *params;
  const int32_t R = p.num_requests;
  std::vector<int64_t> count;
  try {
    count.resize(R);
  } catch (const std::bad_alloc&) {
    return fail(DSPARK_ERR_OUT_OF_MEMORY, "kv_compact: out of host memory");
  }
  const std::string req = "kv_compact: request ";
  for (int32_t r = 0; r < R; ++r) {
    const int64_t old = p.old_lengths[r];
    if (old < 0 || old > p.capacity)
      return fail(DSPARK_ERR_INVALID_ARGUMENT, req + std::to_string(r) + ": old_lengths = " + std::to_string(old) +
                                                   " outside [0, capacity = " + std::to_string(p.capacity) + "]");
    if (p.accepted == nullptr) {
      const int64_t k = p.num_kept[r];
      if (k < 0 || k > p.capacity - old)
        return fail(DSPARK_ERR_INVALID_ARGUMENT, req + std::to_string(r) + ": num_kept = " + std::to_string(k) +
                                                     " outside [0, capacity - old_length = " +
                                                     std::to_string(p.capacity - old) + "]");
      count[r] = k;
      continue;
    }
    const int64_t nv = p.num_verified ? p.num_verified[r] : -1;
    const int64_t* acc = p.accepted + static_cast<int64_t>(r) * p.accepted_width;
    const int64_t k = detail::kv_accepted_count(acc, p.accepted_width, old, p.capacity, nv);
    if (k < 0)
      return fail(DSPARK_ERR_INVALID_ARGUMENT,
                  req + std::to_string(r) +
                      ": accepted indices must be strictly increasing, < capacity - old_length (" +
                      std::to_string(p.capacity - old) + ")" +
                      (nv >= 0 ? " and < num_verified (" + std::to_string(nv) + ")" : std::string()) +
                      " (the list ends at the first negative entry)");
    count[r] = k;
    if (p.block_table == nullptr) {
      const int64_t slot = p.slots ? p.slots[r] : r;
      if (slot < 0 || slot >= p.num_pages)
        return fail(DSPARK_ERR_INVALID_ARGUMENT, req + std::to_string(r) + ": slots = " + std::to_string(slot) +
                                                     " outside [0, " + std::to_string(p.num_pages) + ")");
    } else {
      for (int64_t j = 0; j < k; ++j) {
        if (acc[j] == j) continue;
        for (int64_t t : {old + j, old + acc[j]}) {
          const int64_t pg = p.block_table[r * p.block_table_stride + t / p.page_size];
          if (pg < 0 || pg >= p.num_pages)
            return fail(DSPARK_ERR_INVALID_ARGUMENT,
                        req + std::to_string(r) + ": block_table[" + std::to_string(r) + ", " +
                            std::to_string(t / p.page_size) + "] = " + std::to_string(pg) +
                            " points outside the page pool [0, " + std::to_string(p.num_pages) + ")");
        }
      }
    }
  }
  if (p.accepted != nullptr && p.block_table == nullptr && p.slots != nullptr) {
    std::vector<int64_t> s(p.slots, p.slots + R);
    std::sort(s.begin(), s.end());
    if (std::adjacent_find(s.begin(), s.end()) != s.end())
      return fail(DSPARK_ERR_INVALID_ARGUMENT, "kv_compact: slots must be distinct (two requests share a cache slot)");
  }

  if (p.accepted != nullptr) {
    const int32_t kinds = p.v_layers ? 2 : 1;
    const int64_t items = static_cast<int64_t>(p.num_layers) * kinds * R;
    const size_t head_bytes = static_cast<size_t>(p.head_dim) * p.element_bytes;
    const bool fused_heads = p.stride_head == p.head_dim;  // heads adjacent: one copy per entry
    double moved = 0;
    for (int32_t r = 0; r < R; ++r) moved += static_cast<double>(count[r]);
    const double cost = (moved / R + 1) * p.num_heads * p.head_dim * p.element_bytes / 4.0;
    cpu::parallel_for(items, cost, [&](int64_t b, int64_t e) {
      // Each entry is a few hundred bytes at a random place: the copies are latency bound, so the
      // lines of the next item are prefetched while the current one is copied.
      auto for_each_move = [&](int64_t it, auto&& fn) {
        const int32_t r = static_cast<int32_t>(it % R);
        const int64_t lk = it / R;
        const int32_t l = static_cast<int32_t>(lk / kinds);
        char* layer = static_cast<char*>(lk % kinds == 0 ? p.k_layers[l] : p.v_layers[l]);
        const int64_t old = p.old_lengths[r];
        const int64_t* acc = p.accepted + static_cast<int64_t>(r) * p.accepted_width;
        for (int64_t j = 0; j < count[r]; ++j) {
          if (acc[j] == j) continue;
          int64_t ts, td;
          const int64_t ps = cpu::page_of(p, r, old + acc[j], &ts);
          const int64_t pd = cpu::page_of(p, r, old + j, &td);
          const int64_t so = detail::kv_entry_offset(ps, ts, 0, p.stride_page, p.stride_pos, p.stride_head);
          const int64_t dof = detail::kv_entry_offset(pd, td, 0, p.stride_page, p.stride_pos, p.stride_head);
          fn(layer, so, dof);
        }
      };
      auto prefetch = [&](char* layer, int64_t so, int64_t dof) {
        for (int32_t h = 0; h < (fused_heads ? 1 : p.num_heads); ++h) {
          const char* src = layer + (so + h * p.stride_head) * p.element_bytes;
          char* dst = layer + (dof + h * p.stride_head) * p.element_bytes;
          const size_t nb = fused_heads ? head_bytes * p.num_heads : head_bytes;
          for (size_t o = 0; o < nb; o += 64) {
            __builtin_prefetch(src + o, 0);
            __builtin_prefetch(dst + o, 1);
          }
        }
      };
      constexpr int64_t kAhead = 2;  // items prefetched ahead of the one being copied
      for (int64_t it = b; it < std::min(e, b + kAhead); ++it) for_each_move(it, prefetch);
      for (int64_t it = b; it < e; ++it) {
        if (it + kAhead < e) for_each_move(it + kAhead, prefetch);
        const int32_t r = static_cast<int32_t>(it % R);
        const int64_t lk = it / R;
        const int32_t l = static_cast<int32_t>(lk / kinds);
        char* layer = static_cast<char*>(lk % kinds == 0 ? p.k_layers[l] : p.v_layers[l]);
        const int64_t old = p.old_lengths[r];
        const int64_t* acc = p.accepted + static_cast<int64_t>(r) * p.accepted_width;
        for (int64_t j = 0; j < count[r]; ++j) {
          if (acc[j] == j) continue;
          int64_t ts, td;
          const int64_t ps = cpu::page_of(p, r, old + acc[j], &ts);
          const int64_t pd = cpu::page_of(p, r, old + j, &td);
          const int64_t so = detail::kv_entry_offset(ps, ts, 0, p.stride_page, p.stride_pos, p.stride_head);
          const int64_t dof = detail::kv_entry_offset(pd, td, 0, p.stride_page, p.stride_pos, p.stride_head);
          if (fused_heads) {
            std::memmove(layer + dof * p.element_bytes, layer + so * p.element_bytes, head_bytes * p.num_heads);
          } else {
            for (int32_t h = 0; h < p.num_heads; ++h)
              std::memmove(layer + (dof + h * p.stride_head) * p.element_bytes,
                           layer + (so + h * p.stride_head) * p.element_bytes, head_bytes);
          }
        }
      }
    });
  }
  for (int32_t r = 0; r < R; ++r) {
    const int64_t nl = p.old_lengths[r] + count[r];
    p.out_new_lengths[r] = nl;
    if (p.out_free_from) p.out_free_from[r] = p.block_table && p.num_verified ? detail::ceil_div64(nl, p.page_size) : 0;
    if (p.out_num_freed) {
      int64_t freed = 0;
      if (p.block_table && p.num_verified) {
        const int64_t used = detail::ceil_div64(std::min(p.capacity, p.old_lengths[r] + std::max<int64_t>(p.num_verified[r], 0)), p.page_size);
        freed = std::max<int64_t>(0, used - detail::ceil_div64(nl, p.page_size));
      }
      p.out_num_freed[r] = freed;
    }
  }
  return DSPARK_OK;
}

#ifndef DSPARK_WITH_CUDA
extern "C" dspark_status dspark_kv_compact_cuda(const dspark_kv_compact_params*, void*) {
  return dspark::fail(DSPARK_ERR_UNSUPPORTED, "kv_compact: this build of libdspark_core has no CUDA kernels");
}
#endif
