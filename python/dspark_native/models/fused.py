"""The fused inference path of a target: fewer, larger ops per decoder layer, weights packed once.

A target's ``nn.Module`` parameters keep the Hugging Face names and numerics (the *reference*
path, used by training and as the tests' oracle). For generation the engine runs the same model
through :func:`fused_forward` instead, after :func:`pack_target` has derived, once:

- one fused QKV weight ``[(Hq + 2 Hkv) d, H]`` and one fused gate/up weight ``[2 I, H]`` per layer,
  so a layer is four GEMMs instead of seven;
- on CPUs with native bf16 matrix instructions (AMX or AVX512-BF16), those four GEMMs' weights
  converted to bf16 and reordered once into oneDNN's blocked layout (``weights="bf16"``): a
  batch-1 GEMM then streams half the bytes and costs the same for 1 to 16 rows, where fp32 MKL
  re-packs the weight on every call once it has more than a couple of rows (see docs/models.md);
- RoPE as one roll + multiply-add over q and k together, RMSNorm as one op, the K/V write as a
  slice copy for a single request, and the LM head only over the rows the caller needs.

What stays in the model dtype (fp32 for the embedded model): the residual stream, norms, RoPE,
the KV cache and attention. With "bf16" the LM head is a bf16 GEMM too, so logits carry bf16
rounding (8 significant bits, as in any bf16 deployment, whose logits come out of a bf16 GEMM):
an fp32 head costs 3x as much at one row and 8x at 8 rows (fp32 MKL re-packs the 49k x 576
weight per call), which alone would break the "verification nearly free" goal. Plain and
speculative decoding run the same path on the same rows (oneDNN's result for a row does not
depend on how many rows share the GEMM: tested), so their outputs stay identical; "bf16" differs
from the reference fp32 model by bf16 rounding of the weights, GEMM inputs and GEMM outputs.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

WEIGHT_FORMATS = ("reference", "fused", "bf16", "native", "auto")

# Above this many rows a forward (a long prefill) is compute-bound, where oneDNN's AMX GEMMs beat
# the native kernel; "native" then runs the "bf16" path for that call, but only when the call
# wants no logits (a prefill: logit_rows="none"). Any forward whose logits pick tokens stays
# native whatever its size, because only the native kernel guarantees that a row's result does
# not depend on the other rows (SDPA's per-row result can move at the 1e-7 level with the block
# size, which bf16 rounding can turn into a different token at a near-tie), and that guarantee is
# what keeps speculative output identical to plain output.
NATIVE_MAX_ROWS = 64


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=1)
def cpu_runs_onednn_bf16() -> bool:
    """True when oneDNN can pack and run bf16 GEMMs on this CPU at all (its bf16 path needs
    AVX512BW/VL/DQ or AVX-NE-CONVERT; an AVX2-only CPU has neither). Off Linux: assumed."""
    if not torch.backends.mkldnn.is_available():
        return False
    flags = _cpu_flags()
    if not flags:
        return True
    return {"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags


@functools.lru_cache(maxsize=1)
def cpu_has_bf16_matmul() -> bool:
    """True when this CPU has native bf16 dot-product instructions (AMX-BF16 or AVX512-BF16) and
    torch has oneDNN: only then is a bf16 GEMM faster than an fp32 one here (without them oneDNN
    emulates bf16 and is slower). ``DSPARK_NATIVE_NO_BF16=1`` forces False."""
    if os.environ.get("DSPARK_NATIVE_NO_BF16") == "1":
        return False
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    return bool({"amx_bf16", "avx512_bf16"} & _cpu_flags())


def _has_native_op() -> bool:
    from .._native import has_native

    return has_native() and hasattr(torch.ops.dspark, "target_forward")


def resolve_weight_format(weights: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Map ``weights`` (one of WEIGHT_FORMATS) to the format that will run on ``device``.

    "auto": on the CPU "native" (the whole-forward kernel, dspark_native.ops.target_forward) when
    the compiled extension is available and the model is fp32, else "bf16" on a CPU with native
    bf16 matmul, else "fused"; off the CPU "fused". "bf16" on a CPU without bf16 instructions is
    allowed (correct, just slow) where oneDNN can run it (:func:`cpu_runs_onednn_bf16`);
    "bf16" and "native" on a non-CPU device are refused.
    """
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    if weights == "auto":
        if device.type != "cpu":
            return "fused"
        if dtype == torch.float32 and _has_native_op():
            return "native"
        return "bf16" if cpu_has_bf16_matmul() else "fused"
    if weights == "native":
        if device.type != "cpu" or dtype != torch.float32:
            raise ValueError(
                f"weights='native' runs the CPU kernel on an fp32 model; the model is {dtype} on "
                f"{device}. Use weights='fused' there."
            )
        if not _has_native_op():
            raise ValueError("weights='native' needs the compiled extension (dspark_native._C)")
    if weights in ("bf16", "native") and device.type != "cpu":
        raise ValueError(
            f"weights='bf16' packs weights for oneDNN on the CPU; the model is on {device}. "
            "Use weights='fused' (the model dtype, e.g. bfloat16 on a GPU)."
        )
    if weights in ("bf16", "native") and not torch.backends.mkldnn.is_available():
        raise ValueError("weights='bf16' needs a torch build with oneDNN (mkldnn)")
    if weights == "bf16" and not cpu_runs_onednn_bf16():
        raise ValueError(
            "weights='bf16': oneDNN's bf16 GEMM needs a CPU with AVX512BW/VL/DQ or AVX-NE-CONVERT, "
            "which this one lacks; use weights='native' (bf16 weights in our own kernel) or 'fused'"
        )
    return weights


