"""Plain greedy decoding end to end: our engine on each target forward path vs Hugging Face
transformers' ``generate`` on the same weights and prompts, in one run.

The baseline speculative decoding is measured against must itself be strong: this prints tokens/s
(prefill included, model loading excluded) of plain greedy decoding through ``Engine`` (no
drafter) for each ``--weights`` path, and of ``transformers`` ``generate(do_sample=False)`` on the
embedded SmolLM2's converted safetensors (fp32 and bf16; skipped with a message when transformers
is not installed), with the fraction of prompts whose tokens equal our fp32 reference path's.

    PYTHONPATH=python python benchmarks/bench_e2e.py --limit 2 --out bench_e2e.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from dspark_native.engine import Engine, SamplingParams  # noqa: E402
from dspark_native.models import load_embedded_smollm2  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PROMPTS = os.path.join(HERE, "..", "..", "shared", "data", "prompts", "eval")
FALLBACK = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Explain why the sky is blue in two sentences.",
]


def load_prompts(directory: str, limit: int):
    if not os.path.isdir(directory):
        print(f"[bench_e2e] {directory} not found: using {len(FALLBACK)} built-in prompts")
        return [("builtin", p) for p in FALLBACK]
    out = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".jsonl"):
            continue
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()][:limit]
        out += [(name[:-6], r["turns"][0] if "turns" in r else r["prompt"]) for r in rows]
    return out


def run_ours(em, weights: str, prompts, max_new: int, max_seq: int):
    fmt = em.model.set_weights(weights)
    eng = Engine(em.model, None, max_batch=1, max_seq=max_seq)
    sp = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop_token_ids=list(em.eos_token_ids))
    eng.generate([prompts[0]], SamplingParams(max_new_tokens=4, temperature=0.0))  # warm-up
    outs, total_t, total_n = [], 0.0, 0
    for ids in prompts:
        t0 = time.perf_counter()
        o = eng.generate([ids], sp)[0]
        total_t += time.perf_counter() - t0
        total_n += len(o.token_ids)
        outs.append(list(o.token_ids))
    em.model.set_weights("reference")
    return fmt, outs, total_n, total_t


def run_hf(directory: str, dtype, prompts, max_new: int, eos):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    kw = dict(max_new_tokens=max_new, do_sample=False, eos_token_id=list(eos), pad_token_id=eos[0])
    with torch.no_grad():
        model.generate(torch.tensor([prompts[0]]), **dict(kw, max_new_tokens=4))  # warm-up
        outs, total_t, total_n = [], 0.0, 0
        for ids in prompts:
            x = torch.tensor([ids])
            t0 = time.perf_counter()
            y = model.generate(x, attention_mask=torch.ones_like(x), **kw)[0, len(ids) :].tolist()
            total_t += time.perf_counter() - t0
            total_n += len(y)
            outs.append(y)
    return outs, total_n, total_t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", default=DEFAULT_PROMPTS, help="folder of *.jsonl prompt files")
    ap.add_argument("--limit", type=int, default=2, help="prompts per file")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument(
        "--weights", nargs="+", default=["reference", "auto"], choices=["reference", "fused", "bf16", "native", "auto"]
    )
    ap.add_argument("--hf-dtypes", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    em = load_embedded_smollm2()
    prompts = [em.encode_chat([{"role": "user", "content": p}]) for _, p in load_prompts(args.prompts, args.limit)]
    max_seq = max(len(p) for p in prompts) + args.max_new_tokens + 8
    rows = []
    ref_outs = None
    for w in args.weights:
        fmt, outs, n, t = run_ours(em, w, prompts, args.max_new_tokens, max_seq)
        ref_outs = ref_outs if ref_outs is not None or w != "reference" else outs
        rows.append(
            dict(
                backend="dspark-native Engine (plain)",
                weights=w if w == fmt else f"{w}={fmt}",
                tokens=n,
                seconds=t,
                tokens_per_s=n / t,
                outs=outs,
            )
        )
    try:
        import transformers  # noqa: F401

        have_hf = True
    except ImportError:
        have_hf = False
        print("[bench_e2e] transformers is not installed (pip install transformers): HF rows skipped")
    if have_hf:
        for dt in args.hf_dtypes:
            outs, n, t = run_hf(em.directory, getattr(torch, dt), prompts, args.max_new_tokens, list(em.eos_token_ids))
            rows.append(
                dict(
                    backend=f"transformers {transformers.__version__} generate",
                    weights=dt,
                    tokens=n,
                    seconds=t,
                    tokens_per_s=n / t,
                    outs=outs,
                )
            )
    hf32 = next((r for r in rows if r["backend"].startswith("transformers") and r["weights"] == "float32"), None)
    print(
        f"SmolLM2-135M-Instruct, {len(prompts)} prompts, greedy, up to {args.max_new_tokens} new tokens, "
        f"batch 1, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}"
    )
    print(f"{'backend':>40} {'weights':>14} {'tokens':>7} {'tok/s':>8} {'x HF fp32':>10} {'same as ref':>12}")
    for r in rows:
        same = float("nan")
        if ref_outs:
            same = sum(a == b for a, b in zip(r["outs"], ref_outs, strict=True)) / len(prompts)
        r["same_tokens_as_reference_fraction"] = same
        x = r["tokens_per_s"] / hf32["tokens_per_s"] if hf32 else float("nan")
        r["x_hf_fp32"] = x
        print(
            f"{r['backend']:>40} {r['weights']:>14} {r['tokens']:>7} {r['tokens_per_s']:>8.1f} {x:>10.2f} {same:>12.2f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                dict(
                    machine=platform.machine(),
                    cpu_count=os.cpu_count(),
                    threads=torch.get_num_threads(),
                    torch=torch.__version__,
                    load_average_at_end=os.getloadavg(),
                    max_new_tokens=args.max_new_tokens,
                    prompts=len(prompts),
                    rows=[{k: v for k, v in r.items() if k != "outs"} for r in rows],
                ),
                f,
                indent=2,
            )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
