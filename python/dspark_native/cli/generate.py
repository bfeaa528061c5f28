"""``dspark-native generate``: answers with speculative decoding, tau and the speedup over plain decoding."""

from __future__ import annotations

import argparse
import json
import sys

from .. import runtime
from .common import (
    UserError,
    add_decode_args,
    add_model_args,
    add_prompt_args,
    build_engine,
    build_plain_engine,
    check_decode_args,
    command,
    encode_prompts,
    load_drafter,
    load_target,
    read_prompts_reporting,
    read_stdin_text,
    refuse_unused_sts,
    run_engine,
    sampling_params,
)


@command("generate")
def _generate(parser: argparse.ArgumentParser):
    """Generate answers with DSpark speculative decoding; print tau and the speedup over plain decoding."""
    parser.description = (
        "Generate an answer for a prompt (or for every line of a JSONL prompt file in the "
        "turns format), chat template applied, with speculative decoding; print the answer, tau "
        "(tokens per round) and the speedup over plain decoding measured in the same run."
    )
    parser.add_argument("prompt", nargs="?", help="the prompt text ('-': read it from standard input)")
    parser.add_argument(
        "--prompts",
        metavar="JSONL",
        help="prompt file, one {\"turns\": [...]} a line (first turn used); '-': standard input",
    )
    parser.add_argument("--limit", type=int, default=None, help="at most N prompts from --prompts")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain-decoding run (no speedup shown)")
    parser.add_argument("--json", metavar="FILE", help="also write outputs and statistics as JSON")
    add_model_args(parser)
    add_prompt_args(parser)
    add_decode_args(parser)

    def run(args) -> int:
        if (args.prompt is None) == (args.prompts is None):
            raise UserError("give a prompt or --prompts FILE (one of them)")
        check_decode_args(args)
        refuse_unused_sts(args)
        if args.prompts:
            texts = read_prompts_reporting(args.prompts, args.limit)
            if not texts:
                raise UserError(f"{args.prompts}: no usable prompt")
        else:
            texts = [read_stdin_text("the prompt") if args.prompt == "-" else args.prompt]
        if not texts[0].strip():
            raise UserError("the prompt is empty")
        target = load_target(args)
        drafter = load_drafter(args, target)
        spec = build_engine(args, target, drafter.model)
        plain = None if args.no_baseline else build_plain_engine(args, target)  # only when it is run
        encoded = encode_prompts(target, texts, args.max_seq, args.prompts or "", args.system)
        keep = [i for i, e in enumerate(encoded) if e is not None]
        if not keep:
            raise UserError("no prompt fits the context")
        prompts = [encoded[i] for i in keep]
        params = sampling_params(args, len(prompts), target.eos_token_ids)
        print(
            f"target: {target.name}; drafter: {drafter.name} ({spec.kind}, {spec.gamma} drafts/round, "
            f"policy {args.policy})",
            file=sys.stderr,
        )
        runtime.warm_up(spec, prompts[0])
        if plain is not None:
            runtime.warm_up(plain, prompts[0])
        stream = None
        if len(prompts) == 1:
            # the answer is printed as it is generated; RequestText holds back incomplete
            # characters and a tail that may start a --stop string, so what is printed is exactly
            # the final answer
            def stream(i, text):
                print(text, end="", flush=True)

        outs, wall, answers = run_engine(spec, prompts, params, "speculative", target, args.stop, on_text=stream)
        if stream is not None:
            print()
        base = base_wall = None
        if plain is not None:
            base, base_wall, _ = run_engine(plain, prompts, params, "plain", target, args.stop)
        records = []
        for j, o in enumerate(outs):
            text = answers[j]
            if stream is None:
                print(f"--- prompt {keep[j] + 1}: {texts[keep[j]][:80]!r}")
                print(text)
            rec = dict(
                prompt=texts[keep[j]],
                prompt_tokens=len(prompts[j]),
                answer=text,
                tokens=o.token_ids,
                finish_reason=o.finish_reason,
                stats=o.stats.to_dict(),
            )
            if base is not None:
                rec["identical_to_plain"] = base[j].token_ids == o.token_ids
            records.append(rec)
        n_tok = sum(len(o.token_ids) for o in outs)
        rounds = sum(o.stats.rounds for o in outs)
        tau = n_tok / rounds if rounds else 0.0
        line = f"tau = {tau:.2f} tokens/round; speculative {n_tok / wall:.1f} tok/s"
        summary = dict(
            tau=tau,
            spec_tokens_per_s=n_tok / wall,
            spec_wall_s=wall,
            time=dict(spec.time),
            device=str(target.model.device),
            dtype=str(target.model.dtype).replace("torch.", ""),
            policy=args.policy,
            num_drafts=spec.gamma,
        )
        if base is not None:
            b_tok = sum(len(o.token_ids) for o in base)
            speed = (n_tok / wall) / (b_tok / base_wall) if b_tok and base_wall > 0 and wall > 0 else float("nan")
            line += f", plain {b_tok / base_wall:.1f} tok/s: speedup {speed:.2f}x over plain decoding"
            summary.update(plain_tokens_per_s=b_tok / base_wall, plain_wall_s=base_wall, speedup=speed)
            if args.temperature == 0:
                same = all(r["identical_to_plain"] for r in records)
                line += f"; identical to plain greedy output: {'yes' if same else 'NO'}"
        print(line)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(summary=summary, outputs=records), f, indent=1)
        return 0

    return run