class PackedLinear:
    """``y = x @ W^T`` for one (possibly fused) weight ``W [N, K]``.

    kind "dense": W kept in the model dtype, ``F.linear`` (any device). kind "bf16": W in bf16,
    reordered once for oneDNN; x is cast to bf16 and y is bf16 [M, N].
    """

    def __init__(self, weight: torch.Tensor, kind: str):
        self.kind = kind
        self.out_features, self.in_features = weight.shape
        if kind == "bf16":
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16).contiguous(), None)
        else:
            self.weight = weight.detach().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "bf16":
            return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.weight, None, "none", [], "")
        return F.linear(x, self.weight)

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features * (2 if self.kind == "bf16" else self.weight.element_size())


@dataclass
class _PackedLayer:
    qkv: PackedLinear
    o: PackedLinear
    gate_up: PackedLinear
    down: PackedLinear
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    qkv_bias: torch.Tensor | None = None  # [(Hq + 2 Hkv) d] fp32 (Qwen2)


@dataclass
class PackedTarget:
    """Weights of a target in the fused layout (see the module docstring)."""

    weights: str
    layers: list[_PackedLayer]
    lm_head: PackedLinear
    final_norm: torch.Tensor
    native: _NativeWeights | None = None

    @property
    def weight_bytes(self) -> int:
        """Bytes of matmul weights one forward streams (layers + LM head)."""
        if self.native is not None:
            return 2 * (
                self.native.lm_head.numel()
                + sum(w.numel() for i, w in enumerate(self.native.layer_weights) if i % 9 < 4)
            )
        return self.lm_head.nbytes + sum(p.nbytes for L in self.layers for p in (L.qkv, L.o, L.gate_up, L.down))


@dataclass
class _NativeWeights:
    """Arguments of dspark_native.ops.target_forward that depend on the weights only."""

    layer_weights: list[torch.Tensor]  # 9 per layer (see ops.target_forward)
    lm_head: torch.Tensor
    inv_freq: torch.Tensor


