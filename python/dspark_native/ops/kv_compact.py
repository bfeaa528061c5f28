"""``kv_compact``: typed wrapper and fake kernel (schema and kernels: csrc/torch/kv_compact.cpp,
contract: csrc/include/dspark/kv_compact.h), plus the chain fast path :func:`kv_commit_chain`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .._native import load_library
from ._util import register_fake_if_built

load_library()

__all__ = ["KVCompactOutput", "kv_compact", "kv_commit_chain"]

Cache = torch.Tensor | Sequence[torch.Tensor]


class KVCompactOutput(NamedTuple):
    new_lengths: torch.Tensor  #: [R] int64 old_length + number of kept entries
    free_from: torch.Tensor  #: [R] int64 paged: first block-table column no longer needed (else 0)
    num_freed: torch.Tensor  #: [R] int64 paged: block_table[r, free_from:free_from+num_freed] became free


def _as_list(cache: Cache | None):
    if cache is None:
        return []
    if isinstance(cache, torch.Tensor):
        return [cache]
    return list(cache)


def kv_compact(
    k_cache: Cache,
    v_cache: Cache | None,
    old_lengths: torch.Tensor,
    accepted: torch.Tensor,
    *,
    num_verified: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
) -> KVCompactOutput:
    """Move the KV entries of the accepted nodes of each request to contiguous positions, in place,
    for every layer and both caches in one call; return the new lengths.

    Request r's verified nodes were appended at positions ``old_lengths[r] + i``; for j = 0, 1, ...
    the entry at ``old + accepted[r, j]`` moves to ``old + j`` (increasing j; safe in place because
    ``accepted`` must be strictly increasing, so sources are never below destinations).

    Args:
        k_cache, v_cache: contiguous layout (``block_table`` None): a [L, slots, H, max_seq, D]
            tensor (the :class:`~dspark_native.models.cache.KVCache` layout) or a list of L
            [slots, H, max_seq, D] tensors. Paged: a [L, num_pages, P, H, D] tensor or a list of L
            [num_pages, P, H, D] tensors. Any dtype; last dim contiguous. ``v_cache`` may be None.
        old_lengths: [R] int64 cached lengths before the verify forward.
        accepted: [R, W] int64 local node indices to keep, strictly increasing, -1 padded (the
            ``path`` of :func:`verify_tree`; ``arange`` prefixes for a chain).
        num_verified: optional [R] int64 nodes appended per request (checks ``accepted < n_r`` and
            enables the freed-page report).
        slots: optional [R] int64 cache slot of each request (contiguous layout; default r).
        block_table: optional [R, pages_per_request] int32 page ids (paged layout).

    Returns:
        KVCompactOutput(new_lengths, free_from, num_freed), [R] int64 each. Invalid input (indices
        not increasing or beyond the capacity / n_r, block-table entries outside the pool) raises
        on CPU; on CUDA the request is left untouched and its new length is -1.
    """
    out = torch.ops.dspark.kv_compact(
        _as_list(k_cache), _as_list(v_cache), old_lengths, accepted, num_verified, slots, block_table
    )
    return KVCompactOutput(*out)


def kv_commit_chain(old_lengths: torch.Tensor, num_accepted: torch.Tensor) -> torch.Tensor:
    """Chain fast path: a chain's kept entries (anchor + accepted drafts) are already contiguous, so
    only the length changes: ``old_lengths + num_accepted + 1`` (pure tensor math, no cache access,
    capturable). Equivalent to :func:`kv_compact` with ``accepted[r] = 0..num_accepted[r]``."""
    return old_lengths + num_accepted.to(old_lengths.dtype) + 1


@register_fake_if_built("kv_compact")
def _kv_compact_fake(k_cache, v_cache, old_lengths, accepted, num_verified, slots, block_table):
    R = old_lengths.shape[0]
    dev = old_lengths.device
    return tuple(torch.empty((R,), dtype=torch.int64, device=dev) for _ in range(3))
