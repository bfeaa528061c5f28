"""Loading and saving HF-style targets and DeepSpec drafter directories (safetensors).

Layouts:
- target: config.json + model.safetensors (or shards + model.safetensors.index.json), keys
  ``model.embed_tokens.weight``, ``model.layers.{i}.*``, ``model.norm.weight``,
  ``lm_head.weight`` (absent when tie_word_embeddings).
- drafter: the DeepSpec layout (no ``model.`` prefix); see docs/models.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import torch
import torch.nn as nn

from .config import CheckpointError, DrafterConfig, ModelConfig, read_config_json
from .drafter import DSparkDrafter
from .eagle3 import Eagle3Drafter
from .target import TargetModel

Drafter = DSparkDrafter | Eagle3Drafter
SHARED_DRAFTER_KEYS = ("embed_tokens.weight", "lm_head.weight")
# Integer tensors of a draft vocabulary (EAGLE-3 names): d2t int64 [N] offsets, t2d bool [V].
VOCAB_KEYS = {"d2t": (torch.int64, torch.int32), "t2d": (torch.bool,)}
# Buffers some HF exports carry; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_safetensors_dir(directory: str) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards listed in
    ``model.safetensors.index.json`` (CheckpointError naming the file/tensor on any problem)."""
    from safetensors.torch import load_file

    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    weight_map = None
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except Exception as e:
            raise CheckpointError(f"{index}: unreadable shard index: {e}") from e
        files = []
        for shard in sorted(set(weight_map.values())):
            path = os.path.join(directory, shard)
            if not os.path.isfile(path):
                raise CheckpointError(f"{index}: shard file {shard!r} does not exist")
            files.append(path)
    else:
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {directory!r}")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            part = load_file(path)
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable or corrupt safetensors file: {e}") from e
        for k, v in part.items():
            if k in tensors:
                raise CheckpointError(f"tensor {k!r} appears in more than one shard ({path})")
            if weight_map is not None and weight_map.get(k) != os.path.basename(path):
                raise CheckpointError(
                    f"tensor {k!r} is in {os.path.basename(path)} but the index maps it to {weight_map.get(k)!r}"
                )
            tensors[k] = v
    if weight_map is not None:
        for k in weight_map:
            if k not in tensors:
                raise CheckpointError(f"tensor {k!r} listed in the index is missing from its shard")
    return tensors


def _meta_shapes(module_factory) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        m = module_factory()
    return {k: tuple(v.shape) for k, v in m.state_dict(keep_vars=False).items()}


def check_tensors(
    tensors: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    optional: Iterable[str] = (),
    what: str = "checkpoint",
) -> None:
    """Raise CheckpointError naming the first missing, unexpected or wrongly shaped tensor."""
    optional = set(optional)
    for k in sorted(expected):
        if k not in tensors and k not in optional:
            raise CheckpointError(f"{what}: missing tensor {k!r} (expected shape {list(expected[k])})")
    for k in sorted(tensors):
        if k.endswith(_IGNORED_SUFFIXES):
            continue
        if k not in expected:
            raise CheckpointError(f"{what}: unexpected tensor {k!r} (shape {list(tensors[k].shape)})")
        if tuple(tensors[k].shape) != expected[k]:
            raise CheckpointError(
                f"{what}: tensor {k!r} has shape {list(tensors[k].shape)}, the config implies {list(expected[k])}"
            )
        if k in VOCAB_KEYS:
            if tensors[k].dtype not in VOCAB_KEYS[k]:
                raise CheckpointError(
                    f"{what}: tensor {k!r} has dtype {tensors[k].dtype}, expected one of {list(VOCAB_KEYS[k])}"
                )
        elif not tensors[k].is_floating_point():
            raise CheckpointError(f"{what}: tensor {k!r} has non-float dtype {tensors[k].dtype}")


def _assign(module: nn.Module, state: dict[str, torch.Tensor], dtype, device) -> None:
    state = {
        k: (
            v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device=device, dtype=torch.int64)
        ).contiguous()
        for k, v in state.items()
    }
    if "t2d" in state:
        state["t2d"] = state["t2d"].bool()
    module.load_state_dict(state, strict=False, assign=True)


