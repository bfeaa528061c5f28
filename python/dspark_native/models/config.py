"""Model configurations read from ``config.json`` (HF-style targets, DeepSpec drafters).

Every field the code relies on is validated when the configuration is read, so a bad checkpoint
fails at load time with a :class:`CheckpointError` that names the offending field.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint (config or tensors) is missing, unreadable or inconsistent.

    The message always names the file, config field or tensor at fault.
    """


# Architectures we can run. qk_norm: Qwen3 applies an RMSNorm over head_dim to every q/k head.
# qkv_bias: Qwen2 / Qwen2.5 have biases on the q, k and v projections (not on o_proj).
TARGET_ARCHITECTURES = {
    "LlamaForCausalLM": dict(qk_norm=False, qkv_bias=False),
    "Qwen2ForCausalLM": dict(qk_norm=False, qkv_bias=True),
    "Qwen3ForCausalLM": dict(qk_norm=True, qkv_bias=False),
}
DRAFTER_ARCHITECTURES = {
    "Qwen3DSparkModel": dict(kind="dspark", qk_norm=True),
    "LlamaDSparkModel": dict(kind="dspark", qk_norm=False),
    "Qwen3Eagle3Model": dict(kind="eagle3", qk_norm=True),
    "LlamaEagle3Model": dict(kind="eagle3", qk_norm=False),
}
MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")


def read_config_json(directory: str) -> dict[str, Any]:
    """Read ``<directory>/config.json`` into a dict; CheckpointError if absent or not JSON."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"config.json not found in {directory!r}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"config.json in {directory!r} is unreadable: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"config.json in {directory!r} is not a JSON object")
    return raw


def _get(raw: dict[str, Any], name: str, typ, default=..., where: str = "config.json"):
    if name not in raw or raw[name] is None:
        if default is ...:
            raise CheckpointError(f"{where}: missing required field {name!r}")
        return default
    val = raw[name]
    if typ is int:
        if isinstance(val, bool) or not isinstance(val, int):
            raise CheckpointError(f"{where}: field {name!r} must be an integer, got {val!r}")
    elif typ is float:
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise CheckpointError(f"{where}: field {name!r} must be a number, got {val!r}")
        val = float(val)
    elif typ is bool:
        if not isinstance(val, bool):
            raise CheckpointError(f"{where}: field {name!r} must be true/false, got {val!r}")
    elif typ is str:
        if not isinstance(val, str):
            raise CheckpointError(f"{where}: field {name!r} must be a string, got {val!r}")
    return val


def _positive(name: str, val: int, where: str = "config.json") -> int:
    if val <= 0:
        raise CheckpointError(f"{where}: field {name!r} must be positive, got {val}")
    return val


def _merge(out: dict[str, Any], **fields) -> None:
    # Keep the original JSON value when it is equal (1000000 vs 1000000.0), so that a loaded
    # config is written back unchanged.
    for k, v in fields.items():
        if k not in out or out[k] != v:
            out[k] = v


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency-dependent RoPE scaling (``rope_type`` "llama3", Llama 3.1 / 3.2 / 3.3).

    With wavelength w = 2 pi / f of each base frequency f = theta^(-2i/d): w < L / high_freq_factor
    keeps f, w > L / low_freq_factor uses f / factor, and in between the two are blended linearly in
    s = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor): (1 - s) f / factor + s f,
    with L = original_max_position_embeddings (see :func:`dspark_native.models.layers.rope_inv_freq`).
    """

    rope_type: str
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def to_dict(self) -> dict[str, Any]:
        return dict(
            rope_type=self.rope_type,
            factor=self.factor,
            low_freq_factor=self.low_freq_factor,
            high_freq_factor=self.high_freq_factor,
            original_max_position_embeddings=self.original_max_position_embeddings,
        )


ROPE_TYPES = ("default", "llama3")


