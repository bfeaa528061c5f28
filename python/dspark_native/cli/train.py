"""``dspark-native train``: train a DSpark, DFlash or EAGLE-3 drafter for the target (docs/training.md)."""

from __future__ import annotations

import argparse
import glob
import os
import sys

from .common import UserError, add_model_args, command, load_target


@command("train")
def _train(parser: argparse.ArgumentParser):
    """Train a DSpark, DFlash or EAGLE-3 drafter for the target (data generated online, resumable)."""
    parser.description = ("Build training data from prompt files (the target answers every prompt with its chat "
                          "template; features and top-K target distributions are cached in --data-dir, resumable), "
                          "then train a drafter and write DeepSpec-format checkpoints to --out (resumes from "
                          "--out/train_state.pt). See docs/training.md.")
    parser.add_argument("--kind", choices=("dspark", "dflash", "eagle3"), default="dspark", help="drafter type")
    parser.add_argument("--out", metavar="DIR", required=True, help="run directory (checkpoints, final/, log)")
    parser.add_argument("--data-dir", metavar="DIR", required=True, help="training-data cache directory")
    parser.add_argument("--prompts", nargs="+", metavar="JSONL", default=None,
                        help="prompt files (default: every file of ../shared/data/prompts/train next to the repo, "
                             "if present)")
    parser.add_argument("--limit-per-file", type=int, default=120, help="prompts per file (default 120)")
    parser.add_argument("--max-prompt-tokens", type=int, default=320, help="skip longer prompts (default 320)")
    parser.add_argument("--answer-tokens", type=int, default=256, help="max answer length (default 256)")
    parser.add_argument("--data-batch", type=int, default=32, help="prompts decoded together (default 32)")
    parser.add_argument("--max-sequences", type=int, default=None, help="stop the data build after N sequences")
    parser.add_argument("--no-generate", action="store_true", help="train on the finished shards only")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-sequences", type=int, default=4)
    parser.add_argument("--anchors", type=int, default=16, help="anchors per sequence (default 16)")
    parser.add_argument("--layers", type=int, default=2, help="backbone layers (DSpark/DFlash; default 2)")
    parser.add_argument("--markov-rank", type=int, default=64)
    parser.add_argument("--markov-head", choices=("vanilla", "gated", "rnn"), default="vanilla")
    parser.add_argument("--block-size", type=int, default=7)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--holdout", type=int, default=0, help="last N sequences are not trained on")
    parser.add_argument("--no-resume", action="store_true", help="start over even if --out has a training state")
    add_model_args(parser, drafter=False)

    def run(args) -> int:
        from dspark_native.training.data import DataConfig, build_training_data, load_training_data
        from dspark_native.training.trainer import TrainConfig, train

        files = args.prompts
        if files is None:
            here = os.path.dirname(os.path.abspath(__file__))
            for root in (os.getcwd(), here):
                cand = sorted(glob.glob(os.path.join(root, "..", "shared", "data", "prompts", "train", "*.jsonl")))
                if cand:
                    files = cand
                    break
            if not files and not args.no_generate:
                raise UserError("no --prompts given and ../shared/data/prompts/train not found")
        cfg = TrainConfig(kind=args.kind, num_layers=args.layers, markov_rank=args.markov_rank,
                          markov_head_type=args.markov_head, block_size=args.block_size, steps=args.steps,
                          batch_sequences=args.batch_sequences, anchors_per_sequence=args.anchors, lr=args.lr,
                          seed=args.train_seed, save_every=args.save_every)
        try:
            cfg.validate()
        except ValueError as exc:
            raise UserError(str(exc)) from None
        chat_target = load_target(args)
        target = chat_target.model
        from dspark_native.models.config import default_target_layer_ids

        n = target.config.num_hidden_layers
        ids = default_target_layer_ids(n, 5) if n >= 5 else list(range(n))
        if not args.no_generate:
            dcfg = DataConfig(files=[os.path.abspath(f) for f in files], limit_per_file=args.limit_per_file,
                              max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.answer_tokens,
                              batch=args.data_batch, sequences_per_shard=args.data_batch, target_layer_ids=ids)
            try:
                build_training_data(target, chat_target.encode, chat_target.eos_token_ids, dcfg, args.data_dir,
                                    max_sequences=args.max_sequences)
            except (ValueError, FileNotFoundError) as exc:
                raise UserError(str(exc)) from None
        try:
            data = load_training_data(args.data_dir)
            if args.holdout:
                data, _ = data.split(args.holdout)
            print(f"training data: {data.num_sequences} sequences, {data.tokens.numel()} tokens", file=sys.stderr)
            train(target, data, cfg, args.out, resume=not args.no_resume, target_layer_ids=ids)
        except (ValueError, FileNotFoundError) as exc:
            raise UserError(str(exc)) from None
        print(f"wrote {os.path.join(args.out, 'final')} (DeepSpec layout; load with --drafter)")
        _plot_curves(args.out, args.kind)
        return 0

    return run


def _plot_curves(out_dir: str, kind: str) -> None:
    """<out>/training_curves.png from <out>/log.jsonl (a note instead without matplotlib)."""
    from dspark_native.plots import PlotsUnavailable, training_curves

    log = os.path.join(out_dir, "log.jsonl")
    if not os.path.isfile(log) or os.path.getsize(log) == 0:
        return
    path = os.path.join(out_dir, "training_curves.png")
    try:
        training_curves(log, path, title=f"{kind} drafter training ({out_dir})")
    except PlotsUnavailable as exc:
        print(f"note: no training_curves.png: {exc}", file=sys.stderr)
        return
    print(f"wrote {path}")
