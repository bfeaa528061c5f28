"""The engine on a device other than the CPU.

Without a GPU: full engine runs (plain, DSpark with every policy, DFlash, EAGLE-3; greedy and
sampled requests in one batch) on a pretend CUDA device (tests/fake_cuda.py) that fails on any op
mixing device and host tensors and counts host syncs. The fake device computes on the CPU, so the
outputs must equal the CPU engine's token for token; and every round must read the device exactly
as often as docs/engine.md says (once; twice when a confidence policy computed the lengths), the
prefill never.

With a GPU (marked ``cuda``, skipped here): the same engine on real CUDA, greedy identical to the
plain engine and to an engine-free argmax loop, and sampled runs that finish with valid tokens.
"""

from __future__ import annotations

import copy

import pytest
import torch
from fake_cuda import DeviceMixError, FakeCuda, to_fake_cuda

from test_engine_helpers import greedy_reference, tiny_drafter, tiny_target

from dspark_native.engine import Engine, SamplingParams

V = 64
PROMPTS = [[3, 9, 27, 5], [11], [7, 7, 1, 2, 50, 4, 8]]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def target():
    return tiny_target(V)


def _params(sampled: bool, stop=None):
    if not sampled:
        return [SamplingParams(max_new_tokens=12, stop_token_ids=stop or []) for _ in PROMPTS]
    # greedy, sampled with top-k, sampled with top-p: different temperatures in one batch
    return [
        SamplingParams(max_new_tokens=12),
        SamplingParams(max_new_tokens=10, temperature=0.8, top_k=5, seed=3),
        SamplingParams(max_new_tokens=11, temperature=1.0, top_p=0.9, seed=4),
    ]


def _run_counting(eng: Engine, mode: FakeCuda, prompts, params):
    """generate() recording the host syncs of each prefill and each round."""
    per_round, per_prefill = [], []
    orig_round, orig_admit = eng._round, eng._admit

    def counted(fn, log):
        def wrapper():
            n = len(mode.syncs)
            u = len(mode.blocking_uploads)
            fn()
            log.append((mode.syncs[n:], mode.blocking_uploads[u:]))

        return wrapper

    eng._round = counted(orig_round, per_round)
    eng._admit = counted(orig_admit, per_prefill)
    try:
        outs = eng.generate(prompts, params)
    finally:
        del eng._round, eng._admit
    return outs, per_round, per_prefill


CASES = [  # kind, policy, syncs a round may make
    ("plain", "static", (1,)),
    ("dspark", "static", (1,)),
    ("dspark", "threshold", (1, 2)),
    ("dspark", "causal", (1, 2)),
    ("dspark", "async", (1, 2)),
    ("dflash", "causal", (1,)),  # no confidences: every policy verifies the cap, known on the host
    ("eagle3", "threshold", (1,)),
]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("kind,policy,syncs", CASES)
def test_engine_on_fake_cuda_matches_cpu_and_syncs_once(target, kind, policy, syncs, sampled):
    drafter = None if kind == "plain" else tiny_drafter(target, kind, block_size=4, aligned=True)
    params = _params(sampled)
    want = Engine(target, drafter, policy=policy, max_batch=2, max_seq=48).generate(PROMPTS, params)

    t, d = copy.deepcopy(target), copy.deepcopy(drafter)
    with FakeCuda(where=True) as mode:
        to_fake_cuda(t)
        if d is not None:
            to_fake_cuda(d)
        eng = Engine(t, d, policy=policy, max_batch=2, max_seq=48)  # 3 prompts, 2 slots: admission mid-run
        assert eng.cache.lengths.device.type == "cuda"
        mode.reset()
        outs, rounds, prefills = _run_counting(eng, mode, PROMPTS, params)

    for o, w in zip(outs, want, strict=True):
        assert (o.token_ids, o.finish_reason) == (w.token_ids, w.finish_reason)
    assert rounds, "no round ran"
    for i, (s, uploads) in enumerate(rounds):
        assert len(s) in syncs, f"round {i}: {len(s)} host syncs, expected {syncs}: {s}"
        assert not uploads, f"round {i}: blocking host-to-device copies {uploads}"
    for s, uploads in prefills:
        assert not s and not uploads, f"prefill: host syncs {s}, blocking uploads {uploads}"
    if kind in ("dspark", "dflash") and not sampled:
        assert sum(o.stats.accepted_drafts for o in outs) > 0, "test premise: drafts get accepted"


