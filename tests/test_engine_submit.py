"""Engine's thread-safe submission API (submit / abort / wait_for_work, drained by step()): many
threads submitting and aborting while one thread steps; outputs identical to solo greedy decoding,
aborts free their slots at the next step (before admission), validation errors in the caller's
thread change nothing, nothing is leaked. Every wait is bounded in time."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from test_engine_helpers import tiny_drafter, tiny_target

from dspark_native.engine import Engine, SamplingParams
from dspark_native.models import ContextLengthError

V = 64
DEADLINE_S = 60.0


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def target():
    return tiny_target(V)


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def _solo(target, prompt, params):
    return Engine(target, None, max_batch=1, max_seq=96).generate([prompt], params)[0].token_ids


def _assert_idle(eng):
    assert not eng.has_unfinished()
    assert not eng.active and not eng.waiting and not eng._inbox
    assert sorted(eng.free_slots) == list(range(eng.max_batch))
    assert torch.all(eng.cache.lengths == 0)


class _Stepper:
    """The engine's only stepping thread: steps while there is work, collects finished outputs."""

    def __init__(self, eng):
        self.eng, self.finished, self.stop, self.error = eng, {}, threading.Event(), None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while not self.stop.is_set():
                if self.eng.wait_for_work(0.01):
                    for out in self.eng.step():
                        self.finished[out.request_id] = out
        except Exception as exc:  # surfaced by close()
            self.error = exc

    def wait_for(self, ids, timeout=DEADLINE_S):
        t_end = time.monotonic() + timeout
        while not all(i in self.finished for i in ids):
            assert time.monotonic() < t_end, f"requests {set(ids) - set(self.finished)} never finished"
            assert self.error is None, self.error
            time.sleep(0.005)

    def close(self):
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


@pytest.mark.parametrize("policy", ["static", "causal"])
def test_concurrent_submitters_match_solo_greedy(target, policy):
    prompts = _prompts(24, seed=3)
    params = [SamplingParams(max_new_tokens=6 + i % 7) for i in range(len(prompts))]
    want = [_solo(target, p, sp) for p, sp in zip(prompts, params, strict=True)]
    eng = Engine(target, tiny_drafter(target, "dspark", block_size=5), policy=policy, max_batch=4, max_seq=96)
    streamed = {}
    lock = threading.Lock()

    def on_tokens(rid, toks):
        with lock:
            streamed.setdefault(rid, []).extend(toks)

    ids = [None] * len(prompts)
    stepper = _Stepper(eng)
    try:

        def client(k):
            for i in range(k, len(prompts), 6):
                ids[i] = eng.submit(prompts[i], params[i], on_tokens=on_tokens)
                time.sleep(0.001 * (i % 3))  # stagger: requests join while rounds run

        threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE_S)
        assert len(set(ids)) == len(ids) and None not in ids
        stepper.wait_for(ids)
    finally:
        stepper.close()
    for i, rid in enumerate(ids):
        out = stepper.finished[rid]
        assert out.token_ids == want[i], i
        assert streamed.get(rid, []) == out.token_ids
        assert out.finish_reason == "length"
    assert eng.rounds > 0
    _assert_idle(eng)


def test_abort_frees_slot_before_next_admission(target):
    eng = Engine(target, tiny_drafter(target, "dspark", block_size=3), max_batch=1, max_seq=96)
    p = _prompts(2, seed=5)
    long_id = eng.submit(p[0], SamplingParams(max_new_tokens=80))
    assert eng.has_unfinished() and eng.wait_for_work(0)
    eng.step()  # admitted, one round
    assert eng.active and len(eng.output(long_id).token_ids) >= 1
    short = SamplingParams(max_new_tokens=5)
    short_id = eng.submit(p[1], short)
    eng.abort(long_id)
    outs = {o.request_id: o for o in eng.step()}  # abort drained first: the short one takes the slot
    assert outs[long_id].finish_reason == "aborted" and long_id in outs
    assert eng.active and eng.active[0].id == short_id
    while eng.has_unfinished():
        outs.update({o.request_id: o for o in eng.step()})
    assert outs[short_id].token_ids == _solo(target, p[1], short)
    _assert_idle(eng)


def test_abort_while_queued_and_unknown_ids(target):
    eng = Engine(target, None, max_batch=2, max_seq=96)
    p = _prompts(3, seed=7)
    ids = [eng.submit(x, SamplingParams(max_new_tokens=4)) for x in p]
    eng.abort(ids[2])  # still in the inbox: never admitted
    eng.abort(10**6)  # unknown: ignored
    outs = {o.request_id: o for o in eng.step()}
    assert outs[ids[2]].finish_reason == "aborted" and outs[ids[2]].token_ids == []
    assert outs[ids[2]].stats.rounds == 0
    while eng.has_unfinished():
        outs.update({o.request_id: o for o in eng.step()})
    assert [outs[i].finish_reason for i in ids] == ["length", "length", "aborted"]
    eng.abort(ids[0])  # finished: ignored (reported once only)
    assert eng.step() == []
    eng.release()
    eng.abort(ids[1])  # released: ignored
    assert eng.step() == [] and not eng.requests
    _assert_idle(eng)


def test_submit_validates_in_caller_and_changes_nothing(target):
    eng = Engine(target, None, max_batch=2, max_seq=16)
    bad = [
        ([], SamplingParams()),
        ([V], SamplingParams()),
        ([1] * 17, SamplingParams()),
        ([1], SamplingParams(max_new_tokens=-1)),
        ([1], SamplingParams(temperature=float("nan"))),
        ([1], SamplingParams(top_p=0.0)),
    ]
    for prompt, sp in bad:
        with pytest.raises(ValueError):
            eng.submit(prompt, sp)
    with pytest.raises(ContextLengthError):
        eng.submit([1] * 17)
    assert not eng._inbox and not eng.has_unfinished() and eng._next_id == 0
    rid = eng.submit([1, 2], SamplingParams(max_new_tokens=0))
    assert rid == 0
    outs = eng.step()
    assert [(o.request_id, o.finish_reason, o.token_ids) for o in outs] == [(0, "length", [])]
    _assert_idle(eng)


def test_wait_for_work_wakes_on_submit(target):
    eng = Engine(target, None, max_batch=1, max_seq=32)
    t0 = time.monotonic()
    assert eng.wait_for_work(0.05) is False
    assert time.monotonic() - t0 >= 0.04
    timer = threading.Timer(0.05, lambda: eng.submit([3, 4], SamplingParams(max_new_tokens=2)))
    timer.start()
    try:
        t0 = time.monotonic()
        assert eng.wait_for_work(DEADLINE_S) is True
        assert time.monotonic() - t0 < 10
    finally:
        timer.join(10)
    while eng.has_unfinished():
        eng.step()
    _assert_idle(eng)
