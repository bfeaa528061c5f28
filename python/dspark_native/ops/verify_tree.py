"""``verify_tree``: typed wrapper and fake kernel (schema and kernels: csrc/torch/verify_tree.cpp,
contract: csrc/include/dspark/verify_tree.h)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._native import load_library
from ._util import Number, per_request, register_fake_if_built

load_library()

__all__ = ["VerifyTreeOutput", "verify_tree"]


class VerifyTreeOutput(NamedTuple):
    path: torch.Tensor  #: [R, max_depth + 1] int64 accepted local node indices (path[:, 0] = 0), -1 padded
    num_accepted: torch.Tensor  #: [R] int64 accepted draft nodes
    tokens: torch.Tensor  #: [R, max_depth + 1] int64 emitted tokens (accepted drafts + 1 more), -1 padded


def verify_tree(
    target_logits: torch.Tensor,
    cu_nodes: torch.Tensor,
    parents: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: Number | torch.Tensor = 0.0,
    top_k: int | torch.Tensor | None = None,
    top_p: float | torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor | None = None,
    max_nodes: int | None = None,
    max_depth: int | None = None,
) -> VerifyTreeOutput:
    """Token-tree verification (greedy, or lossless multi-draft sampling with one-hot drafts).

    Request ``r`` owns nodes ``cu[r] .. cu[r+1]-1`` (local indices 0..n_r-1, node 0 = the root /
    anchor). Greedy (temperature 0): from the root, follow the first child whose token is the argmax
    of its parent's row; emit the path's tokens plus the argmax at its end. Sampled: at each node try
    the children in index order, accept child c with probability p'(token_c) where p' is the target
    distribution (temperature, top-k, top-p) with the mass of already rejected siblings removed and
    renormalised; if all are rejected (or at a leaf) draw from the final p'. Duplicate sibling
    tokens are allowed (a later copy is never accepted once the first was rejected).

    Args:
        target_logits: [N, V] float32/float16/bfloat16, one row per node (the logits after its path).
        cu_nodes: [R + 1] int64 node offsets, ``cu[0] = 0``, each request 1..max_nodes nodes.
        parents: [N] int64 LOCAL parent index: -1 for roots, ``0 <= parent < own index`` otherwise
            (violations, including cycles, raise an error naming ``parents``).
        tokens: [N] int64 draft token of each node (roots' entries ignored).
        temperature, top_k, top_p, seed, offset: as :func:`verify_chain` (scalars or [R] tensors).
            Randomness: Philox(seed, offset, position = local node index, purpose 16 coin / 17 draw).
        max_nodes: M, the largest tree size allowed. Default: the largest n_r (reads ``cu_nodes`` on
            the host; pass it under CUDA graphs / torch.compile).
        max_depth: D, output width D + 1 (trees deeper than D raise). Default ``max_nodes - 1``.

    Returns:
        VerifyTreeOutput(path [R, D+1], num_accepted [R], tokens [R, D+1]), all int64, -1 padded.
        ``path`` feeds :func:`kv_compact`'s ``accepted`` directly.
    """
    if not isinstance(target_logits, torch.Tensor) or target_logits.dim() != 2:
        raise ValueError("verify_tree: target_logits must be a 2-D tensor [N, V]")
    if not isinstance(cu_nodes, torch.Tensor) or cu_nodes.dim() != 1 or cu_nodes.numel() < 1:
        raise ValueError("verify_tree: cu_nodes must be a 1-D int64 tensor [R + 1]")
    dev = target_logits.device
    R = cu_nodes.numel() - 1
    if max_nodes is None:
        max_nodes = max(int((cu_nodes[1:] - cu_nodes[:-1]).max().item()), 1) if R > 0 else 1
    if max_depth is None:
        max_depth = max_nodes - 1
    temp = per_request(temperature, R, torch.float32, dev, "temperature")
    tk = per_request(top_k, R, torch.int32, dev, "top_k")
    tp = per_request(top_p, R, torch.float32, dev, "top_p")
    if (seed is None) != (offset is None):
        seed = 0 if seed is None else seed
        offset = 0 if offset is None else offset
    sd = per_request(seed, R, torch.int64, dev, "seed")
    of = per_request(offset, R, torch.int64, dev, "offset")
    out = torch.ops.dspark.verify_tree(
        target_logits, cu_nodes, parents, tokens, temp, tk, tp, sd, of, int(max_nodes), int(max_depth)
    )
    return VerifyTreeOutput(*out)


@register_fake_if_built("verify_tree")
def _verify_tree_fake(
    target_logits, cu_nodes, parents, tokens, temperature, top_k, top_p, seed, offset, max_nodes, max_depth
):
    R = cu_nodes.shape[0] - 1
    dev = target_logits.device
    path = torch.empty((R, max_depth + 1), dtype=torch.int64, device=dev)
    acc = torch.empty((R,), dtype=torch.int64, device=dev)
    toks = torch.empty((R, max_depth + 1), dtype=torch.int64, device=dev)
    return path, acc, toks
