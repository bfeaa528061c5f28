"""Batched generation engine: plain autoregressive decoding and lossless chain speculative decoding
with DSpark, DFlash and EAGLE-3 drafters (docs/engine.md).

One round for the R active requests (each request's anchor, its last emitted token, has no target
KV yet; its position ``s`` equals the target cache length and the drafter's context length):

1. draft:    ``drafter.propose`` -> (DSpark/DFlash) ``dspark_draft``: drafts d, the exact logits q
             they were sampled from, confidences c; (EAGLE-3) its own chain proposals.
2. schedule: the length policy picks ``l_r`` (<= the block, the context and the token budget).
3. verify:   one ragged target forward over ``[anchor, d_0 .. d_{l-1}]`` per request, then
             ``verify_chain(..., draft_logits=q, temperature, top_k, top_p, seed, offset)``.
4. rollback: target KV truncated to ``s + a + 1`` (anchor + ``a`` accepted drafts kept; the emitted
             corrected/bonus token is the next anchor, without KV); the drafter ingests the target
             features of those ``a + 1`` kept positions, so its context length is again the new
             anchor's position ``s + a + 1``.

Plain decoding is the same round with ``l_r = 0`` for every request (``verify_chain`` with zero
drafts samples the token), so both modes share the exact per-token sampling conventions. Each
request's Philox counter ``offset`` starts at 0 and advances by 1 per round it takes part in.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .models.cache import ContextLengthError, KVCache, upload
from .models.drafter import DSparkDrafter
from .models.eagle3 import Eagle3Drafter
from .models.hf_target import TransformersTarget
from .models.target import TargetModel

__all__ = [
    "SamplingParams",
    "RequestStats",
    "RequestOutput",
    "Engine",
    "make_policy",
    "POLICIES",
    "default_sps_table",
    "target_forward_fn",
    "drafter_kind",
    "default_drafter",
    "sequential_stage",
    "q_over_target_vocab",
    "drafts_per_round",
]

PHASES = ("prefill", "draft", "schedule", "verify", "rollback")


# ----------------------------------------------------------------------------- requests


@dataclass
class SamplingParams:
    """Per-request generation settings. temperature 0 = greedy; top_k 0 and top_p 1 disable."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: Sequence[int] = ()

    def validate(self, vocab_size: int) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        t = float(self.temperature)
        if not (t >= 0) or math.isinf(t):
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature!r}")
        if int(self.top_k) < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables), got {self.top_k!r}")
        if not (0 < float(self.top_p) <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        for s in self.stop_token_ids:
            if not 0 <= int(s) < vocab_size:
                raise ValueError(f"stop token {s} outside the vocabulary [0, {vocab_size})")


@dataclass
class RequestStats:
    """Per-request statistics. ``tau`` = tokens emitted per round (accepted drafts + the
    bonus/corrected token). ``reached[k]`` counts rounds in which draft position k was verified
    with every earlier draft accepted, ``accepted[k]`` those in which it was accepted too; their
    ratio is the per-position conditional acceptance. ``budget`` = drafts sent to verification.
    ``time`` holds the wall time (s) of the rounds the request took part in, per phase (every
    request of a batched round waits for the whole round)."""

    rounds: int = 0
    emitted: int = 0
    drafted: int = 0
    budget: int = 0
    accepted_drafts: int = 0
    reached: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    time: dict[str, float] = field(default_factory=lambda: {p: 0.0 for p in PHASES})
    wall: float = 0.0  #: seconds from admission (prefill start) to finish

    @property
    def tokens_per_s(self) -> float:
        return self.emitted / self.wall if self.wall > 0 else 0.0

    @property
    def tau(self) -> float:
        return self.emitted / self.rounds if self.rounds else 0.0

    @property
    def acceptance(self) -> list[float]:
        return [a / n if n else float("nan") for a, n in zip(self.accepted, self.reached, strict=True)]

    def _grow(self, k: int) -> None:
        while len(self.reached) < k:
            self.reached.append(0)
            self.accepted.append(0)

    def to_dict(self) -> dict:
        return dict(
            rounds=self.rounds,
            emitted=self.emitted,
            tau=self.tau,
            drafted=self.drafted,
            budget=self.budget,
            accepted_drafts=self.accepted_drafts,
            reached=list(self.reached),
            accepted=list(self.accepted),
            acceptance=self.acceptance,
            time=dict(self.time),
            wall=self.wall,
            tokens_per_s=self.tokens_per_s,
        )


@dataclass
class RequestOutput:
    request_id: int
    prompt_ids: list[int]
    token_ids: list[int]
    finished: bool
    finish_reason: str | None  #: "stop" | "length" | "context" | "aborted" | "error"
    stats: RequestStats
    error: str | None = None


class _Request:
    def __init__(self, rid, prompt, params, on_tokens):
        self.id = rid
        self.prompt = prompt
        self.params = params
        self.on_tokens = on_tokens
        self.stop = set(int(s) for s in params.stop_token_ids)
        self.output: list[int] = []
        self.slot: int | None = None
        self.anchor = int(prompt[-1]) if prompt else 0
        self.offset = 0
        self.finished = False
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.stats = RequestStats()
        self.t_admit: float | None = None

    def result(self) -> RequestOutput:
        return RequestOutput(
            self.id, list(self.prompt), list(self.output), self.finished, self.finish_reason, self.stats, self.error
        )


# ----------------------------------------------------------------------------- length policies
# The policies are those of `dspark_native.scheduler` (StaticLength, ConfidenceThreshold,
# HardwareAwareCausal, HardwareAwareAsync): ``policy.schedule(conf [R, g]) -> l [R]``. The engine
# adds per-request caps (block, context, tokens still wanted) on top: a cap depends on counts only,
# never on a draft's value, so capping keeps every policy lossless. Switching the policy source is
# `make_policy` + `_apply_policy` below.

POLICIES = ("static", "threshold", "causal", "async")


def _scheduler():
    # importlib rather than `from . import scheduler`: the package __getattr__ recurses on
    # `from . import X` while `dspark_native.ops` is not imported yet (reported); importing ops
    # first also serves scheduler's own `from . import ops`.
    importlib.import_module("dspark_native.ops")
    return importlib.import_module("dspark_native.scheduler")


def default_sps_table(max_tokens: int, fixed_s: float = 1.0, per_token_s: float = 0.02) -> torch.Tensor:
    """A synthetic SPS table (steps/s at B = 1..max_tokens batch tokens) of a memory-bound
    forward, 1 / (fixed + per_token * B): used when no profiled table is given. Profile the real
    one with ``dspark-native profile-sps`` (or :func:`dspark_native.scheduler.profile_sps`)."""
    b = torch.arange(1, max_tokens + 1, dtype=torch.float32)
    return 1.0 / (fixed_s + per_token_s * b)


def make_policy(
    name: str = "static",
    *,
    length: int | None = None,
    threshold: float = 0.5,
    sps_table=None,
    max_tokens: int = 4096,
    token_budget: int | None = None,
    lag: int = 2,
):
    """A verification-length policy of :mod:`dspark_native.scheduler` by name.

    static: ``length`` drafts (default: all); threshold: survival product >= ``threshold``;
    causal / async: ``sps_table`` (an SPSTable, a list or a tensor; default the synthetic
    :func:`default_sps_table` over ``max_tokens``), async with budget ``lag`` rounds old."""
    S = _scheduler()
    if name == "static":
        return S.StaticLength(10**9 if length is None else int(length))
    if name == "threshold":
        return S.ConfidenceThreshold(float(threshold))
    if name in ("causal", "async"):
        table = default_sps_table(max_tokens) if sps_table is None else sps_table
        if name == "causal":
            return S.HardwareAwareCausal(table, token_budget=token_budget)
        return S.HardwareAwareAsync(table, lag=lag, token_budget=token_budget)
    raise ValueError(f"unknown policy {name!r} (one of {', '.join(POLICIES)})")


def _apply_policy(policy, conf: torch.Tensor | None, caps: list[int], device) -> list[int] | torch.Tensor:
    """l = policy(conf) capped per request by ``caps`` (host ints). Returns host ints when the
    lengths follow from counts alone (the static policy; no confidences: DFlash, EAGLE-3, DSpark
    without a confidence head, where the confidence policies verify the whole cap), else the
    device tensor [R] int64 the policy computed (the engine then reads it: the round's first host
    sync)."""
    S = _scheduler()
    HardwareAwareCausal, StaticLength = S.HardwareAwareCausal, S.StaticLength
    if isinstance(policy, StaticLength):
        return [min(c, policy.length) for c in caps]
    plain_callable = callable(policy) and not hasattr(policy, "schedule")
    if conf is None and not plain_callable:
        return list(caps)
    R = len(caps)
    caps_t = upload(torch.tensor(caps, dtype=torch.int64), device)
    if conf is None:  # a plain callable (conf, caps) -> lengths
        return torch.minimum(policy(None, caps_t).to(torch.int64), caps_t)
    if type(policy) is HardwareAwareCausal:  # let Algorithm 1 know the caps (better choices)
        saved = policy.max_len
        policy.max_len = (
            caps_t.to(torch.int32)
            if saved is None
            else torch.minimum(caps_t, torch.as_tensor(saved, device=device).expand(R)).to(torch.int32)
        )
        try:
            out = policy.schedule(conf)
        finally:
            policy.max_len = saved
    elif hasattr(policy, "schedule"):
        out = policy.schedule(conf)
    else:  # a plain callable (conf, caps) -> lengths
        out = policy(conf, caps_t)
    return torch.minimum(out.to(torch.int64).clamp(min=0), caps_t)


# ----------------------------------------------------------------------------- the sequential stage


def drafter_kind(drafter) -> str:
    if drafter is None:
        return "plain"
    if isinstance(drafter, Eagle3Drafter):
        return "eagle3"
    if isinstance(drafter, DSparkDrafter):
        return "dspark" if drafter.markov_head is not None else "dflash"
    raise TypeError(f"unsupported drafter type {type(drafter).__name__}")


def drafts_per_round(drafter, num_drafts: int | None = None) -> int:
    """Drafts one round proposes with ``drafter`` (0 for None): EAGLE-3 ``num_drafts``, else its
    ttt_length (7 when unset); DSpark/DFlash the block, capped to ``num_drafts``. What
    ``Engine.gamma`` is, known without building an engine (the SPS table's size needs it)."""
    if drafter is None:
        return 0
    if drafter_kind(drafter) == "eagle3":
        return int(num_drafts or drafter.config.ttt_length or 7)
    return min(int(num_drafts), drafter.block_size) if num_drafts else drafter.block_size


def _sts_tensor(drafter, sts, g: int, device) -> torch.Tensor:
    """The first g STS temperatures as a float32 tensor on ``device``, validated and uploaded once
    per (values, g, device) rather than every round."""
    key = (tuple(float(x) for x in sts), g, str(device))
    cached = getattr(drafter, "_sts_cache", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    vals = list(key[0])
    if len(vals) < g:
        raise ValueError(f"drafter.sts_temperature has {len(vals)} entries for {g} drafted positions")
    if any(not (t > 0) or math.isinf(t) for t in vals[:g]):
        raise ValueError(f"drafter.sts_temperature must be positive finite, got {vals}")
    t = upload(torch.tensor(vals[:g], dtype=torch.float32), device)
    drafter._sts_cache = (key, t)
    return t


def sequential_stage(drafter: DSparkDrafter, U, h, anchors, temperature, seed, offset):
    """DSpark/DFlash sequential stage: (drafts [R, g] int64, q logits [R, g, V] fp32 exactly as
    sampled, confidences [R, g] fp32 or None). Uses the fused ``dspark_draft`` op; DFlash (no
    Markov head) runs it with an all-zero rank-1 head, i.e. drafts straight from the base logits
    with the same Philox sampler."""
    from .ops import dspark_draft

    mh = drafter.markov_head
    ch = drafter.confidence_head
    kw = {}
    if mh is not None:
        w1, w2 = mh.markov_w1.weight, mh.markov_w2.weight
        if mh.head_type == "gated":
            kw.update(gate_weight=mh.gate_proj.weight, gate_bias=mh.gate_proj.bias)
        elif mh.head_type == "rnn":
            kw.update(joint_weight=mh.joint_proj.weight, joint_bias=mh.joint_proj.bias)
        head_type = mh.head_type
    else:
        w1 = torch.zeros(drafter.config.vocab_size, 1, device=U.device)
        w2 = torch.zeros(U.shape[-1], 1, device=U.device)
        head_type = "vanilla"
    wdt = w2.dtype
    kw = {k: v.detach().to(wdt).contiguous() for k, v in kw.items()}
    if ch is not None:
        kw.update(
            conf_weight=ch.proj.weight.detach().to(wdt).contiguous(),
            conf_bias=ch.proj.bias.detach().to(wdt).contiguous(),
        )
    # STS temperatures are per block position; a round drafting g < block_size positions (e.g.
    # num_drafts < block size) uses the first g of them.
    sts = getattr(drafter, "sts_temperature", None)
    if sts is not None:
        sts = _sts_tensor(drafter, sts, U.shape[1], U.device)
    out = dspark_draft(
        U.contiguous(),
        anchors,
        w1.detach().contiguous(),
        w2.detach().contiguous(),
        hidden=h.contiguous(),
        head_type=head_type,
        temperature=temperature,
        seed=seed,
        offset=offset,
        sts_temperature=sts,
        draft_to_target=drafter.draft_to_target,
        **kw,
    )
    conf = out.confidence if ch is not None else None
    return out.tokens, out.logits, conf


def _default_drafter_threads(target) -> int | None:
    if target.device.type != "cpu":
        return None
    try:
        spin = int(os.environ.get("GOMP_SPINCOUNT", ""))
    except ValueError:
        spin = None
    return None if spin is not None and spin <= 10000 else 1


@contextlib.contextmanager
def _torch_threads(n: int | None):
    if not n or n == torch.get_num_threads():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def q_over_target_vocab(q: torch.Tensor, draft_to_target: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """Draft logits over the draft vocabulary fp32 [..., N] -> over the target vocabulary
    [..., V]: column j goes to token draft_to_target[j], every other token gets -inf (probability
    0, which is exactly the distribution the drafts were sampled from). Identity without a map.

    Why the engine scatters rather than verify_chain taking the map: the scatter moves R x g x V x
    4 bytes once per sampled round (1.4 MB at R = 1, g = 7, V = 49,152; about 0.1 ms here), while
    verify_chain's sampled path reads the target's full row anyway; greedy rounds skip q."""
    if draft_to_target is None:
        return q
    full = q.new_full((*q.shape[:-1], vocab_size), float("-inf"))
    full.index_copy_(q.dim() - 1, draft_to_target, q)
    return full


# ----------------------------------------------------------------------------- the engine


class Engine:
    """Batched generation over a target model, optionally with a drafter.

    ``add(prompt_ids, params, on_tokens=None) -> id`` queues a request; ``step()`` admits queued
    requests into free slots (prefill) and runs one round for every active request, returning the
    requests that finished; ``finish(id)`` aborts one; ``generate(...)`` does it all. A request's
    ``on_tokens(request_id, new_tokens)`` callback streams its tokens as they are emitted.

    Args:
        target: TargetModel (native) or TransformersTarget (any transformers causal LM).
        drafter: DSparkDrafter (DSpark or DFlash) or Eagle3Drafter, or None (plain decoding).
        plain: ignore the drafter (baseline with the same code path).
        policy: a :mod:`dspark_native.scheduler` policy object or a name (static | threshold | causal |
            async) with ``policy_kwargs`` for :func:`make_policy`.
        num_drafts: drafts per round: the DSpark/DFlash block is capped to it; EAGLE-3 default
            its ttt_length.
        max_batch: concurrent requests (cache slots). max_seq: context length per request.
        sps_scope: what the causal / async policies' steps per second are of. "round" (default):
            the whole round; the engine measures each round's time beyond the table's target
            forward (drafter, bookkeeping; a moving average) and hands it to the policy as
            ``overhead_s``. "target": the profiled target forward alone, as the table is.
    """

    def __init__(
        self,
        target: TargetModel,
        drafter=None,
        *,
        plain: bool = False,
        policy: str | Callable | None = "static",
        policy_kwargs: dict | None = None,
        num_drafts: int | None = None,
        max_batch: int = 8,
        max_seq: int = 1024,
        sps_scope: str = "round",
    ):
        if not isinstance(target, (TargetModel, TransformersTarget)):
            raise TypeError(f"target must be a TargetModel or a TransformersTarget, got {type(target).__name__}")
        if max_batch < 1 or max_seq < 2:
            raise ValueError("max_batch must be >= 1 and max_seq >= 2")
        if sps_scope not in ("round", "target"):
            raise ValueError(f"sps_scope must be 'round' or 'target', got {sps_scope!r}")
        self.target = target
        self.drafter = None if plain else drafter
        self.kind = drafter_kind(self.drafter)
        V = target.config.vocab_size
        if self.drafter is not None:
            dv = self.drafter.config.vocab_size
            if dv != V:
                raise ValueError(f"drafter vocabulary ({dv}) differs from the target's ({V})")
            dh, th = self.drafter.config.hidden_size, target.config.hidden_size
            if dh != th:
                raise ValueError(f"drafter hidden_size ({dh}) differs from the target's ({th})")
            if self.drafter.device != target.device:
                raise ValueError(
                    f"drafter is on {self.drafter.device} but the target on {target.device}: "
                    "load or move both to one device"
                )
            ids = list(self.drafter.config.target_layer_ids)
            if list(target.target_layer_ids) != ids:
                target.set_target_layer_ids(ids)
            # + one block: scratch past the longest context for the native propose's block K/V
            scratch = self.drafter.block_size if isinstance(self.drafter, DSparkDrafter) else 0
            self.drafter.allocate_cache(max_batch, max_seq + scratch)
        self.gamma = drafts_per_round(self.drafter, num_drafts)
        if isinstance(policy, str) or policy is None:
            kw = dict(policy_kwargs or {})
            kw.setdefault("max_tokens", max_batch * (self.gamma + 1))
            policy = make_policy(policy or "static", **kw)
        self.policy = policy
        self.max_batch, self.max_seq = max_batch, max_seq
        self.cache: KVCache = target.new_cache(max_batch, max_seq)
        self.free_slots = list(range(max_batch))
        self.waiting: deque[_Request] = deque()
        self.active: dict[int, _Request] = {}  # slot -> request
        self.requests: dict[int, _Request] = {}
        self._next_id = 0
        # Thread-safe submission (submit / abort from other threads, drained by step()): the lock
        # guards only the inbox and id allocation; everything else belongs to the stepping thread.
        self._lock = threading.Lock()
        self._inbox: deque[tuple] = deque()
        self._work = threading.Event()
        self.time = {p: 0.0 for p in PHASES}
        # torch threads for the drafter's rounds (None: as set). On a CPU target whose libgomp
        # spins for the default 300k iterations, one: OpenMP workers woken for the drafter's small
        # GEMMs would spin for milliseconds afterwards on the cores the target's own kernel team
        # needs for the verification. With a short spin (GOMP_SPINCOUNT <= 10000, which the
        # dspark-native command sets) all threads are faster (docs/engine.md).
        self.drafter_threads = _default_drafter_threads(target) if self.drafter is not None else None
        self.rounds = 0
        #: set to a list to record every round's (confidences [R, g] or None, lengths [R],
        #: num_accepted [R]) -- the data STS calibration needs
        self.round_log: list | None = None
        self._generator: torch.Generator | None = None  # EAGLE-3 sampling, on the target's device
        self.sps_scope = sps_scope
        #: moving average of a round's seconds beyond the SPS table's forward time (sps_scope "round")
        self.round_overhead_s: float | None = None

    # -- public API ------------------------------------------------------------------------------
    def add(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        on_tokens: Callable[[int, list[int]], None] | None = None,
    ) -> int:
        """Queue a request; returns its id. Bad input raises ValueError and changes nothing.
        Call from the thread that steps the engine (other threads: :meth:`submit`)."""
        rq = self._new_request(prompt_ids, params, on_tokens)
        self._enqueue(rq)
        return rq.id

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        on_tokens: Callable[[int, list[int]], None] | None = None,
    ) -> int:
        """Thread-safe :meth:`add`, for a thread other than the one calling :meth:`step` (a server's
        request handlers). Validates in the caller's thread (same errors as ``add``; nothing changes
        on error) and returns the id at once; the request joins at the start of the next ``step()``,
        which admits it into a free slot between rounds. ``on_tokens`` is called from the stepping
        thread."""
        rq = self._new_request(prompt_ids, params, on_tokens)
        with self._lock:
            self._inbox.append(("add", rq))
            self._work.set()
        return rq.id

    def abort(self, request_id: int) -> None:
        """Thread-safe :meth:`finish`: the request is aborted at the start of the next ``step()``
        (its slot is freed before that step admits anyone) and that step returns its output with
        finish_reason "aborted". Unknown, released or already finished ids are ignored."""
        with self._lock:
            self._inbox.append(("abort", int(request_id)))
            self._work.set()

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Block until there is something to step (queued, active or submitted requests) or
        ``timeout`` seconds pass; True if there is. For the stepping thread's idle wait."""
        if self.has_unfinished():
            return True
        self._work.wait(timeout)
        return self.has_unfinished()

    def finish(self, request_id: int) -> RequestOutput:
        """Abort a request (frees its slot); returns what it produced so far."""
        rq = self.requests[request_id]
        if not rq.finished:
            if rq in self.waiting:
                self.waiting.remove(rq)
            self._close(rq, "aborted")
        return rq.result()

    def has_unfinished(self) -> bool:
        """Requests queued, active, or submitted and not yet drained by ``step()``."""
        return bool(self.waiting or self.active or self._inbox)

    def output(self, request_id: int) -> RequestOutput:
        return self.requests[request_id].result()

    def step(self) -> list[RequestOutput]:
        """Drain :meth:`submit` / :meth:`abort`, admit waiting requests, run one round; returns the
        requests finished by this step (including those aborted or finished at once since the
        last call)."""
        self._drain_inbox()
        done = [rq for rq in self.requests.values() if rq.finished and not getattr(rq, "_reported", False)]
        self._admit()
        if self.active:
            self._round()
        done += [
            rq
            for rq in self.requests.values()
            if rq.finished and not getattr(rq, "_reported", False) and rq not in done
        ]
        for rq in done:
            rq._reported = True
        return [rq.result() for rq in done]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        on_tokens=None,
    ) -> list[RequestOutput]:
        """Run a list of prompts to completion; outputs in prompt order."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("one SamplingParams per prompt")
        ids = [self.add(p, sp, on_tokens) for p, sp in zip(prompts, params, strict=True)]
        while self.has_unfinished():
            self.step()
        return [self.requests[i].result() for i in ids]

    def release(self) -> None:
        """Forget finished requests (their outputs) to bound memory in long runs."""
        for rid in [i for i, rq in self.requests.items() if rq.finished]:
            del self.requests[rid]

    # -- internals -------------------------------------------------------------------------------
    def _new_request(self, prompt_ids, params, on_tokens) -> _Request:
        """Validate and build a request (no engine state touched but the id counter)."""
        params = params or SamplingParams()
        V = self.target.config.vocab_size
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt is empty: at least one token is needed")
        if min(prompt) < 0 or max(prompt) >= V:
            raise ValueError(f"prompt token ids must be in [0, {V})")
        if len(prompt) > self.max_seq:
            raise ContextLengthError(
                f"prompt of {len(prompt)} tokens is longer than the context (max_seq = {self.max_seq})"
            )
        params.validate(V)
        with self._lock:
            rid = self._next_id
            self._next_id += 1
        return _Request(rid, prompt, params, on_tokens)

    def _enqueue(self, rq: _Request) -> None:
        self.requests[rq.id] = rq
        if rq.params.max_new_tokens == 0:
            rq.finished, rq.finish_reason = True, "length"
        else:
            self.waiting.append(rq)

    def _drain_inbox(self) -> None:
        with self._lock:
            items = list(self._inbox)
            self._inbox.clear()
            self._work.clear()
        for kind, x in items:
            if kind == "add":
                self._enqueue(x)
            elif x in self.requests:
                self.finish(x)

    def _close(self, rq: _Request, reason: str, error: str | None = None) -> None:
        rq.finished, rq.finish_reason, rq.error = True, reason, error
        if rq.t_admit is not None:
            rq.stats.wall = time.perf_counter() - rq.t_admit
        if rq.slot is not None:
            slot = rq.slot
            self.cache.reset([slot])
            if self.drafter is not None:
                self.drafter.crop([slot], 0)
            self.active.pop(slot, None)
            self.free_slots.append(slot)
            self.free_slots.sort()
            rq.slot = None

    def _admit(self) -> None:
        new: list[_Request] = []
        while self.waiting and self.free_slots:
            rq = self.waiting.popleft()
            rq.slot = self.free_slots.pop(0)
            self.active[rq.slot] = rq
            new.append(rq)
        if not new:
            return
        t0 = time.perf_counter()
        for rq in new:
            rq.t_admit = t0
        # Prefill everything but the last prompt token, which is the first anchor (no KV yet).
        # Host bookkeeping (ids, cu, slots) goes in as host tensors: the models upload it.
        pre = [rq.prompt[:-1] for rq in new]
        slots = [rq.slot for rq in new]
        cu = [0]
        for p in pre:
            cu.append(cu[-1] + len(p))
        if cu[-1]:
            ids = torch.tensor([t for p in pre for t in p], dtype=torch.int64)
            need = self.drafter is not None
            _, hidden = self.target(
                ids, torch.tensor(cu), torch.tensor(slots), self.cache, return_hidden=need, logit_rows="none"
            )
            if self.kind == "eagle3":
                self.drafter.ingest(slots, hidden, cu, ids)
            elif need:
                self.drafter.ingest(slots, hidden, cu)
        dt = time.perf_counter() - t0
        self.time["prefill"] += dt
        for rq in new:
            rq.stats.time["prefill"] += dt

    def reset_round_overhead(self) -> None:
        """Forget the measured round overhead (the policy sees the profiled table again)."""
        self.round_overhead_s = None
        if isinstance(self.policy, _scheduler().HardwareAwareCausal):
            self.policy.overhead_s = 0.0

    def _note_round_time(self, wall_s: float, batch_tokens: int) -> None:
        """Round time beyond what the SPS table predicts for its forward -> the causal / async
        policy's ``overhead_s`` (sps_scope "round"): a moving average, so one slow round (a
        noisy machine) moves it little and a changed batch (drafter cost grows with it) is
        followed within a few rounds."""
        pol = self.policy
        if self.sps_scope != "round" or not isinstance(pol, _scheduler().HardwareAwareCausal):
            return
        table = pol.host_sps()
        pred = 1.0 / table[min(batch_tokens, len(table)) - 1]
        extra = max(0.0, wall_s - pred)
        old = self.round_overhead_s
        self.round_overhead_s = extra if old is None else 0.8 * old + 0.2 * extra
        pol.overhead_s = self.round_overhead_s

    def _round(self) -> None:
        """One round for every active request (module docstring, docs/engine.md). Host syncs: the
        verification lengths when a confidence policy computed them on the device, and one read of
        the emitted tokens + accepted counts; everything else the host needs it already knows."""
        reqs = [self.active[s] for s in sorted(self.active)]
        R = len(reqs)
        dev = self.target.device
        g = self.gamma
        slots_l = [rq.slot for rq in reqs]
        pos_l = self.cache.host_lengths()[slots_l].tolist()  # anchor positions (host copy, no read)
        temp_l = [float(rq.params.temperature) for rq in reqs]
        seed_l = [int(rq.params.seed) for rq in reqs]
        offset_l = [rq.offset for rq in reqs]
        # drafts this round may not exceed the block, the context or the tokens still wanted
        caps_l = [
            max(0, min(g, self.max_seq - 1 - p, rq.params.max_new_tokens - len(rq.output) - 1))
            for p, rq in zip(pos_l, reqs, strict=True)
        ]
        # per-request vectors of the round: one asynchronous upload each for ints and floats
        ints = upload(
            torch.tensor(
                [slots_l, [rq.anchor for rq in reqs], seed_l, offset_l, [int(rq.params.top_k) for rq in reqs]],
                dtype=torch.int64,
            ),
            dev,
        )
        flts = upload(torch.tensor([temp_l, [float(rq.params.top_p) for rq in reqs]], dtype=torch.float32), dev)
        anchors, seed, offset = ints[1], ints[2], ints[3]
        top_k = ints[4].to(torch.int32)
        temp, top_p = flts[0], flts[1]
        times = {p: 0.0 for p in PHASES}

        # 1. draft ------------------------------------------------------------------------------
        t0 = t_round = time.perf_counter()
        drafts = q = conf = None
        if self.kind in ("dspark", "dflash") and max(caps_l) > 0:
            with _torch_threads(self.drafter_threads):
                U, h = self.drafter.propose(slots_l, anchors)
            # A draft of -1 (the drafter's logits had no finite entry) is never accepted by
            # verify_chain, which then emits the target's own token there: lossless, no check needed.
            drafts, q, conf = sequential_stage(self.drafter, U[:, :g], h[:, :g], anchors, temp, seed, offset)
            if max(temp_l) <= 0:
                # all greedy: acceptance is draft == target argmax, q plays no part (verify_chain
                # with no q treats drafts as one-hot: the same decisions), so skip moving it
                q = None
        elif self.kind == "eagle3" and max(caps_l) > 0:
            ok = self.drafter.has_pending[slots_l].tolist()  # host bookkeeping
            caps_l = [c if o else 0 for c, o in zip(caps_l, ok, strict=True)]
            idx = [i for i, o in enumerate(ok) if o]
            sampled = {temp_l[i] for i in idx if temp_l[i] > 0}
            T = sampled.pop() if len(sampled) == 1 else 0.0  # all sampled requests share T: draft at T, q = logits
            if idx:
                gen = None
                if T > 0:
                    if self._generator is None:
                        self._generator = torch.Generator(device=dev)
                    key = int((torch.tensor(seed_l) * 1000003 + torch.tensor(offset_l)).sum())
                    gen = self._generator.manual_seed(key & 0x7FFFFFFFFFFF)
                if len(idx) == R:
                    drafts, lg = self.drafter.propose(slots_l, anchors, g, temperature=T, generator=gen)
                    q = lg if T > 0 else None
                else:
                    sel = upload(torch.tensor(idx, dtype=torch.int64), dev)
                    d, lg = self.drafter.propose(
                        [slots_l[i] for i in idx], anchors.index_select(0, sel), g, temperature=T, generator=gen
                    )
                    drafts = torch.zeros(R, g, dtype=torch.int64, device=dev).index_copy_(0, sel, d)
                    if T > 0:
                        q = torch.zeros(R, g, lg.shape[-1], device=dev).index_copy_(0, sel, lg)
        times["draft"] = time.perf_counter() - t0

        # 2. schedule ---------------------------------------------------------------------------
        t0 = time.perf_counter()
        if drafts is None:
            lengths_l = [0] * R
        else:
            lengths = _apply_policy(self.policy, conf, caps_l, dev)
            # host sync 1 (confidence policies only): the ragged verification needs the lengths
            lengths_l = lengths if isinstance(lengths, list) else lengths.cpu().tolist()
        times["schedule"] = time.perf_counter() - t0

        # 3. verify -----------------------------------------------------------------------------
        t0 = time.perf_counter()
        width = g + 1
        cu_l = [0]
        for n in lengths_l:
            cu_l.append(cu_l[-1] + n + 1)
        if drafts is None:
            ids = anchors
            d_flat = torch.zeros(0, dtype=torch.int64, device=dev)
            cu = upload(torch.tensor(cu_l, dtype=torch.int64), dev)
            q_flat = None
        else:
            # flat indices of the verified rows of [anchor, d_0 .. d_{g-1}] and of the verified drafts
            row_idx = [i * width + j for i, n in enumerate(lengths_l) for j in range(n + 1)]
            d_idx = [i * g + j for i, n in enumerate(lengths_l) for j in range(n)]
            meta = upload(torch.tensor(row_idx + d_idx + cu_l, dtype=torch.int64), dev)
            row_sel, d_sel, cu = meta[: len(row_idx)], meta[len(row_idx) : -len(cu_l)], meta[-len(cu_l) :]
            # the forward gets token 0 for a -1 draft: its row only feeds positions after a rejection
            rows = torch.cat([anchors[:, None], drafts.clamp(min=0)], 1)
            ids = rows.reshape(-1).index_select(0, row_sel)
            d_flat = drafts.reshape(-1).index_select(0, d_sel)
            # q: the exact logits the drafts were sampled from (DSpark/DFlash always; EAGLE-3 when
            # all sampled requests share one temperature). None = one-hot drafts, lossless for any
            # drafter whose drafts do not depend on the target's randomness (EAGLE-3 drafting
            # greedily).
            q_flat = q.reshape(R * g, -1).index_select(0, d_sel) if q is not None else None
            if q_flat is not None and self.kind in ("dspark", "dflash"):
                q_flat = q_over_target_vocab(q_flat, self.drafter.draft_to_target, self.target.config.vocab_size)
        need_hidden = self.drafter is not None
        logits, hidden = self.target(
            ids, torch.tensor(cu_l), torch.tensor(slots_l), self.cache, return_hidden=need_hidden
        )
        from .ops import verify_chain

        out = verify_chain(
            logits,
            cu,
            d_flat,
            draft_logits=q_flat,
            temperature=temp,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            offset=offset,
            max_drafts=max(lengths_l),
        )
        acc = out.num_accepted.clamp(min=0)
        conf_host = None
        if self.round_log is not None and conf is not None:
            conf_host = conf.to("cpu", non_blocking=True)  # complete once the read below returns
        # host sync 2 (every round): the emitted tokens and accepted counts, in one transfer
        res = torch.cat([out.tokens, acc[:, None]], 1).cpu()
        times["verify"] = time.perf_counter() - t0

        # 4. rollback + emission ----------------------------------------------------------------
        t0 = time.perf_counter()
        tokens = res[:, :-1].tolist()
        accl = res[:, -1].tolist()
        if self.round_log is not None:
            self.round_log.append((conf_host, torch.tensor(lengths_l, dtype=torch.int64), res[:, -1].clone()))
        new_len = [p + a + 1 for p, a in zip(pos_l, accl, strict=True)]
        self.cache.truncate(slots_l, new_len)  # host values: checked on the host, uploaded
        cont = []
        for i, rq in enumerate(reqs):
            rq.offset += 1
            st = rq.stats
            st.rounds += 1
            if drafts is not None:
                st.drafted += caps_l[i] if self.kind == "eagle3" else g
            n = lengths_l[i]
            st.budget += n
            a = accl[i]
            st.accepted_drafts += a
            st._grow(n)
            for k in range(min(a + 1, n)):
                st.reached[k] += 1
                if k < a:
                    st.accepted[k] += 1
            emitted = tokens[i][: a + 1]
            if any(t < 0 for t in emitted):
                good = [t for t in emitted[: emitted.index(-1)]] if -1 in emitted else []
                self._emit(rq, good)
                self._close(rq, "error", "target logits have no finite entry (NaN/inf)")
                continue
            if self._emit(rq, emitted):
                continue
            if new_len[i] >= self.max_seq:  # the next anchor has no room in the context
                self._close(rq, "context")
                continue
            rq.anchor = emitted[-1]
            cont.append(i)
        if self.drafter is not None and cont:
            # the drafter ingests the features of the kept positions: anchor + accepted drafts
            rows_kept = [cu_l[i] + j for i in cont for j in range(accl[i] + 1)]
            kcu = [0]
            for i in cont:
                kcu.append(kcu[-1] + accl[i] + 1)
            sel = upload(torch.tensor(rows_kept, dtype=torch.int64), dev)
            kslots = [slots_l[i] for i in cont]
            if self.kind == "eagle3":
                with _torch_threads(self.drafter_threads):
                    self.drafter.ingest(kslots, hidden.index_select(0, sel), kcu, ids.index_select(0, sel))
            else:
                with _torch_threads(self.drafter_threads):
                    self.drafter.ingest(kslots, hidden.index_select(0, sel), kcu)
        times["rollback"] = time.perf_counter() - t0
        if drafts is not None:
            self._note_round_time(time.perf_counter() - t_round, sum(lengths_l) + R)
        self.rounds += 1
        for p in ("draft", "schedule", "verify", "rollback"):
            self.time[p] += times[p]
            for rq in reqs:
                rq.stats.time[p] += times[p]

    def _emit(self, rq: _Request, toks: list[int]) -> bool:
        """Append tokens honouring stop tokens and max_new_tokens exactly; True if finished."""
        out, reason = [], None
        for t in toks:
            if len(rq.output) + len(out) >= rq.params.max_new_tokens:
                reason = "length"
                break
            out.append(t)
            if t in rq.stop:
                reason = "stop"
                break
        if reason is None and len(rq.output) + len(out) >= rq.params.max_new_tokens:
            reason = "length"
        rq.output.extend(out)
        rq.stats.emitted += len(out)
        if out and rq.on_tokens is not None:
            rq.on_tokens(rq.id, out)
        if reason is not None:
            self._close(rq, reason)
            return True
        return False


# ----------------------------------------------------------------------------- default drafter


@torch.no_grad()
def default_drafter(
    target: TargetModel,
    num_layers: int = 2,
    block_size: int = 7,
    markov_rank: int = 64,
    seed: int = 0,
    dtype: torch.dtype | None = None,
):
    """The package's default DSpark drafter for ``target``: **untrained**, random-initialised from a
    fixed seed (deterministic, independent of the global RNG), built in code. ``num_layers`` draft
    layers of the target's shape, ``block_size`` 7, a vanilla Markov head of rank ``markov_rank``
    and a confidence head; ``target_layer_ids`` the default (5 layers evenly spaced between 1 and
    N - 3); embedding and lm_head shared with the target (as trained drafters do); mask token: the
    last vocabulary id. Expect tau near 1 until a trained drafter is loaded (``--drafter DIR``)."""
    from .models.config import DrafterConfig, default_target_layer_ids

    tc = target.config
    n = tc.num_hidden_layers
    raw = tc.to_dict()
    arch = "Qwen3DSparkModel" if tc.qk_norm else "LlamaDSparkModel"
    raw.update(
        architectures=[arch],
        num_hidden_layers=num_layers,
        num_target_layers=n,
        block_size=block_size,
        target_layer_ids=default_target_layer_ids(n, min(5, n)) if n >= 5 else list(range(n)),
        mask_token_id=tc.vocab_size - 1,
        markov_rank=markov_rank,
        markov_head_type="vanilla",
        enable_confidence_head=True,
        confidence_head_with_markov=True,
        tie_word_embeddings=False,
    )
    cfg = DrafterConfig.from_dict(raw)
    dtype = dtype or target.dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        d = DSparkDrafter(cfg)
    d = d.to(device=target.device, dtype=dtype).eval()
    # shared with the target, or copies in the drafter's dtype: converting the drafter must never
    # convert the target's own embedding and head
    for mod, src in ((d.embed_tokens, target.embed_tokens.weight), (d.lm_head, target.lm_head.weight)):
        mod.weight = src if src.dtype == dtype else nn.Parameter(src.detach().to(dtype), requires_grad=False)
    d.shared_keys = ("embed_tokens.weight", "lm_head.weight")
    d.untrained = True
    return d


# ----------------------------------------------------------------------------- SPS profiling


def target_forward_fn(target: TargetModel, context: int = 128, max_tokens: int = 256):
    """``forward_fn(B)`` for :func:`dspark_native.scheduler.profile_sps`: one target forward over
    B new tokens of one request after ``context`` cached tokens (the cache is rolled back after
    each call)."""
    V = target.config.vocab_size
    cache = target.new_cache(1, context + max_tokens + 1)
    gen = torch.Generator().manual_seed(0)
    if context:
        target(
            torch.randint(0, V, (context,), generator=gen),
            torch.tensor([0, context]),
            torch.tensor([0]),
            cache,
            return_hidden=False,
        )
    ids = upload(torch.randint(0, V, (max_tokens,), generator=gen), target.device)

    def forward_fn(B: int):
        target(ids[:B], torch.tensor([0, B]), torch.tensor([0]), cache, return_hidden=False)
        cache.truncate([0], context)

    return forward_fn
