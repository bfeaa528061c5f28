"""The ``dspark-native`` command (also ``python -m dspark_native``).

Subcommands register themselves in ``COMMANDS``; each gets ``--help``. User mistakes are reported
as one line on stderr with exit status 2, not as a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Dict, List, Optional


class UserError(Exception):
    """A mistake in the command line or its inputs: printed as one line, exit status 2."""


COMMANDS: Dict[str, Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int]]] = {}


def command(name: str):
    def deco(fn):
        COMMANDS[name] = fn
        return fn

    return deco


@command("demo")
def _demo(parser: argparse.ArgumentParser):
    """Fused chain verification on real-sized inputs, against the pure-PyTorch reference."""
    parser.description = ("Run verify_chain on a real-sized batch (SmolLM2's vocabulary by default) with drafts "
                          "that agree with the target about 70%% of the time, greedy and sampled, and print what "
                          "happened: accepted drafts, tokens per round, time of the fused op vs the reference.")
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
        for label, temp, d, kw in (("greedy (T=0)", 0.0, greedy_drafts, {}),
                                   (f"sampled (T={args.temperature:g})", args.temperature, drafts,
                                    {"draft_logits": draft_logits})):
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
            print(f"  fused op {t_native * 1e3:.2f} ms, pure-PyTorch reference {t_ref * 1e3:.1f} ms "
                  f"({t_ref / t_native:.0f}x); identical tokens: {same}")
            if not same:
                print("  WARNING: fused op and reference differ (only floating-point ties may cause this)")
        return 0

    return run


# ------------------------------------------------------------------------------------------------
# Engine commands: generate, bench, profile-sps, calibrate (docs/engine.md)
# ------------------------------------------------------------------------------------------------

def _progress(msg: str, end: bool = False) -> None:
    """One self-overwriting progress line on stderr."""
    if sys.stderr.isatty():
        print("\r" + msg + " " * 8, end="\n" if end else "", file=sys.stderr, flush=True)
    elif end:
        print(msg, file=sys.stderr, flush=True)


def _add_model_args(parser: argparse.ArgumentParser, drafter: bool = True) -> None:
    g = parser.add_argument_group("models")
    g.add_argument("--target", metavar="DIR", help="HF-style target directory (config.json, safetensors, "
                   "tokenizer.json, tokenizer_config.json); default: the embedded SmolLM2-135M-Instruct")
    if drafter:
        g.add_argument("--drafter", metavar="DIR", help="DeepSpec drafter directory (DSpark, DFlash or EAGLE-3); "
                       "default: the trained DSpark drafter shipped for the embedded SmolLM2, else the "
                       "package's untrained random-init DSpark drafter for the target")
        g.add_argument("--sts", metavar="JSON", help="STS temperatures from `dspark-native calibrate`")
    g.add_argument("--backend", choices=("auto", "native", "transformers"), default="auto",
                   help="--target implementation: native (Llama/Qwen3), transformers (any causal LM; needs the "
                   "transformers extra) or auto (native where possible; default)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model dtype (default float32)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _add_decode_args(parser: argparse.ArgumentParser) -> None:
    from dspark_native.engine import POLICIES

    g = parser.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), > 0 sampled")
    g.add_argument("--top-k", type=int, default=0, help="top-k (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="top-p (1 = off)")
    g.add_argument("--seed", type=int, default=0, help="base seed; prompt i uses seed + i")
    g.add_argument("--policy", choices=POLICIES, default="static", help="verification-length policy (default static)")
    g.add_argument("--num-drafts", type=int, default=None, help="drafts per round (default: the drafter's block)")
    g.add_argument("--threshold", type=float, default=0.5, help="survival threshold of --policy threshold")
    g.add_argument("--sps", metavar="JSON", help="SPS table from `dspark-native profile-sps` (causal/async "
                   "policies; default a synthetic memory-bound model)")
    g.add_argument("--max-batch", type=int, default=1, help="concurrent requests (default 1)")
    g.add_argument("--max-seq", type=int, default=2048, help="context length per request (default 2048)")


def _dtype(name):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _load_target(args):
    """(model, tokenizer, chat_template, eos_ids, name)."""
    import torch

    from dspark_native.models import CheckpointError, load_embedded_smollm2, load_target
    from dspark_native.models.tokenizer import load_tokenizer_files

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.target:
            import os

            if not os.path.isdir(args.target):
                raise UserError(f"--target {args.target}: not a directory")
            model = load_target(args.target, dtype=_dtype(args.dtype), backend=args.backend)
            tok, chat = load_tokenizer_files(args.target)
            if tok is None:
                raise UserError(f"--target {args.target}: no tokenizer.json in the directory")
            eos = []
            e = model.config.raw.get("eos_token_id")
            eos += [e] if isinstance(e, int) else list(e or [])
            for name in ("<|im_end|>", getattr(chat, "eos_token", None)):
                i = tok.token_to_id(name) if name else None
                if i is not None and i not in eos:
                    eos.append(i)
            return model, tok, chat, eos, args.target
        em = load_embedded_smollm2(dtype=_dtype(args.dtype))
        return em.model, em.tokenizer, em.chat_template, list(em.eos_token_ids), "SmolLM2-135M-Instruct (embedded)"
    except CheckpointError as exc:
        raise UserError(f"target: {exc}") from None
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None


def _load_drafter(args, target):
    import json
    import os

    from dspark_native.engine import default_drafter
    from dspark_native.models import CheckpointError, load_drafter
    from dspark_native.models.embedded import load_embedded_drafter, shipped_drafter_dir

    if args.drafter:
        if not os.path.isdir(args.drafter):
            raise UserError(f"--drafter {args.drafter}: not a directory")
        try:
            d = load_drafter(args.drafter, target=target, dtype=target.dtype)
        except CheckpointError as exc:
            raise UserError(f"drafter: {exc}") from None
        name = args.drafter
    elif not getattr(args, "target", None) and shipped_drafter_dir() is not None:
        d = load_embedded_drafter(target)
        name = "shipped DSpark drafter for SmolLM2 (trained; model card: " + shipped_drafter_dir() + "/README.md)"
    else:
        d = default_drafter(target)
        name = "default (UNTRAINED random-init DSpark drafter)"
        print("note: no --drafter given: using the package's default DSpark drafter, which is UNTRAINED "
              "(random init, fixed seed): expect tau near 1; pass --drafter DIR for a trained one", file=sys.stderr)
    if getattr(args, "sts", None):
        try:
            with open(args.sts) as f:
                temps = json.load(f)["sts_temperature"]
            d.sts_temperature = [float(t) for t in temps]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"--sts {args.sts}: cannot read STS temperatures ({exc})") from None
        g = getattr(d, "block_size", None)
        if g is not None and len(d.sts_temperature) != g:
            raise UserError(f"--sts {args.sts}: {len(d.sts_temperature)} temperatures for a block of {g}")
    return d, name


def _policy_kwargs(args):
    kw = dict(threshold=args.threshold)
    if args.sps:
        from dspark_native.scheduler import SPSTable

        try:
            kw["sps_table"] = SPSTable.load(args.sps)
        except (OSError, ValueError, TypeError) as exc:
            raise UserError(f"--sps {args.sps}: {exc}") from None
    return kw


def read_prompt_file(path: str, limit: Optional[int] = None, skip: int = 0):
    """Prompts of a JSONL file in the shared turns format ({"turns": ["...", ...]}): returns
    (prompts, errors); a malformed line is reported as "path:line: reason" and skipped. The first
    turn of each line is used; the first ``skip`` usable prompts are passed over."""
    import json

    prompts, errors = [], []
    try:
        f = open(path, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                turns = obj.get("turns") if isinstance(obj, dict) else None
                if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0].strip():
                    raise ValueError('expected {"turns": ["non-empty text", ...]}')
            except ValueError as exc:
                errors.append(f"{path}:{n}: malformed line skipped: {str(exc)[:120]}")
                continue
            if skip > 0:
                skip -= 1
                continue
            prompts.append(turns[0])
            if limit is not None and len(prompts) >= limit:
                break
    return prompts, errors


def _encode(text, tok, chat):
    msgs = [{"role": "user", "content": text}]
    if chat is not None:
        return chat.encode(tok, msgs)
    return tok.encode(text).ids


def _run_engine(engine, prompts, params, label, stream=None):
    """Run prompts to completion with a progress line; returns (outputs, wall seconds)."""
    t0 = time.perf_counter()
    ids = []
    for p, sp in zip(prompts, params):
        ids.append(engine.add(p, sp, on_tokens=stream))
    done = 0
    while engine.has_unfinished():
        done += len(engine.step())
        if stream is None:
            _progress(f"[{label}] {done}/{len(ids)} requests done, {time.perf_counter() - t0:.1f} s")
    wall = time.perf_counter() - t0
    if stream is None:
        _progress(f"[{label}] {len(ids)}/{len(ids)} requests done, {wall:.1f} s", end=True)
    return [engine.output(i) for i in ids], wall


def _params(args, n, eos):
    from dspark_native.engine import SamplingParams

    return [SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed + i, stop_token_ids=list(eos)) for i in range(n)]


def _check_decode_args(args):
    if args.max_new_tokens < 0:
        raise UserError("--max-new-tokens must be >= 0")
    if not args.temperature >= 0:
        raise UserError("--temperature must be >= 0")
    if not 0 < args.top_p <= 1 or args.top_k < 0:
        raise UserError("--top-p must be in (0, 1] and --top-k >= 0")
    if args.max_batch < 1 or args.max_seq < 2:
        raise UserError("--max-batch must be >= 1 and --max-seq >= 2")
    if args.num_drafts is not None and args.num_drafts < 1:
        raise UserError("--num-drafts must be >= 1")


def _engines(args, target, drafter):
    from dspark_native.engine import Engine

    try:
        spec = Engine(target, drafter, policy=args.policy, policy_kwargs=_policy_kwargs(args),
                      num_drafts=args.num_drafts, max_batch=args.max_batch, max_seq=args.max_seq)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    need = args.max_batch * (spec.gamma + 1)
    if args.sps and args.policy in ("causal", "async"):
        have = len(_policy_kwargs(args)["sps_table"].sps)
        if have < need:
            raise UserError(f"--sps {args.sps}: the table covers {have} batch tokens, the scheduler needs {need} "
                            f"(--max-batch x (drafts + 1)): run profile-sps with --max-tokens {need}")
    plain = Engine(target, None, max_batch=args.max_batch, max_seq=args.max_seq)
    return spec, plain


def _add_prompts(tok, chat, texts, max_seq, where):
    out = []
    for i, t in enumerate(texts):
        ids = _encode(t, tok, chat)
        if len(ids) > max_seq:
            print(f"{where} prompt {i + 1}: {len(ids)} tokens is longer than the context (--max-seq {max_seq}), "
                  "skipped", file=sys.stderr)
            out.append(None)
        else:
            out.append(ids)
    return out


@command("generate")
def _generate(parser: argparse.ArgumentParser):
    """Generate answers with DSpark speculative decoding; print tau and the speedup over plain decoding."""
    parser.description = ("Generate an answer for a prompt (or for every line of a JSONL prompt file in the "
                          "turns format), chat template applied, with speculative decoding; print the answer, tau "
                          "(tokens per round) and the speedup over plain decoding measured in the same run.")
    parser.add_argument("prompt", nargs="?", help="the prompt text")
    parser.add_argument("--prompts", metavar="JSONL", help='prompt file, one {"turns": [...]} a line (first turn used)')
    parser.add_argument("--limit", type=int, default=None, help="at most N prompts from --prompts")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain-decoding run (no speedup shown)")
    parser.add_argument("--json", metavar="FILE", help="also write outputs and statistics as JSON")
    _add_model_args(parser)
    _add_decode_args(parser)

    def run(args) -> int:
        import json

        if (args.prompt is None) == (args.prompts is None):
            raise UserError("give a prompt or --prompts FILE (one of them)")
        if args.prompt is not None and not args.prompt.strip():
            raise UserError("the prompt is empty")
        _check_decode_args(args)
        if args.prompts:
            texts, errors = read_prompt_file(args.prompts, args.limit)
            for e in errors:
                print(e, file=sys.stderr)
            if not texts:
                raise UserError(f"{args.prompts}: no usable prompt")
        else:
            texts = [args.prompt]
        target, tok, chat, eos, tname = _load_target(args)
        drafter, dname = _load_drafter(args, target)
        spec, plain = _engines(args, target, drafter)
        encoded = _add_prompts(tok, chat, texts, args.max_seq, args.prompts or "")
        keep = [i for i, e in enumerate(encoded) if e is not None]
        if not keep:
            raise UserError("no prompt fits the context")
        prompts = [encoded[i] for i in keep]
        params = _params(args, len(prompts), eos)
        print(f"target: {tname}; drafter: {dname} ({spec.kind}, {spec.gamma} drafts/round, policy {args.policy})",
              file=sys.stderr)
        stream = None
        if len(prompts) == 1:
            shown = {"text": ""}

            def stream(rid, toks, _out=[]):  # noqa: B006 - per-run accumulator
                _out.extend(toks)
                text = tok.decode(_out, skip_special_tokens=True)
                print(text[len(shown["text"]):], end="", flush=True)
                shown["text"] = text

        outs, wall = _run_engine(spec, prompts, params, "speculative", stream)
        if stream is not None:
            print()
        base = base_wall = None
        if not args.no_baseline:
            base, base_wall = _run_engine(plain, prompts, params, "plain")
        records = []
        for j, o in enumerate(outs):
            text = tok.decode(o.token_ids, skip_special_tokens=True)
            if stream is None:
                print(f"--- prompt {keep[j] + 1}: {texts[keep[j]][:80]!r}")
                print(text)
            rec = dict(prompt=texts[keep[j]], answer=text, tokens=o.token_ids, finish_reason=o.finish_reason,
                       stats=o.stats.to_dict())
            if base is not None:
                rec["identical_to_plain"] = base[j].token_ids == o.token_ids
            records.append(rec)
        n_tok = sum(len(o.token_ids) for o in outs)
        rounds = sum(o.stats.rounds for o in outs)
        tau = n_tok / rounds if rounds else 0.0
        line = f"tau = {tau:.2f} tokens/round; speculative {n_tok / wall:.1f} tok/s"
        summary = dict(tau=tau, spec_tokens_per_s=n_tok / wall, spec_wall_s=wall, time=dict(spec.time))
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


def _phase_split(t):
    tot = sum(t[p] for p in ("draft", "schedule", "verify", "rollback"))
    return {p: (t[p] / tot if tot else 0.0) for p in ("draft", "schedule", "verify", "rollback")}


@command("bench")
def _bench(parser: argparse.ArgumentParser):
    """Plain vs speculative decoding over prompt sets: tokens/s, tau, speedup, time split, per domain."""
    parser.description = ("Benchmark plain decoding against speculative decoding over JSONL prompt files (or "
                          "directories of them; the domain is the file name): per-request tokens/s, tau, "
                          "per-position acceptance, speedup, and the round time split draft / schedule / verify / "
                          "rollback, as a table and JSON.")
    parser.add_argument("paths", nargs="+", help="JSONL prompt files or directories (e.g. /work/shared/data/prompts/eval)")
    parser.add_argument("--limit", type=int, default=None, help="at most N prompts per file (use a few on CPU)")
    parser.add_argument("--out", metavar="JSON", help="write the results as JSON")
    _add_model_args(parser)
    _add_decode_args(parser)

    def run(args) -> int:
        import glob
        import json
        import os
        import statistics

        _check_decode_args(args)
        if args.limit is not None and args.limit < 1:
            raise UserError("--limit must be >= 1")
        files = []
        for p in args.paths:
            if os.path.isdir(p):
                files += sorted(glob.glob(os.path.join(p, "*.jsonl")))
            elif os.path.isfile(p):
                files.append(p)
            else:
                raise UserError(f"{p}: no such file or directory")
        if not files:
            raise UserError("no .jsonl prompt file found")
        sets = []
        for f in files:
            texts, errors = read_prompt_file(f, args.limit)
            for e in errors:
                print(e, file=sys.stderr)
            if texts:
                sets.append((os.path.splitext(os.path.basename(f))[0], texts))
        if not sets:
            raise UserError("no usable prompt in the given files")
        target, tok, chat, eos, tname = _load_target(args)
        drafter, dname = _load_drafter(args, target)
        spec, plain = _engines(args, target, drafter)
        domains, table = [], []
        for dom, texts in sets:
            enc = [e for e in _add_prompts(tok, chat, texts, args.max_seq, dom) if e is not None]
            if not enc:
                continue
            params = _params(args, len(enc), eos)
            t_spec0 = dict(spec.time)
            so, sw = _run_engine(spec, enc, params, f"{dom} speculative")
            po, pw = _run_engine(plain, enc, params, f"{dom} plain")
            t_spec = {k: spec.time[k] - t_spec0[k] for k in spec.time}
            reqs = []
            for s_o, p_o in zip(so, po):
                st = s_o.stats
                reqs.append(dict(tokens=len(s_o.token_ids), tau=st.tau, spec_tokens_per_s=st.tokens_per_s,
                                 plain_tokens_per_s=p_o.stats.tokens_per_s,
                                 speedup=(st.tokens_per_s / p_o.stats.tokens_per_s) if p_o.stats.tokens_per_s else None,
                                 identical=s_o.token_ids == p_o.token_ids, stats=st.to_dict()))
            n = sum(len(o.token_ids) for o in so)
            rounds = sum(o.stats.rounds for o in so)
            reached = [0] * spec.gamma
            accepted = [0] * spec.gamma
            for o in so:
                for k, (a, r) in enumerate(zip(o.stats.accepted, o.stats.reached)):
                    reached[k] += r
                    accepted[k] += a
            pb = sum(len(o.token_ids) for o in po)
            d = dict(domain=dom, prompts=len(enc), tokens=n, rounds=rounds, tau=n / rounds if rounds else 0.0,
                     spec_tokens_per_s=n / sw, plain_tokens_per_s=pb / pw,
                     speedup=(n / sw) / (pb / pw) if pb and pw else None,
                     median_request_speedup=statistics.median([r["speedup"] for r in reqs if r["speedup"]] or [0]),
                     acceptance=[a / r if r else None for a, r in zip(accepted, reached)],
                     budget_per_round=sum(o.stats.budget for o in so) / rounds if rounds else 0.0,
                     time_s=t_spec, time_split=_phase_split(t_spec),
                     identical_greedy=all(r["identical"] for r in reqs) if args.temperature == 0 else None,
                     requests=reqs)
            domains.append(d)
        hdr = (f"{'domain':<12} {'n':>3} {'plain tok/s':>11} {'spec tok/s':>10} {'speedup':>7} {'tau':>5} "
               f"{'l/round':>7} {'acc@0':>5} {'draft':>6} {'sched':>6} {'verify':>6} {'rollbk':>6}")
        print(f"target: {tname}; drafter: {dname} ({spec.kind}, {spec.gamma} drafts/round, policy {args.policy}, "
              f"batch {args.max_batch}, T={args.temperature:g})")
        print(hdr)
        for d in domains:
            sp = d["time_split"]
            acc0 = d["acceptance"][0] if d["acceptance"] and d["acceptance"][0] is not None else float("nan")
            print(f"{d['domain']:<12} {d['prompts']:>3} {d['plain_tokens_per_s']:>11.1f} {d['spec_tokens_per_s']:>10.1f} "
                  f"{d['speedup']:>6.2f}x {d['tau']:>5.2f} {d['budget_per_round']:>7.2f} {acc0:>5.2f} "
                  f"{sp['draft']:>5.0%} {sp['schedule']:>6.0%} {sp['verify']:>6.0%} {sp['rollback']:>6.0%}")
        print("(time split: share of the speculative round time; speedup: speculative / plain tokens/s)")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(target=tname, drafter=dname, kind=spec.kind, num_drafts=spec.gamma, policy=args.policy,
                               max_batch=args.max_batch, temperature=args.temperature,
                               max_new_tokens=args.max_new_tokens, domains=domains), f, indent=1)
            print(f"wrote {args.out}")
        return 0

    return run


@command("profile-sps")
def _profile_sps(parser: argparse.ArgumentParser):
    """Measure the target's forward steps/s by batch tokens (the SPS table of the causal/async policies)."""
    parser.description = ("Time one target forward over B = 1..--max-tokens new tokens after --context cached "
                          "tokens and write the steps-per-second table as JSON (dspark_native.scheduler.profile_sps).")
    parser.add_argument("--max-tokens", type=int, default=64, help="largest batch token count (default 64)")
    parser.add_argument("--context", type=int, default=128, help="cached tokens before the timed block (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per point (median; default 3)")
    parser.add_argument("--out", metavar="JSON", default="sps.json", help="output file (default sps.json)")
    _add_model_args(parser, drafter=False)

    def run(args) -> int:
        from dspark_native.engine import target_forward_fn
        from dspark_native.scheduler import profile_sps

        if args.max_tokens < 1 or args.context < 0 or args.repeats < 1:
            raise UserError("--max-tokens and --repeats must be >= 1, --context >= 0")
        target, _, _, _, tname = _load_target(args)
        fn = target_forward_fn(target, args.context, args.max_tokens)
        pts = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, args.max_tokens} & set(range(1, args.max_tokens + 1)))
        done = [0]

        def timed(B):
            fn(B)
            done[0] += 1
            _progress(f"[profile-sps] {done[0]} forwards")

        table = profile_sps(timed, args.max_tokens, path=args.out, device="cpu", model=tname, points=pts,
                            repeats=args.repeats)
        _progress(f"[profile-sps] {done[0]} forwards", end=True)
        for B, s in zip(table.measured_tokens, table.seconds):
            print(f"B = {B:>4}: {s * 1e3:8.2f} ms/step, {1 / s:8.1f} steps/s")
        print(f"wrote {args.out}")
        return 0

    return run


