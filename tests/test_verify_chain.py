"""verify_chain: reference agreement, exact greedy, output-distribution tests, hostile input,
opcheck / torch.compile, and CPU/CUDA agreement (on a GPU machine).

Statistical tests use fixed seeds and a chi-square test at false-alarm rate ALPHA = 1e-3 each
(tests/stats.py): with about 20 such tests the chance that a correct sampler fails one for some
seed choice is about 2%; the seeds here are fixed, so results are reproducible.
"""

from __future__ import annotations

import pytest
import torch

from stats import assert_matches_distribution

import dspark_native.ops as ops
from dspark_native.reference import target_probs, verify_chain_reference


def ragged(lengths):
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    return torch.cat([torch.zeros(1, dtype=torch.int64), (lengths + 1).cumsum(0)])


# ---------------------------------------------------------------------------------------------
# Agreement with the pure-PyTorch reference (same keys -> same tokens)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["one_hot", "logits", "probs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference(kind, dtype):
    g = torch.Generator().manual_seed(hash((kind, str(dtype))) % 1000)
    for trial in range(6):
        V = int(torch.randint(2, 400, (1,), generator=g))
        R = int(torch.randint(1, 7, (1,), generator=g))
        G = int(torch.randint(0, 6, (1,), generator=g))
        lens = torch.randint(0, G + 1, (R,), generator=g)
        lens[0] = G  # always exercise l_r = gamma
        cu = ragged(lens)
        N = int(cu[-1])
        tl = torch.randn(N, V, generator=g) * 2
        dl = torch.randn(N - R, V, generator=g) * 2
        dt = torch.randint(0, V, (N - R,), generator=g)
        temp = torch.where(torch.rand(R, generator=g) < 0.3, torch.zeros(R), torch.rand(R, generator=g) * 1.5 + 0.2)
        kw = dict(
            temperature=temp,
            top_k=torch.randint(-1, V + 2, (R,), generator=g, dtype=torch.int32) if trial % 2 else None,
            top_p=torch.rand(R, generator=g) * 1.2 if trial % 3 == 1 else None,
            seed=torch.randint(0, 1 << 40, (R,), generator=g),
            offset=torch.randint(0, 100, (R,), generator=g),
            max_drafts=G,
            return_accept_prob=True,
        )
        if kind == "logits":
            kw["draft_logits"] = dl.to(dtype)
        if kind == "probs":
            kw["draft_probs"] = torch.softmax(dl, -1).to(dtype)
        out = ops.verify_chain(tl.to(dtype), cu, dt, **kw)
        ref = verify_chain_reference(tl.to(dtype), cu, dt, **kw)
        assert torch.equal(out.tokens, ref[0]), (trial, out.tokens, ref[0])
        assert torch.equal(out.num_accepted, ref[1])
        torch.testing.assert_close(out.accept_prob, ref[2], atol=2e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Greedy: exact argmax match
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_exact(dtype):
    g = torch.Generator().manual_seed(7)
    R, G, V = 40, 6, 97
    lens = torch.randint(0, G + 1, (R,), generator=g)
    cu = ragged(lens)
    N = int(cu[-1])
    tl = torch.randn(N, V, generator=g).to(dtype)
    tl[::5, 3] = tl[::5].float().max(dim=1).values.to(dtype)  # ties: the lowest index must win
    am = tl.float().argmax(dim=1)
    drafts, exp_tokens, exp_acc = [], torch.full((R, G + 1), -1), torch.zeros(R, dtype=torch.long)
    for r in range(R):
        base, l_r = int(cu[r]), int(lens[r])
        wrong_at = int(torch.randint(0, l_r + 2, (1,), generator=g))  # l_r or l_r+1 -> all accepted
        for k in range(l_r):
            d = int(am[base + k])
            drafts.append((d + 1) % V if k == wrong_at else d)
        a = min(wrong_at, l_r)
        exp_acc[r] = a
        exp_tokens[r, : a + 1] = am[base : base + a + 1]
    dt = torch.tensor(drafts, dtype=torch.long)
    out = ops.verify_chain(tl, cu, dt, temperature=0.0, max_drafts=G, return_accept_prob=True)
    assert torch.equal(out.num_accepted, exp_acc)
    assert torch.equal(out.tokens, exp_tokens)
    # greedy accept_prob is the hard acceptance [d == argmax] for every draft row
    is_am = torch.cat(
        [dt[int(cu[r]) - r : int(cu[r + 1]) - r - 1] == am[int(cu[r]) : int(cu[r + 1]) - 1] for r in range(R)]
    )
    assert torch.equal(out.accept_prob, is_am.float())


def test_greedy_mixed_with_sampled_requests():
    """A greedy request's result does not depend on sampled neighbours in the batch."""
    g = torch.Generator().manual_seed(3)
    V, G = 50, 4
    cu = ragged([4, 4, 4])
    tl = torch.randn(15, V, generator=g)
    dt = torch.cat([tl[0:4].argmax(1), torch.randint(0, V, (4,), generator=g), tl[10:14].argmax(1)])
    out = ops.verify_chain(tl, cu, dt, temperature=torch.tensor([0.0, 1.0, 0.0]), seed=1, offset=0, max_drafts=G)
    assert out.num_accepted[0] == 4 and out.num_accepted[2] == 4
    assert torch.equal(out.tokens[0], tl[0:5].argmax(1))
    assert torch.equal(out.tokens[2], tl[10:15].argmax(1))


# ---------------------------------------------------------------------------------------------
# Output distribution (lossless): first token and token pairs
# ---------------------------------------------------------------------------------------------
V_STAT = 8
N_STAT = 20000


def _draft_sample(q_logits, temperature, gen):
    return torch.multinomial(torch.softmax(q_logits / temperature, -1), 1, generator=gen).squeeze(-1)


def _run_pairs(kind, temperature, top_k, top_p, dtype, seed):
    """Two-token process: x1 ~ P0, x2 ~ P1[x1]. Drafts from Q0 / Q1[d0]. Returns pairs [N, 2]."""
    gen = torch.Generator().manual_seed(seed)
    V, N = V_STAT, N_STAT
    P0 = torch.randn(V, generator=gen) * 1.5
    P1 = torch.randn(V, V, generator=gen) * 1.5
    Q0 = P0 + torch.randn(V, generator=gen) * 1.5
    Q1 = P1 + torch.randn(V, V, generator=gen) * 1.5
    if kind == "one_hot":  # a deterministic drafter: always the same guess
        d0 = torch.full((N,), int(Q0.argmax()))
        d1 = Q1.argmax(1)[d0]
    else:
        d0 = _draft_sample(Q0.expand(N, V), temperature, gen)
        d1 = _draft_sample(Q1[d0], temperature, gen)
    # request r: rows [P0, P1[d0], anything]; drafts [d0, d1]
    tl = torch.stack([P0.expand(N, V), P1[d0], torch.zeros(N, V)], 1).reshape(3 * N, V).to(dtype)
    dt = torch.stack([d0, d1], 1).reshape(-1)
    cu = torch.arange(0, 3 * N + 1, 3)
    kw = dict(
        temperature=temperature, top_k=top_k, top_p=top_p, seed=torch.arange(N) + seed * N, offset=0, max_drafts=2
    )
    ql = torch.stack([Q0.expand(N, V), Q1[d0]], 1).reshape(2 * N, V)
    if kind == "logits":
        kw["draft_logits"] = ql.to(dtype)
    elif kind == "probs":
        kw["draft_probs"] = torch.softmax(ql / temperature, -1)
    out = ops.verify_chain(tl, cu, dt, **kw)
    first, second = out.tokens[:, 0].clone(), out.tokens[:, 1].clone()
    need = second < 0  # rejected at position 0: the next round samples x2 from P1[x1]
    idx = need.nonzero().squeeze(1)
    if idx.numel():
        nxt = ops.verify_chain(
            P1[first[idx]].to(dtype),
            torch.arange(idx.numel() + 1),
            torch.zeros(0, dtype=torch.long),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=idx + seed * N,
            offset=1,
            max_drafts=0,
        )
        second[idx] = nxt.tokens[:, 0]
    exp0 = target_probs(P0.to(dtype), temperature, top_k or 0, top_p or 1.0)
    exp_pair = torch.stack(
        [exp0[a] * target_probs(P1[a].to(dtype), temperature, top_k or 0, top_p or 1.0) for a in range(V)]
    )
    return first, second, exp0, exp_pair


@pytest.mark.parametrize(
    "kind,temperature,top_k,top_p,dtype",
    [
        ("logits", 1.0, None, None, torch.float32),
        ("logits", 0.6, None, None, torch.bfloat16),
        ("probs", 1.0, None, None, torch.float32),
        ("probs", 1.3, 5, None, torch.float32),
        ("one_hot", 1.0, None, None, torch.float32),
        ("one_hot", 0.8, None, 0.7, torch.float32),
        ("logits", 1.0, 4, 0.9, torch.float16),
        ("logits", 1.0, None, 0.5, torch.float32),
    ],
)
def test_output_distribution_first_token_and_pairs(kind, temperature, top_k, top_p, dtype):
    first, second, exp0, exp_pair = _run_pairs(kind, temperature, top_k, top_p, dtype, seed=11)
    assert bool((first >= 0).all()) and bool((second >= 0).all())
    assert_matches_distribution(first, exp0, f"first token ({kind}, T={temperature}, k={top_k}, p={top_p})")
    assert_matches_distribution(first * V_STAT + second, exp_pair.flatten(), f"pairs ({kind}, T={temperature})")


def test_statistical_test_detects_a_biased_sampler():
    """The chi-square harness must reject a sampler that ignores the residual (emits the draft's
    distribution instead): guards against a test that cannot fail."""
    first, _, exp0, _ = _run_pairs("logits", 1.0, None, None, torch.float32, seed=5)
    wrong = torch.softmax(torch.linspace(0, 1, V_STAT), 0).double()
    with pytest.raises(AssertionError):
        assert_matches_distribution(first, wrong, "should fail")


def test_bonus_token_distribution():
    """All drafts accepted (q = p exactly): the bonus token follows p of the last row."""
    V, N, T = V_STAT, N_STAT, 0.9
    gen = torch.Generator().manual_seed(2)
    P = torch.randn(V, generator=gen)
    B = torch.randn(V, generator=gen) * 2
    d = _draft_sample(P.expand(N, V), T, gen)
    tl = torch.stack([P.expand(N, V), B.expand(N, V)], 1).reshape(2 * N, V)
    out = ops.verify_chain(
        tl,
        torch.arange(0, 2 * N + 1, 2),
        d,
        draft_logits=P.expand(N, V).contiguous(),
        temperature=T,
        seed=torch.arange(N),
        offset=3,
    )
    assert bool((out.num_accepted == 1).all()), "q == p: every draft is accepted"
    assert_matches_distribution(out.tokens[:, 1], target_probs(B, T), "bonus token")


# ---------------------------------------------------------------------------------------------
# Randomness plumbing
# ---------------------------------------------------------------------------------------------
def test_same_key_same_tokens_new_offset_new_tokens():
    gen = torch.Generator().manual_seed(0)
    N, V = 256, 1000
    tl = torch.randn(N * 2, V, generator=gen)
    d = torch.randint(0, V, (N,), generator=gen)
    cu = torch.arange(0, 2 * N + 1, 2)
    a = ops.verify_chain(tl, cu, d, temperature=1.0, seed=torch.arange(N), offset=5)
    b = ops.verify_chain(tl, cu, d, temperature=1.0, seed=torch.arange(N), offset=5)
    c = ops.verify_chain(tl, cu, d, temperature=1.0, seed=torch.arange(N), offset=6)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)


