"""EAGLE-3 drafter in the DeepSpec checkpoint layout (one causal layer, autoregressive)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .cache import KVCache, host_ints, upload
from .config import DrafterConfig
from .drafter import _anchor_tokens
from .layers import DecoderLayer, RMSNorm, rope_cos_sin
from .target import _as_long_1d, _host_long_1d, plan_ragged, ragged_attention


class Eagle3Layer(DecoderLayer):
    """Decoder layer whose q/k/v read [input_layernorm(embed(token)) ; hidden_norm(g)] (2H)."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__(cfg, attn_in_dim=2 * cfg.hidden_size)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Eagle3Drafter(nn.Module):
    """EAGLE-3 drafter. Keys: embed_tokens, fc [H, k*H], layers.0.* (+ layers.0.hidden_norm),
    norm, lm_head.

    The layer input at position t pairs the feature g_t (fc of the target features of t, or the
    drafter's own previous output while drafting) with the token at t+1. :meth:`ingest` takes
    features together with the tokens *at the same positions* (the target's input ids); the
    last feature of each request stays pending until the next token is known (the next ingest,
    or the anchor given to :meth:`propose`). Invariant: cache length + pending = features seen.
    ``has_pending`` [max_requests] bool is host bookkeeping (a CPU tensor); ``pending`` lives on
    the drafter's device.
    """

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        if cfg.kind != "eagle3":
            raise ValueError(f"Eagle3Drafter needs an EAGLE-3 config, got kind {cfg.kind!r}")
        self.config = cfg
        H = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, H)
        self.fc = nn.Linear(len(cfg.target_layer_ids) * H, H, bias=False)
        self.layers = nn.ModuleList([Eagle3Layer(cfg)])
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(H, cfg.vocab_size, bias=False)
        self.cache: KVCache | None = None
        self.pending: torch.Tensor | None = None
        self.has_pending: torch.Tensor | None = None
        self.shared_keys: tuple[str, ...] = ()

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    def allocate_cache(self, max_requests: int, max_seq: int) -> KVCache:
        """Create the single-layer KV cache and the pending-feature buffer."""
        c = self.config
        self.cache = KVCache(
            1, max_requests, c.num_key_value_heads, max_seq, c.head_dim, dtype=self.dtype, device=self.device
        )
        self.pending = torch.zeros(max_requests, c.hidden_size, dtype=self.dtype, device=self.device)
        self.has_pending = torch.zeros(max_requests, dtype=torch.bool)  # host bookkeeping
        return self.cache

    def _need_cache(self) -> KVCache:
        if self.cache is None:
            raise RuntimeError("call drafter.allocate_cache(max_requests, max_seq) first")
        return self.cache

    def _step(self, tokens, g, req, cu, cache) -> torch.Tensor:
        """Run the layer on pairs (g_t, token_{t+1}) appended causally; returns the layer
        output (pre-norm) [T, H]."""
        plan = plan_ragged(cu, req, cache, total_rows=tokens.numel())
        layer = self.layers[0]
        x = torch.cat([layer.input_layernorm(self.embed_tokens(tokens)), layer.hidden_norm(g)], -1)
        cos, sin = rope_cos_sin(
            plan.positions, self.config.head_dim, self.config.rope_theta, x.dtype, self.config.rope_scaling
        )
        q = layer.self_attn.q(x, cos, sin)
        k, v = layer.self_attn.kv(x, cos, sin)
        cache.k_cache[0, plan.slot_t, :, plan.store_t] = k
        cache.v_cache[0, plan.slot_t, :, plan.store_t] = v
        attn = ragged_attention(q, cache.k_cache[0], cache.v_cache[0], plan)
        cache.advance(plan.slots, plan.counts, plan.slots_l, plan.counts_l)
        return layer.finish(g, attn)

    @torch.no_grad()
    def ingest(self, request_ids, ctx_features: torch.Tensor, cu_seqlens, tokens) -> None:
        """Add target features [N, k*H] (ragged by cu_seqlens [R+1]) with the token ids int64 [N]
        at the same positions. ``request_ids`` / ``cu_seqlens``: host bookkeeping (no device read);
        features and tokens on the drafter's device (or tokens on the host)."""
        cache = self._need_cache()
        req_l = _host_long_1d(request_ids, "request_ids")
        cu_l = _host_long_1d(cu_seqlens, "cu_seqlens")
        tok = _as_long_1d(tokens, "tokens", self.device)
        if ctx_features.dim() != 2 or ctx_features.shape[1] != self.fc.in_features:
            raise ValueError(f"ctx_features must be [N, {self.fc.in_features}], got {tuple(ctx_features.shape)}")
        N = ctx_features.shape[0]
        if len(set(req_l)) != len(req_l):
            raise ValueError(f"request_ids must be distinct, got {req_l}")
        if req_l and (min(req_l) < 0 or max(req_l) >= cache.max_requests):
            raise ValueError(f"request_ids must be in [0, {cache.max_requests})")
        if tok.numel() != N or len(cu_l) != len(req_l) + 1 or cu_l[-1] != N:
            raise ValueError("tokens must match ctx_features rows and cu_seqlens must end at N")
        g_new = self.fc(ctx_features.to(self.dtype))
        toks, gs, counts = [], [], []
        for r, slot in enumerate(req_l):
            a, b = cu_l[r], cu_l[r + 1]
            if b == a:
                counts.append(0)
                continue
            if bool(self.has_pending[slot]):
                gs.append(torch.cat([self.pending[slot : slot + 1], g_new[a : b - 1]]))
                toks.append(tok[a:b])
            else:
                gs.append(g_new[a : b - 1])
                toks.append(tok[a + 1 : b])
            counts.append(gs[-1].shape[0])
            self.pending[slot] = g_new[b - 1]
            self.has_pending[slot] = True
        if not toks or sum(counts) == 0:
            return
        new_cu = torch.tensor([0] + counts).cumsum(0)  # host
        self._step(torch.cat(toks), torch.cat(gs), req_l, new_cu, cache)

    def crop(self, request_ids, lengths) -> None:
        """Roll the cache back to ``lengths`` pairs and drop the pending feature: the next
        ingest must then start with the features of position ``lengths``."""
        cache = self._need_cache()
        cache.truncate(request_ids, lengths)
        self.has_pending[torch.tensor(host_ints(request_ids, "request_ids"), dtype=torch.int64)] = False

    @torch.no_grad()
    def propose(
        self,
        request_ids,
        anchor_tokens,
        steps: int,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft ``steps`` tokens autoregressively (chain).

        request_ids: host bookkeeping (host tensor or list). anchor_tokens int64 [R] (host or
        device): the token after each request's pending feature.
        Returns draft tokens int64 [R, steps] and the fp32 logits they were drawn from
        [R, steps, V] (greedy argmax when temperature == 0, else softmax(logits / T) sampling
        with ``generator``, which must live on the drafter's device).
        The cache is rolled back afterwards.
        """
        cache = self._need_cache()
        req_l = _host_long_1d(request_ids, "request_ids")
        cur = _anchor_tokens(anchor_tokens, len(req_l), self.config.vocab_size, self.device)
        if steps < 1:
            raise ValueError("steps must be >= 1")
        if req_l and (min(req_l) < 0 or max(req_l) >= cache.max_requests):
            raise ValueError(f"request_ids must be in [0, {cache.max_requests})")
        if not bool(self.has_pending[req_l].all()):
            raise RuntimeError("propose: every request needs ingested context features first")
        R = len(req_l)
        start = cache.host_lengths()[req_l].tolist()
        g = self.pending[upload(torch.tensor(req_l, dtype=torch.int64), self.device)]
        cu = torch.arange(R + 1)  # host: one row per request and step
        out_tok, out_logits = [], []
        try:
            for _ in range(steps):
                h = self._step(cur, g, req_l, cu, cache)
                logits = self.lm_head(self.norm(h)).float()
                if temperature > 0:
                    probs = torch.softmax(logits / temperature, -1)
                    cur = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
                else:
                    cur = logits.argmax(-1)
                out_tok.append(cur)
                out_logits.append(logits)
                g = h
        finally:
            cache.truncate(req_l, start)
        return torch.stack(out_tok, 1), torch.stack(out_logits, 1)
