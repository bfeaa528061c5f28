"""DSpark / DFlash drafter: block-parallel backbone with KV context injection, Markov head and
confidence head (DeepSpec checkpoint layout; parameter names are the checkpoint keys)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import ContextLengthError, KVCache, upload
from .config import DrafterConfig
from .layers import DecoderLayer, RMSNorm, apply_rope, rope_cos_sin, sdpa
from .target import _host_long_1d


def _anchor_tokens(anchor_tokens, R: int, vocab_size: int, device) -> torch.Tensor:
    """int64 [R] anchors on ``device``, range-checked: on the host for host input, on the device
    (``torch._assert_async``, no host sync) for device input."""
    if not isinstance(anchor_tokens, torch.Tensor):
        anchor_tokens = torch.as_tensor(anchor_tokens, dtype=torch.int64)
    if anchor_tokens.dim() != 1:
        raise ValueError(f"anchor_tokens must be 1-D, got shape {tuple(anchor_tokens.shape)}")
    if anchor_tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"anchor_tokens must be an integer tensor, got {anchor_tokens.dtype}")
    if anchor_tokens.numel() != R:
        raise ValueError("anchor_tokens must have one token per request")
    msg = f"anchor_tokens out of range [0, {vocab_size})"
    if anchor_tokens.device.type == "cpu":
        if R and (int(anchor_tokens.min()) < 0 or int(anchor_tokens.max()) >= vocab_size):
            raise ValueError(msg)
        return upload(anchor_tokens.to(torch.int64), device)
    anchor = anchor_tokens.to(device=device, dtype=torch.int64)
    if R:
        torch._assert_async(((anchor >= 0) & (anchor < vocab_size)).all(), msg)
    return anchor


class MarkovHead(nn.Module):
    """Low-rank transition bias B(prev, .) added to the base logits (paper Eq. 5-6).

    Parameters (DeepSpec names): ``markov_w1`` Embedding [V, r], ``markov_w2`` Linear r -> V
    (weight [V, r], no bias); gated adds ``gate_proj`` Linear(H + r -> r) on [h ; W1[prev]];
    rnn adds ``joint_proj`` Linear(2r + H -> 3r) on [s ; W1[prev] ; h] split into gate,
    candidate and output parts. All math is done in fp32 (weights are upcast), so the
    reference sampler and the fused op can share it bit for bit.
    """

    def __init__(self, vocab_size: int, hidden_size: int, rank: int, head_type: str, draft_vocab: int | None = None):
        super().__init__()
        if rank <= 0:
            raise ValueError("MarkovHead needs rank > 0")
        self.rank = rank
        self.head_type = head_type
        # W1 embeds the previous token, which may be any target token (the anchor); W2 produces
        # the bias over the columns the drafter proposes from (the draft vocabulary, if any).
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, draft_vocab or vocab_size, bias=False)
        if head_type == "gated":
            self.gate_proj = nn.Linear(hidden_size + rank, rank)
        elif head_type == "rnn":
            self.joint_proj = nn.Linear(2 * rank + hidden_size, 3 * rank)
        elif head_type != "vanilla":
            raise ValueError(f"markov_head_type {head_type!r} unknown")

    def embed(self, prev: torch.Tensor) -> torch.Tensor:
        """W1[prev]: int64 [...] -> fp32 [..., r]."""
        return F.embedding(prev, self.markov_w1.weight).float()

    def init_state(self, batch: int, device=None) -> torch.Tensor | None:
        """RNN state s_0 = 0, fp32 [batch, r]; None for the stateless variants."""
        if self.head_type != "rnn":
            return None
        return torch.zeros(batch, self.rank, device=device or self.markov_w1.weight.device)

    def step(
        self, prev: torch.Tensor, h: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One sequential step for a batch of rows.

        Args: prev int64 [N] previous token, h [N, H] backbone hidden of this position,
            state fp32 [N, r] (rnn only; None means s = 0).
        Returns: bias fp32 [N, V'] (V' = draft vocabulary size), e = W1[prev] fp32 [N, r], new state (rnn) or None.
        """
        e = self.embed(prev)
        w2 = self.markov_w2.weight.float()
        if self.head_type == "vanilla":
            return F.linear(e, w2), e, None
        hf = h.float()
        if self.head_type == "gated":
            g = torch.sigmoid(
                F.linear(torch.cat([hf, e], -1), self.gate_proj.weight.float(), self.gate_proj.bias.float())
            )
            return F.linear(g * e, w2), e, None
        if state is None:
            state = torch.zeros_like(e)
        z = torch.cat([state.float(), e, hf], -1)
        gco = F.linear(z, self.joint_proj.weight.float(), self.joint_proj.bias.float())
        g, c, o = gco.split(self.rank, dim=-1)
        g = torch.sigmoid(g)
        new_state = g * state + (1 - g) * torch.tanh(c)
        return F.linear(torch.tanh(o), w2), e, new_state

    def teacher_forced(self, prev: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Biases for known previous tokens (training, scoring).

        prev int64 [..., g] (prev[..., 0] = anchor), h [..., g, H] -> bias fp32 [..., g, V],
        e fp32 [..., g, r]. The rnn state runs left to right over the g positions.
        """
        if self.head_type != "rnn":
            flat_b, flat_e, _ = self.step(prev.reshape(-1), h.reshape(-1, h.shape[-1]))
            return (flat_b.reshape(*prev.shape, -1), flat_e.reshape(*prev.shape, -1))
        lead = prev.shape[:-1]
        g = prev.shape[-1]
        p2 = prev.reshape(-1, g)
        h2 = h.reshape(-1, g, h.shape[-1])
        state = None
        biases, es = [], []
        for k in range(g):
            b, e, state = self.step(p2[:, k], h2[:, k], state)
            biases.append(b)
            es.append(e)
        return (torch.stack(biases, 1).reshape(*lead, g, -1), torch.stack(es, 1).reshape(*lead, g, -1))


class ConfidenceHead(nn.Module):
    """c_k = sigmoid(w . [h_k ; W1[prev_k]] + b) (paper Eq. 7), fp32. ``proj``: Linear(in -> 1)."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, 1)

    def logit(self, h: torch.Tensor, e: torch.Tensor | None = None) -> torch.Tensor:
        """h [..., H], e fp32 [..., r] or None (head without Markov part) -> fp32 logit [...]."""
        x = h.float() if e is None else torch.cat([h.float(), e.float()], -1)
        if x.shape[-1] != self.proj.in_features:
            raise ValueError(f"confidence head expects {self.proj.in_features} input features, got {x.shape[-1]}")
        return F.linear(x, self.proj.weight.float(), self.proj.bias.float()).squeeze(-1)

    def forward(self, h: torch.Tensor, e: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.logit(h, e))


def check_draft_vocab(ids, vocab_size: int, what: str = "draft vocabulary") -> torch.Tensor:
    """int64 [N] target ids of a draft vocabulary, checked: 1-D, 1 <= N <= V, distinct, in
    [0, V), ascending (ascending keeps greedy ties on the lowest target id, as over the full
    vocabulary). ValueError naming ``what`` otherwise."""
    t = torch.as_tensor(ids)
    if t.dim() != 1 or t.numel() < 1 or t.numel() > vocab_size:
        raise ValueError(f"{what}: expected 1-D [N] token ids with 1 <= N <= {vocab_size}, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{what}: token ids must be integers, got {t.dtype}")
    t = t.to(torch.int64).cpu()
    if int(t.min()) < 0 or int(t.max()) >= vocab_size:
        raise ValueError(f"{what}: token ids must be in [0, {vocab_size}), got [{int(t.min())}, {int(t.max())}]")
    if t.numel() > 1 and not bool((t[1:] > t[:-1]).all()):
        if t.unique().numel() != t.numel():
            raise ValueError(f"{what}: token ids must be distinct")
        raise ValueError(f"{what}: token ids must be in ascending order")
    return t


class DSparkDrafter(nn.Module):
    """DSpark drafter (DFlash when markov_rank == 0 and no confidence head).

    State per request slot: a KV cache of the projected target context, one entry per draft
    layer. Per round the engine calls :meth:`ingest` (new context features), then
    :meth:`propose` (one block; block K/V are never kept), and :meth:`crop` to roll back.

    Draft vocabulary (``config.draft_vocab_size`` = N > 0): the LM head and Markov W2 have N rows,
    for the target tokens ``draft_to_target`` (int64 [N], ascending). Stored as EAGLE-3 does:
    buffer ``d2t`` int64 [N] offsets (target id = j + d2t[j]) and ``t2d`` bool [V] (membership).
    """

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        if cfg.kind != "dspark":
            raise ValueError(f"DSparkDrafter needs a DSpark config, got kind {cfg.kind!r}")
        self.config = cfg
        H = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, H)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        self.fc = nn.Linear(len(cfg.target_layer_ids) * H, H, bias=False)
        self.hidden_norm = RMSNorm(H, cfg.rms_norm_eps)
        N = cfg.draft_vocab
        self.lm_head = nn.Linear(H, N, bias=False)
        self.markov_head = (
            MarkovHead(cfg.vocab_size, H, cfg.markov_rank, cfg.markov_head_type, N) if cfg.markov_rank > 0 else None
        )
        if cfg.draft_vocab_size:
            self.register_buffer("d2t", torch.zeros(N, dtype=torch.int64))
            self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))
        self._vocab_cache = None
        self.confidence_head = ConfidenceHead(cfg.confidence_input_dim) if cfg.enable_confidence_head else None
        self.cache: KVCache | None = None
        # Keys taken from the target at load time (not written back by save_drafter).
        self.shared_keys: tuple[str, ...] = ()
        #: backbone of :meth:`propose` on the CPU: None = the native whole-forward kernel where it
        #: can run (:meth:`native_propose_ok`), False = always the torch layers
        self.native_propose: bool | None = None
        #: threads of the native ingest of up to 16 rows (a round's; 0: the kernel's default, every
        #: core; a prompt's ingest always uses every core). One: a few rows' GEMMs (~4 MB of bf16
        #: weights) take one core ~0.4 ms, less than a second thread's start-up and barriers
        #: cost when the cores are busy.
        self.ingest_threads: int = 1

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @property
    def draft_to_target(self) -> torch.Tensor | None:
        """int64 [N] target token of each draft column (on the drafter's device), or None for the
        full vocabulary."""
        if not self.config.draft_vocab_size:
            return None
        d2t = self.d2t
        key = (d2t.data_ptr(), d2t._version, d2t.device)
        if self._vocab_cache is None or self._vocab_cache[0] != key:
            ids = torch.arange(d2t.numel(), device=d2t.device) + d2t
            inv = torch.full((self.config.vocab_size,), -1, dtype=torch.int64, device=d2t.device)
            inv[ids] = torch.arange(ids.numel(), device=d2t.device)
            self._vocab_cache = (key, ids, inv)
        return self._vocab_cache[1]

    @property
    def target_to_draft(self) -> torch.Tensor | None:
        """int64 [V]: the draft column of each target token, -1 outside the draft vocabulary
        (None for the full vocabulary)."""
        return None if self.draft_to_target is None else self._vocab_cache[2]

    @torch.no_grad()
    def set_draft_vocab(self, token_ids) -> None:
        """Fill ``d2t`` / ``t2d`` from the N ascending target ids (the LM head and W2 rows are the
        caller's: see :func:`restrict_drafter`)."""
        if not self.config.draft_vocab_size:
            raise ValueError("set_draft_vocab: this drafter has no draft vocabulary (config.draft_vocab_size = 0)")
        ids = check_draft_vocab(token_ids, self.config.vocab_size)
        if ids.numel() != self.config.draft_vocab_size:
            raise ValueError(
                f"set_draft_vocab: {ids.numel()} token ids for a draft vocabulary of {self.config.draft_vocab_size}"
            )
        ids = ids.to(self.d2t.device)
        self.d2t.copy_(ids - torch.arange(ids.numel(), device=ids.device))
        self.t2d.zero_()
        self.t2d[ids] = True

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def allocate_cache(self, max_requests: int, max_seq: int) -> KVCache:
        """Create (and keep in ``self.cache``) the context KV cache: fp32 when :meth:`propose`
        runs the native kernel (which reads an fp32 cache), else in the model dtype.
        ``max_seq`` should leave ``block_size`` positions past the longest context: the native
        propose uses them as scratch for the block's own K/V (the torch path is taken otherwise)."""
        c = self.config
        self.cache = KVCache(
            c.num_hidden_layers,
            max_requests,
            c.num_key_value_heads,
            max_seq,
            c.head_dim,
            dtype=torch.float32 if self.native_propose_ok() else self.dtype,
            device=self.device,
        )
        return self.cache

    def native_propose_ok(self) -> bool:
        """True when :meth:`propose` can run its backbone as one native call
        (``dspark_native.ops.target_forward`` with whole-block attention): a CPU drafter, the
        compiled extension, an MLP width that is a multiple of 16 and ``native_propose`` not False."""
        if self.native_propose is False or self.device.type != "cpu":
            return False
        from .fused import _has_native_op

        c = self.config
        return _has_native_op() and c.intermediate_size % 16 == 0 and c.head_dim % 2 == 0 and c.head_dim <= 256

    def _need_cache(self) -> KVCache:
        if self.cache is None:
            raise RuntimeError("call drafter.allocate_cache(max_requests, max_seq) first")
        return self.cache

    def project_context(self, ctx_features: torch.Tensor) -> torch.Tensor:
        """C = hidden_norm(fc(ctx)): [..., k*H] -> [..., H] (model dtype)."""
        want = self.fc.in_features
        if ctx_features.shape[-1] != want:
            raise ValueError(
                f"ctx_features must have {want} = len(target_layer_ids) * hidden_size columns, "
                f"got {ctx_features.shape[-1]}"
            )
        return self.hidden_norm(self.fc(ctx_features.to(self.dtype)))

    @torch.no_grad()
    def ingest(self, request_ids: torch.Tensor, ctx_features: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
        """Append target context features to the per-request context cache.

        request_ids int64 [R]; ctx_features [N, k*H] ragged (rows of request r are
        cu[r]..cu[r+1]-1, at positions lengths[slot]..); cu_seqlens int64 [R+1].
        ``request_ids`` and ``cu_seqlens`` are host bookkeeping (host tensors or lists: no device
        read); ``ctx_features`` lives on the drafter's device.
        """
        cache = self._need_cache()
        req_l = _host_long_1d(request_ids, "request_ids")
        cu_l = _host_long_1d(cu_seqlens, "cu_seqlens")
        R = len(req_l)
        if len(cu_l) != R + 1 or cu_l[0] != 0 or cu_l[-1] != ctx_features.shape[0]:
            raise ValueError("cu_seqlens must be [R+1], start at 0 and end at ctx_features rows")
        if ctx_features.dim() != 2:
            raise ValueError(f"ctx_features must be 2-D [N, k*H], got {tuple(ctx_features.shape)}")
        counts_l = [b - a for a, b in zip(cu_l, cu_l[1:], strict=False)]
        if any(c < 0 for c in counts_l):
            raise ValueError("cu_seqlens must be non-decreasing")
        if R and (min(req_l) < 0 or max(req_l) >= cache.max_requests):
            raise ValueError(f"request_ids must be in [0, {cache.max_requests})")
        if len(set(req_l)) != R:
            raise ValueError(f"request_ids must be distinct, got {req_l}")
        base_l = cache.host_lengths()[req_l].tolist() if R else []
        over = [s for s, b, c in zip(req_l, base_l, counts_l, strict=True) if b + c > cache.max_seq]
        if over:
            raise ContextLengthError(f"drafter context cache max_seq = {cache.max_seq} exceeded for slots {over}")
        N = ctx_features.shape[0]
        if N == 0:
            return
        if cache.k_cache.dtype == torch.float32 and self._native_ingest_ok():
            self._ingest_native(req_l, base_l, counts_l, cu_l, ctx_features)
            return
        dev = self.device
        meta = upload(torch.tensor([req_l, base_l, counts_l, cu_l[:-1]], dtype=torch.int64), dev)
        req, base, counts, starts = meta[0], meta[1], meta[2], meta[3]
        row_req = torch.repeat_interleave(torch.arange(R, device=dev), counts, output_size=N)
        slot_t = req[row_req]
        pos_t = base[row_req] + torch.arange(N, device=dev) - starts[row_req]
        C = self.project_context(ctx_features)
        cos, sin = rope_cos_sin(pos_t, self.config.head_dim, self.config.rope_theta, C.dtype, self.config.rope_scaling)
        for li, layer in enumerate(self.layers):
            # Context rows bypass input_layernorm (DFlash KV injection): k/v come from C directly.
            k, v = layer.self_attn.kv(C, cos, sin)
            cache.k_cache[li, slot_t, :, pos_t] = k.to(cache.dtype)
            cache.v_cache[li, slot_t, :, pos_t] = v.to(cache.dtype)
        cache.advance(req, counts, req_l, counts_l)

    def _native_ingest_ok(self) -> bool:
        """The native ingest (``inject_context``) runs where the native propose does, for an fc
        without bias and q rows that fill whole panels (Hq d a multiple of 16)."""
        c = self.config
        return self.fc.bias is None and (c.num_attention_heads * c.head_dim) % 16 == 0 and self.native_propose_ok()

    def _ingest_native(self, req_l, base_l, counts_l, cu_l, ctx_features: torch.Tensor) -> None:
        """:meth:`ingest` as one ``inject_context`` call (bf16 panels, fp32 accumulation, the
        drafter's thread team): fc + hidden_norm + every layer's K/V of the new context rows."""
        from ..ops.target_forward import inject_context

        c, cache = self.config, self.cache
        nw = self._native_weights()
        fc, norm = self._native_context_weights()
        lw = nw[0].layer_weights
        layer_kv = [t for li in range(len(self.layers)) for t in (lw[9 * li], lw[9 * li + 7], lw[9 * li + 8])]
        pos = torch.cat([torch.arange(b, b + n, dtype=torch.int64) for b, n in zip(base_l, counts_l, strict=True)])
        feats = ctx_features.to(torch.float32).contiguous()
        inject_context(
            feats,
            pos,
            torch.tensor(cu_l, dtype=torch.int64),
            torch.tensor(req_l, dtype=torch.int64),
            torch.tensor(base_l, dtype=torch.int64),
            cache.k_cache,
            cache.v_cache,
            fc,
            norm,
            layer_kv,
            nw[0].inv_freq,
            num_heads=c.num_attention_heads,
            eps=c.rms_norm_eps,
            num_threads=self.ingest_threads if feats.shape[0] <= 16 else 0,  # a prompt: every core
        )
        counts = torch.tensor(counts_l, dtype=torch.int64)
        cache.advance(torch.tensor(req_l, dtype=torch.int64), counts, req_l, counts_l)

    def _native_context_weights(self):
        """(fc panels, hidden_norm weight fp32) for ``inject_context``, packed again whenever
        either source weight changes."""
        from ..ops.target_forward import pack_panels

        srcs = (self.fc.weight, self.hidden_norm.weight)
        key = tuple((t.data_ptr(), t._version) for t in srcs)
        cached = getattr(self, "_native_ctx_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            out = (pack_panels(self.fc.weight), self.hidden_norm.weight.detach().float().contiguous())
        self._native_ctx_cache = (key, out)
        return out

    def crop(self, request_ids, lengths) -> None:
        """Roll the context cache of the given slots back to ``lengths`` positions."""
        self._need_cache().truncate(request_ids, lengths)

    def block_input_ids(self, anchor_tokens: torch.Tensor) -> torch.Tensor:
        """[anchor, mask, ..., mask]: int64 [R] -> [R, block_size]."""
        R = anchor_tokens.shape[0]
        ids = torch.full((R, self.block_size), self.config.mask_token_id, dtype=torch.int64, device=self.device)
        ids[:, 0] = anchor_tokens
        return ids

    @torch.no_grad()
    def propose(self, request_ids: torch.Tensor, anchor_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone forward over one block per request (parallel stage).

        request_ids int64 [R] (host bookkeeping: a host tensor or list); anchor_tokens int64 [R]
        (last committed token, position = cached context length; host or device). Returns base
        logits U fp32 [R, g, V'] (V' = the draft vocabulary size; column j is target token
        ``draft_to_target[j]``) and hidden h [R, g, H] (= norm(last layer output), model dtype;
        U = lm_head(h)). The cache is unchanged: block K/V are attended to but never stored (the
        "crop").
        """
        cache = self._need_cache()
        req_l = _host_long_1d(request_ids, "request_ids")
        anchor = _anchor_tokens(anchor_tokens, len(req_l), self.config.vocab_size, self.device)
        if req_l and (min(req_l) < 0 or max(req_l) >= cache.max_requests):
            raise ValueError(f"request_ids must be in [0, {cache.max_requests})")
        R, g = len(req_l), self.block_size
        base_l = cache.host_lengths()[req_l].tolist() if R else []
        L = max(base_l) if R else 0
        if R and cache.k_cache.dtype == torch.float32 and L + g <= cache.max_seq and self.native_propose_ok():
            return self._propose_native(req_l, base_l, anchor)
        meta = upload(torch.tensor([req_l, base_l], dtype=torch.int64).reshape(2, R), self.device)
        req, ctx_len = meta[0], meta[1]
        ids = self.block_input_ids(anchor)
        pos = ctx_len[:, None] + torch.arange(g, device=self.device)
        j = torch.arange(L + g, device=self.device)
        # Bidirectional block: each query sees the request's own context and the whole block.
        mask = ((j[None, :] < ctx_len[:, None]) | (j[None, :] >= L))[:, None, None, :]
        h = self.embed_tokens(ids)
        cos, sin = rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta, h.dtype, self.config.rope_scaling)
        for li, (layer, fw) in enumerate(zip(self.layers, self._fused_weights(), strict=True)):
            at = layer.self_attn
            # one GEMM for q|k|v and one for gate|up (the same products as the separate
            # projections; at batch 1 each GEMM call costs more in overhead than in FLOPs)
            qkv = F.linear(layer.input_layernorm(h), fw[0], fw[1])
            q, k, v = qkv.split(fw[2], dim=-1)
            q = q.unflatten(-1, (at.num_heads, at.head_dim))
            k = k.unflatten(-1, (at.num_kv_heads, at.head_dim))
            v = v.unflatten(-1, (at.num_kv_heads, at.head_dim))
            if at.q_norm is not None:
                q, k = at.q_norm(q), at.k_norm(k)
            q = apply_rope(q, cos, sin).transpose(1, 2)
            k = apply_rope(k, cos, sin)
            K = torch.cat([cache.k_cache[li, req, :, :L].to(k.dtype), k.transpose(1, 2)], dim=2)
            V = torch.cat([cache.v_cache[li, req, :, :L].to(v.dtype), v.transpose(1, 2)], dim=2)
            attn = sdpa(q, K, V, mask).transpose(1, 2).flatten(2)
            h = h + at.o_proj(attn)
            gate, up = F.linear(layer.post_attention_layernorm(h), fw[3]).chunk(2, dim=-1)
            h = h + layer.mlp.down_proj(F.silu(gate) * up)
        h = self.norm(h)
        return self.lm_head(h).float(), h

    def _propose_native(self, req_l: list[int], base_l: list[int], anchor: torch.Tensor):
        """:meth:`propose`'s backbone as one ``target_forward`` call: rows [anchor, mask, ...] of
        each request attend to its cached context and their whole block (block_attention). The
        block's K/V land past the cached length, positions the next :meth:`ingest` overwrites."""
        from ..ops.target_forward import target_forward

        c, cache = self.config, self.cache
        R, g = len(req_l), self.block_size
        nw = self._native_weights()
        ids = self.block_input_ids(anchor).reshape(-1)
        h = self.embed_tokens(ids).float().contiguous()
        base = torch.tensor(base_l, dtype=torch.int64)
        pos = (base[:, None] + torch.arange(g)).reshape(-1)
        logits, _ = target_forward(
            h,
            pos,
            torch.arange(0, R * g + 1, g),
            torch.tensor(req_l, dtype=torch.int64),
            base,
            cache.k_cache,
            cache.v_cache,
            nw[0].layer_weights,
            nw[0].lm_head,
            nw[1],
            nw[0].inv_freq,
            torch.arange(R * g),
            [],
            num_heads=c.num_attention_heads,
            intermediate_size=c.intermediate_size,
            vocab_size=self.lm_head.out_features,
            eps=c.rms_norm_eps,
            block_attention=True,
        )
        # norm(h) in the model dtype, normalised in fp32 from the fp32 residual (RMSNorm's numerics)
        hn = self.norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps)).to(self.dtype)
        return logits.view(R, g, -1), hn.view(R, g, -1)

    def _native_weights(self):
        """(packed weights for target_forward, final norm fp32), packed once and again whenever a
        source weight changes."""
        srcs = [p for n, p in self.named_parameters() if n.startswith(("layers.", "norm.", "lm_head."))]
        key = tuple((t.data_ptr(), t._version) for t in srcs)
        cached = getattr(self, "_native_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        from .fused import _pack_native

        with torch.no_grad():
            out = (_pack_native(self), self.norm.weight.detach().float().contiguous())
        self._native_cache = (key, out)
        return out

    def _fused_weights(self) -> list:
        """Per layer (W_qkv, b_qkv or None, split sizes, W_gate_up), concatenated once and rebuilt
        whenever a source weight changes (training, loading, ``.to()``)."""
        srcs = []
        for layer in self.layers:
            at, mlp = layer.self_attn, layer.mlp
            srcs += [at.q_proj.weight, at.k_proj.weight, at.v_proj.weight, mlp.gate_proj.weight, mlp.up_proj.weight]
            if at.q_proj.bias is not None:
                srcs += [at.q_proj.bias, at.k_proj.bias, at.v_proj.bias]
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in srcs)
        cached = getattr(self, "_fused_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        out = []
        with torch.no_grad():
            for layer in self.layers:
                at, mlp = layer.self_attn, layer.mlp
                w = torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight])
                b = None
                if at.q_proj.bias is not None:
                    b = torch.cat([at.q_proj.bias, at.k_proj.bias, at.v_proj.bias])
                sizes = [at.q_proj.out_features, at.k_proj.out_features, at.v_proj.out_features]
                out.append((w, b, sizes, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])))
        self._fused_cache = (key, out)
        return out

    def forward_train(
        self, ctx_features: torch.Tensor, block_ids: torch.Tensor, anchor_positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced backbone forward for training (gradients flow).

        Args:
            ctx_features: [B, S, k*H] target features of positions 0..S-1.
            block_ids: int64 [B, A, g] block inputs (anchor then mask tokens).
            anchor_positions: int64 [B, A] position s of each anchor; block a sees context
                positions < s and its own g rows (at positions s..s+g-1).
        Returns: U fp32 [B, A, g, V'] (V' = draft vocabulary), h [B, A, g, H] (normed, as in
        :meth:`propose`).
        """
        B, S, _ = ctx_features.shape
        _, A, g = block_ids.shape
        dev = ctx_features.device
        C = self.project_context(ctx_features)
        ctx_pos = torch.arange(S, device=dev).expand(B, S)
        blk_pos = anchor_positions[:, :, None] + torch.arange(g, device=dev)
        blk_pos = blk_pos.reshape(B, A * g)
        hd, th, sc = self.config.head_dim, self.config.rope_theta, self.config.rope_scaling
        ccos, csin = rope_cos_sin(ctx_pos, hd, th, C.dtype, sc)
        bcos, bsin = rope_cos_sin(blk_pos, hd, th, C.dtype, sc)
        a_of_row = torch.arange(A * g, device=dev) // g
        ctx_ok = torch.arange(S, device=dev)[None, None, :] < anchor_positions[:, a_of_row, None]
        blk_ok = (a_of_row[:, None] == a_of_row[None, :]).expand(B, A * g, A * g)
        mask = torch.cat([ctx_ok, blk_ok], dim=2)[:, None]
        h = self.embed_tokens(block_ids.reshape(B, A * g))
        for layer in self.layers:
            x = layer.input_layernorm(h)
            q = layer.self_attn.q(x, bcos, bsin).transpose(1, 2)
            kc, vc = layer.self_attn.kv(C, ccos, csin)
            kb, vb = layer.self_attn.kv(x, bcos, bsin)
            K = torch.cat([kc, kb], 1).transpose(1, 2)
            V = torch.cat([vc, vb], 1).transpose(1, 2)
            h = layer.finish(h, sdpa(q, K, V, mask).transpose(1, 2).flatten(2))
        h = self.norm(h)
        return self.lm_head(h).float().reshape(B, A, g, -1), h.reshape(B, A, g, -1)

    def markov_bias(
        self, prev: torch.Tensor, h: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One Markov step (see :meth:`MarkovHead.step`); zeros when markov_rank == 0."""
        if self.markov_head is None:
            return (torch.zeros(prev.shape[0], self.config.draft_vocab, device=self.device), None, None)
        return self.markov_head.step(prev, h, state)

    def heads_teacher_forced(
        self, U: torch.Tensor, h: torch.Tensor, prev: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Corrected logits z = U + B(prev) fp32 [..., g, V'] and confidence fp32 [..., g]
        (None without a confidence head), for known prev tokens int64 [..., g]
        (prev[..., 0] = anchor, prev[..., k] = token k-1 of the block)."""
        e = None
        z = U.float()
        if self.markov_head is not None:
            bias, e = self.markov_head.teacher_forced(prev, h)
            z = z + bias
        conf = None
        if self.confidence_head is not None:
            conf = self.confidence_head(h, e if self.config.confidence_head_with_markov else None)
        return z, conf


@torch.no_grad()
def restrict_drafter(drafter: DSparkDrafter, token_ids) -> DSparkDrafter:
    """A copy of a full-vocabulary DSpark/DFlash drafter that proposes only from ``token_ids``
    (N ascending target ids): the LM head and Markov W2 keep those rows, every other weight is
    shared (same tensors). The draft distribution is the full one renormalised over the subset."""
    import copy

    if drafter.config.draft_vocab_size:
        raise ValueError("restrict_drafter: the drafter already has a draft vocabulary")
    ids = check_draft_vocab(token_ids, drafter.config.vocab_size)
    cfg = copy.deepcopy(drafter.config)
    cfg.draft_vocab_size = 0 if ids.numel() == cfg.vocab_size else ids.numel()
    if not cfg.draft_vocab_size:
        return drafter
    cfg.raw = dict(cfg.raw, draft_vocab_size=cfg.draft_vocab_size)
    with torch.device("meta"):
        out = DSparkDrafter(cfg)
    dev = drafter.device
    state = {}
    for k, v in drafter.state_dict().items():
        state[k] = v[ids.to(v.device)].clone() if k in ("lm_head.weight", "markov_head.markov_w2.weight") else v
    state["d2t"] = torch.zeros(ids.numel(), dtype=torch.int64, device=dev)
    state["t2d"] = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=dev)
    out.load_state_dict(state, strict=True, assign=True)
    out.set_draft_vocab(ids)
    out.embed_tokens.weight.requires_grad_(False)
    out.shared_keys = drafter.shared_keys
    if hasattr(drafter, "sts_temperature"):
        out.sts_temperature = drafter.sts_temperature
    return out.train(drafter.training)
