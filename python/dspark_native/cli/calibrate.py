"""``dspark-native calibrate``: fit the drafter's per-position STS confidence temperatures."""

from __future__ import annotations

import argparse
import json

from .common import (
    UserError,
    add_decode_args,
    add_model_args,
    add_prompt_args,
    check_decode_args,
    command,
    encode_prompts,
    load_drafter,
    load_target,
    read_prompts_reporting,
    refuse,
    run_engine,
    sampling_params,
)


@command("calibrate")
def _calibrate(parser: argparse.ArgumentParser):
    """Fit the drafter's per-position STS confidence temperatures on held-out prompts."""
    parser.description = (
        "Run speculative decoding verifying every draft (static policy) over JSONL prompts, "
        "record the confidences and accepted lengths of each round, fit per-position STS "
        "temperatures (dspark_native.scheduler.calibrate_sts) and write them as JSON for --sts."
    )
    parser.add_argument("paths", nargs="+", help="JSONL prompt files (held out: never the eval set you report on)")
    parser.add_argument("--limit", type=int, default=None, help="at most N prompts per file")
    parser.add_argument(
        "--skip",
        type=int,
        default=0,
        help="pass over the first N prompts of each file (e.g. those a drafter was trained on)",
    )
    parser.add_argument("--out", metavar="JSON", default="sts.json", help="output file (default sts.json)")
    add_model_args(parser)
    add_prompt_args(parser)
    add_decode_args(parser)

    def run(args) -> int:
        import torch

        from dspark_native.engine import Engine
        from dspark_native.metrics import ece
        from dspark_native.scheduler import apply_sts, calibrate_sts
        from dspark_native.training.evaluate import full_block_confidences

        static = "calibrate verifies every draft (static policy), so it"
        refuse(
            args,
            {
                "policy": "calibrate verifies every draft (static policy): a length policy would censor the "
                "survival labels the temperatures are fitted on",
                "sps": f"{static} uses no SPS table",
                "threshold": f"{static} uses no threshold",
                "sts": "calibrate fits STS temperatures on the raw confidences; it does not take them",
            },
        )
        check_decode_args(args)
        texts = []
        if args.skip < 0:
            raise UserError("--skip must be >= 0")
        for p in args.paths:
            texts += read_prompts_reporting(p, args.limit, args.skip)
        if not texts:
            raise UserError("no usable prompt")
        target = load_target(args)
        drafter = load_drafter(args, target).model
        if getattr(drafter, "confidence_head", None) is None:
            raise UserError("the drafter has no confidence head: nothing to calibrate")
        block = getattr(drafter, "block_size", None)
        if args.num_drafts is not None and args.num_drafts != block:
            raise UserError(
                f"--num-drafts {args.num_drafts}: calibrate fits one temperature per block position "
                f"and the drafter's block is {block}; leave --num-drafts out"
            )
        drafter.sts_temperature = None
        eng = Engine(target.model, drafter, policy="static", max_batch=args.max_batch, max_seq=args.max_seq)
        eng.round_log = []
        prompts = [e for e in encode_prompts(target, texts, args.max_seq, "", args.system) if e is not None]
        run_engine(
            eng, prompts, sampling_params(args, len(prompts), target.eos_token_ids), "calibrate", target, args.stop
        )
        g = eng.gamma
        c, a = full_block_confidences(eng.round_log, g)
        c = c.float()  # the op's confidence dtype, so "after" rounds as dspark_draft's output does
        if c.shape[0] == 0:
            raise UserError("no round verified a whole block (generate more tokens)")
        temps = calibrate_sts(c, a)
        after = apply_sts(c, temps.tolist())
        ece_b = [ece(torch.cumprod(c.double(), 1)[:, k], (a > k).double(), 20) for k in range(g)]
        ece_a = [ece(torch.cumprod(after.double(), 1)[:, k], (a > k).double(), 20) for k in range(g)]
        with open(args.out, "w") as f:
            json.dump(
                dict(sts_temperature=temps.tolist(), rounds=int(c.shape[0]), ece_before=ece_b, ece_after=ece_a),
                f,
                indent=1,
            )
        print(f"{c.shape[0]} rounds; STS temperatures {[round(t, 3) for t in temps.tolist()]}")
        print(
            f"ECE of the survival product per position: before {[round(e, 3) for e in ece_b]}, "
            f"after {[round(e, 3) for e in ece_a]}"
        )
        print(f"wrote {args.out}")
        return 0

    return run
