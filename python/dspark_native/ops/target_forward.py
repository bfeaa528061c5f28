"""``target_forward`` and ``inject_context``: typed wrappers and fake kernels (schemas and kernels:
csrc/torch/target_forward.cpp, contract: csrc/include/dspark/target_forward.h), plus the weight
packing the kernels read.

Used by :mod:`dspark_native.models.fused` (``TargetModel.set_weights("native")``); engines that
hold their own weights can call it directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._native import load_library
from ._util import register_fake_if_built

load_library()

__all__ = ["pack_panels", "pack_gate_up_panels", "target_forward", "inject_context", "target_forward_isa"]

PANEL = 16  # output features per panel


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """``weight [N, K]`` (any float dtype) -> the kernel's bf16 panel array (flat), rounded to
    nearest-even bf16: panel p holds features 16p..16p+15 as (W[n, 2j], W[n, 2j+1]) pairs."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    N, K = weight.shape
    Np, K2 = -(-N // PANEL), -(-K // 2)
    w = weight.detach().to(torch.bfloat16)
    if Np * PANEL != N or 2 * K2 != K:
        w = torch.nn.functional.pad(w, (0, 2 * K2 - K, 0, Np * PANEL - N))
    return w.reshape(Np, PANEL, K2, 2).permute(0, 2, 1, 3).contiguous().reshape(-1)


def pack_gate_up_panels(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Gate and up weights ``[I, H]`` each (I a multiple of 16) -> one panel array whose panels
    alternate gate panel p, up panel p (the kernel computes silu(gate) * up per panel pair)."""
    if gate.shape != up.shape or gate.dim() != 2 or gate.shape[0] % PANEL:
        raise ValueError(
            f"gate and up must both be [I, H] with I a multiple of {PANEL}, got "
            f"{tuple(gate.shape)} and {tuple(up.shape)}"
        )
    I, H = gate.shape  # noqa: E741 - I = intermediate size, as in the docstring's shapes
    both = torch.stack([gate.reshape(I // PANEL, PANEL, H), up.reshape(I // PANEL, PANEL, H)], 1)
    return pack_panels(both.reshape(2 * I, H))


def target_forward(
    h: torch.Tensor,
    positions: torch.Tensor,
    cu_seqlens: torch.Tensor,
    slots: torch.Tensor,
    base: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layer_weights: Sequence[torch.Tensor],
    lm_head: torch.Tensor,
    final_norm: torch.Tensor,
    inv_freq: torch.Tensor,
    logit_rows: torch.Tensor,
    feature_layers: Sequence[int],
    *,
    num_heads: int,
    intermediate_size: int,
    vocab_size: int,
    eps: float,
    num_threads: int = 0,
    block_attention: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole target forward over a ragged batch of chain blocks (CPU).

    Args:
        h: [T, H] fp32 embeddings of the rows; overwritten with the last layer's output.
        positions: [T] int64 RoPE positions. cu_seqlens: [R + 1] int64. slots, base: [R] int64
            cache slot and cached length (before this call) of each request.
        k_cache, v_cache: [L, max_requests, Hkv, max_seq, d] fp32; row t of request r is written
            at position base[r] + (t - cu[r]) and attends causally up to it, or, with
            ``block_attention``, to the whole block of its request (a DFlash-style drafter's
            parallel block: :meth:`DSparkDrafter.propose` on the CPU).
        layer_weights: 9 tensors per layer: qkv, o, gate_up, down panels (bf16, from
            :func:`pack_panels` / :func:`pack_gate_up_panels`), input_norm, post_norm [H] fp32,
            q_norm, k_norm [d] fp32, qkv_bias [(Hq + 2 Hkv) d] fp32 (empty tensors when the model
            has none).
        lm_head: panels of [V, H]. final_norm: [H]. inv_freq: [d / 2] fp32 (scaling applied).
        logit_rows: [n] int64 rows that get logits. feature_layers: layers whose outputs are
            returned, in order.
    Returns:
        logits [n, V] fp32 and features [T, len(feature_layers) * H] fp32.
    """
    return torch.ops.dspark.target_forward(
        h,
        positions,
        cu_seqlens,
        slots,
        base,
        k_cache,
        v_cache,
        list(layer_weights),
        lm_head,
        final_norm,
        inv_freq,
        logit_rows,
        list(feature_layers),
        num_heads,
        intermediate_size,
        vocab_size,
        eps,
        num_threads,
        block_attention,
    )


def inject_context(
    features: torch.Tensor,
    positions: torch.Tensor,
    cu_seqlens: torch.Tensor,
    slots: torch.Tensor,
    base: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    fc: torch.Tensor,
    context_norm: torch.Tensor,
    layer_weights: Sequence[torch.Tensor],
    inv_freq: torch.Tensor,
    *,
    num_heads: int,
    eps: float,
    num_threads: int = 0,
) -> None:
    """A DFlash / DSpark drafter's context K/V from target features ("KV injection", CPU).

    Args:
        features: [N, F] fp32 target features (F = k target layers x H), rows of request r at
            cu_seqlens[r] .. cu_seqlens[r+1]-1, cache positions base[r] + (t - cu[r]).
        positions: [N] int64 RoPE positions. cu_seqlens: [R + 1] int64. slots, base: [R] int64.
        k_cache, v_cache: [L, max_requests, Hkv, max_seq, d] fp32, written in place.
        fc: panels of the [H, F] fc weight (:func:`pack_panels`). context_norm: [H] fp32
            (the drafter's hidden_norm).
        layer_weights: 3 tensors per layer: the layer's qkv panels (as for
            :func:`target_forward`; only its k and v rows are read), k_norm [d] fp32 and
            qkv_bias [(Hq + 2 Hkv) d] fp32 (empty tensors when the model has none).
        inv_freq: [d / 2] fp32. num_heads: Hq (Hq d a multiple of 16).
    """
    torch.ops.dspark.inject_context(
        features,
        positions,
        cu_seqlens,
        slots,
        base,
        k_cache,
        v_cache,
        fc,
        context_norm,
        list(layer_weights),
        inv_freq,
        num_heads,
        eps,
        num_threads,
    )


def target_forward_isa() -> str:
    """The GEMM micro-kernel the CPU runs: "avx512-bf16", "avx512", "avx2" or "generic"."""
    return torch.ops.dspark.target_forward_isa()


@register_fake_if_built("target_forward")
def _fake(
    h,
    positions,
    cu_seqlens,
    slots,
    base,
    k_cache,
    v_cache,
    layer_weights,
    lm_head,
    final_norm,
    inv_freq,
    logit_rows,
    feature_layers: list[int],
    num_heads,
    intermediate_size,
    vocab_size,
    eps,
    num_threads=0,
    block_attention=False,
):
    T, H = h.shape
    return (h.new_empty(logit_rows.shape[0], vocab_size), h.new_empty(T, len(feature_layers) * H))


@register_fake_if_built("inject_context")
def _fake_inject(
    features,
    positions,
    cu_seqlens,
    slots,
    base,
    k_cache,
    v_cache,
    fc,
    context_norm,
    layer_weights,
    inv_freq,
    num_heads,
    eps,
    num_threads=0,
):
    return None