# ---------------------------------------------------------------------------------------------
# Hostile input
# ---------------------------------------------------------------------------------------------
def test_nan_and_inf_logits():
    V = 6
    row = torch.tensor([0.0, 1.0, float("nan"), 0.5, -float("inf"), 0.2])
    N = 4000
    tl = row.expand(N, V).contiguous()
    out = ops.verify_chain(
        tl, torch.arange(N + 1), torch.zeros(0, dtype=torch.long), temperature=1.0, seed=torch.arange(N), offset=0
    )
    toks = out.tokens[:, 0]
    assert bool(((toks >= 0) & (toks < V)).all())
    assert not bool(((toks == 2) | (toks == 4)).any()), "NaN / -inf entries must carry no mass"
    assert ops.verify_chain(row[None], torch.tensor([0, 1]), torch.zeros(0, dtype=torch.long)).tokens.item() == 1
    # +inf entries take all the mass, uniformly
    inf_row = torch.tensor([0.0, float("inf"), 3.0, float("inf")])
    out = ops.verify_chain(
        inf_row.expand(N, 4).contiguous(),
        torch.arange(N + 1),
        torch.zeros(0, dtype=torch.long),
        temperature=1.0,
        seed=torch.arange(N),
        offset=0,
    )
    assert set(out.tokens[:, 0].tolist()) == {1, 3}
    # a row with no finite logit: verification stops there, slot -1, nothing counted
    bad = torch.full((3, V), float("nan"))
    bad[0] = torch.randn(V)
    d0 = int(bad[0].argmax())
    for temp in (0.0, 1.0):
        out = ops.verify_chain(
            bad,
            torch.tensor([0, 3]),
            torch.tensor([d0, 1]),
            temperature=temp,
            seed=0,
            offset=0,
            top_k=1,
            return_accept_prob=True,
        )
        assert out.num_accepted.item() == 1
        assert out.tokens.tolist() == [[d0, -1, -1]]
        assert out.accept_prob[1].item() == 0.0


