"""What the ``dspark-native`` commands share: the command registry, the model and decoding flags,
prompt files, progress lines, and the adapters from parsed flags to :mod:`dspark_native.runtime`
(which does the loading and building, and is what a server uses too)."""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
from collections.abc import Callable

from .. import runtime


class UserError(Exception):
    """A mistake in the command line or its inputs: printed as one line, exit status 2."""


#: name -> factory(parser) -> run(args) -> exit status; filled by the @command decorators of the
#: command modules, in import order (the order of `dspark-native --help`).
COMMANDS: dict[str, Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int]]] = {}


def command(name: str):
    """Register a command factory: it receives its subparser (adds flags, sets the description;
    its docstring's first line is the one-line help) and returns ``run(args) -> int``."""

    def deco(fn):
        COMMANDS[name] = fn
        return fn

    return deco


def progress(msg: str, end: bool = False) -> None:
    """One self-overwriting progress line on stderr."""
    if sys.stderr.isatty():
        print("\r" + msg + " " * 8, end="\n" if end else "", file=sys.stderr, flush=True)
    elif end:
        print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Flags
# ------------------------------------------------------------------------------------------------


def add_model_args(parser: argparse.ArgumentParser, drafter: bool = True) -> None:
    g = parser.add_argument_group("models")
    g.add_argument(
        "--target",
        metavar="DIR|GGUF",
        help="HF-style target directory (config.json, safetensors, "
        "tokenizer.json, tokenizer_config.json) or a Llama .gguf file; default: the embedded "
        "SmolLM2-135M-Instruct",
    )
    if drafter:
        g.add_argument(
            "--drafter",
            metavar="DIR",
            help="DeepSpec drafter directory (DSpark, DFlash or EAGLE-3); "
            "default: the trained DSpark drafter shipped for the embedded SmolLM2, else the "
            "package's untrained random-init DSpark drafter for the target",
        )
        g.add_argument("--sts", metavar="JSON", help="STS temperatures from `dspark-native calibrate`")
    g.add_argument(
        "--backend",
        choices=("auto", "native", "transformers"),
        default="auto",
        help="--target implementation: native (Llama/Qwen2/Qwen3), transformers (any causal LM; needs the "
        "transformers extra) or auto (native where one exists; default)",
    )
    g.add_argument("--dtype", choices=tuple(runtime.DTYPES), default="float32", help="model dtype (default float32)")
    g.add_argument(
        "--weights",
        choices=runtime.WEIGHT_FORMATS,
        default="auto",
        help="target forward path: auto (default: the native CPU kernel where the extension is built, "
        "else the fastest available), reference (the modules in --dtype, HF numerics), fused, bf16 or "
        "native (bf16 weights); plain and speculative decoding always share it (docs/models.md)",
    )
    g.add_argument("--device", default="cpu", metavar="cpu|cuda[:N]", help="where the models run (default cpu)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def add_prompt_args(parser: argparse.ArgumentParser) -> None:
    """--system: the system message put before every prompt by the chat template."""
    parser.add_argument(
        "--system",
        metavar="TEXT",
        default=None,
        help="system message before each prompt (chat template; default: the template's own)",
    )


def add_decode_args(parser: argparse.ArgumentParser) -> None:
    from dspark_native.engine import POLICIES

    g = parser.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default), > 0 sampled")
    g.add_argument("--top-k", type=int, default=0, help="top-k (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="top-p (1 = off)")
    g.add_argument("--seed", type=int, default=0, help="base seed; prompt i uses seed + i")
    g.add_argument(
        "--policy",
        choices=POLICIES,
        default=None,
        help="verification-length policy (default causal: Algorithm 1 on the confidences and this "
        "machine's SPS table, profiled once and cached; static verifies every draft; eval and "
        "calibrate always verify every draft)",
    )
    g.add_argument("--num-drafts", type=int, default=None, help="drafts per round (default: the drafter's block)")
    g.add_argument(
        "--sps-scope",
        choices=("round", "target"),
        default="round",
        help="what the causal / async policies' steps per second are of: round (default: the "
        "profiled target forward plus the round's measured drafting and bookkeeping time) or "
        "target (the profiled table alone)",
    )
    g.add_argument(
        "--threshold", type=float, default=None, help="survival threshold of --policy threshold (default 0.5)"
    )
    g.add_argument(
        "--sps",
        metavar="JSON",
        help="SPS table from `dspark-native profile-sps` (causal/async "
        "policies; default a synthetic memory-bound model)",
    )
    g.add_argument("--max-batch", type=int, default=1, help="concurrent requests (default 1)")
    g.add_argument("--max-seq", type=int, default=2048, help="context length per request (default 2048)")
    g.add_argument(
        "--stop",
        metavar="TEXT",
        action="append",
        default=[],
        help="end an answer at this text (not included); repeatable",
    )


def refuse(args, flags: dict[str, str]) -> None:
    """Refuse decoding flags a command cannot honour: ``{dest: reason}``; a flag counts as given
    when it differs from its "not given" value (None / [] / --policy static)."""
    for dest, reason in flags.items():
        v = getattr(args, dest, None)
        given = v not in (None, []) and not (dest == "policy" and v == "static")
        if given:
            raise UserError(f"--{dest.replace('_', '-')} {_show(v)}: {reason}")


def refuse_unused_sts(args) -> None:
    """--sts changes the confidences, which only the confidence-driven policies read."""
    if getattr(args, "sts", None) and args.policy == "static":
        raise UserError(
            f"--sts {args.sts}: the static policy verifies every draft and never reads the "
            "confidences; use --policy threshold, causal or async"
        )


def _show(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, list) else str(v)


def check_decode_args(args) -> None:
    """Validate the decoding flags and fill in the defaults of those whose "not given" is None."""
    if args.temperature is None:
        args.temperature = 0.0
    if getattr(args, "policy", "") is None:
        # causal: the hardware-aware scheduler (measured here: 0.96x vs 0.77x for static 7 drafts
        # on gsm8k-b, docs/benchmarks.md)
        args.policy = "causal"
    if args.threshold is not None and args.policy != "threshold":
        raise UserError(f"--threshold {args.threshold}: only --policy threshold uses it")
    if args.threshold is None:
        args.threshold = 0.5
    if args.sps and args.policy not in ("causal", "async"):
        raise UserError(f"--sps {args.sps}: only --policy causal and async use an SPS table")
    if any(not s for s in args.stop):
        raise UserError("--stop: an empty stop string would end every answer at once")
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


# ------------------------------------------------------------------------------------------------
# Prompt files
# ------------------------------------------------------------------------------------------------


def read_prompt_file(path: str, limit: int | None = None, skip: int = 0):
    """Prompts of a JSONL file in the shared turns format ({"turns": ["...", ...]}): returns
    (prompts, errors); a malformed line is reported as "path:line: reason" and skipped. The first
    turn of each line is used; the first ``skip`` usable prompts are passed over."""
    prompts, errors = [], []
    if path == "-":
        f = _stdin_once("prompts")
        lines = io.StringIO(f)
    else:
        try:
            lines = open(path, encoding="utf-8")
        except OSError as exc:
            raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with lines:
        for n, line in enumerate(lines, 1):
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


_stdin_used = []


def _stdin_once(what: str) -> str:
    """Standard input, read at most once per command (a second `-` would find it empty)."""
    if _stdin_used and _stdin_used[-1] is not None:
        raise UserError(f"{what}: standard input ('-') can be read only once")
    if sys.stdin is None or sys.stdin.closed:
        raise UserError(f"{what}: '-' given but there is no standard input")
    text = sys.stdin.read()
    _stdin_used.append(text)
    return text


def read_stdin_text(what: str = "prompt") -> str:
    """The whole of standard input as one prompt (`generate -`)."""
    return _stdin_once(what)


def reset_stdin_state() -> None:
    """Forget that stdin was read (main() calls it per command)."""
    _stdin_used.clear()


def read_prompts_reporting(path: str, limit: int | None = None, skip: int = 0) -> list[str]:
    """read_prompt_file with its malformed-line messages printed on stderr."""
    texts, errors = read_prompt_file(path, limit, skip)
    for e in errors:
        print(e, file=sys.stderr)
    return texts


def prompt_sets(files: list[str], limit: int | None) -> list[tuple[str, list[str]]]:
    """(domain, prompts) per file with usable prompts; the domain is the file name without .jsonl."""
    sets = []
    for f in files:
        texts = read_prompts_reporting(f, limit)
        if texts:
            sets.append(("stdin" if f == "-" else os.path.splitext(os.path.basename(f))[0], texts))
    return sets


def expand_prompt_paths(paths: list[str]) -> list[str]:
    """Files as given (``-``: standard input), directories replaced by their *.jsonl files (sorted)."""
    files: list[str] = []
    for p in paths:
        files += sorted(glob.glob(os.path.join(p, "*.jsonl"))) if os.path.isdir(p) else [p]
    return files


# ------------------------------------------------------------------------------------------------
# Flags -> runtime
# ------------------------------------------------------------------------------------------------


def device(args):
    """--device -> torch.device (checked before anything is loaded)."""
    try:
        return runtime.resolve_device(args.device)
    except runtime.SetupError as exc:
        raise UserError(f"--device {exc}") from None


def load_target(args) -> runtime.ChatTarget:
    """--target / --backend / --dtype / --weights / --device / --threads -> the target with its tokenizer."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = device(args)
    try:
        return runtime.load_chat_target(
            args.target,
            dtype=runtime.DTYPES[args.dtype],
            device=dev,
            weights=getattr(args, "weights", "auto"),
            backend=getattr(args, "backend", "auto"),
        )
    except runtime.SetupError as exc:
        raise UserError(f"--target {args.target}: {exc}" if args.target else str(exc)) from None


def load_drafter(args, target: runtime.ChatTarget) -> runtime.LoadedDrafter:
    """--drafter / --sts -> the drafter (a note on stderr when it is the untrained default)."""
    temps = None
    if getattr(args, "sts", None):
        try:
            temps = runtime.load_sts_temperatures(args.sts)
        except runtime.SetupError as exc:
            raise UserError(f"--sts {args.sts}: {exc}") from None
    try:
        d = runtime.load_drafter_for(target, args.drafter)
    except runtime.SetupError as exc:
        raise UserError(f"--drafter {args.drafter}: {exc}") from None
    if d.untrained:
        print(
            "note: no --drafter given: using the package's default DSpark drafter, which is UNTRAINED "
            "(random init, fixed seed): expect tau near 1; pass --drafter DIR for a trained one",
            file=sys.stderr,
        )
    if temps is not None:
        g = getattr(d.model, "block_size", None)
        if g is not None and len(temps) != g:
            raise UserError(f"--sts {args.sts}: {len(temps)} temperatures for a block of {g}")
        d.model.sts_temperature = temps
    return d


def sps_table(args):
    """--sps -> SPSTable or None."""
    if not args.sps:
        return None
    try:
        return runtime.load_sps_table(args.sps)
    except runtime.SetupError as exc:
        raise UserError(f"--sps {args.sps}: {exc}") from None


def build_engine(args, target: runtime.ChatTarget, drafter):
    """The speculative engine from the decoding flags (--policy, --threshold, --sps, --num-drafts,
    --max-batch, --max-seq)."""
    table = sps_table(args)
    if table is None and args.policy in ("causal", "async") and drafter is not None:
        # the scheduler must see this machine's costs: profile once, cached on disk
        from dspark_native.engine import drafts_per_round

        gamma = drafts_per_round(drafter, args.num_drafts)
        table = runtime.cached_sps_table(target.model, args.max_batch * (gamma + 1), model_name=target.name)
    try:
        return runtime.build_engine(
            target.model,
            drafter,
            policy=args.policy,
            threshold=args.threshold,
            sps_table=table,
            num_drafts=args.num_drafts,
            max_batch=args.max_batch,
            max_seq=args.max_seq,
            sps_scope=args.sps_scope,
        )
    except runtime.SPSTableTooShort as exc:
        raise UserError(
            f"--sps {args.sps}: the table covers {exc.have} batch tokens, the scheduler needs "
            f"{exc.need} (--max-batch x (drafts + 1)): run profile-sps with --max-tokens "
            f"{exc.need}"
        ) from None
    except runtime.SetupError as exc:
        raise UserError(str(exc)) from None


def build_plain_engine(args, target: runtime.ChatTarget):
    return runtime.build_plain_engine(target.model, max_batch=args.max_batch, max_seq=args.max_seq)


def encode_prompts(target: runtime.ChatTarget, texts: list[str], max_seq: int, where: str, system: str | None = None):
    """runtime.encode_prompts (after the --system message), a line on stderr for each prompt too
    long for --max-seq."""

    def skipped(i, n):
        print(
            f"{where} prompt {i + 1}: {n} tokens is longer than the context (--max-seq {max_seq}), skipped",
            file=sys.stderr,
        )

    try:
        return runtime.encode_prompts(target, texts, max_seq, on_skip=skipped, system=system)
    except runtime.SetupError as exc:
        raise UserError(f"--system: {exc}") from None


def sampling_params(args, n: int, eos: list[int]) -> list:
    """One SamplingParams per prompt from the decoding flags (prompt i: seed + i)."""
    return runtime.sampling_params(
        n,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_token_ids=eos,
    )


def run_engine(engine, prompts, sampling, label: str, target: runtime.ChatTarget, stop=(), on_text=None):
    """runtime.run_prompts with the target's tokenizer, the --stop strings and a progress line
    (none while streaming text): (outputs, wall seconds, answer texts)."""
    on_progress = None
    if on_text is None:

        def on_progress(done, total, el):
            progress(f"[{label}] {done}/{total} requests done, {el:.1f} s")

    outs, wall, texts = runtime.run_prompts(
        engine,
        prompts,
        sampling,
        tokenizer=target.tokenizer,
        stop_strings=list(stop),
        on_text=on_text,
        on_progress=on_progress,
    )
    if on_text is None:
        progress(f"[{label}] {len(outs)}/{len(outs)} requests done, {wall:.1f} s", end=True)
    return outs, wall, texts
