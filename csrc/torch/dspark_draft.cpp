// torch glue of dspark_draft: schema, CPU and CUDA registrations. The fake (Meta) kernel is
// registered from Python (dspark_native/ops/dspark_draft.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common.h"
#include "dspark/dspark_draft.h"

#ifdef DSPARK_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace dspark_torch {
namespace {

constexpr const char* kOp = "dspark_draft";

std::tuple<at::Tensor, at::Tensor, at::Tensor> dspark_draft(
    const at::Tensor& base_logits, const std::optional<at::Tensor>& hidden, const at::Tensor& anchor_tokens,
    const at::Tensor& markov_w1, const at::Tensor& markov_w2, const std::optional<at::Tensor>& gate_weight,
    const std::optional<at::Tensor>& gate_bias, const std::optional<at::Tensor>& joint_weight,
    const std::optional<at::Tensor>& joint_bias, const std::optional<at::Tensor>& conf_weight,
    const std::optional<at::Tensor>& conf_bias, const std::optional<at::Tensor>& sts_temperature,
    const at::Tensor& temperature, const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& offset,
    int64_t head_type, const std::optional<at::Tensor>& draft_to_target) {
  const at::Device dev = base_logits.device();
  TORCH_CHECK(base_logits.dim() == 3, kOp, ": base_logits must be 3-D [R, g, V], got ", base_logits.sizes());
  const int64_t R = base_logits.size(0), G = base_logits.size(1), V = base_logits.size(2);
  TORCH_CHECK(G >= 1, kOp, ": base_logits must have g >= 1 positions, got ", base_logits.sizes());
  TORCH_CHECK(V >= 1 && V < (int64_t{1} << 31), kOp, ": vocabulary size V must be in [1, 2^31), got ", V);
  TORCH_CHECK(head_type >= 0 && head_type <= 2, kOp, ": head_type must be 0 (vanilla), 1 (gated) or 2 (rnn), got ",
              head_type);
  check_dtype(anchor_tokens, at::kLong, kOp, "anchor_tokens");
  check_device(anchor_tokens, dev, kOp, "anchor_tokens");
  check_shape_1d(anchor_tokens, R, kOp, "anchor_tokens");
  // With a draft vocabulary W1 covers the target vocabulary (the anchor and every prev are target
  // tokens); U, W2 and z cover the subset.
  const bool subset = draft_to_target.has_value();
  if (subset) {
    check_dtype(*draft_to_target, at::kLong, kOp, "draft_to_target");
    check_device(*draft_to_target, dev, kOp, "draft_to_target");
    check_shape_1d(*draft_to_target, V, kOp, "draft_to_target");
  }
  const int64_t Vw1 = subset && markov_w1.dim() == 2 ? markov_w1.size(0) : V;
  if (subset) {
    TORCH_CHECK(markov_w1.dim() == 2 && markov_w1.size(0) >= V && markov_w1.size(0) < (int64_t{1} << 31), kOp,
                ": with draft_to_target, markov_w1 must have shape [V_target, r] over the target vocabulary "
                "(V_target >= the draft vocabulary ",
                V, "), got ", markov_w1.sizes());
  } else {
    TORCH_CHECK(markov_w1.dim() == 2 && markov_w1.size(0) == V, kOp, ": markov_w1 must have shape [V, r] with V = ", V,
                ", got ", markov_w1.sizes());
  }
  const int64_t Rk = markov_w1.size(1);
  TORCH_CHECK(Rk >= 1 && Rk <= 4096, kOp, ": markov rank r (markov_w1.size(1)) must be in [1, 4096], got ", Rk);
  TORCH_CHECK(markov_w2.dim() == 2 && markov_w2.size(0) == V && markov_w2.size(1) == Rk, kOp,
              ": markov_w2 must have shape [V, r] = [", V, ", ", Rk, "], got ", markov_w2.sizes());
  check_device(markov_w1, dev, kOp, "markov_w1");
  check_device(markov_w2, dev, kOp, "markov_w2");
  const dspark_dtype wdt = to_dspark_dtype(markov_w2, kOp, "markov_w2");
  TORCH_CHECK(markov_w1.scalar_type() == markov_w2.scalar_type(), kOp, ": markov_w1 must have the dtype of markov_w2 (",
              markov_w2.scalar_type(), "), got ", markov_w1.scalar_type());
  int64_t D = 1;
  if (hidden.has_value()) {
    TORCH_CHECK(hidden->dim() == 3 && hidden->size(0) == R && hidden->size(1) == G, kOp,
                ": hidden must have shape [R, g, d] = [", R, ", ", G, ", d], got ", hidden->sizes());
    check_device(*hidden, dev, kOp, "hidden");
    D = hidden->size(2);
    TORCH_CHECK(D >= 1, kOp, ": hidden size d must be >= 1");
  }
  auto check_w = [&](const std::optional<at::Tensor>& t, std::initializer_list<int64_t> shape, const char* name) {
    TORCH_CHECK(t.has_value(), kOp, ": ", name, " is required for this head type");
    TORCH_CHECK(t->sizes() == at::IntArrayRef(shape), kOp, ": ", name, " must have shape ", at::IntArrayRef(shape),
                ", got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == markov_w2.scalar_type(), kOp, ": ", name, " must have the dtype of markov_w2 (",
                markov_w2.scalar_type(), "), got ", t->scalar_type());
    check_device(*t, dev, kOp, name);
  };
  if (head_type != DSPARK_MARKOV_VANILLA)
    TORCH_CHECK(hidden.has_value(), kOp, ": hidden [R, g, d] is required by the gated and rnn heads");
  if (head_type == DSPARK_MARKOV_GATED) {
    check_w(gate_weight, {Rk, D + Rk}, "gate_weight");
    check_w(gate_bias, {Rk}, "gate_bias");
  }
  if (head_type == DSPARK_MARKOV_RNN) {
    check_w(joint_weight, {3 * Rk, 2 * Rk + D}, "joint_weight");
    check_w(joint_bias, {3 * Rk}, "joint_bias");
  }
  int32_t conf_with_markov = 1;
  const bool conf = conf_weight.has_value();
  at::Tensor cw, cb;
  if (conf) {
    TORCH_CHECK(hidden.has_value(), kOp, ": hidden [R, g, d] is required by the confidence head");
    const int64_t n = conf_weight->numel();
    TORCH_CHECK(n == D + Rk || n == D, kOp, ": conf_weight must have d + r = ", D + Rk, " (with Markov feature) or d = ",
                D, " elements (shape [1, n]), got ", conf_weight->sizes());
    conf_with_markov = n == D + Rk ? 1 : 0;
    TORCH_CHECK(conf_bias.has_value() && conf_bias->numel() == 1, kOp, ": conf_bias must have 1 element");
    TORCH_CHECK(conf_weight->scalar_type() == markov_w2.scalar_type() && conf_bias->scalar_type() == markov_w2.scalar_type(),
                kOp, ": conf_weight and conf_bias must have the dtype of markov_w2 (", markov_w2.scalar_type(), ")");
    check_device(*conf_weight, dev, kOp, "conf_weight");
    check_device(*conf_bias, dev, kOp, "conf_bias");
    cw = conf_weight->contiguous();
    cb = conf_bias->contiguous();
  }
  if (sts_temperature.has_value()) {
    check_dtype(*sts_temperature, at::kFloat, kOp, "sts_temperature");
    check_device(*sts_temperature, dev, kOp, "sts_temperature");
    check_shape_1d(*sts_temperature, G, kOp, "sts_temperature");
  }
  check_per_request(temperature, at::kFloat, dev, R, kOp, "temperature");
  check_per_request(seed, at::kLong, dev, R, kOp, "seed");
  check_per_request(offset, at::kLong, dev, R, kOp, "offset");

  const auto contig = contiguous_or_none;
  const at::Tensor U = base_logits.contiguous(), anc = anchor_tokens.contiguous(), w1 = markov_w1.contiguous(),
                   w2 = markov_w2.contiguous(), temp = temperature.contiguous();
  const auto h = contig(hidden), gw = contig(gate_weight), gb = contig(gate_bias), jw = contig(joint_weight),
             jb = contig(joint_bias), sts = contig(sts_temperature), sd = contig(seed), of = contig(offset),
             d2t = contig(draft_to_target);

  auto opts = at::TensorOptions().device(dev);
  at::Tensor out_tokens = at::empty({R, G}, opts.dtype(at::kLong));
  at::Tensor out_logits = at::empty({R, G, V}, opts.dtype(at::kFloat));
  at::Tensor out_conf = conf ? at::empty({R, G}, opts.dtype(at::kFloat)) : at::empty({0}, opts.dtype(at::kFloat));
  if (R == 0) return {out_tokens, out_logits, out_conf};

  dspark_dspark_draft_params p{};
  p.num_requests = static_cast<int32_t>(R);
  p.num_positions = static_cast<int32_t>(G);
  p.vocab_size = static_cast<int32_t>(V);
  p.hidden_size = static_cast<int32_t>(D);
  p.rank = static_cast<int32_t>(Rk);
  p.head_type = static_cast<dspark_markov_head>(head_type);
  p.base_logits = U.data_ptr();
  p.logits_dtype = to_dspark_dtype(U, kOp, "base_logits");
  if (h) {
    p.hidden = h->data_ptr();
    p.hidden_dtype = to_dspark_dtype(*h, kOp, "hidden");
  }
  p.anchor_tokens = anc.data_ptr<int64_t>();
  if (d2t) {
    p.draft_to_target = d2t->data_ptr<int64_t>();
    p.target_vocab_size = static_cast<int32_t>(Vw1);
  }
  p.weight_dtype = wdt;
  p.markov_w1 = w1.data_ptr();
  p.markov_w2 = w2.data_ptr();
  if (head_type == DSPARK_MARKOV_GATED) {
    p.gate_weight = gw->data_ptr();
    p.gate_bias = gb->data_ptr();
  }
  if (head_type == DSPARK_MARKOV_RNN) {
    p.joint_weight = jw->data_ptr();
    p.joint_bias = jb->data_ptr();
  }
  if (conf) {
    p.conf_weight = cw.data_ptr();
    p.conf_bias = cb.data_ptr();
    p.conf_with_markov = conf_with_markov;
    p.out_confidence = out_conf.data_ptr<float>();
  }
  p.sts_temperature = sts ? sts->data_ptr<float>() : nullptr;
  p.temperature = temp.data_ptr<float>();
  p.seed = data_or_null<int64_t>(sd);
  p.offset = data_or_null<int64_t>(of);
  p.out_tokens = out_tokens.data_ptr<int64_t>();
  p.out_logits = out_logits.data_ptr<float>();

  if (dev.is_cpu()) {
    throw_on_error(dspark_dspark_draft_cpu(&p), kOp);
  } else {
#ifdef DSPARK_WITH_CUDA
    const c10::cuda::CUDAGuard guard(dev);
    const size_t ws = dspark_dspark_draft_workspace_size(p.num_requests, p.rank);
    at::Tensor workspace = at::empty({static_cast<int64_t>(ws)}, opts.dtype(at::kByte));
    p.workspace = workspace.data_ptr();
    p.workspace_bytes = ws;
    throw_on_error(dspark_dspark_draft_cuda(&p, c10::cuda::getCurrentCUDAStream(dev.index()).stream()), kOp);
#else
    TORCH_CHECK(false, kOp, ": this build has no CUDA kernels");
#endif
  }
  return {out_tokens, out_logits, out_conf};
}

}  // namespace
}  // namespace dspark_torch

TORCH_LIBRARY_FRAGMENT(dspark, m) {
  m.def(
      "dspark_draft(Tensor base_logits, Tensor? hidden, Tensor anchor_tokens, Tensor markov_w1, Tensor markov_w2, "
      "Tensor? gate_weight, Tensor? gate_bias, Tensor? joint_weight, Tensor? joint_bias, Tensor? conf_weight, "
      "Tensor? conf_bias, Tensor? sts_temperature, Tensor temperature, Tensor? seed, Tensor? offset, int head_type, "
      "Tensor? draft_to_target=None) "
      "-> (Tensor tokens, Tensor logits, Tensor confidence)");
}

TORCH_LIBRARY_IMPL(dspark, CPU, m) { m.impl("dspark_draft", &dspark_torch::dspark_draft); }

#ifdef DSPARK_WITH_CUDA
TORCH_LIBRARY_IMPL(dspark, CUDA, m) { m.impl("dspark_draft", &dspark_torch::dspark_draft); }
#endif
