"""Benchmark of dspark_draft (DSpark sequential stage + confidence head) against the pure-PyTorch
reference loop (dspark_native.reference, one request and position at a time; timed on
--reference-requests requests and scaled linearly to R, as it treats requests independently), a batched eager
PyTorch loop (one GEMM + softmax + multinomial per position for the whole batch, W2 pre-widened to
fp32 outside the timing), and the floor.

Workload: vanilla Markov head, g = 7, r = 256, bf16 weights and base logits (DeepSpec checkpoints
are bf16), confidence head with d = 1024, T = 1 (sampled). Floor bytes: U read once, markov_w2
read once per step, q (fp32) written once; floor = bytes / measured copy bandwidth. The op also
does 2 R g V r FLOPs of bias GEMM, which on a CPU usually dominates for R >= 8: ``gflops`` reports
the rate it reached.

    python benchmarks/bench_dspark_draft.py [--device cpu|cuda] [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import copy_bandwidth, machine_info, median_time, print_table, write_json  # noqa: E402

import dspark_native.ops as ops  # noqa: E402
from dspark_native.reference import dspark_draft_reference  # noqa: E402

G, RANK, D = 7, 256, 1024


def make_inputs(R, V, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = (torch.randn(R, G, V, generator=g) * 2).bfloat16()
    h = torch.randn(R, G, D, generator=g).bfloat16()
    w1 = (torch.randn(V, RANK, generator=g) * 0.1).bfloat16()
    w2 = (torch.randn(V, RANK, generator=g) * 0.1).bfloat16()
    cw = (torch.randn(1, D + RANK, generator=g) * 0.05).bfloat16()
    cb = torch.zeros(1).bfloat16()
    anc = torch.randint(0, V, (R,), generator=g)
    return [t.to(device) for t in (U, h, w1, w2, cw, cb, anc)]


def eager_loop(U, h, w1, w2f, cw, cb, anc, gen):
    """Batched eager PyTorch: per position one [R, r] x [r, V] GEMM, softmax, multinomial."""
    prev = anc
    toks, qs, confs = [], [], []
    cwf, cbf = cw.float().reshape(-1), cb.float()
    for k in range(G):
        e = w1[prev].float()
        confs.append(torch.sigmoid(torch.cat([h[:, k].float(), e], -1) @ cwf + cbf))
        z = U[:, k].float() + e @ w2f.T
        d = torch.multinomial(torch.softmax(z, -1), 1, generator=gen).squeeze(1)
        toks.append(d)
        qs.append(z)
        prev = d
    return torch.stack(toks, 1), torch.stack(qs, 1), torch.stack(confs, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer configurations and repeats")
    ap.add_argument(
        "--reference-requests",
        type=int,
        default=4,
        help="time the (slow, per-request) reference loop on this many requests and scale by R / n",
    )
    ap.add_argument("--out", default="bench-results/dspark_draft.json")
    args = ap.parse_args(argv)
    device = args.device
    Rs, Vs = [1, 8, 64, 128], [49152, 151936]
    if args.quick:
        Rs, Vs = [1, 64], [49152]
    bw = copy_bandwidth(device)
    print(f"# dspark_draft on {device}: measured copy bandwidth {bw / 1e9:.1f} GB/s (read + write)")
    rows = []
    for V, R in itertools.product(Vs, Rs):
        U, h, w1, w2, cw, cb, anc = make_inputs(R, V, device)
        w2f = w2.float()
        seed = torch.arange(R, device=device)
        off = torch.zeros(R, dtype=torch.long, device=device)
        kw = dict(hidden=h, conf_weight=cw, conf_bias=cb, temperature=1.0, seed=seed, offset=off)

        def native():
            return ops.dspark_draft(U, anc, w1, w2, **kw)

        reps = 3 if args.quick else (5 if R * V < 64 * 151936 else 3)
        t_native = median_time(native, device, reps)
        gen = torch.Generator(device=device).manual_seed(0)
        t_eager = median_time(lambda: eager_loop(U, h, w1, w2f, cw, cb, anc, gen), device, reps)
        # the reference loops over requests independently: time n of them and scale by R / n
        n = max(1, min(R, args.reference_requests))
        cpu = [t.cpu() for t in (U[:n], anc[:n], w1, w2, h[:n], cw, cb)]
        t_ref = (
            median_time(
                lambda: dspark_draft_reference(
                    cpu[0],
                    cpu[1],
                    cpu[2],
                    cpu[3],
                    hidden=cpu[4],
                    conf_weight=cpu[5],
                    conf_bias=cpu[6],
                    temperature=1.0,
                    seed=seed[:n].cpu(),
                    offset=0,
                ),
                "cpu",
                1,
                warmup=0,
            )
            * R
            / n
        )
        nbytes = U.numel() * U.element_size() + G * w2.numel() * w2.element_size() + R * G * V * 4
        floor = nbytes / bw
        rows.append(
            dict(
                R=R,
                g=G,
                r=RANK,
                V=V,
                native_ms=t_native * 1e3,
                reference_ms=t_ref * 1e3,
                torch_eager_ms=t_eager * 1e3,
                x_vs_reference=t_ref / t_native,
                x_vs_eager=t_eager / t_native,
                MB=nbytes / 1e6,
                floor_ms=floor * 1e3,
                x_floor=t_native / floor,
                gflops=2.0 * R * G * V * RANK / t_native / 1e9,
            )
        )
        print(
            f"  R={R} V={V}: native {t_native * 1e3:.1f} ms, eager {t_eager * 1e3:.1f} ms, "
            f"reference {t_ref * 1e3:.0f} ms, floor {floor * 1e3:.1f} ms",
            flush=True,
        )
    print()
    print_table(
        rows,
        [
            "R",
            "V",
            "native_ms",
            "reference_ms",
            "torch_eager_ms",
            "x_vs_reference",
            "x_vs_eager",
            "MB",
            "floor_ms",
            "x_floor",
            "gflops",
        ],
    )
    write_json(
        args.out,
        {
            "op": "dspark_draft",
            "machine": machine_info(device),
            "copy_bandwidth_Bps": bw,
            "config": {"g": G, "rank": RANK, "hidden": D, "dtype": "bfloat16", "head": "vanilla"},
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
