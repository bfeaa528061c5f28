"""`dspark-native serve` (dspark_native.server) through a real HTTP client against a server started
here on a free loopback port: completions and chat, streaming equal to the non-streamed result,
greedy output identical to `dspark-native generate`, stop strings, bad requests answered 4xx with
a message (server still healthy), an engine fault and a full queue, 32 concurrent streaming clients
with disconnects (every finished response identical to its solo greedy output, no slot leaked,
/metrics consistent). Every loop is bounded in count and time; every server is shut down.

Most tests use a tiny random target (word-level tokenizer, aligned drafter: long accepted blocks);
the SmolLM2 ones use the embedded model with its shipped drafter (chat template, real tokenizer)."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import pytest
import torch

from test_engine_helpers import tiny_drafter, tiny_target

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from dspark_native import runtime, server  # noqa: E402
from dspark_native.engine import Engine, SamplingParams  # noqa: E402

V = 64
WORDS = ["[UNK]"] + [f"w{i}" for i in range(V - 1)]
TIMEOUT = httpx.Timeout(60.0)
DEADLINE_S = 120.0


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: threads only add contention on shared CI cores
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    t = tiny_target(V)
    # eos: one token, so that some answers stop early ("stop") and others run to max_tokens
    return runtime.ChatTarget(t, tok, None, [WORDS.index("w7")], "tiny")


@pytest.fixture(scope="module")
def long_prompts(tiny):
    """Prompts whose greedy answer runs 88 tokens without the eos token (for clients that go away)."""
    for p in tiny_prompts(40, seed=21):
        if solo_greedy(tiny, p, 88)[1] == "length":
            return [p] * 8  # deterministic (seeded models and prompts); one is enough, repeated
    raise AssertionError("no prompt runs 88 tokens without eos")


def tiny_server(
    tiny, *, max_batch=8, max_seq=96, policy="causal", plain=False, step_delay_s=0.0, graceful_s=5.0, **cfg
):
    if plain:
        eng = Engine(tiny.model, None, max_batch=max_batch, max_seq=max_seq)
    else:
        eng = Engine(
            tiny.model,
            tiny_drafter(tiny.model, "dspark", block_size=5),
            policy=policy,
            max_batch=max_batch,
            max_seq=max_seq,
        )
    if step_delay_s:  # a slower engine, so that a disconnect is seen long before the request could end
        step = eng.step

        def slow_step():
            time.sleep(step_delay_s)
            return step()

        eng.step = slow_step
    app = server.create_app(tiny, eng, server.ServerConfig(model_name="tiny", **cfg), dict(policy=policy))
    return server.ServerThread(app, graceful_s=graceful_s)


def tiny_prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        " ".join(
            WORDS[1 + int(t)]
            for t in torch.randint(0, V - 1, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g)
        )
        for _ in range(n)
    ]


def solo_greedy(target, text, max_tokens, chat=False):
    """The reference: plain greedy decoding of one prompt alone (the speculative server must match)."""
    ids = target.encode(text) if chat else list(target.tokenizer.encode(text).ids)
    eng = Engine(target.model, None, max_batch=1, max_seq=len(ids) + max_tokens + 1)
    out = eng.generate([ids], SamplingParams(max_new_tokens=max_tokens, stop_token_ids=target.eos_token_ids))[0]
    return out.token_ids, out.finish_reason


def sse_events(lines):
    """Parsed `data:` payloads of an SSE body, [DONE] last."""
    out = []
    for ln in lines:
        if ln.startswith("data: "):
            d = ln[len("data: ") :]
            out.append(d if d == "[DONE]" else json.loads(d))
    return out


def stream_text(events, chat):
    assert events and events[-1] == "[DONE]", events[-3:]
    body = [e for e in events[:-1] if e.get("choices")]
    key = (lambda c: c["delta"].get("content", "")) if chat else (lambda c: c["text"])
    finish = [c["finish_reason"] for e in body for c in e["choices"] if c["finish_reason"] is not None]
    assert len(finish) == 1 and body[-1]["choices"][0]["finish_reason"] == finish[0]  # the last chunk, once
    return "".join(key(c) for e in body for c in e["choices"]), finish[0]


def post_stream(client, url, body):
    with client.stream("POST", url, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r.iter_lines())


def metrics(client):
    """/metrics parsed: {name: {labels-string: value}} (histogram series included)."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for ln in r.text.splitlines():
        if not ln or ln.startswith("#"):
            continue
        m = re.fullmatch(r"(\w+)(\{[^}]*\})? (\S+)", ln)
        assert m, ln
        out.setdefault(m.group(1), {})[m.group(2) or ""] = float(m.group(3))
    return out


