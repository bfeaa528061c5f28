"""schedule_prefix (paper Algorithm 1): reference agreement on random inputs with ties and zeros,
the early stop (causal lengths do not depend on confidences past the stopping point), the paper's
Appendix A reproduced end to end (dspark_draft -> schedule_prefix -> verify_chain), per-request
bounds and the token budget, hostile input, opcheck, and CUDA agreement (GPU machines only).

The Appendix A test is statistical: chi-square at false-alarm rate ALPHA = 1e-3 (tests/stats.py),
fixed seeds.
"""

from __future__ import annotations

import math
import os as _os
import sys as _sys

import pytest
import torch

_sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))  # stats.py lives beside the tests

from stats import assert_matches_distribution

import dspark_native.ops as ops
from dspark_native.reference import schedule_prefix_reference


def decaying_sps(T, knee=32, floor=0.2):
    """A smooth, decreasing steps-per-second curve (flat up to `knee` tokens, then 1/B-like)."""
    b = torch.arange(1, T + 1, dtype=torch.float64)
    return (100.0 / torch.clamp(b / knee, min=1.0) ** 0.9 + floor).float()


def random_conf(R, G, gen, kind):
    if kind == "uniform":
        return torch.rand(R, G, generator=gen)
    if kind == "ties":  # few distinct values: many equal survival products
        vals = torch.tensor([0.0, 0.25, 0.5, 1.0])
        return vals[torch.randint(0, 4, (R, G), generator=gen)]
    if kind == "zeros":
        return torch.zeros(R, G)
    return torch.where(torch.rand(R, G, generator=gen) < 0.2, torch.ones(R, G), torch.rand(R, G, generator=gen) ** 0.2)


@pytest.mark.parametrize("mode", ["causal", "global"])
@pytest.mark.parametrize("kind", ["uniform", "ties", "zeros", "high"])
def test_matches_reference(mode, kind):
    gen = torch.Generator().manual_seed(hash((mode, kind)) % 997)
    for trial in range(12):
        R = int(torch.randint(1, 40, (1,), generator=gen))
        G = int(torch.randint(0, 9, (1,), generator=gen))
        c = random_conf(R, G, gen, kind)
        knee = int(torch.randint(1, 3 * R + 2, (1,), generator=gen))
        sps = decaying_sps(R * (1 + G) + 3, knee=knee)
        if trial % 3 == 1:  # jagged table: steps and plateaus
            sps = sps * (1 + 0.3 * (torch.arange(sps.numel()) % 5 == 0).float())
        kw = dict(mode=mode)
        if trial % 4 == 2:
            kw["min_len"] = torch.randint(0, 3, (R,), generator=gen, dtype=torch.int32)
            kw["max_len"] = kw["min_len"] + torch.randint(0, G + 1, (R,), generator=gen, dtype=torch.int32)
        if trial % 4 == 3:
            kw["token_budget"] = R + int(torch.randint(0, R * G + 1, (1,), generator=gen))
        out = ops.schedule_prefix(c, sps, **kw)
        ref = schedule_prefix_reference(c, sps, **kw)
        assert torch.equal(out.lengths, ref[0]), (trial, out.lengths, ref[0])
        torch.testing.assert_close(out.throughput, ref[1])
        if kind == "zeros":
            assert bool((out.lengths == (kw["min_len"].clamp(max=G).long() if "min_len" in kw else 0)).all())


def test_large_batch_matches_reference():
    gen = torch.Generator().manual_seed(1)
    R, G = 256, 16
    c = torch.rand(R, G, generator=gen) ** 0.1
    sps = decaying_sps(R * (1 + G), knee=300)
    for mode in ("causal", "global"):
        out = ops.schedule_prefix(c, sps, mode=mode)
        ref = schedule_prefix_reference(c, sps, mode=mode)
        assert torch.equal(out.lengths, ref[0])
        assert out.lengths.sum() > 0


def test_flat_sps_admits_every_positive_candidate_and_steep_sps_none():
    c = torch.tensor([[0.9, 0.5, 0.0, 0.7], [1.0, 1.0, 1.0, 1.0]])
    flat = torch.full((10,), 3.0)
    assert ops.schedule_prefix(c, flat).lengths.tolist() == [2, 4]
    steep = 1.0 / torch.arange(1, 11).float() ** 2
    assert ops.schedule_prefix(c, steep).lengths.tolist() == [0, 0]


