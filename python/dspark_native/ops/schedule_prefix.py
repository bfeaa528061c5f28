"""``schedule_prefix``: typed wrapper and fake kernel of the hardware-aware prefix scheduler
(paper Algorithm 1; schema and kernels: csrc/torch/schedule_prefix.cpp; contract:
csrc/include/dspark/schedule_prefix.h)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._native import load_library
from ._util import per_request, register_fake_if_built

load_library()

__all__ = ["ScheduleOutput", "schedule_prefix", "SCHEDULE_MODES"]

SCHEDULE_MODES = {"causal": 0, "global": 1}


class ScheduleOutput(NamedTuple):
    lengths: torch.Tensor  #: [R] int64 drafts to verify per request
    throughput: torch.Tensor  #: [2] float32 (best expected tokens/s theta, expected tokens tau of it)


def schedule_prefix(
    confidences: torch.Tensor,
    sps_table: torch.Tensor,
    *,
    mode: str | int = "causal",
    min_len: int | torch.Tensor | None = None,
    max_len: int | torch.Tensor | None = None,
    token_budget: int | None = None,
) -> ScheduleOutput:
    """Verification lengths from confidences and a steps-per-second table (Algorithm 1).

    Args:
        confidences: [R, g] float32 per-position conditional survival c[r, i] in [0, 1].
        sps_table: [T] float32, entry t = target steps per second at t + 1 batch tokens; needs
            T >= min(R * (1 + g), token_budget).
        mode: "causal" (early stop: lossless on current confidences) or "global" (no early stop:
            only lossless when the confidences come from earlier rounds).
        min_len, max_len: scalar or [R] int32 per-request bounds on l_r (default 0 and g).
        token_budget: cap on the batch tokens sum_r (1 + l_r) (None: no cap).

    Returns:
        ScheduleOutput(lengths [R] int64, throughput [2] float32).
    """
    if not isinstance(confidences, torch.Tensor) or confidences.dim() != 2:
        raise ValueError("schedule_prefix: confidences must be a 2-D float32 tensor [R, g]")
    if isinstance(mode, str):
        if mode not in SCHEDULE_MODES:
            raise ValueError(f"schedule_prefix: mode must be 'causal' or 'global', got {mode!r}")
        mode = SCHEDULE_MODES[mode]
    dev = confidences.device
    R = confidences.shape[0]
    if not isinstance(sps_table, torch.Tensor):
        sps_table = torch.tensor(list(sps_table), dtype=torch.float32)
    sps_table = sps_table.to(device=dev)
    mn = per_request(min_len, R, torch.int32, dev, "min_len")
    mx = per_request(max_len, R, torch.int32, dev, "max_len")
    out = torch.ops.dspark.schedule_prefix(confidences, sps_table, mn, mx, int(token_budget or 0), int(mode))
    return ScheduleOutput(*out)


@register_fake_if_built("schedule_prefix")
def _schedule_prefix_fake(confidences, sps_table, min_len, max_len, token_budget, mode):
    R = confidences.shape[0]
    dev = confidences.device
    return (torch.empty((R,), dtype=torch.int64, device=dev), torch.empty((2,), dtype=torch.float32, device=dev))
