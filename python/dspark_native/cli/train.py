"""``dspark-native train``: train a DSpark, DFlash or EAGLE-3 drafter for the target (docs/training.md)."""

from __future__ import annotations

import argparse
import glob
import os
import sys

from .. import runtime
from .common import UserError, add_model_args, add_prompt_args, command, load_target


@command("train")
def _train(parser: argparse.ArgumentParser):
    """Train a DSpark, DFlash or EAGLE-3 drafter for the target (data generated online, resumable)."""
    parser.description = (
        "Build training data from prompt files (the target answers every prompt with its chat "
        "template; features and top-K target distributions are cached in --data-dir, resumable), "
        "then train a drafter and write DeepSpec-format checkpoints to --out (resumes from "
        "--out/train_state.pt). See docs/training.md."
    )
    parser.add_argument("--kind", choices=("dspark", "dflash", "eagle3"), default="dspark", help="drafter type")
    parser.add_argument("--out", metavar="DIR", required=True, help="run directory (checkpoints, final/, log)")
    parser.add_argument("--data-dir", metavar="DIR", required=True, help="training-data cache directory")
    parser.add_argument(
        "--prompts",
        nargs="+",
        metavar="JSONL",
        default=None,
        help="prompt files (default: the *.jsonl files of $DSPARK_TRAIN_PROMPTS, else of "
        "shared/data/prompts/train or ../shared/data/prompts/train under the working directory)",
    )
    parser.add_argument("--limit-per-file", type=int, default=120, help="prompts per file (default 120)")
    parser.add_argument("--max-prompt-tokens", type=int, default=320, help="skip longer prompts (default 320)")
    parser.add_argument("--answer-tokens", type=int, default=256, help="max answer length (default 256)")
    parser.add_argument("--data-batch", type=int, default=32, help="prompts decoded together (default 32)")
    parser.add_argument("--max-sequences", type=int, default=None, help="stop the data build after N sequences")
    parser.add_argument(
        "--skip-per-file",
        type=int,
        default=0,
        metavar="N",
        help="leave out each file's first N prompts that fit --skip-max-prompt-tokens (an earlier "
        "build's prompts), so this build adds new ones",
    )
    parser.add_argument(
        "--skip-max-prompt-tokens",
        type=int,
        default=0,
        help="the earlier build's --max-prompt-tokens (default: the same)",
    )
    parser.add_argument(
        "--extra-data-dir",
        nargs="+",
        default=[],
        metavar="DIR",
        help="also train on these finished data directories (read before --data-dir's sequences, so "
        "--holdout still holds out the newest)",
    )
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
    parser.add_argument(
        "--draft-vocab",
        type=int,
        default=0,
        metavar="N",
        help="DSpark/DFlash: propose from the N most frequent answer tokens of the data (a draft "
        "vocabulary; LM head, Markov W2 and loss over N columns). Default 0 = full vocabulary",
    )
    parser.add_argument(
        "--init-from-target", action="store_true", help="start the backbone layers from the target's last layers"
    )
    parser.add_argument(
        "--init-from",
        metavar="DIR",
        default=None,
        help="start from this saved drafter's weights (e.g. the shipped one: same architecture, target "
        "layers and draft vocabulary); the schedule and optimiser start fresh",
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast forward (fp32 weights and optimiser)")
    parser.add_argument(
        "--holdout",
        type=int,
        default=0,
        help="last N sequences are not trained on; their teacher-forced tau is logged at every checkpoint",
    )
    parser.add_argument("--no-resume", action="store_true", help="start over even if --out has a training state")
    add_model_args(parser, drafter=False)
    add_prompt_args(parser)

    def run(args) -> int:
        from dspark_native.training.data import DataConfig, build_training_data, load_training_data
        from dspark_native.training.trainer import TrainConfig, feature_layer_ids, train

        files = args.prompts
        if files is not None and "-" in files:
            raise UserError(
                "--prompts -: train needs prompt files (the resumable data cache is keyed by file "
                "name and line), not standard input"
            )
        if files is None:
            files = default_train_prompts()
            if not files and not args.no_generate:
                raise UserError(
                    "no --prompts given, and no *.jsonl in $DSPARK_TRAIN_PROMPTS, "
                    "./shared/data/prompts/train or ../shared/data/prompts/train"
                )
        cfg = TrainConfig(
            kind=args.kind,
            num_layers=args.layers,
            markov_rank=args.markov_rank,
            markov_head_type=args.markov_head,
            block_size=args.block_size,
            steps=args.steps,
            batch_sequences=args.batch_sequences,
            anchors_per_sequence=args.anchors,
            lr=args.lr,
            seed=args.train_seed,
            save_every=args.save_every,
            draft_vocab=args.draft_vocab,
            init_from_target=args.init_from_target,
            bf16=args.bf16,
            init_from=os.path.abspath(args.init_from) if args.init_from else None,
        )
        try:
            cfg.validate()
        except ValueError as exc:
            raise UserError(str(exc)) from None
        chat_target = load_target(args)
        target = chat_target.model
        if args.bf16 and target.device.type == "cpu":
            from dspark_native.models.fused import cpu_has_bf16_matmul

            if not cpu_has_bf16_matmul():
                print(
                    "warning: --bf16 on a CPU without bf16 matrix instructions (AVX512-BF16 / AMX): "
                    "torch emulates them, and a step is many times slower than in fp32 here",
                    file=sys.stderr,
                )
        ids = feature_layer_ids(target)
        if not args.no_generate:
            dcfg = DataConfig(
                files=[os.path.abspath(f) for f in files],
                limit_per_file=args.limit_per_file,
                max_prompt_tokens=args.max_prompt_tokens,
                max_new_tokens=args.answer_tokens,
                batch=args.data_batch,
                sequences_per_shard=args.data_batch,
                target_layer_ids=ids,
                skip_per_file=args.skip_per_file,
                skip_max_prompt_tokens=args.skip_max_prompt_tokens,
            )
            try:
                build_training_data(
                    target,
                    lambda text: chat_target.encode(text, args.system),
                    chat_target.eos_token_ids,
                    dcfg,
                    args.data_dir,
                    max_sequences=args.max_sequences,
                )
            except runtime.SetupError as exc:
                raise UserError(f"--system: {exc}") from None
            except (ValueError, FileNotFoundError) as exc:
                raise UserError(str(exc)) from None
        try:
            data = load_training_data([*args.extra_data_dir, args.data_dir])
            dev = None
            if args.holdout:
                data, dev = data.split(args.holdout)
            print(f"training data: {data.num_sequences} sequences, {data.tokens.numel()} tokens", file=sys.stderr)
            train(target, data, cfg, args.out, resume=not args.no_resume, target_layer_ids=ids, dev=dev)
        except (ValueError, FileNotFoundError) as exc:
            raise UserError(str(exc)) from None
        print(f"wrote {os.path.join(args.out, 'final')} (DeepSpec layout; load with --drafter)")
        _plot_curves(args.out, args.kind)
        return 0

    return run


def default_train_prompts() -> list:
    """The prompt files ``train`` uses without --prompts: the *.jsonl files of the directory in
    $DSPARK_TRAIN_PROMPTS if set, else of shared/data/prompts/train or ../shared/data/prompts/train
    relative to the working directory (the project's layout, for a run from the repository root).
    Never relative to where the package is installed."""
    env = os.environ.get("DSPARK_TRAIN_PROMPTS")
    roots = (
        [env]
        if env
        else [
            os.path.join("shared", "data", "prompts", "train"),
            os.path.join("..", "shared", "data", "prompts", "train"),
        ]
    )
    for root in roots:
        cand = sorted(glob.glob(os.path.join(root, "*.jsonl")))
        if cand:
            return cand
    return []


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
