"""A DSpark drafter round against a target decode step (SmolLM2-135M, the shipped drafter), at
batch 1, 4 and 16: a shipped drafter with its own draft vocabulary in fp32 and bf16, its backbone
on the native kernel and on the torch layers; a full-vocabulary one restricted to random
vocabularies of 16k, 8k and 4k tokens.

A round = ingest of 2 new context rows per request (anchor + one accepted draft, the typical
round) + the backbone forward over the block (``propose``) + the fused sequential stage
(``dspark_draft``). A decode step = one target forward of 1 token per request, on the path plain
decoding uses (``--weights``, default auto). Both are timed in one run, interleaved, medians.

Floor of the round: the bytes it must read (backbone weights once, the LM head's and W2's N rows,
W1 rows, the context K/V) over the measured copy bandwidth.

The subsets here are random (cost does not depend on which tokens); what each N costs in
acceptance is measured by ``tools/eval_draft_vocab.py`` with the real frequency-ranked subsets.

    PYTHONPATH=python python benchmarks/bench_draft_round.py [--quick] [--out bench-results/draft_round.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
from _common import copy_bandwidth, machine_info, print_table, write_json  # noqa: E402

from dspark_native import runtime  # noqa: E402
from dspark_native.engine import _torch_threads, sequential_stage  # noqa: E402
from dspark_native.models import load_drafter  # noqa: E402
from dspark_native.models.config import DrafterConfig, read_config_json  # noqa: E402
from dspark_native.models.drafter import restrict_drafter  # noqa: E402
from dspark_native.models.embedded import shipped_drafter_dir  # noqa: E402

CTX = 256


def _median(fns, repeats):
    """Interleaved medians (ms) of several callables: one call of each per repeat, so slow
    phases of a noisy machine hit all of them alike."""
    for f in fns:
        f()
        f()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t0)
    return [1e3 * sorted(t)[len(t) // 2] for t in times]


def round_bytes(d, R: int) -> int:
    c = d.config
    layer = sum(p.numel() * p.element_size() for n, p in d.layers.named_parameters())
    head = d.lm_head.weight.numel() * d.lm_head.weight.element_size()
    mh = d.markov_head
    w2 = mh.markov_w2.weight.numel() * mh.markov_w2.weight.element_size() if mh else 0
    w1 = R * c.block_size * c.markov_rank * (mh.markov_w1.weight.element_size() if mh else 0)
    kv = 2 * c.num_hidden_layers * R * c.num_key_value_heads * CTX * c.head_dim * d.cache.k_cache.element_size()
    fc = d.fc.weight.numel() * d.fc.weight.element_size()
    return layer + head + w2 + w1 + kv + fc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default="auto", help="target forward path (default auto)")
    ap.add_argument("--quick", action="store_true", help="batch 1 only, fewer repeats")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--drafter-threads", type=int, default=1, help="torch threads for the drafter (default 1, as the engine on CPU)"
    )
    ap.add_argument("--out", default="bench-results/draft_round.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ct = runtime.load_chat_target(weights=args.weights)
    tgt = ct.model
    if shipped_drafter_dir() is None:
        print("no shipped drafter in this build", file=sys.stderr)
        return 1
    V = tgt.config.vocab_size
    bw = copy_bandwidth("cpu")
    batches = (1,) if args.quick else (1, 4, 16)
    repeats = 10 if args.quick else args.repeats
    shipped_n = DrafterConfig.from_dict(read_config_json(shipped_drafter_dir())).draft_vocab_size
    # (name, restrict to N random tokens or 0, dtype, propose backbone: native kernel or torch)
    if shipped_n:  # the shipped drafter has its own draft vocabulary: time it as shipped
        tag = f"{shipped_n // 1024}k"
        variants = [(f"{tag} fp32 torch", 0, torch.float32, False), (f"{tag} torch", 0, torch.bfloat16, False)]
        variants += [(f"{tag} fp32", 0, torch.float32, None), (tag, 0, torch.bfloat16, None)]
    else:  # a full-vocabulary drafter: time it restricted to random vocabularies as well
        variants = [("full fp32", 0, torch.float32, None), ("full", 0, torch.bfloat16, None)]
        variants += [(f"{n // 1024}k", n, torch.bfloat16, None) for n in (16384, 8192, 4096)]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for R in batches:
        cache = tgt.new_cache(R, CTX + 16)
        ids = torch.randint(0, V - 1, (R * CTX,), generator=gen)
        cu = torch.arange(0, R * CTX + 1, CTX)
        drafters = []
        for name, n, dt, native in variants:
            d = load_drafter(shipped_drafter_dir(), tgt, dtype=dt)
            if n:
                d = restrict_drafter(d, torch.randperm(V, generator=gen)[:n].sort().values)
            d.native_propose = native
            d.allocate_cache(R, CTX + 16)
            drafters.append((name, n, dt, d))
        tgt.set_target_layer_ids(drafters[0][3].config.target_layer_ids)
        _, hid = tgt(ids, cu, torch.arange(R), cache, return_hidden=True)
        slots = list(range(R))
        for _, _, _, d in drafters:
            d.ingest(slots, hid, cu.tolist())
        new_hid = hid[: 2 * R]
        anchors = torch.randint(0, V - 1, (R,), generator=gen)
        zeros_l, temp = torch.zeros(R, dtype=torch.int64), torch.zeros(R)
        step_ids = torch.randint(0, V - 1, (R,), generator=gen)

        def decode():
            tgt(step_ids, torch.arange(R + 1), torch.arange(R), cache, return_hidden=True)
            cache.truncate(slots, [CTX] * R)

        def threads(fn):
            # as the engine runs the drafter on a CPU target (Engine.drafter_threads)
            def f():
                with _torch_threads(args.drafter_threads):
                    fn()

            return f

        def make_round(d):
            def f():
                d.ingest(slots, new_hid, list(range(0, 2 * R + 1, 2)))
                U, h = d.propose(slots, anchors)
                sequential_stage(d, U, h, anchors, temp, zeros_l, zeros_l)
                d.crop(slots, [CTX] * R)

            return threads(f)

        def make_parts(d):
            def ingest():
                d.ingest(slots, new_hid, list(range(0, 2 * R + 1, 2)))
                d.crop(slots, [CTX] * R)

            def stage():
                sequential_stage(d, U0, h0, anchors, temp, zeros_l, zeros_l)

            U0, h0 = d.propose(slots, anchors)
            return threads(ingest), threads(lambda: d.propose(slots, anchors)), threads(stage)

        fns = [decode]
        for _, _, _, d in drafters:
            fns.append(make_round(d))
            fns.extend(make_parts(d))
        t = _median(fns, repeats)
        t_dec = t[0]
        for i, (name, n, dt, d) in enumerate(drafters):
            t_round, t_ing, t_prop, t_stage = t[1 + 4 * i : 5 + 4 * i]
            b = round_bytes(d, R)
            rows.append(
                dict(
                    batch=R,
                    vocab=name,
                    N=n or d.config.draft_vocab_size or V,
                    dtype=str(dt).replace("torch.", ""),
                    propose="native" if d.native_propose_ok() else "torch",
                    decode_ms=t_dec,
                    round_ms=t_round,
                    ingest_ms=t_ing,
                    propose_ms=t_prop,
                    stage_ms=t_stage,
                    round_per_decode=t_round / t_dec,
                    floor_ms=1e3 * b / bw,
                    x_floor=t_round / (1e3 * b / bw),
                    MB=b / 1e6,
                )
            )
    cols = ["batch", "vocab", "dtype", "propose", "decode_ms", "round_ms", "ingest_ms", "propose_ms", "stage_ms"]
    cols += ["round_per_decode", "MB", "floor_ms", "x_floor"]
    print(
        f"load average {os.getloadavg()[0]:.2f}, copy bandwidth {bw / 1e9:.1f} GB/s, target weights {args.weights}, "
        f"{args.threads} threads (drafter {args.drafter_threads})"
    )
    print_table(rows, cols)
    write_json(
        args.out,
        dict(
            machine=machine_info("cpu"),
            load_average=os.getloadavg(),
            bandwidth_GBps=bw / 1e9,
            weights=args.weights,
            threads=args.threads,
            drafter_threads=args.drafter_threads,
            context=CTX,
            rows=rows,
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
