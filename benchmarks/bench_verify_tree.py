"""Benchmark of verify_tree: the fused op vs the pure-PyTorch reference, and vs the floor (bytes
the op must move / the machine's measured copy bandwidth).

Bytes that must move: the target rows of the nodes on the walked path (each read at least once;
the rows of unvisited nodes need not be read) plus the tree and outputs (negligible). The walked
path is taken from the op's own output. Trees: random trees of M nodes whose drafts are the
parent's argmax 70% of the time (so paths get several nodes deep, as with a decent drafter).

    python benchmarks/bench_verify_tree.py [--device cpu|cuda] [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import copy_bandwidth, machine_info, median_time, print_table, write_json  # noqa: E402

import dspark_native.ops as ops  # noqa: E402
from dspark_native.reference import verify_tree_reference  # noqa: E402


def make_batch(R, M, V, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(R * M, V, generator=g) * 3
    am = logits.argmax(-1)
    parents, tokens = [], []
    for r in range(R):
        par = [-1] + [int(torch.randint(max(0, i - 4), i, (1,), generator=g)) for i in range(1, M)]
        for i in range(M):
            if i == 0:
                tokens.append(0)
            elif torch.rand(1, generator=g) < 0.7:
                tokens.append(int(am[r * M + par[i]]))
            else:
                tokens.append(int(torch.randint(0, V, (1,), generator=g)))
        parents += par
    cu = torch.arange(R + 1) * M
    return (
        logits.to(dtype).to(device),
        cu.to(device),
        torch.tensor(parents, device=device),
        torch.tensor(tokens, device=device),
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="smaller configs, fewer repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) reference timings")
    ap.add_argument("--out", default=None, help="write JSON results here")
    args = ap.parse_args()
    dev = args.device
    repeats = args.repeats or (3 if args.quick else 7)
    bw = copy_bandwidth(dev)
    print(f"device {dev}: measured copy bandwidth {bw / 1e9:.2f} GB/s (read + write)")
    configs = [(64, 64, 32000, torch.float32)]
    if not args.quick:
        configs += [(64, 64, 32000, torch.bfloat16), (16, 16, 128256, torch.bfloat16), (256, 16, 32000, torch.float32)]
    modes = [
        ("greedy", dict(temperature=0.0)),
        ("sample", dict(temperature=1.0)),
        ("sample+top-k/p", dict(temperature=0.8, top_k=50, top_p=0.9)),
    ]
    rows = []
    for R, M, V, dtype in configs:
        tl, cu, par, tok = make_batch(R, M, V, dtype, dev)
        for name, kw in modes:
            kw = dict(kw, seed=torch.arange(R, device=dev), offset=0, max_nodes=M)
            out = ops.verify_tree(tl, cu, par, tok, **kw)
            visited = int((out.path >= 0).sum())
            nbytes = visited * V * tl.element_size() + tl.new_empty(0).element_size() * 0 + out.path.numel() * 8 * 3
            t_op = median_time(lambda: ops.verify_tree(tl, cu, par, tok, **kw), dev, repeats)
            row = dict(
                R=R,
                M=M,
                V=V,
                dtype=str(dtype).replace("torch.", ""),
                mode=name,
                mean_path=visited / R,
                op_ms=t_op * 1e3,
                floor_ms=nbytes / bw * 1e3,
                x_floor=t_op / (nbytes / bw),
            )
            if not args.no_reference and R <= 64:  # the reference is a Python loop: skip the big batch
                ref_kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
                t_ref = median_time(
                    lambda: verify_tree_reference(tl.cpu(), cu.cpu(), par.cpu(), tok.cpu(), **ref_kw),
                    "cpu",
                    max(1, repeats // 3),
                    warmup=0,
                )
                row["ref_ms"] = t_ref * 1e3
                row["speedup_vs_ref"] = t_ref / t_op
            rows.append(row)
            print_table([row], list(row))
    print()
    cols = ["R", "M", "V", "dtype", "mode", "mean_path", "op_ms", "ref_ms", "speedup_vs_ref", "floor_ms", "x_floor"]
    print_table(rows, cols)
    if args.out:
        write_json(
            args.out,
            dict(op="verify_tree", machine=machine_info(dev), bandwidth_bytes_per_s=bw, repeats=repeats, rows=rows),
        )


if __name__ == "__main__":
    main()
