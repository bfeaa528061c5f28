"""Draft vocabulary (a DSpark/DFlash drafter proposing from N of the target's V tokens): the
``dspark_draft`` op over the subset against its reference and against the full-vocabulary op with
the other columns masked, its sampled distribution, losslessness of verification with the
scattered q, hostile index maps, checkpoints (d2t / t2d), and the engine (greedy outputs identical
to plain decoding, sampled outputs distributed as the target's).

Statistical tests: chi-square at false-alarm rate ALPHA = 1e-3 each (tests/stats.py), fixed seeds.
"""

from __future__ import annotations

import pytest
import torch

from stats import assert_matches_distribution
from test_engine_helpers import exact_sequence_probs, greedy_reference, seq_index, tiny_drafter, tiny_target

import dspark_native.ops as ops
from dspark_native.engine import Engine, SamplingParams, q_over_target_vocab
from dspark_native.models.config import CheckpointError
from dspark_native.models.drafter import check_draft_vocab, restrict_drafter
from dspark_native.models.loaders import load_drafter, save_drafter
from dspark_native.reference import dspark_draft_reference, target_probs


def _subset(V, N, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(V, generator=g)[:N].sort().values


def _problem(R=3, G=4, Vt=60, N=25, D=10, r=6, seed=0, wdtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ids = _subset(Vt, N, seed + 1)
    P = dict(
        base_logits=torch.randn(R, G, N, generator=g) * 2,
        anchor_tokens=torch.randint(0, Vt, (R,), generator=g),
        markov_w1=torch.randn(Vt, r, generator=g).to(wdtype),
        markov_w2=(torch.randn(N, r, generator=g) * 0.5).to(wdtype),
    )
    kw = dict(
        hidden=torch.randn(R, G, D, generator=g),
        gate_weight=(torch.randn(r, D + r, generator=g) * 0.3).to(wdtype),
        gate_bias=torch.randn(r, generator=g).to(wdtype),
        joint_weight=(torch.randn(3 * r, 2 * r + D, generator=g) * 0.3).to(wdtype),
        joint_bias=torch.randn(3 * r, generator=g).to(wdtype),
        conf_weight=(torch.randn(1, D + r, generator=g) * 0.3).to(wdtype),
        conf_bias=torch.randn(1, generator=g).to(wdtype),
        draft_to_target=ids,
    )
    return P, kw


def _args(P):
    return P["base_logits"], P["anchor_tokens"], P["markov_w1"], P["markov_w2"]


@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn"])
def test_op_matches_reference_over_subset(head):
    P, kw = _problem(seed=3 + len(head))
    kw.update(head_type=head, temperature=torch.tensor([0.0, 1.0, 0.7]), seed=torch.tensor([5, 6, 7]), offset=2)
    out = ops.dspark_draft(*_args(P), **kw)
    ref = dspark_draft_reference(*_args(P), **kw)
    assert torch.equal(out.tokens, ref[0])
    torch.testing.assert_close(out.logits, ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.confidence, ref[2], rtol=1e-5, atol=1e-6)
    ids = kw["draft_to_target"]
    assert out.logits.shape[-1] == ids.numel()
    assert bool(torch.isin(out.tokens, ids).all()), "drafts are target ids of the subset"


@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn"])
def test_subset_equals_full_vocabulary_with_other_columns_masked(head):
    """The subset op is the full-vocabulary op whose non-subset columns are -inf: same drafts
    (greedy and sampled, same Philox draws: ascending ids keep the inverse-CDF order) and the same
    logits on the subset columns."""
    R, G, Vt, N, r = 4, 5, 70, 30, 5
    P, kw = _problem(R=R, G=G, Vt=Vt, N=N, r=r, seed=11)
    ids = kw["draft_to_target"]
    kw.update(head_type=head, temperature=torch.tensor([0.0, 1.0, 0.5, 1.3]), seed=torch.arange(R) + 40, offset=1)
    sub = ops.dspark_draft(*_args(P), **kw)
    U_full = torch.full((R, G, Vt), float("-inf"))
    U_full[:, :, ids] = P["base_logits"]
    W2_full = torch.zeros(Vt, r)
    W2_full[ids] = P["markov_w2"]
    kf = {k: v for k, v in kw.items() if k != "draft_to_target"}
    full = ops.dspark_draft(U_full, P["anchor_tokens"], P["markov_w1"], W2_full, **kf)
    assert torch.equal(sub.tokens, full.tokens)
    torch.testing.assert_close(sub.logits, full.logits[:, :, ids], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q_over_target_vocab(sub.logits, ids, Vt), full.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sub.confidence, full.confidence)


def test_sampled_drafts_follow_the_subset_distribution():
    """d_0 ~ softmax(z_0 / T) over the subset (as target ids), and the pair (d_0, d_1) follows
    p(d_0) p(d_1 | d_0) with the Markov bias of d_0's target id."""
    Vt, N, D, r, n, T = 12, 5, 4, 3, 4000, 0.8
    P, kw = _problem(R=1, G=2, Vt=Vt, N=N, D=D, r=r, seed=21)
    ids = kw["draft_to_target"]
    args = (
        P["base_logits"].expand(n, 2, N).contiguous(),
        torch.full((n,), 3, dtype=torch.long),
        P["markov_w1"] * 2,
        P["markov_w2"] * 2,
    )
    out = ops.dspark_draft(*args, draft_to_target=ids, temperature=T, seed=torch.arange(n) + 9, offset=4)
    col = torch.searchsorted(ids, out.tokens)  # target id -> draft column
    assert torch.equal(ids[col], out.tokens)
    p0 = target_probs(out.logits[0, 0], T)
    assert_matches_distribution(col[:, 0], p0, "d_0 over the subset")
    joint = torch.zeros(N, N, dtype=torch.float64)
    for j in range(N):
        rows = (col[:, 0] == j).nonzero()
        if rows.numel():
            joint[j] = p0[j] * target_probs(out.logits[rows[0, 0], 1], T)
    assert_matches_distribution(col[:, 0] * N + col[:, 1], joint.flatten(), "(d_0, d_1) over the subset")


def test_verification_with_scattered_q_is_lossless():
    """Drafts from the subset, q scattered to the target vocabulary (-inf elsewhere), verify_chain
    at the same temperature: the emitted token follows the target's full distribution, including
    tokens the drafter can never propose."""
    Vt, N, n, T = 7, 3, 4000, 1.0
    P, _ = _problem(R=1, G=1, Vt=Vt, N=N, r=2, seed=8)
    ids = torch.tensor([1, 4, 5])
    out = ops.dspark_draft(
        P["base_logits"].expand(n, 1, N).contiguous(),
        torch.zeros(n, dtype=torch.long),
        P["markov_w1"],
        P["markov_w2"],
        draft_to_target=ids,
        temperature=T,
        seed=torch.arange(n),
        offset=0,
    )
    target = torch.randn(2, Vt, generator=torch.Generator().manual_seed(3))
    q = q_over_target_vocab(out.logits[:, 0], ids, Vt)
    assert bool(torch.isinf(q[:, [0, 2, 3, 6]]).all())
    vc = ops.verify_chain(
        target.expand(n, 2, Vt).reshape(2 * n, Vt).contiguous(),
        torch.arange(0, 2 * n + 1, 2),
        out.tokens[:, 0],
        draft_logits=q,
        temperature=T,
        seed=torch.arange(n) + 99,
        offset=0,
    )
    assert_matches_distribution(vc.tokens[:, 0], target_probs(target[0], T), "first emitted token")


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda kw, P: kw.update(draft_to_target=torch.tensor([0, 3, 3, 9, 11])), "repeats target token 3"),
        (lambda kw, P: kw.update(draft_to_target=torch.tensor([0, 3, 4, 9, 60])), r"draft_to_target\[4\] = 60"),
        (lambda kw, P: kw.update(draft_to_target=torch.tensor([0, -1, 4, 9, 10])), r"draft_to_target\[1\] = -1"),
        (lambda kw, P: kw.update(draft_to_target=torch.tensor([0, 3, 4, 9])), "draft_to_target"),
        (lambda kw, P: kw.update(draft_to_target=torch.tensor([0, 3, 4, 9, 10], dtype=torch.int32)), "draft_to_target"),
        (lambda kw, P: P.update(anchor_tokens=torch.tensor([60])), "target_vocab_size = 60"),
        (lambda kw, P: P.update(markov_w1=torch.randn(4, 6)), "markov_w1 must have shape \\[V_target, r\\]"),
    ],
)
def test_hostile_index_maps_raise_naming_the_argument(mutate, match):
    P, kw = _problem(R=1, G=2, Vt=60, N=5, seed=1)
    kw = dict(draft_to_target=torch.tensor([0, 3, 4, 9, 10]), hidden=kw["hidden"])
    mutate(kw, P)
    with pytest.raises((RuntimeError, TypeError, ValueError), match=match):
        ops.dspark_draft(*_args(P), **kw)