def _pack_native(model) -> _NativeWeights:
    from ..ops.target_forward import pack_gate_up_panels, pack_panels

    c = model.config
    lw: list[torch.Tensor] = []
    empty = torch.zeros(0)
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        lw += [
            pack_panels(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])),
            pack_panels(a.o_proj.weight),
            pack_gate_up_panels(m.gate_proj.weight, m.up_proj.weight),
            pack_panels(m.down_proj.weight),
            layer.input_layernorm.weight.detach().float().contiguous(),
            layer.post_attention_layernorm.weight.detach().float().contiguous(),
            empty if a.q_norm is None else a.q_norm.weight.detach().float().contiguous(),
            empty if a.k_norm is None else a.k_norm.weight.detach().float().contiguous(),
            _qkv_bias(a, empty),
        ]
    from .layers import rope_inv_freq

    inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)  # what the reference uses
    return _NativeWeights(lw, pack_panels(model.lm_head.weight), inv_freq.float().contiguous())


def _qkv_bias(attn, empty: torch.Tensor) -> torch.Tensor:
    """The fused q/k/v bias [(Hq + 2 Hkv) d] fp32 (Qwen2), or ``empty`` when the model has none."""
    if attn.q_proj.bias is None:
        return empty
    return torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]).detach().float().contiguous()


@torch.no_grad()
def pack_target(model, weights: str) -> PackedTarget:
    """Derive the fused weights of ``model`` (a TargetModel) for format ``weights`` ("fused" or
    "bf16", already resolved). Costs one copy of the layer weights; the module's own parameters
    are left as they are (training and the reference path keep using them)."""
    # "native" keeps oneDNN bf16 packs too, for the long prefills it hands to the "bf16" path
    kind = (
        "bf16"
        if weights in ("bf16", "native") and cpu_has_bf16_matmul()
        else ("bf16" if weights == "bf16" else "dense")
    )
    layers = []
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        layers.append(
            _PackedLayer(
                qkv=PackedLinear(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), kind),
                o=PackedLinear(a.o_proj.weight, kind),
                gate_up=PackedLinear(torch.cat([m.gate_proj.weight, m.up_proj.weight]), kind),
                down=PackedLinear(m.down_proj.weight, kind),
                input_norm=layer.input_layernorm.weight.detach(),
                post_norm=layer.post_attention_layernorm.weight.detach(),
                q_norm=None if a.q_norm is None else a.q_norm.weight.detach(),
                k_norm=None if a.k_norm is None else a.k_norm.weight.detach(),
                qkv_bias=None if a.q_proj.bias is None else _qkv_bias(a, None),
            )
        )
    return PackedTarget(
        weights=weights,
        layers=layers,
        lm_head=PackedLinear(model.lm_head.weight, kind),
        final_norm=model.norm.weight.detach(),
        native=_pack_native(model) if weights == "native" else None,
    )


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, scaling=None):
    """fp32 ``cos, sin_signed [T, 1, head_dim]`` such that rotate-half RoPE is
    ``x * cos + roll(x, head_dim / 2) * sin_signed`` (the sign of rotate_half folded into sin)."""
    from .layers import rope_cos_sin

    cos, sin = rope_cos_sin(positions, head_dim, theta, torch.float32, scaling)
    half = head_dim // 2
    sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    return cos.unsqueeze(1), sin.unsqueeze(1)


