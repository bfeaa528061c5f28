// torch glue of schedule_prefix: schema, CPU and CUDA registrations. The fake (Meta) kernel is
// registered from Python (dspark_native/ops/schedule_prefix.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common.h"
#include "dspark/schedule_prefix.h"

#ifdef DSPARK_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace dspark_torch {
namespace {

constexpr const char* kOp = "schedule_prefix";

std::tuple<at::Tensor, at::Tensor> schedule_prefix(const at::Tensor& confidences, const at::Tensor& sps_table,
                                                   const std::optional<at::Tensor>& min_len,
                                                   const std::optional<at::Tensor>& max_len, int64_t token_budget,
                                                   int64_t mode) {
  const at::Device dev = confidences.device();
  TORCH_CHECK(confidences.dim() == 2, kOp, ": confidences must be 2-D [R, g], got ", confidences.sizes());
  check_dtype(confidences, at::kFloat, kOp, "confidences");
  const int64_t R = confidences.size(0), G = confidences.size(1);
  TORCH_CHECK(R * G < (int64_t{1} << 31), kOp, ": confidences has too many entries (R * g must be < 2^31)");
  TORCH_CHECK(sps_table.dim() == 1, kOp, ": sps_table must be 1-D [T] (SPS at 1..T tokens), got ", sps_table.sizes());
  check_dtype(sps_table, at::kFloat, kOp, "sps_table");
  check_device(sps_table, dev, kOp, "sps_table");
  TORCH_CHECK(mode == 0 || mode == 1, kOp, ": mode must be 0 (causal) or 1 (global), got ", mode);
  auto check_opt = [&](const std::optional<at::Tensor>& t, const char* name) {
    if (!t.has_value()) return;
    check_dtype(*t, at::kInt, kOp, name);
    check_device(*t, dev, kOp, name);
    check_shape_1d(*t, R, kOp, name);
  };
  check_opt(min_len, "min_len");
  check_opt(max_len, "max_len");
  const at::Tensor c = confidences.contiguous(), sps = sps_table.contiguous();
  auto contig = [](const std::optional<at::Tensor>& t) {
    return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
  };
  const auto mn = contig(min_len), mx = contig(max_len);
  auto opts = at::TensorOptions().device(dev);
  at::Tensor lengths = at::empty({R}, opts.dtype(at::kLong));
  at::Tensor thr = at::empty({2}, opts.dtype(at::kFloat));

  dspark_schedule_prefix_params p{};
  p.num_requests = static_cast<int32_t>(R);
  p.num_positions = static_cast<int32_t>(G);
  p.confidences = c.data_ptr<float>();
  p.sps_table = sps.numel() ? sps.data_ptr<float>() : nullptr;
  p.sps_len = sps.numel();
  p.min_len = mn ? mn->data_ptr<int32_t>() : nullptr;
  p.max_len = mx ? mx->data_ptr<int32_t>() : nullptr;
  p.token_budget = token_budget;
  p.mode = static_cast<dspark_schedule_mode>(mode);
  p.out_lengths = lengths.data_ptr<int64_t>();
  p.out_throughput = thr.data_ptr<float>();
  if (R == 0) thr.zero_();
  if (dev.is_cpu()) {
    throw_on_error(dspark_schedule_prefix_cpu(&p), kOp);
  } else {
#ifdef DSPARK_WITH_CUDA
    const c10::cuda::CUDAGuard guard(dev);
    const size_t ws = dspark_schedule_prefix_workspace_size(p.num_requests, p.num_positions);
    at::Tensor workspace = at::empty({static_cast<int64_t>(ws)}, opts.dtype(at::kByte));
    p.workspace = workspace.data_ptr();
    p.workspace_bytes = ws;
    throw_on_error(dspark_schedule_prefix_cuda(&p, c10::cuda::getCurrentCUDAStream(dev.index()).stream()), kOp);
#else
    TORCH_CHECK(false, kOp, ": this build has no CUDA kernels");
#endif
  }
  return {lengths, thr};
}

}  // namespace
}  // namespace dspark_torch

TORCH_LIBRARY_FRAGMENT(dspark, m) {
  m.def(
      "schedule_prefix(Tensor confidences, Tensor sps_table, Tensor? min_len, Tensor? max_len, int token_budget, "
      "int mode) -> (Tensor lengths, Tensor throughput)");
}

TORCH_LIBRARY_IMPL(dspark, CPU, m) { m.impl("schedule_prefix", &dspark_torch::schedule_prefix); }

#ifdef DSPARK_WITH_CUDA
TORCH_LIBRARY_IMPL(dspark, CUDA, m) { m.impl("schedule_prefix", &dspark_torch::schedule_prefix); }
#endif
