"""Reference of ``target_forward``: the whole forward of a Llama / Qwen3 target over a ragged batch
of chain blocks, with the kernel's rounding (bf16 weights and GEMM inputs, fp32 everything else).
Mirrors csrc/include/dspark/target_forward.h and takes the op's arguments (panelled weights are
unpacked here); mutates h and the caches like the op. Pure PyTorch, float64 accumulation: the
kernel must agree to fp32 rounding."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["target_forward_reference", "inject_context_reference", "unpack_panels"]

PANEL = 16


def unpack_panels(panels: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`dspark_native.ops.target_forward.pack_panels`: the [n, k] bf16 weight."""
    Np, K2 = -(-n // PANEL), -(-k // 2)
    w = panels.reshape(Np, K2, PANEL, 2).permute(0, 2, 1, 3).reshape(Np * PANEL, 2 * K2)
    return w[:n, :k]


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).double()


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    r = 1.0 / torch.sqrt((x32.double() ** 2).mean(-1, keepdim=True).float() + eps)
    return w.float() * (x32 * r)


def target_forward_reference(
    h,
    positions,
    cu_seqlens,
    slots,
    base,
    k_cache,
    v_cache,
    layer_weights: Sequence[torch.Tensor],
    lm_head,
    final_norm,
    inv_freq,
    logit_rows,
    feature_layers: Sequence[int],
    *,
    num_heads: int,
    intermediate_size: int,
    vocab_size: int,
    eps: float,
    num_threads: int = 0,
    block_attention: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    T, H = h.shape
    L, _, Hkv, _, d = k_cache.shape
    Hq, I, half = num_heads, intermediate_size, d // 2  # noqa: E741 - I = intermediate size
    nq = (Hq + 2 * Hkv) * d
    cu = cu_seqlens.tolist()
    row_req = [r for r in range(len(cu) - 1) for _ in range(cu[r], cu[r + 1])]
    row_pos = [int(base[r]) + t - cu[r] for t, r in enumerate(row_req)]
    # last position each row attends to: itself (causal) or its request's last block row
    row_end = [int(base[r]) + cu[r + 1] - 1 - cu[r] if block_attention else row_pos[t] for t, r in enumerate(row_req)]
    ang = positions.float()[:, None] * inv_freq.float()[None, :]
    cos, sin = torch.cos(ang), torch.sin(ang)
    feats = {}
    for li in range(L):
        w = layer_weights[9 * li : 9 * li + 9]
        Wqkv = unpack_panels(w[0], nq, H).double()
        Wo = unpack_panels(w[1], H, Hq * d).double()
        gu = unpack_panels(w[2], 2 * I, H).double().reshape(I // PANEL, 2, PANEL, H)
        Wg, Wu = gu[:, 0].reshape(I, H), gu[:, 1].reshape(I, H)
        Wd = unpack_panels(w[3], H, I).double()
        x = _bf16(_rms(h, w[4], eps))
        qkv = (x @ Wqkv.T).float()
        if w[8].numel():
            qkv = qkv + w[8].float()
        heads = qkv[:, : (Hq + Hkv) * d].reshape(T, Hq + Hkv, d)
        if w[6].numel():
            heads = torch.cat([_rms(heads[:, :Hq], w[6], eps), _rms(heads[:, Hq:], w[7], eps)], 1)
        x1, x2 = heads[..., :half], heads[..., half:]
        c, s = cos[:, None, :], sin[:, None, :]
        heads = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)
        v = qkv[:, (Hq + Hkv) * d :].reshape(T, Hkv, d)
        for t, r in enumerate(row_req):
            k_cache[li, slots[r], :, row_pos[t]] = heads[t, Hq:]
            v_cache[li, slots[r], :, row_pos[t]] = v[t]
        attn = torch.empty(T, Hq * d)
        for t, r in enumerate(row_req):
            K = k_cache[li, slots[r], :, : row_end[t] + 1].double()  # [Hkv, span, d]
            V = v_cache[li, slots[r], :, : row_end[t] + 1].double()
            g = Hq // Hkv
            for hq in range(Hq):
                sc = (K[hq // g] @ heads[t, hq].double()) / math.sqrt(d)
                p = torch.softmax(sc, 0)
                attn[t, hq * d : (hq + 1) * d] = (p @ V[hq // g]).float()
        h += (_bf16(attn) @ Wo.T).float()
        x = _bf16(_rms(h, w[5], eps))
        g_, u_ = (x @ Wg.T).float(), (x @ Wu.T).float()
        act = _bf16(torch.nn.functional.silu(g_) * u_)
        h += (act @ Wd.T).float()
        if li in feature_layers:
            feats[li] = h.clone()
    Wh = unpack_panels(lm_head, vocab_size, H).double()
    rows = h[logit_rows]
    logits = (_bf16(_rms(rows, final_norm, eps)) @ Wh.T).float()
    features = torch.cat([feats[i] for i in feature_layers], -1) if feature_layers else h.new_empty(T, 0)
    return logits, features


def inject_context_reference(
    features,
    positions,
    cu_seqlens,
    slots,
    base,
    k_cache,
    v_cache,
    fc,
    context_norm,
    layer_weights: Sequence[torch.Tensor],
    inv_freq,
    *,
    num_heads: int,
    eps: float,
    num_threads: int = 0,
) -> None:
    """Reference of :func:`dspark_native.ops.inject_context` (writes the caches in place)."""
    N, F = features.shape
    L, _, Hkv, _, d = k_cache.shape
    H = context_norm.shape[0]
    Hq, half = num_heads, d // 2
    nq = (Hq + 2 * Hkv) * d
    cu = cu_seqlens.tolist()
    row_req = [r for r in range(len(cu) - 1) for _ in range(cu[r], cu[r + 1])]
    row_pos = [int(base[r]) + t - cu[r] for t, r in enumerate(row_req)]
    ang = positions.float()[:, None] * inv_freq.float()[None, :]
    cos, sin = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
    c = (_bf16(features) @ unpack_panels(fc, H, F).double().T).float()
    x = _bf16(_rms(c, context_norm, eps))
    for li in range(L):
        wq, k_norm, bias = layer_weights[3 * li : 3 * li + 3]
        kv = (x @ unpack_panels(wq, nq, H).double()[Hq * d :].T).float()
        if bias.numel():
            kv = kv + bias.float()[Hq * d :]
        k = kv[:, : Hkv * d].reshape(N, Hkv, d)
        v = kv[:, Hkv * d :].reshape(N, Hkv, d)
        if k_norm.numel():
            k = _rms(k, k_norm, eps)
        k1, k2 = k[..., :half], k[..., half:]
        k = torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], -1)
        for t, r in enumerate(row_req):
            k_cache[li, slots[r], :, row_pos[t]] = k[t]
            v_cache[li, slots[r], :, row_pos[t]] = v[t]
