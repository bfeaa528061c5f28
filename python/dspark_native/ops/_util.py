"""Argument normalisation shared by the op wrappers."""

from __future__ import annotations

import torch

Number = int | float


def per_request(value, n: int, dtype: torch.dtype, device: torch.device, name: str) -> torch.Tensor | None:
    """Broadcast a Python scalar to a [n] tensor; pass tensors through (checked by the op)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return value.to(device=device, dtype=dtype).expand(n).contiguous()
        return value
    if isinstance(value, (int, float)):
        return torch.full((n,), value, dtype=dtype, device=device)
    raise TypeError(f"{name} must be a number or a tensor of shape [{n}], got {type(value).__name__}")


def register_fake_if_built(op_name: str):
    """``torch.library.register_fake`` for ``dspark::<op_name>``, skipped (no-op decorator) when the
    loaded extension was built without that op (development builds with -DDSPARK_OPS=...)."""

    def deco(fn):
        if hasattr(torch.ops.dspark, op_name):
            torch.library.register_fake(f"dspark::{op_name}")(fn)
        return fn

    return deco
