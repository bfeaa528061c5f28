"""Figures written by the commands, drawn with matplotlib when it is installed (an optional extra:
``pip install matplotlib`` or ``pip install dspark-native[plots]``; scripts/setup.sh installs it).

Only matplotlib's object-oriented API with the Agg canvas is used (``Figure`` +
``FigureCanvasAgg``, never ``pyplot``): headless, no display needed, and the process-wide backend a
user may have chosen is left alone. Without matplotlib every function raises
:class:`PlotsUnavailable`, whose message says what to install; callers write their JSON anyway.

* :func:`reliability_diagram`: observed frequency against predicted probability per bin (the
  confidence head's calibration; ``dspark-native eval --png``).
* :func:`training_curves`: loss, per-position accuracy and learning rate by step from a
  training run's ``log.jsonl`` (``dspark-native train``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch

from .metrics import ece, reliability_bins

__all__ = [
    "PlotsUnavailable",
    "have_matplotlib",
    "reliability_figure",
    "reliability_diagram",
    "read_training_log",
    "training_curves_figure",
    "training_curves",
    "INSTALL_HINT",
]

INSTALL_HINT = "plots need matplotlib: pip install matplotlib"


class PlotsUnavailable(ImportError):
    """matplotlib is not installed; ``str()`` says how to install it."""


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotsUnavailable(INSTALL_HINT) from None
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def have_matplotlib() -> bool:
    """True when the plotting functions can run."""
    try:
        _figure(1, 1)
        return True
    except PlotsUnavailable:
        return False


def reliability_figure(pred, label, *, bins: int = 20, title: str | None = None, series: Sequence[str] | None = None):
    """Reliability diagram as a matplotlib Figure.

    pred, label: probabilities and 0/1 outcomes of the same shape, [N] or [N, K]; with K columns
    the bars pool every column and each column is also drawn as its own line (named by
    ``series``, default ``k=0..K-1``). Top panel: bars = observed frequency per equal-width bin
    (of the pooled samples), the diagonal = perfect calibration, lines = observed frequency
    against mean prediction per non-empty bin of each column; the title carries the pooled ECE.
    Bottom panel: samples per bin (log scale). Axes: ``fig.axes[0]`` (diagram),
    ``fig.axes[1]`` (counts)."""
    p = torch.as_tensor(pred, dtype=torch.float64)
    y = torch.as_tensor(label, dtype=torch.float64)
    if p.shape != y.shape:
        raise ValueError(f"pred and label must have the same shape, got {tuple(p.shape)} and {tuple(y.shape)}")
    if p.dim() == 1:
        p, y = p[:, None], y[:, None]
    if p.dim() != 2:
        raise ValueError(f"pred must be [N] or [N, K], got {tuple(p.shape)}")
    count, mean_p, freq = reliability_bins(p, y, bins)
    fig = _figure(5.2, 6.0)
    gs = fig.add_gridspec(2, 1, height_ratios=[3.2, 1], hspace=0.08)
    ax = fig.add_subplot(gs[0])
    axc = fig.add_subplot(gs[1], sharex=ax)
    width = 1.0 / bins
    left = torch.arange(bins, dtype=torch.float64) * width
    nonempty = count > 0
    ax.bar(
        left[nonempty].tolist(),
        freq[nonempty].tolist(),
        width=width,
        align="edge",
        color="#4a6fc8",
        alpha=0.45,
        edgecolor="#2c4a8f",
        linewidth=0.6,
        label="observed (pooled)",
    )
    ax.plot([0, 1], [0, 1], color="0.45", linestyle="--", linewidth=1, label="perfect calibration")
    names = list(series) if series is not None else [f"k={k}" for k in range(p.shape[1])]
    if p.shape[1] > 1:
        for k in range(p.shape[1]):
            ck, mk, fk = reliability_bins(p[:, k], y[:, k], bins)
            keep = ck > 0
            ax.plot(
                mk[keep].tolist(),
                fk[keep].tolist(),
                marker="o",
                markersize=3,
                linewidth=1,
                label=names[k] if k < len(names) else f"k={k}",
            )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("observed frequency")
    ax.legend(loc="upper left", fontsize=7, ncol=2, frameon=False)
    head = f"{title}\n" if title else ""
    ax.set_title(f"{head}ECE {ece(p, y, bins):.3f} over {int(count.sum())} samples", fontsize=9)
    ax.tick_params(labelbottom=False)
    axc.bar(left.tolist(), count.tolist(), width=width, align="edge", color="0.55")
    axc.set_yscale("symlog", linthresh=1)
    axc.set_xlabel("predicted probability")
    axc.set_ylabel("samples")
    return fig


def reliability_diagram(pred, label, path: str, **kw) -> str:
    """Write :func:`reliability_figure` as a PNG to ``path``; returns ``path``."""
    reliability_figure(pred, label, **kw).savefig(path, format="png")
    return path


def read_training_log(path: str) -> list[dict]:
    """Records of a training ``log.jsonl`` (one JSON object a line: step, lr, loss, acc, ...);
    a resumed run appends, so a step logged twice keeps its last record."""
    by_step = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def training_curves_figure(records: Sequence[dict], title: str | None = None, max_positions: int = 4):
    """Training curves as a matplotlib Figure: total loss and its parts (``ce``, ``l1``, ``bce``
    where logged), accuracy of the first ``max_positions`` block positions (``acc``), and the
    learning rate, each against the step; held-out records (``dev_tau``, logged at checkpoints)
    add the teacher-forced tau on the accuracy axis's twin. Axes: loss, accuracy, lr."""
    # a resumed run logs again the steps after its last checkpoint: keep the last record per step
    last_train, last_dev = {}, {}
    for r in records:
        (last_dev if "dev_tau" in r else last_train if "loss" in r else {})[r["step"]] = r
    dev = [last_dev[k] for k in sorted(last_dev)]
    records = [last_train[k] for k in sorted(last_train)]
    if not records:
        raise ValueError("no training record to plot")
    steps = [r["step"] for r in records]
    fig = _figure(6.4, 7.2)
    ax_loss, ax_acc, ax_lr = fig.subplots(3, 1, sharex=True)
    ax_loss.plot(steps, [r["loss"] for r in records], label="loss", linewidth=1.4)
    for k in ("ce", "l1", "bce"):
        if all(k in r for r in records):
            ax_loss.plot(steps, [r[k] for r in records], label=k, linewidth=1)
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=7, frameon=False)
    npos = min(max_positions, min(len(r.get("acc", [])) for r in records))
    for k in range(npos):
        ax_acc.plot(steps, [r["acc"][k] for r in records], label=f"acc@{k}", linewidth=1)
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    if npos:
        ax_acc.legend(fontsize=7, frameon=False, ncol=npos, loc="upper left")
    if dev:
        ax_tau = ax_acc.twinx()
        ax_tau.plot([r["step"] for r in dev], [r["dev_tau"] for r in dev], "k.-", label="held-out tau", linewidth=1.2)
        ax_tau.set_ylabel("held-out tau (greedy, teacher forced)")
        ax_tau.legend(fontsize=7, frameon=False, loc="lower right")
    ax_lr.plot(steps, [r["lr"] for r in records], color="0.3", linewidth=1)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    if title:
        ax_loss.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def training_curves(log_path: str, path: str, title: str | None = None) -> str:
    """Write :func:`training_curves_figure` of ``log_path`` (a ``log.jsonl``) as a PNG to
    ``path``; returns ``path``."""
    training_curves_figure(read_training_log(log_path), title).savefig(path, format="png")
    return path