def fused_forward(model, packed: PackedTarget, input_ids, plan, cache, ids, rows):
    """The fused equivalent of ``TargetModel._forward_planned``: same arguments, same results up
    to the rounding of the chosen weight format. ``rows``: LM-head row selection (None = all,
    an index tensor, or "none")."""
    from .target import ragged_attention

    if packed.native is not None and plan.chain and (input_ids.numel() <= NATIVE_MAX_ROWS or not isinstance(rows, str)):
        return _native_forward(model, packed, input_ids, plan, cache, ids, rows)
    c = model.config
    Hq, Hkv, d, H = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
    inter, eps = c.intermediate_size, c.rms_norm_eps
    dtype = model.dtype
    T = input_ids.numel()
    nq = (Hq + Hkv) * d
    half = d // 2
    cos, sin = rope_tables(plan.positions, d, c.rope_theta, c.rope_scaling)
    single = plan.R == 1
    if single:  # one request: its rows are a contiguous range of the cache, no index_put needed
        slot = plan.slots_l[0]
        base = int(cache.host_lengths()[slot])
    want = set(ids)
    feats = {}
    h = model.embed_tokens(input_ids)
    for li, L in enumerate(packed.layers):
        x = F.rms_norm(h, (H,), L.input_norm, eps)
        qkv = L.qkv(x)
        if L.qkv_bias is not None:
            qkv = qkv + L.qkv_bias
        qk = qkv[:, :nq].view(T, Hq + Hkv, d).float()
        if L.q_norm is not None:
            qk = torch.cat(
                [
                    F.rms_norm(qk[:, :Hq], (d,), L.q_norm.float(), eps),
                    F.rms_norm(qk[:, Hq:], (d,), L.k_norm.float(), eps),
                ],
                dim=1,
            )
        qk = torch.addcmul(qk * cos, qk.roll(half, -1), sin)
        q = qk[:, :Hq].to(dtype)
        k = qk[:, Hq:]
        v = qkv[:, nq:].view(T, Hkv, d)
        if single:
            cache.k_cache[li, slot, :, base : base + T].copy_(k.transpose(0, 1))
            cache.v_cache[li, slot, :, base : base + T].copy_(v.transpose(0, 1))
        else:
            cache.k_cache[li, plan.slot_t, :, plan.store_t] = k.to(dtype)
            cache.v_cache[li, plan.slot_t, :, plan.store_t] = v.to(dtype)
        attn = ragged_attention(q, cache.k_cache[li], cache.v_cache[li], plan)
        h = h + L.o(attn)
        x = F.rms_norm(h, (H,), L.post_norm, eps)
        gu = L.gate_up(x)
        h = h + L.down(F.silu(gu[:, :inter]) * gu[:, inter:])
        if li in want:
            feats[li] = h
    cache.advance(plan.slots, plan.counts, plan.slots_l, plan.counts_l)
    if isinstance(rows, str):  # "none": the caller needs the features only (prefill)
        logits = None
    else:
        hr = h if rows is None else h[rows]
        logits = packed.lm_head(F.rms_norm(hr, (H,), packed.final_norm, eps)).float()
    hidden = torch.cat([feats[i] for i in ids], dim=-1).to(dtype) if ids else None
    return logits, hidden


def _native_forward(model, packed: PackedTarget, input_ids, plan, cache, ids, rows):
    from ..ops.target_forward import target_forward

    c = model.config
    T = input_ids.numel()
    nw = packed.native
    h = model.embed_tokens(input_ids).float().contiguous()
    cu = torch.zeros(plan.R + 1, dtype=torch.int64)
    torch.cumsum(plan.counts, 0, out=cu[1:])
    if isinstance(rows, str):
        lrows = torch.zeros(0, dtype=torch.int64)
    else:
        lrows = torch.arange(T) if rows is None else rows.contiguous()
    logits, feats = target_forward(
        h,
        plan.positions.contiguous(),
        cu,
        plan.slots.contiguous(),
        cache.host_lengths()[plan.slots].contiguous(),
        cache.k_cache,
        cache.v_cache,
        nw.layer_weights,
        nw.lm_head,
        packed.final_norm,
        nw.inv_freq,
        lrows,
        list(ids),
        num_heads=c.num_attention_heads,
        intermediate_size=c.intermediate_size,
        vocab_size=c.vocab_size,
        eps=c.rms_norm_eps,
    )
    cache.advance(plan.slots, plan.counts, plan.slots_l, plan.counts_l)
    return (None if isinstance(rows, str) else logits), (feats if ids else None)
