"""Contiguous KV cache shared by targets and drafters."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch


class ContextLengthError(ValueError):
    """A forward would write past ``max_seq`` of the KV cache (prompt longer than the context)."""


class KVCache:
    """Per-layer-stacked contiguous KV cache.

    Attributes:
        k_cache, v_cache: [num_layers, max_requests, num_kv_heads, max_seq, head_dim], model dtype.
        lengths: int64 [max_requests], number of cached positions per request slot.

    A forward writes the K/V of the new rows of slot r at storage indices lengths[r].. and
    advances lengths[r]. Chain rollback is only a length change (:meth:`truncate`).
    """

    def __init__(
        self,
        num_layers: int,
        max_requests: int,
        num_kv_heads: int,
        max_seq: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
    ):
        for name, v in (
            ("num_layers", num_layers),
            ("max_requests", max_requests),
            ("num_kv_heads", num_kv_heads),
            ("max_seq", max_seq),
            ("head_dim", head_dim),
        ):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"KVCache: {name} must be a positive int, got {v!r}")
        shape = (num_layers, max_requests, num_kv_heads, max_seq, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(max_requests, dtype=torch.int64, device=device)

    @property
    def num_layers(self) -> int:
        return self.k_cache.shape[0]

    @property
    def max_requests(self) -> int:
        return self.k_cache.shape[1]

    @property
    def max_seq(self) -> int:
        return self.k_cache.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.k_cache.dtype

    @property
    def device(self) -> torch.device:
        return self.k_cache.device

    def truncate(
        self,
        request_idx_or_mask: Union[int, Sequence[int], torch.Tensor],
        new_lengths: Union[int, Sequence[int], torch.Tensor],
    ) -> None:
        """Set lengths of the given slots (int, index list/tensor, or bool mask [max_requests]).

        new_lengths: scalar or one value per selected slot; must not exceed the current length
        (the cache cannot grow without a forward).
        """
        idx = torch.as_tensor(request_idx_or_mask, device=self.lengths.device)
        if idx.dtype == torch.bool:
            if idx.shape != self.lengths.shape:
                raise ValueError(
                    f"truncate: request mask must have shape {tuple(self.lengths.shape)}, "
                    f"got {tuple(idx.shape)}"
                )
            idx = idx.nonzero().flatten()
        idx = idx.to(torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.max_requests):
            raise ValueError(f"truncate: request index out of range [0, {self.max_requests})")
        new = torch.as_tensor(new_lengths, dtype=torch.int64, device=self.lengths.device)
        new = new.expand(idx.shape) if new.dim() == 0 else new.reshape(-1)
        if new.shape != idx.shape:
            raise ValueError(
                f"truncate: new_lengths has {new.numel()} values for {idx.numel()} requests"
            )
        if new.numel() and (bool((new < 0).any()) or bool((new > self.lengths[idx]).any())):
            raise ValueError("truncate: new_lengths must be in [0, current length]")
        self.lengths[idx] = new

    def reset(self, request_ids: Optional[Union[int, Sequence[int], torch.Tensor]] = None) -> None:
        """Forget the cached context of the given slots (all slots when None)."""
        if request_ids is None:
            self.lengths.zero_()
        else:
            self.truncate(request_ids, 0)

    def clone(self) -> "KVCache":
        """Deep copy (tests and tree exploration)."""
        out = KVCache.__new__(KVCache)
        out.k_cache = self.k_cache.clone()
        out.v_cache = self.v_cache.clone()
        out.lengths = self.lengths.clone()
        return out
