"""Load benchmark of `dspark-native serve`: plain vs static vs causal policy at concurrency 1, 4, 16, 64.

The server (the embedded SmolLM2-135M-Instruct with its shipped DSpark drafter) runs in this process
on a free loopback port; `c` closed-loop clients stream chat completions (greedy, fixed prompts,
`max_tokens` each) over HTTP. Per policy and concurrency: throughput (completion tokens / makespan),
per-user tokens/s (median over requests of tokens / request time), time to first token and
inter-token latency (per request: (last token time - first token time) / (tokens - 1)) p50/p99, and
from /metrics the verification budget: drafts verified per round and per request per round, tau.
"static-L" verifies L drafts every round (--num-drafts L); "causal" is Algorithm 1 on an SPS table
profiled on this machine (cached in --sps).

    PYTHONPATH=python python3 benchmarks/bench_serve.py --out bench_serve.json --png docs/img/serve_throughput.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from dspark_native import runtime, server  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "How many legs do three spiders have?",
    "Give me three tips for sleeping better.",
    "Explain what a prime number is.",
    "What is 17 times 23?",
    "Name the planets of the solar system.",
    "Translate 'good morning' into Spanish.",
]
SYSTEM = "You are a helpful assistant. Answer briefly."


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


async def one_request(ac, model, i, max_tokens):
    body = dict(
        model=model,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
    )
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    async with ac.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for ln in r.aiter_lines():
            if not ln.startswith("data: ") or ln == "data: [DONE]":
                continue
            ev = json.loads(ln[6:])
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
                continue
            now = time.perf_counter()
            if ev["choices"][0]["delta"].get("content"):
                first = first if first is not None else now
                last = now
    return dict(t0=t0, first=first, last=last, tokens=tokens)


async def run_level(url, model, c, n_per_client, max_tokens, timeout_s):
    import httpx

    async def client(k):
        out = []
        for j in range(n_per_client):
            out.append(await one_request(ac, model, k * n_per_client + j, max_tokens))
        return out

    limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout_s), limits=limits) as ac:
        t0 = time.perf_counter()
        res = await asyncio.wait_for(asyncio.gather(*(client(k) for k in range(c))), timeout_s)
        t1 = time.perf_counter()
    return [r for rs in res for r in rs], t1 - t0


def metric_diff(a, b):
    keys = ("rounds", "request_rounds", "verified_drafts", "accepted_drafts", "generation_tokens")
    out = {k: b[k] - a[k] for k in keys}
    out["engine_time"] = {p: b["engine_time"][p] - a["engine_time"][p] for p in a["engine_time"]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument(
        "--policies",
        default="plain,static-1,static-3,static-7,causal",
        help="plain, static-L (L drafts per round), causal, async, threshold",
    )
    ap.add_argument("--max-tokens", type=int, default=16, help="completion tokens per request (default 16)")
    ap.add_argument("--requests", type=int, default=4, help="requests per level at least (default 4; c per level)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared 2-core CI machines)")
    ap.add_argument("--sps", default=None, help="SPS table JSON: read if it exists, else profiled and written")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per level at most")
    ap.add_argument("--out", default=None, help="JSON results")
    ap.add_argument("--png", default=None, help="throughput vs concurrency plot")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    levels = [int(x) for x in args.concurrency.split(",")]
    policies = args.policies.split(",")
    max_batch = max(levels)
    load_before = os.getloadavg()
    t_start = time.perf_counter()

    target = runtime.load_chat_target(None)
    drafter = runtime.load_drafter_for(target)
    block = drafter.model.block_size
    table = None
    if any(p in ("causal", "async") for p in policies):
        need = max_batch * (block + 1)
        if args.sps and os.path.exists(args.sps):
            table = runtime.load_sps_table(args.sps)
        if table is None or len(table.sps) < need:
            print(f"profiling the SPS table (B = 1..{need})", file=sys.stderr, flush=True)
            table = server.profile_sps_table(target.model, need, repeats=3)
            if args.sps:
                table.save(args.sps)
    max_seq = 256

    def make_engine(pol):
        if pol == "plain":
            return runtime.build_plain_engine(target.model, max_batch=max_batch, max_seq=max_seq)
        if pol.startswith("static-"):
            return runtime.build_engine(
                target.model,
                drafter.model,
                policy="static",
                num_drafts=int(pol[7:]),
                max_batch=max_batch,
                max_seq=max_seq,
            )
        return runtime.build_engine(
            target.model, drafter.model, policy=pol, sps_table=table, max_batch=max_batch, max_seq=max_seq
        )

    rows = []
    # Concurrency outside, policies inside in alternating order (forward, backward, ...): the load of a
    # shared machine drifts over minutes, and every policy of a level is measured within the same minute.
    for li, c in enumerate(levels):
        for pol in policies if li % 2 == 0 else policies[::-1]:
            eng = make_engine(pol)  # a fresh engine (the drafter's cache is re-allocated; one engine at a time)
            app = server.create_app(target, eng, server.ServerConfig(model_name="smol", max_queue=4 * max_batch))
            st = app.state.dspark
            with server.ServerThread(app) as srv:
                asyncio.run(run_level(srv.url, "smol", 1, 1, 4, args.timeout))  # warm-up
                n_per = max(1, -(-args.requests // c))
                m0 = st.metrics.snapshot()
                res, wall = asyncio.run(run_level(srv.url, "smol", c, n_per, args.max_tokens, args.timeout))
                m1 = st.metrics.snapshot()
            del eng, app, st
            d = metric_diff(m0, m1)
            toks = sum(r["tokens"] for r in res)
            ttft = [r["first"] - r["t0"] for r in res if r["first"] is not None]
            itl = [(r["last"] - r["first"]) / (r["tokens"] - 1) for r in res if r["tokens"] > 1]
            per_user = [r["tokens"] / (r["last"] - r["t0"]) for r in res if r["last"] is not None]
            rr = d["request_rounds"] or 1
            row = dict(
                policy=pol,
                concurrency=c,
                requests=len(res),
                tokens=toks,
                wall_s=wall,
                throughput=toks / wall,
                per_user_tok_s=statistics.median(per_user),
                ttft_p50=pct(ttft, 50),
                ttft_p99=pct(ttft, 99),
                itl_p50=pct(itl, 50),
                itl_p99=pct(itl, 99),
                drafts_per_round=d["verified_drafts"] / max(1, d["rounds"]),
                drafts_per_request_round=d["verified_drafts"] / rr,
                tau=d["generation_tokens"] / rr,
                batch_per_round=d["request_rounds"] / max(1, d["rounds"]),
                ms_per_round={p: 1e3 * t / max(1, d["rounds"]) for p, t in d["engine_time"].items()},
                loadavg=os.getloadavg()[0],
            )
            rows.append(row)
            print(
                f"{pol:>9} c={c:<3} {row['throughput']:7.1f} tok/s, per user {row['per_user_tok_s']:6.2f}, "
                f"TTFT p50 {row['ttft_p50']:.2f} s, ITL p50 {row['itl_p50'] * 1e3:.0f} ms, drafts/req/round "
                f"{row['drafts_per_request_round']:.2f}, tau {row['tau']:.2f}, ms/round "
                + " ".join(f"{p} {v:.0f}" for p, v in row["ms_per_round"].items())
                + f"  ({wall:.1f} s, load {row['loadavg']:.1f})",
                flush=True,
            )
    rows.sort(key=lambda r: (policies.index(r["policy"]), r["concurrency"]))
    load_after = os.getloadavg()
    machine = dict(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        loadavg_before=load_before,
        loadavg_after=load_after,
    )
    total = time.perf_counter() - t_start
    print(f"\nmachine: {machine}\ntotal {total:.0f} s\n")
    print(
        "| policy | c | tok/s | per-user tok/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | drafts verified / round "
        "| per request | tau | draft / verify ms per round |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["ms_per_round"]
        print(
            f"| {r['policy']} | {r['concurrency']} | {r['throughput']:.1f} | {r['per_user_tok_s']:.2f} | "
            f"{r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | {r['itl_p50'] * 1e3:.0f} / {r['itl_p99'] * 1e3:.0f} | "
            f"{r['drafts_per_round']:.1f} | {r['drafts_per_request_round']:.2f} | {r['tau']:.2f} | "
            f"{t['draft']:.0f} / {t['verify']:.0f} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(machine=machine, args=vars(args), total_s=total, rows=rows), f, indent=1)
        print(f"wrote {args.out}")
    if args.png:
        plot(rows, levels, policies, args.png, machine)
    return 0


def plot(rows, levels, policies, path, machine):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig = Figure(figsize=(6.4, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for pol in policies:
        pts = sorted((r["concurrency"], r["throughput"]) for r in rows if r["policy"] == pol)
        ax.plot(
            [p[0] for p in pts], [p[1] for p in pts], marker="o", label=pol, linewidth=2.4 if pol == "causal" else 1.4
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels)
    ax.set_xticklabels([str(c) for c in levels])
    ax.set_xlabel("concurrent streaming clients")
    ax.set_ylabel("throughput (completion tokens / s)")
    la = machine["loadavg_before"]
    ax.set_title(
        f"dspark-native serve, SmolLM2-135M, CPU {machine['cpu_count']} cores, "
        f"{machine['torch_threads']} thread, load {la[0]:.1f}",
        fontsize=9,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
