"""Engine machinery overhead (SmolLM2-135M, untrained default drafter), on the CPU or a GPU.

1. plain decoding through the engine vs the bare model loop (``TargetModel.generate_greedy``):
   what the engine adds per token (batching bookkeeping, verify_chain sampling, emission);
2. one speculative round per policy: time split draft / schedule / verify / rollback and drafts
   verified per round, at batch 1 and batch 4.

    PYTHONPATH=python python benchmarks/bench_engine.py --tokens 32 --threads 1 --out bench_engine.json
    PYTHONPATH=python python benchmarks/bench_engine.py --device cuda --dtype bfloat16 --out bench_engine_gpu.json

The JSON records the device (name included for CUDA) and dtype it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from dspark_native.engine import POLICIES, Engine, SamplingParams, default_drafter  # noqa: E402
from dspark_native.models import load_embedded_smollm2  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether?",
    "Give me three tips for sleeping better.",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per request (default 32)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON output")
    ap.add_argument("--device", default="cpu", help="cpu | cuda[:N] (default cpu)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    em = load_embedded_smollm2(dtype=getattr(torch, args.dtype), device=dev)
    prompts = [em.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=args.tokens)  # no stop tokens: fixed length
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else ""
    res = {
        "tokens": args.tokens,
        "threads": torch.get_num_threads(),
        "device": f"{dev} {name}".strip(),
        "dtype": args.dtype,
        "torch": torch.__version__,
    }
    print(f"device {res['device']}, {args.dtype}")
    # every timed run ends with a host read of its last tokens, so wall time covers the device work
    em.model.generate_greedy(prompts[0], 2)  # warm-up (CUDA context, kernels)

    t0 = time.perf_counter()
    bare = em.model.generate_greedy(prompts[0], args.tokens)
    t_bare = time.perf_counter() - t0
    eng = Engine(em.model, None, max_batch=1, max_seq=512)
    t0 = time.perf_counter()
    out = eng.generate([prompts[0]], params)[0]
    t_eng = time.perf_counter() - t0
    assert out.token_ids == bare, "engine plain decoding differs from the bare greedy loop"
    res["plain"] = dict(
        bare_tok_s=args.tokens / t_bare,
        engine_tok_s=args.tokens / t_eng,
        overhead_pct=100 * (t_eng / t_bare - 1),
        engine_time=eng.time,
    )
    print(
        f"plain decoding, 1 request: bare loop {args.tokens / t_bare:.1f} tok/s, engine {args.tokens / t_eng:.1f} "
        f"tok/s ({100 * (t_eng / t_bare - 1):+.1f}% time)"
    )

    drafter = default_drafter(em.model)
    rows = []
    for R in (1, 4):
        for policy in POLICIES:
            eng = Engine(em.model, drafter, policy=policy, max_batch=R, max_seq=512)
            t0 = time.perf_counter()
            outs = eng.generate(prompts[:R], params)
            wall = time.perf_counter() - t0
            n = sum(len(o.token_ids) for o in outs)
            rounds = eng.rounds
            tot = sum(eng.time[p] for p in ("draft", "schedule", "verify", "rollback"))
            row = dict(
                batch=R,
                policy=policy,
                tok_s=n / wall,
                tau=n / sum(o.stats.rounds for o in outs),
                verified_per_round=sum(o.stats.budget for o in outs) / sum(o.stats.rounds for o in outs),
                ms_per_round=1e3 * tot / rounds,
                split={p: eng.time[p] / tot for p in ("draft", "schedule", "verify", "rollback")},
            )
            rows.append(row)
            sp = row["split"]
            print(
                f"R={R} {policy:<9} {row['tok_s']:6.1f} tok/s tau {row['tau']:.2f} verified/round "
                f"{row['verified_per_round']:.2f} {row['ms_per_round']:7.1f} ms/round: draft {sp['draft']:.0%} "
                f"schedule {sp['schedule']:.0%} verify {sp['verify']:.0%} rollback {sp['rollback']:.0%}"
            )
    res["speculative"] = rows
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