def test_opcheck_with_draft_vocab():
    P, kw = _problem(R=2, G=3, Vt=40, N=9, seed=2)
    a = (
        P["base_logits"],
        kw["hidden"],
        P["anchor_tokens"],
        P["markov_w1"],
        P["markov_w2"],
        None,
        None,
        kw["joint_weight"],
        kw["joint_bias"],
        kw["conf_weight"],
        kw["conf_bias"],
        None,
        torch.tensor([0.0, 1.0]),
        torch.tensor([1, 2]),
        torch.zeros(2, dtype=torch.long),
        2,
        kw["draft_to_target"],
    )
    torch.library.opcheck(torch.ops.dspark.dspark_draft.default, a)


@pytest.mark.cuda
@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn"])
def test_cuda_matches_cpu_over_subset(head):
    P, kw = _problem(R=5, G=4, Vt=500, N=77, seed=4)
    kw.update(head_type=head, temperature=torch.tensor([0.0, 1.0, 0.6, 0.0, 1.5]), seed=torch.arange(5), offset=0)
    cpu = ops.dspark_draft(*_args(P), **kw)
    to = lambda x: x.cuda() if isinstance(x, torch.Tensor) else x  # noqa: E731
    gpu = ops.dspark_draft(*[to(x) for x in _args(P)], **{k: to(v) for k, v in kw.items()})
    assert torch.equal(cpu.tokens, gpu.tokens.cpu())
    torch.testing.assert_close(cpu.logits, gpu.logits.cpu(), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- checkpoints


def test_check_draft_vocab_errors():
    assert torch.equal(check_draft_vocab([1, 4, 7], 10), torch.tensor([1, 4, 7]))
    for bad, match in [
        ([1, 1, 7], "distinct"),
        ([4, 1, 7], "ascending"),
        ([1, 10], r"\[0, 10\)"),
        ([], "1 <= N"),
        ([[1, 2]], "1-D"),
        ([0.5, 1.0], "integers"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_draft_vocab(bad, 10)


def test_restricted_drafter_round_trips_through_a_checkpoint(tmp_path):
    target = tiny_target(64, seed=2)
    full = tiny_drafter(target, "dspark", block_size=4, rank=8)
    ids = _subset(64, 40, 5)
    sub = restrict_drafter(full, ids)
    assert sub.config.draft_vocab_size == 40 and sub.lm_head.weight.shape[0] == 40
    assert torch.equal(sub.draft_to_target, ids)
    assert torch.equal(sub.target_to_draft[ids], torch.arange(40))
    assert int((sub.target_to_draft >= 0).sum()) == 40
    save_drafter(sub, str(tmp_path / "d"), dtype=torch.bfloat16, include_shared=False)
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "d" / "model.safetensors"))
    assert stored["d2t"].dtype == torch.int64 and stored["t2d"].dtype == torch.bool
    assert torch.equal(torch.arange(40) + stored["d2t"], ids), "EAGLE-3 convention: target = index + d2t"
    assert "lm_head.weight" not in stored, "the head is the target's rows: not stored"
    back = load_drafter(str(tmp_path / "d"), target, dtype=torch.float32)
    assert torch.equal(back.draft_to_target, ids)
    torch.testing.assert_close(back.lm_head.weight, target.lm_head.weight[ids])
    torch.testing.assert_close(
        back.markov_head.markov_w2.weight, full.markov_head.markov_w2.weight[ids].bfloat16().float()
    )


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda t: t.update(d2t=t["d2t"] + 100), r"'d2t'.*\[0, 64\)"),
        (lambda t: t.update(t2d=torch.zeros(64, dtype=torch.bool)), "'t2d' and 'd2t' name different"),
        (lambda t: t.update(d2t=t["d2t"].float()), "'d2t' has dtype torch.float32"),
        (lambda t: t.pop("d2t"), "missing tensor 'd2t'"),
    ],
)
def test_corrupt_vocab_tensors_are_refused(tmp_path, edit, match):
    from safetensors.torch import load_file, save_file

    target = tiny_target(64, seed=2)
    sub = restrict_drafter(tiny_drafter(target, "dspark", block_size=4, rank=8), _subset(64, 40, 5))
    save_drafter(sub, str(tmp_path / "d"), include_shared=False)
    path = str(tmp_path / "d" / "model.safetensors")
    t = load_file(path)
    edit(t)
    save_file(t, path)
    with pytest.raises(CheckpointError, match=match):
        load_drafter(str(tmp_path / "d"), target)


