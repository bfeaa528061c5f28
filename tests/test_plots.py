"""dspark_native.plots: the reliability diagram and training curves draw exactly the data they are
given (read back from the matplotlib artists), write real PNGs headless, and without matplotlib
the commands still write their JSON and say what to install."""

from __future__ import annotations

import json
import struct
import sys

import pytest
import torch

from cli_helpers import make_cli_dirs, run_cli

from dspark_native import plots
from dspark_native.metrics import ece, reliability_bins


def _png_size(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _synthetic(n=4000, g=4, seed=4):
    gen = torch.Generator().manual_seed(seed)
    c = torch.rand(n, g, generator=gen, dtype=torch.float64)
    L = torch.randint(0, g + 1, (n,), generator=gen)
    lab = torch.stack([(L > k).double() for k in range(g)], 1)
    return torch.cumprod(c, 1), lab


def test_reliability_figure_draws_the_bins(tmp_path):
    pytest.importorskip("matplotlib")
    pred, lab = _synthetic()
    fig = plots.reliability_figure(pred, lab, bins=10, title="t", series=["a", "b", "c", "d"])
    ax, axc = fig.axes[0], fig.axes[1]
    count, _, freq = reliability_bins(pred, lab, 10)
    heights = [p.get_height() for p in ax.patches]
    assert heights == pytest.approx(freq[count > 0].tolist())
    assert [p.get_height() for p in axc.patches] == pytest.approx(count.tolist())
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"perfect calibration", "a", "b", "c", "d"}
    ck, mk, fk = reliability_bins(pred[:, 2], lab[:, 2], 10)
    assert list(lines["c"].get_xdata()) == pytest.approx(mk[ck > 0].tolist())
    assert list(lines["c"].get_ydata()) == pytest.approx(fk[ck > 0].tolist())
    assert f"ECE {ece(pred, lab, 10):.3f}" in ax.get_title()
    path = plots.reliability_diagram(pred, lab, str(tmp_path / "rel.png"), bins=10)
    assert _png_size(path) == (520, 600)
    with pytest.raises(ValueError, match="same shape"):
        plots.reliability_figure(pred, lab[:, :2])


def test_training_curves_from_a_resumed_log(tmp_path):
    pytest.importorskip("matplotlib")
    log = tmp_path / "log.jsonl"
    recs = [
        dict(step=s, lr=1e-3 / s, loss=3.0 / s, ce=2.0 / s, l1=0.5, bce=0.1, acc=[0.1 * s, 0.05 * s, 0.0])
        for s in (1, 2, 3)
    ]
    # a resumed run appends: step 3 logged again with other values -> the last record wins
    again = dict(recs[2], loss=9.0)
    log.write_text("".join(json.dumps(r) + "\n" for r in recs + [again]))
    rows = plots.read_training_log(str(log))
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] == 9.0
    fig = plots.training_curves_figure(rows, max_positions=2)
    ax_loss, ax_acc, ax_lr = fig.axes
    lines = {ln.get_label(): ln for ln in ax_loss.get_lines()}
    assert set(lines) == {"loss", "ce", "l1", "bce"}
    assert list(lines["loss"].get_ydata()) == pytest.approx([3.0, 1.5, 9.0])
    assert [ln.get_label() for ln in ax_acc.get_lines()] == ["acc@0", "acc@1"]
    assert list(ax_acc.get_lines()[1].get_ydata()) == pytest.approx([0.05, 0.1, 0.15])
    assert list(ax_lr.get_lines()[0].get_ydata()) == pytest.approx([1e-3, 5e-4, 1e-3 / 3])
    out = plots.training_curves(str(log), str(tmp_path / "curves.png"))
    assert _png_size(out) == (640, 720)
    with pytest.raises(ValueError, match="no training record"):
        plots.training_curves_figure([])


@pytest.fixture
def no_matplotlib(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError


def test_without_matplotlib_functions_say_what_to_install(no_matplotlib, tmp_path):
    assert not plots.have_matplotlib()
    pred, lab = _synthetic(50)
    with pytest.raises(plots.PlotsUnavailable, match="pip install matplotlib"):
        plots.reliability_diagram(pred, lab, str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_commands_without_matplotlib_write_json_and_say_so(no_matplotlib, tmp_path, capsys):
    d = make_cli_dirs(tmp_path, block_size=4)
    run = tmp_path / "run"
    rc, out, err = run_cli(
        capsys,
        "train",
        "--target",
        d["target"],
        "--prompts",
        d["prompts"],
        "--data-dir",
        tmp_path / "data",
        "--out",
        run,
        "--steps",
        "2",
        "--layers",
        "1",
        "--markov-rank",
        "8",
        "--block-size",
        "4",
        "--answer-tokens",
        "6",
        "--data-batch",
        "5",
        "--anchors",
        "2",
        "--batch-sequences",
        "2",
        "--save-every",
        "2",
    )
    assert rc == 0, err
    assert "pip install matplotlib" in err and not (run / "training_curves.png").exists()
    res = tmp_path / "eval.json"
    rc, out, err = run_cli(
        capsys,
        "eval",
        d["prompts"],
        "--target",
        d["target"],
        "--drafter",
        d["drafter"],
        "--limit",
        "2",
        "--max-new-tokens",
        "6",
        "--temperatures",
        "0",
        "--out",
        res,
        "--png",
        tmp_path / "rel",
    )
    assert rc == 0, err
    assert "pip install matplotlib" in err
    assert json.load(open(res))["temperatures"]["0"]["overall"]["rounds"] > 0
    assert not list(tmp_path.glob("rel*.png"))


def test_commands_write_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    d = make_cli_dirs(tmp_path, block_size=4)
    run = tmp_path / "run"
    rc, out, err = run_cli(
        capsys,
        "train",
        "--target",
        d["target"],
        "--prompts",
        d["prompts"],
        "--data-dir",
        tmp_path / "data",
        "--out",
        run,
        "--steps",
        "2",
        "--layers",
        "1",
        "--markov-rank",
        "8",
        "--block-size",
        "4",
        "--answer-tokens",
        "6",
        "--data-batch",
        "5",
        "--anchors",
        "2",
        "--batch-sequences",
        "2",
        "--save-every",
        "2",
    )
    assert rc == 0, err
    assert f"wrote {run / 'training_curves.png'}" in out
    assert _png_size(run / "training_curves.png") == (640, 720)
    rc, out, err = run_cli(
        capsys,
        "eval",
        d["prompts"],
        "--target",
        d["target"],
        "--drafter",
        d["drafter"],
        "--limit",
        "2",
        "--max-new-tokens",
        "6",
        "--temperatures",
        "0",
        "--out",
        tmp_path / "eval.json",
        "--png",
        tmp_path / "rel",
    )
    assert rc == 0, err
    assert _png_size(tmp_path / "rel_T0_raw.png") == (520, 600)
