"""Targets, drafters and checkpoint loaders for DSpark speculative decoding (pure PyTorch).

See docs/models.md for formats, errors and the per-round API.
"""

from .cache import ContextLengthError, KVCache
from .config import (
    CheckpointError,
    DrafterConfig,
    ModelConfig,
    default_target_layer_ids,
)
from .drafter import ConfidenceHead, DSparkDrafter, MarkovHead
from .eagle3 import Eagle3Drafter
from .embedded import EmbeddedModel, convert_gguf_to_hf, find_smollm2_gguf, load_embedded_smollm2
from .gguf_loader import load_gguf_target
from .hf_target import HFKVCache, TransformersTarget  # transformers itself is imported on use
from .loaders import (
    build_drafter,
    build_target,
    load_drafter,
    load_target,
    read_safetensors_dir,
    save_drafter,
    save_target,
    select_backend,
)
from .target import TargetModel
from .tokenizer import ChatTemplate

__all__ = [
    "ChatTemplate",
    "EmbeddedModel",
    "convert_gguf_to_hf",
    "find_smollm2_gguf",
    "load_embedded_smollm2",
    "load_gguf_target",
    "CheckpointError",
    "ConfidenceHead",
    "ContextLengthError",
    "DSparkDrafter",
    "DrafterConfig",
    "Eagle3Drafter",
    "KVCache",
    "MarkovHead",
    "ModelConfig",
    "TargetModel",
    "TransformersTarget",
    "HFKVCache",
    "build_drafter",
    "build_target",
    "default_target_layer_ids",
    "load_drafter",
    "load_target",
    "read_safetensors_dir",
    "save_drafter",
    "save_target",
    "select_backend",
]