def test_top_k_one_is_greedy_sampling():
    gen = torch.Generator().manual_seed(4)
    N, V = 3000, 30
    tl = torch.randn(2 * N, V, generator=gen)
    d = torch.randint(0, V, (N,), generator=gen)
    out = ops.verify_chain(
        tl, torch.arange(0, 2 * N + 1, 2), d, temperature=1.0, top_k=1, seed=torch.arange(N), offset=0
    )
    am = tl.argmax(1).view(N, 2)
    acc = d == am[:, 0]
    assert torch.equal(out.num_accepted, acc.long())
    assert torch.equal(out.tokens[:, 0], am[:, 0])
    assert torch.equal(out.tokens[acc, 1], am[acc, 1])
    # top_p <= 0 also keeps only the maximum
    out2 = ops.verify_chain(
        tl, torch.arange(0, 2 * N + 1, 2), d, temperature=1.0, top_p=0.0, seed=torch.arange(N), offset=0
    )
    assert torch.equal(out2.tokens, out.tokens)


def test_zero_target_probability_never_accepted():
    """p(d) = 0 (masked by -inf or by top-k) must reject, whatever the coin, even with q(d) = 0."""
    N, V = 5000, 10
    row = torch.randn(V)
    row[7] = -float("inf")
    tl = torch.stack([row.expand(N, V), torch.zeros(N, V)], 1).reshape(2 * N, V)
    d = torch.full((N,), 7)
    probs_zero_at_d = torch.full((N, V), 1.0 / (V - 1))
    probs_zero_at_d[:, 7] = 0.0
    for kw in ({}, {"draft_probs": probs_zero_at_d}, {"draft_logits": torch.zeros(N, V)}):
        out = ops.verify_chain(
            tl, torch.arange(0, 2 * N + 1, 2), d, temperature=1.0, seed=torch.arange(N), offset=0, **kw
        )
        assert int(out.num_accepted.sum()) == 0
        assert not bool((out.tokens[:, 0] == 7).any())
    # top-k excluding the draft token
    row2 = torch.arange(V, dtype=torch.float32)
    tl2 = torch.stack([row2.expand(N, V), torch.zeros(N, V)], 1).reshape(2 * N, V)
    out = ops.verify_chain(
        tl2,
        torch.arange(0, 2 * N + 1, 2),
        torch.zeros(N, dtype=torch.long),
        temperature=1.0,
        top_k=3,
        seed=torch.arange(N),
        offset=0,
    )
    assert int(out.num_accepted.sum()) == 0
    assert bool((out.tokens[:, 0] >= V - 3).all())


