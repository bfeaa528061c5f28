"""verify_tree: reference agreement, greedy == plain greedy decoding, output-distribution tests
(several tree shapes, chain == verify_chain), hostile input, tree helpers, opcheck, CUDA agreement.

Statistical tests draw with fixed seeds (Philox keys = request index) and use a chi-square test at
false-alarm rate ALPHA = 1e-3 per test (tests/stats.py): a correct sampler fails a given test with
probability 1e-3 over seed choices; with the ~12 statistical tests here, about 1.2% that some test
would fail for some seed choice. Seeds are fixed, so outcomes are reproducible.
"""

from __future__ import annotations

import math
import os as _os
import sys as _sys

import pytest
import torch

_sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))  # stats.py lives beside the tests

from stats import ALPHA, assert_matches_distribution, chi2_critical

import dspark_native.ops as ops
from dspark_native.reference import target_probs, verify_tree_reference
from dspark_native.tree import (
    from_first_child_next_sibling,
    tree_ancestor_bits,
    tree_attention_mask,
    tree_depths,
    tree_positions,
)


# ---------------------------------------------------------------------------------------------
# Trees and a target "model": logits as a function of the token path
# ---------------------------------------------------------------------------------------------
def random_parents(n, g, shape="random"):
    if shape == "chain":
        return [-1] + list(range(n - 1))
    if shape == "star":
        return [-1] + [0] * (n - 1)
    if shape == "binary":
        return [-1] + [(i - 1) // 2 for i in range(1, n)]
    return [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]


class PathModel:
    """Deterministic target: logits(path) for a token path (tuple), cached."""

    def __init__(self, V, scale=1.5, salt=0):
        self.V, self.scale, self.salt, self.cache = V, scale, salt, {}

    def __call__(self, path):
        key = tuple(path)
        if key not in self.cache:
            g = torch.Generator().manual_seed((hash(key) ^ (self.salt * 7919)) % (1 << 62))
            self.cache[key] = torch.randn(self.V, generator=g) * self.scale
        return self.cache[key]


def build_tree(model, parents, tokens):
    """Target logits [n, V] of a tree: row i = model(token path root..i) (root contributes none)."""
    paths = [()]
    for i in range(1, len(parents)):
        paths.append(paths[parents[i]] + (tokens[i],))
    return torch.stack([model(p) for p in paths]), paths


def batch(trees):
    """[(parents, tokens, logits)] -> cu, parents, tokens, logits (ragged)."""
    cu = [0]
    for p, _, _ in trees:
        cu.append(cu[-1] + len(p))
    return (
        torch.tensor(cu),
        torch.tensor([x for p, _, _ in trees for x in p]),
        torch.tensor([x for _, t, _ in trees for x in t]),
        torch.cat([lg for _, _, lg in trees]),
    )


# ---------------------------------------------------------------------------------------------
# Agreement with the reference (same keys -> same outputs)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference(dtype):
    g = torch.Generator().manual_seed(11 + int(dtype.itemsize))
    for trial in range(5):
        V = int(torch.randint(2, 300, (1,), generator=g))
        R = int(torch.randint(1, 7, (1,), generator=g))
        M = int(torch.randint(1, 12, (1,), generator=g))
        trees = []
        for r in range(R):
            n = int(torch.randint(1, M + 1, (1,), generator=g))
            par = random_parents(n, g, ["random", "chain", "star", "binary"][r % 4])
            logits = torch.randn(n, V, generator=g) * 2
            # drafts: half the time the parent's argmax (so paths get accepted), else random
            toks = [-1] + [
                int(logits[par[i]].argmax())
                if torch.rand(1, generator=g) < 0.5
                else int(torch.randint(0, V, (1,), generator=g))
                for i in range(1, n)
            ]
            trees.append((par, toks, logits))
        cu, par, toks, tl = batch(trees)
        temp = torch.where(torch.rand(R, generator=g) < 0.3, torch.zeros(R), torch.rand(R, generator=g) * 1.5 + 0.2)
        kw = dict(
            temperature=temp,
            top_k=torch.randint(-1, V + 2, (R,), generator=g, dtype=torch.int32) if trial % 2 else None,
            top_p=torch.rand(R, generator=g) * 1.2 if trial % 3 == 1 else None,
            seed=torch.randint(0, 1 << 40, (R,), generator=g),
            offset=torch.randint(0, 100, (R,), generator=g),
            max_nodes=M,
        )
        out = ops.verify_tree(tl.to(dtype), cu, par, toks, **kw)
        ref = verify_tree_reference(tl.to(dtype), cu, par, toks, **kw)
        assert torch.equal(out.path, ref[0]), (trial, out.path, ref[0])
        assert torch.equal(out.num_accepted, ref[1])
        assert torch.equal(out.tokens, ref[2]), (trial, out.tokens, ref[2])


# ---------------------------------------------------------------------------------------------
# Greedy == plain greedy decoding of the target
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["random", "chain", "star", "binary"])
def test_greedy_equals_plain_decode(shape):
    V = 8
    model = PathModel(V, salt=3)
    g = torch.Generator().manual_seed(5)
    trees = []
    for _tree in range(40):
        n = int(torch.randint(1, 16, (1,), generator=g))
        par = random_parents(n, g, shape)
        toks = [-1]
        paths = [()]
        for i in range(1, n):  # draft = the target's greedy choice 70% of the time
            am = int(model(paths[par[i]]).argmax())
            t = am if torch.rand(1, generator=g) < 0.7 else int(torch.randint(0, V, (1,), generator=g))
            toks.append(t)
            paths.append(paths[par[i]] + (t,))
        logits, _ = build_tree(model, par, toks)
        trees.append((par, toks, logits))
    cu, par_t, tok_t, tl = batch(trees)
    out = ops.verify_tree(tl, cu, par_t, tok_t, temperature=0.0, max_nodes=15)
    for r, (par, toks, _) in enumerate(trees):
        a = int(out.num_accepted[r])
        path, emitted = (), []
        for _ in range(a + 1):  # plain greedy decode
            nxt = int(model(path).argmax())
            emitted.append(nxt)
            path = path + (nxt,)
        assert out.tokens[r, : a + 1].tolist() == emitted
        assert (out.tokens[r, a + 1 :] == -1).all()
        nodes = out.path[r, : a + 1].tolist()
        assert nodes[0] == 0 and [toks[x] for x in nodes[1:]] == emitted[:a]
        assert all(par[nodes[i + 1]] == nodes[i] for i in range(a))
        # maximal: no child of the last node carries the next greedy token
        last = nodes[-1]
        assert not any(par[c] == last and toks[c] == emitted[-1] for c in range(1, len(par)))