def test_fake_cuda_catches_a_device_mix():
    """The checker itself: a CPU operand next to a device one fails, as on CUDA."""
    with FakeCuda():
        x = torch.arange(4, device="cuda:0")
        with pytest.raises(DeviceMixError):
            torch.minimum(x, torch.arange(4))
        with pytest.raises(DeviceMixError):
            x[torch.tensor([0, 1])]  # real CUDA copies the index over (a blocking transfer)
        y = x + torch.tensor(1)  # 0-dim CPU scalars are fine, as on CUDA
        assert y.device.type == "cuda"


def test_fake_cuda_counts_host_reads():
    with FakeCuda() as mode:
        x = torch.arange(4, device="cuda:0")
        int(x[0])
        x.tolist()
        x[x > 1]
        x.to("cpu", non_blocking=True)  # not a sync
        x.cpu()
        with pytest.raises(DeviceMixError):
            torch.multinomial(x.float(), 1, generator=torch.Generator())  # a CPU generator
        assert torch.multinomial(x.float(), 1, generator=torch.Generator(device="cuda:0")).device.type == "cuda"
        torch.repeat_interleave(x, x)
        torch.repeat_interleave(x, x, output_size=6)  # not a sync
    assert mode.syncs == [
        "item",
        "tolist",
        "aten::index with a boolean mask",
        ".cpu()",
        "repeat_interleave without output_size",
    ], mode.syncs


# ----------------------------------------------------------------------------- a real GPU


@pytest.mark.cuda
@pytest.mark.parametrize(
    "kind,policy", [("dspark", "causal"), ("dspark", "async"), ("dflash", "static"), ("eagle3", "threshold")]
)
def test_engine_on_cuda(target, kind, policy):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: the engine runs on the GPU here")
    from dspark_native import has_cuda

    if not has_cuda():
        pytest.skip("the loaded extension was built without CUDA kernels")
    dev = torch.device("cuda", 0)
    t = copy.deepcopy(target).to(dev)
    d = tiny_drafter(target, kind, block_size=5, aligned=True).to(dev)
    params = SamplingParams(max_new_tokens=14)
    plain = Engine(t, None, max_batch=3, max_seq=64).generate(PROMPTS, params)
    spec = Engine(t, d, policy=policy, max_batch=3, max_seq=64).generate(PROMPTS, params)
    ref = greedy_reference(t, PROMPTS, 14)
    for a, b, r in zip(plain, spec, ref, strict=True):
        assert a.token_ids == b.token_ids == r
    assert sum(o.stats.accepted_drafts for o in spec) > 0

    # sampling smoke test: one shared temperature (EAGLE-3 then samples its drafts on the device)
    sp = [SamplingParams(max_new_tokens=20, temperature=0.9, top_k=8, seed=s) for s in range(6)]
    outs = Engine(t, d, policy=policy, max_batch=4, max_seq=64).generate([PROMPTS[i % 3] for i in range(6)], sp)
    for o in outs:
        assert o.finish_reason == "length" and len(o.token_ids) == 20
        assert all(0 <= x < V for x in o.token_ids)
    again = Engine(t, d, policy=policy, max_batch=4, max_seq=64).generate([PROMPTS[i % 3] for i in range(6)], sp)
    assert [o.token_ids for o in again] == [o.token_ids for o in outs], "same seeds, same tokens"
