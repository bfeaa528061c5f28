"""Drafter evaluation: tau, per-position conditional acceptance and confidence calibration.

Everything is computed from the engine's round log (one ``(conf [R, g] or None, lengths [R],
accepted [R])`` entry per round), so it measures what speculative decoding actually did:

* tau = mean over rounds of (accepted + 1): tokens per round including the bonus / corrected
  token (rounds cut short by an end-of-sequence token count as run);
* conditional acceptance at k = P(draft k accepted | drafts 0..k-1 accepted and draft k
  verified), over rounds that verified at least k + 1 drafts;
* confidence metrics (DSpark): :func:`dspark_native.metrics.per_position_metrics` over rounds
  that verified the whole block (their labels are not censored by the policy), before and after
  STS temperatures.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..metrics import per_position_metrics
from ..scheduler import apply_sts


def round_metrics(round_log: Sequence, g: int, sts_temperature: Sequence[float] | None = None) -> dict:
    """Metrics of a list of rounds (see the module docstring). Returns a dict with ``rounds``,
    ``tau``, ``cond_accept`` [g] (None where no round reached k), ``reached`` [g], and, when the
    rounds carry confidences, ``confidence`` = per-position metrics before STS and, given
    ``sts_temperature``, ``confidence_sts`` after."""
    empty = torch.zeros(0, dtype=torch.long)
    lengths = torch.cat([torch.as_tensor(e[1]).long().flatten() for e in round_log]) if round_log else empty
    acc = torch.cat([torch.as_tensor(e[2]).long().flatten() for e in round_log]) if round_log else empty
    if bool((acc > lengths).any()):
        raise ValueError("a round accepted more drafts than it verified")
    n = lengths.numel()
    out: dict = dict(rounds=n, tau=float((acc + 1).double().mean()) if n else 0.0)
    reached, cond = [], []
    for k in range(g):
        r = (lengths > k) & (acc >= k)
        m = int(r.sum())
        reached.append(m)
        cond.append(float((acc[r] > k).double().mean()) if m else None)
    out.update(reached=reached, cond_accept=cond, mean_verified=float(lengths.double().mean()) if n else 0.0)
    c, ca = full_block_confidences(round_log, g)
    if c.shape[0]:
        out["confidence_rounds"] = int(c.shape[0])
        out["confidence"] = per_position_metrics(c, ca)
        if sts_temperature is not None:
            out["confidence_sts"] = per_position_metrics(apply_sts(c, list(sts_temperature)), ca)
    return out


def full_block_confidences(round_log: Sequence, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The confidence-head samples of a round log: confidences float64 [N, g] and accepted drafts
    int64 [N] of the rounds that verified the whole block (their survival labels are not censored
    by the policy). Rounds without confidences (EAGLE-3, DFlash, or nothing left to draft) carry
    no labels and are skipped. Shared by eval's metrics and PNGs and by ``calibrate``."""
    rounds = [e for e in round_log if e[0] is not None]
    if not rounds:
        return torch.zeros(0, g, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    c = torch.cat([torch.as_tensor(e[0], dtype=torch.float64)[:, :g] for e in rounds])
    lengths = torch.cat([torch.as_tensor(e[1]).long().flatten() for e in rounds])
    acc = torch.cat([torch.as_tensor(e[2]).long().flatten() for e in rounds])
    full = lengths == g
    return c[full], acc[full]


def macro_average(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
