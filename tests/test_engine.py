"""Engine: greedy losslessness (DSpark / DFlash / EAGLE-3, every policy, blocks 1..16, batches
1..16 with different prompt lengths and stop points), batch invariance, stops and limits inside
accepted blocks, streaming, statistics, hostile input.

Greedy outputs are compared with ``greedy_reference``, which shares nothing with the engine (a
fresh whole-sequence target forward per token and an argmax: no KV rollback, no verify_chain, no
scheduler), and statistics with scripted drafters whose acceptance is known in advance."""

from __future__ import annotations

import weakref

import pytest
import torch

from test_engine_helpers import expected_output, greedy_reference, scripted_drafter, tiny_drafter, tiny_target

from dspark_native.engine import POLICIES, Engine, SamplingParams, default_drafter
from dspark_native.models import ContextLengthError
from dspark_native.models.fused import cpu_runs_onednn_bf16

V = 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention on shared CI cores
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def target():
    return tiny_target(V)


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


_REF = weakref.WeakKeyDictionary()  # target -> {(prompt, max_new): continuation}


def _free(target, prompts, max_new):
    """Engine-free greedy continuations (cached per target and prompt)."""
    ref = _REF.setdefault(target, {})
    todo = [p for p in prompts if (tuple(p), max_new) not in ref]
    if todo:
        for p, out in zip(todo, greedy_reference(target, todo, max_new), strict=True):
            ref[(tuple(p), max_new)] = out
    return [ref[(tuple(p), max_new)] for p in prompts]


