"""Contiguous KV cache shared by targets and drafters, and the host/device transfer helpers the
models and the engine share.

Host syncs. Everything a round of the engine needs to *know on the host* (block sizes, cache
lengths, slots) is host bookkeeping: it is kept on the host, validated there, and uploaded to the
device without waiting for the device (:func:`upload`). A device value is read on the host only
where the host must decide on it (the engine's verification lengths and accepted counts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def upload(x: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """Copy a host tensor to ``device`` without synchronising the device.

    A blocking host-to-device copy makes PyTorch wait for the stream to drain; this stages the data
    in pinned memory (CUDA) and copies it asynchronously, in stream order, so it never stalls the
    queued work. Returns ``x`` itself when it already is on ``device``.
    """
    device = torch.device(device)
    if x.device == device:
        return x
    if device.type == "cuda" and x.device.type == "cpu" and torch.cuda.is_available():
        x = x.pin_memory()  # the caching host allocator keeps the block until the copy is done
    return x.to(device, non_blocking=True)


def host_ints(x, name: str = "value") -> list[int]:
    """A list of ints from a sequence, a scalar or a tensor. Free for host values; a tensor on a
    device is read once (a host sync): pass host values where the caller has them."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex():
            raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
        return x.reshape(-1).tolist() if x.device.type == "cpu" else x.reshape(-1).cpu().tolist()
    if isinstance(x, (int,)) and not isinstance(x, bool):
        return [int(x)]
    return [int(v) for v in x]


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


class ContextLengthError(ValueError):
    """A forward would write past ``max_seq`` of the KV cache (prompt longer than the context)."""


class KVCache:
    """Per-layer-stacked contiguous KV cache.

    Attributes:
        k_cache, v_cache: [num_layers, max_requests, num_kv_heads, max_seq, head_dim], model dtype.
        lengths: int64 [max_requests] on the cache's device, number of cached positions per slot.

    A forward writes the K/V of the new rows of slot r at storage indices lengths[r].. and
    advances lengths[r] (:meth:`advance`). Chain rollback is only a length change
    (:meth:`truncate`). :meth:`host_lengths` is a host copy of ``lengths`` kept up to date by these
    methods, so callers plan a forward without reading the device; a write to ``lengths`` made
    directly is noticed (through the tensor's version counter) and costs one device read.
    """

    def __init__(
        self,
        num_layers: int,
        max_requests: int,
        num_kv_heads: int,
        max_seq: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
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
        self._host = torch.zeros(max_requests, dtype=torch.int64)  # unused when on the CPU
        self._host_version = _version(self.lengths)

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

    def host_lengths(self) -> torch.Tensor:
        """``lengths`` as a CPU int64 tensor [max_requests] (the tensor itself on a CPU cache).
        Read-only for callers. Costs a device read only after ``lengths`` was written directly."""
        if self.lengths.device.type == "cpu":
            return self.lengths
        v = _version(self.lengths)
        if v is None or v != self._host_version:
            self._host = self.lengths.cpu()
            self._host_version = _version(self.lengths)
        return self._host

    def _commit_host(self, host: torch.Tensor) -> None:
        if self.lengths.device.type != "cpu":
            self._host = host
            self._host_version = _version(self.lengths)

    def advance(
        self, slots: torch.Tensor, counts: torch.Tensor, slots_host: Sequence[int], counts_host: Sequence[int]
    ) -> None:
        """lengths[slots] += counts after a forward appended ``counts`` rows to each of ``slots``
        (distinct). ``slots``/``counts``: int64 [R] on the cache's device; ``slots_host`` /
        ``counts_host``: the same values on the host (no device read)."""
        host = self.host_lengths()
        self.lengths[slots] += counts
        if self.lengths.device.type != "cpu":
            host = host.clone()
            if len(slots_host):
                host[torch.as_tensor(list(slots_host), dtype=torch.int64)] += torch.as_tensor(
                    list(counts_host), dtype=torch.int64
                )
            self._commit_host(host)

    def truncate(
        self,
        request_idx_or_mask: int | Sequence[int] | torch.Tensor,
        new_lengths: int | Sequence[int] | torch.Tensor,
    ) -> None:
        """Set lengths of the given slots (int, index list/tensor, or bool mask [max_requests]).

        new_lengths: scalar or one value per selected slot; must not exceed the current length
        (the cache cannot grow without a forward). Host values (ints, lists, CPU tensors) are
        checked on the host and uploaded without a device sync; device tensors are read once.
        """
        idx = request_idx_or_mask
        if isinstance(idx, torch.Tensor) and idx.dtype == torch.bool:
            if idx.shape != self.lengths.shape:
                raise ValueError(
                    f"truncate: request mask must have shape {tuple(self.lengths.shape)}, got {tuple(idx.shape)}"
                )
            idx = idx.cpu().nonzero().flatten()
        idx_l = host_ints(idx, "request index")
        if idx_l and (min(idx_l) < 0 or max(idx_l) >= self.max_requests):
            raise ValueError(f"truncate: request index out of range [0, {self.max_requests})")
        new_l = host_ints(new_lengths, "new_lengths")
        if isinstance(new_lengths, (int,)) or (isinstance(new_lengths, torch.Tensor) and new_lengths.dim() == 0):
            new_l = new_l * len(idx_l)
        if len(new_l) != len(idx_l):
            raise ValueError(f"truncate: new_lengths has {len(new_l)} values for {len(idx_l)} requests")
        host = self.host_lengths()
        cur = host[idx_l].tolist() if idx_l else []
        if any(n < 0 or n > c for n, c in zip(new_l, cur, strict=True)):
            raise ValueError("truncate: new_lengths must be in [0, current length]")
        if not idx_l:
            return
        idx_h = torch.tensor(idx_l, dtype=torch.int64)
        new_h = torch.tensor(new_l, dtype=torch.int64)
        if self.lengths.device.type == "cpu":
            self.lengths[idx_h] = new_h
            return
        dev = self.lengths.device
        self.lengths[upload(idx_h, dev)] = upload(new_h, dev)
        host = host.clone()
        host[idx_h] = new_h
        self._commit_host(host)

    def reset(self, request_ids: int | Sequence[int] | torch.Tensor | None = None) -> None:
        """Forget the cached context of the given slots (all slots when None)."""
        if request_ids is None:
            self.lengths.zero_()
            self._commit_host(torch.zeros_like(self._host))
        else:
            self.truncate(request_ids, 0)

    def clone(self) -> KVCache:
        """Deep copy (tests and tree exploration)."""
        out = KVCache.__new__(KVCache)
        out.k_cache = self.k_cache.clone()
        out.v_cache = self.v_cache.clone()
        out.lengths = self.lengths.clone()
        out._host = self._host.clone()
        out._host_version = _version(out.lengths) if self._host_version == _version(self.lengths) else None
        return out
