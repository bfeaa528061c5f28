// torch glue of verify_chain: schema, CPU and CUDA registrations. The fake (Meta) kernel is
// registered from Python (dspark_native/ops.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common.h"
#include "dspark/verify_chain.h"

#ifdef DSPARK_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace dspark_torch {
namespace {

constexpr const char* kOp = "verify_chain";

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_chain(
    const at::Tensor& target_logits, const at::Tensor& cu_target_rows, const at::Tensor& draft_tokens,
    const std::optional<at::Tensor>& draft, int64_t draft_kind, const at::Tensor& temperature,
    const std::optional<at::Tensor>& top_k, const std::optional<at::Tensor>& top_p,
    const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& offset, int64_t max_drafts,
    bool return_accept_prob) {
  const at::Device dev = target_logits.device();
  TORCH_CHECK(target_logits.dim() == 2, kOp, ": target_logits must be 2-D [N, V], got ", target_logits.sizes());
  TORCH_CHECK(target_logits.stride(1) == 1, kOp, ": target_logits rows must be contiguous (stride(1) == 1)");
  const int64_t N = target_logits.size(0), V = target_logits.size(1);
  TORCH_CHECK(V >= 1 && V < (int64_t{1} << 31), kOp, ": vocabulary size V must be in [1, 2^31), got ", V);
  TORCH_CHECK(cu_target_rows.dim() == 1 && cu_target_rows.size(0) >= 1, kOp,
              ": cu_target_rows must be 1-D [R + 1], got ", cu_target_rows.sizes());
  check_dtype(cu_target_rows, at::kLong, kOp, "cu_target_rows");
  check_device(cu_target_rows, dev, kOp, "cu_target_rows");
  const int64_t R = cu_target_rows.size(0) - 1;
  TORCH_CHECK(max_drafts >= 0, kOp, ": max_drafts must be >= 0, got ", max_drafts);
  TORCH_CHECK(N >= R, kOp, ": target_logits has ", N, " rows, fewer than the ", R, " requests (each owns >= 1)");
  check_dtype(draft_tokens, at::kLong, kOp, "draft_tokens");
  check_device(draft_tokens, dev, kOp, "draft_tokens");
  check_shape_1d(draft_tokens, N - R, kOp, "draft_tokens");
  check_per_request(temperature, at::kFloat, dev, R, kOp, "temperature");
  TORCH_CHECK(draft_kind >= 0 && draft_kind <= 2, kOp, ": draft_kind must be 0 (one-hot), 1 (logits) or 2 (probs)");
  if (draft_kind != DSPARK_DRAFT_ONE_HOT) {
    TORCH_CHECK(draft.has_value(), kOp, ": draft logits/probs tensor missing for draft_kind ", draft_kind);
    TORCH_CHECK(draft->dim() == 2 && draft->size(0) == N - R && draft->size(1) == V, kOp,
                ": draft must have shape [N - R, V] = [", N - R, ", ", V, "], got ", draft->sizes());
    TORCH_CHECK(draft->stride(1) == 1, kOp, ": draft rows must be contiguous (stride(1) == 1)");
    check_device(*draft, dev, kOp, "draft");
  }
  check_per_request(top_k, at::kInt, dev, R, kOp, "top_k");
  check_per_request(top_p, at::kFloat, dev, R, kOp, "top_p");
  check_per_request(seed, at::kLong, dev, R, kOp, "seed");
  check_per_request(offset, at::kLong, dev, R, kOp, "offset");
  TORCH_CHECK(seed.has_value() == offset.has_value(), kOp, ": seed and offset must be given together");

  const at::Tensor logits = target_logits;
  const at::Tensor cu = cu_target_rows.contiguous();
  const at::Tensor toks = draft_tokens.contiguous();
  const at::Tensor temp = temperature.contiguous();
  const auto tk = contiguous_or_none(top_k), tp = contiguous_or_none(top_p), sd = contiguous_or_none(seed),
             of = contiguous_or_none(offset);

  auto long_opts = at::TensorOptions().dtype(at::kLong).device(dev);
  at::Tensor out_tokens = at::empty({R, max_drafts + 1}, long_opts);
  at::Tensor out_accepted = at::empty({R}, long_opts);
  at::Tensor out_prob = at::empty({return_accept_prob ? N - R : 0}, long_opts.dtype(at::kFloat));
  if (R == 0) return {out_tokens, out_accepted, out_prob};

  dspark_verify_chain_params p{};
  p.num_requests = static_cast<int32_t>(R);
  p.vocab_size = static_cast<int32_t>(V);
  p.max_drafts = static_cast<int32_t>(max_drafts);
  p.cu_target_rows = cu.data_ptr<int64_t>();
  p.target_logits = logits.data_ptr();
  p.target_dtype = to_dspark_dtype(logits, kOp, "target_logits");
  p.target_row_stride = logits.stride(0);
  p.draft_tokens = toks.data_ptr<int64_t>();
  // With no draft rows at all (every l_r = 0) the draft distribution is never read.
  p.draft_kind = N == R ? DSPARK_DRAFT_ONE_HOT : static_cast<dspark_draft_kind>(draft_kind);
  if (p.draft_kind != DSPARK_DRAFT_ONE_HOT) {
    p.draft = draft->data_ptr();
    p.draft_dtype = to_dspark_dtype(*draft, kOp, "draft");
    p.draft_row_stride = draft->stride(0);
  }
  p.temperature = temp.data_ptr<float>();
  p.top_k = data_or_null<int32_t>(tk);
  p.top_p = data_or_null<float>(tp);
  p.seed = data_or_null<int64_t>(sd);
  p.offset = data_or_null<int64_t>(of);
  p.out_tokens = out_tokens.data_ptr<int64_t>();
  p.out_num_accepted = out_accepted.data_ptr<int64_t>();
  p.out_accept_prob = return_accept_prob ? out_prob.data_ptr<float>() : nullptr;

  if (dev.is_cpu()) {
    throw_on_error(dspark_verify_chain_cpu(&p), kOp);
  } else {
#ifdef DSPARK_WITH_CUDA
    const c10::cuda::CUDAGuard guard(dev);
    const size_t ws = dspark_verify_chain_workspace_size(p.num_requests, N, p.vocab_size);
    at::Tensor workspace = at::empty({static_cast<int64_t>(ws)}, long_opts.dtype(at::kByte));
    p.workspace = workspace.data_ptr();
    p.workspace_bytes = ws;
    throw_on_error(dspark_verify_chain_cuda(&p, c10::cuda::getCurrentCUDAStream(dev.index()).stream()), kOp);
#else
    TORCH_CHECK(false, kOp, ": this build has no CUDA kernels");
#endif
  }
  return {out_tokens, out_accepted, out_prob};
}

}  // namespace
}  // namespace dspark_torch

TORCH_LIBRARY_FRAGMENT(dspark, m) {
  m.def(
      "verify_chain(Tensor target_logits, Tensor cu_target_rows, Tensor draft_tokens, Tensor? draft, "
      "int draft_kind, Tensor temperature, Tensor? top_k, Tensor? top_p, Tensor? seed, Tensor? offset, "
      "int max_drafts, bool return_accept_prob) -> (Tensor tokens, Tensor num_accepted, Tensor accept_prob)");
}

TORCH_LIBRARY_IMPL(dspark, CPU, m) { m.impl("verify_chain", &dspark_torch::verify_chain); }

#ifdef DSPARK_WITH_CUDA
TORCH_LIBRARY_IMPL(dspark, CUDA, m) { m.impl("verify_chain", &dspark_torch::verify_chain); }
#endif
