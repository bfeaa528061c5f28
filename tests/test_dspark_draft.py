"""dspark_draft: reference agreement (three head types, dtypes, greedy + sampled), exact greedy,
output-distribution tests, confidence formula and STS, consistency with verify_chain, hostile
input, opcheck, and CPU/CUDA agreement (GPU machines only).

Statistical tests use fixed seeds and a chi-square test at false-alarm rate ALPHA = 1e-3 each
(tests/stats.py): a correct sampler fails one given test with probability 1e-3 over seed choices;
the seeds are fixed, so outcomes are reproducible.
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
from dspark_native.reference import dspark_draft_reference, target_probs


def make_problem(R=3, G=4, V=50, D=16, r=8, seed=0, wdtype=torch.float32, udtype=torch.float32, conf_markov=True):
    g = torch.Generator().manual_seed(seed)
    P = dict(
        base_logits=(torch.randn(R, G, V, generator=g) * 2).to(udtype),
        anchor_tokens=torch.randint(0, V, (R,), generator=g),
        markov_w1=torch.randn(V, r, generator=g).to(wdtype),
        markov_w2=(torch.randn(V, r, generator=g) * 0.4).to(wdtype),
    )
    kw = dict(
        hidden=torch.randn(R, G, D, generator=g).to(udtype),
        gate_weight=(torch.randn(r, D + r, generator=g) * 0.3).to(wdtype),
        gate_bias=torch.randn(r, generator=g).to(wdtype),
        joint_weight=(torch.randn(3 * r, 2 * r + D, generator=g) * 0.3).to(wdtype),
        joint_bias=torch.randn(3 * r, generator=g).to(wdtype),
        conf_weight=(torch.randn(1, D + r if conf_markov else D, generator=g) * 0.3).to(wdtype),
        conf_bias=torch.randn(1, generator=g).to(wdtype),
    )
    return P, kw


def run_both(P, kw):
    out = ops.dspark_draft(P["base_logits"], P["anchor_tokens"], P["markov_w1"], P["markov_w2"], **kw)
    ref = dspark_draft_reference(P["base_logits"], P["anchor_tokens"], P["markov_w1"], P["markov_w2"], **kw)
    return out, ref


# ---------------------------------------------------------------------------------------------
# Agreement with the reference loop
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn"])
@pytest.mark.parametrize(
    "wdtype,udtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)]
)
def test_matches_reference(head, wdtype, udtype):
    for trial in range(3):
        R, G, V = 2 + trial, 1 + 2 * trial, [7, 50, 333][trial]
        P, kw = make_problem(
            R=R,
            G=G,
            V=V,
            D=8 + trial * 5,
            r=[4, 8, 13][trial],
            seed=trial * 7 + len(head),
            wdtype=wdtype,
            udtype=udtype,
            conf_markov=trial != 1,
        )
        temp = torch.tensor([0.0, 1.0, 0.6, 1.7][:R])
        kw.update(
            head_type=head,
            temperature=temp,
            seed=torch.arange(R) * 1000 + 17,
            offset=trial,
            sts_temperature=[0.8 + 0.2 * k for k in range(G)] if trial else None,
        )
        out, ref = run_both(P, kw)
        assert torch.equal(out.tokens, ref[0]), (head, trial, out.tokens, ref[0])
        torch.testing.assert_close(out.logits, ref[1], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(out.confidence, ref[2], rtol=1e-5, atol=1e-6)


def test_greedy_exact_and_consistent_with_logits():
    """Greedy drafts are the first argmax of the returned rows, and the rows equal U + W2 W1[prev]."""
    P, kw = make_problem(R=5, G=6, V=200, seed=3)
    out = ops.dspark_draft(P["base_logits"], P["anchor_tokens"], P["markov_w1"], P["markov_w2"], temperature=0.0)
    assert torch.equal(out.tokens, out.logits.argmax(-1))
    prev = torch.cat([P["anchor_tokens"][:, None], out.tokens[:, :-1]], 1)
    expect = P["base_logits"] + P["markov_w1"][prev] @ P["markov_w2"].T
    torch.testing.assert_close(out.logits, expect, rtol=1e-5, atol=1e-4)
    assert out.confidence.numel() == 0


def test_same_key_same_tokens_new_offset_new_tokens():
    P, kw = make_problem(R=16, G=5, V=300, seed=4)
    args = (P["base_logits"] * 0.1, P["anchor_tokens"], P["markov_w1"], P["markov_w2"])
    a = ops.dspark_draft(*args, temperature=1.0, seed=5, offset=0).tokens
    b = ops.dspark_draft(*args, temperature=1.0, seed=5, offset=0).tokens
    c = ops.dspark_draft(*args, temperature=1.0, seed=5, offset=1).tokens
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_bf16_logits_written_as_fp32_row_the_sampler_used():
    P, kw = make_problem(R=4, G=3, V=64, seed=5, wdtype=torch.bfloat16, udtype=torch.bfloat16)
    out = ops.dspark_draft(P["base_logits"], P["anchor_tokens"], P["markov_w1"], P["markov_w2"], temperature=0.0)
    assert out.logits.dtype == torch.float32
    assert torch.equal(out.tokens, out.logits.argmax(-1))


# ---------------------------------------------------------------------------------------------
# Output distribution: d_0 ~ softmax(z_0 / T), (d_0, d_1) ~ p(d_0) softmax(z_1(d_0) / T)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head,T", [("vanilla", 1.0), ("gated", 0.7), ("rnn", 1.4)])
def test_draft_distribution(head, T):
    V, N, D, r = 6, 4000, 5, 4
    g = torch.Generator().manual_seed(21)
    U = torch.randn(2, V, generator=g)
    h = torch.randn(2, D, generator=g)
    P, kw = make_problem(R=1, G=2, V=V, D=D, r=r, seed=9)
    args = (
        U.expand(N, 2, V).contiguous(),
        torch.full((N,), 2, dtype=torch.long),
        P["markov_w1"] * 2,
        P["markov_w2"] * 2,
    )
    kw.update(hidden=h.expand(N, 2, D).contiguous(), head_type=head, temperature=T, seed=torch.arange(N) + 77, offset=5)
    out = ops.dspark_draft(*args, **kw)
    z0 = out.logits[0, 0]
    p0 = target_probs(z0, T)
    assert_matches_distribution(out.tokens[:, 0], p0, f"d_0 ({head})")
    # z_1 depends on d_0 only through the head: build the expected joint from one row per value
    joint = torch.zeros(V, V, dtype=torch.float64)
    for v in range(V):
        rows = (out.tokens[:, 0] == v).nonzero()
        if rows.numel() == 0:
            continue
        z1 = out.logits[rows[0, 0], 1]
        joint[v] = p0[v] * target_probs(z1, T)
    assert_matches_distribution(out.tokens[:, 0] * V + out.tokens[:, 1], joint.flatten(), f"(d_0, d_1) ({head})")


def test_statistical_test_detects_wrong_temperature():
    """Guard: the harness rejects samples drawn at T = 1 when the claim is T = 0.5."""
    V, N = 6, 4000
    U = torch.linspace(-1, 1, V).expand(N, 1, V).contiguous()
    w = torch.zeros(V, 2)
    out = ops.dspark_draft(U, torch.zeros(N, dtype=torch.long), w, w, temperature=1.0, seed=torch.arange(N), offset=0)
    with pytest.raises(AssertionError):
        assert_matches_distribution(out.tokens[:, 0], target_probs(U[0, 0], 0.5), "should fail")


def test_drafts_verified_with_returned_q_are_lossless():
    """End to end: drafts from dspark_draft, q = its logits, verify_chain with the same temperature:
    the first emitted token follows the target distribution."""
    V, N, T = 5, 4000, 0.9
    g = torch.Generator().manual_seed(8)
    U = torch.randn(1, 1, V, generator=g)
    P, _ = make_problem(R=1, G=1, V=V, r=3, seed=2)
    out = ops.dspark_draft(
        U.expand(N, 1, V).contiguous(),
        torch.ones(N, dtype=torch.long),
        P["markov_w1"],
        P["markov_w2"],
        temperature=T,
        seed=torch.arange(N),
        offset=1,
    )
    target = torch.randn(2, V, generator=g)
    tl = target.expand(N, 2, V).reshape(2 * N, V).contiguous()
    cu = torch.arange(0, 2 * N + 1, 2)
    vc = ops.verify_chain(
        tl,
        cu,
        out.tokens[:, 0],
        draft_logits=out.logits[:, 0],
        temperature=T,
        seed=torch.arange(N) + 99,
        offset=0,
        return_accept_prob=True,
    )
    assert_matches_distribution(vc.tokens[:, 0], target_probs(target[0], T), "first emitted token")
    q = target_probs(out.logits[0, 0], T)
    p = target_probs(target[0], T)
    torch.testing.assert_close(vc.accept_prob[0].double(), torch.minimum(p, q).sum(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Confidence head
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("conf_markov", [True, False])
def test_confidence_formula_and_sts(conf_markov):
    P, kw = make_problem(R=4, G=5, V=40, D=12, r=6, seed=13, conf_markov=conf_markov)
    sts = [0.5, 1.0, 2.0, 3.0, 0.7]
    base = dict(hidden=kw["hidden"], conf_weight=kw["conf_weight"], conf_bias=kw["conf_bias"])
    out = ops.dspark_draft(
        P["base_logits"],
        P["anchor_tokens"],
        P["markov_w1"],
        P["markov_w2"],
        **base,
        temperature=0.8,
        seed=1,
        offset=0,
        sts_temperature=sts,
    )
    prev = torch.cat([P["anchor_tokens"][:, None], out.tokens[:, :-1]], 1)
    x = kw["hidden"]
    if conf_markov:
        x = torch.cat([x, P["markov_w1"][prev]], -1)
    logit = x @ kw["conf_weight"].reshape(-1) + kw["conf_bias"]
    expect = torch.sigmoid(logit / torch.tensor(sts))
    torch.testing.assert_close(out.confidence, expect, rtol=1e-5, atol=1e-6)
    # independent of the sampling temperature given the same drafts (greedy run, same prev)
    g0 = ops.dspark_draft(P["base_logits"], P["anchor_tokens"], P["markov_w1"], P["markov_w2"], **base, temperature=0.0)
    g1 = ops.dspark_draft(
        P["base_logits"], P["anchor_tokens"], P["markov_w1"], P["markov_w2"], **base, temperature=torch.zeros(4)
    )
    assert torch.equal(g0.confidence, g1.confidence)


# ---------------------------------------------------------------------------------------------
# Hostile input
# ---------------------------------------------------------------------------------------------
def test_nan_rows_stop_the_request():
    P, kw = make_problem(R=3, G=4, V=20, seed=6)
    U = P["base_logits"].clone()
    U[1, 1] = float("nan")
    U[2, 0, :] = -math.inf
    for T in (0.0, 1.0):
        out = ops.dspark_draft(
            U,
            P["anchor_tokens"],
            P["markov_w1"],
            P["markov_w2"],
            hidden=kw["hidden"],
            conf_weight=kw["conf_weight"],
            conf_bias=kw["conf_bias"],
            temperature=T,
            seed=3,
            offset=0,
        )
        assert bool((out.tokens[0] >= 0).all())
        assert out.tokens[1, 0] >= 0 and bool((out.tokens[1, 1:] == -1).all())
        assert bool((out.tokens[2] == -1).all())
        assert bool((out.confidence[1, 2:] == 0).all()) and bool((out.confidence[2, 1:] == 0).all())
        assert bool(torch.isneginf(out.logits[1, 2:]).all()) and bool(torch.isneginf(out.logits[2, 1:]).all())
        ref = dspark_draft_reference(
            U,
            P["anchor_tokens"],
            P["markov_w1"],
            P["markov_w2"],
            hidden=kw["hidden"],
            conf_weight=kw["conf_weight"],
            conf_bias=kw["conf_bias"],
            temperature=T,
            seed=3,
            offset=0,
        )
        assert torch.equal(out.tokens, ref[0])


def test_nan_logit_entries_never_drafted():
    V = 30
    U = torch.randn(8, 3, V)
    U[..., ::2] = float("nan")
    w = torch.randn(V, 4) * 0.1
    for T in (0.0, 1.0):
        out = ops.dspark_draft(U, torch.zeros(8, dtype=torch.long), w, w, temperature=T, seed=torch.arange(8), offset=0)
        assert bool((out.tokens % 2 == 1).all())


def _base_args():
    P, kw = make_problem(R=3, G=2, V=11, D=4, r=3, seed=1)
    args = dict(P)
    args.update(temperature=torch.zeros(3))
    return args, kw


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a, k: a.update(anchor_tokens=torch.tensor([0, 11, 2])), "anchor_tokens"),
        (lambda a, k: a.update(anchor_tokens=torch.tensor([0, -1, 2])), "anchor_tokens"),
        (lambda a, k: a.update(anchor_tokens=torch.tensor([0, 1], dtype=torch.long)), "anchor_tokens"),
        (lambda a, k: a.update(temperature=torch.tensor([0.0, -1.0, 1.0])), "temperature"),
        (lambda a, k: a.update(temperature=torch.tensor([0.0, float("nan"), 1.0])), "temperature"),
        (lambda a, k: a.update(temperature=-0.5), "temperature"),
        (lambda a, k: a.update(temperature=torch.zeros(2)), "temperature"),
        (lambda a, k: a.update(sts_temperature=[1.0, 0.0]), "sts_temperature"),
        (lambda a, k: a.update(sts_temperature=torch.tensor([1.0, -2.0])), "sts_temperature"),
        (lambda a, k: a.update(sts_temperature=torch.tensor([1.0, float("nan")])), "sts_temperature"),
        (lambda a, k: a.update(markov_w2=torch.randn(11, 4)), "markov_w2"),
        (lambda a, k: a.update(markov_w1=torch.randn(10, 3)), "markov_w1"),
        (lambda a, k: a.update(markov_w1=a["markov_w1"].double()), "markov_w"),
        (lambda a, k: a.update(base_logits=torch.randn(3, 11)), "base_logits"),
        (lambda a, k: a.update(head_type="gated", hidden=k["hidden"]), "gate_weight"),
        (
            lambda a, k: a.update(
                head_type="rnn", hidden=k["hidden"], joint_weight=torch.randn(9, 9), joint_bias=k["joint_bias"]
            ),
            "joint_weight",
        ),
        (lambda a, k: a.update(head_type="lstm"), "head_type"),
        (
            lambda a, k: a.update(conf_weight=torch.randn(1, 5), conf_bias=torch.zeros(1), hidden=k["hidden"]),
            "conf_weight",
        ),
        (lambda a, k: a.update(conf_weight=k["conf_weight"], conf_bias=k["conf_bias"]), "hidden"),
        (
            lambda a, k: a.update(hidden=torch.randn(3, 3, 4), conf_weight=torch.randn(1, 7), conf_bias=torch.zeros(1)),
            "hidden",
        ),
    ],
)
def test_bad_arguments_raise_naming_the_argument(mutate, match):
    args, kw = _base_args()
    mutate(args, kw)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        ops.dspark_draft(
            args.pop("base_logits"), args.pop("anchor_tokens"), args.pop("markov_w1"), args.pop("markov_w2"), **args
        )


def test_empty_batch():
    w = torch.randn(9, 3)
    out = ops.dspark_draft(torch.randn(0, 2, 9), torch.zeros(0, dtype=torch.long), w, w, temperature=torch.zeros(0))
    assert out.tokens.shape == (0, 2) and out.logits.shape == (0, 2, 9)


def test_large_vocab_rank_and_batch():
    """V = 262144 with r = 512 (bf16 weights), and R = 256 with a small vocabulary."""
    V, r = 262144, 512
    g = torch.Generator().manual_seed(0)
    w1 = (torch.randn(V, r, generator=g) * 0.05).bfloat16()
    w2 = (torch.randn(V, r, generator=g) * 0.05).bfloat16()
    U = torch.randn(2, 2, V, generator=g).bfloat16()
    anc = torch.tensor([0, V - 1])
    out = ops.dspark_draft(U, anc, w1, w2, temperature=torch.tensor([0.0, 1.0]), seed=1, offset=0)
    assert torch.equal(out.tokens[0], out.logits[0].argmax(-1))
    bias = w1[anc[0]].float() @ w2.float().T
    torch.testing.assert_close(out.logits[0, 0], U[0, 0].float() + bias, rtol=1e-5, atol=2e-4)
    assert bool(((out.tokens >= 0) & (out.tokens < V)).all())
    P, kw = make_problem(R=256, G=3, V=97, D=8, r=16, seed=2)
    kw.update(head_type="rnn", temperature=torch.rand(256), seed=torch.arange(256), offset=0)
    o, ref = run_both(P, kw)
    assert torch.equal(o.tokens, ref[0])


# ---------------------------------------------------------------------------------------------
# torch integration
# ---------------------------------------------------------------------------------------------
def _op_args(device="cpu", head=2):
    P, kw = make_problem(R=3, G=3, V=33, D=6, r=4, seed=0)
    t = lambda x: None if x is None else x.to(device)  # noqa: E731
    return (
        t(P["base_logits"]),
        t(kw["hidden"]),
        t(P["anchor_tokens"]),
        t(P["markov_w1"]),
        t(P["markov_w2"]),
        t(kw["gate_weight"]),
        t(kw["gate_bias"]),
        t(kw["joint_weight"]),
        t(kw["joint_bias"]),
        t(kw["conf_weight"]),
        t(kw["conf_bias"]),
        t(torch.tensor([1.0, 1.5, 0.8])),
        t(torch.tensor([0.0, 1.0, 0.7])),
        t(torch.tensor([1, 2, 3])),
        t(torch.zeros(3, dtype=torch.long)),
        head,
    )


def test_opcheck():
    for head in (0, 1, 2):
        torch.library.opcheck(torch.ops.dspark.dspark_draft.default, _op_args(head=head))
    a = list(_op_args(head=0))
    a[1] = a[5] = a[6] = a[7] = a[8] = a[9] = a[10] = a[11] = a[13] = a[14] = None
    torch.library.opcheck(torch.ops.dspark.dspark_draft.default, tuple(a))


@pytest.mark.cuda
@pytest.mark.parametrize("head", [0, 1, 2])
def test_cuda_matches_cpu(head):
    cpu = torch.ops.dspark.dspark_draft(*_op_args("cpu", head))
    gpu = torch.ops.dspark.dspark_draft(*_op_args("cuda", head))
    assert torch.equal(cpu[0], gpu[0].cpu())
    torch.testing.assert_close(cpu[1], gpu[1].cpu(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cpu[2], gpu[2].cpu(), rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_cuda_large_vocab_and_graph_capture():
    V, R, r = 151936, 64, 256
    g = torch.Generator().manual_seed(0)
    U = torch.randn(R, 7, V, generator=g).bfloat16().cuda()
    w1 = (torch.randn(V, r, generator=g) * 0.05).bfloat16().cuda()
    w2 = (torch.randn(V, r, generator=g) * 0.05).bfloat16().cuda()
    anc = torch.randint(0, V, (R,), generator=g).cuda()
    off = torch.zeros(R, dtype=torch.long, device="cuda")
    temp = torch.ones(R, device="cuda")
    seed = torch.arange(R, device="cuda")
    ref = ops.dspark_draft(U.cpu(), anc.cpu(), w1.cpu(), w2.cpu(), temperature=temp.cpu(), seed=seed.cpu(), offset=0)
    out = ops.dspark_draft(U, anc, w1, w2, temperature=temp, seed=seed, offset=off)
    assert (out.tokens.cpu() == ref.tokens).float().mean() > 0.99  # equal up to floating-point ties
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cap = ops.dspark_draft(U, anc, w1, w2, temperature=temp, seed=seed, offset=off)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(cap.tokens, out.tokens)
    off += 1
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(cap.tokens, out.tokens)
