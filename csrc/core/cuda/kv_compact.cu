// CUDA kernel of dspark_kv_compact: one launch for every layer and K/V. Block (r, layer*kinds + kv)
// validates request r's list (thread 0; cheap), then each thread owns fixed 16/8/4/1-byte units of
// an entry (head, element range) and moves them for j = 0, 1, ... in order, which keeps the
// in-place moves safe (a unit's source for j' > j is never a destination of j; see kv_compact.h).
#include <cuda_runtime.h>

#include <string>

#include "../common/status.h"
#include "../common/verify_tree_check.h"
#include "dspark/detail/tree_kv.h"
#include "dspark/kv_compact.h"

namespace dspark {
namespace cuda {
namespace {

constexpr int kThreads = 128;

struct LayerPtrs {
  char* k[DSPARK_KV_COMPACT_CUDA_MAX_LAYERS];
  char* v[DSPARK_KV_COMPACT_CUDA_MAX_LAYERS];
};

struct Args {
  int32_t kinds, num_heads, head_dim, element_bytes, accepted_width, page_size;
  int64_t stride_page, stride_pos, stride_head, capacity, num_pages, block_table_stride;
  const int64_t* slots;
  const int32_t* block_table;
  const int64_t* old_lengths;
  const int64_t* accepted;
  const int64_t* num_kept;
  const int64_t* num_verified;
  int64_t* out_new_lengths;
  int64_t* out_free_from;
  int64_t* out_num_freed;
};

__device__ __forceinline__ int64_t page_of(const Args& a, int r, int64_t t, int64_t* t_in_page) {
  if (a.block_table == nullptr) {
    *t_in_page = t;
    return a.slots ? a.slots[r] : r;
  }
  *t_in_page = t % a.page_size;
  return a.block_table[r * a.block_table_stride + t / a.page_size];
}

// Request r's kept count, or -1 when its input breaks the contract (checked on the device).
__device__ int64_t request_count(const Args& a, int r) {
  const int64_t old = a.old_lengths[r];
  if (old < 0 || old > a.capacity) return -1;
  if (a.accepted == nullptr) {
    const int64_t k = a.num_kept[r];
    return (k < 0 || k > a.capacity - old) ? -1 : k;
  }
  const int64_t* acc = a.accepted + static_cast<int64_t>(r) * a.accepted_width;
  const int64_t k = detail::kv_accepted_count(acc, a.accepted_width, old, a.capacity,
                                              a.num_verified ? a.num_verified[r] : -1);
  if (k < 0) return -1;
  if (a.block_table == nullptr) {
    const int64_t slot = a.slots ? a.slots[r] : r;
    return (slot < 0 || slot >= a.num_pages) ? -1 : k;
  }
  for (int64_t j = 0; j < k; ++j) {
    if (acc[j] == j) continue;
    int64_t tp;
    const int64_t ps = page_of(a, r, old + acc[j], &tp), pd = page_of(a, r, old + j, &tp);
    if (ps < 0 || ps >= a.num_pages || pd < 0 || pd >= a.num_pages) return -1;
  }
  return k;
}

template <typename U>
__global__ void __launch_bounds__(kThreads) kv_compact_kernel(LayerPtrs ptrs, Args a) {
  const int r = blockIdx.x;
  const int lk = blockIdx.y;
  __shared__ int64_t s_count;
  if (threadIdx.x == 0) {
    const int64_t k = request_count(a, r);
    s_count = k;
    if (lk == 0) {
      const int64_t old = a.old_lengths[r];
      const int64_t nl = k < 0 ? -1 : old + k;
      a.out_new_lengths[r] = nl;
      int64_t ff = 0, freed = 0;
      if (k >= 0 && a.block_table && a.num_verified) {
        ff = detail::ceil_div64(nl, a.page_size);
        const int64_t nv = a.num_verified[r] > 0 ? a.num_verified[r] : 0;
        const int64_t end = old + nv < a.capacity ? old + nv : a.capacity;
        freed = detail::ceil_div64(end, a.page_size) - ff;
        freed = freed > 0 ? freed : 0;
      }
      if (a.out_free_from) a.out_free_from[r] = ff;
      if (a.out_num_freed) a.out_num_freed[r] = freed;
    }
  }
  __syncthreads();
  const int64_t count = s_count;
  if (count <= 0 || a.accepted == nullptr) return;
  char* layer = a.kinds == 2 ? ((lk & 1) ? ptrs.v[lk >> 1] : ptrs.k[lk >> 1]) : ptrs.k[lk];
  const int64_t old = a.old_lengths[r];
  const int64_t* acc = a.accepted + static_cast<int64_t>(r) * a.accepted_width;
  const int64_t units_per_head = static_cast<int64_t>(a.head_dim) * a.element_bytes / sizeof(U);
  const int64_t units = units_per_head * a.num_heads;
  const int64_t eb = a.element_bytes;
  for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
    const int64_t h = u / units_per_head;
    const int64_t e = u - h * units_per_head;
    for (int64_t j = 0; j < count; ++j) {
      const int64_t src_t = old + acc[j];
      if (src_t == old + j) continue;
      int64_t ts, td;
      const int64_t ps = page_of(a, r, src_t, &ts);
      const int64_t pd = page_of(a, r, old + j, &td);
      const int64_t so = detail::kv_entry_offset(ps, ts, h, a.stride_page, a.stride_pos, a.stride_head) * eb;
      const int64_t dof = detail::kv_entry_offset(pd, td, h, a.stride_page, a.stride_pos, a.stride_head) * eb;
      reinterpret_cast<U*>(layer + dof)[e] = reinterpret_cast<const U*>(layer + so)[e];
    }
  }
}

}  // namespace
}  // namespace cuda
}  // namespace dspark