def wait_idle(client, timeout=30.0):
    t_end = time.monotonic() + timeout
    while True:
        h = client.get("/health").json()
        if h["active"] == 0 and h["queued"] == 0 and h["pending"] == 0:
            return h
        assert time.monotonic() < t_end, h
        time.sleep(0.02)


def assert_no_leak(srv):
    st = srv.server.config.app.state.dspark
    eng = st.engine
    assert st.loop.pending == 0
    assert not eng.has_unfinished() and not eng.active and not eng.waiting
    assert sorted(eng.free_slots) == list(range(eng.max_batch)) and int(eng.cache.lengths.sum()) == 0
    assert not eng.requests  # released


# ------------------------------------------------------------------------------------------------
# tiny target: protocol, streaming, faults, load
# ------------------------------------------------------------------------------------------------


def test_completions_stream_equals_nonstream_and_solo_greedy(tiny):
    prompts = tiny_prompts(6, seed=1)
    with tiny_server(tiny) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        assert c.get("/health").json()["status"] == "ok"
        models = c.get("/v1/models").json()
        assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
        assert models["data"][0]["max_model_len"] == 96
        reasons = set()
        for i, p in enumerate(prompts):
            mt = 10 + 7 * i
            want_ids, want_reason = solo_greedy(tiny, p, mt)
            want = tiny.decode(want_ids)
            body = dict(model="tiny", prompt=p, max_tokens=mt, temperature=0)
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            js = r.json()
            assert js["object"] == "text_completion" and js["model"] == "tiny"
            ch = js["choices"][0]
            assert ch["text"] == want and ch["finish_reason"] == want_reason
            assert js["usage"] == dict(
                prompt_tokens=len(p.split()),
                completion_tokens=len(want_ids),
                total_tokens=len(p.split()) + len(want_ids),
            )
            ev = post_stream(c, "/v1/completions", dict(body, stream=True, stream_options={"include_usage": True}))
            assert ev[-2]["usage"] == js["usage"] and ev[-2]["choices"] == []
            text, reason = stream_text(ev[:-2] + ev[-1:], chat=False)
            assert (text, reason) == (want, want_reason)
            deltas = [e["choices"][0]["text"] for e in ev[:-2] if e["choices"][0]["text"]]
            assert len(deltas) >= 2  # token batches as rounds accept them, not one final blob
            reasons.add(reason)
            # the same prompt as token ids
            r2 = c.post("/v1/completions", json=dict(body, prompt=list(tiny.tokenizer.encode(p).ids)))
            assert r2.json()["choices"][0]["text"] == want
        assert reasons == {"stop", "length"}  # both endings exercised
        wait_idle(c)
        assert_no_leak(srv)


def test_stop_strings_and_seeded_sampling(tiny):
    p = tiny_prompts(1, seed=4)[0]
    with tiny_server(tiny) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        full = c.post("/v1/completions", json=dict(prompt=p, max_tokens=30, temperature=0)).json()["choices"][0]["text"]
        words = full.split()
        assert len(words) >= 6
        stop = f"{words[3]} {words[4]}"  # spans two tokens
        cut = full[: full.index(stop)]
        for stream in (False, True):
            body = dict(prompt=p, max_tokens=30, temperature=0, stop=["zzz", stop])
            if stream:
                text, reason = stream_text(post_stream(c, "/v1/completions", dict(body, stream=True)), chat=False)
            else:
                ch = c.post("/v1/completions", json=body).json()["choices"][0]
                text, reason = ch["text"], ch["finish_reason"]
            assert (text, reason) == (cut, "stop")
        # sampling: the same seed gives the same answer, the request's own seed decides
        body = dict(prompt=p, max_tokens=20, temperature=2.0, top_p=0.99, top_k=50)  # peaked target: hot
        a = [c.post("/v1/completions", json=dict(body, seed=s)).json()["choices"][0]["text"] for s in (11, 11, 12, 13)]
        assert a[0] == a[1] and len(set(a)) >= 2
        m = metrics(c)
        assert m["dspark_requests_finished_total"]['{reason="stop"}'] >= 2
        wait_idle(c)
        assert_no_leak(srv)


