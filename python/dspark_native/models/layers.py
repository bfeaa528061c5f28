"""Building blocks shared by the target and the drafters (Llama / Qwen3 decoder layers).

Parameter names follow Hugging Face / DeepSpec exactly so that ``state_dict`` keys are the
checkpoint keys (targets add the HF ``model.`` prefix in the loader).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm with the HF numerics: normalise in fp32, cast back, then scale.

    x: [..., dim] any float dtype -> same shape and dtype.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling=None, device=None) -> torch.Tensor:
    """RoPE inverse frequencies fp32 [head_dim / 2]: theta^(-2i/d) (computed in fp32 as HF does),
    then, with ``scaling`` (a :class:`~dspark_native.models.config.RopeScaling`, rope_type
    "llama3"), Llama 3's frequency-dependent rescaling: with wavelength w = 2 pi / f and
    L = original_max_position_embeddings, high frequencies (w < L / high_freq_factor) are kept,
    low ones (w > L / low_freq_factor) divided by ``factor``, and the band in between blended
    linearly in s = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    if scaling is None:
        return inv_freq
    L = float(scaling.original_max_position_embeddings)
    wavelen = 2 * math.pi / inv_freq
    s = (L / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    s = s.clamp(0.0, 1.0)  # 0 below the band (low frequencies), 1 above it (high frequencies)
    return (1 - s) * inv_freq / scaling.factor + s * inv_freq


_INV_FREQ: dict = {}


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, scaling=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE tables for int64 positions [...] -> cos, sin [..., head_dim] in dtype.

    Frequencies from :func:`rope_inv_freq` (``scaling``: the config's ``rope_scaling``, None for
    plain RoPE). Angles are computed in fp32 (as HF does) and cast afterwards.
    """
    key = (head_dim, float(theta), scaling, positions.device)
    inv_freq = _INV_FREQ.get(key)
    if inv_freq is None:
        # a few small ops per call add up in a drafter round at batch 1: cache the frequencies
        inv_freq = _INV_FREQ[key] = rope_inv_freq(head_dim, theta, scaling, positions.device)
    freqs = positions.float().unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., heads, head_dim]; cos/sin: [..., head_dim] (broadcast over heads)."""
    cos = cos.unsqueeze(-2)
    sin = sin.unsqueeze(-2)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Projection weights of one attention block (the attention itself is done by the caller,
    which knows the cache layout and mask). ``in_dim`` is 2H for EAGLE-3, H otherwise. q/k/v
    carry biases when ``cfg.qkv_bias`` (Qwen2); o_proj never does."""

    def __init__(self, cfg: ModelConfig, in_dim: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        bias = bool(getattr(cfg, "qkv_bias", False))
        self.q_proj = nn.Linear(in_dim, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(in_dim, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(in_dim, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = None
            self.k_norm = None

    def q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [..., in_dim] -> q [..., heads, head_dim] after q_norm (Qwen3) and RoPE."""
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        if self.q_norm is not None:
            q = self.q_norm(q)
        return apply_rope(q, cos, sin)

    def kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., in_dim] -> k, v [..., kv_heads, head_dim]; k after k_norm (Qwen3) and RoPE."""
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.k_norm is not None:
            k = self.k_norm(k)
        return apply_rope(k, cos, sin), v


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer weights: self_attn, mlp, input_layernorm, post_attention_layernorm."""

    def __init__(self, cfg: ModelConfig, attn_in_dim: int = 0):
        super().__init__()
        self.self_attn = Attention(cfg, attn_in_dim or cfg.hidden_size)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def finish(self, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Residual add of the attention output [..., heads*head_dim] then the MLP block."""
        h = h + self.self_attn.o_proj(attn_out)
        return h + self.mlp(self.post_attention_layernorm(h))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Grouped-query SDPA. q [B, Hq, n, d], k/v [B, Hkv, L, d], bool mask broadcastable to
    [B, 1, n, L] (True = attend) -> [B, Hq, n, d]."""
    if k.shape[1] != q.shape[1]:
        if _GQA_OK:
            # Native GQA avoids materialising Hq/Hkv copies of the cached K/V.
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _probe_gqa() -> bool:
    try:
        q = torch.zeros(1, 2, 1, 2)
        k = torch.zeros(1, 1, 1, 2)
        F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
        return True
    except (TypeError, RuntimeError):
        return False


_GQA_OK = _probe_gqa()