def _want(target, prompts, params):
    """What each request must emit: the engine-free greedy continuation cut by its stops / limit."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    n = max(sp.max_new_tokens for sp in params)
    return [expected_output(f, sp) for f, sp in zip(_free(target, prompts, n), params, strict=True)]


def _plain(target, prompts, params, max_seq=96):
    """The plain engine's outputs (for the fast target paths, whose rounding the reference would
    not share)."""
    eng = Engine(target, None, max_batch=len(prompts), max_seq=max_seq)
    return [o.token_ids for o in eng.generate(prompts, params)]


def _params_with_stops(target, prompts, max_new=24):
    """Per-request limits and stop tokens taken from the unstopped greedy continuation, so that
    stops fall at various points (often inside accepted blocks)."""
    free = _free(target, prompts, max_new)
    params = []
    for i, out in enumerate(free):
        stop = [out[(3 * i + 2) % len(out)]] if i % 3 != 2 else []
        params.append(SamplingParams(max_new_tokens=max_new - (i % 5), stop_token_ids=stop))
    return params


CASES = [  # kind, aligned, block, batch, policy
    ("dspark", True, 1, 1, "static"),
    ("dspark", True, 16, 16, "static"),
    ("dspark", True, 7, 5, "threshold"),
    ("dspark", True, 4, 9, "causal"),
    ("dspark", True, 7, 3, "async"),
    ("dspark", False, 16, 4, "causal"),
    ("dspark", False, 3, 2, "threshold"),
    ("dflash", True, 7, 6, "static"),
    ("dflash", True, 16, 2, "causal"),
    ("dflash", False, 1, 3, "async"),
    ("eagle3", False, 4, 7, "static"),
    ("eagle3", True, 16, 1, "threshold"),
    ("eagle3", False, 1, 16, "async"),
]


@pytest.mark.parametrize("kind,aligned,block,batch,policy", CASES)
def test_greedy_lossless(target, kind, aligned, block, batch, policy):
    prompts = _prompts(batch, seed=block * 31 + batch)
    params = _params_with_stops(target, prompts)
    want = _want(target, prompts, params)
    stopped = any(sp.stop_token_ids and w[-1] in sp.stop_token_ids for w, sp in zip(want, params, strict=True))
    assert stopped or batch < 2, "test premise: some request stops on a stop token"
    drafter = tiny_drafter(target, kind, block_size=block, aligned=aligned)
    eng = Engine(target, drafter, policy=policy, max_batch=max(1, batch - 1) if batch > 2 else batch, max_seq=96)
    out = eng.generate(prompts, params)
    for i, (o, w) in enumerate(zip(out, want, strict=True)):
        assert o.token_ids == w, f"request {i}: {o.token_ids} != greedy reference {w}"
        stops = set(params[i].stop_token_ids)
        assert not any(t in stops for t in o.token_ids[:-1]), "token emitted after a stop token"
        assert o.finish_reason in ("stop", "length")
        assert o.stats.emitted == len(o.token_ids)
        assert o.stats.budget <= o.stats.rounds * block


@pytest.mark.parametrize("policy", POLICIES)
def test_stop_and_limits_inside_accepted_blocks(target, policy):
    drafter = tiny_drafter(target, "dspark", block_size=8, aligned=True)
    prompts = [[3, 9, 27], [11]]
    free = _free(target, prompts, 30)
    for limit in (1, 2, 3, 5, 8, 9, 13):
        eng = Engine(target, drafter, policy=policy, max_batch=2, max_seq=96)
        out = eng.generate(prompts, SamplingParams(max_new_tokens=limit))
        assert [o.token_ids for o in out] == [f[:limit] for f in free]
    # stop tokens deep inside a block (the aligned drafter gets whole blocks accepted)
    for k in (1, 4, 6, 10):
        stop = free[1][k]
        want = free[1][: free[1].index(stop) + 1]
        eng = Engine(target, drafter, policy=policy, max_batch=2, max_seq=96)
        out = eng.generate([prompts[1]], SamplingParams(max_new_tokens=30, stop_token_ids=[stop]))[0]
        assert out.token_ids == want and out.finish_reason == "stop"
    assert out.stats.tau > 2.0, "aligned drafter should get blocks accepted (test premise)"


def _round_model(max_new, g, right):
    """Rounds of one request with a drafter right on the first ``right`` positions (None: all)
    under the static policy, by the engine's cap rule (l <= g, l <= remaining - 1): per round
    (verified, accepted)."""
    rounds, remaining = [], max_new
    while remaining > 0:
        cap = max(0, min(g, remaining - 1))
        acc = cap if right is None else min(right, cap)
        rounds.append((cap, acc))
        remaining -= acc + 1
    return rounds


@pytest.mark.parametrize("kind", ["dspark", "dflash", "eagle3"])
@pytest.mark.parametrize("right", [None, 0, 2], ids=["oracle", "always-wrong", "right-twice"])
def test_statistics_of_scripted_drafters(target, kind, right):
    """A drafter that proposes the target's greedy tokens gets every draft accepted: tau = g + 1
    exactly; one that is always wrong: tau = 1; one right on two positions: two per round. Output,
    rounds, tau, budget, accepted drafts and per-position acceptance all follow."""
    g, max_new = 4, 25  # 25 = 5 full rounds of g + 1
    prompts = _prompts(3, seed=21)
    free = _free(target, prompts, max_new + g + 2)
    drafter = scripted_drafter(target, kind, g, [p + f for p, f in zip(prompts, free, strict=True)], right)
    outs = Engine(target, drafter, policy="static", max_batch=3, max_seq=64).generate(
        prompts, SamplingParams(max_new_tokens=max_new)
    )
    model = _round_model(max_new, g, right)
    for o, f in zip(outs, free, strict=True):
        st = o.stats
        assert o.token_ids == f[:max_new]
        assert st.rounds == len(model) and st.tau == max_new / len(model)
        assert st.budget == sum(v for v, _ in model) and st.accepted_drafts == sum(a for _, a in model)
        for k in range(g):
            reached = sum(1 for v, a in model if v > k and a >= k)
            assert st.reached[k] == reached
            assert st.accepted[k] == sum(1 for v, a in model if a > k)
    if right is None:
        assert all(o.stats.tau == g + 1 for o in outs)
        assert all(o.stats.acceptance == [1.0] * g for o in outs)
    if right == 0:
        assert all(o.stats.tau == 1 and o.stats.accepted_drafts == 0 for o in outs)


@pytest.mark.parametrize("policy", POLICIES)
def test_oracle_and_wrong_drafters_under_every_policy(target, policy):
    """Whatever lengths a policy picks: with an oracle every verified draft is accepted, with an
    always-wrong drafter none is and each round emits exactly one token."""
    g, max_new = 5, 18
    prompts = _prompts(4, seed=22)
    free = _free(target, prompts, max_new + g + 2)
    scripts = [p + f for p, f in zip(prompts, free, strict=True)]
    for right in (None, 0):
        drafter = scripted_drafter(target, "dspark", g, scripts, right)
        outs = Engine(target, drafter, policy=policy, max_batch=4, max_seq=64).generate(
            prompts, SamplingParams(max_new_tokens=max_new)
        )
        for o, f in zip(outs, free, strict=True):
            assert o.token_ids == f[:max_new]
            st = o.stats
            if right is None:
                assert st.accepted_drafts == st.budget and st.emitted == st.rounds + st.budget
            else:
                assert st.accepted_drafts == 0 and st.rounds == max_new and st.tau == 1.0
        if right is None:
            assert sum(o.stats.budget for o in outs) > 0, f"{policy} verified nothing"


def test_sps_scope_round_measures_the_overhead(target):
    """sps_scope "round": the causal policy gets the round's measured time beyond the table's
    forward as overhead_s (output unchanged: lossless either way); "target" leaves the table
    alone; anything else is refused."""
    drafter = tiny_drafter(target, "dspark", block_size=5, aligned=False)
    prompts = _prompts(3, seed=11)
    params = SamplingParams(max_new_tokens=12)
    want = _want(target, prompts, params)
    # a table far faster than this machine: every round's time is mostly overhead
    fast = [1e6] * 32
    eng = Engine(target, drafter, policy="causal", policy_kwargs=dict(sps_table=fast), max_batch=3, max_seq=64)
    assert eng.sps_scope == "round" and eng.round_overhead_s is None
    assert [o.token_ids for o in eng.generate(prompts, params)] == want
    assert eng.round_overhead_s is not None and eng.round_overhead_s > 0
    assert eng.policy.overhead_s == eng.round_overhead_s
    eng.reset_round_overhead()
    assert eng.round_overhead_s is None and eng.policy.overhead_s == 0.0
    flat = Engine(
        target,
        drafter,
        policy="causal",
        policy_kwargs=dict(sps_table=fast),
        max_batch=3,
        max_seq=64,
        sps_scope="target",
    )
    assert [o.token_ids for o in flat.generate(prompts, params)] == want
    assert flat.round_overhead_s is None and flat.policy.overhead_s == 0.0
    stat = Engine(target, drafter, policy="static", max_batch=3, max_seq=64)  # no SPS: nothing measured
    stat.generate(prompts, params)
    assert stat.round_overhead_s is None
    with pytest.raises(ValueError, match="sps_scope"):
        Engine(target, drafter, max_batch=1, max_seq=64, sps_scope="engine")


def test_plain_engine_matches_generate_greedy(target):
    for p in ([5], [1, 2, 3, 4, 5, 6, 7]):
        eng = Engine(target, None, max_batch=1, max_seq=64)
        got = eng.generate([p], SamplingParams(max_new_tokens=12))[0].token_ids
        assert got == target.generate_greedy(p, 12) == _free(target, [p], 12)[0]


def test_batch_invariance_greedy(target):
    drafter = tiny_drafter(target, "dspark", block_size=5, aligned=False)
    prompts = _prompts(6, seed=7)
    params = SamplingParams(max_new_tokens=15)
    alone = [Engine(target, drafter, max_batch=1, max_seq=64).generate([p], params)[0].token_ids for p in prompts]
    together = Engine(target, drafter, policy="causal", max_batch=6, max_seq=64).generate(prompts, params)
    assert [o.token_ids for o in together] == alone == _want(target, prompts, params)
    # and with sampled neighbours that come and go
    eng = Engine(target, drafter, max_batch=4, max_seq=64)
    ids = [eng.add(p, params) for p in prompts[:2]]
    eng.add([1, 2], SamplingParams(max_new_tokens=3, temperature=1.0, seed=5))
    eng.step()
    eng.add([9] * 7, SamplingParams(max_new_tokens=20, temperature=0.7, top_k=5, seed=6))
    while eng.has_unfinished():
        eng.step()
    assert [eng.output(i).token_ids for i in ids] == alone[:2]


def test_streaming_and_stats(target):
    drafter = tiny_drafter(target, "dspark", block_size=6, aligned=True)
    got = {}
    eng = Engine(target, drafter, policy="static", max_batch=2, max_seq=64)
    outs = eng.generate(
        [[4, 5], [6]],
        SamplingParams(max_new_tokens=17),
        on_tokens=lambda rid, toks: got.setdefault(rid, []).extend(toks),
    )
    for o in outs:
        assert got[o.request_id] == o.token_ids
        s = o.stats
        assert s.emitted == 17 and s.rounds >= 3
        assert abs(s.tau - 17 / s.rounds) < 1e-9
        assert s.accepted_drafts == sum(s.accepted)
        assert all(0 <= a <= n for a, n in zip(s.accepted, s.reached, strict=True))
        assert set(s.time) == {"prefill", "draft", "schedule", "verify", "rollback"}
        assert s.time["verify"] > 0 and s.time["draft"] > 0
        d = s.to_dict()
        assert d["tau"] == s.tau and len(d["acceptance"]) == len(s.reached)


def test_finish_aborts_one_request_only(target):
    drafter = tiny_drafter(target, "eagle3", block_size=3, aligned=False)
    eng = Engine(target, drafter, max_batch=2, max_seq=64)
    a = eng.add([1, 2, 3], SamplingParams(max_new_tokens=20))
    b = eng.add([4, 5], SamplingParams(max_new_tokens=20))
    eng.step()
    out_a = eng.finish(a)
    assert out_a.finish_reason == "aborted" and 1 <= len(out_a.token_ids) <= 4
    c = eng.add([4, 5], SamplingParams(max_new_tokens=20))  # reuses a's slot
    while eng.has_unfinished():
        eng.step()
    want = _want(target, [[4, 5]], SamplingParams(max_new_tokens=20))[0]
    assert eng.output(b).token_ids == want and eng.output(c).token_ids == want


def test_hostile_input(target):
    drafter = tiny_drafter(target, "dspark", block_size=4, aligned=True)
    eng = Engine(target, drafter, max_batch=2, max_seq=32)
    ok = eng.add([1, 2, 3], SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        eng.add([], SamplingParams())
    with pytest.raises(ContextLengthError, match="longer than the context"):
        eng.add(list(range(33)), SamplingParams())
    with pytest.raises(ValueError, match="prompt token ids"):
        eng.add([V + 3], SamplingParams())
    for bad in (
        dict(max_new_tokens=-1),
        dict(temperature=-1.0),
        dict(temperature=float("nan")),
        dict(top_p=0.0),
        dict(top_k=-2),
        dict(stop_token_ids=[V]),
    ):
        with pytest.raises(ValueError):
            eng.add([1], SamplingParams(**bad))
    zero = eng.add([1, 2], SamplingParams(max_new_tokens=0))
    while eng.has_unfinished():
        eng.step()
    assert eng.output(zero).token_ids == [] and eng.output(zero).finish_reason == "length"
    assert eng.output(ok).token_ids == _want(target, [[1, 2, 3]], SamplingParams(max_new_tokens=10))[0]
    # a drafter for another vocabulary
    other = tiny_target(V + 8, seed=3)
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(target, tiny_drafter(other, "dspark"))


def test_context_limit_mid_generation(target):
    drafter = tiny_drafter(target, "dspark", block_size=7, aligned=True)
    prompt = [2, 3, 4, 5, 6]
    free = _free(target, [prompt], 40)[0]
    for max_seq in (5, 6, 12, 17):
        eng = Engine(target, drafter, max_batch=1, max_seq=max_seq)
        out = eng.generate([prompt], SamplingParams(max_new_tokens=40))[0]
        assert out.finish_reason == "context"
        assert out.token_ids == free[: max_seq - len(prompt) + 1]


def test_default_drafter_is_deterministic(target):
    a, b = default_drafter(target, num_layers=1), default_drafter(target, num_layers=1)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), k
    assert a.block_size == 7 and a.config.target_layer_ids


def test_default_drafter_in_another_dtype_leaves_the_target_alone(target):
    """A bf16 default drafter beside an fp32 target gets bf16 copies of the shared embedding and
    head; converting it must not convert the target's own weights (it once did)."""
    emb, head = target.embed_tokens.weight, target.lm_head.weight
    d = default_drafter(target, num_layers=1, dtype=torch.bfloat16)
    assert target.embed_tokens.weight is emb and emb.dtype == torch.float32 and head.dtype == torch.float32
    assert d.embed_tokens.weight.dtype == torch.bfloat16 and torch.equal(d.embed_tokens.weight, emb.bfloat16())
    same = default_drafter(target, num_layers=1)
    assert same.embed_tokens.weight is emb and same.lm_head.weight is head  # same dtype: shared