def test_hand_computed_example():
    # R = 1: SPS = (1, 0.5, 0.45): theta_0 = 1, theta_1 = 1.8 * 0.5 = 0.9 -> causal stops at l = 0;
    # global also sees theta_2 = (1 + 0.8 + 0.72) * 0.45 = 1.134 -> l = 2.
    c = torch.tensor([[0.8, 0.9]])
    sps = torch.tensor([1.0, 0.5, 0.45])
    out_c = ops.schedule_prefix(c, sps, mode="causal")
    out_g = ops.schedule_prefix(c, sps, mode="global")
    assert out_c.lengths.tolist() == [0] and out_g.lengths.tolist() == [2]
    assert out_c.throughput[0].item() == pytest.approx(1.0)
    assert out_g.throughput.tolist() == pytest.approx([1.134, 2.52], rel=1e-6)


def test_bounds_and_budget():
    c = torch.full((3, 4), 0.99)
    sps = torch.full((15,), 2.0)
    assert ops.schedule_prefix(c, sps).lengths.tolist() == [4, 4, 4]
    assert ops.schedule_prefix(c, sps, max_len=torch.tensor([1, 0, 4], dtype=torch.int32)).lengths.tolist() == [1, 0, 4]
    out = ops.schedule_prefix(c, sps, token_budget=7)  # 3 bonus slots + 4 drafts, taken by a desc, r asc
    assert out.lengths.tolist() == [2, 1, 1] and int(out.lengths.sum()) + 3 == 7
    steep = 1.0 / torch.arange(1, 16).float() ** 2
    out = ops.schedule_prefix(c, steep, min_len=torch.tensor([2, 0, 3], dtype=torch.int32))
    assert out.lengths.tolist() == [2, 0, 3]


# ---------------------------------------------------------------------------------------------
# The early stop: causal lengths never depend on confidences the scan did not reach
# ---------------------------------------------------------------------------------------------
def test_causal_result_independent_of_confidences_after_the_stop():
    gen = torch.Generator().manual_seed(5)
    changed_global = 0
    for trial in range(40):
        R, G = int(torch.randint(1, 12, (1,), generator=gen)), 6
        c = torch.rand(R, G, generator=gen) ** 0.3
        sps = decaying_sps(R * (1 + G), knee=int(torch.randint(1, 2 * R + 2, (1,), generator=gen)))
        if trial % 2:  # jagged (non-unimodal) curve: the global search goes past local drops
            sps = sps * (1 + 0.6 * (torch.arange(sps.numel()) % 3 == 2).float())
        base = ops.schedule_prefix(c, sps, mode="causal").lengths
        ref = schedule_prefix_reference(c, sps, mode="causal")[0]
        assert torch.equal(base, ref)
        # the scan stopped at the first candidate after the admitted ones: the largest survival
        # product not admitted (ties: r asc, j asc). Everything below it was never examined.
        a = torch.cumprod(c, 1)
        cand = [(a[r, j].item(), r, j) for r in range(R) for j in range(int(base[r]), G) if a[r, j] > 0]
        cand.sort(key=lambda x: (-x[0], x[1], x[2]))
        stop = cand[0] if cand else None
        for _ in range(3):
            c2 = c.clone()
            for r in range(R):
                j0 = int(base[r]) + (1 if stop is not None and stop[1] == r else 0)
                if j0 >= G:
                    continue
                # new confidences after request r's last examined position, keeping them
                # behind the stop candidate in the sorted order
                new = torch.rand(G - j0, generator=gen)
                prev_a = a[r, j0 - 1].item() if j0 > 0 else 1.0
                cap = 1.0 if stop is None else min(1.0, 0.999 * stop[0] / max(prev_a, 1e-30))
                new[0] = new[0] * cap
                c2[r, j0:] = new
            out = ops.schedule_prefix(c2, sps, mode="causal").lengths
            assert torch.equal(out, base), (trial, c, c2, base, out)
            changed_global += int(
                not torch.equal(
                    ops.schedule_prefix(c2, sps, mode="global").lengths,
                    ops.schedule_prefix(c, sps, mode="global").lengths,
                )
            )
    # the same perturbations do move the retrospective (global) search in some cases
    assert changed_global > 0


