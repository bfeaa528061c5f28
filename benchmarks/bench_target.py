"""Target forward time on CPU: 1-token decode and verification blocks, R = 1 and R = 8.

Each request slot holds a realistic cached context (default 256 tokens); one measurement is
one ragged forward of R blocks of n tokens, after which the cache is truncated back (chain
rollback), so every repetition sees the same context. Reports medians, FLOPs, bytes read
(weights once per forward + the KV cache) and the floor = bytes / measured copy bandwidth.

    PYTHONPATH=python python benchmarks/bench_target.py --out bench_target.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from dspark_native.models import load_embedded_smollm2, load_target  # noqa: E402


def median_time(fn, reps: int, warmup: int):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return statistics.median(ts), ts[0], ts[(len(ts) * 9) // 10]


def copy_bandwidth(mbytes: int, reps: int) -> float:
    """Bytes moved per second (read + write) by a large tensor copy."""
    n = mbytes * (1 << 20) // 4
    src = torch.randn(n)
    dst = torch.empty_like(src)
    t, _, _ = median_time(lambda: dst.copy_(src), reps, 2)
    return 2 * src.numel() * 4 / t


def read_bandwidth(mbytes: int, reps: int) -> float:
    """Bytes read per second by a reduction over a large tensor (a forward mostly reads, and a
    read-only stream can beat a copy's read+write rate)."""
    n = mbytes * (1 << 20) // 4
    src = torch.randn(n)
    t, _, _ = median_time(lambda: src.sum(), reps, 2)
    return src.numel() * 4 / t


def weight_stats(model):
    """Bytes of weights read by one forward and matmul parameter count (embedding lookup reads
    only T rows, so it is excluded; a tied head is read once, as the head)."""
    c = model.config
    esize = model.embed_tokens.weight.element_size()
    per_layer = sum(p.numel() for p in model.layers[0].parameters())
    matmul_params = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size
    bytes_w = (matmul_params + c.hidden_size) * esize
    return bytes_w, matmul_params


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF-style directory (default: embedded SmolLM2)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--weights",
        nargs="+",
        default=["reference", "auto"],
        choices=["reference", "fused", "bf16", "native", "auto"],
        help="forward paths to time, each in the same run (TargetModel.set_weights)",
    )
    ap.add_argument("--ctx", type=int, default=256, help="cached context per request")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--copy-mb", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    if args.model:
        model = load_target(args.model, dtype=dtype)
        name = args.model
    else:
        model = load_embedded_smollm2(dtype=dtype).model
        name = "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised)"
    c = model.config
    copy_bw = copy_bandwidth(args.copy_mb, 7)
    read_bw = read_bandwidth(args.copy_mb, 7)
    bw = max(copy_bw, read_bw)
    ref_bytes, matmul_params = weight_stats(model)
    esize = model.embed_tokens.weight.element_size()
    # One packed copy per path, swapped in per measurement so that every path is timed in the
    # same minute (the machine is shared and drifts).
    packs, fmt_bytes = {}, {}
    for w in args.weights:
        fmt = model.set_weights(w)
        label = w if w == fmt else f"{w}={fmt}"
        packs[label] = model._packed
        fmt_bytes[label] = ref_bytes if model._packed is None else (model._packed.weight_bytes + c.hidden_size * esize)
    model.set_weights("reference")
    rows = []
    header = (
        f"{'weights':>10} {'R':>3} {'n':>3} {'T':>4} {'median ms':>10} {'min':>7} {'p90':>7} "
        f"{'tok/s':>8} {'GFLOP/s':>8} {'MB read':>8} {'floor ms':>9} {'x floor':>8} "
        f"{'x decode':>8}"
    )
    print(f"model: {name}, dtype {args.dtype}, threads {torch.get_num_threads()}, ctx {args.ctx}")
    print(
        "weights read per forward: "
        + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in fmt_bytes.items())
        + f"; copy bandwidth "
        f"{copy_bw / 1e9:.2f} GB/s (read+write bytes of a {args.copy_mb} MiB copy), read "
        f"bandwidth {read_bw / 1e9:.2f} GB/s (sum); floor uses the larger"
    )
    print(header)
    for R in args.batch:
        cache = model.new_cache(R, args.ctx + max(args.blocks))
        g = torch.Generator().manual_seed(R)
        ctx_ids = torch.randint(0, c.vocab_size, (R * args.ctx,), generator=g)
        slots = torch.arange(R)
        # Prefill one request at a time to keep peak memory small.
        for r in range(R):
            model(
                ctx_ids[r * args.ctx : (r + 1) * args.ctx],
                torch.tensor([0, args.ctx]),
                slots[r : r + 1],
                cache,
                return_hidden=False,
                logit_rows="none",
            )
        decode = {}
        for n in args.blocks:
            ids = torch.randint(0, c.vocab_size, (R * n,), generator=g)
            cu = torch.arange(R + 1) * n

            def step():
                model(ids, cu, slots, cache, return_hidden=True)
                cache.truncate(slots, args.ctx)

            for label, pack in packs.items():
                model._packed = pack
                med, tmin, p90 = median_time(step, args.reps, args.warmup)
                decode.setdefault(label, med)  # blocks run in order: n = blocks[0] first
                T = R * n
                L = args.ctx + n
                attn_flops = 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * T * L
                flops = 2 * matmul_params * T + attn_flops
                kv_bytes = 2 * c.num_hidden_layers * R * c.num_key_value_heads * L * c.head_dim * esize
                read = fmt_bytes[label] + kv_bytes
                floor = read / bw  # bytes a forward must read / best measured streaming rate
                row = dict(
                    weights=label,
                    R=R,
                    n=n,
                    T=T,
                    median_s=med,
                    min_s=tmin,
                    p90_s=p90,
                    tokens_per_s=T / med,
                    flops=flops,
                    gflops_per_s=flops / med / 1e9,
                    weight_bytes=fmt_bytes[label],
                    kv_bytes=kv_bytes,
                    bytes_read=read,
                    floor_s=floor,
                    ratio_to_floor=med / floor,
                    ratio_to_first_block=med / decode[label],
                )
                rows.append(row)
                print(
                    f"{label:>10} {R:>3} {n:>3} {T:>4} {med * 1e3:>10.2f} {tmin * 1e3:>7.2f} "
                    f"{p90 * 1e3:>7.2f} {T / med:>8.1f} {flops / med / 1e9:>8.1f} "
                    f"{read / 1e6:>8.1f} {floor * 1e3:>9.2f} {med / floor:>8.2f} "
                    f"{med / decode[label]:>8.2f}"
                )
        model._packed = None
    result = dict(
        model=name,
        dtype=args.dtype,
        ctx=args.ctx,
        threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        torch=torch.__version__,
        copy_bandwidth_bytes_per_s=copy_bw,
        read_bandwidth_bytes_per_s=read_bw,
        load_average_at_end=os.getloadavg(),
        weight_bytes=fmt_bytes,
        matmul_params=matmul_params,
        reps=args.reps,
        rows=rows,
        note="x decode = median / median of the first block size (1) at the same R and weights; "
        "floor = (weights + KV bytes read) / max(copy bandwidth, read bandwidth); copy "
        "bandwidth = (read + write bytes) / time of a large tensor copy; read bandwidth = "
        "bytes / time of a large tensor sum. The CPU is shared: see load_average_at_end",
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
