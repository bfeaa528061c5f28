"""``dspark-native demo``: the fused chain verification on real-sized inputs, against the reference."""

from __future__ import annotations

import argparse
import time

from .common import UserError, command


@command("demo")
def _demo(parser: argparse.ArgumentParser):
    """Fused chain verification on real-sized inputs, against the pure-PyTorch reference."""
    parser.description = (
        "Run verify_chain on a real-sized batch (SmolLM2's vocabulary by default) with drafts "
        "that agree with the target about 70%% of the time, greedy and sampled, and print what "
        "happened: accepted drafts, tokens per round, time of the fused op vs the reference."
    )
    parser.add_argument("--requests", type=int, default=8, help="batch size R (default 8)")
    parser.add_argument("--gamma", type=int, default=7, help="drafts per request (default 7)")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary size V (default 49152, SmolLM2)")
    parser.add_argument("--temperature", type=float, default=1.0, help="temperature of the sampled run (default 1)")
    parser.add_argument("--seed", type=int, default=0)

    def run(args) -> int:
        import torch

        import dspark_native.ops as ops
        from dspark_native.reference import verify_chain_reference

        if args.requests < 1 or args.gamma < 0 or args.vocab < 2:
            raise UserError("--requests must be >= 1, --gamma >= 0 and --vocab >= 2")
        if not args.temperature > 0:
            raise UserError("--temperature must be > 0 (the greedy run is always shown)")
        R, G, V = args.requests, args.gamma, args.vocab
        g = torch.Generator().manual_seed(args.seed)
        lens = torch.randint(0, G + 1, (R,), generator=g)
        lens[0] = G
        cu = torch.cat([torch.zeros(1, dtype=torch.long), (lens + 1).cumsum(0)])
        N = int(cu[-1])
        target = torch.randn(N, V, generator=g) * 3
        drow = torch.cat([torch.arange(int(cu[r]), int(cu[r + 1]) - 1) for r in range(R)])
        draft_logits = target[drow] + torch.randn(N - R, V, generator=g) * 0.8
        drafts = torch.multinomial(torch.softmax(draft_logits / args.temperature, -1), 1, generator=g).squeeze(1)
        greedy_drafts = torch.where(torch.rand(N - R, generator=g) < 0.7, target[drow].argmax(1), drafts)
        print(f"verify_chain demo: R={R} requests, gamma={G}, V={V}, drafts per request {lens.tolist()}")
        for label, temp, d, kw in (
            ("greedy (T=0)", 0.0, greedy_drafts, {}),
            (f"sampled (T={args.temperature:g})", args.temperature, drafts, {"draft_logits": draft_logits}),
        ):
            call = dict(temperature=temp, seed=torch.arange(R) + args.seed, offset=0, max_drafts=G, **kw)
            t0 = time.perf_counter()
            out = ops.verify_chain(target, cu, d, **call)
            t_native = time.perf_counter() - t0
            t0 = time.perf_counter()
            ref = verify_chain_reference(target, cu, d, **call)
            t_ref = time.perf_counter() - t0
            same = torch.equal(out.tokens, ref[0]) and torch.equal(out.num_accepted, ref[1])
            emitted = (out.tokens >= 0).sum(1)
            print(f"\n{label}: accepted {out.num_accepted.tolist()} of {lens.tolist()}")
            print(f"  tokens per round (tau, incl. bonus/corrected token): {emitted.float().mean():.2f}")
            print(f"  request 0 emitted: {out.tokens[0][out.tokens[0] >= 0].tolist()}")
            print(
                f"  fused op {t_native * 1e3:.2f} ms, pure-PyTorch reference {t_ref * 1e3:.1f} ms "
                f"({t_ref / t_native:.0f}x); identical tokens: {same}"
            )
            if not same:
                print("  WARNING: fused op and reference differ (only floating-point ties may cause this)")
        return 0

    return run
