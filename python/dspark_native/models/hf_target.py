"""Any Hugging Face ``transformers`` causal LM as a DSpark target (optional backend).

:class:`TransformersTarget` wraps an ``AutoModelForCausalLM`` behind the interface of our native
:class:`~dspark_native.models.target.TargetModel`: ragged verification blocks over a batch of
requests, a :class:`~dspark_native.models.cache.KVCache` with rollback by length, and the raw
residual outputs of the chosen ``target_layer_ids``. The model's own modules do all the math
(embedding scale, norms, RoPE variants, soft-capping, sliding windows), so its logits are the
ones ``model.generate`` sees.

Cache design (docs/models.md, "transformers backend"): our own contiguous KV tensors, handed to
the HF model through a small ``transformers.Cache`` subclass whose ``update`` writes the new K/V
rows of every request at ``lengths[slot]..`` and returns the padded ``[R, Hkv, L_max, d]`` K/V of
the batch, plus an explicit 4-D attention mask per layer type (full or sliding window) built from
the stored positions of every cached key. Rollback stays a length change, exactly as for the
native target, and one HF forward serves the whole ragged batch.

transformers is imported lazily: importing this module (the core package does, for type checks)
does not need it. ``pip install dspark-native[transformers]``.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from .cache import KVCache
from .config import CheckpointError, ModelConfig
from .target import TreeMask, _logit_row_index, plan_ragged

TRANSFORMERS_PIP = "pip install 'dspark-native[transformers]'  (or: pip install transformers accelerate)"
# Attention layer types whose semantics the ragged mask reproduces; anything else (linear
# attention, chunked attention, state-space layers, ...) is refused by name.
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
# Attention implementations that take an explicit 4-D mask: sdpa a boolean one (True = attend),
# eager an additive float one (0 / dtype min), as transformers' own mask builders produce.
MASK_KINDS = {"sdpa": "bool", "eager": "float"}


def _import_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"the transformers backend needs the 'transformers' package: {TRANSFORMERS_PIP}") from exc
    return transformers


def transformers_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


# ----------------------------------------------------------------------------- cache


class HFKVCache(KVCache):
    """:class:`KVCache` plus the RoPE position of every cached key.

    ``key_positions`` int64 [max_requests, max_seq]: position of the key stored at each index
    (the index itself for chains; ``lengths + depth`` for tree nodes or explicit ``positions``).
    Sliding-window layers need it: a query at position p sees keys at positions > p - window.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.key_positions = torch.zeros(self.max_requests, self.max_seq, dtype=torch.int64, device=self.device)

    def clone(self) -> HFKVCache:
        base = super().clone()
        out = HFKVCache.__new__(HFKVCache)
        out.__dict__.update(base.__dict__)
        out.key_positions = self.key_positions.clone()
        return out


class _Step:
    """What the cache layers of one forward share: the ragged plan and our KV tensors."""

    def __init__(self, plan, cache: KVCache):
        self.plan = plan
        self.cache = cache