def test_zero_draft_probability_is_defined():
    """q(d) = 0 violates the contract (d could not have been drawn); the result is still defined:
    accepted iff p(d) > 0, tokens in range."""
    N, V = 500, 10
    tl = torch.randn(2 * N, V)
    probs = torch.full((N, V), 0.1)
    probs[:, 2] = 0.0
    out = ops.verify_chain(
        tl,
        torch.arange(0, 2 * N + 1, 2),
        torch.full((N,), 2),
        draft_probs=probs,
        temperature=1.0,
        seed=torch.arange(N),
        offset=0,
    )
    assert bool((out.num_accepted == 1).all())
    assert bool(((out.tokens >= 0) & (out.tokens < V)).all())


def test_out_of_range_draft_tokens_rejected():
    N, V = 300, 20
    tl = torch.randn(2 * N, V)
    d = torch.where(torch.arange(N) % 2 == 0, torch.full((N,), -5), torch.full((N,), V + 3))
    for temp in (0.0, 1.0):
        for kw in ({}, {"draft_logits": torch.randn(N, V)}, {"draft_probs": torch.full((N, V), 1.0 / V)}):
            out = ops.verify_chain(
                tl,
                torch.arange(0, 2 * N + 1, 2),
                d,
                temperature=temp,
                seed=torch.arange(N),
                offset=0,
                return_accept_prob=True,
                **kw,
            )
            assert int(out.num_accepted.sum()) == 0
            assert bool(((out.tokens[:, 0] >= 0) & (out.tokens[:, 0] < V)).all())
            assert bool((out.tokens[:, 1] == -1).all())