BAD = [  # (method, path, body or raw bytes, status, text expected in the message)
    ("POST", "/v1/completions", b"{not json", 400, "JSON"),
    ("POST", "/v1/completions", b"[1, 2]", 400, "object"),
    ("POST", "/v1/completions", dict(model="gpt-9", prompt="w1"), 404, "gpt-9"),
    ("POST", "/v1/completions", dict(prompt="w1", max_tokens=-5), 400, "max_tokens"),
    ("POST", "/v1/completions", dict(prompt="w1", max_tokens="10"), 400, "max_tokens"),
    ("POST", "/v1/completions", dict(prompt="w1", max_tokens=0), 400, "max_tokens"),
    ("POST", "/v1/completions", dict(prompt="w1 " * 96), 400, "context"),
    ("POST", "/v1/completions", dict(prompt=[1] * 95, max_tokens=5), 400, "context"),
    ("POST", "/v1/completions", dict(prompt="w1", temperature=-0.5), 400, "temperature"),
    ("POST", "/v1/completions", dict(prompt="w1", temperature=3), 400, "temperature"),
    ("POST", "/v1/completions", dict(prompt="w1", temperature="hot"), 400, "temperature"),
    ("POST", "/v1/completions", b'{"prompt": "w1", "temperature": NaN}', 400, "temperature"),
    ("POST", "/v1/completions", dict(prompt="w1", top_p=0), 400, "top_p"),
    ("POST", "/v1/completions", dict(prompt="w1", top_k=-3), 400, "top_k"),
    ("POST", "/v1/completions", dict(prompt="w1", seed=-1), 400, "seed"),
    ("POST", "/v1/completions", dict(prompt="w1", stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("POST", "/v1/completions", dict(prompt="w1", stop=7), 400, "stop"),
    ("POST", "/v1/completions", dict(prompt="w1", n=2), 400, "'n'"),
    ("POST", "/v1/completions", dict(prompt="w1", stream="yes"), 400, "stream"),
    ("POST", "/v1/completions", dict(prompt=""), 400, "prompt"),
    ("POST", "/v1/completions", dict(prompt=[1, V + 3]), 400, "token ids"),
    ("POST", "/v1/completions", dict(prompt=["w1", "w2"]), 400, "one prompt"),
    ("POST", "/v1/completions", dict(max_tokens=3), 400, "prompt"),
    ("POST", "/v1/completions", b'{"prompt": "' + b"w1 " * 3000 + b'"}', 413, "body"),
    ("POST", "/v1/chat/completions", dict(messages=[{"role": "user", "content": "w1"}]), 400, "chat template"),
    ("POST", "/v1/chat/completions", dict(messages=[]), 400, "messages"),
    ("POST", "/v1/chat/completions", dict(messages=[{"role": "wizard", "content": "w1"}]), 400, "role"),
    ("GET", "/v1/completions", None, 405, "GET"),
    ("GET", "/v1/nothing", None, 404, "/v1/nothing"),
    ("GET", "/v1/models/gpt-9", None, 404, "gpt-9"),
]


def test_bad_requests_answered_4xx_and_server_stays_healthy(tiny):
    with tiny_server(tiny, max_body_bytes=4096) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        statuses = {}
        for method, path, body, status, needle in BAD:
            kw = {}
            if isinstance(body, bytes):
                kw = dict(content=body, headers={"content-type": "application/json"})
            elif body is not None:
                kw = dict(json=body)
            r = c.request(method, path, **kw)
            assert r.status_code == status, (path, body, r.status_code, r.text)
            err = r.json()["error"]
            assert needle in err["message"] and err["type"], (needle, err)
            statuses[status] = statuses.get(status, 0) + 1
            assert c.get("/health").status_code == 200
        ok = c.post("/v1/completions", json=dict(prompt="w1 w2", max_tokens=4, temperature=0))
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
        m = metrics(c)
        rejected = m["dspark_requests_rejected_total"]
        assert {int(re.search(r"\d+", k).group()): v for k, v in rejected.items()} == statuses
        assert m["dspark_requests_total"] == {'{endpoint="completions"}': 1.0}
        wait_idle(c)
        assert_no_leak(srv)


def test_engine_fault_fails_only_its_requests(tiny):
    with tiny_server(tiny) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        eng = srv.server.config.app.state.dspark.engine
        real = eng._round
        calls = {"n": 0}

        def failing_round():
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("injected fault")
            return real()

        eng._round = failing_round
        r = c.post("/v1/completions", json=dict(prompt="w1 w2", max_tokens=40, temperature=0))
        assert r.status_code == 500 and "injected fault" in r.json()["error"]["message"]
        assert c.get("/health").status_code == 200
        calls["n"] = 10
        ev = post_stream(c, "/v1/completions", dict(prompt="w3", max_tokens=6, temperature=0, stream=True))
        assert stream_text(ev, chat=False)[0] == tiny.decode(solo_greedy(tiny, "w3", 6)[0])
        calls["n"] = 1
        ev = post_stream(c, "/v1/completions", dict(prompt="w3", max_tokens=40, temperature=0, stream=True))
        assert "injected fault" in ev[-2]["error"]["message"] and ev[-1] == "[DONE]"
        m = metrics(c)
        assert m["dspark_requests_finished_total"]['{reason="error"}'] == 2
        wait_idle(c)
        assert_no_leak(srv)


def test_internal_error_is_json_500_and_server_goes_on(tiny, monkeypatch):
    with tiny_server(tiny) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:

        def broken(*a, **k):
            raise RuntimeError("injected parse bug")

        monkeypatch.setattr(server, "parse_sampling", broken)
        r = c.post("/v1/completions", json=dict(prompt="w1", max_tokens=3))
        assert r.status_code == 500 and "injected parse bug" in r.json()["error"]["message"]
        monkeypatch.undo()
        assert c.post("/v1/completions", json=dict(prompt="w1", max_tokens=3)).status_code == 200
        wait_idle(c)
        assert_no_leak(srv)


def test_shutdown_with_an_open_stream_ends_everything(tiny, long_prompts):
    srv = tiny_server(tiny, step_delay_s=0.05, graceful_s=0.3).start()
    st = srv.server.config.app.state.dspark
    got = {}

    def client():
        try:
            with (
                httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c,
                c.stream(
                    "POST",
                    "/v1/completions",
                    json=dict(prompt=long_prompts[0], max_tokens=88, temperature=0, stream=True),
                ) as r,
            ):
                got["lines"] = list(r.iter_lines())
        except httpx.HTTPError as exc:
            got["error"] = exc

    th = threading.Thread(target=client)
    th.start()
    try:
        t_end = time.monotonic() + 30
        while st.metrics.generation_tokens == 0:
            assert time.monotonic() < t_end and th.is_alive()
            time.sleep(0.01)
    finally:
        t0 = time.monotonic()
        srv.stop()
        th.join(30)
    assert time.monotonic() - t0 < 30 and not th.is_alive()
    assert not st.loop.thread.is_alive() and st.loop.pending == 0 and not st.engine.has_unfinished()
    assert "error" in got or "data: [DONE]" not in got["lines"]  # cut off, not completed
    fin = st.metrics.snapshot()["finished"]
    assert sum(fin.values()) == 1 and set(fin) <= {"aborted", "shutdown"}
    assert st.metrics.generation_tokens < 88


def test_full_queue_answers_503_and_disconnect_frees_the_slot(tiny, long_prompts):
    with (
        tiny_server(tiny, max_batch=1, max_queue=0, step_delay_s=0.05) as srv,
        httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c,
    ):
        with c.stream(
            "POST", "/v1/completions", json=dict(prompt=long_prompts[0], max_tokens=88, temperature=0, stream=True)
        ) as r:
            first = next(ln for ln in r.iter_lines() if ln.startswith("data: "))
            assert json.loads(first[6:])["choices"]
            busy = c.post("/v1/completions", json=dict(prompt="w2", max_tokens=2))
            assert busy.status_code == 503 and busy.json()["error"]["code"] == "server_busy"
        # the stream was closed after one chunk: the request is aborted, its slot freed
        wait_idle(c)
        m = metrics(c)
        assert m["dspark_requests_finished_total"] == {'{reason="aborted"}': 1.0}
        assert m["dspark_generation_tokens_total"][""] < 88
        ok = c.post("/v1/completions", json=dict(prompt="w2", max_tokens=3, temperature=0))
        assert ok.status_code == 200
        assert_no_leak(srv)


def test_nonstreaming_disconnect_aborts(tiny, long_prompts):
    with tiny_server(tiny, max_batch=2, step_delay_s=0.05) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(
                srv.url + "/v1/completions",
                json=dict(prompt=long_prompts[1], max_tokens=88, temperature=0),
                timeout=httpx.Timeout(0.5),
            )
        wait_idle(c)
        m = metrics(c)
        assert m["dspark_requests_finished_total"] == {'{reason="aborted"}': 1.0}
        assert_no_leak(srv)


@pytest.mark.parametrize("policy", ["causal", "static"])
def test_32_concurrent_streams_with_disconnects(tiny, long_prompts, policy):
    n, disconnect_every = 32, 4
    prompts = tiny_prompts(n, seed=9)
    max_tok = [6 + (3 * i) % 17 for i in range(n)]
    gone = {i for i in range(n) if i % disconnect_every == 1}
    for j, i in enumerate(sorted(gone)):
        # long answers without eos: they cannot end before their client goes away after the first chunk
        prompts[i], max_tok[i] = long_prompts[j], 80
    want = {i: solo_greedy(tiny, prompts[i], max_tok[i]) for i in range(n) if i not in gone}

    async def client(ac, i):
        body = dict(
            model="tiny",
            prompt=prompts[i],
            max_tokens=max_tok[i],
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        await asyncio.sleep(0.003 * (i % 8))  # staggered arrivals: requests join running batches
        async with ac.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = []
            async for ln in r.aiter_lines():
                lines.append(ln)
                if i in gone and ln.startswith("data: ") and json.loads(ln[6:])["choices"][0]["text"]:
                    return None  # disconnect mid-stream
            return sse_events(lines)

    async def run_all(url):
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as ac:
            return await asyncio.wait_for(asyncio.gather(*(client(ac, i) for i in range(n))), DEADLINE_S)

    with (
        tiny_server(tiny, max_batch=8, policy=policy, step_delay_s=0.02) as srv,
        httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c,
    ):
        results = asyncio.run(run_all(srv.url))
        wait_idle(c)
        assert_no_leak(srv)
        usage_tokens = 0
        for i, ev in enumerate(results):
            if i in gone:
                assert ev is None
                continue
            usage = ev[-2]["usage"]
            text, reason = stream_text(ev[:-2] + ev[-1:], chat=False)
            ids, want_reason = want[i]
            assert (text, reason) == (tiny.decode(ids), want_reason), i
            assert usage["completion_tokens"] == len(ids)
            usage_tokens += len(ids)
        m = metrics(c)
        eng = srv.server.config.app.state.dspark.engine
        fin = m["dspark_requests_finished_total"]
        assert m["dspark_requests_total"] == {'{endpoint="completions"}': float(n)}
        assert fin['{reason="aborted"}'] == len(gone)
        assert fin.get('{reason="stop"}', 0) + fin.get('{reason="length"}', 0) == n - len(gone)
        assert m["dspark_queue_length"][""] == 0 and m["dspark_active_requests"][""] == 0
        gen = m["dspark_generation_tokens_total"][""]
        assert usage_tokens < gen < usage_tokens + 80 * len(gone)
        rounds = m["dspark_rounds_total"][""]
        assert rounds == eng.rounds == m["dspark_round_batch_size_count"][""]
        assert m["dspark_request_rounds_total"][""] == m["dspark_round_batch_size_sum"][""]
        assert m["dspark_round_batch_size_sum"][""] / rounds > 2  # requests really shared rounds
        assert m["dspark_verified_drafts_total"][""] == m["dspark_round_verified_drafts_sum"][""]
        assert m["dspark_tau"][""] == pytest.approx(gen / m["dspark_request_rounds_total"][""])
        assert m["dspark_tau"][""] > 1.5  # the aligned drafter's blocks are accepted
        reached, accepted = m["dspark_position_reached_total"], m["dspark_position_accepted_total"]
        assert sum(accepted.values()) == m["dspark_accepted_drafts_total"][""]
        assert all(accepted[k] <= reached[k] for k in reached)
        assert m["dspark_prompt_tokens_total"][""] == sum(len(p.split()) for p in prompts)
        assert m["dspark_time_to_first_token_seconds_count"][""] == n


# ------------------------------------------------------------------------------------------------
# TextStream (incremental detokenization, stop strings)
# ------------------------------------------------------------------------------------------------


def _utf8(ids):
    return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_text_stream_utf8_and_stops(chunk):
    s = "héllo wörld 🎉 ünïcode ≠ ascii; stop here: END of text"
    ids = list(s.encode())
    for stops, want in [
        ((), s),
        (("END",), s[: s.index("END")]),
        (("🎉", "wör"), s[: s.index("wör")]),
        (("xyz", "text"), s[: s.index("text")]),
        (("ENDX",), s),
    ]:
        ts = server.TextStream(_utf8, stops)
        deltas = []
        for k in range(0, len(ids), chunk):
            d = ts.add(ids[k : k + chunk])
            assert "\ufffd" not in d
            deltas.append(d)
            if ts.stopped:
                break
        deltas.append(ts.finish())
        assert "".join(deltas) == want, (stops, chunk)
        assert ts.stopped == (want != s)


def test_text_stream_holds_back_a_possible_stop_prefix():
    ts = server.TextStream(lambda ids: "".join(chr(i) for i in ids), ["abc"])
    assert ts.add([ord("x"), ord("a")]) == "x"  # "a" might start "abc"
    assert ts.add([ord("b")]) == ""  # "ab" too
    assert ts.add([ord("d")]) == "abd"  # not a stop after all
    assert ts.add([ord("a"), ord("b"), ord("c"), ord("z")]) == "" and ts.stopped
    assert ts.text == "xabd" and ts.tokens_at_stop == 8


# ------------------------------------------------------------------------------------------------
# SmolLM2 (embedded target, shipped drafter, chat template): the real thing
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol():
    try:
        target = runtime.load_chat_target(None)
    except runtime.SetupError as exc:
        pytest.skip(f"embedded SmolLM2 unavailable: {exc}")
    drafter = runtime.load_drafter_for(target)
    eng = runtime.build_engine(target.model, drafter.model, policy="causal", max_batch=4, max_seq=512)
    app = server.create_app(target, eng, server.ServerConfig(model_name="SmolLM2-135M-Instruct"))
    with server.ServerThread(app) as srv:
        yield target, srv


CHAT_Q = "What is the capital of France?"


@pytest.mark.slow
def test_smollm2_chat_identical_to_generate_command(smol, tmp_path, capsys):
    from dspark_native import cli

    target, srv = smol
    js = str(tmp_path / "gen.json")
    rc = cli.main(["generate", CHAT_Q, "--max-new-tokens", "12", "--no-baseline", "--threads", "1", "--json", js])
    capsys.readouterr()
    assert rc == 0
    rec = json.load(open(js))["outputs"][0]
    with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        body = dict(
            model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": CHAT_Q}], max_tokens=12, temperature=0
        )
        js2 = c.post("/v1/chat/completions", json=body).json()
        ch = js2["choices"][0]
        assert js2["object"] == "chat.completion" and ch["message"]["role"] == "assistant"
        assert ch["message"]["content"] == rec["answer"]
        assert js2["usage"]["completion_tokens"] == len(rec["tokens"])
        assert js2["usage"]["prompt_tokens"] == len(target.encode(CHAT_Q))
        assert ch["finish_reason"] == ("stop" if rec["finish_reason"] == "stop" else "length")
        ev = post_stream(c, "/v1/chat/completions", dict(body, stream=True))
        assert ev[0]["object"] == "chat.completion.chunk" and ev[0]["choices"][0]["delta"]["role"] == "assistant"
        assert stream_text(ev, chat=True) == (rec["answer"], ch["finish_reason"])
        # list-of-parts content and a system message go through the chat template too
        sysmsg = [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": CHAT_Q}]},
        ]
        r = c.post("/v1/chat/completions", json=dict(body, messages=sysmsg))
        ids = target.chat_template.encode(
            target.tokenizer, [{"role": "system", "content": "You are terse."}, {"role": "user", "content": CHAT_Q}]
        )
        assert r.json()["usage"]["prompt_tokens"] == len(ids)
        wait_idle(c)
        assert_no_leak(srv)


@pytest.mark.slow
def test_smollm2_completions_openai_client_and_concurrency(smol):
    openai = pytest.importorskip("openai")
    target, srv = smol
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", timeout=60.0, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
    texts = ["The capital of France is", "def fibonacci(n):", "Water boils at", "Ünïcödé and emoji 🎉 are"]
    want = [solo_greedy(target, t, 8) for t in texts]
    r = client.completions.create(model="SmolLM2-135M-Instruct", prompt=texts[0], max_tokens=8, temperature=0)
    assert r.choices[0].text == target.decode(want[0][0]) and r.usage.completion_tokens == len(want[0][0])
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        max_tokens=8,
        temperature=0,
        stream=True,
        messages=[{"role": "user", "content": CHAT_Q}],
    )
    got = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert got == target.decode(solo_greedy(target, CHAT_Q, 8, chat=True)[0])

    async def one(ac, t):
        async with ac.stream(
            "POST", "/v1/completions", json=dict(prompt=t, max_tokens=8, temperature=0, stream=True)
        ) as r:
            return stream_text(sse_events([ln async for ln in r.aiter_lines()]), chat=False)

    async def all_at_once():
        async with httpx.AsyncClient(base_url=srv.url, timeout=TIMEOUT) as ac:
            return await asyncio.wait_for(asyncio.gather(*(one(ac, t) for t in texts * 2)), DEADLINE_S)

    res = asyncio.run(all_at_once())
    for (text, reason), (ids, want_reason) in zip(res, want * 2, strict=True):
        assert text == target.decode(ids) and reason == want_reason
    with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        wait_idle(c)
        assert_no_leak(srv)


def test_serve_command_end_to_end(tiny, tmp_path):
    """`dspark-native serve` as a subprocess on a tiny target directory: flags -> engine (causal,
    SPS table profiled at start-up) -> uvicorn on a free port; a request; SIGINT stops it cleanly."""
    import os
    import signal
    import subprocess
    import sys

    from dspark_native.models import save_drafter, save_target

    tdir, ddir = str(tmp_path / "target"), str(tmp_path / "drafter")
    save_target(tiny.model, tdir)
    tiny.tokenizer.save(os.path.join(tdir, "tokenizer.json"))
    with open(os.path.join(tdir, "tokenizer_config.json"), "w") as f:
        json.dump({}, f)
    save_drafter(tiny_drafter(tiny.model, "dspark", block_size=5), ddir, include_shared=True)
    import dspark_native

    # the subprocess imports the same dspark_native as this process (the source tree or the install)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(dspark_native.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p))
    cmd = [
        sys.executable,
        "-m",
        "dspark_native",
        "serve",
        "--target",
        tdir,
        "--drafter",
        ddir,
        "--port",
        "0",
        "--threads",
        "1",
        "--max-batch",
        "2",
        "--max-seq",
        "64",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        url, lines, t_end = None, [], time.monotonic() + 120
        while url is None:
            assert time.monotonic() < t_end and proc.poll() is None, lines
            ln = proc.stderr.readline()
            lines.append(ln)
            m = re.search(r"serving the OpenAI API on (http://127\.0\.0\.1:\d+)/v1", ln)
            url = m.group(1) if m else None
        assert any("profiling the SPS table" in ln for ln in lines)
        with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
            assert c.get("/v1/models").json()["data"][0]["id"] == "target"
            r = c.post("/v1/completions", json=dict(model="target", prompt="w3 w4", max_tokens=6, temperature=0))
            assert r.status_code == 200
            assert r.json()["choices"][0]["text"] == tiny.decode(solo_greedy(tiny, "w3 w4", 6)[0])
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stderr.close()


def test_serve_help_and_bad_flags(capsys):
    from dspark_native import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    assert e.value.code == 0 and "--max-batch" in capsys.readouterr().out
    assert cli.main(["serve", "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err
    assert cli.main(["serve", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
