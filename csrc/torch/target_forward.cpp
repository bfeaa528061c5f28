// torch glue of target_forward and inject_context (contract: csrc/include/dspark/target_forward.h):
// schemas and the CPU registrations. CPU only: on a GPU the fused Python path runs the same math through cuBLAS.
// The fake kernel is registered from Python (dspark_native/ops/target_forward.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "common.h"
#include "dspark/target_forward.h"

namespace dspark_torch {
namespace {

constexpr const char* kOp = "target_forward";
constexpr int64_t kPerLayer = 9;  // qkv, o, gate_up, down, input_norm, post_norm, q_norm, k_norm, qkv_bias

void check_cpu_contig(const at::Tensor& t, at::ScalarType st, const char* name) {
  check_dtype(t, st, kOp, name);
  TORCH_CHECK(t.device().is_cpu(), kOp, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous");
}

void check_panels(const at::Tensor& t, int64_t n, int64_t k, const char* name, int64_t layer) {
  check_cpu_contig(t, at::kBFloat16, name);
  const int64_t want = dspark_target_panel_elements(n, k);
  TORCH_CHECK(t.numel() == want, kOp, ": layer ", layer, " ", name, " must hold the panels of a [", n, ", ", k,
              "] weight (", want, " bf16 elements), got ", t.numel());
}

std::tuple<at::Tensor, at::Tensor> target_forward(
    const at::Tensor& h, const at::Tensor& positions, const at::Tensor& cu_seqlens, const at::Tensor& slots,
    const at::Tensor& base, const at::Tensor& k_cache, const at::Tensor& v_cache, at::TensorList layer_weights,
    const at::Tensor& lm_head, const at::Tensor& final_norm, const at::Tensor& inv_freq, const at::Tensor& logit_rows,
    at::IntArrayRef feature_layers, int64_t num_heads, int64_t intermediate_size, int64_t vocab_size, double eps,
    int64_t num_threads, bool block_attention) {
  check_cpu_contig(h, at::kFloat, "h");
  TORCH_CHECK(h.dim() == 2, kOp, ": h must be [T, H], got ", h.sizes());
  const int64_t T = h.size(0), H = h.size(1);
  check_cpu_contig(k_cache, at::kFloat, "k_cache");
  check_cpu_contig(v_cache, at::kFloat, "v_cache");
  TORCH_CHECK(k_cache.dim() == 5 && k_cache.sizes() == v_cache.sizes(), kOp,
              ": k_cache and v_cache must be [layers, max_requests, kv_heads, max_seq, head_dim], got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t L = k_cache.size(0), Hkv = k_cache.size(2), d = k_cache.size(4);
  TORCH_CHECK(static_cast<int64_t>(layer_weights.size()) == kPerLayer * L, kOp, ": layer_weights must hold ",
              kPerLayer, " tensors per layer (", kPerLayer * L, "), got ", layer_weights.size());
  check_cpu_contig(positions, at::kLong, "positions");
  check_shape_1d(positions, T, kOp, "positions");
  check_cpu_contig(cu_seqlens, at::kLong, "cu_seqlens");
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1, kOp, ": cu_seqlens must be [R + 1]");
  const int64_t R = cu_seqlens.size(0) - 1;
  check_cpu_contig(slots, at::kLong, "slots");
  check_shape_1d(slots, R, kOp, "slots");
  check_cpu_contig(base, at::kLong, "base");
  check_shape_1d(base, R, kOp, "base");
  check_cpu_contig(inv_freq, at::kFloat, "inv_freq");
  check_shape_1d(inv_freq, d / 2, kOp, "inv_freq");
  check_cpu_contig(final_norm, at::kFloat, "final_norm");
  check_shape_1d(final_norm, H, kOp, "final_norm");
  check_cpu_contig(logit_rows, at::kLong, "logit_rows");
  TORCH_CHECK(logit_rows.dim() == 1, kOp, ": logit_rows must be 1-D");
  TORCH_CHECK(num_heads >= 1 && num_heads % Hkv == 0, kOp, ": num_heads must be a positive multiple of kv_heads");
  const int64_t nqkv = (num_heads + 2 * Hkv) * d;

  std::vector<dspark_target_layer> layers(L);
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = &layer_weights[l * kPerLayer];
    check_panels(w[0], nqkv, H, "qkv", l);
    check_panels(w[1], H, num_heads * d, "o", l);
    check_panels(w[2], 2 * intermediate_size, H, "gate_up", l);
    check_panels(w[3], H, intermediate_size, "down", l);
    check_cpu_contig(w[4], at::kFloat, "input_norm");
    check_shape_1d(w[4], H, kOp, "input_norm");
    check_cpu_contig(w[5], at::kFloat, "post_norm");
    check_shape_1d(w[5], H, kOp, "post_norm");
    dspark_target_layer& Ld = layers[l];
    Ld.qkv = reinterpret_cast<const uint16_t*>(w[0].data_ptr());
    Ld.o = reinterpret_cast<const uint16_t*>(w[1].data_ptr());
    Ld.gate_up = reinterpret_cast<const uint16_t*>(w[2].data_ptr());
    Ld.down = reinterpret_cast<const uint16_t*>(w[3].data_ptr());
    Ld.input_norm = w[4].data_ptr<float>();
    Ld.post_norm = w[5].data_ptr<float>();
    for (int j = 6; j < 8; ++j)
      if (w[j].numel() != 0) {
        check_cpu_contig(w[j], at::kFloat, j == 6 ? "q_norm" : "k_norm");
        check_shape_1d(w[j], d, kOp, j == 6 ? "q_norm" : "k_norm");
      }
    Ld.q_norm = w[6].numel() ? w[6].data_ptr<float>() : nullptr;
    Ld.k_norm = w[7].numel() ? w[7].data_ptr<float>() : nullptr;
    if (w[8].numel() != 0) {
      check_cpu_contig(w[8], at::kFloat, "qkv_bias");
      check_shape_1d(w[8], nqkv, kOp, "qkv_bias");
    }
    Ld.qkv_bias = w[8].numel() ? w[8].data_ptr<float>() : nullptr;
  }
  check_panels(lm_head, vocab_size, H, "lm_head", -1);

  const std::vector<int32_t> feats(feature_layers.begin(), feature_layers.end());
  const int64_t F = static_cast<int64_t>(feats.size());
  const int64_t n = logit_rows.size(0);
  at::Tensor logits = at::empty({n, vocab_size}, h.options());
  at::Tensor features = at::empty({T, F * H}, h.options());

  dspark_target_forward_params p{};
  p.num_layers = static_cast<int32_t>(L);
  p.hidden_size = static_cast<int32_t>(H);
  p.intermediate_size = static_cast<int32_t>(intermediate_size);
  p.num_heads = static_cast<int32_t>(num_heads);
  p.num_kv_heads = static_cast<int32_t>(Hkv);
  p.head_dim = static_cast<int32_t>(d);
  p.vocab_size = static_cast<int32_t>(vocab_size);
  p.rms_norm_eps = static_cast<float>(eps);
  p.inv_freq = inv_freq.data_ptr<float>();
  p.layers = layers.data();
  p.lm_head = reinterpret_cast<const uint16_t*>(lm_head.data_ptr());
  p.final_norm = final_norm.data_ptr<float>();
  p.num_requests = static_cast<int32_t>(R);
  p.num_rows = T;
  p.cu_seqlens = cu_seqlens.data_ptr<int64_t>();
  p.slots = slots.data_ptr<int64_t>();
  p.base = base.data_ptr<int64_t>();
  p.positions = positions.data_ptr<int64_t>();
  p.h = h.data_ptr<float>();
  p.k_cache = k_cache.data_ptr<float>();
  p.v_cache = v_cache.data_ptr<float>();
  p.max_requests = k_cache.size(1);
  p.max_seq = k_cache.size(3);
  p.num_feature_layers = static_cast<int32_t>(F);
  p.feature_layers = feats.data();
  p.features = F ? features.data_ptr<float>() : nullptr;
  p.num_logit_rows = n;
  p.logit_rows = logit_rows.data_ptr<int64_t>();
  p.logits = n ? logits.data_ptr<float>() : nullptr;
  p.num_threads = static_cast<int32_t>(num_threads);
  p.block_attention = block_attention ? 1 : 0;
  throw_on_error(dspark_target_forward_cpu(&p), kOp);
  return {logits, features};
}

void inject_context(const at::Tensor& features, const at::Tensor& positions, const at::Tensor& cu_seqlens,
                    const at::Tensor& slots, const at::Tensor& base, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& fc, const at::Tensor& context_norm, at::TensorList layer_weights,
                    const at::Tensor& inv_freq, int64_t num_heads, double eps, int64_t num_threads) {
  constexpr const char* op = "inject_context";
  auto contig = [&](const at::Tensor& t, at::ScalarType st, const char* name) {
    check_dtype(t, st, op, name);
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  };
  contig(features, at::kFloat, "features");
  TORCH_CHECK(features.dim() == 2, op, ": features must be [N, F], got ", features.sizes());
  const int64_t N = features.size(0), F = features.size(1);
  contig(k_cache, at::kFloat, "k_cache");
  contig(v_cache, at::kFloat, "v_cache");
  TORCH_CHECK(k_cache.dim() == 5 && k_cache.sizes() == v_cache.sizes(), op,
              ": k_cache and v_cache must be [layers, max_requests, kv_heads, max_seq, head_dim], got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t L = k_cache.size(0), Hkv = k_cache.size(2), d = k_cache.size(4);
  TORCH_CHECK(static_cast<int64_t>(layer_weights.size()) == 3 * L, op,
              ": layer_weights must hold 3 tensors per layer (qkv panels, k_norm, qkv_bias), ", 3 * L, " in all, got ",
              layer_weights.size());
  contig(context_norm, at::kFloat, "context_norm");
  TORCH_CHECK(context_norm.dim() == 1, op, ": context_norm must be [H]");
  const int64_t H = context_norm.size(0);
  contig(fc, at::kBFloat16, "fc");
  TORCH_CHECK(fc.numel() == dspark_target_panel_elements(H, F), op, ": fc must hold the panels of a [", H, ", ", F,
              "] weight (", dspark_target_panel_elements(H, F), " bf16 elements), got ", fc.numel());
  contig(positions, at::kLong, "positions");
  check_shape_1d(positions, N, op, "positions");
  contig(cu_seqlens, at::kLong, "cu_seqlens");
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1, op, ": cu_seqlens must be [R + 1]");
  const int64_t R = cu_seqlens.size(0) - 1;
  contig(slots, at::kLong, "slots");
  check_shape_1d(slots, R, op, "slots");
  contig(base, at::kLong, "base");
  check_shape_1d(base, R, op, "base");
  contig(inv_freq, at::kFloat, "inv_freq");
  check_shape_1d(inv_freq, d / 2, op, "inv_freq");
  TORCH_CHECK(num_heads >= 1 && num_heads % Hkv == 0, op, ": num_heads must be a positive multiple of kv_heads");
  const int64_t nqkv = (num_heads + 2 * Hkv) * d;
  std::vector<dspark_target_layer> layers(L);
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = &layer_weights[3 * l];
    contig(w[0], at::kBFloat16, "qkv");
    TORCH_CHECK(w[0].numel() == dspark_target_panel_elements(nqkv, H), op, ": layer ", l,
                " qkv must hold the panels of a [", nqkv, ", ", H, "] weight, got ", w[0].numel(), " elements");
    layers[l] = dspark_target_layer{};
    layers[l].qkv = reinterpret_cast<const uint16_t*>(w[0].data_ptr());
    if (w[1].numel() != 0) {
      contig(w[1], at::kFloat, "k_norm");
      check_shape_1d(w[1], d, op, "k_norm");
      layers[l].k_norm = w[1].data_ptr<float>();
    }
    if (w[2].numel() != 0) {
      contig(w[2], at::kFloat, "qkv_bias");
      check_shape_1d(w[2], nqkv, op, "qkv_bias");
      layers[l].qkv_bias = w[2].data_ptr<float>();
    }
  }
  dspark_inject_context_params p{};
  p.num_layers = static_cast<int32_t>(L);
  p.hidden_size = static_cast<int32_t>(H);
  p.num_heads = static_cast<int32_t>(num_heads);
  p.num_kv_heads = static_cast<int32_t>(Hkv);
  p.head_dim = static_cast<int32_t>(d);
  p.rms_norm_eps = static_cast<float>(eps);
  p.inv_freq = inv_freq.data_ptr<float>();
  p.layers = layers.data();
  p.feature_size = F;
  p.fc = reinterpret_cast<const uint16_t*>(fc.data_ptr());
  p.context_norm = context_norm.data_ptr<float>();
  p.num_requests = static_cast<int32_t>(R);
  p.num_rows = N;
  p.cu_seqlens = cu_seqlens.data_ptr<int64_t>();
  p.slots = slots.data_ptr<int64_t>();
  p.base = base.data_ptr<int64_t>();
  p.positions = positions.data_ptr<int64_t>();
  p.features = features.data_ptr<float>();
  p.k_cache = k_cache.data_ptr<float>();
  p.v_cache = v_cache.data_ptr<float>();
  p.max_requests = k_cache.size(1);
  p.max_seq = k_cache.size(3);
  p.num_threads = static_cast<int32_t>(num_threads);
  throw_on_error(dspark_inject_context_cpu(&p), op);
}

std::string target_forward_isa() { return dspark_target_forward_isa(); }

}  // namespace
}  // namespace dspark_torch

TORCH_LIBRARY_FRAGMENT(dspark, m) {
  m.def(
      "target_forward(Tensor(a!) h, Tensor positions, Tensor cu_seqlens, Tensor slots, Tensor base, "
      "Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor[] layer_weights, Tensor lm_head, Tensor final_norm, "
      "Tensor inv_freq, Tensor logit_rows, int[] feature_layers, int num_heads, int intermediate_size, "
      "int vocab_size, float eps, int num_threads=0, bool block_attention=False) -> (Tensor logits, "
      "Tensor features)");
  m.def(
      "inject_context(Tensor features, Tensor positions, Tensor cu_seqlens, Tensor slots, Tensor base, "
      "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor fc, Tensor context_norm, Tensor[] layer_weights, "
      "Tensor inv_freq, int num_heads, float eps, int num_threads=0) -> ()");
  m.def("target_forward_isa() -> str", &dspark_torch::target_forward_isa);
}

TORCH_LIBRARY_IMPL(dspark, CPU, m) {
  m.impl("target_forward", &dspark_torch::target_forward);
  m.impl("inject_context", &dspark_torch::inject_context);
}
