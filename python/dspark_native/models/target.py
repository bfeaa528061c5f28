"""Target model (Llama family incl. SmolLM2, and Qwen3) with a ragged batched forward."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from .cache import ContextLengthError, KVCache, host_ints, upload
from .config import ModelConfig
from .layers import DecoderLayer, RMSNorm, rope_cos_sin, sdpa

TreeMask = None | torch.Tensor | Sequence[torch.Tensor | None]


@dataclass
class RaggedPlan:
    """Bookkeeping for one ragged forward (shared by every layer), planned on the host.

    Device tensors: row_req [T] request index of each row, row_off [T] offset of the row in its
    block, slot_t [T] cache slot, store_t [T] storage index in the cache, positions [T] RoPE
    positions, mask [R, 1, n_max, L_max] bool, counts / slots [R]. Host: slots_l / counts_l (the
    same values as lists, for ``cache.advance``), uniform: every block has n_max rows.
    """

    R: int
    n_max: int
    L_max: int
    counts: torch.Tensor
    slots: torch.Tensor
    slot_slice: slice | None
    row_req: torch.Tensor
    row_off: torch.Tensor
    slot_t: torch.Tensor
    store_t: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    uniform: bool
    chain: bool = True  # no tree mask: every block is causal
    slots_l: list[int] | None = None  # host copies of slots / counts (for cache.advance)
    counts_l: list[int] | None = None


def _check_long_1d(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x, dtype=torch.int64)
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    return x


def _as_long_1d(x, name: str, device) -> torch.Tensor:
    """int64 [n] on ``device`` (host input uploaded without a device sync)."""
    return upload(_check_long_1d(x, name).to(torch.int64), device)


def _host_long_1d(x, name: str) -> list[int]:
    """Values of a 1-D integer input on the host (free for host input; one read for a device
    tensor)."""
    return host_ints(_check_long_1d(x, name), name)


def plan_ragged(
    cu_seqlens: torch.Tensor,
    request_ids: torch.Tensor,
    cache: KVCache,
    tree_mask: TreeMask = None,
    positions: torch.Tensor | None = None,
    total_rows: int | None = None,
) -> RaggedPlan:
    """Validate a ragged batch against ``cache`` and precompute indices and the attention mask.

    Query row i of request r (0-based inside its block) is stored at cache index
    lengths[slot] + i and sees every cached position < lengths[slot] plus the rows j of its own
    block allowed by the block mask (causal j <= i, or tree_mask[r][i, j]).

    ``cu_seqlens`` and ``request_ids`` are host bookkeeping: pass them as host tensors (or lists)
    and the plan reads nothing from the device (the cache lengths come from
    ``cache.host_lengths()``); the per-request vectors are uploaded in one asynchronous copy.
    """
    device = cache.device
    cu_l = _host_long_1d(cu_seqlens, "cu_seqlens")
    req_l = _host_long_1d(request_ids, "request_ids")
    R = len(req_l)
    if len(cu_l) != R + 1:
        raise ValueError(f"cu_seqlens must have len(request_ids) + 1 = {R + 1} entries, got {len(cu_l)}")
    if cu_l[0] != 0 or any(b < a for a, b in zip(cu_l, cu_l[1:], strict=False)):
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu_l}")
    if total_rows is not None and cu_l[-1] != total_rows:
        raise ValueError(f"cu_seqlens[-1] = {cu_l[-1]} does not match the number of rows {total_rows}")
    if any(s < 0 or s >= cache.max_requests for s in req_l):
        raise ValueError(f"request_ids must be in [0, {cache.max_requests}), got {req_l}")
    if len(set(req_l)) != R:
        raise ValueError(f"request_ids must be distinct, got {req_l}")
    counts_l = [b - a for a, b in zip(cu_l, cu_l[1:], strict=False)]
    base_l = cache.host_lengths()[req_l].tolist() if R else []
    for r in range(R):
        if base_l[r] + counts_l[r] > cache.max_seq:
            raise ContextLengthError(
                f"request slot {req_l[r]}: {base_l[r]} cached + {counts_l[r]} new positions "
                f"exceed the cache max_seq = {cache.max_seq} (prompt longer than the context?)"
            )
    T = cu_l[-1] if R else 0
    n_max = max(counts_l) if R else 0
    L_max = max(b + n for b, n in zip(base_l, counts_l, strict=True)) if R else 0
    meta = upload(torch.tensor([req_l, base_l, counts_l, cu_l[:-1]], dtype=torch.int64).reshape(4, R), device)
    req, base, counts, starts = meta[0], meta[1], meta[2], meta[3]
    row_req = torch.repeat_interleave(torch.arange(R, device=device), counts, output_size=T)
    row_off = torch.arange(T, device=device) - starts[row_req]
    slot_t = req[row_req]
    store_t = base[row_req] + row_off

    # Per-request block mask, padded to [R, n_max, n_max]; chain blocks are causal.
    ar = torch.arange(n_max, device=device)
    causal = ar[None, :] <= ar[:, None]
    blk = causal.expand(R, n_max, n_max).clone()
    depth_t = row_off
    if tree_mask is not None:
        if isinstance(tree_mask, torch.Tensor):
            if tree_mask.dim() != 3 or tree_mask.shape[0] != R:
                raise ValueError(
                    f"tree_mask tensor must be [R, n_max, n_max] = [{R}, {n_max}, {n_max}], "
                    f"got {tuple(tree_mask.shape)}"
                )
            tree_list = [tree_mask[r, : counts_l[r], : counts_l[r]] for r in range(R)]
        else:
            tree_list = list(tree_mask)
            if len(tree_list) != R:
                raise ValueError(f"tree_mask must have one entry per request ({R}), got {len(tree_list)}")
        depth_parts = []
        for r, tm in enumerate(tree_list):
            n = counts_l[r]
            if tm is None:
                depth_parts.append(torch.arange(n, device=device))
                continue
            if not isinstance(tm, torch.Tensor) or tm.dtype != torch.bool:
                raise TypeError(f"tree_mask[{r}] must be a bool tensor")
            if tuple(tm.shape) != (n, n):
                raise ValueError(f"tree_mask[{r}] must be [{n}, {n}] for a block of {n} rows, got {tuple(tm.shape)}")
            if n and not bool(tm.diagonal().all()):
                raise ValueError(f"tree_mask[{r}]: every node must attend to itself (diagonal)")
            if bool(torch.triu(tm, diagonal=1).any()):
                raise ValueError(f"tree_mask[{r}]: nodes must be in topological order (no True above the diagonal)")
            tm = upload(tm, device)
            blk[r, :n, :n] = tm
            depth_parts.append(tm.sum(-1) - 1)
        depth_t = torch.cat(depth_parts) if depth_parts else row_off
    if positions is None:
        positions = base[row_req] + depth_t
    else:
        positions = _as_long_1d(positions, "positions", device)
        if positions.numel() != T:
            raise ValueError(f"positions must have {T} entries, got {positions.numel()}")

    j = torch.arange(L_max, device=device)
    rel = j[None, None, :] - base[:, None, None]  # [R, 1, L]
    in_ctx = rel < 0
    in_blk = (rel >= 0) & (rel < counts[:, None, None])
    blk_vals = torch.gather(blk, 2, rel.clamp(0, max(n_max - 1, 0)).expand(R, n_max, L_max))
    mask = in_ctx | (in_blk & blk_vals)
    # Padding rows are discarded; let them attend everywhere so softmax stays finite.
    pad_row = ar[None, :] >= counts[:, None]
    mask = (mask | pad_row[:, :, None]).unsqueeze(1)

    slot_slice = None
    if R and req_l == list(range(req_l[0], req_l[0] + R)):
        slot_slice = slice(req_l[0], req_l[0] + R)
    return RaggedPlan(
        R=R,
        n_max=n_max,
        L_max=L_max,
        counts=counts,
        slots=req,
        slot_slice=slot_slice,
        row_req=row_req,
        row_off=row_off,
        slot_t=slot_t,
        store_t=store_t,
        positions=positions,
        mask=mask,
        uniform=all(n == n_max for n in counts_l),
        chain=tree_mask is None,
        slots_l=req_l,
        counts_l=counts_l,
    )


def ragged_attention(q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, plan: RaggedPlan) -> torch.Tensor:
    """Attention of ragged queries q [T, Hq, d] over one layer of the cache
    (k_layer/v_layer [max_requests, Hkv, max_seq, d], already holding the new rows)
    -> [T, Hq * d]."""
    R, n, L = plan.R, plan.n_max, plan.L_max
    if plan.slot_slice is not None:
        K = k_layer[plan.slot_slice, :, :L]
        V = v_layer[plan.slot_slice, :, :L]
    else:
        K = k_layer[plan.slots, :, :L]
        V = v_layer[plan.slots, :, :L]
    if plan.uniform:
        qp = q.view(R, n, q.shape[1], q.shape[2])
    else:
        qp = q.new_zeros(R, n, q.shape[1], q.shape[2])
        qp[plan.row_req, plan.row_off] = q
    out = sdpa(qp.transpose(1, 2), K, V, plan.mask).transpose(1, 2)  # [R, n, Hq, d]
    if plan.uniform:
        out = out.reshape(R * n, -1)
    else:
        out = out[plan.row_req, plan.row_off].reshape(q.shape[0], -1)
    return out


def _logit_row_index(logit_rows, plan: RaggedPlan, T: int, device):
    """None (all rows), "none", or an int64 index tensor of the rows that need logits."""
    if isinstance(logit_rows, str):
        if logit_rows == "all":
            return None
        if logit_rows == "none":
            return "none"
        if logit_rows == "last":  # from the plan's host counts: no device read
            ends, end = [], 0
            for n in plan.counts_l:
                end += n
                if n:
                    ends.append(end - 1)
            return upload(torch.tensor(ends, dtype=torch.int64), device)
        raise ValueError(f"logit_rows must be 'all', 'last', 'none' or an index tensor, got {logit_rows!r}")
    rows = _check_long_1d(logit_rows, "logit_rows").to(torch.int64)
    msg = f"logit_rows must index rows in [0, {T})"
    if rows.device.type == "cpu":
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= T):
            raise ValueError(f"{msg}, got {rows.tolist()}")
        return upload(rows, device)
    rows = rows.to(device)
    if rows.numel():
        torch._assert_async(((rows >= 0) & (rows < T)).all(), msg)
    return rows


class TargetModel(nn.Module):
    """Llama / Qwen3 decoder-only LM with a contiguous KV cache and ragged batched forward.

    Parameters are named like HF without the ``model.`` prefix (``embed_tokens``, ``layers.i.*``,
    ``norm``, ``lm_head``). With tied embeddings ``lm_head.weight`` is ``embed_tokens.weight``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._packed = None  # fused-path weights (set_weights); None = the reference path

    @property
    def weights(self) -> str:
        """The forward path in use: "reference" (the modules, HF numerics: training and tests),
        "fused" or "bf16" (see :mod:`dspark_native.models.fused`)."""
        return "reference" if self._packed is None else self._packed.weights

    def set_weights(self, weights: str = "auto") -> str:
        """Choose the forward path: "reference", "fused" (fused projections, model dtype), "bf16"
        (fused, layer weights bf16 packed for oneDNN: CPUs with AMX / AVX512-BF16), "native" (the
        whole forward in one native CPU call, bf16 weights: dspark_native.ops.target_forward) or
        "auto" (native on the CPU when the extension is built, see
        :func:`dspark_native.models.fused.resolve_weight_format`). Packs the weights once from the
        current parameters: call it again after changing them (or moving the model). Returns the
        format chosen."""
        from .fused import pack_target, resolve_weight_format

        fmt = resolve_weight_format(weights, self.device, self.dtype)
        self._packed = None if fmt == "reference" else pack_target(self, fmt)
        return fmt

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def target_layer_ids(self) -> list[int]:
        return list(self.config.target_layer_ids)

    def set_target_layer_ids(self, ids: Sequence[int] | None) -> None:
        """Select the layers whose raw outputs the forward returns as hidden features."""
        self.config.set_target_layer_ids(list(ids) if ids is not None else None)

    def new_cache(self, max_requests: int, max_seq: int) -> KVCache:
        """A zeroed KV cache for this model (dtype and device of the weights)."""
        c = self.config
        return KVCache(
            c.num_hidden_layers,
            max_requests,
            c.num_key_value_heads,
            max_seq,
            c.head_dim,
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

        Args:
            input_ids: int64 [T], the blocks of all requests concatenated.
            cu_seqlens: int64 [R+1]; rows of request r are cu[r]..cu[r+1]-1 (blocks may be empty).
            request_ids: int64 [R], distinct cache slots.
            cache: KVCache from :meth:`new_cache`; lengths[slot] advances by the block size.
            tree_mask: None (causal chains), a list of R entries (None = causal, or bool
                [n_r, n_r] with mask[i, j] = node i sees node j; ancestors first), or a padded
                bool tensor [R, n_max, n_max].
            positions: int64 [T] RoPE positions; default lengths[slot] + depth (depth = row
                offset for chains, number of ancestors for trees).
            return_hidden: also return the target-layer features.
            logit_rows: rows that get logits: "all", "last" (the last row of every non-empty
                block, in request order), "none" (features only, e.g. a prefill: skips the LM
                head) or an int64 index tensor into [0, T).
        Returns:
            logits fp32 [T, V] (or [len(rows), V]; None for "none") and hidden features
            [T, len(target_layer_ids) * H] in the model dtype (raw outputs of the layers
            target_layer_ids, before the final norm, concatenated in that order), or None when
            return_hidden is False or no layer is set.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1:
            raise ValueError("input_ids must be a 1-D LongTensor [T]")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if cache.dtype != self.dtype or cache.num_layers != len(self.layers):
            raise ValueError(
                f"cache does not match the model (dtype {cache.dtype} vs {self.dtype}, "
                f"layers {cache.num_layers} vs {len(self.layers)})"
            )
        T = input_ids.numel()
        V = self.config.vocab_size
        if input_ids.device.type == "cpu":  # host input: checked here, then uploaded asynchronously
            if T and (int(input_ids.min()) < 0 or int(input_ids.max()) >= V):
                raise ValueError(f"input_ids out of range [0, {V})")
            input_ids = upload(input_ids.to(torch.int64), self.device)
        else:  # device input: checked on the device, without a host sync
            input_ids = input_ids.to(self.device, torch.int64)
            if T:
                torch._assert_async(((input_ids >= 0) & (input_ids < V)).all(), f"input_ids out of range [0, {V})")
        plan = plan_ragged(cu_seqlens, request_ids, cache, tree_mask, positions, total_rows=T)
        ids = self.config.target_layer_ids if return_hidden else []
        H = self.config.hidden_size
        rows = _logit_row_index(logit_rows, plan, T, self.device)
        if T == 0:
            logits = None if isinstance(rows, str) else torch.zeros(0, self.config.vocab_size, device=self.device)
            return logits, (torch.zeros(0, len(ids) * H, dtype=self.dtype, device=self.device) if ids else None)
        if self._packed is not None:
            from .fused import fused_forward

            return fused_forward(self, self._packed, input_ids, plan, cache, ids, rows)
        return self._forward_planned(input_ids, plan, cache, ids, rows)

    def _forward_planned(self, input_ids, plan: RaggedPlan, cache: KVCache, ids, rows=None):
        h = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(
            plan.positions, self.config.head_dim, self.config.rope_theta, h.dtype, self.config.rope_scaling
        )
        feats = {}
        want = set(ids)
        for li, layer in enumerate(self.layers):
            x = layer.input_layernorm(h)
            q = layer.self_attn.q(x, cos, sin)
            k, v = layer.self_attn.kv(x, cos, sin)
            cache.k_cache[li, plan.slot_t, :, plan.store_t] = k
            cache.v_cache[li, plan.slot_t, :, plan.store_t] = v
            attn = ragged_attention(q, cache.k_cache[li], cache.v_cache[li], plan)
            h = layer.finish(h, attn)
            if li in want:
                feats[li] = h
        cache.advance(plan.slots, plan.counts, plan.slots_l, plan.counts_l)
        if isinstance(rows, str):
            logits = None
        else:
            logits = self.lm_head(self.norm(h if rows is None else h[rows])).float()
        hidden = torch.cat([feats[i] for i in ids], dim=-1) if ids else None
        return logits, hidden

    @torch.no_grad()
    def generate_greedy(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        eos_token_ids: Sequence[int] = (),
        cache: KVCache | None = None,
        slot: int = 0,
    ) -> list[int]:
        """Plain greedy decoding of one prompt (a baseline; no speculation). Returns new tokens."""
        prompt = torch.as_tensor(list(prompt_ids), dtype=torch.int64)
        if prompt.numel() == 0:
            raise ValueError("prompt_ids must not be empty")
        if cache is None:
            cache = self.new_cache(1, prompt.numel() + max_new_tokens)
            slot = 0
        cache.reset([slot])
        slot_t = torch.tensor([slot])
        logits, _ = self.forward(
            prompt,
            torch.tensor([0, prompt.numel()]),
            slot_t,
            cache,
            return_hidden=False,
            logit_rows="last",
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