@functools.cache
def _hf_cache_classes():
    """The ``transformers.Cache`` subclass (built once, transformers imported lazily)."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    class RaggedLayer(CacheLayerMixin):
        """Layer ``li`` of our KVCache: ``update`` stores the new rows of every request and
        returns the batch's padded K/V."""

        is_sliding = False  # the window is in the mask; every key is kept (rollback needs them)

        def __init__(self, step: _Step, li: int):
            super().__init__()
            self.step = step
            self.li = li
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:  # pragma: no cover
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            # key_states [R, Hkv, n_max, d] of the padded block -> rows of the real tokens only
            p, c = self.step.plan, self.step.cache
            kv_heads, d = key_states.shape[1], key_states.shape[3]
            if kv_heads != c.k_cache.shape[2] or d != c.k_cache.shape[4]:
                raise ValueError(
                    f"layer {self.li}: the model produced K/V with {kv_heads} heads of size {d}, the "
                    f"cache holds {c.k_cache.shape[2]} heads of size {c.k_cache.shape[4]} (layers "
                    "with different attention shapes are not supported)"
                )
            k = key_states.transpose(1, 2)
            v = value_states.transpose(1, 2)
            if p.uniform:
                k = k.reshape(-1, kv_heads, d)
                v = v.reshape(-1, kv_heads, d)
            else:
                k = k[p.row_req, p.row_off]
                v = v[p.row_req, p.row_off]
            c.k_cache[self.li, p.slot_t, :, p.store_t] = k.to(c.dtype)
            c.v_cache[self.li, p.slot_t, :, p.store_t] = v.to(c.dtype)
            sel = p.slot_slice if p.slot_slice is not None else p.slots
            return c.k_cache[self.li, sel, :, : p.L_max], c.v_cache[self.li, sel, :, : p.L_max]

        # Masks are always given explicitly, so transformers never sizes one from these; they
        # answer consistently all the same.
        def get_mask_sizes(self, query_length: int):
            return self.step.plan.L_max, 0

        def get_seq_length(self) -> int:
            return self.step.plan.L_max - self.step.plan.n_max

        def get_max_length(self) -> int:
            return self.step.cache.max_seq

    class RaggedCache(Cache):
        def __init__(self, step: _Step, num_layers: int):
            super().__init__(layers=[RaggedLayer(step, i) for i in range(num_layers)])

    return RaggedCache


# ----------------------------------------------------------------------------- config projection


def _rope_theta(c) -> float:
    """RoPE base of the (full-attention) layers, for the drafter's own RoPE."""
    params = getattr(c, "rope_parameters", None)
    if isinstance(params, dict):
        if "full_attention" in params and isinstance(params["full_attention"], dict):
            params = params["full_attention"]
        if isinstance(params.get("rope_theta"), (int, float)):
            return float(params["rope_theta"])
    theta = getattr(c, "rope_theta", None)
    return float(theta) if isinstance(theta, (int, float)) else 10000.0


def drafter_base_config(c, architecture: str) -> ModelConfig:
    """Our :class:`ModelConfig` view of an HF text config: the sizes a drafter for this target
    needs (vocabulary, hidden size, layer count), plus a Llama-style block shape (heads, head_dim,
    intermediate size, RoPE base) that :func:`~dspark_native.engine.default_drafter` and the
    trainer copy, as DeepSpec drafters copy their target's config. The drafter's own blocks are
    always Llama/Qwen3 (SiLU MLP, plain RoPE, RMSNorm), whatever the target family.
    """
    where = f"{architecture} config"

    def need(name):
        v = getattr(c, name, None)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise CheckpointError(f"{where}: field {name!r} must be a positive integer, got {v!r}")
        return v

    H, V, N, heads = need("hidden_size"), need("vocab_size"), need("num_hidden_layers"), need("num_attention_heads")
    kv = getattr(c, "num_key_value_heads", None) or heads
    hd = getattr(c, "head_dim", None) or H // heads
    if heads % kv or hd % 2:
        raise CheckpointError(
            f"{where}: num_attention_heads {heads} / num_key_value_heads {kv} / "
            f"head_dim {hd} are not a valid attention shape"
        )
    inter = getattr(c, "intermediate_size", None)
    inter = inter if isinstance(inter, int) and inter > 0 else 4 * H
    eps = getattr(c, "rms_norm_eps", None) or getattr(c, "layer_norm_eps", None) or 1e-6
    qk_norm = architecture.startswith("Qwen3")
    raw: dict[str, Any] = dict(
        model_type="qwen3" if qk_norm else "llama",
        hidden_act="silu",
        max_position_embeddings=getattr(c, "max_position_embeddings", None),
        dspark_target_architecture=architecture,
    )
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(c, k, None) is not None:
            raw[k] = getattr(c, k)
    mpe = raw["max_position_embeddings"]
    return ModelConfig(
        architecture=architecture,
        vocab_size=V,
        hidden_size=H,
        intermediate_size=inter,
        num_hidden_layers=N,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hd,
        rms_norm_eps=float(eps),
        rope_theta=_rope_theta(c),
        qk_norm=qk_norm,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        max_position_embeddings=mpe if isinstance(mpe, int) else None,
        raw=raw,
    )


