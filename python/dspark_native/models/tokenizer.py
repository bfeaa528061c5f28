"""Tokenizer (from GGUF metadata, via the ``tokenizers`` package) and chat-template rendering."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

from .config import CheckpointError

# llama.cpp token types: 3 = control (<|im_start|> ...), 4 = user-defined; both are special.
_SPECIAL_TOKEN_TYPES = (3, 4)
# Pre-tokenizers we reproduce exactly. "smollm" (StarCoder-style): every digit on its own, then
# the GPT-2 byte-level regex.
_SUPPORTED_PRE = ("smollm", "gpt2", "default", "starcoder", "refact")


def tokenizer_from_gguf_metadata(meta: dict[str, object]):
    """Build a ``tokenizers.Tokenizer`` from GGUF ``tokenizer.ggml.*`` fields (BPE / gpt2 only).

    meta: field name -> Python value (lists for tokens, merges, token_type).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(
            f"GGUF field 'tokenizer.ggml.model' = {kind!r}: only byte-level BPE ('gpt2') tokenizers are supported"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _SUPPORTED_PRE:
        raise CheckpointError(f"GGUF field 'tokenizer.ggml.pre' = {pre!r} unsupported (known: {_SUPPORTED_PRE})")
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not tokens:
        raise CheckpointError("GGUF: missing field 'tokenizer.ggml.tokens'")
    if merges is None:
        raise CheckpointError("GGUF: missing field 'tokenizer.ggml.merges'")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise CheckpointError(f"GGUF: malformed merge {m!r} in 'tokenizer.ggml.merges'")
        pairs.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if int(ty) in _SPECIAL_TOKEN_TYPES
    ]
    tok.add_special_tokens(special)
    return tok


class ChatTemplate:
    """Renders chat messages ([{"role", "content"}]) to the prompt string of a model.

    Uses jinja2 (sandboxed, HF settings) when it is importable; otherwise a built-in
    ChatML renderer (``<|im_start|>role\\ncontent<|im_end|>\\n``, the SmolLM2 format, including a
    default system message when the template has one) for ChatML-style templates.
    """

    def __init__(self, template: str, bos_token: str = "", eos_token: str = ""):
        if not isinstance(template, str) or not template:
            raise ValueError("chat template must be a non-empty string")
        self.template = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.is_chatml = "<|im_start|>" in template and "<|im_end|>" in template
        m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template, re.S)
        # A literal system message in the template is the default one (inserted when the first
        # message is not a system message).
        self.default_system = m.group(1) if m else None

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        try:
            import jinja2  # noqa: F401
        except ImportError:
            return self.render_builtin(messages, add_generation_prompt)
        return self.render_jinja(messages, add_generation_prompt)

    def render_jinja(self, messages, add_generation_prompt: bool = True) -> str:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise ValueError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.template).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

    def render_builtin(self, messages, add_generation_prompt: bool = True) -> str:
        """ChatML rendering without jinja2 (only for ChatML templates)."""
        if not self.is_chatml:
            raise RuntimeError("this chat template is not ChatML; install jinja2 to render it")
        _check_messages(messages)
        out = []
        if messages and messages[0]["role"] != "system" and self.default_system is not None:
            out.append(f"<|im_start|>system\n{self.default_system}<|im_end|>\n")
        for m in messages:
            out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n")
        return "".join(out)

    def encode(self, tokenizer, messages, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered prompt (special tokens in the text are recognised)."""
        text = self.render(messages, add_generation_prompt)
        return tokenizer.encode(text, add_special_tokens=False).ids


def _check_messages(messages) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a dict with string 'role' and 'content'")


def save_tokenizer_files(directory: str, tokenizer, chat_template: ChatTemplate | None) -> None:
    """tokenizer.json, tokenizer_config.json (with chat_template) and chat_template.jinja."""
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template is not None:
        cfg.update(
            chat_template=chat_template.template, bos_token=chat_template.bos_token, eos_token=chat_template.eos_token
        )
        with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(chat_template.template)
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)


def load_tokenizer_files(directory: str):
    """(tokenizers.Tokenizer, ChatTemplate or None) from an HF-style directory."""
    from tokenizers import Tokenizer

    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"tokenizer.json not found in {directory!r}")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable tokenizer: {e}") from e
    template = None
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        if isinstance(cfg.get("chat_template"), str):
            template = ChatTemplate(
                cfg["chat_template"], _tok_str(cfg.get("bos_token")), _tok_str(cfg.get("eos_token"))
            )
    return tok, template


def _tok_str(v) -> str:
    if isinstance(v, dict):
        return v.get("content", "")
    return v or ""