# ----------------------------------------------------------------------------- engine


@pytest.mark.parametrize("kind", ["dspark", "dflash"])
def test_engine_greedy_with_subset_drafter_equals_plain(kind):
    target = tiny_target(64, seed=6)
    drafter = restrict_drafter(tiny_drafter(target, kind, block_size=5, rank=8), _subset(64, 48, 1))
    prompts = [[1, 2, 3], [5, 9], [7, 7, 7, 8]]
    want = greedy_reference(target, prompts, 20)
    eng = Engine(target, drafter, max_batch=3, max_seq=40)
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=20))
    assert [o.token_ids for o in outs] == want
    assert sum(o.stats.accepted_drafts for o in outs) > 0, "test premise: some drafts are accepted"


def test_engine_sampling_with_subset_drafter_is_lossless():
    """Sequences of 3 tokens sampled with a drafter over 5 of 8 tokens follow the target's exact
    distribution (enumerated over all 8^3 sequences)."""
    V, n = 8, 3000
    target = tiny_target(V, seed=4, bigram=0.2, layers=2)
    drafter = restrict_drafter(
        tiny_drafter(target, "dspark", block_size=3, aligned=True, markov_scale=3.0), torch.tensor([0, 2, 3, 5, 7])
    )
    prompt = [1, 2]
    eng = Engine(target, drafter, max_batch=1000, max_seq=len(prompt) + 4)
    outs = eng.generate([prompt] * n, [SamplingParams(max_new_tokens=3, seed=i, temperature=1.0) for i in range(n)])
    idx = torch.tensor([seq_index(o.token_ids, V) for o in outs])
    assert_matches_distribution(idx, exact_sequence_probs(target, prompt, 3), "subset drafter, T = 1")
    assert sum(o.stats.accepted_drafts for o in outs) > n // 10, "test premise: a fair share of drafts is accepted"