@command("calibrate")
def _calibrate(parser: argparse.ArgumentParser):
    """Fit the drafter's per-position STS confidence temperatures on held-out prompts."""
    parser.description = ("Run speculative decoding verifying every draft (static policy) over JSONL prompts, "
                          "record the confidences and accepted lengths of each round, fit per-position STS "
                          "temperatures (dspark_native.scheduler.calibrate_sts) and write them as JSON for --sts.")
    parser.add_argument("paths", nargs="+", help="JSONL prompt files (held out: never the eval set you report on)")
    parser.add_argument("--limit", type=int, default=None, help="at most N prompts per file")
    parser.add_argument("--skip", type=int, default=0,
                        help="pass over the first N prompts of each file (e.g. those a drafter was trained on)")
    parser.add_argument("--out", metavar="JSON", default="sts.json", help="output file (default sts.json)")
    _add_model_args(parser)
    _add_decode_args(parser)

    def run(args) -> int:
        import json

        import torch

        from dspark_native.engine import Engine
        from dspark_native.metrics import ece
        from dspark_native.scheduler import apply_sts, calibrate_sts
        from dspark_native.training.evaluate import full_block_confidences

        _check_decode_args(args)
        texts = []
        if args.skip < 0:
            raise UserError("--skip must be >= 0")
        for p in args.paths:
            t, errors = read_prompt_file(p, args.limit, args.skip)
            for e in errors:
                print(e, file=sys.stderr)
            texts += t
        if not texts:
            raise UserError("no usable prompt")
        target, tok, chat, eos, _ = _load_target(args)
        drafter, _ = _load_drafter(args, target)
        if getattr(drafter, "confidence_head", None) is None:
            raise UserError("the drafter has no confidence head: nothing to calibrate")
        drafter.sts_temperature = None
        eng = Engine(target, drafter, policy="static", max_batch=args.max_batch, max_seq=args.max_seq)
        eng.round_log = []
        prompts = [e for e in _add_prompts(tok, chat, texts, args.max_seq, "") if e is not None]
        _run_engine(eng, prompts, _params(args, len(prompts), eos), "calibrate")
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
            json.dump(dict(sts_temperature=temps.tolist(), rounds=int(c.shape[0]), ece_before=ece_b, ece_after=ece_a),
                      f, indent=1)
        print(f"{c.shape[0]} rounds; STS temperatures {[round(t, 3) for t in temps.tolist()]}")
        print(f"ECE of the survival product per position: before {[round(e, 3) for e in ece_b]}, "
              f"after {[round(e, 3) for e in ece_a]}")
        print(f"wrote {args.out}")
        return 0

    return run


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
    _add_model_args(parser, drafter=False)

    def run(args) -> int:
        import glob
        import os

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
        target, tok, chat, eos, tname = _load_target(args)
        from dspark_native.models.config import default_target_layer_ids

        n = target.config.num_hidden_layers
        ids = default_target_layer_ids(n, 5) if n >= 5 else list(range(n))
        if not args.no_generate:
            dcfg = DataConfig(files=[os.path.abspath(f) for f in files], limit_per_file=args.limit_per_file,
                              max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.answer_tokens,
                              batch=args.data_batch, sequences_per_shard=args.data_batch, target_layer_ids=ids)
            try:
                build_training_data(target, lambda t: _encode(t, tok, chat), eos, dcfg, args.data_dir,
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
        return 0

    return run


@command("eval")
def _eval(parser: argparse.ArgumentParser):
    """Measure a drafter: tau and per-position acceptance per domain at T = 0 and 1, confidence ECE/AUC/Brier."""
    parser.description = ("Run speculative decoding verifying every draft (static policy) over JSONL prompt files "
                          "(the domain is the file name) at each --temperatures value and report tau, per-position "
                          "conditional acceptance and, for DSpark, the confidence head's ECE / AUC / Brier per "
                          "position before and after STS (--sts), with reliability-diagram PNGs. JSON out.")
    parser.add_argument("paths", nargs="+", help="JSONL prompt files or directories")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--limit", type=int, default=None, help="at most N prompts per file")
    parser.add_argument("--out", metavar="JSON", default="eval.json")
    parser.add_argument("--png", metavar="PREFIX", default=None,
                        help="write PREFIX_T<t>_{raw,sts}.png reliability diagrams of the survival product")
    _add_model_args(parser)
    _add_decode_args(parser)

    def run(args) -> int:
        import glob
        import json
        import os

        import torch

        from dspark_native.engine import Engine
        from dspark_native.metrics import reliability_diagram_png
        from dspark_native.scheduler import apply_sts
        from dspark_native.training.evaluate import full_block_confidences, macro_average, round_metrics

        args.temperature = 0.0
        _check_decode_args(args)
        if any(not t >= 0 for t in args.temperatures):
            raise UserError("--temperatures must be >= 0")
        files = []
        for p in args.paths:
            files += sorted(glob.glob(os.path.join(p, "*.jsonl"))) if os.path.isdir(p) else [p]
        sets = []
        for f in files:
            if not os.path.isfile(f):
                raise UserError(f"{f}: no such file")
            texts, errors = read_prompt_file(f, args.limit)
            for e in errors:
                print(e, file=sys.stderr)
            if texts:
                sets.append((os.path.splitext(os.path.basename(f))[0], texts))
        if not sets:
            raise UserError("no usable prompt")
        target, tok, chat, eos, tname = _load_target(args)
        drafter, dname = _load_drafter(args, target)
        temps_sts = getattr(drafter, "sts_temperature", None)
        if hasattr(drafter, "sts_temperature"):
            drafter.sts_temperature = None  # log raw confidences; STS is applied afterwards
        eng = Engine(target, drafter, policy="static", num_drafts=args.num_drafts, max_batch=args.max_batch,
                     max_seq=args.max_seq)
        g = eng.gamma
        result = dict(target=tname, drafter=dname, kind=eng.kind, num_drafts=g, max_new_tokens=args.max_new_tokens,
                      sts_temperature=temps_sts, temperatures={})
        for T in args.temperatures:
            args.temperature = T
            per, logs = {}, []
            for dom, texts in sets:
                enc = [e for e in _add_prompts(tok, chat, texts, args.max_seq, dom) if e is not None]
                eng.round_log = []
                _run_engine(eng, enc, _params(args, len(enc), eos), f"eval T={T:g} {dom}")
                eng.release()
                per[dom] = round_metrics(eng.round_log, g, temps_sts)
                logs += eng.round_log
            overall = round_metrics(logs, g, temps_sts)
            overall["macro_tau"] = macro_average([m["tau"] for m in per.values()])
            result["temperatures"][f"{T:g}"] = dict(domains=per, overall=overall)
            print(f"T = {T:g}: tau " + ", ".join(f"{d} {m['tau']:.2f}" for d, m in per.items())
                  + f"; macro {overall['macro_tau']:.2f}")
            print("  conditional acceptance by position: "
                  + " ".join("-" if a is None else f"{a:.2f}" for a in overall["cond_accept"]))
            if "confidence" in overall:
                eb = [r["ece_cum"] for r in overall["confidence"]]
                line = "  survival-product ECE by position: " + " ".join(f"{e:.3f}" for e in eb)
                if "confidence_sts" in overall:
                    line += " | after STS: " + " ".join(f"{r['ece_cum']:.3f}" for r in overall["confidence_sts"])
                print(line)
                print("  confidence AUC by position: " + " ".join(f"{r['auc']:.2f}" for r in overall["confidence"]))
                if args.png:
                    c, L = full_block_confidences(logs, g)
                    lab = torch.stack([(L > k).double() for k in range(g)], 1)
                    variants = [("raw", c)] + ([("sts", apply_sts(c, temps_sts))] if temps_sts else [])
                    for name, cc in variants:
                        path = f"{args.png}_T{T:g}_{name}.png"
                        reliability_diagram_png(torch.cumprod(cc, 1), lab, path)
                        print(f"  wrote {path}")
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
        return 0

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspark-native", description="Fast, exact DSpark speculative decoding.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, factory in COMMANDS.items():
        p = sub.add_parser(name, help=(factory.__doc__ or "").strip().splitlines()[0])
        p.set_defaults(_run=factory(p))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"dspark-native {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