# ---------------------------------------------------------------------------------------------
# Paper Appendix A, end to end through dspark_draft, schedule_prefix and verify_chain
# ---------------------------------------------------------------------------------------------
def _appendix_a(mode, N=3000):
    """Vocabulary {A=0, B=1}; target (0.7, 0.3) at the first position; draft (0.5, 0.5) (U = 0,
    Markov bias 0); confidence head: c_1 = 0.8 after the anchor (A), c_2 = 0.9 after A and
    sigmoid(-40) ~ 0 after B; SPS(1..3) = (1.0, 0.5, 0.45); one request, gamma = 2, T = 1."""
    A = 0
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    hidden = torch.tensor([[logit(0.8)], [logit(0.9)]]).expand(N, 2, 1).contiguous()
    w1 = torch.eye(2)
    w2 = torch.zeros(2, 2)
    conf_w = torch.tensor([[1.0, 0.0, -40.0 - logit(0.9)]])  # [h ; W1[prev]] = [h, [prev==A], [prev==B]]
    draft = ops.dspark_draft(
        torch.zeros(N, 2, 2),
        torch.full((N,), A),
        w1,
        w2,
        hidden=hidden,
        conf_weight=conf_w,
        conf_bias=torch.zeros(1),
        temperature=1.0,
        seed=torch.arange(N) + 1234,
        offset=0,
    )
    assert draft.confidence[:, 0].sub(0.8).abs().max() < 1e-6
    after_a = draft.tokens[:, 0] == A
    assert draft.confidence[after_a, 1].sub(0.9).abs().max() < 1e-6
    assert draft.confidence[~after_a, 1].max() < 1e-15
    sps = torch.tensor([1.0, 0.5, 0.45])
    lengths = torch.cat([ops.schedule_prefix(draft.confidence[i : i + 1], sps, mode=mode).lengths for i in range(N)])
    # verification: l_i drafts, l_i + 1 target rows of (0.7, 0.3)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), (lengths + 1).cumsum(0)])
    target = torch.log(torch.tensor([0.7, 0.3])).expand(int(cu[-1]), 2).contiguous()
    keep = torch.arange(2)[None, :] < lengths[:, None]
    out = ops.verify_chain(
        target,
        cu,
        draft.tokens[keep],
        draft_logits=draft.logits[keep],
        temperature=1.0,
        seed=torch.arange(N) + 777,
        offset=0,
        max_drafts=2,
    )
    return draft, lengths, out.tokens[:, 0]


def test_appendix_a_global_search_on_current_confidences_is_biased():
    draft, lengths, y = _appendix_a("global")
    after_a = draft.tokens[:, 0] == 0
    assert bool((lengths[after_a] == 2).all()) and bool((lengths[~after_a] == 0).all())
    assert_matches_distribution(y, torch.tensor([0.85, 0.15], dtype=torch.float64), "global search output")
    with pytest.raises(AssertionError):
        assert_matches_distribution(y, torch.tensor([0.7, 0.3], dtype=torch.float64), "global search is lossless?")


def test_appendix_a_causal_scheduler_is_lossless():
    draft, lengths, y = _appendix_a("causal")
    assert bool((lengths == 0).all())  # theta_1 = 0.9 < theta_0 = 1: stop before looking at c_2
    assert_matches_distribution(y, torch.tensor([0.7, 0.3], dtype=torch.float64), "causal scheduler output")


