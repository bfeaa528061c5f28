"""Verification-length policies, SPS profiling and STS calibration (docs/scheduler.md).

Every policy has one interface::

    lengths = policy.schedule(confidences)   # [R, g] float32 -> [R] int64, on confidences' device

and an optional ``policy.reset()`` (forget history). The hardware-aware policies call the fused
``schedule_prefix`` op, so they run on the GPU without a host synchronisation.

* :class:`StaticLength` -- verify min(L, g) drafts for every request.
* :class:`ConfidenceThreshold` -- verify the prefix whose survival product (or each confidence)
  stays >= a threshold.
* :class:`HardwareAwareCausal` -- paper Algorithm 1 with the early stop (lossless on the current
  round's confidences).
* :class:`HardwareAwareAsync` -- paper Section 5.2: the draft budget K comes from a global search
  (no early stop) over the confidences of ``lag`` rounds earlier; the current round verifies the
  top-K current survival products (rank preserving). Before ``lag`` rounds of history exist it
  falls back to the causal policy.

:func:`profile_sps` measures the steps-per-second table and saves it as JSON with the device and
model it was measured on; :func:`calibrate_sts` fits per-position STS temperatures.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from .metrics import ece

__all__ = [
    "SchedulePolicy",
    "StaticLength",
    "ConfidenceThreshold",
    "HardwareAwareCausal",
    "HardwareAwareAsync",
    "SPSTable",
    "profile_sps",
    "calibrate_sts",
    "apply_sts",
]


def _ops():
    from . import ops  # the extension is loaded on first use only

    return ops


def _check_conf(confidences: torch.Tensor) -> torch.Tensor:
    if not isinstance(confidences, torch.Tensor) or confidences.dim() != 2:
        raise ValueError("confidences must be a 2-D tensor [R, g]")
    return confidences.float()


class SchedulePolicy:
    """Base class: ``schedule(confidences [R, g]) -> lengths [R] int64``."""

    name = "policy"

    def schedule(self, confidences: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def reset(self) -> None:
        pass

    def __call__(self, confidences: torch.Tensor) -> torch.Tensor:
        return self.schedule(confidences)


class StaticLength(SchedulePolicy):
    """Verify ``min(length, g)`` drafts for every request (no confidences used)."""

    name = "static"

    def __init__(self, length: int):
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        self.length = int(length)

    def schedule(self, confidences):
        c = _check_conf(confidences)
        return torch.full((c.shape[0],), min(self.length, c.shape[1]), dtype=torch.int64, device=c.device)


class ConfidenceThreshold(SchedulePolicy):
    """Verify the longest prefix whose survival product prod_{i<=j} c_i (``cumulative=True``) or
    whose every confidence c_i (``cumulative=False``) is >= ``threshold``."""

    name = "threshold"

    def __init__(self, threshold: float, cumulative: bool = True):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold, self.cumulative = float(threshold), bool(cumulative)

    def schedule(self, confidences):
        c = _check_conf(confidences)
        # NaN never reaches the threshold. On the CPU it is an error; on a device checking would
        # cost a host sync per round, so there it just ends the prefix (as the ops do on CUDA).
        if c.device.type == "cpu" and bool(torch.isnan(c).any()):
            raise ValueError("confidences contain NaN")
        score = torch.cumprod(c, 1) if self.cumulative else c
        ok = (score >= self.threshold).long()
        return torch.cumprod(ok, 1).sum(1)


def _sps_tensor(sps, device) -> torch.Tensor:
    if isinstance(sps, SPSTable):
        sps = sps.sps
    from .models.cache import upload

    return upload(torch.as_tensor(sps, dtype=torch.float32), device)


class HardwareAwareCausal(SchedulePolicy):
    """Paper Algorithm 1 with the early stop (``schedule_prefix`` mode "causal").

    ``overhead_s``: seconds every round costs besides the target forward (drafting, the
    bookkeeping of the round). Algorithm 1 maximises tokens x steps per second of the *round*;
    a table profiled on the target forward alone leaves that fixed cost out and so favours
    rounds that are too short (the fixed cost is what longer rounds amortise). With
    ``overhead_s`` > 0 the table used is ``1 / (1 / sps + overhead_s)``. The engine sets it from
    the rounds it measures (``Engine.sps_scope = "round"``); 0 = the table as profiled.
    """

    name = "causal"

    def __init__(
        self,
        sps: SPSTable | Sequence[float] | torch.Tensor,
        min_len=None,
        max_len=None,
        token_budget: int | None = None,
        overhead_s: float = 0.0,
    ):
        self.sps, self.min_len, self.max_len, self.token_budget = sps, min_len, max_len, token_budget
        self.overhead_s = float(overhead_s)
        self._cache: dict[torch.device, torch.Tensor] = {}

    def _table(self, device):
        if device not in self._cache:
            self._cache[device] = _sps_tensor(self.sps, device)
        base = self._cache[device]
        ov = self.overhead_s
        if not ov > 0:  # also NaN
            return base
        return 1.0 / (1.0 / base + ov)

    def host_sps(self) -> list[float]:
        """The profiled table as host floats (entry i = SPS at i + 1 tokens), without overhead."""
        if getattr(self, "_host", None) is None:
            self._host = [float(x) for x in torch.as_tensor(_sps_tensor(self.sps, "cpu")).tolist()]
        return self._host

    def schedule(self, confidences):
        c = _check_conf(confidences)
        return (
            _ops()
            .schedule_prefix(
                c,
                self._table(c.device),
                mode="causal",
                min_len=self.min_len,
                max_len=self.max_len,
                token_budget=self.token_budget,
            )
            .lengths
        )


class _HostCount:
    """A device integer read on the host later without waiting: the copy to (pinned) host memory
    is queued at once and an event marks its completion. ``value()`` at the use ``lag`` rounds
    later then finds the copy long done instead of synchronising with the queued work."""

    def __init__(self, t: torch.Tensor):
        self.event = None
        if t.device.type == "cuda":
            self.host = t.to("cpu", non_blocking=True)
            if torch.cuda.is_available():
                self.event = torch.cuda.Event()
                self.event.record()
        else:
            self.host = t.cpu()

    def value(self) -> int:
        if self.event is not None:
            self.event.synchronize()
        return int(self.host)


class HardwareAwareAsync(HardwareAwareCausal):
    """Paper Section 5.2: budget from ``lag``-rounds-old confidences, then top-K of the current ones.

    Round t: K_t = sum of the lengths a global search (no early stop) picks on the confidences seen
    at round t - lag; the current round verifies the K_t candidates (r, j) with the largest current
    survival products (ties: r, then j ascending; zero products never), which always form prefixes.
    The decision for round t uses no information from round t's drafts beyond their ranking, so
    verification stays lossless. The first ``lag`` rounds use :class:`HardwareAwareCausal`.
    K is computed when its confidences arrive (round t - lag) and copied to the host
    asynchronously, so reading it at round t does not synchronise the device.
    """

    name = "async"

    def __init__(self, sps, lag: int = 2, **kw):
        super().__init__(sps, **kw)
        if lag < 1:
            raise ValueError(f"lag must be >= 1, got {lag}")
        self.lag = int(lag)
        self._history: deque[_HostCount] = deque(maxlen=lag)

    def reset(self):
        self._history.clear()

    def _budget(self, c: torch.Tensor) -> torch.Tensor:
        out = _ops().schedule_prefix(
            c,
            self._table(c.device),
            mode="global",
            min_len=self.min_len,
            max_len=self.max_len,
            token_budget=self.token_budget,
        )
        return out.lengths.sum()

    def budget_from(self, old_confidences: torch.Tensor) -> int:
        """Drafts K a global search admits on old confidences."""
        return int(self._budget(_check_conf(old_confidences)).item())

    def schedule(self, confidences):
        c = _check_conf(confidences)
        if len(self._history) < self.lag:
            lengths = super().schedule(c)
        else:
            K = self._history[0].value()
            R, g = c.shape
            flat = torch.ones(R * (1 + g), dtype=torch.float32, device=c.device)  # equal SPS: admit by rank
            lengths = (
                _ops()
                .schedule_prefix(c, flat, mode="global", min_len=self.min_len, max_len=self.max_len, token_budget=R + K)
                .lengths
            )
        self._history.append(_HostCount(self._budget(c)))
        return lengths


# ---------------------------------------------------------------------------------------------
# SPS profiling
# ---------------------------------------------------------------------------------------------
@dataclass
class SPSTable:
    """Steps per second by batch tokens: ``sps[i]`` = target forward steps per second at i + 1
    tokens. Saved as JSON with where it was measured."""

    sps: list[float]
    device: str = ""
    model: str = ""
    measured_tokens: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    meta: dict[str, object] = field(default_factory=dict)

    def tensor(self, device=None) -> torch.Tensor:
        return torch.tensor(self.sps, dtype=torch.float32, device=device)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=1)

    @classmethod
    def load(cls, path: str) -> SPSTable:
        with open(path) as f:
            d = json.load(f)
        sps = d.get("sps")
        if not isinstance(sps, list) or not sps or not all(isinstance(x, (int, float)) and x > 0 for x in sps):
            raise ValueError(f"{path}: 'sps' must be a non-empty list of positive numbers")
        return cls(**d)


def _device_name(device) -> str:
    if device is None:
        return platform.processor() or platform.machine()
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"cuda:{dev.index or 0} {torch.cuda.get_device_name(dev)}"
    return f"{dev.type} {platform.processor() or platform.machine()}"


def profile_sps(
    forward_fn: Callable[[int], object],
    max_tokens: int,
    *,
    path: str | None = None,
    device=None,
    model: str = "",
    points: Sequence[int] | None = None,
    repeats: int = 5,
    warmup: int = 1,
    timer: Callable[[], float] = time.perf_counter,
    sync: Callable[[], None] | None = None,
) -> SPSTable:
    """Measure SPS(B) = 1 / median seconds of ``forward_fn(B)`` (one target forward over a batch of
    B tokens) and return (and save to ``path`` as JSON) the table for B = 1..max_tokens.

    ``points``: the batch sizes actually timed (default: every B up to 64, then a geometric grid
    with ~12% steps plus max_tokens); entries in between are interpolated linearly in time.
    ``sync``: called after each forward before reading the clock (default: CUDA synchronise when
    ``device`` is a CUDA device).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if sync is None and device is not None and torch.device(device).type == "cuda":
        sync = torch.cuda.synchronize
    if points is None:
        pts = set(range(1, min(max_tokens, 64) + 1))
        b = 64.0
        while b < max_tokens:
            b *= 1.12
            pts.add(min(max_tokens, int(round(b))))
        pts.add(max_tokens)
    else:
        pts = {int(p) for p in points if 1 <= int(p) <= max_tokens} | {1, max_tokens}
    pts = sorted(pts)
    secs = []
    for B in pts:
        for _ in range(warmup):
            forward_fn(B)
        if sync:
            sync()
        ts = []
        for _ in range(repeats):
            t0 = timer()
            forward_fn(B)
            if sync:
                sync()
            ts.append(timer() - t0)
        med = statistics.median(ts)
        if not med > 0:
            raise RuntimeError(f"profile_sps: measured a non-positive time {med} at {B} tokens")
        secs.append(med)
    # interpolate seconds per step on 1..max_tokens
    full = []
    j = 0
    for B in range(1, max_tokens + 1):
        while j + 1 < len(pts) and pts[j + 1] < B:
            j += 1
        if B == pts[j]:
            s = secs[j]
        elif j + 1 < len(pts):
            f = (B - pts[j]) / (pts[j + 1] - pts[j])
            s = secs[j] * (1 - f) + secs[j + 1] * f
        else:
            s = secs[-1]
        full.append(1.0 / s)
    table = SPSTable(
        sps=full,
        device=_device_name(device),
        model=model,
        measured_tokens=pts,
        seconds=secs,
        meta={"repeats": repeats, "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S")},
    )
    if path:
        table.save(path)
    return table


