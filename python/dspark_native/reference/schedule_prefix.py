"""Reference of ``schedule_prefix``: Algorithm 1 of the paper, sequentially, with the same
fixed-point accumulation as the kernels (csrc/include/dspark/schedule_prefix.h)."""

from __future__ import annotations

import math
import struct

import torch

__all__ = ["schedule_prefix_reference"]

_SCALE = float(1 << 40)


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def schedule_prefix_reference(
    confidences: torch.Tensor,
    sps_table,
    *,
    mode="causal",
    min_len=None,
    max_len=None,
    token_budget: int | None = None,
):
    """Reference of :func:`dspark_native.ops.schedule_prefix`: returns (lengths [R] int64,
    throughput [2] float32). Raises ValueError on the inputs the CPU kernel rejects."""
    mode = {"causal": 0, "global": 1}.get(mode, mode)
    c = confidences.float().tolist()
    R = len(c)
    g = confidences.shape[1]
    sps = [float(x) for x in torch.as_tensor(sps_table, dtype=torch.float32).tolist()]
    budget = int(token_budget or 0)

    def per(x, default):
        if x is None:
            return [default] * R
        if isinstance(x, torch.Tensor):
            return x.expand(R).tolist() if x.dim() == 0 else x.tolist()
        return [int(x)] * R

    mins, maxs = per(min_len, 0), per(max_len, g)
    if 0 < budget < R:
        raise ValueError(f"schedule_prefix_reference: token_budget must be >= R = {R}")
    need = R * (1 + g) if budget <= 0 else min(R * (1 + g), budget)
    if R > 0 and len(sps) < need:
        raise ValueError(f"schedule_prefix_reference: sps_table has {len(sps)} entries, needs {need}")
    for r in range(R):
        for j in range(g):
            if not (0.0 <= c[r][j] <= 1.0):
                raise ValueError(f"schedule_prefix_reference: confidences[{r}, {j}] = {c[r][j]} not in [0, 1]")
        if min_len is not None and max_len is not None and mins[r] > maxs[r]:
            raise ValueError(f"schedule_prefix_reference: min_len[{r}] > max_len[{r}]")
    if R == 0:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(2, dtype=torch.float32)
    hi = [max(0, min(int(maxs[r]), g)) for r in range(R)]
    lo = [min(max(0, int(mins[r])), hi[r]) for r in range(R)]
    B, tau = R, R << 40
    cands = []  # (a, r, j)
    for r in range(R):
        a = 1.0
        for j in range(g):
            a = _f32(a * c[r][j])
            if j < lo[r]:
                tau += round(a * _SCALE)
                B += 1
            elif j < hi[r] and a > 0:
                cands.append((a, r, j))
    for t in range(max(need, B)):
        if t >= len(sps) or not (sps[t] > 0) or math.isinf(sps[t]):
            raise ValueError(f"schedule_prefix_reference: sps_table[{t}] must be positive finite")
    cands.sort(key=lambda x: (-x[0], x[1], x[2]))
    cap = max(budget, B) if budget > 0 else None
    best = float(tau) * (1.0 / _SCALE) * sps[B - 1]
    best_tau, admitted = tau, 0
    for i, (a, _r, _j) in enumerate(cands):
        if cap is not None and B + 1 > cap:
            break
        B += 1
        tau += round(a * _SCALE)
        theta = float(tau) * (1.0 / _SCALE) * sps[B - 1]
        if theta > best:
            best, best_tau, admitted = theta, tau, i + 1
        elif mode == 0:
            break
    lengths = torch.tensor(lo, dtype=torch.int64)
    for _a, r, j in cands[:admitted]:
        lengths[r] = max(int(lengths[r]), j + 1)
    return lengths, torch.tensor([best, best_tau / _SCALE], dtype=torch.float32)
