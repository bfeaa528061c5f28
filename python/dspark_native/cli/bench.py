"""``dspark-native bench``: plain vs speculative decoding over prompt sets, per domain."""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics

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
    prompt_sets,
    refuse_unused_sts,
    run_engine,
    sampling_params,
)


def _phase_split(t):
    tot = sum(t[p] for p in ("draft", "schedule", "verify", "rollback"))
    return {p: (t[p] / tot if tot else 0.0) for p in ("draft", "schedule", "verify", "rollback")}


@command("bench")
def _bench(parser: argparse.ArgumentParser):
    """Plain vs speculative decoding over prompt sets: tokens/s, tau, speedup, time split, per domain."""
    parser.description = (
        "Benchmark plain decoding against speculative decoding over JSONL prompt files (or "
        "directories of them; the domain is the file name): per-request tokens/s, tau, "
        "per-position acceptance, speedup, and the round time split draft / schedule / verify / "
        "rollback, as a table and JSON."
    )
    parser.add_argument(
        "paths",
        nargs="+",
        help="JSONL prompt files or directories (e.g. /work/shared/data/prompts/eval); '-': standard input",
    )
    parser.add_argument("--limit", type=int, default=None, help="at most N prompts per file (use a few on CPU)")
    parser.add_argument("--out", metavar="JSON", help="write the results as JSON")
    add_model_args(parser)
    add_prompt_args(parser)
    add_decode_args(parser)

    def run(args) -> int:
        check_decode_args(args)
        refuse_unused_sts(args)
        if args.limit is not None and args.limit < 1:
            raise UserError("--limit must be >= 1")
        files = []
        for p in args.paths:
            if os.path.isdir(p):
                files += sorted(glob.glob(os.path.join(p, "*.jsonl")))
            elif p == "-" or os.path.isfile(p):
                files.append(p)
            else:
                raise UserError(f"{p}: no such file or directory")
        if not files:
            raise UserError("no .jsonl prompt file found")
        sets = prompt_sets(files, args.limit)
        if not sets:
            raise UserError("no usable prompt in the given files")
        target = load_target(args)
        drafter = load_drafter(args, target)
        spec = build_engine(args, target, drafter.model)
        plain = build_plain_engine(args, target)
        domains = []
        warmed = False
        for dom, texts in sets:
            enc = [e for e in encode_prompts(target, texts, args.max_seq, dom, args.system) if e is not None]
            if not enc:
                continue
            params = sampling_params(args, len(enc), target.eos_token_ids)
            if not warmed:  # first calls' one-time costs stay out of both timed runs
                runtime.warm_up(spec, enc[0])
                runtime.warm_up(plain, enc[0])
                warmed = True
            t_spec0 = dict(spec.time)
            so, sw, _ = run_engine(spec, enc, params, f"{dom} speculative", target, args.stop)
            po, pw, _ = run_engine(plain, enc, params, f"{dom} plain", target, args.stop)
            t_spec = {k: spec.time[k] - t_spec0[k] for k in spec.time}
            reqs = []
            for s_o, p_o in zip(so, po, strict=True):
                st = s_o.stats
                reqs.append(
                    dict(
                        tokens=len(s_o.token_ids),
                        tau=st.tau,
                        spec_tokens_per_s=st.tokens_per_s,
                        plain_tokens_per_s=p_o.stats.tokens_per_s,
                        speedup=(st.tokens_per_s / p_o.stats.tokens_per_s) if p_o.stats.tokens_per_s else None,
                        identical=s_o.token_ids == p_o.token_ids,
                        stats=st.to_dict(),
                    )
                )
            n = sum(len(o.token_ids) for o in so)
            rounds = sum(o.stats.rounds for o in so)
            reached = [0] * spec.gamma
            accepted = [0] * spec.gamma
            for o in so:
                for k, (a, r) in enumerate(zip(o.stats.accepted, o.stats.reached, strict=True)):
                    reached[k] += r
                    accepted[k] += a
            pb = sum(len(o.token_ids) for o in po)
            d = dict(
                domain=dom,
                prompts=len(enc),
                tokens=n,
                rounds=rounds,
                tau=n / rounds if rounds else 0.0,
                spec_tokens_per_s=n / sw,
                plain_tokens_per_s=pb / pw,
                speedup=(n / sw) / (pb / pw) if pb and pw else None,
                median_request_speedup=statistics.median([r["speedup"] for r in reqs if r["speedup"]] or [0]),
                acceptance=[a / r if r else None for a, r in zip(accepted, reached, strict=True)],
                budget_per_round=sum(o.stats.budget for o in so) / rounds if rounds else 0.0,
                time_s=t_spec,
                time_split=_phase_split(t_spec),
                identical_greedy=all(r["identical"] for r in reqs) if args.temperature == 0 else None,
                round_overhead_ms=None if spec.round_overhead_s is None else 1e3 * spec.round_overhead_s,
                requests=reqs,
            )
            domains.append(d)
        hdr = (
            f"{'domain':<12} {'n':>3} {'plain tok/s':>11} {'spec tok/s':>10} {'speedup':>7} {'tau':>5} "
            f"{'l/round':>7} {'acc@0':>5} {'draft':>6} {'sched':>6} {'verify':>6} {'rollbk':>6}"
        )
        print(
            f"target: {target.name}; drafter: {drafter.name} ({spec.kind}, {spec.gamma} drafts/round, "
            f"policy {args.policy}"
            + (f", SPS of the {args.sps_scope}" if args.policy in ("causal", "async") else "")
            + f", batch {args.max_batch}, T={args.temperature:g})"
        )
        print(hdr)
        for d in domains:
            sp = d["time_split"]
            acc0 = d["acceptance"][0] if d["acceptance"] and d["acceptance"][0] is not None else float("nan")
            print(
                f"{d['domain']:<12} {d['prompts']:>3} {d['plain_tokens_per_s']:>11.1f} "
                f"{d['spec_tokens_per_s']:>10.1f} "
                f"{d['speedup']:>6.2f}x {d['tau']:>5.2f} {d['budget_per_round']:>7.2f} {acc0:>5.2f} "
                f"{sp['draft']:>5.0%} {sp['schedule']:>6.0%} {sp['verify']:>6.0%} {sp['rollback']:>6.0%}"
            )
        print("(time split: share of the speculative round time; speedup: speculative / plain tokens/s)")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(
                    dict(
                        target=target.name,
                        drafter=drafter.name,
                        kind=spec.kind,
                        num_drafts=spec.gamma,
                        policy=args.policy,
                        sps_scope=args.sps_scope,
                        device=str(target.model.device),
                        dtype=str(target.model.dtype).replace("torch.", ""),
                        stop=args.stop,
                        max_batch=args.max_batch,
                        temperature=args.temperature,
                        max_new_tokens=args.max_new_tokens,
                        domains=domains,
                    ),
                    f,
                    indent=1,
                )
            print(f"wrote {args.out}")
        return 0

    return run
