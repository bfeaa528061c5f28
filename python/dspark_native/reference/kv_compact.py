"""Reference of ``kv_compact``: in-place KV compaction after verification (contiguous and paged
layouts). Mirrors csrc/include/dspark/kv_compact.h; mutates the caches like the op."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["kv_compact_reference"]

Cache = torch.Tensor | Sequence[torch.Tensor]


def _layers(cache):
    if cache is None:
        return []
    if isinstance(cache, torch.Tensor):
        cache = [cache]
    cache = list(cache)
    if len(cache) == 1 and cache[0].dim() == 5:
        return [cache[0][i] for i in range(cache[0].shape[0])]
    return cache


def kv_compact_reference(
    k_cache: Cache,
    v_cache: Cache | None,
    old_lengths: torch.Tensor,
    accepted: torch.Tensor,
    *,
    num_verified: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
):
    """Reference of :func:`dspark_native.ops.kv_compact` (same arguments, same outputs, same
    in-place effect). Raises ValueError where the CPU kernel fails."""
    layers = _layers(k_cache) + _layers(v_cache)
    paged = block_table is not None
    if paged:
        P = layers[0].shape[1]
        capacity = block_table.shape[1] * P
        num_pages = layers[0].shape[0]
    else:
        capacity = layers[0].shape[2]
        num_pages = layers[0].shape[0]
    R = old_lengths.shape[0]
    old = old_lengths.tolist()
    acc_all = accepted.tolist()
    nv = num_verified.tolist() if num_verified is not None else [-1] * R
    sl = slots.tolist() if slots is not None else list(range(R))
    bt = block_table.tolist() if paged else None
    counts = []
    for r in range(R):
        if not 0 <= old[r] <= capacity:
            raise ValueError(f"kv_compact: request {r}: old_lengths = {old[r]} outside [0, capacity = {capacity}]")
        lst = []
        for a in acc_all[r]:
            if a < 0:
                break
            lst.append(a)
        for j, a in enumerate(lst):
            if (j > 0 and a <= lst[j - 1]) or a >= capacity - old[r] or (nv[r] >= 0 and a >= nv[r]):
                raise ValueError(f"kv_compact: request {r}: accepted indices must be strictly increasing and in range")
        if paged:
            for j, a in enumerate(lst):
                if a == j:
                    continue
                for t in (old[r] + j, old[r] + a):
                    pg = bt[r][t // P]
                    if not 0 <= pg < num_pages:
                        raise ValueError(
                            f"kv_compact: request {r}: block_table[{r}, {t // P}] = {pg} points outside the page pool"
                        )
        elif not 0 <= sl[r] < num_pages:
            raise ValueError(f"kv_compact: request {r}: slots = {sl[r]} outside [0, {num_pages})")
        counts.append(lst)
    if not paged and slots is not None and len(set(sl)) != len(sl):
        raise ValueError("kv_compact: slots must be distinct")
    for r, lst in enumerate(counts):
        for j, a in enumerate(lst):
            if a == j:
                continue
            src, dst = old[r] + a, old[r] + j
            for layer in layers:
                if paged:
                    layer[bt[r][dst // P], dst % P] = layer[bt[r][src // P], src % P]
                else:
                    layer[sl[r], :, dst] = layer[sl[r], :, src]
    new = torch.tensor([old[r] + len(counts[r]) for r in range(R)], dtype=torch.int64)
    free_from = torch.zeros(R, dtype=torch.int64)
    num_freed = torch.zeros(R, dtype=torch.int64)
    if paged and num_verified is not None:
        for r in range(R):
            ff = -(-int(new[r]) // P)
            used = -(-min(capacity, old[r] + max(nv[r], 0)) // P)
            free_from[r] = ff
            num_freed[r] = max(0, used - ff)
    return new, free_from, num_freed