def test_empty_batch_and_all_zero_drafts():
    out = ops.verify_chain(
        torch.randn(0, 10),
        torch.zeros(1, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
        max_drafts=4,
        return_accept_prob=True,
    )
    assert out.tokens.shape == (0, 5) and out.num_accepted.shape == (0,) and out.accept_prob.shape == (0,)
    tl = torch.randn(3, 10)
    out = ops.verify_chain(
        tl,
        torch.arange(4),
        torch.zeros(0, dtype=torch.long),
        draft_logits=torch.zeros(0, 10),
        max_drafts=2,
        temperature=0.0,
    )
    assert out.tokens[:, 0].tolist() == tl.argmax(1).tolist()
    assert bool((out.tokens[:, 1:] == -1).all()) and bool((out.num_accepted == 0).all())


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(target_logits=torch.randn(5)), "target_logits"),
        (lambda a: a.update(target_logits=torch.randn(5, 10).long()), "target_logits"),
        (lambda a: a.update(cu_target_rows=torch.tensor([0, 2, 5], dtype=torch.int32)), "cu_target_rows"),
        (lambda a: a.update(draft_tokens=torch.zeros(4, dtype=torch.long)), "draft_tokens"),
        (lambda a: a.update(draft_tokens=torch.zeros(3, dtype=torch.int32)), "draft_tokens"),
        (lambda a: a.update(draft_logits=torch.randn(3, 11)), "draft"),
        (lambda a: a.update(temperature=torch.zeros(3)), "temperature"),
        (lambda a: a.update(top_k=torch.zeros(2)), "top_k"),
        (lambda a: a.update(seed=torch.zeros(2, dtype=torch.long), offset=torch.zeros(3, dtype=torch.long)), "offset"),
        (lambda a: a.update(max_drafts=1), "cu_target_rows"),
        (lambda a: a.update(cu_target_rows=torch.tensor([0, 3, 2])), "cu_target_rows"),
        (lambda a: a.update(cu_target_rows=torch.tensor([1, 2, 5])), "cu_target_rows"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(mutate, match):
    args = dict(
        target_logits=torch.randn(5, 10),
        cu_target_rows=torch.tensor([0, 2, 5]),
        draft_tokens=torch.zeros(3, dtype=torch.long),
        temperature=torch.zeros(2),
        max_drafts=2,
    )
    mutate(args)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        ops.verify_chain(args.pop("target_logits"), args.pop("cu_target_rows"), args.pop("draft_tokens"), **args)


def test_both_draft_forms_rejected():
    with pytest.raises(ValueError, match="draft_logits or draft_probs"):
        ops.verify_chain(
            torch.randn(2, 4),
            torch.tensor([0, 2]),
            torch.zeros(1, dtype=torch.long),
            draft_logits=torch.randn(1, 4),
            draft_probs=torch.rand(1, 4),
        )


# ---------------------------------------------------------------------------------------------
# torch integration
# ---------------------------------------------------------------------------------------------
def _op_args(device="cpu"):
    g = torch.Generator().manual_seed(0)
    cu = ragged([2, 0, 3]).to(device)
    tl = torch.randn(8, 33, generator=g).to(device)
    dl = torch.randn(5, 33, generator=g).to(device)
    dt = torch.randint(0, 33, (5,), generator=g).to(device)
    temp = torch.tensor([0.0, 1.0, 0.7], device=device)
    seed = torch.tensor([1, 2, 3], device=device)
    off = torch.zeros(3, dtype=torch.long, device=device)
    return (tl, cu, dt, dl, ops.DRAFT_LOGITS, temp, None, None, seed, off, 3, True)


def test_opcheck():
    torch.library.opcheck(torch.ops.dspark.verify_chain.default, _op_args())
    a = list(_op_args())
    a[3], a[4] = None, ops.DRAFT_ONE_HOT
    a[6] = torch.tensor([0, 5, 2], dtype=torch.int32)
    a[7] = torch.tensor([1.0, 0.8, 0.5])
    torch.library.opcheck(torch.ops.dspark.verify_chain.default, tuple(a))


def test_torch_compile_smoke():
    args = _op_args()

    def step(tl, cu, dt, dl, temp, seed, off):
        out = ops.verify_chain(tl, cu, dt, draft_logits=dl, temperature=temp, seed=seed, offset=off, max_drafts=3)
        return out.tokens, out.num_accepted + 1

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    ins = (args[0], args[1], args[2], args[3], args[5], args[8], args[9])
    a, b = compiled(*ins), step(*ins)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------------------------------------
# CUDA (run on a GPU machine; skipped here)
# ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["one_hot", "logits", "probs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(kind, dtype):
    g = torch.Generator().manual_seed(1)
    R, G, V = 64, 8, 32000
    lens = torch.randint(0, G + 1, (R,), generator=g)
    cu = ragged(lens)
    N = int(cu[-1])
    tl = (torch.randn(N, V, generator=g) * 3).to(dtype)
    dl = (tl[: N - R].float() + torch.randn(N - R, V, generator=g)).to(dtype)
    dt = torch.randint(0, V, (N - R,), generator=g)
    dt[::2] = tl[: N - R : 2].float().argmax(1)
    kw = dict(
        temperature=torch.where(torch.arange(R) % 4 == 0, 0.0, 0.8),
        top_k=torch.where(torch.arange(R) % 3 == 0, 50, 0).int(),
        top_p=torch.where(torch.arange(R) % 5 == 0, 0.9, 1.0),
        seed=torch.arange(R) * 7,
        offset=torch.full((R,), 3),
        max_drafts=G,
        return_accept_prob=True,
    )
    if kind == "logits":
        kw["draft_logits"] = dl
    if kind == "probs":
        kw["draft_probs"] = torch.softmax(dl.float(), -1)
    cpu = ops.verify_chain(tl, cu, dt, **kw)
    cuda_kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    gpu = ops.verify_chain(tl.cuda(), cu.cuda(), dt.cuda(), **cuda_kw)
    same = (gpu.tokens.cpu() == cpu.tokens).all(1)
    assert float(same.float().mean()) >= 0.98, "CPU and CUDA may differ only on floating-point ties"
    greedy = kw["temperature"] == 0
    assert bool(same[greedy].all())
    torch.testing.assert_close(gpu.accept_prob.cpu(), cpu.accept_prob, atol=1e-4, rtol=1e-3)


@pytest.mark.cuda
def test_cuda_graph_capture_replays_with_fresh_draws():
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _op_args()]
    off = args[9]
    torch.ops.dspark.verify_chain(*args)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = torch.ops.dspark.verify_chain(*args)
    seen = []
    for i in range(8):
        off.fill_(i)
        graph.replay()
        torch.cuda.synchronize()
        eager = torch.ops.dspark.verify_chain(*args)
        assert torch.equal(static_out[0], eager[0])
        seen.append(static_out[0].cpu().clone())
    assert any(not torch.equal(seen[0], s) for s in seen[1:]), "replays with new offsets must draw anew"


