"""dspark_native.scheduler and dspark_native.metrics: the policies behind one interface, the
asynchronous policy's budget/top-K rule, SPS profiling to JSON, STS calibration on a synthetic
over-confident predictor with known survival, calibration metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch

import dspark_native.ops as ops
from dspark_native import metrics
from dspark_native.reference import schedule_prefix_reference
from dspark_native.scheduler import (
    ConfidenceThreshold,
    HardwareAwareAsync,
    HardwareAwareCausal,
    SPSTable,
    StaticLength,
    apply_sts,
    calibrate_sts,
    profile_sps,
)


def sps_curve(T, knee=8):
    b = torch.arange(1, T + 1, dtype=torch.float64)
    return (50.0 / torch.clamp(b / knee, min=1.0) ** 0.8).float()


# ---------------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------------
def test_policies_share_one_interface():
    c = torch.tensor([[0.9, 0.8, 0.2, 0.9], [0.3, 0.9, 0.9, 0.9], [1.0, 1.0, 1.0, 0.0]])
    sps = sps_curve(3 * 5, knee=6)
    policies = [
        StaticLength(2),
        StaticLength(9),
        ConfidenceThreshold(0.5),
        ConfidenceThreshold(0.5, cumulative=False),
        HardwareAwareCausal(sps),
        HardwareAwareAsync(sps),
    ]
    for p in policies:
        out = p(c)
        assert out.dtype == torch.int64 and out.shape == (3,)
        assert bool(((out >= 0) & (out <= 4)).all()), p.name
    assert StaticLength(2)(c).tolist() == [2, 2, 2]
    assert StaticLength(9)(c).tolist() == [4, 4, 4]
    assert ConfidenceThreshold(0.5)(c).tolist() == [2, 0, 3]  # products 0.9, 0.72, 0.144 ...
    assert ConfidenceThreshold(0.5, cumulative=False)(c).tolist() == [2, 0, 3]
    assert torch.equal(HardwareAwareCausal(sps)(c), ops.schedule_prefix(c, sps).lengths)


def test_round_overhead_is_the_sps_of_the_whole_round():
    """overhead_s turns the forward's table into the round's, 1 / (1 / sps + overhead), and a
    fixed cost per round makes Algorithm 1 verify longer (it amortises the cost)."""
    sps = 1.0 / (0.010 + 0.002 * torch.arange(1, 9, dtype=torch.float32))  # 12 ms + 2 ms a token
    c = torch.tensor([[0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]])
    bare = HardwareAwareCausal(sps)
    assert bare(c).tolist() == [2]  # 1.96 tokens / 16 ms beats 1.6 / 14 and 2.18 / 18
    ov = HardwareAwareCausal(sps, overhead_s=0.05)
    want = ops.schedule_prefix(c, 1.0 / (1.0 / sps + 0.05)).lengths
    assert torch.equal(ov(c), want) and want.tolist() == [5]  # 2.38 tokens / 72 ms is the best
    ov.overhead_s = 0.0  # back to the table as profiled
    assert ov(c).tolist() == [2]
    ov.overhead_s = float("nan")  # a broken measurement never reaches the kernel
    assert ov(c).tolist() == [2]
    assert HardwareAwareAsync(sps, overhead_s=0.05).budget_from(c) >= int(want)
    assert bare.host_sps() == pytest.approx(sps.tolist())


def test_async_policy_budget_from_two_rounds_ago_then_top_k():
    gen = torch.Generator().manual_seed(3)
    R, G = 6, 5
    sps = sps_curve(R * (1 + G), knee=9)
    pol = HardwareAwareAsync(sps, lag=2)
    rounds = [torch.rand(R, G, generator=gen) ** 0.3 for _ in range(6)]
    for t, c in enumerate(rounds):
        out = pol.schedule(c)
        if t < 2:  # no history yet: the causal policy
            assert torch.equal(out, ops.schedule_prefix(c, sps, mode="causal").lengths)
            continue
        K = int(schedule_prefix_reference(rounds[t - 2], sps, mode="global")[0].sum())
        # top-K current survival products, ties r asc then j asc
        a = torch.cumprod(c, 1)
        cand = sorted(
            ((a[r, j].item(), r, j) for r in range(R) for j in range(G) if a[r, j] > 0),
            key=lambda x: (-x[0], x[1], x[2]),
        )[:K]
        expect = torch.zeros(R, dtype=torch.int64)
        for _, r, j in cand:
            expect[r] = max(int(expect[r]), j + 1)
        assert torch.equal(out, expect), (t, out, expect)
        assert int(out.sum()) == K
    pol.reset()
    assert torch.equal(pol.schedule(rounds[0]), ops.schedule_prefix(rounds[0], sps).lengths)


def test_policy_argument_errors():
    with pytest.raises(ValueError, match="length"):
        StaticLength(-1)
    with pytest.raises(ValueError, match="threshold"):
        ConfidenceThreshold(1.5)
    with pytest.raises(ValueError, match="lag"):
        HardwareAwareAsync([1.0], lag=0)
    with pytest.raises(RuntimeError, match="sps_table"):
        HardwareAwareCausal([1.0, 0.5])(torch.rand(3, 4))
    with pytest.raises(ValueError, match="confidences"):
        ConfidenceThreshold(0.5)(torch.rand(4))


# ---------------------------------------------------------------------------------------------
# SPS profiling
# ---------------------------------------------------------------------------------------------
def test_profile_sps_with_a_fake_clock(tmp_path):
    clock = [0.0]

    def timer():
        return clock[0]

    def forward(B):  # a step costs 10 ms up to 16 tokens, then grows linearly
        clock[0] += 0.01 * max(1.0, B / 16)

    path = tmp_path / "sps.json"
    table = profile_sps(forward, 200, path=str(path), model="toy-target", timer=timer, repeats=3)
    assert len(table.sps) == 200
    assert table.sps[0] == pytest.approx(100.0) and table.sps[15] == pytest.approx(100.0)
    assert table.sps[159] == pytest.approx(10.0, rel=1e-6)
    assert table.sps[199] == pytest.approx(100.0 * 16 / 200, rel=1e-6)
    d = json.loads(path.read_text())
    assert d["model"] == "toy-target" and d["device"] and len(d["sps"]) == 200
    loaded = SPSTable.load(str(path))
    assert loaded.sps == table.sps
    # usable by the policies directly
    out = HardwareAwareCausal(loaded)(torch.full((4, 7), 0.9))
    assert out.shape == (4,)


def test_profile_sps_real_forward_and_errors(tmp_path):
    x = torch.randn(64, 64)
    table = profile_sps(lambda B: x[:1].expand(B, 64) @ x, 8, repeats=2)
    assert len(table.sps) == 8 and all(s > 0 for s in table.sps)
    with pytest.raises(ValueError, match="max_tokens"):
        profile_sps(lambda B: None, 0)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"sps": [1.0, -2.0]}))
    with pytest.raises(ValueError, match="sps"):
        SPSTable.load(str(bad))


# ---------------------------------------------------------------------------------------------
# STS calibration
# ---------------------------------------------------------------------------------------------
def synthetic_rounds(N, G, gen, overconfidence=(2.5, 3.0, 3.5, 2.0, 4.0, 3.0)):
    """True conditional acceptance p[n, k] is known; the predictor reports sigmoid(s_k * logit p):
    over-confident for s_k > 1. Accept lengths are drawn sequentially from p."""
    p = torch.sigmoid(torch.randn(N, G, generator=gen) * 1.2 + 1.0)
    s = torch.tensor(overconfidence[:G])
    conf = torch.sigmoid(torch.log(p / (1 - p)) * s)
    acc = torch.rand(N, G, generator=gen) < p
    L = torch.cumprod(acc.long(), 1).sum(1)
    return conf, L, p, s


def test_sts_lowers_ece_on_an_overconfident_predictor():
    gen = torch.Generator().manual_seed(0)
    G = 6
    conf, L, _, s = synthetic_rounds(20000, G, gen)
    T = calibrate_sts(conf, L)
    assert T.shape == (G,) and bool((T > 1.0).all()), T  # over-confidence needs T > 1
    test_conf, test_L, p, _ = synthetic_rounds(20000, G, gen)
    before = [metrics.ece(torch.cumprod(test_conf, 1)[:, k], (test_L > k).double()) for k in range(G)]
    cal = apply_sts(test_conf, T)
    after = [metrics.ece(torch.cumprod(cal, 1)[:, k], (test_L > k).double()) for k in range(G)]
    for k in range(G):
        assert after[k] < 0.5 * before[k] and after[k] < 0.025, (k, before, after)
    # the first position recovers the true scale (the predictor is logit(p) * s_0)
    assert T[0].item() == pytest.approx(s[0].item(), rel=0.2)


def test_sts_matches_the_kernel_formula():
    """dspark_draft(sts_temperature=T) computes sigmoid(logit / T) from the raw logit, which is
    apply_sts of the raw confidence."""
    D, V = 5, 11
    h = torch.randn(3, 4, D)
    w = torch.zeros(V, 2)
    cw, cb = torch.randn(1, D + 2), torch.randn(1)
    args = (torch.randn(3, 4, V), torch.zeros(3, dtype=torch.long), w, w)
    raw = ops.dspark_draft(*args, hidden=h, conf_weight=cw, conf_bias=cb).confidence
    T = [0.5, 1.5, 2.0, 3.0]
    cal = ops.dspark_draft(*args, hidden=h, conf_weight=cw, conf_bias=cb, sts_temperature=T).confidence
    torch.testing.assert_close(cal, apply_sts(raw, T), rtol=1e-4, atol=1e-6)


def test_sts_errors():
    with pytest.raises(ValueError, match="accept_lengths"):
        calibrate_sts(torch.rand(5, 3), torch.tensor([0, 1, 4, 0, 0]))
    with pytest.raises(ValueError, match="confidences"):
        calibrate_sts(torch.rand(5, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        calibrate_sts(torch.tensor([[float("nan")]]), torch.zeros(1))
    with pytest.raises(ValueError, match="grid"):
        calibrate_sts(torch.rand(5, 3), torch.zeros(5), grid=[1.0, 0.0])
    with pytest.raises(ValueError, match="temperatures"):
        apply_sts(torch.rand(2, 3), [1.0, -1.0, 1.0])


# ---------------------------------------------------------------------------------------------
# Metrics (the reliability diagram is tested in test_plots.py)
# ---------------------------------------------------------------------------------------------
def test_metrics_basic_values():
    gen = torch.Generator().manual_seed(1)
    p = torch.rand(50000, generator=gen)
    y = (torch.rand(50000, generator=gen) < p).double()
    assert metrics.ece(p, y) < 0.01
    assert metrics.ece(torch.full((100,), 0.9), torch.zeros(100)) == pytest.approx(0.9)
    assert metrics.brier(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])) == pytest.approx(0.5)
    assert metrics.auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    assert metrics.auc(torch.tensor([0.5, 0.5]), torch.tensor([0, 1])) == pytest.approx(0.5)  # ties count 1/2
    assert math.isnan(metrics.auc(torch.rand(5), torch.ones(5)))
    assert 0.45 < metrics.auc(torch.rand(4000, generator=gen), torch.rand(4000, generator=gen) < 0.5) < 0.55
    with pytest.raises(ValueError, match="same number"):
        metrics.ece(torch.rand(3), torch.rand(4))


def test_per_position_metrics():
    gen = torch.Generator().manual_seed(2)
    conf, L, _, _ = synthetic_rounds(5000, 4, gen)
    rows = metrics.per_position_metrics(conf, L)
    assert [r["position"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["reached"] == 5000 and rows[1]["reached"] == int((L >= 1).sum())
    assert rows[0]["cond_accept"] == pytest.approx(float((L > 0).double().mean()))
    assert all(0.5 < r["auc"] <= 1.0 for r in rows)
    assert rows[0]["ece_cum"] == pytest.approx(rows[0]["ece"])
