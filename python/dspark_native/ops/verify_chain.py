"""``verify_chain``: typed wrapper and fake kernel (schema and kernels: csrc/torch/verify_chain.cpp)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._native import load_library
from ._util import Number, per_request, register_fake_if_built

load_library()

__all__ = ["VerifyChainOutput", "verify_chain", "DRAFT_ONE_HOT", "DRAFT_LOGITS", "DRAFT_PROBS"]

DRAFT_ONE_HOT, DRAFT_LOGITS, DRAFT_PROBS = 0, 1, 2


class VerifyChainOutput(NamedTuple):
    tokens: torch.Tensor  #: [R, max_drafts + 1] int64, emitted tokens, -1 padded
    num_accepted: torch.Tensor  #: [R] int64, accepted drafts per request
    accept_prob: torch.Tensor  #: [N - R] float32 sum_v min(p, q) per draft row (empty unless asked)


def verify_chain(
    target_logits: torch.Tensor,
    cu_target_rows: torch.Tensor,
    draft_tokens: torch.Tensor,
    *,
    draft_logits: torch.Tensor | None = None,
    draft_probs: torch.Tensor | None = None,
    temperature: Number | torch.Tensor = 0.0,
    top_k: int | torch.Tensor | None = None,
    top_p: float | torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor | None = None,
    max_drafts: int | None = None,
    return_accept_prob: bool = False,
) -> VerifyChainOutput:
    """Chain (block) verification with lossless rejection sampling, fused over a ragged batch.

    Request ``r`` verifies ``l_r = cu[r+1] - cu[r] - 1`` drafts against its ``l_r + 1`` target rows.

    Args:
        target_logits: [N, V] float32/float16/bfloat16 target logits; rows of request r are
            ``cu[r] .. cu[r+1]-1`` (one per draft position plus the bonus position).
        cu_target_rows: [R + 1] int64 row offsets, ``cu[0] = 0``, ``cu[R] = N``.
        draft_tokens: [N - R] int64 drafts; request r's are ``cu[r]-r .. cu[r+1]-r-2``.
        draft_logits: optional [N - R, V] logits the drafts were sampled from (divided by the
            request's temperature, no top-k/top-p). Mutually exclusive with ``draft_probs``.
        draft_probs: optional [N - R, V] probabilities the drafts were sampled from.
            With neither, drafts are one-hot (deterministic drafters).
        temperature: scalar or [R] float32; 0 = greedy (exact argmax match), may be mixed.
        top_k: scalar or [R] int32; <= 0 or >= V disables. Applied to the target only.
        top_p: scalar or [R] float32; >= 1 disables. Applied after top-k, to the target only.
        seed, offset: scalar or [R] int64 Philox key and counter offset (advance ``offset`` by 1
            per call for fresh draws). Default 0.
        max_drafts: gamma, the output width minus one. Default: the largest ``l_r`` (this reads
            ``cu_target_rows`` on the host; pass it explicitly under CUDA graphs / torch.compile).
        return_accept_prob: also return ``sum_v min(p_k, q_k)`` for every draft row.

    Returns:
        VerifyChainOutput(tokens [R, gamma+1] int64 -1 padded, num_accepted [R] int64,
        accept_prob [N - R] float32 or empty).
    """
    if draft_logits is not None and draft_probs is not None:
        raise ValueError("verify_chain: pass draft_logits or draft_probs, not both")
    if not isinstance(target_logits, torch.Tensor) or target_logits.dim() != 2:
        raise ValueError("verify_chain: target_logits must be a 2-D tensor [N, V]")
    if not isinstance(cu_target_rows, torch.Tensor) or cu_target_rows.dim() != 1 or cu_target_rows.numel() < 1:
        raise ValueError("verify_chain: cu_target_rows must be a 1-D int64 tensor [R + 1]")
    dev = target_logits.device
    R = cu_target_rows.numel() - 1
    if max_drafts is None:
        max_drafts = int((cu_target_rows[1:] - cu_target_rows[:-1]).max().item()) - 1 if R > 0 else 0
        max_drafts = max(max_drafts, 0)
    draft, kind = None, DRAFT_ONE_HOT
    if draft_logits is not None:
        draft, kind = draft_logits, DRAFT_LOGITS
    elif draft_probs is not None:
        draft, kind = draft_probs, DRAFT_PROBS
    temp = per_request(temperature, R, torch.float32, dev, "temperature")
    tk = per_request(top_k, R, torch.int32, dev, "top_k")
    tp = per_request(top_p, R, torch.float32, dev, "top_p")
    if (seed is None) != (offset is None):
        seed = 0 if seed is None else seed
        offset = 0 if offset is None else offset
    sd = per_request(seed, R, torch.int64, dev, "seed")
    of = per_request(offset, R, torch.int64, dev, "offset")
    out = torch.ops.dspark.verify_chain(
        target_logits,
        cu_target_rows,
        draft_tokens,
        draft,
        kind,
        temp,
        tk,
        tp,
        sd,
        of,
        int(max_drafts),
        bool(return_accept_prob),
    )
    return VerifyChainOutput(*out)


@register_fake_if_built("verify_chain")
def _verify_chain_fake(
    target_logits,
    cu_target_rows,
    draft_tokens,
    draft,
    draft_kind,
    temperature,
    top_k,
    top_p,
    seed,
    offset,
    max_drafts,
    return_accept_prob,
):
    R = cu_target_rows.shape[0] - 1
    N = target_logits.shape[0]
    dev = target_logits.device
    tokens = torch.empty((R, max_drafts + 1), dtype=torch.int64, device=dev)
    accepted = torch.empty((R,), dtype=torch.int64, device=dev)
    prob = torch.empty((N - R if return_accept_prob else 0,), dtype=torch.float32, device=dev)
    return tokens, accepted, prob