def layer_windows(c) -> list[int | None]:
    """Sliding window of every decoder layer (None = full attention), transformers' convention:
    ``layer_types`` when the config has it, else ``sliding_window`` for all layers when set
    (Mistral), else full attention. A query at position p sees keys at positions > p - window."""
    n = c.num_hidden_layers
    types = getattr(c, "layer_types", None)
    window = getattr(c, "sliding_window", None)
    if types is not None:
        types = list(types)
        if len(types) != n:
            raise CheckpointError(f"config: field 'layer_types' has {len(types)} entries for {n} layers")
        bad = sorted({t for t in types if t not in SUPPORTED_LAYER_TYPES})
        if bad:
            raise CheckpointError(
                f"config: field 'layer_types' has unsupported layer type(s) {bad} (supported: "
                f"{list(SUPPORTED_LAYER_TYPES)})"
            )
        if "sliding_attention" in types and not (isinstance(window, int) and window > 0):
            raise CheckpointError("config: sliding_attention layers need a positive 'sliding_window'")
        return [window if t == "sliding_attention" else None for t in types]
    if isinstance(window, int) and window > 0:
        return [window] * n
    return [None] * n


# ----------------------------------------------------------------------------- the target


class TransformersTarget(nn.Module):
    """A transformers causal LM behind the native target interface.

    Args:
        model: a ``transformers`` ``PreTrainedModel`` with a causal-LM head (what
            ``AutoModelForCausalLM`` returns), text-only decoder; attention implementation
            ``sdpa`` or ``eager`` (``from_pretrained(..., attn_implementation="sdpa")``).
        target_layer_ids: layers whose raw outputs the forward returns (default none).

    The model is put in eval mode. Attributes used by drafters and training: ``config`` (our
    :class:`ModelConfig` view, see :func:`drafter_base_config`), ``embed_tokens`` and
    ``lm_head`` (the model's input/output embeddings, shared with drafters), ``norm`` (final
    norm) and :meth:`final_norm_scale`.
    """

    backend = "transformers"

    def __init__(self, model: nn.Module, target_layer_ids: Sequence[int] | None = None):
        super().__init__()
        _import_transformers()
        from transformers import PreTrainedModel

        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
        arch = type(model).__name__
        if model.get_output_embeddings() is None:
            raise CheckpointError(f"{arch}: no language-model head (load it with AutoModelForCausalLM)")
        if getattr(model.config, "is_encoder_decoder", False):
            raise CheckpointError(f"{arch}: encoder-decoder models are not supported (decoder-only LMs)")
        text = model.config.get_text_config()
        if text is not model.config:
            raise CheckpointError(
                f"{arch}: multimodal wrappers are not supported; load the text model "
                "(AutoModelForCausalLM on a text-only config)"
            )
        impl = getattr(model.config, "_attn_implementation", None)
        if impl not in MASK_KINDS:
            raise CheckpointError(
                f"{arch}: attn_implementation {impl!r} is not supported by the ragged batch (needs "
                f"an explicit 4-D mask): load with attn_implementation='sdpa' or 'eager'"
            )
        self.hf = model
        self.mask_kind = MASK_KINDS[impl]
        self.config = drafter_base_config(text, arch)
        self.windows = layer_windows(text)
        self.layer_types = list(getattr(text, "layer_types", None) or [])
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        layers = getattr(decoder, "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) != self.config.num_hidden_layers:
            raise CheckpointError(
                f"{arch}: cannot find its {self.config.num_hidden_layers} decoder layers (model.get_decoder().layers)"
            )
        self._decoder = decoder
        self._layers = layers
        params = inspect.signature(model.forward).parameters
        # transformers 5.x renamed past_key_values -> cache (the old name is deprecated)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self._head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.set_target_layer_ids(target_layer_ids)
        self.eval()

    # -- the interface the engine, drafters and training use ---------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        target_layer_ids: Sequence[int] | None = None,
        gguf_file: str | None = None,
        attn_implementation: str | None = None,
        **kwargs,
    ) -> TransformersTarget:
        """Load a local HF directory (or ``path`` + ``gguf_file``) with AutoModelForCausalLM,
        offline, refusing checkpoints with missing, unexpected or mis-shaped weights
        (:func:`load_hf_causal_lm`). attn_implementation: None = transformers' default for the
        family (sdpa, or eager for Gemma 2); flash / flex are refused."""
        return cls(
            load_hf_causal_lm(
                path, dtype, device, gguf_file=gguf_file, attn_implementation=attn_implementation, **kwargs
            ),
            target_layer_ids,
        )

    @property
    def weights(self) -> str:
        """The forward path: always the model's own modules (``TargetModel.weights`` analogue)."""
        return "transformers"

    def set_weights(self, weights: str = "auto") -> str:
        """``TargetModel.set_weights`` analogue: the model's own modules are the only path, so
        "auto" and "reference" keep it and the native fast paths ("fused", "bf16", "native") are
        refused by name. Returns "transformers"."""
        if weights not in ("auto", "reference"):
            raise ValueError(
                f"weights {weights!r}: a native-target forward path; a transformers target runs its "
                "own modules (use weights 'auto' or 'reference', or the native backend)"
            )
        return "transformers"

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def embed_tokens(self) -> nn.Module:
        return self.hf.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        return self.hf.get_output_embeddings()

    @property
    def norm(self) -> nn.Module | None:
        return getattr(self._decoder, "norm", None)

    @torch.no_grad()
    def final_norm_scale(self) -> torch.Tensor:
        """The per-channel scale of the final norm [H] fp32, read by probing it (Gemma's norm
        multiplies by 1 + weight, Llama's by weight): the trainer starts a drafter's own final
        norm from it, since the shared lm_head expects that scale."""
        H = self.config.hidden_size
        if self.norm is None:
            return torch.ones(H)
        x = torch.ones(1, H, dtype=self.dtype, device=self.device)
        x[:, 1::2] = -1  # zero mean, unit RMS: an RMSNorm or a LayerNorm returns x * scale
        y = self.norm(x).float()[0]
        return (y * x.float()[0] * math.sqrt(1.0 + self.config.rms_norm_eps)).cpu()

    @property
    def target_layer_ids(self) -> list[int]:
        return list(self.config.target_layer_ids)

    def set_target_layer_ids(self, ids: Sequence[int] | None) -> None:
        """Select the layers whose raw outputs the forward returns as hidden features."""
        self.config.set_target_layer_ids(list(ids) if ids is not None else None)

    def new_cache(self, max_requests: int, max_seq: int) -> HFKVCache:
        """A zeroed KV cache for this model (dtype and device of the weights)."""
        return HFKVCache(
            self.config.num_hidden_layers,
            max_requests,
            self._kv_heads,
            max_seq,
            self._head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        request_ids: torch.Tensor,
        cache: KVCache,
        tree_mask: TreeMask = None,
        positions: torch.Tensor | None = None,
        return_hidden: bool = True,
        logit_rows: str | torch.Tensor = "all",
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One forward over a ragged batch of query blocks; appends their K/V to ``cache``.

        Same contract as :meth:`TargetModel.forward`: input_ids int64 [T], cu_seqlens int64
        [R+1], request_ids int64 [R] (distinct slots), tree_mask / positions as there; returns
        logits fp32 [T, V] (or the ``logit_rows`` subset; None for "none") and hidden features
        [T, len(target_layer_ids) * H] in the model dtype: the raw outputs of decoder layers
        ``target_layer_ids`` (residual stream before the final norm; transformers'
        ``hidden_states[i + 1]`` for every layer but the last, whose entry there is normed).
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1:
            raise ValueError("input_ids must be a 1-D LongTensor [T]")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if not isinstance(cache, HFKVCache):
            raise TypeError("cache must come from this target's new_cache() (an HFKVCache)")
        shape = (self.config.num_hidden_layers, self._kv_heads, self._head_dim)
        got = (cache.num_layers, cache.k_cache.shape[2], cache.k_cache.shape[4])
        if cache.dtype != self.dtype or got != shape:
            raise ValueError(
                f"cache does not match the model (dtype {cache.dtype} vs {self.dtype}, "
                f"layers/kv heads/head_dim {got} vs {shape})"
            )
        V = self.config.vocab_size
        input_ids = input_ids.to(self.device, torch.int64)
        T = input_ids.numel()
        if T and (int(input_ids.min()) < 0 or int(input_ids.max()) >= V):
            raise ValueError(f"input_ids out of range [0, {V})")
        plan = plan_ragged(cu_seqlens, request_ids, cache, tree_mask, positions, total_rows=T)
        rows = _logit_row_index(logit_rows, plan, T, self.device)  # None = all, "none", or indices
        no_logits = isinstance(rows, str)
        ids = self.config.target_layer_ids if return_hidden else []
        H = self.config.hidden_size
        if T == 0:
            logits = None if no_logits else torch.zeros(0, V, device=self.device)
            return logits, (torch.zeros(0, len(ids) * H, dtype=self.dtype) if ids else None)

        R, n = plan.R, plan.n_max
        if plan.uniform:
            tok = input_ids.view(R, n)
            pos = plan.positions.view(R, n)
        else:
            tok = input_ids.new_zeros(R, n)
            tok[plan.row_req, plan.row_off] = input_ids
            pos = plan.positions.new_zeros(R, n)
            pos[plan.row_req, plan.row_off] = plan.positions
        cache.key_positions[plan.slot_t, plan.store_t] = plan.positions
        masks = self._masks(plan, cache, pos)

        feats: dict[int, torch.Tensor] = {}

        def grab(li):
            def hook(_mod, _inp, out):
                feats[li] = out[0] if isinstance(out, (tuple, list)) else out

            return hook

        handles = [self._layers[i].register_forward_hook(grab(i)) for i in sorted(set(ids))]
        try:
            kw = {self._cache_kw: _hf_cache_classes()(_Step(plan, cache), self.config.num_hidden_layers)}
            # features only (e.g. a prefill): the decoder without the LM head
            runner = self._decoder if no_logits else self.hf
            out = runner(input_ids=tok, attention_mask=masks, position_ids=pos, use_cache=True, return_dict=True, **kw)
        finally:
            for h in handles:
                h.remove()
        cache.advance(plan.slots, plan.counts, plan.slots_l, plan.counts_l)

        def unpad(x):  # [R, n, ...] -> [T, ...]
            return x.reshape(R * n, *x.shape[2:]) if plan.uniform else x[plan.row_req, plan.row_off]

        logits = None
        if not no_logits:
            logits = unpad(out.logits).float()
            if rows is not None:
                logits = logits[rows]
        hidden = torch.cat([unpad(feats[i]) for i in ids], dim=-1) if ids else None
        return logits, hidden

    def _masks(self, plan, cache: HFKVCache, qpos: torch.Tensor):
        """The 4-D attention mask(s) of this forward in the layout transformers expects: one
        tensor [R, 1, n_max, L_max], or a dict by layer type for models whose config has
        ``layer_types`` (they look the mask up per layer)."""
        base = plan.mask  # bool, causal/tree within the block, padding rows see everything
        sel = plan.slot_slice if plan.slot_slice is not None else plan.slots
        pad_row = torch.arange(plan.n_max, device=base.device)[None, :] >= plan.counts[:, None]
        made: dict[int | None, torch.Tensor] = {}

        def for_window(w):
            if w not in made:
                m = base
                if w is not None:
                    kpos = cache.key_positions[sel, : plan.L_max]  # [R, L]
                    near = (qpos[:, :, None] - kpos[:, None, :]) < w  # [R, n, L]
                    m = base & (near | pad_row[:, :, None]).unsqueeze(1)
                if self.mask_kind == "float":
                    m = torch.zeros(m.shape, dtype=self.dtype, device=m.device).masked_fill_(
                        ~m, torch.finfo(self.dtype).min
                    )
                made[w] = m
            return made[w]

        if self.layer_types:
            out = {}
            for t, w in zip(self.layer_types, self.windows, strict=True):
                out[t] = for_window(w)
            return out
        if len(set(self.windows)) != 1:  # pragma: no cover - layer_windows never returns this
            raise CheckpointError("per-layer windows without layer_types are not supported")
        return for_window(self.windows[0])

    @torch.no_grad()
    def generate_greedy(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        eos_token_ids: Sequence[int] = (),
        cache: KVCache | None = None,
        slot: int = 0,
    ) -> list[int]:
        """Plain greedy decoding of one prompt through :meth:`forward` (a baseline)."""
        prompt = torch.as_tensor(list(prompt_ids), dtype=torch.int64)
        if prompt.numel() == 0:
            raise ValueError("prompt_ids must not be empty")
        if cache is None:
            cache = self.new_cache(1, prompt.numel() + max_new_tokens)
            slot = 0
        cache.reset([slot])
        slot_t = torch.tensor([slot])
        logits, _ = self.forward(
            prompt, torch.tensor([0, prompt.numel()]), slot_t, cache, return_hidden=False, logit_rows="last"
        )
        out: list[int] = []
        eos = set(int(e) for e in eos_token_ids)
        one = torch.tensor([0, 1])
        for _ in range(max_new_tokens):
            tok = int(logits[-1].argmax())
            out.append(tok)
            if tok in eos or len(out) == max_new_tokens:
                break
            logits, _ = self.forward(torch.tensor([tok]), one, slot_t, cache, return_hidden=False)
        return out


# ----------------------------------------------------------------------------- loading

# Fields a config.json must state for the transformers backend: transformers would otherwise
# fill them from its class defaults (a 4096-wide Llama) and fail later, or worse not at all.
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def check_hf_config_dict(raw: dict[str, Any], where: str = "config.json") -> None:
    """CheckpointError naming the field when a config.json cannot describe a causal LM we run."""
    archs = raw.get("architectures")
    if not isinstance(raw.get("model_type"), str) and not (isinstance(archs, list) and archs):
        raise CheckpointError(f"{where}: missing required field 'model_type' (or 'architectures')")
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    for name in REQUIRED_FIELDS:
        v = text.get(name)
        if v is None:
            raise CheckpointError(f"{where}: missing required field {name!r}")
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise CheckpointError(f"{where}: field {name!r} must be a positive integer, got {v!r}")


def load_hf_causal_lm(
    path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    gguf_file: str | None = None,
    attn_implementation: str | None = None,
    **kwargs,
):
    """``AutoModelForCausalLM.from_pretrained`` of a local directory (``local_files_only``),
    with errors naming what is wrong: an architecture transformers has no causal LM for, a
    config without the needed fields, weights missing / unexpected / of the wrong shape."""
    transformers = _import_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM

    if not os.path.isdir(path):
        raise CheckpointError(f"{path!r} is not a directory")
    if gguf_file is None:
        from .config import read_config_json

        check_hf_config_dict(read_config_json(path))
    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=True, gguf_file=gguf_file)
    except (ValueError, KeyError, OSError) as exc:
        raise CheckpointError(f"{path}: transformers cannot read the config ({exc})") from exc
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    archs = getattr(cfg, "architectures", None) or []
    if type(cfg) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise CheckpointError(
            f"{path}: unsupported architecture {archs[0] if archs else None!r} (model_type "
            f"{cfg.model_type!r}): transformers {transformers.__version__} has no causal LM for it"
        )
    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)]
    names = [c.__name__ for c in (cls if isinstance(cls, (tuple, list)) else (cls,))]
    if archs and archs[0] not in names:
        # transformers picks the class from model_type alone; a config naming another one is
        # inconsistent (or not a causal LM): refuse instead of loading something else.
        raise CheckpointError(
            f"{path}: config.json field 'architectures' = {archs[0]!r}, but its model_type "
            f"{cfg.model_type!r} is transformers' {' / '.join(names)} (unsupported architecture)"
        )
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            local_files_only=True,
            gguf_file=gguf_file,
            attn_implementation=attn_implementation,
            output_loading_info=True,
            **kwargs,
        )
    except (ValueError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: transformers could not load the model ({exc})") from exc
    for key, what in (
        ("missing_keys", "missing"),
        ("unexpected_keys", "unexpected"),
        ("mismatched_keys", "wrongly shaped"),
    ):
        bad = sorted(str(k) for k in (info.get(key) or []))
        if bad:
            raise CheckpointError(f"{path}: {len(bad)} {what} tensor(s) in the checkpoint, e.g. {bad[:3]}")
    return model.to(device).eval()