def _rope_fields(raw: dict[str, Any], where: str):
    """(rope_theta, RopeScaling or None) from a config dict. Reads both spellings: the released
    checkpoints' ``rope_theta`` + ``rope_scaling``, and ``rope_parameters`` (a dict with
    ``rope_type``, ``rope_theta`` and the scaling fields) that transformers 5 writes."""
    params = raw.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise CheckpointError(f"{where}: field 'rope_parameters' must be an object, got {params!r}")
    params = params or {}
    if raw.get("rope_theta") is not None:
        theta = _get(raw, "rope_theta", float, where=where)
    else:
        theta = _get(params, "rope_theta", float, 10000.0, f"{where} rope_parameters")
    if not theta > 0:
        raise CheckpointError(f"{where}: field 'rope_theta' must be positive, got {theta}")
    scaling = raw.get("rope_scaling")
    field_name = "rope_scaling"
    if scaling in (None, {}):
        scaling, field_name = params, "rope_parameters"
    if not isinstance(scaling, dict):
        raise CheckpointError(f"{where}: field 'rope_scaling' must be an object or null, got {scaling!r}")
    rtype = scaling.get("rope_type", scaling.get("type", "default"))
    if rtype not in ROPE_TYPES:
        raise CheckpointError(
            f"{where}: field {field_name!r} has rope_type {rtype!r}, which is not supported "
            f"(supported: {', '.join(ROPE_TYPES)})"
        )
    if rtype == "default":
        return theta, None
    sub = f"{where} {field_name}"
    factor = _get(scaling, "factor", float, where=sub)
    low = _get(scaling, "low_freq_factor", float, where=sub)
    high = _get(scaling, "high_freq_factor", float, where=sub)
    orig = _get(scaling, "original_max_position_embeddings", int, where=sub)
    if not factor > 0 or not low > 0 or orig <= 0:
        raise CheckpointError(
            f"{sub}: 'factor', 'low_freq_factor' and 'original_max_position_embeddings' must be positive"
        )
    if not high > low:
        raise CheckpointError(f"{sub}: 'high_freq_factor' ({high}) must be larger than 'low_freq_factor' ({low})")
    return theta, RopeScaling("llama3", factor, low, high, orig)


def default_target_layer_ids(num_target_layers: int, count: int = 5) -> list[int]:
    """Evenly spaced target layers between 1 and N-3 (DFlash/DSpark convention).

    For a 36-layer target and count 5 this gives [1, 9, 17, 25, 33]; a single layer is N // 2.
    """
    if num_target_layers <= 0 or count <= 0:
        raise ValueError("num_target_layers and count must be positive")
    if count == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    if end < start:
        # Too shallow for the 1..N-3 convention: spread over all layers instead.
        start, end = 0, num_target_layers - 1
    span = end - start
    return [int(round(start + i * span / (count - 1))) for i in range(count)]


