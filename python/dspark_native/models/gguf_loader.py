"""GGUF loading for Llama-architecture targets (dequantised to float with the ``gguf`` package).

llama.cpp's HF -> GGUF converter permutes the rows of q/k projections so that llama.cpp can
apply RoPE to interleaved pairs (x0, x1), (x2, x3), ...; we use HF's rotate-half RoPE on
pairs (x_i, x_{i + d/2}), so the permutation is undone here (:func:`unpermute_rope_rows`).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .config import CheckpointError, ModelConfig
from .loaders import build_target
from .target import TargetModel
from .tokenizer import ChatTemplate, tokenizer_from_gguf_metadata

_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: [n_heads*hd, in] GGUF layout -> HF layout.

    Per head, GGUF row 2i / 2i+1 hold HF rows i / i + hd/2 (an interleaved pair).
    """
    out_dim = w.shape[0]
    hd = out_dim // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF layout -> llama.cpp GGUF layout (inverse of :func:`unpermute_rope_rows`)."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _field_value(field):
    # gguf's ReaderField.contents() decodes strings / arrays to Python values.
    return field.contents()


def read_gguf(path: str):
    """Open a GGUF file: (reader, metadata dict). CheckpointError if unreadable."""
    import gguf

    if not os.path.isfile(path):
        raise CheckpointError(f"GGUF file not found: {path!r}")
    try:
        reader = gguf.GGUFReader(path)
        meta = {}
        for name, field in reader.fields.items():
            if name.startswith("GGUF."):
                continue
            meta[name] = _field_value(field)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable or corrupt GGUF file: {e}") from e
    return reader, meta


def gguf_config_dict(meta: dict[str, object], path: str = "GGUF") -> dict[str, object]:
    """HF LlamaForCausalLM config.json dict from GGUF metadata."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(
            f"{path}: field 'general.architecture' = {arch!r}; only 'llama' GGUF targets are supported"
        )

    def need(key):
        full = f"llama.{key}"
        if full not in meta:
            raise CheckpointError(f"{path}: missing GGUF field {full!r}")
        return meta[full]

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = int(meta.get("llama.attention.head_count_kv", heads))
    head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
    if int(meta.get("llama.attention.value_length", head_dim)) != head_dim:
        raise CheckpointError(f"{path}: key_length != value_length is not supported")
    rope_dim = int(meta.get("llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise CheckpointError(
            f"{path}: partial RoPE (llama.rope.dimension_count {rope_dim} != head_dim {head_dim}) is not supported"
        )
    if meta.get("llama.rope.scaling.type") not in (None, "none"):
        raise CheckpointError(f"{path}: GGUF field 'llama.rope.scaling.type' is not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(meta.get("llama.vocab_size", len(tokens) if tokens else 0))
    if vocab <= 0:
        raise CheckpointError(f"{path}: missing GGUF field 'llama.vocab_size'")
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        "tie_word_embeddings": True,  # refined by the caller from the tensor list
        "torch_dtype": "float32",
    }
    for key, name in (("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id")):
        if key in meta:
            cfg[name] = int(meta[key])
    return cfg


def gguf_tensors(reader, cfg: dict[str, object], path: str = "GGUF") -> dict[str, torch.Tensor]:
    """Dequantised fp32 tensors under HF names, q/k rows un-permuted to rotate-half layout."""
    from gguf.quants import dequantize

    n_layers = cfg["num_hidden_layers"]
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = t.name
        if name in _TOP_MAP:
            hf = _TOP_MAP[name]
        elif name.startswith("blk."):
            _, idx, rest = name.split(".", 2)
            if rest not in _LAYER_MAP or not idx.isdigit() or int(idx) >= n_layers:
                raise CheckpointError(f"{path}: unexpected GGUF tensor {name!r}")
            hf = f"model.layers.{idx}.{_LAYER_MAP[rest]}"
        elif name == "rope_freqs.weight":
            raise CheckpointError(f"{path}: GGUF tensor {name!r} (RoPE scaling) is not supported")
        else:
            raise CheckpointError(f"{path}: unexpected GGUF tensor {name!r}")
        try:
            arr = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot dequantise tensor {name!r}: {e}") from e
        w = torch.from_numpy(np.array(arr, dtype=np.float32))  # copy: reader memory is read-only
        if name.endswith("attn_q.weight"):
            w = unpermute_rope_rows(w, cfg["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            w = unpermute_rope_rows(w, cfg["num_key_value_heads"])
        out[hf] = w.contiguous()
    return out


def gguf_tokenizer(meta: dict[str, object]):
    """(tokenizers.Tokenizer, ChatTemplate or None) from GGUF metadata."""
    tok = tokenizer_from_gguf_metadata(meta)
    tokens = meta["tokenizer.ggml.tokens"]

    def tok_str(key):
        i = meta.get(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else ""

    template = meta.get("tokenizer.chat_template")
    chat = None
    if isinstance(template, str) and template:
        chat = ChatTemplate(template, tok_str("tokenizer.ggml.bos_token_id"), tok_str("tokenizer.ggml.eos_token_id"))
    return tok, chat


def load_gguf_target(
    path: str, dtype: torch.dtype = torch.float32, device="cpu", with_tokenizer: bool = True
) -> tuple[TargetModel, object, object]:
    """Load a Llama-architecture GGUF file: (TargetModel, tokenizers.Tokenizer, ChatTemplate).

    Quantised tensors are dequantised to fp32 and then cast to ``dtype``.
    """
    reader, meta = read_gguf(path)
    raw = gguf_config_dict(meta, path)
    names = {t.name for t in reader.tensors}
    raw["tie_word_embeddings"] = "output.weight" not in names
    cfg = ModelConfig.from_dict(raw)
    tensors = gguf_tensors(reader, raw, path)
    model = build_target(cfg, tensors, dtype, device)
    tok, chat = gguf_tokenizer(meta) if with_tokenizer else (None, None)
    return model, tok, chat
