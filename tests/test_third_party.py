"""third_party/: every vendored item states its source and licence, and the transcribed paper
results reproduce the figures the paper states in its text (a typo in the table would not)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TP = ROOT / "third_party"
pytestmark = pytest.mark.skipif(not TP.is_dir(), reason="not a source tree (no third_party/)")


def test_every_item_has_source_and_licence():
    readme = (TP / "README.md").read_text()
    assert "Nothing is fetched at build time" in readme
    items = [p for p in TP.iterdir() if p.is_dir()]
    assert items
    for item in items:
        assert f"`{item.name}/`" in readme, f"{item.name} not listed in third_party/README.md"
        text = (item / "README.md").read_text()
        assert "\nSource:" in "\n" + text and "\nLicence:" in "\n" + text, item
        for f in item.iterdir():
            if f.name != "README.md":
                assert f"`{f.name}`" in text, f"{f} not described in its README"


def _load(name):
    return json.loads((TP / "dspark_paper" / name).read_text())


def test_table1_reproduces_the_stated_figures():
    t = _load("table1_tau.json")
    bench = t["benchmarks"]
    assert sorted(sum(t["domains"].values(), [])) == sorted(bench)
    for target, rows in t["tau"].items():
        assert set(rows) == {"Eagle3", "DFlash", "DSpark"}, target
        for name, vals in rows.items():
            assert len(vals) == len(bench) and all(1 <= v <= 8 for v in vals), (target, name)
    stated = t["stated_in_text"]
    for other in ("Eagle3", "DFlash"):
        for target, pct in stated[f"macro_improvement_pct_vs_{other}"].items():
            rows = t["tau"][target]
            got = 100 * (sum(rows["DSpark"]) / sum(rows[other]) - 1)
            assert round(got, 1) == pct, (target, other, got)
    by = dict(zip(bench, t["tau"]["Qwen3-4B"]["DSpark"], strict=True))
    for dom, mean in stated["domain_mean_tau_DSpark_Qwen3-4B"].items():
        names = t["domains"][dom]
        assert round(sum(by[b] for b in names) / len(names), 2) == mean, dom


def test_figure6_matches_the_stated_ranges():
    f = _load("figure6_calibration.json")
    n = len(f["positions"])
    assert len(f["ece_pct_before_sts"]) == len(f["ece_pct_after_sts"]) == len(f["auc"]) == n
    s = f["stated_in_text"]
    trunc = lambda x, d: math.floor(x * 10**d) / 10**d  # noqa: E731 - the text truncates
    assert [trunc(min(f["auc"]), 2), trunc(max(f["auc"]), 2)] == s["auc_range"]
    assert [trunc(min(f["ece_pct_before_sts"]), 0), trunc(max(f["ece_pct_before_sts"]), 0)] == s["ece_pct_range_before"]
    assert abs(sum(f["ece_pct_after_sts"]) / n - s["mean_ece_pct_after_about"]) < 0.5
    assert all(a < b for a, b in zip(f["ece_pct_after_sts"], f["ece_pct_before_sts"], strict=True))


def test_results_tool_prints_the_paper_rows(tmp_path):
    ev = {
        "temperatures": {
            "1": {
                "domains": {"gsm8k": {"tau": 1.5}},
                "overall": {"macro_tau": 1.5, "cond_accept": [0.3], "reached": [10]},
            }
        }
    }
    path = tmp_path / "e.json"
    path.write_text(json.dumps(ev))
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "drafter_results_table.py"), f"ours={path}", "--paper"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "| ours | 1.50 | **1.50** |" in r.stdout
    assert "| DSpark | 6.11 | 5.70" in r.stdout and "DSpark macro tau vs Eagle3 +30.9%, DFlash +16.3%" in r.stdout
