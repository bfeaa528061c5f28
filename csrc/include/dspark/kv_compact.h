/*
 * dspark/kv_compact.h: after verification, keep the KV entries of the accepted positions of each
 * request, moved to contiguous slots starting at the request's old length, for every layer (K and
 * V) in one call / one kernel launch; return the new lengths.
 *
 * Positions. Request r (0 <= r < R) had old_lengths[r] = L_r cached positions before the verify
 * forward, which appended its n_r verified nodes (tree nodes or chain positions, node 0 = the
 * anchor) at positions L_r .. L_r + n_r - 1. accepted[r, :] lists the LOCAL node indices to keep
 * (e.g. dspark_verify_tree's out_path, or 0..a_r for a chain), -1 padded: the list is the prefix
 * of entries >= 0 (everything from the first negative entry on is ignored); k_r = its length.
 * The op moves, for j = 0 .. k_r - 1 in increasing order, the entry at position L_r + accepted[r,j]
 * to position L_r + j (skipped when they are equal), in every layer, head and of K and V, and sets
 * new_lengths[r] = L_r + k_r. Entries at positions >= new_lengths[r] are left as the moves leave
 * them (stale data). Nothing outside request r's positions L_r .. L_r + max accepted index is
 * written; other requests' entries are untouched.
 *
 * Call once per verification: moving the same list twice moves already-moved data again (only an
 * identity prefix 0..k-1, i.e. a chain, is idempotent).
 *
 * In-place safety: accepted indices must be strictly increasing, so accepted[r, j] >= j, every
 * source position is >= its destination, and no move overwrites a source a later move still reads
 * (destination L_r + j < L_r + j + 1 <= L_r + accepted[r, j']) for j' > j). The kernels rely on
 * this (CUDA: each thread moves its columns for j = 0, 1, ... in order).
 *
 * Validity per request (the contract): 0 <= L_r; accepted strictly increasing; L_r + accepted[r,j]
 * < capacity (max_seq, or pages_per_request * page_size when paged); accepted[r, j] < n_r when
 * num_verified is given; paged: every block-table entry that is touched lies in [0, num_pages).
 * CPU: a violation fails the call (DSPARK_ERR_INVALID_ARGUMENT naming `accepted`, `old_lengths`
 * or `block_table` and the request), nothing is written. CUDA: the offending request is left
 * untouched and new_lengths[r] = -1 (a value no valid call produces).
 *
 * Length-only mode (chains): with accepted == NULL, nothing moves (a chain's kept entries are
 * already in place) and new_lengths[r] = L_r + num_kept[r] (num_kept[r] in [0, capacity - L_r],
 * else invalid as above).
 *
 * Layouts. Entry (layer l, request r, position t, head h, element e) of K lives at
 *   k_layers[l] + (page * stride_page + (t % P) * stride_pos + h * stride_head + e) * element_bytes
 * where, contiguous (block_table == NULL): page = slots ? slots[r] : r, P = capacity (one "page" per
 * request slot, e.g. a [max_requests, heads, max_seq, head_dim] layer: stride_page = heads*max_seq*
 * head_dim, stride_pos = head_dim, stride_head = max_seq*head_dim); paged: page = block_table[r *
 * block_table_stride + t / P], P = page_size (e.g. a [num_pages, page_size, heads, head_dim] layer).
 * V uses v_layers with the same strides. Copies are bitwise: only element_bytes matters.
 *
 * Freed pages (paged only, when num_verified is given): the request used pages 0 ..
 * ceil((L_r + n_r) / P) - 1 of its block-table row and needs 0 .. ceil(new_length / P) - 1
 * afterwards: out_free_from[r] = ceil(new_length / P) and out_num_freed[r] = the difference (>= 0),
 * i.e. block_table[r, free_from .. free_from + num_freed - 1] became free.
 */
#ifndef DSPARK_KV_COMPACT_H_
#define DSPARK_KV_COMPACT_H_

#include "dspark/common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Largest num_layers the CUDA entry point accepts (layer pointers travel as kernel arguments). */
#define DSPARK_KV_COMPACT_CUDA_MAX_LAYERS 128

typedef struct dspark_kv_compact_params {
  /* --- sizes --- */
  int32_t num_requests;  /* R >= 0 (0 is a no-op) */
  int32_t num_layers;    /* L >= 1 */
  int32_t num_heads;     /* H >= 1 KV heads */
  int32_t head_dim;      /* elements per head >= 1 (contiguous) */
  int32_t element_bytes; /* 1, 2, 4 or 8 */

  /* --- cache --- */
  void* const* k_layers;    /* [L] HOST array of layer base pointers (device pointers for CUDA) */
  void* const* v_layers;    /* [L] host array, or NULL (no V cache, e.g. MLA) */
  int64_t stride_page;      /* elements between pages (contiguous: between request slots) */
  int64_t stride_pos;       /* elements between positions within a page */
  int64_t stride_head;      /* elements between heads */
  int64_t capacity;         /* positions a request can hold (contiguous: max_seq) */
  int64_t num_pages;        /* pages in the pool (contiguous: number of slots) */
  const int64_t* slots;     /* [R] int64 cache slot of each request (contiguous), or NULL = r */
  const int32_t* block_table; /* [R, block_table_stride] int32 page ids (paged), or NULL = contiguous */
  int64_t block_table_stride; /* entries per block-table row (paged; capacity = stride * page_size) */
  int32_t page_size;        /* P (paged) */

  /* --- what to keep --- */
  const int64_t* old_lengths;  /* [R] int64 L_r */
  const int64_t* accepted;     /* [R, accepted_width] int64 local indices, -1 padded, or NULL */
  int32_t accepted_width;      /* W >= 0 */
  const int64_t* num_kept;     /* [R] int64, length-only mode (accepted == NULL) */
  const int64_t* num_verified; /* [R] int64 n_r or NULL (no check against n_r, no freed pages) */

  /* --- outputs --- */
  int64_t* out_new_lengths; /* [R] int64; must not alias old_lengths */
  int64_t* out_free_from;   /* [R] int64 or NULL (paged + num_verified only) */
  int64_t* out_num_freed;   /* [R] int64 or NULL */
} dspark_kv_compact_params;

DSPARK_API dspark_status dspark_kv_compact_cpu(const dspark_kv_compact_params* params);

/* One kernel launch on `stream`; no allocation, no host synchronisation, capturable. */
DSPARK_API dspark_status dspark_kv_compact_cuda(const dspark_kv_compact_params* params, void* stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* DSPARK_KV_COMPACT_H_ */
