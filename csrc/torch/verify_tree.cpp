// torch glue of verify_tree: schema, CPU and CUDA registrations. The fake kernel is registered
// from Python (dspark_native/ops/verify_tree.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common.h"
#include "dspark/verify_tree.h"

#ifdef DSPARK_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace dspark_torch {
namespace {

constexpr const char* kOp = "verify_tree";

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree(
    const at::Tensor& target_logits, const at::Tensor& cu_nodes, const at::Tensor& parents, const at::Tensor& tokens,
    const at::Tensor& temperature, const std::optional<at::Tensor>& top_k, const std::optional<at::Tensor>& top_p,
    const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& offset, int64_t max_nodes,
    int64_t max_depth) {
  const at::Device dev = target_logits.device();
  TORCH_CHECK(target_logits.dim() == 2, kOp, ": target_logits must be 2-D [N, V], got ", target_logits.sizes());
  TORCH_CHECK(target_logits.stride(1) == 1, kOp, ": target_logits rows must be contiguous (stride(1) == 1)");
  const int64_t N = target_logits.size(0), V = target_logits.size(1);
  TORCH_CHECK(V >= 1 && V < (int64_t{1} << 31), kOp, ": vocabulary size V must be in [1, 2^31), got ", V);
  TORCH_CHECK(cu_nodes.dim() == 1 && cu_nodes.size(0) >= 1, kOp, ": cu_nodes must be 1-D [R + 1], got ",
              cu_nodes.sizes());
  check_dtype(cu_nodes, at::kLong, kOp, "cu_nodes");
  check_device(cu_nodes, dev, kOp, "cu_nodes");
  const int64_t R = cu_nodes.size(0) - 1;
  TORCH_CHECK(max_nodes >= 1 && max_nodes < (int64_t{1} << 31), kOp, ": max_nodes must be >= 1, got ", max_nodes);
  TORCH_CHECK(max_depth >= 0 && max_depth < max_nodes, kOp, ": max_depth must be in [0, max_nodes - 1], got ",
              max_depth);
  TORCH_CHECK(N >= R, kOp, ": target_logits has ", N, " rows, fewer than the ", R, " requests (each owns >= 1 node)");
  check_dtype(parents, at::kLong, kOp, "parents");
  check_device(parents, dev, kOp, "parents");
  check_shape_1d(parents, N, kOp, "parents");
  check_dtype(tokens, at::kLong, kOp, "tokens");
  check_device(tokens, dev, kOp, "tokens");
  check_shape_1d(tokens, N, kOp, "tokens");
  check_per_request(temperature, at::kFloat, dev, R, kOp, "temperature");
  check_per_request(top_k, at::kInt, dev, R, kOp, "top_k");
  check_per_request(top_p, at::kFloat, dev, R, kOp, "top_p");
  check_per_request(seed, at::kLong, dev, R, kOp, "seed");
  check_per_request(offset, at::kLong, dev, R, kOp, "offset");
  TORCH_CHECK(seed.has_value() == offset.has_value(), kOp, ": seed and offset must be given together");

  const at::Tensor cu = cu_nodes.contiguous(), par = parents.contiguous(), toks = tokens.contiguous();
  const at::Tensor temp = temperature.contiguous();
  const auto tk = contiguous_or_none(top_k), tp = contiguous_or_none(top_p), sd = contiguous_or_none(seed),
             of = contiguous_or_none(offset);

  auto long_opts = at::TensorOptions().dtype(at::kLong).device(dev);
  at::Tensor out_path = at::empty({R, max_depth + 1}, long_opts);
  at::Tensor out_accepted = at::empty({R}, long_opts);
  at::Tensor out_tokens = at::empty({R, max_depth + 1}, long_opts);
  if (R == 0) return {out_path, out_accepted, out_tokens};

  dspark_verify_tree_params p{};
  p.num_requests = static_cast<int32_t>(R);
  p.vocab_size = static_cast<int32_t>(V);
  p.max_nodes = static_cast<int32_t>(max_nodes);
  p.max_depth = static_cast<int32_t>(max_depth);
  p.num_nodes = N;
  p.cu_nodes = cu.data_ptr<int64_t>();
  p.parents = par.data_ptr<int64_t>();
  p.tokens = toks.data_ptr<int64_t>();
  p.target_logits = target_logits.data_ptr();
  p.target_dtype = to_dspark_dtype(target_logits, kOp, "target_logits");
  p.target_row_stride = target_logits.stride(0);
  p.temperature = temp.data_ptr<float>();
  p.top_k = data_or_null<int32_t>(tk);
  p.top_p = data_or_null<float>(tp);
  p.seed = data_or_null<int64_t>(sd);
  p.offset = data_or_null<int64_t>(of);
  p.out_path = out_path.data_ptr<int64_t>();
  p.out_num_accepted = out_accepted.data_ptr<int64_t>();
  p.out_tokens = out_tokens.data_ptr<int64_t>();

  if (dev.is_cpu()) {
    throw_on_error(dspark_verify_tree_cpu(&p), kOp);
  } else {
#ifdef DSPARK_WITH_CUDA
    const c10::cuda::CUDAGuard guard(dev);
    throw_on_error(dspark_verify_tree_cuda(&p, c10::cuda::getCurrentCUDAStream(dev.index()).stream()), kOp);
#else
    TORCH_CHECK(false, kOp, ": this build has no CUDA kernels");
#endif
  }
  return {out_path, out_accepted, out_tokens};
}

}  // namespace
}  // namespace dspark_torch

TORCH_LIBRARY_FRAGMENT(dspark, m) {
  m.def(
      "verify_tree(Tensor target_logits, Tensor cu_nodes, Tensor parents, Tensor tokens, Tensor temperature, "
      "Tensor? top_k, Tensor? top_p, Tensor? seed, Tensor? offset, int max_nodes, int max_depth) -> "
      "(Tensor path, Tensor num_accepted, Tensor tokens)");
}

TORCH_LIBRARY_IMPL(dspark, CPU, m) { m.impl("verify_tree", &dspark_torch::verify_tree); }

#ifdef DSPARK_WITH_CUDA
TORCH_LIBRARY_IMPL(dspark, CUDA, m) { m.impl("verify_tree", &dspark_torch::verify_tree); }
#endif