@dataclass
class ModelConfig:
    """Decoder (Llama / Qwen3 family) hyper-parameters shared by targets and drafters.

    ``raw`` keeps the whole config.json so that drafters round-trip it unchanged.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    qk_norm: bool
    tie_word_embeddings: bool = False
    max_position_embeddings: int | None = None
    #: Llama 3 RoPE scaling, or None for plain RoPE
    rope_scaling: RopeScaling | None = None
    #: biases on q_proj / k_proj / v_proj (Qwen2)
    qkv_bias: bool = False
    target_layer_ids: list[int] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def _common(raw: dict[str, Any], qk_norm: bool, where: str) -> dict[str, Any]:
        hidden = _positive("hidden_size", _get(raw, "hidden_size", int, where=where), where)
        heads = _positive("num_attention_heads", _get(raw, "num_attention_heads", int, where=where), where)
        kv_heads = _positive("num_key_value_heads", _get(raw, "num_key_value_heads", int, heads, where), where)
        if heads % kv_heads != 0:
            raise CheckpointError(
                f"{where}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
            )
        if qk_norm:
            # Qwen3: hidden_size / heads is not the head size (e.g. Qwen3-4B), so insist on it.
            head_dim = _get(raw, "head_dim", int, where=where)
        else:
            if hidden % heads != 0 and "head_dim" not in raw:
                raise CheckpointError(
                    f"{where}: hidden_size {hidden} is not divisible by num_attention_heads "
                    f"{heads} and head_dim is absent"
                )
            head_dim = _get(raw, "head_dim", int, hidden // heads, where)
        _positive("head_dim", head_dim, where)
        if head_dim % 2:
            raise CheckpointError(f"{where}: head_dim must be even for RoPE, got {head_dim}")
        rope_theta, rope_scaling = _rope_fields(raw, where)
        if raw.get("attention_bias", False) or raw.get("mlp_bias", False):
            raise CheckpointError(f"{where}: fields 'attention_bias'/'mlp_bias' must be false")
        if raw.get("use_sliding_window", False):
            raise CheckpointError(
                f"{where}: field 'use_sliding_window' must be false (sliding-window attention is not supported)"
            )
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"{where}: field 'hidden_act' = {act!r} unsupported (silu only)")
        eps = _get(raw, "rms_norm_eps", float, where=where)
        if not eps > 0:
            raise CheckpointError(f"{where}: field 'rms_norm_eps' must be positive")
        return dict(
            vocab_size=_positive("vocab_size", _get(raw, "vocab_size", int, where=where), where),
            hidden_size=hidden,
            intermediate_size=_positive("intermediate_size", _get(raw, "intermediate_size", int, where=where), where),
            num_hidden_layers=_positive("num_hidden_layers", _get(raw, "num_hidden_layers", int, where=where), where),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=eps,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            qk_norm=qk_norm,
            max_position_embeddings=_get(raw, "max_position_embeddings", int, None, where),
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any], target_layer_ids: list[int] | None = None) -> ModelConfig:
        """Target config from an HF config.json dict (Llama, Qwen2 or Qwen3 architectures)."""
        archs = raw.get("architectures")
        if not isinstance(archs, list) or not archs:
            raise CheckpointError("config.json: missing required field 'architectures'")
        arch = archs[0]
        if arch not in TARGET_ARCHITECTURES:
            raise CheckpointError(
                f"config.json: unknown architecture {arch!r} in field 'architectures' "
                f"(supported targets: {sorted(TARGET_ARCHITECTURES)})"
            )
        common = cls._common(raw, TARGET_ARCHITECTURES[arch]["qk_norm"], "config.json")
        cfg = cls(
            architecture=arch,
            qkv_bias=TARGET_ARCHITECTURES[arch]["qkv_bias"],
            # HF's default for both Llama and Qwen3 configs is untied.
            tie_word_embeddings=_get(raw, "tie_word_embeddings", bool, False),
            raw=copy.deepcopy(raw),
            **common,
        )
        cfg.set_target_layer_ids(target_layer_ids)
        return cfg

    def set_target_layer_ids(self, ids: list[int] | None) -> None:
        """Choose which layer outputs the forward returns as hidden features (validated)."""
        ids = list(ids) if ids is not None else []
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_hidden_layers:
                raise CheckpointError(
                    f"target_layer_ids: layer id {i!r} out of range for a target with {self.num_hidden_layers} layers"
                )
        self.target_layer_ids = ids

    def to_dict(self) -> dict[str, Any]:
        """config.json dict: the original fields with ours written over them."""
        out = copy.deepcopy(self.raw)
        _merge(
            out,
            architectures=[self.architecture],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        if self.max_position_embeddings is not None:
            out["max_position_embeddings"] = self.max_position_embeddings
        out.setdefault("hidden_act", "silu")
        return out


@dataclass
class DrafterConfig(ModelConfig):
    """DeepSpec drafter config: a copy of the target's config plus the drafter fields.

    kind: "dspark" (DSpark / DFlash backbone) or "eagle3".
    """

    kind: str = "dspark"
    num_target_layers: int = 0
    block_size: int = 7
    mask_token_id: int | None = None
    markov_rank: int = 0
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = False
    confidence_head_with_markov: bool = True
    ttt_length: int = 7
    #: N tokens the drafter proposes from (a draft vocabulary: tensors ``d2t`` / ``t2d`` in the
    #: checkpoint, as in EAGLE-3); 0 = the whole target vocabulary.
    draft_vocab_size: int = 0

    @property
    def draft_vocab(self) -> int:
        """Columns of the drafter's LM head and Markov W2: N with a draft vocabulary, else V."""
        return self.draft_vocab_size or self.vocab_size

    @property
    def confidence_input_dim(self) -> int:
        """Width of the confidence head input [h ; W1[prev]] (just h without a Markov part)."""
        r = self.markov_rank if self.confidence_head_with_markov else 0
        return self.hidden_size + r

    @classmethod
    def from_dict(cls, raw: dict[str, Any], target_layer_ids=None) -> DrafterConfig:
        """Drafter config from a DeepSpec config.json dict."""
        where = "drafter config.json"
        archs = raw.get("architectures")
        if not isinstance(archs, list) or not archs:
            raise CheckpointError(f"{where}: missing required field 'architectures'")
        arch = archs[0]
        if arch not in DRAFTER_ARCHITECTURES:
            raise CheckpointError(
                f"{where}: unknown architecture {arch!r} in field 'architectures' "
                f"(supported drafters: {sorted(DRAFTER_ARCHITECTURES)})"
            )
        info = DRAFTER_ARCHITECTURES[arch]
        common = cls._common(raw, info["qk_norm"], where)
        kind = info["kind"]
        num_target_layers = _get(raw, "num_target_layers", int, 0, where)
        ids = raw.get("target_layer_ids", target_layer_ids)
        if ids is None:
            if num_target_layers <= 0:
                raise CheckpointError(
                    f"{where}: missing required field 'target_layer_ids' (or 'num_target_layers' to derive the default)"
                )
            ids = default_target_layer_ids(num_target_layers, 5)
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise CheckpointError(f"{where}: field 'target_layer_ids' must be a list of ints")
        for i in ids:
            if i < 0 or (num_target_layers > 0 and i >= num_target_layers):
                raise CheckpointError(
                    f"{where}: field 'target_layer_ids' has layer id {i} out of range for "
                    f"num_target_layers={num_target_layers}"
                )
        cfg = cls(
            architecture=arch,
            tie_word_embeddings=_get(raw, "tie_word_embeddings", bool, False, where),
            raw=copy.deepcopy(raw),
            kind=kind,
            num_target_layers=num_target_layers,
            **common,
        )
        cfg.target_layer_ids = list(ids)
        if kind == "dspark":
            cfg.block_size = _positive("block_size", _get(raw, "block_size", int, where=where), where)
            cfg.mask_token_id = _get(raw, "mask_token_id", int, where=where)
            if not 0 <= cfg.mask_token_id < cfg.vocab_size:
                raise CheckpointError(
                    f"{where}: field 'mask_token_id' = {cfg.mask_token_id} outside the vocabulary "
                    f"(vocab_size {cfg.vocab_size})"
                )
            cfg.markov_rank = _get(raw, "markov_rank", int, 0, where)
            if cfg.markov_rank < 0:
                raise CheckpointError(f"{where}: field 'markov_rank' must be >= 0")
            cfg.markov_head_type = _get(raw, "markov_head_type", str, "vanilla", where)
            if cfg.markov_head_type not in MARKOV_HEAD_TYPES:
                raise CheckpointError(
                    f"{where}: field 'markov_head_type' = {cfg.markov_head_type!r} unknown (one of {MARKOV_HEAD_TYPES})"
                )
            cfg.enable_confidence_head = _get(raw, "enable_confidence_head", bool, False, where)
            cfg.confidence_head_with_markov = _get(raw, "confidence_head_with_markov", bool, cfg.markov_rank > 0, where)
            n = _get(raw, "draft_vocab_size", int, 0, where)
            if not 0 <= n <= cfg.vocab_size:
                raise CheckpointError(
                    f"{where}: field 'draft_vocab_size' = {n} must be in [1, vocab_size = {cfg.vocab_size}] "
                    "(0 or absent: no draft vocabulary)"
                )
            # a "subset" of the whole vocabulary is the full vocabulary: no index map needed
            cfg.draft_vocab_size = 0 if n == cfg.vocab_size else n
        else:
            cfg.ttt_length = _get(raw, "ttt_length", int, 7, where)
            if cfg.num_hidden_layers != 1:
                raise CheckpointError(
                    f"{where}: field 'num_hidden_layers' must be 1 for EAGLE-3, got {cfg.num_hidden_layers}"
                )
        return cfg

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        _merge(out, num_target_layers=self.num_target_layers, target_layer_ids=list(self.target_layer_ids))
        if self.kind == "dspark":
            _merge(
                out,
                block_size=self.block_size,
                mask_token_id=self.mask_token_id,
                markov_rank=self.markov_rank,
                markov_head_type=self.markov_head_type,
                enable_confidence_head=self.enable_confidence_head,
                confidence_head_with_markov=self.confidence_head_with_markov,
            )
            if self.draft_vocab_size:
                _merge(out, draft_vocab_size=self.draft_vocab_size)
            else:
                out.pop("draft_vocab_size", None)
        else:
            _merge(out, ttt_length=self.ttt_length)
        return out
