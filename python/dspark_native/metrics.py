"""Calibration metrics of the confidence head (ECE, AUC, Brier, per position).

Conventions (docs/scheduler.md): for a drafted round with confidences ``c[n, k]`` and ``L[n]``
accepted drafts,
  * the *conditional* label of position k is ``L > k`` among rounds with ``L >= k`` (draft k was
    verified with all earlier drafts accepted); ``c[n, k]`` predicts it;
  * the *prefix-survival* label is ``L > k`` over all rounds; ``prod_{i<=k} c[n, i]`` predicts it
    (what the scheduler consumes, and what STS calibrates).

Reliability diagrams of these bins are drawn by :mod:`dspark_native.plots` (matplotlib).
"""

from __future__ import annotations

import torch

__all__ = ["ece", "auc", "brier", "reliability_bins", "per_position_metrics"]


def _flat(pred, label):
    p = torch.as_tensor(pred, dtype=torch.float64).flatten()
    y = torch.as_tensor(label, dtype=torch.float64).flatten()
    if p.shape != y.shape:
        raise ValueError(f"pred and label must have the same number of elements, got {p.numel()} and {y.numel()}")
    if bool(torch.isnan(p).any()):
        raise ValueError("pred contains NaN")
    return p, y


def reliability_bins(pred, label, bins: int = 20):
    """Equal-width bins on [0, 1] (the last bin includes 1): (count, mean prediction, observed
    frequency) per bin, each a float64 tensor [bins] (means are 0 where the count is 0)."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    p, y = _flat(pred, label)
    idx = torch.clamp((p * bins).long(), 0, bins - 1)
    count = torch.bincount(idx, minlength=bins).double()
    sp = torch.bincount(idx, weights=p, minlength=bins)
    sy = torch.bincount(idx, weights=y, minlength=bins)
    safe = torch.clamp(count, min=1)
    return count, sp / safe, sy / safe


def ece(pred, label, bins: int = 20) -> float:
    """Expected calibration error with `bins` equal-width bins: sum_b n_b / N |mean p_b - mean y_b|."""
    count, mp, my = reliability_bins(pred, label, bins)
    n = count.sum().item()
    return 0.0 if n == 0 else float((count * (mp - my).abs()).sum().item() / n)


def brier(pred, label) -> float:
    """Mean squared error of the probabilities."""
    p, y = _flat(pred, label)
    return float(((p - y) ** 2).mean().item()) if p.numel() else 0.0


def auc(pred, label) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted one half); NaN with one class only."""
    p, y = _flat(pred, label)
    pos, neg = int((y > 0.5).sum()), int((y <= 0.5).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = torch.argsort(p)
    ps = p[order]
    ranks = torch.empty_like(p)
    # average ranks over ties
    uniq, inverse, counts = torch.unique_consecutive(ps, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    r_pos = ranks[y > 0.5].sum().item()
    return float((r_pos - pos * (pos + 1) / 2) / (pos * neg))


def per_position_metrics(confidences, accept_lengths, bins: int = 20) -> list[dict[str, float]]:
    """Per position k: conditional acceptance rate and count, ECE / AUC / Brier of c_k against the
    conditional label, and ECE / Brier of the cumulative product against prefix survival."""
    c = torch.as_tensor(confidences, dtype=torch.float64)
    L = torch.as_tensor(accept_lengths).long().flatten()
    if c.dim() != 2 or c.shape[0] != L.numel():
        raise ValueError(
            f"confidences must be [N, g] and accept_lengths [N], got {tuple(c.shape)} and {tuple(L.shape)}"
        )
    cum = torch.cumprod(c, 1)
    out = []
    for k in range(c.shape[1]):
        reached = L >= k
        yk = (L[reached] > k).double()
        row = {
            "position": k,
            "reached": int(reached.sum()),
            "cond_accept": float(yk.mean()) if yk.numel() else float("nan"),
            "mean_conf": float(c[reached, k].mean()) if yk.numel() else float("nan"),
            "ece": ece(c[reached, k], yk, bins) if yk.numel() else float("nan"),
            "auc": auc(c[reached, k], yk) if yk.numel() else float("nan"),
            "brier": brier(c[reached, k], yk) if yk.numel() else float("nan"),
            "survival": float((L > k).double().mean()),
            "ece_cum": ece(cum[:, k], (L > k).double(), bins),
            "brier_cum": brier(cum[:, k], (L > k).double()),
        }
        out.append(row)
    return out
