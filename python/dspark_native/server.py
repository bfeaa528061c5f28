"""An OpenAI-compatible HTTP server over one :class:`dspark_native.engine.Engine` (``dspark-native
serve``; docs/engine.md, "Serving").

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (chat template applied), both
with ``stream: true`` as server-sent events; ``GET /v1/models``, ``GET /health`` and ``GET /metrics``
(Prometheus text format).

Threads: one *engine loop* thread (:class:`EngineLoop`) is the only one that steps the engine;
request handlers run on the asyncio event loop and talk to it through the engine's thread-safe
``submit`` / ``abort``. Requests join and leave the running batch between rounds (continuous
batching). Tokens reach a handler through ``loop.call_soon_threadsafe`` into its asyncio queue, in
emission order, followed by one "done" event. A client that disconnects (streaming or not) has its
request aborted, which frees its slot at the next round.

Needs the ``serve`` extra (``starlette``, ``uvicorn``); this module imports them lazily in
:func:`create_app` and :class:`ServerThread` so that the rest of the package does not.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "APIError",
    "EngineLoop",
    "Metrics",
    "ServerConfig",
    "TextStream",
    "ServerThread",
    "create_app",
    "profile_sps_table",
]

MAX_STOP_STRINGS = 4
ROLES = ("system", "user", "assistant", "developer")


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Busy(APIError):
    def __init__(self, message: str):
        super().__init__(503, message, code="server_busy", type="server_error")


@dataclass
class ServerConfig:
    """model_name: the id clients pass as ``model``. default_max_tokens: used when a request gives
    none (capped by the context). max_queue: requests that may wait for a slot beyond those
    running (more are answered 503). max_body_bytes: largest request body (413 beyond)."""

    model_name: str = "dspark"
    default_max_tokens: int = 256
    max_queue: int = 256
    max_body_bytes: int = 8 << 20


# ------------------------------------------------------------------------------------------------
# Metrics (Prometheus text format, written here: no client library needed)
# ------------------------------------------------------------------------------------------------

TIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
COUNT_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class _Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, x: float) -> None:
        for i, b in enumerate(self.buckets):
            if x <= b:
                self.counts[i] += 1
        self.count += 1
        self.sum += x


class Metrics:
    """Server counters, all updated under one lock (the engine thread and the event loop both
    write). ``render()`` is the ``/metrics`` text; ``snapshot()`` the same numbers as a dict."""

    PHASES = ("prefill", "draft", "schedule", "verify", "rollback")

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}  # endpoint -> accepted requests
        self.finished: dict[str, int] = {}  # reason -> finished requests
        self.rejected: dict[int, int] = {}  # HTTP status -> rejected requests
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.rounds = 0  # engine rounds
        self.request_rounds = 0  # sum over rounds of the batch size
        self.verified_drafts = 0  # drafts sent to verification (sum of l_r)
        self.accepted_drafts = 0
        self.reached: list[int] = []  # per draft position k (see RequestStats)
        self.accepted: list[int] = []
        self.engine_time = {p: 0.0 for p in self.PHASES}
        self.busy_s = 0.0  # engine loop time inside step()
        self.round_budget = _Histogram(COUNT_BUCKETS)  # drafts verified per round
        self.round_batch = _Histogram(COUNT_BUCKETS)  # requests per round
        self.ttft = _Histogram(TIME_BUCKETS)
        self.e2e = _Histogram(TIME_BUCKETS)
        self.queue_length = 0
        self.active = 0
        self.max_batch = 0

    def rounds_from_log(self, log: list) -> None:
        """Account the engine's ``round_log`` entries (conf, lengths [R], accepted [R])."""
        with self.lock:
            for _conf, lengths, acc in log:
                ll, aa = lengths.tolist(), acc.tolist()
                self.rounds += 1
                self.request_rounds += len(ll)
                self.verified_drafts += sum(ll)
                self.accepted_drafts += sum(aa)
                self.round_budget.observe(sum(ll))
                self.round_batch.observe(len(ll))
                for length, a in zip(ll, aa, strict=True):
                    while len(self.reached) < length:
                        self.reached.append(0)
                        self.accepted.append(0)
                    for k in range(min(a + 1, length)):
                        self.reached[k] += 1
                        if k < a:
                            self.accepted[k] += 1

    def snapshot(self) -> dict:
        with self.lock:
            rr = self.request_rounds
            return dict(
                requests=dict(self.requests),
                finished=dict(self.finished),
                rejected=dict(self.rejected),
                prompt_tokens=self.prompt_tokens,
                generation_tokens=self.generation_tokens,
                rounds=self.rounds,
                request_rounds=rr,
                verified_drafts=self.verified_drafts,
                accepted_drafts=self.accepted_drafts,
                tau=self.generation_tokens / rr if rr else 0.0,
                verified_drafts_per_request_round=self.verified_drafts / rr if rr else 0.0,
                verified_drafts_per_round=self.verified_drafts / self.rounds if self.rounds else 0.0,
                acceptance=[a / n if n else float("nan") for a, n in zip(self.accepted, self.reached, strict=True)],
                reached=list(self.reached),
                accepted=list(self.accepted),
                engine_time=dict(self.engine_time),
                busy_s=self.busy_s,
                queue_length=self.queue_length,
                active=self.active,
                max_batch=self.max_batch,
                ttft_count=self.ttft.count,
                ttft_sum=self.ttft.sum,
            )

    def render(self) -> str:
        out: list[str] = []

        def metric(name, kind, help_, samples):
            out.append(f"# HELP dspark_{name} {help_}")
            out.append(f"# TYPE dspark_{name} {kind}")
            for labels, v in samples:
                lab = "{" + ",".join(f'{k}="{val}"' for k, val in labels) + "}" if labels else ""
                out.append(f"dspark_{name}{lab} {_num(v)}")

        def hist(name, help_, h: _Histogram):
            out.append(f"# HELP dspark_{name} {help_}")
            out.append(f"# TYPE dspark_{name} histogram")
            for b, c in zip(h.buckets, h.counts, strict=True):
                out.append(f'dspark_{name}_bucket{{le="{_num(b)}"}} {c}')
            out.append(f'dspark_{name}_bucket{{le="+Inf"}} {h.count}')
            out.append(f"dspark_{name}_sum {_num(h.sum)}")
            out.append(f"dspark_{name}_count {h.count}")

        with self.lock:
            rr = self.request_rounds
            metric(
                "requests_total",
                "counter",
                "Requests accepted into the engine, by endpoint.",
                [((("endpoint", k),), v) for k, v in sorted(self.requests.items())],
            )
            metric(
                "requests_finished_total",
                "counter",
                "Finished requests by reason (stop, length, aborted = client disconnect, error).",
                [((("reason", k),), v) for k, v in sorted(self.finished.items())],
            )
            metric(
                "requests_rejected_total",
                "counter",
                "Requests answered with an HTTP error, by status.",
                [((("status", str(k)),), v) for k, v in sorted(self.rejected.items())],
            )
            metric("prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", [((), self.prompt_tokens)])
            metric(
                "generation_tokens_total", "counter", "Tokens emitted by the engine.", [((), self.generation_tokens)]
            )
            metric(
                "rounds_total", "counter", "Engine rounds (one batched draft-verify step each).", [((), self.rounds)]
            )
            metric("request_rounds_total", "counter", "Sum over rounds of the requests in the round.", [((), rr)])
            metric(
                "verified_drafts_total",
                "counter",
                "Drafts sent to verification (the verification budget used).",
                [((), self.verified_drafts)],
            )
            metric("accepted_drafts_total", "counter", "Drafts accepted by verification.", [((), self.accepted_drafts)])
            metric(
                "tau",
                "gauge",
                "Tokens emitted per request per round (generation_tokens / request_rounds).",
                [((), self.generation_tokens / rr if rr else 0.0)],
            )
            metric(
                "verified_drafts_per_request_round",
                "gauge",
                "Mean drafts verified per request per round (the per-request verification budget).",
                [((), self.verified_drafts / rr if rr else 0.0)],
            )
            metric(
                "position_reached_total",
                "counter",
                "Rounds in which draft position k was verified with all earlier drafts accepted.",
                [((("position", str(k)),), v) for k, v in enumerate(self.reached)],
            )
            metric(
                "position_accepted_total",
                "counter",
                "Rounds in which draft position k was accepted.",
                [((("position", str(k)),), v) for k, v in enumerate(self.accepted)],
            )
            metric(
                "acceptance",
                "gauge",
                "Conditional acceptance per draft position (accepted / reached).",
                [
                    ((("position", str(k)),), a / n)
                    for k, (a, n) in enumerate(zip(self.accepted, self.reached, strict=True))
                    if n
                ],
            )
            hist("round_verified_drafts", "Drafts verified per round (all requests of the round).", self.round_budget)
            hist("round_batch_size", "Requests per round.", self.round_batch)
            metric("queue_length", "gauge", "Requests waiting for a slot.", [((), self.queue_length)])
            metric("active_requests", "gauge", "Requests holding a slot.", [((), self.active)])
            metric("max_batch", "gauge", "Slots (concurrent requests in the batch).", [((), self.max_batch)])
            metric(
                "engine_seconds_total",
                "counter",
                "Engine wall time by phase.",
                [((("phase", p),), self.engine_time[p]) for p in self.PHASES],
            )
            metric("engine_busy_seconds_total", "counter", "Engine loop time spent stepping.", [((), self.busy_s)])
            hist("time_to_first_token_seconds", "Submission to first token.", self.ttft)
            hist("request_duration_seconds", "Submission to finish.", self.e2e)
        return "\n".join(out) + "\n"


