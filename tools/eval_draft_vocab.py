"""What a draft vocabulary costs in acceptance: a full-vocabulary DSpark/DFlash drafter restricted
to the N most frequent answer tokens of the training data (``restrict_drafter``: same weights, the
LM head and W2 keep N rows), for several N, scored on held-out sequences of the training data.

Score: teacher-forced greedy tau = 1 + the leading exact matches of a block (the data is the
target's own greedy output, so this is what a greedy round accepts), and the share of held-out
answer tokens inside the subset. Prints a table and writes JSON.

    PYTHONPATH=python python tools/eval_draft_vocab.py --data-dir runs/data --holdout 40 \
        [--drafter DIR] [--sizes 16384 8192 4096] [--out bench-results/draft_vocab_tau.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from dspark_native import runtime  # noqa: E402
from dspark_native.models import load_drafter  # noqa: E402
from dspark_native.models.drafter import restrict_drafter  # noqa: E402
from dspark_native.models.embedded import shipped_drafter_dir  # noqa: E402
from dspark_native.training.data import load_training_data  # noqa: E402
from dspark_native.training.trainer import TrainConfig, dev_metrics, draft_vocab_from_data, vocab_coverage  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, help="training data (dspark-native train --data-dir)")
    ap.add_argument("--holdout", type=int, default=40, help="last N sequences = held-out (default 40)")
    ap.add_argument("--drafter", default=None, help="full-vocabulary drafter directory (default: the shipped one)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[16384, 8192, 4096])
    ap.add_argument("--batches", type=int, default=16, help="held-out batches of 8 x 16 blocks (default 16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench-results/draft_vocab_tau.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ct = runtime.load_chat_target(weights="reference")
    tgt = ct.model
    path = args.drafter or shipped_drafter_dir()
    full = load_drafter(path, tgt, dtype=torch.float32)
    if full.config.draft_vocab_size:
        print(f"{path}: already has a draft vocabulary; give a full-vocabulary drafter", file=sys.stderr)
        return 2
    data = load_training_data(args.data_dir)
    train, dev = data.split(args.holdout)
    kind = "dspark" if full.markov_head is not None else "dflash"
    cfg = TrainConfig(kind=kind, block_size=full.block_size, batch_sequences=8, anchors_per_sequence=16)
    V = tgt.config.vocab_size
    rows = []
    base = dev_metrics(full, cfg, dev, batches=args.batches)
    rows.append(dict(N=V, coverage=1.0, tau=base["tau"], acc0=base["acc"][0], tau_loss_pct=0.0))
    for n in args.sizes:
        ids = draft_vocab_from_data(train, n, V)
        m = dev_metrics(restrict_drafter(full, ids), cfg, dev, batches=args.batches)
        rows.append(
            dict(
                N=n,
                coverage=vocab_coverage(dev, ids),
                tau=m["tau"],
                acc0=m["acc"][0],
                tau_loss_pct=100 * (base["tau"] - m["tau"]) / base["tau"],
            )
        )
    print(
        f"drafter {path}; held-out: {dev.num_sequences} sequences, {base['blocks']} blocks; "
        f"subsets from {train.num_sequences} sequences"
    )
    print(f"{'N':>6} {'coverage':>9} {'tau':>6} {'acc@0':>6} {'tau loss %':>10}")
    for r in rows:
        print(f"{r['N']:>6} {r['coverage']:>9.4f} {r['tau']:>6.3f} {r['acc0']:>6.3f} {r['tau_loss_pct']:>10.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(drafter=path, holdout=args.holdout, rows=rows), f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
