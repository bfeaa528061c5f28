"""Benchmark of verify_chain against the pure-PyTorch reference, a vectorised eager-PyTorch
rejection sampler (the several-kernels-over-materialised-probabilities design engines use), and
the floor: the bytes the op must read divided by the machine's measured copy bandwidth.

Workload: DSpark's path: drafts sampled from draft logits (target logits + noise, acceptance about
0.6-0.8 per position), T = 1, every request verifying gamma drafts. Two byte counts are reported:
``bytes_all`` (every target and draft row, what a data-independent kernel reads) and
``bytes_needed`` (rows up to and including each request's first rejection, what a lazy kernel must
read; the CPU kernel is lazy). ``x_floor`` = time / (bytes_needed / bandwidth).

    python benchmarks/bench_verify_chain.py [--device cpu|cuda] [--quick] [--out results.json]
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
from dspark_native.reference import verify_chain_reference  # noqa: E402


def make_inputs(R, gamma, V, dtype, device, noise=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = R * (gamma + 1)
    tl = torch.randn(N, V, generator=g) * 2.5
    rows = torch.arange(N).view(R, gamma + 1)[:, :gamma].reshape(-1)
    dl = tl[rows] + torch.randn(R * gamma, V, generator=g) * noise
    dt = torch.multinomial(torch.softmax(dl, -1), 1, generator=g).squeeze(1)
    cu = torch.arange(0, N + 1, gamma + 1)
    return (tl.to(dtype).to(device), cu.to(device), dt.to(device), dl.to(dtype).to(device))


def torch_baseline(tl, cu, dt, dl, gamma, seed):
    """Eager vectorised rejection sampling: softmax of every row, accept test, residual and bonus
    distributions materialised for every position, multinomial draws."""
    R = cu.numel() - 1
    gen = torch.Generator(device=tl.device).manual_seed(seed)
    p = torch.softmax(tl.float(), -1).view(R, gamma + 1, -1)
    q = torch.softmax(dl.float(), -1).view(R, gamma, -1)
    d = dt.view(R, gamma)
    p_d = p[:, :gamma].gather(2, d[..., None]).squeeze(2)
    q_d = q.gather(2, d[..., None]).squeeze(2)
    u = torch.rand(R, gamma, generator=gen, device=tl.device, dtype=torch.float64)
    accept = (u * q_d < p_d).int()
    n_acc = accept.cumprod(1).sum(1)
    residual = (p[:, :gamma] - q).clamp_min(0)
    residual = torch.cat([residual, p[:, gamma:]], 1)  # bonus row
    flat = residual.view(-1, residual.shape[-1])
    flat = torch.where(flat.sum(-1, keepdim=True) > 0, flat, p.view(-1, p.shape[-1]))
    recovered = torch.multinomial(flat, 1, generator=gen).view(R, gamma + 1)
    out = torch.where(
        torch.arange(gamma + 1, device=tl.device)[None] < n_acc[:, None],
        torch.cat([d, d[:, :1]], 1),
        torch.full_like(recovered, -1),
    )
    out.scatter_(1, n_acc[:, None], recovered.gather(1, n_acc[:, None]))
    return out, n_acc


def needed_rows(out_accepted, R, gamma):
    """Target and draft rows a lazy kernel reads: positions 0..min(a_r, gamma) (a_r accepted)."""
    a = out_accepted.cpu()
    target_rows = int((torch.clamp(a, max=gamma) + 1).sum())
    draft_rows = int(torch.clamp(a + 1, max=gamma).sum())
    return target_rows, draft_rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer configurations and repeats")
    ap.add_argument("--reference-max-r", type=int, default=64, help="skip the (slow) reference above this R")
    ap.add_argument("--out", default="bench-results/verify_chain.json")
    args = ap.parse_args(argv)
    device = args.device
    Rs, gammas, Vs = [1, 8, 64], [4, 8], [32000, 151936]
    dtypes = [torch.float32, torch.bfloat16]
    if args.quick:
        Rs, gammas, Vs, dtypes = [1, 64], [8], [151936], [torch.float32]
    bw = copy_bandwidth(device)
    print(f"# verify_chain on {device}: measured copy bandwidth {bw / 1e9:.1f} GB/s (read + write)")
    rows = []
    for R, gamma, V, dtype in itertools.product(Rs, gammas, Vs, dtypes):
        tl, cu, dt, dl = make_inputs(R, gamma, V, dtype, device)
        seed = torch.arange(R, device=device)
        off = torch.zeros(R, dtype=torch.long, device=device)

        def native():
            return ops.verify_chain(
                tl, cu, dt, draft_logits=dl, temperature=1.0, seed=seed, offset=off, max_drafts=gamma
            )

        reps = 5 if args.quick else 9
        t_native = median_time(native, device, reps)
        t_base = median_time(lambda: torch_baseline(tl, cu, dt, dl, gamma, 0), device, 3 if args.quick else 5)
        t_ref = float("nan")
        if R <= args.reference_max_r:
            t_ref = median_time(
                lambda: verify_chain_reference(
                    tl.cpu(),
                    cu.cpu(),
                    dt.cpu(),
                    draft_logits=dl.cpu(),
                    temperature=1.0,
                    seed=seed.cpu(),
                    offset=off.cpu(),
                    max_drafts=gamma,
                ),
                "cpu",
                1,
                warmup=0,
            )
        out = native()
        es = tl.element_size()
        t_rows, d_rows = needed_rows(out.num_accepted, R, gamma)
        bytes_all = (tl.numel() + dl.numel()) * es
        bytes_needed = (t_rows + d_rows) * V * es
        floor = bytes_needed / bw
        rows.append(
            dict(
                R=R,
                gamma=gamma,
                V=V,
                dtype=str(dtype).replace("torch.", ""),
                tau=float((out.num_accepted.float() + 1).mean()),
                native_ms=t_native * 1e3,
                reference_ms=t_ref * 1e3,
                torch_eager_ms=t_base * 1e3,
                x_vs_reference=t_ref / t_native,
                x_vs_eager=t_base / t_native,
                MB_all=bytes_all / 1e6,
                MB_needed=bytes_needed / 1e6,
                floor_ms=floor * 1e3,
                x_floor=t_native / floor,
            )
        )
        print(f"  R={R} gamma={gamma} V={V} {dtype}: native {t_native * 1e3:.2f} ms", flush=True)
    print()
    cols = [
        "R",
        "gamma",
        "V",
        "dtype",
        "tau",
        "native_ms",
        "reference_ms",
        "torch_eager_ms",
        "x_vs_reference",
        "x_vs_eager",
        "MB_needed",
        "floor_ms",
        "x_floor",
    ]
    print_table(rows, cols)
    write_json(
        args.out, {"op": "verify_chain", "machine": machine_info(device), "copy_bandwidth_Bps": bw, "rows": rows}
    )


if __name__ == "__main__":
    main()