def _num(v) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    return repr(float(v))


# ------------------------------------------------------------------------------------------------
# The engine loop thread
# ------------------------------------------------------------------------------------------------


class _Record:
    __slots__ = ("t_submit", "first", "on_tokens", "on_done", "reason", "error")

    def __init__(self, on_tokens, on_done):
        self.t_submit = time.perf_counter()
        self.first = True
        self.on_tokens, self.on_done = on_tokens, on_done
        self.reason: str | None = None  # finish reason to count when the server aborted it
        self.error: str | None = None


class EngineLoop:
    """The one thread that steps ``engine``. ``submit`` / ``abort`` may be called from any thread.

    submit(prompt_ids, params, on_tokens, on_done, endpoint) -> request id: ``on_tokens(tokens)``
    is called with each batch of new tokens and then ``on_done(RequestOutput)`` once, both from the
    engine thread (keep them short: hand off to your own loop). Raises ValueError for bad input
    (from ``Engine.submit``) and :class:`Busy` when ``max_pending`` requests are already in the
    engine or the loop is stopped.
    """

    def __init__(self, engine, metrics: Metrics | None = None, *, max_pending: int = 1024, idle_wait_s: float = 0.05):
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.metrics.max_batch = engine.max_batch
        self.max_pending = max_pending
        self.idle_wait_s = idle_wait_s
        self._lock = threading.Lock()
        self._records: dict[int, _Record] = {}
        self._stop = threading.Event()
        self._closed = False
        self.error: BaseException | None = None  # an engine exception (requests failed, loop goes on)
        engine.round_log = []
        self.thread = threading.Thread(target=self._run, name="dspark-engine-loop", daemon=True)

    # -- any thread --------------------------------------------------------------------------
    def start(self) -> EngineLoop:
        self.thread.start()
        return self

    @property
    def pending(self) -> int:
        """Requests submitted and not finished (queued + active)."""
        return len(self._records)

    def alive(self) -> bool:
        return self.thread.is_alive() and not self._closed

    def submit(
        self,
        prompt_ids,
        params,
        on_tokens: Callable[[list[int]], None],
        on_done: Callable[[object], None],
        endpoint: str = "completions",
    ) -> int:
        rec = _Record(on_tokens, on_done)
        m = self.metrics

        def tokens(_rid, toks, rec=rec):
            now = time.perf_counter()
            with m.lock:
                m.generation_tokens += len(toks)
                if rec.first:
                    m.ttft.observe(now - rec.t_submit)
            rec.first = False
            try:
                rec.on_tokens(toks)
            except Exception:  # a handler's problem must not break the round for the others
                pass

        with self._lock:
            if self._closed:
                raise Busy("the server is shutting down")
            if len(self._records) >= self.max_pending:
                raise Busy(f"{len(self._records)} requests are already queued or running; retry later")
            rid = self.engine.submit(prompt_ids, params, on_tokens=tokens)
            self._records[rid] = rec
        with m.lock:
            m.requests[endpoint] = m.requests.get(endpoint, 0) + 1
            m.prompt_tokens += len(prompt_ids)
            m.queue_length = len(self._records) - m.active
        return rid

    def abort(self, rid: int, reason: str = "aborted") -> None:
        """Abort a request at the next round; ``reason`` is what the metrics count it as (a stop
        string found by the server is "stop", a client disconnect "aborted")."""
        with self._lock:
            rec = self._records.get(rid)
            if rec is None:
                return
            if rec.reason is None:
                rec.reason = reason
        self.engine.abort(rid)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop stepping; requests still in the engine finish with "aborted" (their on_done is
        called with error "the server is shutting down")."""
        with self._lock:
            self._closed = True
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout)

    # -- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        while not self._stop.is_set():
            if not eng.wait_for_work(self.idle_wait_s):
                continue
            t0 = time.perf_counter()
            try:
                finished = eng.step()
            except Exception as exc:  # fail the requests in the engine, keep serving
                self.error = exc
                print(f"dspark-native serve: engine error: {type(exc).__name__}: {exc}", file=sys.stderr)
                finished = self._fail_all(f"engine error: {type(exc).__name__}: {exc}")
            try:
                self._account(time.perf_counter() - t0, finished)
            except Exception as exc:  # never leave handlers waiting on a dead loop
                self.error = exc
                print(f"dspark-native serve: bookkeeping error: {type(exc).__name__}: {exc}", file=sys.stderr)
        # shutting down: abort everything submitted; the step only drains (nothing is left to run)
        with self._lock:
            rids = list(self._records)
            for rid in rids:
                if self._records[rid].reason is None:
                    self._records[rid].reason = "shutdown"
        for rid in rids:
            eng.abort(rid)
        self._account(0.0, eng.step())

    def _fail_all(self, error: str) -> list:
        """After an exception inside ``step()``: finish every request the engine holds (those
        still in its inbox were not part of the failed round and run normally)."""
        eng = self.engine
        with self._lock:
            recs = dict(self._records)
        outs = []
        for rid, rec in recs.items():
            if rid not in eng.requests:
                continue
            out = eng.output(rid)
            if not out.finished:
                rec.reason, rec.error = "error", error
                out = eng.finish(rid)
            outs.append(out)
        return outs

    def _account(self, busy_s: float, finished: list) -> None:
        eng, m = self.engine, self.metrics
        log, eng.round_log = eng.round_log, []
        m.rounds_from_log(log)
        done = []
        with self._lock:
            for out in finished:
                rec = self._records.pop(out.request_id, None)
                if rec is not None:
                    done.append((rec, out))
            n_pending = len(self._records)
        now = time.perf_counter()
        with m.lock:
            m.busy_s += busy_s
            m.engine_time = {p: float(eng.time.get(p, 0.0)) for p in m.PHASES}
            m.active = len(eng.active)
            m.queue_length = max(0, n_pending - m.active)
            for rec, out in done:
                # what the client saw: a stop string the server found is "stop" even when the engine
                # ended the request in the same round; a server-side abort is counted by its cause
                reason = (
                    rec.reason
                    if rec.reason == "stop" or (rec.reason and out.finish_reason == "aborted")
                    else out.finish_reason
                )
                m.finished[reason] = m.finished.get(reason, 0) + 1
                m.e2e.observe(now - rec.t_submit)
        eng.release()
        for rec, out in done:
            if rec.error is not None and out.finish_reason == "aborted":
                out.finish_reason, out.error = "error", rec.error
            elif rec.reason == "shutdown" and out.finish_reason == "aborted":
                out.error = "the server is shutting down"
            try:
                rec.on_done(out)
            except Exception:
                pass


# ------------------------------------------------------------------------------------------------
# Text: incremental detokenization and stop strings
# ------------------------------------------------------------------------------------------------


class TextStream:
    """Turns token batches into text deltas, cut at the first stop string (excluded, as in the
    OpenAI API). ``decode(ids) -> str`` decodes a token list (special tokens dropped).

    Decoding is incremental over a window (the previous batch is re-decoded with the new one, so
    tokenizers whose decoding depends on the neighbour, e.g. a leading-space marker, stay right);
    text ending in U+FFFD (an incomplete UTF-8 sequence) is held until the next token completes it;
    text that could be the beginning of a stop string is held until it cannot. The concatenated
    deltas equal ``decode(all ids)`` cut at the stop string.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str] = ()):
        self.decode = decode
        self.stops = [s for s in stops if s]
        self.max_stop = max((len(s) for s in self.stops), default=0)
        self.ids: list[int] = []
        self._prefix = self._read = 0
        self.text = ""  # decoded so far
        self.sent = 0  # characters of text already returned
        self.stopped = False  # a stop string was found; nothing more is returned
        self.tokens_at_stop: int | None = None

    def add(self, tokens: Sequence[int]) -> str:
        if self.stopped:
            return ""
        self.ids.extend(int(t) for t in tokens)
        self._advance(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text (held characters included) once the engine has finished."""
        if self.stopped:
            return ""
        self._advance(final=True)
        return self._release(final=True)

    def _advance(self, final: bool) -> None:
        if self._read == len(self.ids):
            return
        before = self.decode(self.ids[self._prefix : self._read])
        now = self.decode(self.ids[self._prefix :])
        if now.startswith(before):
            new = now[len(before) :]
        else:  # the window's start decodes differently now: decode everything, keep what agrees
            full = self.decode(self.ids)
            new = full[len(self.text) :] if full.startswith(self.text) else ""
        if new.endswith("\ufffd") and not final:
            return  # an incomplete UTF-8 sequence: wait for the token that completes it
        self.text += new
        self._prefix, self._read = self._read, len(self.ids)

    def _release(self, final: bool) -> str:
        t = self.text
        if self.stops:
            hits = [i for i in (t.find(s, self.sent) for s in self.stops) if i >= 0]
            if hits:
                cut = min(hits)
                out = t[self.sent : cut]
                self.text, self.sent, self.stopped = t[:cut], cut, True
                self.tokens_at_stop = len(self.ids)
                return out
        end = len(t)
        if not final and self.stops:
            hold = 0
            for k in range(min(self.max_stop - 1, len(t) - self.sent), 0, -1):
                if any(s.startswith(t[-k:]) for s in self.stops):
                    hold = k
                    break
            end -= hold
        out = t[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out


# ------------------------------------------------------------------------------------------------
# Request parsing
# ------------------------------------------------------------------------------------------------


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(float(x))


def _unsupported(body: dict, allowed_default: dict[str, tuple]) -> None:
    for name, ok in allowed_default.items():
        if name in body and body[name] not in ok:
            raise APIError(
                400,
                f"'{name}' = {body[name]!r} is not supported by this server",
                param=name,
                code="unsupported_parameter",
            )


def parse_sampling(
    body: dict, prompt_len: int, max_seq: int, vocab_stop_ids: Sequence[int], cfg: ServerConfig, chat: bool
):
    """(SamplingParams, stop strings, max_tokens) of an OpenAI request body; APIError(400) names
    the bad field."""
    from .engine import SamplingParams

    _unsupported(
        body,
        {
            "n": (None, 1),
            "presence_penalty": (None, 0, 0.0),
            "frequency_penalty": (None, 0, 0.0),
            "logit_bias": (None, {}),
            "logprobs": (None, False, 0),
            "top_logprobs": (None, 0),
            "echo": (None, False),
            "best_of": (None, 1),
            "suffix": (None, ""),
            "tools": (None, []),
            "functions": (None, []),
            "response_format": (None, {"type": "text"}),
        },
    )
    if prompt_len >= max_seq:
        raise APIError(
            400,
            f"the prompt has {prompt_len} tokens; this model's context is {max_seq} tokens "
            f"(prompt + completion), so at most {max_seq - 1} prompt tokens fit",
            param="messages" if chat else "prompt",
            code="context_length_exceeded",
        )
    room = max_seq - prompt_len
    name = "max_tokens"
    mt = body.get("max_tokens")
    if chat and body.get("max_completion_tokens") is not None:
        name, mt = "max_completion_tokens", body["max_completion_tokens"]
    if mt is None:
        mt = min(cfg.default_max_tokens, room)
    elif not _is_int(mt) or mt < 1:
        raise APIError(400, f"'{name}' must be an integer >= 1, got {mt!r}", param=name)
    elif mt > room:
        raise APIError(
            400,
            f"this model's context is {max_seq} tokens; the prompt has {prompt_len} and "
            f"'{name}' = {mt} asks for {mt} more (at most {room} fit)",
            param=name,
            code="context_length_exceeded",
        )
    temp = body.get("temperature")
    temp = 1.0 if temp is None else temp
    if not _is_num(temp) or not 0 <= temp <= 2:
        raise APIError(400, f"'temperature' must be a number in [0, 2] (0 = greedy), got {temp!r}", param="temperature")
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else top_p
    if not _is_num(top_p) or not 0 < top_p <= 1:
        raise APIError(400, f"'top_p' must be a number in (0, 1], got {top_p!r}", param="top_p")
    top_k = body.get("top_k")
    top_k = 0 if top_k is None or top_k == -1 else top_k
    if not _is_int(top_k) or top_k < 0:
        raise APIError(400, f"'top_k' must be an integer >= 0 (0 or -1 = off), got {top_k!r}", param="top_k")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(62)
    elif not _is_int(seed) or not 0 <= seed < 2**63:
        raise APIError(400, f"'seed' must be an integer in [0, 2^63), got {seed!r}", param="seed")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise APIError(400, "'stop' must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise APIError(400, f"'stop' takes at most {MAX_STOP_STRINGS} non-empty strings", param="stop")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise APIError(400, f"'stream' must be a boolean, got {stream!r}", param="stream")
    so = body.get("stream_options")
    if so is not None and (not isinstance(so, dict) or not isinstance(so.get("include_usage", False), bool)):
        raise APIError(400, "'stream_options' must be an object like {\"include_usage\": true}", param="stream_options")
    params = SamplingParams(
        max_new_tokens=int(mt),
        temperature=float(temp),
        top_k=int(top_k),
        top_p=float(top_p),
        seed=int(seed),
        stop_token_ids=list(vocab_stop_ids),
    )
    return params, stops, int(mt)


def _message_text(m, i: int) -> str:
    content = m.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(
                    400,
                    f'messages[{i}].content: only text parts ({{"type": "text", "text": ...}}) are supported',
                    param=f"messages[{i}].content",
                )
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(
        400, f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content"
    )


def parse_messages(body: dict) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, '\'messages\' must be a non-empty list of {"role", "content"} objects', param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}]: 'role' must be one of {', '.join(ROLES)}", param=f"messages[{i}].role")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _message_text(m, i)})
    return out


# ------------------------------------------------------------------------------------------------
# The application
# ------------------------------------------------------------------------------------------------


class _State:
    def __init__(self, target, engine, cfg: ServerConfig, info: dict):
        self.target, self.engine, self.cfg, self.info = target, engine, cfg, info
        self.metrics = Metrics()
        self.loop = EngineLoop(engine, self.metrics, max_pending=engine.max_batch + cfg.max_queue)
        self.created = int(time.time())

    def reject(self, status: int) -> None:
        with self.metrics.lock:
            self.metrics.rejected[status] = self.metrics.rejected.get(status, 0) + 1


class _Generation:
    """One request's tokens, from the engine thread into this event loop, as text deltas."""

    def __init__(self, st: _State, prompt_ids, params, stops, endpoint):
        self.st = st
        self.aloop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.text = TextStream(st.target.decode, stops)
        self.prompt_tokens = len(prompt_ids)
        self.done = False
        self.finish_reason: str | None = None
        self.rid = st.loop.submit(prompt_ids, params, self._put_tokens, self._put_done, endpoint)

    def _put(self, item) -> None:
        try:
            self.aloop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed (shutdown): nobody is listening
            pass

    def _put_tokens(self, toks) -> None:
        self._put(("tokens", list(toks)))

    def _put_done(self, out) -> None:
        self._put(("done", out))

    @property
    def completion_tokens(self) -> int:
        return self.text.tokens_at_stop if self.text.tokens_at_stop is not None else len(self.text.ids)

    async def deltas(self):
        """Async iterator of text deltas; sets finish_reason ("stop" | "length") at the end.
        Raises APIError if the engine failed the request."""
        while True:
            kind, x = await self.queue.get()
            if kind == "tokens":
                d = self.text.add(x)
                if d:
                    yield d
                if self.text.stopped:
                    self.done, self.finish_reason = True, "stop"
                    self.st.loop.abort(self.rid, reason="stop")
                    return
                continue
            self.done = True
            if x.finish_reason == "error":
                raise APIError(500, f"generation failed: {x.error}", code="engine_error")
            if x.finish_reason == "aborted":
                raise APIError(503, f"the request was aborted ({x.error or 'server side'})", code="aborted")
            d = self.text.finish()
            if d:
                yield d
            self.finish_reason = "stop" if x.finish_reason == "stop" else "length"  # "context" -> length
            return

    def close(self) -> None:
        """Abort the request unless it has finished (client gone, handler cancelled)."""
        if not self.done:
            self.done = True
            self.st.loop.abort(self.rid, reason="aborted")

    def usage(self) -> dict:
        c = self.completion_tokens
        return dict(prompt_tokens=self.prompt_tokens, completion_tokens=c, total_tokens=self.prompt_tokens + c)


def create_app(target, engine, config: ServerConfig | None = None, info: dict | None = None):
    """The Starlette application serving ``engine`` (an Engine over ``target.model``).

    target: :class:`dspark_native.runtime.ChatTarget` (tokenizer, chat template, eos ids).
    config: :class:`ServerConfig`. info: extra fields for ``/v1/models`` (drafter, policy, ...).
    The engine loop thread starts with the application (ASGI lifespan) and stops with it;
    ``app.state.dspark`` holds the state (``.loop`` the EngineLoop, ``.metrics``).
    """
    import contextlib

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    cfg = config or ServerConfig()
    st = _State(target, engine, cfg, dict(info or {}))

    def error_response(e: APIError):
        st.reject(e.status)
        return JSONResponse(e.body(), status_code=e.status)

    async def read_json(request: Request) -> dict:
        size = 0
        chunks = []
        async for chunk in request.stream():
            size += len(chunk)
            if size > cfg.max_body_bytes:
                raise APIError(413, f"request body larger than {cfg.max_body_bytes} bytes", code="body_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks) or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the body is not valid JSON ({exc})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
        return body

    def check_model(body: dict) -> None:
        m = body.get("model")
        if m is not None and m != cfg.model_name:
            raise APIError(
                404,
                f"the model '{m}' does not exist; this server serves '{cfg.model_name}'",
                param="model",
                code="model_not_found",
            )

    def encode_completion_prompt(body: dict) -> list[int]:
        p = body.get("prompt")
        V = target.model.config.vocab_size
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, str):
            if not p:
                raise APIError(400, "'prompt' is empty", param="prompt")
            return list(target.tokenizer.encode(p).ids)
        if isinstance(p, list) and p and all(_is_int(t) for t in p):
            if min(p) < 0 or max(p) >= V:
                raise APIError(400, f"'prompt' token ids must be in [0, {V})", param="prompt")
            return list(p)
        if isinstance(p, list) and len(p) > 1:
            raise APIError(400, "one prompt per request is supported", param="prompt")
        raise APIError(400, "'prompt' must be a non-empty string or list of token ids", param="prompt")

    def encode_chat(body: dict) -> list[int]:
        msgs = parse_messages(body)
        if target.chat_template is None:
            raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
        try:
            return list(target.chat_template.encode(target.tokenizer, msgs))
        except Exception as exc:  # jinja2 errors and the template's raise_exception (ValueError)
            raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from None

    async def generation(request: Request, chat: bool):
        try:
            body = await read_json(request)
            check_model(body)
            ids = encode_chat(body) if chat else encode_completion_prompt(body)
            params, stops, _ = parse_sampling(body, len(ids), engine.max_seq, target.eos_token_ids, cfg, chat)
            try:
                gen = _Generation(st, ids, params, stops, "chat" if chat else "completions")
            except APIError:
                raise
            except ValueError as exc:
                raise APIError(400, str(exc), param="messages" if chat else "prompt") from None
        except APIError as e:
            return error_response(e)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        so = body.get("stream_options") or {}
        if body.get("stream"):
            return _SSE(
                _events(gen, rid, created, chat, bool(so.get("include_usage"))),
                gen,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _collect(request, gen, rid, created, chat)

    def chunk(rid, created, chat, delta=None, finish=None, usage=None, role=False):
        if chat:
            d = {} if delta is None else {"content": delta}
            if role:
                d = {"role": "assistant", "content": ""}
            choices = [dict(index=0, delta=d, logprobs=None, finish_reason=finish)]
            obj = "chat.completion.chunk"
        else:
            choices = [dict(index=0, text=delta or "", logprobs=None, finish_reason=finish)]
            obj = "text_completion"
        out = dict(id=rid, object=obj, created=created, model=cfg.model_name, choices=choices)
        if usage is not None:
            out["choices"], out["usage"] = [], usage
        return "data: " + json.dumps(out, ensure_ascii=False) + "\n\n"

    async def _events(gen: _Generation, rid, created, chat, include_usage):
        try:
            if chat:
                yield chunk(rid, created, chat, role=True)
            try:
                async for d in gen.deltas():
                    yield chunk(rid, created, chat, delta=d)
            except APIError as e:
                st.reject(e.status)
                yield "data: " + json.dumps(e.body()) + "\n\n"
                yield "data: [DONE]\n\n"
                return
            yield chunk(rid, created, chat, finish=gen.finish_reason)
            if include_usage:
                yield chunk(rid, created, chat, usage=gen.usage())
            yield "data: [DONE]\n\n"
        finally:
            gen.close()

    class _SSE(StreamingResponse):
        """A streaming response that always listens for the client's disconnect while it streams
        (whatever the ASGI spec version) and aborts the request when the client goes away."""

        def __init__(self, content, gen: _Generation, **kw):
            super().__init__(content, **kw)
            self.gen = gen

        async def __call__(self, scope, receive, send):
            import anyio

            try:
                async with anyio.create_task_group() as tg:

                    async def stream():
                        try:
                            await self.stream_response(send)
                        except OSError:  # the connection broke while sending
                            pass
                        tg.cancel_scope.cancel()

                    tg.start_soon(stream)
                    await self.listen_for_disconnect(receive)
                    tg.cancel_scope.cancel()
            finally:
                self.gen.close()
                with contextlib.suppress(Exception):
                    await self.body_iterator.aclose()

    async def _collect(request: Request, gen: _Generation, rid, created, chat):
        import anyio

        parts: list[str] = []
        failure: list[APIError] = []
        gone = [False]
        try:
            async with anyio.create_task_group() as tg:

                async def watch():
                    while True:
                        msg = await request.receive()
                        if msg["type"] == "http.disconnect":
                            gone[0] = True
                            tg.cancel_scope.cancel()
                            return

                tg.start_soon(watch)
                try:
                    async for d in gen.deltas():
                        parts.append(d)
                except APIError as e:
                    failure.append(e)
                tg.cancel_scope.cancel()
        finally:
            gen.close()
        if failure:
            return error_response(failure[0])
        if gone[0]:
            return Response(status_code=499)  # nobody reads it
        text = "".join(parts)
        if chat:
            choice = dict(
                index=0, message=dict(role="assistant", content=text), logprobs=None, finish_reason=gen.finish_reason
            )
            obj = "chat.completion"
        else:
            choice = dict(index=0, text=text, logprobs=None, finish_reason=gen.finish_reason)
            obj = "text_completion"
        return JSONResponse(
            dict(id=rid, object=obj, created=created, model=cfg.model_name, choices=[choice], usage=gen.usage())
        )

    async def completions(request):
        return await generation(request, chat=False)

    async def chat_completions(request):
        return await generation(request, chat=True)

    def model_card():
        return dict(
            id=cfg.model_name,
            object="model",
            created=st.created,
            owned_by="dspark-native",
            max_model_len=engine.max_seq,
            **st.info,
        )

    async def models(request):
        return JSONResponse(dict(object="list", data=[model_card()]))

    async def model_one(request):
        if request.path_params["model"] != cfg.model_name:
            return error_response(
                APIError(
                    404,
                    f"the model '{request.path_params['model']}' does not exist",
                    param="model",
                    code="model_not_found",
                )
            )
        return JSONResponse(model_card())

    async def health(request):
        m = st.metrics
        ok = st.loop.alive()
        return JSONResponse(
            dict(
                status="ok" if ok else "unavailable",
                active=m.active,
                queued=m.queue_length,
                pending=st.loop.pending,
                max_batch=engine.max_batch,
            ),
            status_code=200 if ok else 503,
        )

    async def metrics(request):
        return Response(st.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def http_error(request, exc: HTTPException):
        msg = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on {request.url.path}"}
        return error_response(APIError(exc.status_code, msg.get(exc.status_code, str(exc.detail))))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        st.loop.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, st.loop.stop)

    def guarded(handler):
        """A bug in a handler is answered as a JSON 500 (and logged); the server goes on. (Starlette's
        own last-resort handler re-raises after answering, and the connection is reset.)"""

        async def run(request):
            try:
                return await handler(request)
            except Exception as exc:
                print(
                    f"dspark-native serve: {request.method} {request.url.path}: {type(exc).__name__}: {exc}",
                    file=sys.stderr,
                )
                return error_response(
                    APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")
                )

        return run

    routes = [
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/v1/models/{model:path}", guarded(model_one), methods=["GET"]),
        Route("/health", guarded(health), methods=["GET"]),
        Route("/metrics", guarded(metrics), methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.dspark = st
    return app


# ------------------------------------------------------------------------------------------------
# Running it
# ------------------------------------------------------------------------------------------------


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket (port 0: a free one, read it back with ``getsockname()``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto given explicitly: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto is
    # IPPROTO_TCP, and accepted sockets inherit it; with proto 0 every small SSE chunk and response
    # waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class ServerThread:
    """Runs an app with uvicorn in a background thread on a loopback socket: for tests and the
    benchmark. ``with ServerThread(app) as srv: httpx.get(srv.url + "/health")``; leaving the block
    shuts uvicorn down (open connections get ``graceful_s`` seconds) and, through the lifespan,
    the engine loop."""

    def __init__(
        self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", graceful_s: float = 5.0
    ):
        import uvicorn

        self.sock = bind_socket(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        config = uvicorn.Config(
            app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=graceful_s, access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs=dict(sockets=[self.sock]), name="dspark-uvicorn", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> ServerThread:
        self.thread.start()
        t_end = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > t_end:
                self.stop()
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def profile_sps_table(target_model, max_tokens: int, *, context: int = 128, repeats: int = 2):
    """An SPSTable for the causal/async policies, profiled on ``target_model`` now (one forward over
    B = 1, 2, 4, ... max_tokens new tokens after ``context`` cached ones; median of ``repeats``)."""
    from .runtime import profile_sps_table as profile

    pts = {1, 2, 4, 8, 16, 32, 64, 128, 256, max_tokens}
    return profile(target_model, max_tokens, points=pts, context=context, repeats=repeats, model="serve")


def format_startup(target, drafter_name: str, engine, policy: str, url: str) -> tuple[str, ...]:
    """The start-up lines of ``dspark-native serve``."""
    spec = "" if engine.kind == "plain" else f" ({engine.kind}, {engine.gamma} drafts/round, policy {policy})"
    return (
        f"target: {target.name}; drafter: {drafter_name}{spec}; max batch {engine.max_batch}, context {engine.max_seq}",
        f"serving the OpenAI API on {url}/v1 (health: {url}/health, metrics: {url}/metrics)",
    )