extern "C" dspark_status dspark_kv_compact_cuda(const dspark_kv_compact_params* params, void* stream) {
  using namespace dspark;
  clear_error();
  const dspark_status st = check_kv_compact_params(params);
  if (st != DSPARK_OK || params->num_requests == 0) return st;
  const dspark_kv_compact_params& p = *params;
  cuda::Args a{};
  cuda::LayerPtrs ptrs{};
  const bool copies = p.accepted != nullptr;
  int layers_y = 1;
  a.kinds = 1;
  if (copies) {
    DSPARK_CHECK_ARG(p.num_layers <= DSPARK_KV_COMPACT_CUDA_MAX_LAYERS,
                     "kv_compact: num_layers must be <= " + std::to_string(DSPARK_KV_COMPACT_CUDA_MAX_LAYERS) +
                         " on CUDA");
    a.kinds = p.v_layers ? 2 : 1;
    layers_y = p.num_layers * a.kinds;
    for (int32_t l = 0; l < p.num_layers; ++l) {
      ptrs.k[l] = static_cast<char*>(p.k_layers[l]);
      ptrs.v[l] = p.v_layers ? static_cast<char*>(p.v_layers[l]) : nullptr;
    }
  }
  a.num_heads = p.num_heads;
  a.head_dim = p.head_dim;
  a.element_bytes = p.element_bytes;
  a.accepted_width = p.accepted_width;
  a.page_size = p.page_size;
  a.stride_page = p.stride_page;
  a.stride_pos = p.stride_pos;
  a.stride_head = p.stride_head;
  a.capacity = p.capacity;
  a.num_pages = p.num_pages;
  a.block_table_stride = p.block_table_stride;
  a.slots = p.slots;
  a.block_table = p.block_table;
  a.old_lengths = p.old_lengths;
  a.accepted = p.accepted;
  a.num_kept = p.num_kept;
  a.num_verified = p.num_verified;
  a.out_new_lengths = p.out_new_lengths;
  a.out_free_from = p.out_free_from;
  a.out_num_freed = p.out_num_freed;
  // widest copy unit that divides every offset: head bytes, strides in bytes, base pointers
  int unit = 16;
  auto fits = [&](int u) {
    if ((static_cast<int64_t>(p.head_dim) * p.element_bytes) % u) return false;
    for (int64_t s : {p.stride_page, p.stride_pos, p.stride_head})
      if ((s * p.element_bytes) % u) return false;
    for (int32_t l = 0; copies && l < p.num_layers; ++l) {
      if (reinterpret_cast<uintptr_t>(p.k_layers[l]) % u) return false;
      if (p.v_layers && reinterpret_cast<uintptr_t>(p.v_layers[l]) % u) return false;
    }
    return true;
  };
  while (unit > 1 && !fits(unit)) unit /= 2;
  const dim3 grid(static_cast<unsigned>(p.num_requests), static_cast<unsigned>(layers_y));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (unit) {
    case 16: cuda::kv_compact_kernel<uint4><<<grid, cuda::kThreads, 0, s>>>(ptrs, a); break;
    case 8: cuda::kv_compact_kernel<uint2><<<grid, cuda::kThreads, 0, s>>>(ptrs, a); break;
    case 4: cuda::kv_compact_kernel<uint32_t><<<grid, cuda::kThreads, 0, s>>>(ptrs, a); break;
    case 2: cuda::kv_compact_kernel<uint16_t><<<grid, cuda::kThreads, 0, s>>>(ptrs, a); break;
    default: cuda::kv_compact_kernel<uint8_t><<<grid, cuda::kThreads, 0, s>>>(ptrs, a); break;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return fail(DSPARK_ERR_CUDA, std::string("kv_compact: kernel launch failed: ") + cudaGetErrorString(err));
  return DSPARK_OK;
}
