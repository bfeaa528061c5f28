"""``dspark-native eval``: measure a drafter (tau, per-position acceptance, confidence calibration)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .common import (
    UserError,
    add_decode_args,
    add_model_args,
    add_prompt_args,
    check_decode_args,
    command,
    encode_prompts,
    expand_prompt_paths,
    load_drafter,
    load_target,
    prompt_sets,
    refuse,
    run_engine,
    sampling_params,
)


@command("eval")
def _eval(parser: argparse.ArgumentParser):
    """Measure a drafter: tau and per-position acceptance per domain at T = 0 and 1, confidence ECE/AUC/Brier."""
    parser.description = (
        "Run speculative decoding verifying every draft (static policy) over JSONL prompt files "
        "(the domain is the file name) at each --temperatures value and report tau, per-position "
        "conditional acceptance and, for DSpark, the confidence head's ECE / AUC / Brier per "
        "position before and after STS (--sts), with reliability-diagram PNGs. JSON out."
    )
    parser.add_argument("paths", nargs="+", help="JSONL prompt files or directories")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--limit", type=int, default=None, help="at most N prompts per file")
    parser.add_argument("--out", metavar="JSON", default="eval.json")
    parser.add_argument(
        "--png",
        metavar="PREFIX",
        default=None,
        help="write PREFIX_T<t>_{raw,sts}.png reliability diagrams of the survival product",
    )
    add_model_args(parser)
    add_prompt_args(parser)
    add_decode_args(parser)

    def run(args) -> int:
        import torch

        from dspark_native.engine import Engine
        from dspark_native.plots import INSTALL_HINT, have_matplotlib, reliability_diagram
        from dspark_native.scheduler import apply_sts
        from dspark_native.training.evaluate import full_block_confidences, macro_average, round_metrics

        static = "eval measures the drafter with every draft verified (static policy), so it"
        refuse(
            args,
            {
                "policy": "eval measures the drafter with every draft verified (static policy), apart from any "
                "length policy; use bench to measure a policy",
                "sps": f"{static} uses no SPS table",
                "threshold": f"{static} uses no threshold",
                "temperature": "eval runs every value of --temperatures (default 0 1); give them there",
            },
        )
        check_decode_args(args)
        if any(not t >= 0 for t in args.temperatures):
            raise UserError("--temperatures must be >= 0")
        files = expand_prompt_paths(args.paths)
        for f in files:
            if f != "-" and not os.path.isfile(f):
                raise UserError(f"{f}: no such file")
        sets = prompt_sets(files, args.limit)
        if not sets:
            raise UserError("no usable prompt")
        png = args.png
        if png and not have_matplotlib():
            print(f"note: --png: {INSTALL_HINT}; the JSON results are written without the diagrams", file=sys.stderr)
            png = None
        target = load_target(args)
        loaded = load_drafter(args, target)
        drafter = loaded.model
        temps_sts = getattr(drafter, "sts_temperature", None)
        if hasattr(drafter, "sts_temperature"):
            drafter.sts_temperature = None  # log raw confidences; STS is applied afterwards
        eng = Engine(
            target.model,
            drafter,
            policy="static",
            num_drafts=args.num_drafts,
            max_batch=args.max_batch,
            max_seq=args.max_seq,
        )
        g = eng.gamma
        result = dict(
            target=target.name,
            drafter=loaded.name,
            kind=eng.kind,
            num_drafts=g,
            max_new_tokens=args.max_new_tokens,
            sts_temperature=temps_sts,
            temperatures={},
        )
        for T in args.temperatures:
            args.temperature = T
            per, logs = {}, []
            for dom, texts in sets:
                enc = [e for e in encode_prompts(target, texts, args.max_seq, dom, args.system) if e is not None]
                eng.round_log = []
                run_engine(
                    eng,
                    enc,
                    sampling_params(args, len(enc), target.eos_token_ids),
                    f"eval T={T:g} {dom}",
                    target,
                    args.stop,
                )
                eng.release()
                per[dom] = round_metrics(eng.round_log, g, temps_sts)
                logs += eng.round_log
            overall = round_metrics(logs, g, temps_sts)
            overall["macro_tau"] = macro_average([m["tau"] for m in per.values()])
            result["temperatures"][f"{T:g}"] = dict(domains=per, overall=overall)
            print(
                f"T = {T:g}: tau "
                + ", ".join(f"{d} {m['tau']:.2f}" for d, m in per.items())
                + f"; macro {overall['macro_tau']:.2f}"
            )
            print(
                "  conditional acceptance by position: "
                + " ".join("-" if a is None else f"{a:.2f}" for a in overall["cond_accept"])
            )
            if "confidence" in overall:
                eb = [r["ece_cum"] for r in overall["confidence"]]
                line = "  survival-product ECE by position: " + " ".join(f"{e:.3f}" for e in eb)
                if "confidence_sts" in overall:
                    line += " | after STS: " + " ".join(f"{r['ece_cum']:.3f}" for r in overall["confidence_sts"])
                print(line)
                print("  confidence AUC by position: " + " ".join(f"{r['auc']:.2f}" for r in overall["confidence"]))
                if png:
                    c, L = full_block_confidences(logs, g)
                    lab = torch.stack([(L > k).double() for k in range(g)], 1)
                    variants = [("raw", c)] + ([("sts", apply_sts(c, temps_sts))] if temps_sts else [])
                    for name, cc in variants:
                        path = f"{png}_T{T:g}_{name}.png"
                        title = f"survival product of the {name} confidences by block position, T = {T:g}"
                        reliability_diagram(
                            torch.cumprod(cc, 1), lab, path, title=title, series=[f"k={k}" for k in range(g)]
                        )
                        print(f"  wrote {path}")
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
        return 0

    return run
