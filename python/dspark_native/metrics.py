"""Calibration metrics of the confidence head (ECE, AUC, Brier, per position) and a dependency-free
reliability-diagram PNG writer.

Conventions (docs/scheduler.md): for a drafted round with confidences ``c[n, k]`` and ``L[n]``
accepted drafts,
  * the *conditional* label of position k is ``L > k`` among rounds with ``L >= k`` (draft k was
    verified with all earlier drafts accepted); ``c[n, k]`` predicts it;
  * the *prefix-survival* label is ``L > k`` over all rounds; ``prod_{i<=k} c[n, i]`` predicts it
    (what the scheduler consumes, and what STS calibrates).

The PNG writer is a tiny rasteriser (zlib + struct, no matplotlib): bars of the observed frequency
per confidence bin, the diagonal, and a strip below the plot whose darkness is the bin's share of
samples. It has no text; the caption belongs in the surrounding report.
"""

from __future__ import annotations

import struct
import zlib
from typing import Dict, List, Optional

import torch

__all__ = ["ece", "auc", "brier", "reliability_bins", "per_position_metrics", "reliability_diagram_png"]


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


def per_position_metrics(confidences, accept_lengths, bins: int = 20) -> List[Dict[str, float]]:
    """Per position k: conditional acceptance rate and count, ECE / AUC / Brier of c_k against the
    conditional label, and ECE / Brier of the cumulative product against prefix survival."""
    c = torch.as_tensor(confidences, dtype=torch.float64)
    L = torch.as_tensor(accept_lengths).long().flatten()
    if c.dim() != 2 or c.shape[0] != L.numel():
        raise ValueError(f"confidences must be [N, g] and accept_lengths [N], got {tuple(c.shape)} and {tuple(L.shape)}")
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


# ---------------------------------------------------------------------------------------------
# PNG
# ---------------------------------------------------------------------------------------------
def _png_bytes(pixels: torch.Tensor) -> bytes:
    """RGB uint8 [H, W, 3] -> PNG file bytes (colour type 2, filter 0 per row)."""
    h, w, _ = pixels.shape
    raw = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), pixels.reshape(h, w * 3)], 1).contiguous()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw.numpy().tobytes(), 9))
            + chunk(b"IEND", b""))


def reliability_diagram_png(pred, label, path: Optional[str] = None, bins: int = 20, size: int = 400) -> bytes:
    """Rasterise a reliability diagram and return the PNG bytes (also written to `path` if given).

    Layout: square plot of `size` px with a margin; x = confidence bin, bar height = observed
    frequency (blue), red tick = mean prediction in the bin, grey diagonal = perfect calibration,
    a strip underneath whose darkness is the bin's share of samples."""
    count, mp, my = reliability_bins(pred, label, bins)
    m, strip = 20, 24
    W, H = size + 2 * m, size + 2 * m + strip
    img = torch.full((H, W, 3), 255, dtype=torch.uint8)
    x0, y0 = m, m  # top-left of the plot area; y grows downwards

    def px(fx, fy):  # plot coordinates in [0, 1] -> pixel (row, col)
        return int(round(y0 + (1 - fy) * (size - 1))), int(round(x0 + fx * (size - 1)))

    bw = size / bins
    for b in range(bins):
        c0, c1 = int(x0 + b * bw) + 1, int(x0 + (b + 1) * bw) - 1
        if count[b] > 0:
            top, _ = px(0, float(my[b]))
            img[top:y0 + size, c0:c1 + 1] = torch.tensor([70, 110, 200], dtype=torch.uint8)
            r, _ = px(0, float(mp[b]))
            img[max(r - 1, y0):r + 2, c0:c1 + 1] = torch.tensor([210, 40, 40], dtype=torch.uint8)
        share = float(count[b] / max(count.sum().item(), 1.0))
        shade = int(255 - min(1.0, share * bins / 4) * 200)
        img[y0 + size + 6:y0 + size + strip, c0:c1 + 1] = shade
    for t in range(size):  # diagonal
        r, c = px(t / (size - 1), t / (size - 1))
        img[max(r - 1, 0):r + 1, c] = 120
    img[y0, x0:x0 + size] = 0  # frame
    img[y0 + size - 1, x0:x0 + size] = 0
    img[y0:y0 + size, x0] = 0
    img[y0:y0 + size, x0 + size - 1] = 0
    data = _png_bytes(img)
    if path is not None:
        with open(path, "wb") as f:
            f.write(data)
    return data