# ---------------------------------------------------------------------------------------------
# The baseline and AVX-512 compilations of the CPU kernel agree bit for bit
# ---------------------------------------------------------------------------------------------
_ISA_SCRIPT = r"""
import sys, torch, dspark_native.ops as ops
g = torch.Generator().manual_seed(0)
R, G, V = 16, 5, 3001
cu = torch.arange(0, R * (G + 1) + 1, G + 1)
tl = torch.randn(R * (G + 1), V, generator=g) * 3
dl = torch.randn(R * G, V, generator=g) * 3
d = torch.randint(0, V, (R * G,), generator=g)
outs = []
for kw in ({"draft_logits": dl}, {"draft_probs": torch.softmax(dl, -1)}, {}):
    o = ops.verify_chain(tl, cu, d, temperature=torch.linspace(0, 1.5, R),
                         top_k=torch.arange(R, dtype=torch.int32) * 50,
                         seed=torch.arange(R), offset=1, return_accept_prob=True, **kw)
    outs += [o.tokens, o.num_accepted, o.accept_prob]
torch.save(outs, sys.argv[1])
"""


def test_isa_variants_bit_identical(tmp_path):
    import os
    import subprocess
    import sys

    results = []
    for isa in ("baseline", "auto"):
        env = dict(os.environ, DSPARK_CPU_ISA=isa)
        path = tmp_path / f"{isa}.pt"
        subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path)], check=True, env=env)
        results.append(torch.load(path))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_ops_reachable_from_the_package_root_without_importing_ops():
    import subprocess
    import sys

    code = (
        "import dspark_native as dn; print(dn.verify_chain.__name__, dn.ops.__name__); "
        "assert not hasattr(dn, 'no_such_op')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["verify_chain", "dspark_native.ops"]