# ---------------------------------------------------------------------------------------------
# Hostile input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(confidences=torch.tensor([[0.5, float("nan")], [0.1, 0.2]])), "confidences"),
        (lambda a: a.update(confidences=torch.tensor([[0.5, 1.5], [0.1, 0.2]])), "confidences"),
        (lambda a: a.update(confidences=torch.tensor([[0.5, -0.1], [0.1, 0.2]])), "confidences"),
        (lambda a: a.update(confidences=torch.rand(2, 2).double()), "confidences"),
        (lambda a: a.update(confidences=torch.rand(4)), "confidences"),
        (lambda a: a.update(sps_table=torch.zeros(0)), "sps_table"),
        (lambda a: a.update(sps_table=torch.ones(5)), "sps_table"),
        (lambda a: a.update(sps_table=torch.tensor([1.0, 0.5, 0.0, 0.3, 0.2, 0.1])), "sps_table"),
        (lambda a: a.update(sps_table=torch.tensor([1.0, -0.5, 0.4, 0.3, 0.2, 0.1])), "sps_table"),
        (lambda a: a.update(sps_table=torch.tensor([1.0, float("nan"), 0.4, 0.3, 0.2, 0.1])), "sps_table"),
        (lambda a: a.update(sps_table=torch.ones(6, 1)), "sps_table"),
        (
            lambda a: a.update(
                min_len=torch.tensor([2, 0], dtype=torch.int32), max_len=torch.tensor([1, 2], dtype=torch.int32)
            ),
            "min_len",
        ),
        (lambda a: a.update(min_len=torch.tensor([2, 0, 1], dtype=torch.int32)), "min_len"),
        (lambda a: a.update(max_len=torch.tensor([2, 0])), "max_len"),
        (lambda a: a.update(token_budget=1), "token_budget"),
        (lambda a: a.update(mode="sideways"), "mode"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(mutate, match):
    args = dict(confidences=torch.tensor([[0.9, 0.8], [0.5, 0.1]]), sps_table=torch.linspace(1.0, 0.5, 6))
    mutate(args)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        ops.schedule_prefix(args.pop("confidences"), args.pop("sps_table"), **args)


def test_short_table_is_fine_with_a_budget_and_empty_batch():
    c = torch.rand(3, 5)
    out = ops.schedule_prefix(c, torch.linspace(1.0, 0.5, 6), token_budget=6)
    assert int(out.lengths.sum()) <= 3
    e = ops.schedule_prefix(torch.zeros(0, 4), torch.zeros(0))
    assert e.lengths.shape == (0,)


# ---------------------------------------------------------------------------------------------
# torch integration
# ---------------------------------------------------------------------------------------------
def _op_args(device="cpu"):
    gen = torch.Generator().manual_seed(0)
    c = torch.rand(5, 4, generator=gen).to(device)
    sps = decaying_sps(25, knee=6).to(device)
    return (
        c,
        sps,
        torch.tensor([0, 1, 0, 0, 2], dtype=torch.int32, device=device),
        torch.tensor([4, 4, 2, 3, 4], dtype=torch.int32, device=device),
        20,
        0,
    )


def test_opcheck():
    torch.library.opcheck(torch.ops.dspark.schedule_prefix.default, _op_args())
    a = list(_op_args())
    a[2] = a[3] = None
    a[4], a[5] = 0, 1
    torch.library.opcheck(torch.ops.dspark.schedule_prefix.default, tuple(a))


@pytest.mark.cuda
@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("R,G", [(3, 4), (256, 16), (300, 16)])
def test_cuda_matches_cpu(mode, R, G):
    gen = torch.Generator().manual_seed(R)
    vals = torch.tensor([0.0, 0.25, 0.5, 1.0])
    for kind in range(3):
        c = torch.rand(R, G, generator=gen) ** 0.2 if kind == 0 else vals[torch.randint(0, 4, (R, G), generator=gen)]
        if kind == 2:
            c = torch.zeros(R, G)
        sps = decaying_sps(R * (1 + G), knee=R + 7)
        cpu = ops.schedule_prefix(c, sps, mode=mode)
        gpu = ops.schedule_prefix(c.cuda(), sps.cuda(), mode=mode)
        assert torch.equal(cpu.lengths, gpu.lengths.cpu())
        torch.testing.assert_close(cpu.throughput, gpu.throughput.cpu())


@pytest.mark.cuda
def test_cuda_graph_capture_and_timing():
    R, G = 256, 16
    c = (torch.rand(R, G) ** 0.2).cuda()
    sps = decaying_sps(R * (1 + G), knee=300).cuda()
    out = ops.schedule_prefix(c, sps)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cap = ops.schedule_prefix(c, sps)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(cap.lengths, out.lengths)
