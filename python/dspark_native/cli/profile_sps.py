"""``dspark-native profile-sps``: the target's forward steps/s by batch tokens (the SPS table)."""

from __future__ import annotations

import argparse

from .common import UserError, add_model_args, command, load_target, progress


@command("profile-sps")
def _profile_sps(parser: argparse.ArgumentParser):
    """Measure the target's forward steps/s by batch tokens (the SPS table of the causal/async policies)."""
    parser.description = (
        "Time one target forward over B = 1..--max-tokens new tokens after --context cached "
        "tokens and write the steps-per-second table as JSON (dspark_native.scheduler.profile_sps)."
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="largest batch token count (default 64)")
    parser.add_argument("--context", type=int, default=128, help="cached tokens before the timed block (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per point (median; default 3)")
    parser.add_argument("--out", metavar="JSON", default="sps.json", help="output file (default sps.json)")
    add_model_args(parser, drafter=False)

    def run(args) -> int:
        from dspark_native.engine import target_forward_fn
        from dspark_native.scheduler import profile_sps

        if args.max_tokens < 1 or args.context < 0 or args.repeats < 1:
            raise UserError("--max-tokens and --repeats must be >= 1, --context >= 0")
        target = load_target(args)
        fn = target_forward_fn(target.model, args.context, args.max_tokens)
        pts = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, args.max_tokens} & set(range(1, args.max_tokens + 1)))
        done = [0]

        def timed(B):
            fn(B)
            done[0] += 1
            progress(f"[profile-sps] {done[0]} forwards")

        table = profile_sps(
            timed,
            args.max_tokens,
            path=args.out,
            device=target.model.device,
            model=target.name,
            points=pts,
            repeats=args.repeats,
        )
        progress(f"[profile-sps] {done[0]} forwards", end=True)
        for B, s in zip(table.measured_tokens, table.seconds, strict=True):
            print(f"B = {B:>4}: {s * 1e3:8.2f} ms/step, {1 / s:8.1f} steps/s")
        print(f"wrote {args.out}")
        return 0

    return run