# ---------------------------------------------------------------------------------------------
# Sequential temperature scaling
# ---------------------------------------------------------------------------------------------
def _logit(c: torch.Tensor) -> torch.Tensor:
    c = c.double().clamp(1e-12, 1 - 1e-12)
    return torch.log(c) - torch.log1p(-c)


def apply_sts(confidences: torch.Tensor, temperatures: Sequence[float]) -> torch.Tensor:
    """c_k := sigmoid(logit(c_k) / T_k) (what ``dspark_draft(sts_temperature=T)`` computes from the
    raw logit)."""
    T = torch.as_tensor(temperatures, dtype=torch.float64)
    if T.numel() != confidences.shape[-1] or bool((~(T > 0)).any()):
        raise ValueError(f"temperatures must be {confidences.shape[-1]} positive values, got {T.tolist()}")
    return torch.sigmoid(_logit(confidences) / T).to(confidences.dtype)


def calibrate_sts(
    confidences: torch.Tensor,
    accept_lengths: torch.Tensor,
    *,
    grid: Sequence[float] | None = None,
    bins: int = 20,
) -> torch.Tensor:
    """Fit per-position STS temperatures, left to right (paper Section 3.2.1).

    Args:
        confidences: [N, g] raw confidences of N held-out rounds (before STS).
        accept_lengths: [N] accepted drafts of each round (0..g); the prefix-survival label of
            position k is ``accept_lengths > k``.
        grid: candidate temperatures (default: 161 log-spaced values in [0.05, 20], plus 1).
        bins: ECE bins (equal width, default 20).

    Returns: float32 [g] temperatures T_k; position k minimises the ECE of
    prod_{i<=k} sigmoid(logit c_i / T_i) against survival with T_0..T_{k-1} already fixed.
    """
    c = torch.as_tensor(confidences)
    L = torch.as_tensor(accept_lengths).long().flatten()
    if c.dim() != 2 or c.shape[0] != L.numel() or c.shape[0] == 0:
        raise ValueError(
            f"confidences must be [N, g] (N >= 1) and accept_lengths [N], got {tuple(c.shape)} and {tuple(L.shape)}"
        )
    if bool(torch.isnan(c).any()):
        raise ValueError("confidences contain NaN")
    if bool(((L < 0) | (L > c.shape[1])).any()):
        raise ValueError(f"accept_lengths must be in [0, {c.shape[1]}]")
    if grid is None:
        grid = sorted(set(torch.logspace(math.log10(0.05), math.log10(20.0), 161).tolist()) | {1.0})
    grid = [float(t) for t in grid]
    if not grid or any(not (t > 0) or math.isinf(t) for t in grid):
        raise ValueError("grid temperatures must be positive finite")
    z = _logit(c)
    prefix = torch.ones(c.shape[0], dtype=torch.float64)
    temps = []
    for k in range(c.shape[1]):
        y = (L > k).double()
        best_t, best_e = 1.0, math.inf
        for t in grid:
            e = ece(prefix * torch.sigmoid(z[:, k] / t), y, bins)
            if e < best_e - 1e-12 or (abs(e - best_e) <= 1e-12 and abs(math.log(t)) < abs(math.log(best_t))):
                best_t, best_e = t, e
        temps.append(best_t)
        prefix = prefix * torch.sigmoid(z[:, k] / best_t)
    return torch.tensor(temps, dtype=torch.float32)