def test_greedy_duplicate_siblings_first_wins_and_ties():
    V = 5
    logits = torch.zeros(3, V)
    logits[0, 2] = 1.0
    logits[0, 4] = 1.0  # tie: lowest index (2) wins
    cu, par, toks = torch.tensor([0, 3]), torch.tensor([-1, 0, 0]), torch.tensor([-1, 2, 2])
    out = ops.verify_tree(logits, cu, par, toks)
    assert out.path[0].tolist() == [0, 1, -1] and out.num_accepted.item() == 1


# ---------------------------------------------------------------------------------------------
# Distribution tests (ALPHA = 1e-3 each)
# ---------------------------------------------------------------------------------------------
def run_trials(model, par, toks, T, n_trials, top_k=None, top_p=None, offset=0):
    logits, _ = build_tree(model, par, toks)
    n = len(par)
    cu = torch.arange(n_trials + 1) * n
    out = ops.verify_tree(
        logits.repeat(n_trials, 1),
        cu,
        torch.tensor(par).repeat(n_trials),
        torch.tensor(toks).repeat(n_trials),
        temperature=T,
        top_k=top_k,
        top_p=top_p,
        seed=torch.arange(n_trials),
        offset=offset,
        max_nodes=n,
    )
    return out


def expected_pairs(model, V, T, k=0, p=1.0):
    p1 = target_probs(model(()), T, k, p)
    joint = torch.stack([p1[a] * target_probs(model((a,)), T, k, p) for a in range(V)])
    return p1, joint


