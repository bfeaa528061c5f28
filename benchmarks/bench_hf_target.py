"""Native target vs the transformers backend on the same SmolLM2 weights: decode (1 token) and
verify(8) blocks at R = 1 and R = 8 over a cached context, all paths timed in one run.

Both models load the converted SmolLM2 directory (the dequantised GGUF), so they compute the same
function; one measurement is one ragged forward with features, then the cache is truncated back
(chain rollback). The paths are interleaved per block size so that a drifting shared machine
affects them alike; the load average is recorded.

    PYTHONPATH=python python benchmarks/bench_hf_target.py --out bench_hf_target.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_target import median_time  # noqa: E402

from dspark_native.models import load_embedded_smollm2, load_target  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=256, help="cached context per request")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 8])
    ap.add_argument(
        "--native-weights",
        nargs="+",
        default=["reference", "auto"],
        help="native forward paths (TargetModel.set_weights)",
    )
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    em = load_embedded_smollm2()
    native = em.model
    hf = load_target(em.directory, backend="transformers")
    ids5 = [1, 8, 14, 20, 27]
    native.set_target_layer_ids(ids5)
    hf.set_target_layer_ids(ids5)
    paths = {}
    for w in args.native_weights:
        fmt = native.set_weights(w)
        paths[f"native/{w if w == fmt else w + '=' + fmt}"] = (native, native._packed)
    native.set_weights("reference")
    paths[f"transformers/{hf.hf.config._attn_implementation}"] = (hf, None)
    V = native.config.vocab_size
    rows = []
    print(f"SmolLM2-135M fp32, ctx {args.ctx}, threads {torch.get_num_threads()}, load {os.getloadavg()}")
    print(f"{'path':>22} {'R':>3} {'n':>3} {'median ms':>10} {'p90':>8} {'x native/' + args.native_weights[0]:>18}")
    for R in args.batch:
        g = torch.Generator().manual_seed(R)
        ctx_ids = torch.randint(0, V, (R * args.ctx,), generator=g)
        slots = torch.arange(R)
        caches = {}
        for label, (m, pack) in paths.items():
            if m is native:
                m._packed = pack
            cache = m.new_cache(R, args.ctx + max(args.blocks))
            for r in range(R):
                m(
                    ctx_ids[r * args.ctx : (r + 1) * args.ctx],
                    torch.tensor([0, args.ctx]),
                    slots[r : r + 1],
                    cache,
                    return_hidden=False,
                    logit_rows="none",
                )
            caches[label] = cache
        for n in args.blocks:
            ids = torch.randint(0, V, (R * n,), generator=g)
            cu = torch.arange(R + 1) * n
            base = None
            for label, (m, pack) in paths.items():
                if m is native:
                    m._packed = pack
                cache = caches[label]

                def step(m=m, cache=cache):
                    m(ids, cu, slots, cache, return_hidden=True)
                    cache.truncate(slots, args.ctx)

                med, _, p90 = median_time(step, args.reps, args.warmup)
                base = base or med
                rows.append(dict(path=label, R=R, n=n, median_s=med, p90_s=p90, ratio_to_first=med / base))
                print(f"{label:>22} {R:>3} {n:>3} {med * 1e3:>10.2f} {p90 * 1e3:>8.2f} {med / base:>18.2f}")
    native._packed = None
    result = dict(
        model="SmolLM2-135M-Instruct (converted Q4_1 GGUF, fp32)",
        ctx=args.ctx,
        threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        torch=torch.__version__,
        load_average_at_end=os.getloadavg(),
        reps=args.reps,
        rows=rows,
    )
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
