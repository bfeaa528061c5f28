"""Benchmark of schedule_prefix (paper Algorithm 1) against the pure-Python reference loop
(dspark_native.reference), a vectorised eager-PyTorch version (cumprod, sort, cumsum, first drop:
several kernels), and the floor (confidences read once + lengths written once, over the measured
copy bandwidth; for this op the floor is far below launch/call overhead, so ``x_floor`` mostly
measures overhead).

GPU goal (not measurable on a CPU-only machine): < 20 us for R = 256, g = 16 with one launch.

    python benchmarks/bench_schedule.py [--device cpu|cuda] [--quick] [--out results.json]
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
from dspark_native.reference import schedule_prefix_reference  # noqa: E402


def sps_curve(T, knee):
    b = torch.arange(1, T + 1, dtype=torch.float64)
    return (100.0 / torch.clamp(b / knee, min=1.0) ** 0.9).float()


def eager_causal(c, sps):
    """Vectorised Algorithm 1 (causal) in eager PyTorch (no bounds / budget)."""
    R, g = c.shape
    a = torch.cumprod(c, 1).flatten()
    # a desc, then item (r * g + j) asc: stable sort of -a keeps the index order among ties
    order = torch.sort(-a, stable=True).indices
    sa = a[order]
    valid = sa > 0
    tau = R + torch.cumsum(sa.double(), 0)
    B = R + torch.arange(1, a.numel() + 1, device=c.device)
    theta = tau * sps[(B - 1).clamp(max=sps.numel() - 1)].double()
    prev = torch.cat([torch.tensor([R * float(sps[R - 1])], device=c.device, dtype=torch.float64), theta[:-1]])
    bad = (theta <= prev) | ~valid
    n = torch.where(bad.any(), bad.int().argmax(), torch.tensor(a.numel(), device=c.device))
    keep = torch.arange(a.numel(), device=c.device) < n
    lengths = torch.zeros(R * g, dtype=torch.int64, device=c.device)
    lengths[order[keep]] = 1
    return lengths.view(R, g).sum(1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="bench-results/schedule_prefix.json")
    args = ap.parse_args(argv)
    device = args.device
    Rs, gs = [1, 8, 64, 256], [7, 16]
    if args.quick:
        Rs, gs = [8, 256], [16]
    bw = copy_bandwidth(device, nbytes=1 << 26)
    print(f"# schedule_prefix on {device}: measured copy bandwidth {bw / 1e9:.1f} GB/s (read + write)")
    rows = []
    for R, g, mode in itertools.product(Rs, gs, ["causal", "global"]):
        gen = torch.Generator().manual_seed(R * 100 + g)
        c = (torch.rand(R, g, generator=gen) ** 0.2).to(device)
        sps = sps_curve(R * (1 + g), knee=R * 2 + 1).to(device)
        reps = 21 if args.quick else 51
        t_native = median_time(lambda: ops.schedule_prefix(c, sps, mode=mode), device, reps, warmup=3)
        t_ref = median_time(lambda: schedule_prefix_reference(c.cpu(), sps.cpu(), mode=mode), "cpu", 3, warmup=0)
        t_eager = float("nan")
        if mode == "causal":
            lens = eager_causal(c, sps)
            assert torch.equal(lens.cpu(), ops.schedule_prefix(c, sps).lengths.cpu()), "eager baseline disagrees"
            t_eager = median_time(lambda: eager_causal(c, sps), device, reps, warmup=2)
        nbytes = c.numel() * 4 + R * 8
        floor = nbytes / bw
        rows.append(
            dict(
                R=R,
                g=g,
                mode=mode,
                native_us=t_native * 1e6,
                reference_us=t_ref * 1e6,
                torch_eager_us=t_eager * 1e6,
                x_vs_reference=t_ref / t_native,
                x_vs_eager=t_eager / t_native,
                bytes=nbytes,
                floor_us=floor * 1e6,
                x_floor=t_native / floor,
            )
        )
    print_table(
        rows,
        [
            "R",
            "g",
            "mode",
            "native_us",
            "reference_us",
            "torch_eager_us",
            "x_vs_reference",
            "x_vs_eager",
            "bytes",
            "floor_us",
            "x_floor",
        ],
    )
    write_json(
        args.out, {"op": "schedule_prefix", "machine": machine_info(device), "copy_bandwidth_Bps": bw, "rows": rows}
    )


if __name__ == "__main__":
    main()