@pytest.mark.slow
def test_smollm2_greedy_lossless_with_default_drafter():
    pytest.importorskip("tokenizers")
    from dspark_native.models import load_embedded_smollm2

    try:
        em = load_embedded_smollm2()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    drafter = default_drafter(em.model)
    prompts = [
        em.encode_chat([{"role": "user", "content": "What is 2+2?"}]),
        em.encode_chat([{"role": "user", "content": "Name a colour."}]),
    ]
    params = SamplingParams(max_new_tokens=8, stop_token_ids=em.eos_token_ids)
    want = [o.token_ids for o in Engine(em.model, None, max_batch=2, max_seq=256).generate(prompts, params)]
    for policy in POLICIES:
        out = Engine(em.model, drafter, policy=policy, max_batch=2, max_seq=256).generate(prompts, params)
        assert [o.token_ids for o in out] == want


def test_nan_logits_fail_one_request_only(target):
    """A target row with no finite logit ends that request with finish_reason "error"; the other
    requests of the batch are not disturbed."""
    drafter = tiny_drafter(target, "dspark", block_size=4, aligned=False)
    prompts = [[1, 2, 3], [7, 8]]
    want = _want(target, prompts, SamplingParams(max_new_tokens=12))
    eng = Engine(target, drafter, max_batch=2, max_seq=64)
    calls = {"n": 0}
    orig = target.forward

    def poisoned(ids, cu, slots, cache, **kw):
        logits, hidden = orig(ids, cu, slots, cache, **kw)
        calls["n"] += 1
        if calls["n"] == 4 and slots.numel() == 2:  # third round (after the prefill)
            logits[int(cu[1]) : int(cu[2])] = float("nan")  # every row of the request in slot 1
        return logits, hidden

    target.forward = poisoned
    try:
        outs = eng.generate(prompts, SamplingParams(max_new_tokens=12))
    finally:
        del target.forward
    assert outs[0].token_ids == want[0] and outs[0].finish_reason == "length"
    assert outs[1].finish_reason == "error" and outs[1].token_ids == want[1][: len(outs[1].token_ids)]
    assert len(outs[1].token_ids) == 2