SHAPES = {
    "chain": ([-1, 0, 1, 2], lambda m: [-1, 0, 1, 2]),
    "star": ([-1, 0, 0, 0, 0], None),
    "binary": ([-1, 0, 0, 1, 1, 2, 2], None),
    "random_dup": ([-1, 0, 0, 0, 1, 1, 3, 2], None),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("trunc", [False, True])
def test_stochastic_preserves_target_distribution(shape, trunc):
    """First emitted token ~ p_root and (first, second) ~ p_root(a) p_(a)(b), chi-square at ALPHA."""
    V, T, n_trials = 5, 0.9, 20000
    model = PathModel(V, scale=1.0, salt=17)
    par = SHAPES[shape][0]
    # drafts: the likeliest tokens of each parent, with a duplicate sibling in random_dup
    toks, paths = [-1], [()]
    rank = {}
    for i in range(1, len(par)):
        order = torch.argsort(model(paths[par[i]]), descending=True).tolist()
        j = rank.get(par[i], 0)
        rank[par[i]] = j + 1
        t = order[j % V]
        if shape == "random_dup" and i == 2:
            t = toks[1]  # duplicate of its first sibling: can never be accepted after it is rejected
        toks.append(t)
        paths.append(paths[par[i]] + (t,))
    k, p = (3, 0.9) if trunc else (0, 1.0)
    out = run_trials(model, par, toks, T, n_trials, top_k=k if trunc else None, top_p=p if trunc else None)
    p1, joint = expected_pairs(model, V, T, k, p)
    first = out.tokens[:, 0]
    assert_matches_distribution(first, p1, f"{shape} first token")
    # second token: emitted by this round if the first was accepted, else drawn from the target
    gen = torch.Generator().manual_seed(99)
    second = out.tokens[:, 1].clone()
    for r in torch.nonzero(out.num_accepted == 0).flatten().tolist():
        a = int(first[r])
        second[r] = int(torch.multinomial(target_probs(model((a,)), T, k, p).float(), 1, generator=gen))
    assert_matches_distribution(first * V + second, joint.flatten(), f"{shape} pairs")
    if shape == "random_dup":
        assert not (out.path == 2).any(), "a duplicate sibling was accepted after its first copy was rejected"


def test_out_of_range_and_zero_probability_drafts_never_accepted():
    V = 4
    logits = torch.tensor([[0.0, 0.0, -math.inf, 0.0]] + [[0.0] * V] * 3)
    par, toks = torch.tensor([-1, 0, 0, 0]), torch.tensor([-1, 7, 2, -3])
    n = 3000
    out = ops.verify_tree(
        logits.repeat(n, 1),
        torch.arange(n + 1) * 4,
        par.repeat(n),
        toks.repeat(n),
        temperature=1.0,
        seed=torch.arange(n),
        offset=0,
    )
    assert (out.num_accepted == 0).all()
    assert_matches_distribution(out.tokens[:, 0], torch.tensor([1 / 3, 1 / 3, 0.0, 1 / 3]), "zero-mass drafts")


def two_sample_chi2(a: torch.Tensor, b: torch.Tensor, K: int):
    ca = torch.bincount(a, minlength=K).double()
    cb = torch.bincount(b, minlength=K).double()
    tot = ca + cb
    keep = tot >= 10
    ca = torch.cat([ca[keep], ca[~keep].sum(0, keepdim=True)])
    cb = torch.cat([cb[keep], cb[~keep].sum(0, keepdim=True)])
    tot = ca + cb
    nz = tot > 0
    ca, cb, tot = ca[nz], cb[nz], tot[nz]
    na, nb = ca.sum(), cb.sum()
    ea, eb = tot * na / (na + nb), tot * nb / (na + nb)
    stat = (((ca - ea) ** 2 / ea) + ((cb - eb) ** 2 / eb)).sum().item()
    dof = max(int(tot.numel()) - 1, 1)
    return stat, chi2_critical(dof), dof


@pytest.mark.parametrize("T", [0.7, 1.3])
def test_chain_tree_matches_verify_chain(T):
    """A chain-shaped tree and verify_chain (one-hot drafts) give the same joint law of
    (num_accepted, emitted tokens): two-sample chi-square at ALPHA on (accepted, first, second)."""
    V, L, n = 4, 3, 15000
    model = PathModel(V, scale=1.2, salt=23)
    toks, paths = [-1], [()]
    for i in range(1, L + 1):
        order = torch.argsort(model(paths[-1]), descending=True).tolist()
        t = order[i % 2]
        toks.append(t)
        paths.append(paths[-1] + (t,))
    logits, _ = build_tree(model, list(range(-1, L)), toks)
    tree = ops.verify_tree(
        logits.repeat(n, 1),
        torch.arange(n + 1) * (L + 1),
        torch.tensor(list(range(-1, L))).repeat(n),
        torch.tensor(toks).repeat(n),
        temperature=T,
        seed=torch.arange(n),
        offset=0,
    )
    chain = ops.verify_chain(
        logits.repeat(n, 1),
        torch.arange(n + 1) * (L + 1),
        torch.tensor(toks[1:]).repeat(n),
        temperature=T,
        seed=torch.arange(n) + 10**6,
        offset=0,
    )

    def code(tokens, acc):
        t0 = tokens[:, 0]
        t1 = torch.where(tokens[:, 1] >= 0, tokens[:, 1], torch.full_like(t0, V))
        return (acc * V + t0) * (V + 1) + t1

    K = (L + 1) * V * (V + 1)
    stat, crit, dof = two_sample_chi2(code(tree.tokens, tree.num_accepted), code(chain.tokens, chain.num_accepted), K)
    assert stat <= crit, f"chain tree vs verify_chain: chi2 {stat:.1f} > {crit:.1f} (dof {dof}, alpha {ALPHA})"


# ---------------------------------------------------------------------------------------------
# Hostile input
# ---------------------------------------------------------------------------------------------
def call(parents, n_nodes=None, max_nodes=None, max_depth=None, tokens=None, **kw):
    par = torch.tensor(parents)
    n = par.numel()
    cu = torch.tensor([0, n]) if n_nodes is None else torch.tensor(n_nodes)
    toks = torch.zeros(n, dtype=torch.int64) if tokens is None else torch.tensor(tokens)
    return ops.verify_tree(torch.randn(n, 6), cu, par, toks, max_nodes=max_nodes, max_depth=max_depth, **kw)


@pytest.mark.parametrize("parents", [[-1, 1], [-1, 0, 2], [-1, 0, 5], [-1, -2], [0, 0], [-1, 2, 1], [-1, 0, 3, 2]])
def test_bad_parents_raise_naming_parents(parents):
    with pytest.raises(RuntimeError, match="parents"):
        call(parents)
    with pytest.raises(ValueError, match="parents"):
        verify_tree_reference(
            torch.randn(len(parents), 6),
            torch.tensor([0, len(parents)]),
            torch.tensor(parents),
            torch.zeros(len(parents), dtype=torch.int64),
        )


def test_too_many_nodes_and_too_deep():
    with pytest.raises(RuntimeError, match="max_nodes"):
        call([-1, 0, 0, 0], max_nodes=3, max_depth=1)
    with pytest.raises(RuntimeError, match="max_depth"):
        call([-1, 0, 1, 2], max_nodes=4, max_depth=2)
    with pytest.raises(RuntimeError, match="cu_nodes"):
        call([-1, 0, -1], n_nodes=[0, 2, 1], max_nodes=3)  # non-monotone
    with pytest.raises(RuntimeError, match="cu_nodes"):
        call([-1, 0, -1], n_nodes=[0, 2, 5], max_nodes=3)  # past the rows
    with pytest.raises(RuntimeError, match="cu_nodes"):
        call([-1, 0, -1], n_nodes=[0, 0, 3], max_nodes=3)  # empty tree


def test_argument_errors_name_the_argument():
    tl, cu, par, tok = torch.randn(3, 6), torch.tensor([0, 3]), torch.tensor([-1, 0, 0]), torch.tensor([0, 1, 2])
    with pytest.raises((RuntimeError, TypeError), match="parents"):
        ops.verify_tree(tl, cu, par.int(), tok)
    with pytest.raises((RuntimeError, TypeError), match="tokens"):
        ops.verify_tree(tl, cu, par, tok[:2])
    with pytest.raises((RuntimeError, TypeError), match="temperature"):
        ops.verify_tree(tl, cu, par, tok, temperature=torch.ones(2))
    with pytest.raises((RuntimeError, TypeError), match="cu_nodes"):
        ops.verify_tree(tl, cu.int(), par, tok)
    with pytest.raises((RuntimeError, TypeError), match="target_logits"):
        ops.verify_tree(tl.double(), cu, par, tok)


def test_nonfinite_rows_and_empty_batch():
    V = 5
    tl = torch.randn(3, V)
    tl[0] = float("nan")
    out = ops.verify_tree(tl, torch.tensor([0, 3]), torch.tensor([-1, 0, 0]), torch.tensor([0, 1, 2]), temperature=1.0)
    assert out.path[0].tolist() == [0, -1, -1] and out.tokens[0].tolist() == [-1, -1, -1]
    assert out.num_accepted.item() == 0
    out = ops.verify_tree(tl, torch.tensor([0, 3]), torch.tensor([-1, 0, 0]), torch.tensor([0, 1, 2]), temperature=0.0)
    assert out.tokens[0].tolist() == [-1, -1, -1]
    # +inf row: mass uniform on the +inf entries
    tl = torch.zeros(1, V)
    tl[0, 3] = math.inf
    out = ops.verify_tree(
        tl, torch.tensor([0, 1]), torch.tensor([-1]), torch.tensor([0]), temperature=1.0, seed=1, offset=0
    )
    assert out.tokens.tolist() == [[3]]
    out = ops.verify_tree(
        torch.randn(0, V), torch.tensor([0]), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    )
    assert out.path.shape == (0, 1)


# ---------------------------------------------------------------------------------------------
# Tree helpers
# ---------------------------------------------------------------------------------------------
def test_tree_helpers():
    g = torch.Generator().manual_seed(1)
    trees = [random_parents(n, g) for n in (1, 5, 9, 70)]
    cu = torch.tensor([0, 1, 6, 15, 85])
    par = torch.tensor([x for t in trees for x in t])
    depth = tree_depths(par, cu)
    mask = tree_attention_mask(par, cu)
    off = 0
    for t in trees:
        for i in range(len(t)):
            anc, x, d = {i}, i, 0
            while t[x] >= 0:
                x = t[x]
                anc.add(x)
                d += 1
            assert depth[off + i] == d
            row = mask[off + i]
            assert set((torch.nonzero(row).flatten() - off).tolist()) == anc
        off += len(t)
    pos = tree_positions(cu, par, torch.tensor([3, 0, 10, 7]))
    assert torch.equal(pos, depth + torch.tensor([3, 0, 10, 7]).repeat_interleave(cu[1:] - cu[:-1]))
    bits = tree_ancestor_bits(par, cu)
    assert bits.shape == (85, 2)
    for i in range(15, 85):
        want = mask[i, 15:85]
        got = torch.tensor([(int(bits[i, j // 64]) >> (j % 64)) & 1 for j in range(70)], dtype=torch.bool)
        assert torch.equal(got, want)
    # first-child / next-sibling: root 2 with children 0 then 3; 0 has child 1
    par2, order = from_first_child_next_sibling([1, -1, 0, -1], [3, -1, -1, -1], root=2)
    assert order.tolist() == [2, 0, 1, 3] and par2.tolist() == [-1, 0, 1, 0]
    with pytest.raises(ValueError):
        from_first_child_next_sibling([1, 0], [-1, -1])  # cycle


# ---------------------------------------------------------------------------------------------
# opcheck / CUDA
# ---------------------------------------------------------------------------------------------
def test_opcheck():
    g = torch.Generator().manual_seed(0)
    tl = torch.randn(7, 11, generator=g)
    args = (
        tl,
        torch.tensor([0, 4, 7]),
        torch.tensor([-1, 0, 0, 1, -1, 0, 1]),
        torch.randint(0, 11, (7,), generator=g),
        torch.tensor([0.0, 0.8]),
        None,
        None,
        torch.tensor([1, 2]),
        torch.tensor([0, 0]),
        4,
        3,
    )
    torch.library.opcheck(torch.ops.dspark.verify_tree.default, args)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(3)
    V, R = 3000, 16
    trees = []
    for r in range(R):
        n = int(torch.randint(1, 20, (1,), generator=g))
        par = random_parents(n, g, ["random", "chain", "star", "binary"][r % 4])
        logits = torch.randn(n, V, generator=g) * 3
        toks = [-1] + [
            int(logits[par[i]].argmax())
            if torch.rand(1, generator=g) < 0.6
            else int(torch.randint(0, V, (1,), generator=g))
            for i in range(1, n)
        ]
        trees.append((par, toks, logits))
    cu, par, toks, tl = batch(trees)
    for kw in (
        dict(temperature=0.0),
        dict(temperature=torch.rand(R, generator=g) + 0.3),
        dict(temperature=1.0, top_k=50, top_p=0.8),
    ):
        kw.update(seed=torch.arange(R), offset=5, max_nodes=19)
        cpu = ops.verify_tree(tl, cu, par, toks, **kw)
        kwc = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        gpu = ops.verify_tree(tl.cuda(), cu.cuda(), par.cuda(), toks.cuda(), **kwc)
        for a, b in zip(cpu, gpu, strict=True):
            assert torch.equal(a, b.cpu())
    # invalid tree on CUDA: that request emits nothing (all -1), the other is unaffected
    tl2 = torch.randn(6, 50, generator=g)
    cu2, par2 = torch.tensor([0, 3, 6]), torch.tensor([-1, 0, 0, -1, 2, 0])
    tok2 = torch.randint(0, 50, (6,), generator=g)
    gpu = ops.verify_tree(tl2.cuda(), cu2.cuda(), par2.cuda(), tok2.cuda(), max_nodes=3)
    cpu = ops.verify_tree(tl2[:3], cu2[:2], par2[:3], tok2[:3], max_nodes=3)
    assert torch.equal(gpu.path[0].cpu(), cpu.path[0]) and torch.equal(gpu.tokens[0].cpu(), cpu.tokens[0])
    assert (gpu.path[1] == -1).all() and (gpu.tokens[1] == -1).all() and gpu.num_accepted[1].item() == 0


def test_torch_compile_smoke():
    """verify_tree + kv_compact inside one torch.compile(fullgraph=True) graph (aot_eager)."""
    g = torch.Generator().manual_seed(4)
    tl = torch.randn(7, 11, generator=g)
    cu, par = torch.tensor([0, 4, 7]), torch.tensor([-1, 0, 0, 1, -1, 0, 1])
    tok = torch.randint(0, 11, (7,), generator=g)
    am = int(tl[0].argmax())
    tok[1], tok[2] = (am + 1) % 11, am  # request 0 (greedy) accepts node 2: its KV entry must move
    temp, seed, off = torch.tensor([0.0, 0.8]), torch.tensor([1, 2]), torch.tensor([0, 0])

    def step(tl, cu, par, tok, temp, seed, off, k, lengths):
        out = ops.verify_tree(tl, cu, par, tok, temperature=temp, seed=seed, offset=off, max_nodes=4, max_depth=3)
        kv = ops.kv_compact(k, None, lengths, out.path)
        return out.tokens, kv.new_lengths

    k1 = torch.randn(1, 2, 1, 16, 4, generator=g)
    k0 = k1.clone()
    k2 = k1.clone()
    lengths = torch.tensor([3, 5])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a = compiled(tl, cu, par, tok, temp, seed, off, k1, lengths)
    b = step(tl, cu, par, tok, temp, seed, off, k2, lengths)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(k1, k2)
    assert not torch.equal(k1, k0) and torch.equal(k1[0, 0, 0, 4], k0[0, 0, 0, 5])