def build_target(cfg: ModelConfig, tensors: dict[str, torch.Tensor], dtype=torch.float32, device="cpu") -> TargetModel:
    """TargetModel from HF-named tensors (``model.`` prefix), validated against ``cfg``."""
    expected_inner = _meta_shapes(lambda: TargetModel(cfg))
    expected = {("model." + k if not k.startswith("lm_head.") else k): s for k, s in expected_inner.items()}
    optional = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    check_tensors(tensors, expected, optional, "target checkpoint")
    with torch.device("meta"):
        model = TargetModel(cfg)
    state = {}
    for k, v in tensors.items():
        if k.endswith(_IGNORED_SUFFIXES):
            continue
        inner = k[len("model.") :] if k.startswith("model.") else k
        if cfg.tie_word_embeddings and inner == "lm_head.weight":
            continue  # tied: the embedding is the head
        state[inner] = v
    _assign(model, state, dtype, device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.eval()
    return model


BACKENDS = ("auto", "native", "transformers")


def select_backend(raw: dict, backend: str = "auto") -> str:
    """The backend that runs a target config.json dict: "native" or "transformers".

    "auto" is table-driven: architectures listed in
    :data:`~dspark_native.models.config.TARGET_ARCHITECTURES` (the table the native side
    extends) run natively, every other causal LM through transformers. "native" and
    "transformers" force one; errors then name what that backend cannot do.
    """
    from .config import TARGET_ARCHITECTURES
    from .hf_target import TRANSFORMERS_PIP, transformers_available

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        archs = raw.get("architectures")
        arch = archs[0] if isinstance(archs, list) and archs else None
        if arch in TARGET_ARCHITECTURES:
            return "native"
        if not transformers_available():
            raise CheckpointError(
                f"config.json: architecture {arch!r} in field 'architectures' has no native "
                f"implementation (native: {sorted(TARGET_ARCHITECTURES)}); the transformers backend "
                f"runs any causal LM: {TRANSFORMERS_PIP}"
            )
        return "transformers"
    if backend == "transformers" and not transformers_available():
        raise CheckpointError(f"backend 'transformers' needs the transformers package: {TRANSFORMERS_PIP}")
    return backend


def load_target(
    directory: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    target_layer_ids: Iterable[int] | None = None,
    backend: str = "auto",
):
    """Load an HF-style target directory (config.json + safetensors, single or sharded).

    backend: "native" (our TargetModel: the Llama / Qwen2 / Qwen3 families), "transformers" (any causal
    LM through :class:`~dspark_native.models.hf_target.TransformersTarget`; needs the
    ``transformers`` extra) or "auto" (by architecture, see :func:`select_backend`). The
    returned model's ``backend`` attribute says which one runs it.
    """
    raw = read_config_json(directory)
    ids = list(target_layer_ids) if target_layer_ids is not None else None
    chosen = select_backend(raw, backend)
    if chosen == "transformers":
        from .hf_target import TransformersTarget

        return TransformersTarget.from_pretrained(directory, dtype=dtype, device=device, target_layer_ids=ids)
    try:
        cfg = ModelConfig.from_dict(raw, ids)
    except CheckpointError as exc:
        from .hf_target import transformers_available

        if backend == "auto" and transformers_available() and "target_layer_ids" not in str(exc):
            # A native architecture with a setting the native code does not run (or a broken
            # config): say that the transformers backend exists rather than switch silently.
            raise CheckpointError(
                f"{exc} [native backend; backend='transformers' runs any setting transformers supports]"
            ) from exc
        raise
    model = build_target(cfg, read_safetensors_dir(directory), dtype, device)
    model.backend = "native"
    return model


def save_target(model: TargetModel, directory: str, dtype: torch.dtype | None = None) -> None:
    """Write an HF-style directory (config.json + model.safetensors) for ``model``."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        name = k if k.startswith("lm_head.") else "model." + k
        tensors[name] = v.detach().to(dtype or v.dtype).contiguous()
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(model.config.to_dict(), f, indent=2)


def _drafter_class(cfg: DrafterConfig):
    return DSparkDrafter if cfg.kind == "dspark" else Eagle3Drafter


def check_drafter_against_target(cfg: DrafterConfig, target: TargetModel) -> None:
    """Field-by-field compatibility of a drafter config with a loaded target."""
    t = target.config
    if cfg.vocab_size != t.vocab_size:
        raise CheckpointError(
            f"drafter config.json: field 'vocab_size' = {cfg.vocab_size} does not match the target's {t.vocab_size}"
        )
    if cfg.hidden_size != t.hidden_size:
        raise CheckpointError(
            f"drafter config.json: field 'hidden_size' = {cfg.hidden_size} does not match the target's {t.hidden_size}"
        )
    if cfg.num_target_layers and cfg.num_target_layers != t.num_hidden_layers:
        raise CheckpointError(
            f"drafter config.json: field 'num_target_layers' = {cfg.num_target_layers} but the "
            f"target has {t.num_hidden_layers} layers"
        )
    for i in cfg.target_layer_ids:
        if not 0 <= i < t.num_hidden_layers:
            raise CheckpointError(
                f"drafter config.json: field 'target_layer_ids' has layer id {i} out of range "
                f"for a target with {t.num_hidden_layers} layers"
            )


def build_drafter(
    cfg: DrafterConfig,
    tensors: dict[str, torch.Tensor],
    target: TargetModel | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Drafter:
    """Drafter from DeepSpec-named tensors. Missing embed_tokens / lm_head are taken from the
    target (shared, as in training); a target is then required."""
    if target is not None:
        check_drafter_against_target(cfg, target)
        device = device or target.device
    device = device or "cpu"
    if dtype is None:
        dtype = next((v.dtype for v in tensors.values() if v.is_floating_point()), torch.bfloat16)
    cls = _drafter_class(cfg)
    expected = _meta_shapes(lambda: cls(cfg))
    check_tensors(tensors, expected, SHARED_DRAFTER_KEYS, "drafter checkpoint")
    shared = []
    for key in SHARED_DRAFTER_KEYS:
        if key not in tensors:
            if target is None:
                raise CheckpointError(
                    f"drafter checkpoint: tensor {key!r} is absent and no target was given to take it from"
                )
            shared.append(key)
    with torch.device("meta"):
        model = cls(cfg)
    _assign(model, tensors, dtype, device)
    d2t = _check_vocab_tensors(cfg, tensors)
    for key in shared:
        src = target.embed_tokens if key.startswith("embed_tokens") else target.lm_head
        dst = model.embed_tokens if key.startswith("embed_tokens") else model.lm_head
        w = src.weight
        if key.startswith("lm_head") and d2t is not None:
            # the drafter's head covers its draft vocabulary: the target's rows of those tokens
            w = nn.Parameter(w.detach()[d2t.to(w.device)].to(device=device, dtype=dtype), requires_grad=False)
        elif w.dtype != dtype or w.device != torch.device(device):
            w = nn.Parameter(w.detach().to(device=device, dtype=dtype), requires_grad=False)
        dst.weight = w
    model.shared_keys = tuple(shared)
    model.eval()
    return model


def _check_vocab_tensors(cfg: DrafterConfig, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The draft vocabulary's target ids (int64 [N], host) from ``d2t`` / ``t2d``, checked for
    range, order, repeats and agreement of the two tensors; None without a draft vocabulary."""
    if cfg.kind != "dspark" or not cfg.draft_vocab_size:
        return None
    from .drafter import check_draft_vocab

    d2t = tensors["d2t"].to("cpu", torch.int64)
    ids = torch.arange(d2t.numel()) + d2t
    try:
        ids = check_draft_vocab(ids, cfg.vocab_size, "drafter checkpoint: tensor 'd2t' (target id = index + d2t)")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    t2d = tensors["t2d"].to("cpu").bool()
    if int(t2d.sum()) != ids.numel() or not bool(t2d[ids].all()):
        raise CheckpointError("drafter checkpoint: tensors 't2d' and 'd2t' name different draft vocabularies")
    return ids


def load_drafter(
    directory: str,
    target: TargetModel | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    set_target_layers: bool = True,
) -> Drafter:
    """Load a DeepSpec drafter directory (Qwen3/Llama DSpark or EAGLE-3).

    dtype: default the checkpoint's dtype. With ``target`` given the drafter is checked
    against it, shares its embedding / lm_head when the checkpoint lacks them, and (if
    set_target_layers) the target is told to return the drafter's target_layer_ids features.
    """
    cfg = DrafterConfig.from_dict(read_config_json(directory))
    model = build_drafter(cfg, read_safetensors_dir(directory), target, dtype, device)
    if target is not None and set_target_layers:
        target.set_target_layer_ids(cfg.target_layer_ids)
    return model


def save_drafter(
    drafter: Drafter,
    directory: str,
    dtype: torch.dtype | None = None,
    include_shared: bool | None = None,
) -> None:
    """Write a DeepSpec directory: config.json + model.safetensors (no ``model.`` prefix).

    include_shared: write embed_tokens / lm_head; default: only if they were in the loaded
    checkpoint (so load -> save reproduces the checkpoint bit for bit).
    """
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    skip = set() if include_shared else set(getattr(drafter, "shared_keys", ()))
    if include_shared is False:
        skip = set(SHARED_DRAFTER_KEYS)
    tensors = {
        k: v.detach().to(dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
        for k, v in drafter.state_dict().items()
        if k not in skip
    }
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    cfg = drafter.config.to_dict()
    # The config is inherited from the target's: state the dtype actually written, and drop the
    # target's own conversion record (it describes the target's source file, not this drafter).
    cfg.pop("dspark_native_conversion", None)
    dtypes = {str(v.dtype).replace("torch.", "") for k, v in tensors.items() if v.is_floating_point()}
    if "torch_dtype" in cfg and len(dtypes) == 1:
        cfg["torch_dtype"] = dtypes.pop()
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
