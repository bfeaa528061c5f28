// torch glue of kv_compact: schema, CPU and CUDA registrations. The fake kernel is registered from
// Python (dspark_native/ops/kv_compact.py).
//
// Cache forms accepted (k_cache / v_cache are lists; v_cache may be empty = no V cache):
//   contiguous (block_table None): [k] with k [L, slots, H, max_seq, D], or L tensors [slots, H, max_seq, D]
//   paged (block_table [R, pages_per_request] int32): [k] with k [L, num_pages, P, H, D], or L
//   tensors [num_pages, P, H, D]
// The last dim must be contiguous; other strides are free but equal across layers and K/V.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common.h"
#include "dspark/kv_compact.h"

#ifdef DSPARK_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace dspark_torch {
namespace {

constexpr const char* kOp = "kv_compact";

struct CacheView {
  std::vector<void*> layers;
  std::vector<int64_t> sizes;    // per-layer sizes (4 dims)
  std::vector<int64_t> strides;  // per-layer strides (4 dims)
  at::ScalarType dtype;
};

CacheView view_of(const std::vector<at::Tensor>& ts, const at::Device& dev, const char* name) {
  CacheView v;
  TORCH_CHECK(!ts.empty(), kOp, ": ", name, " is an empty list");
  v.dtype = ts[0].scalar_type();
  if (ts.size() == 1 && ts[0].dim() == 5) {
    const at::Tensor& t = ts[0];
    check_device(t, dev, kOp, name);
    TORCH_CHECK(t.stride(4) == 1, kOp, ": ", name, " must be contiguous in its last (head_dim) dimension");
    const int64_t esz = t.element_size();
    char* base = static_cast<char*>(t.data_ptr());
    for (int64_t l = 0; l < t.size(0); ++l) v.layers.push_back(base + l * t.stride(0) * esz);
    v.sizes = {t.size(1), t.size(2), t.size(3), t.size(4)};
    v.strides = {t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
    return v;
  }
  for (size_t l = 0; l < ts.size(); ++l) {
    const at::Tensor& t = ts[l];
    TORCH_CHECK(t.dim() == 4, kOp, ": ", name, " must be [one 5-D tensor] or a list of 4-D per-layer tensors; entry ",
                l, " has shape ", t.sizes());
    check_device(t, dev, kOp, name);
    TORCH_CHECK(t.scalar_type() == v.dtype, kOp, ": ", name, "[", l, "] dtype ", t.scalar_type(), " differs from ",
                v.dtype);
    TORCH_CHECK(t.stride(3) == 1, kOp, ": ", name, "[", l, "] must be contiguous in its last (head_dim) dimension");
    std::vector<int64_t> sz(t.sizes().begin(), t.sizes().end()), st(t.strides().begin(), t.strides().end());
    if (l == 0) {
      v.sizes = sz;
      v.strides = st;
    } else {
      TORCH_CHECK(sz == v.sizes && st == v.strides, kOp, ": ", name, "[", l,
                  "] has different sizes/strides than layer 0 (all layers must share one layout)");
    }
    v.layers.push_back(t.data_ptr());
  }
  return v;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_compact(
    at::TensorList k_cache, at::TensorList v_cache, const at::Tensor& old_lengths, const at::Tensor& accepted,
    const std::optional<at::Tensor>& num_verified, const std::optional<at::Tensor>& slots,
    const std::optional<at::Tensor>& block_table) {
  const at::Device dev = old_lengths.device();
  TORCH_CHECK(old_lengths.dim() == 1, kOp, ": old_lengths must be 1-D [R], got ", old_lengths.sizes());
  check_dtype(old_lengths, at::kLong, kOp, "old_lengths");
  const int64_t R = old_lengths.size(0);
  TORCH_CHECK(accepted.dim() == 2 && accepted.size(0) == R, kOp, ": accepted must be [R, W] = [", R, ", W], got ",
              accepted.sizes());
  check_dtype(accepted, at::kLong, kOp, "accepted");
  check_device(accepted, dev, kOp, "accepted");
  const std::vector<at::Tensor> kl(k_cache.begin(), k_cache.end()), vl(v_cache.begin(), v_cache.end());
  const CacheView kv = view_of(kl, dev, "k_cache");
  const bool has_v = !vl.empty();
  if (has_v) {
    const CacheView vv = view_of(vl, dev, "v_cache");
    TORCH_CHECK(vv.layers.size() == kv.layers.size() && vv.sizes == kv.sizes && vv.strides == kv.strides &&
                    vv.dtype == kv.dtype,
                kOp, ": v_cache must have the same number of layers, shape, strides and dtype as k_cache");
  }
  const bool paged = block_table.has_value();
  dspark_kv_compact_params p{};
  p.num_requests = static_cast<int32_t>(R);
  p.num_layers = static_cast<int32_t>(kv.layers.size());
  p.element_bytes = static_cast<int32_t>(kl[0].element_size());
  if (paged) {  // [num_pages, P, H, D]
    TORCH_CHECK(!slots.has_value(), kOp, ": slots applies to the contiguous layout only (paged uses block_table)");
    check_dtype(*block_table, at::kInt, kOp, "block_table");
    check_device(*block_table, dev, kOp, "block_table");
    TORCH_CHECK(block_table->dim() == 2 && block_table->size(0) == R, kOp,
                ": block_table must be [R, pages_per_request] = [", R, ", *], got ", block_table->sizes());
    p.num_pages = kv.sizes[0];
    p.page_size = static_cast<int32_t>(kv.sizes[1]);
    p.num_heads = static_cast<int32_t>(kv.sizes[2]);
    p.head_dim = static_cast<int32_t>(kv.sizes[3]);
    p.stride_page = kv.strides[0];
    p.stride_pos = kv.strides[1];
    p.stride_head = kv.strides[2];
    p.block_table_stride = block_table->size(1);
    p.capacity = block_table->size(1) * kv.sizes[1];
  } else {  // [slots, H, max_seq, D]
    p.num_pages = kv.sizes[0];
    p.num_heads = static_cast<int32_t>(kv.sizes[1]);
    p.capacity = kv.sizes[2];
    p.head_dim = static_cast<int32_t>(kv.sizes[3]);
    p.stride_page = kv.strides[0];
    p.stride_head = kv.strides[1];
    p.stride_pos = kv.strides[2];
  }
  auto check_opt = [&](const std::optional<at::Tensor>& t, const char* name) {
    if (!t.has_value()) return;
    check_dtype(*t, at::kLong, kOp, name);
    check_device(*t, dev, kOp, name);
    check_shape_1d(*t, R, kOp, name);
  };
  check_opt(num_verified, "num_verified");
  check_opt(slots, "slots");

  auto long_opts = at::TensorOptions().dtype(at::kLong).device(dev);
  at::Tensor new_lengths = at::empty({R}, long_opts);
  at::Tensor free_from = at::empty({R}, long_opts);
  at::Tensor num_freed = at::empty({R}, long_opts);
  if (R == 0) return {new_lengths, free_from, num_freed};
  const at::Tensor old = old_lengths.contiguous();
  // an empty [R, 0] list keeps nothing; give the kernel a valid pointer to a -1 column
  const at::Tensor acc = accepted.size(1) == 0 ? at::full({R, 1}, -1, long_opts) : accepted.contiguous();
  const at::Tensor nv = num_verified ? num_verified->contiguous() : at::Tensor();
  const at::Tensor sl = slots ? slots->contiguous() : at::Tensor();
  const at::Tensor bt = block_table ? block_table->contiguous() : at::Tensor();
  std::vector<void*> vlayers;
  if (has_v) vlayers = view_of(vl, dev, "v_cache").layers;
  p.k_layers = kv.layers.data();
  p.v_layers = has_v ? vlayers.data() : nullptr;
  p.slots = sl.defined() ? sl.data_ptr<int64_t>() : nullptr;
  p.block_table = bt.defined() ? bt.data_ptr<int32_t>() : nullptr;
  p.old_lengths = old.data_ptr<int64_t>();
  p.accepted = acc.data_ptr<int64_t>();
  p.accepted_width = static_cast<int32_t>(acc.size(1));
  p.num_verified = nv.defined() ? nv.data_ptr<int64_t>() : nullptr;
  p.out_new_lengths = new_lengths.data_ptr<int64_t>();
  p.out_free_from = free_from.data_ptr<int64_t>();
  p.out_num_freed = num_freed.data_ptr<int64_t>();
  if (dev.is_cpu()) {
    throw_on_error(dspark_kv_compact_cpu(&p), kOp);
  } else {
#ifdef DSPARK_WITH_CUDA
    const c10::cuda::CUDAGuard guard(dev);
    throw_on_error(dspark_kv_compact_cuda(&p, c10::cuda::getCurrentCUDAStream(dev.index()).stream()), kOp);
#else
    TORCH_CHECK(false, kOp, ": this build has no CUDA kernels");
#endif
  }
  return {new_lengths, free_from, num_freed};
}

}  // namespace
}  // namespace dspark_torch

TORCH_LIBRARY_FRAGMENT(dspark, m) {
  m.def(
      "kv_compact(Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, Tensor old_lengths, Tensor accepted, "
      "Tensor? num_verified, Tensor? slots, Tensor? block_table) -> "
      "(Tensor new_lengths, Tensor free_from, Tensor num_freed)");
}

TORCH_LIBRARY_IMPL(dspark, CPU, m) { m.impl("kv_compact", &dspark_torch::kv_compact); }

#ifdef DSPARK_WITH_CUDA
TORCH_LIBRARY_IMPL(dspark, CUDA, m) { m.impl("kv_compact", &dspark_torch::kv_compact); }
#endif