@pytest.mark.parametrize("head_type", ["gated", "rnn"])
def test_markov_head_variants_greedy_lossless(target, head_type):
    drafter = tiny_drafter(target, "dspark", block_size=6, aligned=True, head_type=head_type)
    prompts = _prompts(3, seed=11)
    params = _params_with_stops(target, prompts, max_new=16)
    want = _want(target, prompts, params)
    out = Engine(target, drafter, policy="threshold", max_batch=3, max_seq=96).generate(prompts, params)
    assert [o.token_ids for o in out] == want
    assert sum(o.stats.accepted_drafts for o in out) > 0, "test premise: the aligned head gets drafts accepted"


def test_sts_with_fewer_drafts_than_the_block(target):
    """num_drafts < block size: the round uses the first num_drafts STS temperatures (a block-sized
    STS list used to be rejected by dspark_draft), and the output stays the greedy target's."""
    from dspark_native.scheduler import apply_sts

    drafter = tiny_drafter(target, "dspark", block_size=6, aligned=True)
    prompts = _prompts(2, seed=5)
    params = SamplingParams(max_new_tokens=12)
    want = _want(target, prompts, params)
    raw = Engine(target, drafter, num_drafts=3, max_batch=2, max_seq=64)
    raw.round_log = []
    assert [o.token_ids for o in raw.generate(prompts, params)] == want
    temps = [0.5, 2.0, 0.8, 9.0, 9.0, 9.0]
    drafter.sts_temperature = temps
    try:
        cal = Engine(target, drafter, num_drafts=3, max_batch=2, max_seq=64)
        cal.round_log = []
        assert [o.token_ids for o in cal.generate(prompts, params)] == want
    finally:
        drafter.sts_temperature = None
    assert len(raw.round_log) == len(cal.round_log) > 0
    for (c0, _, _), (c1, _, _) in zip(raw.round_log, cal.round_log, strict=True):
        assert c0.shape[-1] == 3
        torch.testing.assert_close(c1.double(), apply_sts(c0.double(), temps[:3]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("weights", ["fused", "bf16", "native"])
@pytest.mark.parametrize(
    "kind,block,batch,policy",
    [("dspark", 7, 3, "static"), ("dspark", 4, 5, "causal"), ("eagle3", 4, 2, "static"), ("dspark", 16, 5, "static")],
)  # 85-row verify forwards
def test_greedy_lossless_on_fast_target_paths(weights, kind, block, batch, policy):
    """Speculative output equals plain output on each fast forward path (the paths differ from
    the reference by rounding, so the plain run uses the same path)."""
    if weights == "bf16" and not cpu_runs_onednn_bf16():
        pytest.skip("oneDNN's bf16 GEMM cannot run on this CPU (no AVX512BW/VL/DQ, no AVX-NE-CONVERT)")
    target = tiny_target(V)
    assert target.set_weights(weights) == weights
    prompts = _prompts(batch, seed=block * 7 + batch)
    params = _params_with_stops(target, prompts)
    want = _plain(target, prompts, params)
    drafter = tiny_drafter(target, kind, block_size=block, aligned=True)
    out = Engine(target, drafter, policy=policy, max_batch=batch, max_seq=96).generate(prompts, params)
    assert [o.token_ids for o in out] == want
    if kind == "dspark":
        assert sum(o.stats.accepted_drafts for o in out) > 0, "aligned drafter: drafts must be accepted (premise)"
