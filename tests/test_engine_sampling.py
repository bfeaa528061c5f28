"""Sampling losslessness of the engine: the distribution of generated sequences of length 3
equals the target's exact distribution, computed by enumerating all V^3 sequences, for plain
decoding, DSpark with every policy, DFlash, EAGLE-3, top-k/top-p, and greedy and sampled requests
mixed in one batch. Chi-square at ALPHA = 1e-3 per test (tests/stats.py), fixed seeds."""

from __future__ import annotations

import pytest
import torch

from stats import assert_matches_distribution
from test_engine_helpers import exact_sequence_probs, greedy_reference, seq_index, tiny_drafter, tiny_target

from dspark_native.engine import Engine, SamplingParams, default_sps_table

V, N_TOK, N_SAMPLES = 8, 3, 3000
PROMPT = [1, 2]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention on shared CI cores
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def target():
    return tiny_target(V, seed=4, bigram=0.2, layers=2)


@pytest.fixture(scope="module")
def exact(target):
    return {}


def _probs(target, exact, **kw):
    key = tuple(sorted(kw.items()))
    if key not in exact:
        exact[key] = exact_sequence_probs(target, PROMPT, N_TOK, **kw)
    return exact[key]


def _sample(target, drafter, policy="static", n=N_SAMPLES, seed0=0, greedy_every=0, **kw):
    eng = Engine(
        target,
        drafter,
        policy=policy,
        max_batch=1000,
        max_seq=len(PROMPT) + N_TOK + 1,
        policy_kwargs=dict(sps_table=default_sps_table(8192, 1.0, 2e-4)) if policy in ("causal", "async") else None,
    )
    params = []
    for i in range(n):
        greedy = greedy_every and i % greedy_every == 0
        params.append(
            SamplingParams(
                max_new_tokens=N_TOK,
                seed=seed0 + i,
                temperature=0.0 if greedy else kw.get("temperature", 1.0),
                top_k=kw.get("top_k", 0),
                top_p=kw.get("top_p", 1.0),
            )
        )
    outs = eng.generate([PROMPT] * n, params)
    assert all(len(o.token_ids) == N_TOK for o in outs)
    return outs, params


def _check(outs, probs, what):
    idx = torch.tensor([seq_index(o.token_ids, V) for o in outs])
    assert_matches_distribution(idx, probs, what)
    return sum(o.stats.accepted_drafts for o in outs)


def test_plain_sampling_matches_exact(target, exact):
    outs, _ = _sample(target, None)
    _check(outs, _probs(target, exact, temperature=1.0), "plain")


@pytest.mark.parametrize("policy", ["static", "threshold", "causal", "async"])
def test_dspark_sampling_lossless(target, exact, policy):
    drafter = tiny_drafter(target, "dspark", block_size=4, aligned=True, markov_scale=3.0)
    outs, _ = _sample(target, drafter, policy, seed0=1000)
    acc = _check(outs, _probs(target, exact, temperature=1.0), f"dspark/{policy}")
    assert acc > N_SAMPLES // 10, "test premise: a fair share of drafts is accepted"


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_other_drafters_sampling_lossless(target, exact, kind):
    drafter = tiny_drafter(target, kind, block_size=3, aligned=True)
    outs, _ = _sample(target, drafter, "static", seed0=2000)
    _check(outs, _probs(target, exact, temperature=1.0), kind)


def test_top_k_top_p_temperature_lossless(target, exact):
    drafter = tiny_drafter(target, "dspark", block_size=3, aligned=True, markov_scale=3.0)
    kw = dict(temperature=0.7, top_k=5, top_p=0.9)
    outs, _ = _sample(target, drafter, "threshold", seed0=3000, **kw)
    _check(outs, _probs(target, exact, **kw), "top-k/top-p")


def test_mixed_greedy_and_sampled_batch(target, exact):
    drafter = tiny_drafter(target, "dspark", block_size=4, aligned=True, markov_scale=3.0)
    outs, params = _sample(target, drafter, "causal", n=N_SAMPLES + N_SAMPLES // 3, seed0=4000, greedy_every=4)
    greedy_want = greedy_reference(target, [PROMPT], N_TOK)[0]
    sampled = [o for o, p in zip(outs, params, strict=True) if p.temperature > 0]
    assert all(o.token_ids == greedy_want for o, p in zip(outs, params, strict=True) if p.temperature == 0)
    _check(sampled, _probs(target, exact, temperature=1.0), "mixed batch, sampled part")
