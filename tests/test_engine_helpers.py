"""Tiny random models for the engine tests, built in code (no files).

``tiny_target`` has a strong "bigram" path (big embeddings, lm_head aligned to a permutation f of
the vocabulary) so that its greedy continuation mostly follows f while the random layers still make
it context dependent; ``aligned=True`` drafters know f (Markov head / shared head), so long draft
blocks are accepted and stops / limits inside accepted blocks get exercised. ``aligned=False``
gives plain random drafters (almost every draft rejected)."""

from __future__ import annotations

import torch

from dspark_native.models import DrafterConfig, DSparkDrafter, Eagle3Drafter, ModelConfig, TargetModel


def _raw(V, H=32, layers=4, arch="LlamaForCausalLM", **over):
    raw = dict(
        architectures=[arch],
        vocab_size=V,
        hidden_size=H,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        hidden_act="silu",
        tie_word_embeddings=False,
        max_position_embeddings=512,
    )
    raw.update(over)
    return raw


def perm(V, seed=0):
    return torch.randperm(V, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def tiny_target(V=64, seed=0, bigram=4.0, layers=4) -> TargetModel:
    torch.manual_seed(seed)
    m = TargetModel(ModelConfig.from_dict(_raw(V, layers=layers)))
    f = perm(V, seed)
    E = torch.randn(V, m.config.hidden_size)
    m.embed_tokens.weight.copy_(E * 3.0)
    if bigram:
        head = torch.zeros_like(E)
        head[f] = E / E.norm(dim=1, keepdim=True)  # lm_head[f(x)] ~ direction of E[x]
        m.lm_head.weight.copy_(head * bigram + 0.3 * torch.randn_like(E))
    m.eval()
    m.bigram_perm = f
    return m


@torch.no_grad()
def tiny_drafter(
    target: TargetModel,
    kind="dspark",
    block_size=7,
    seed=1,
    aligned=True,
    head_type="vanilla",
    rank=16,
    layers=2,
    confidence=True,
    markov_scale=40.0,
):
    V = target.config.vocab_size
    tl = [1, target.config.num_hidden_layers - 1]
    torch.manual_seed(seed)
    if kind == "eagle3":
        raw = _raw(V, layers=1, arch="LlamaEagle3Model", target_layer_ids=tl, ttt_length=block_size)
        d = Eagle3Drafter(DrafterConfig.from_dict(raw))
    else:
        raw = _raw(
            V,
            layers=layers,
            arch="LlamaDSparkModel",
            target_layer_ids=tl,
            block_size=block_size,
            mask_token_id=V - 1,
            markov_rank=rank if kind == "dspark" else 0,
            markov_head_type=head_type,
            enable_confidence_head=confidence and kind == "dspark",
        )
        d = DSparkDrafter(DrafterConfig.from_dict(raw))
        if kind == "dspark" and aligned:
            f = target.bigram_perm
            W1 = torch.randn(V, rank)
            W1 = W1 / W1.norm(dim=1, keepdim=True)
            d.markov_head.markov_w1.weight.copy_(W1)
            W2 = torch.zeros(V, rank)
            W2[f] = W1 * markov_scale  # bias_v = scale <W1[f^-1(v)], W1[prev]>: peaks at v = f(prev)
            d.markov_head.markov_w2.weight.copy_(W2)
        if d.confidence_head is not None:
            d.confidence_head.proj.weight.normal_(0, 0.3)
            d.confidence_head.proj.bias.fill_(1.0)
    if aligned:
        d.embed_tokens.weight.copy_(target.embed_tokens.weight)
        d.lm_head.weight.copy_(target.lm_head.weight)
    d.eval()
    return d


@torch.no_grad()
def exact_sequence_probs(target: TargetModel, prompt, n: int, temperature=1.0, top_k=0, top_p=1.0):
    """P(x_1..x_n | prompt) for all V^n sequences (index = x_1 V^(n-1) + ... + x_n), by enumeration
    with the reference row distribution of verify_chain (temperature, top-k, top-p). fp64 [V^n]."""
    from dspark_native.reference.sampling import target_probs

    V = target.config.vocab_size
    prompt = list(prompt)
    probs = torch.ones(1, dtype=torch.float64)
    prefixes = [[]]
    for _ in range(n):
        new_probs, new_prefixes = [], []
        # one batched forward over every prefix (whole sequences, fresh cache)
        seqs = [prompt + p for p in prefixes]
        L = len(seqs[0])
        cache = target.new_cache(len(seqs), L)
        ids = torch.tensor([t for s in seqs for t in s])
        cu = torch.arange(len(seqs) + 1) * L
        logits, _ = target(ids, cu, torch.arange(len(seqs)), cache, return_hidden=False)
        last = logits.view(len(seqs), L, V)[:, -1]
        for i, pfx in enumerate(prefixes):
            row = target_probs(last[i], temperature, top_k, top_p).double()
            new_probs.append(probs[i] * row)
            new_prefixes += [pfx + [v] for v in range(V)]
        probs = torch.cat(new_probs)
        prefixes = new_prefixes
    return probs


def seq_index(tokens, V):
    idx = 0
    for t in tokens:
        idx = idx * V + t
    return idx


# ----------------------------------------------------------------------------- engine-free references


@torch.no_grad()
def greedy_reference(target: TargetModel, prompts, max_new: int):
    """Greedy continuations of ``max_new`` tokens for each prompt, computed without the engine, the
    KV-cache rollback or verify_chain: every step runs one fresh forward over the whole sequences
    (a new cache each time) and takes the argmax of each sequence's last row."""
    seqs = [list(p) for p in prompts]
    dev = target.device
    for _ in range(max_new):
        cu = [0]
        for s in seqs:
            cu.append(cu[-1] + len(s))
        cache = target.new_cache(len(seqs), max(len(s) for s in seqs))
        logits, _ = target(
            torch.tensor([t for s in seqs for t in s], device=dev),
            torch.tensor(cu),
            torch.arange(len(seqs)),
            cache,
            return_hidden=False,
        )
        last = logits[torch.tensor(cu[1:], device=dev) - 1].argmax(-1).tolist()
        for s, t in zip(seqs, last, strict=True):
            s.append(int(t))
    return [s[len(p) :] for s, p in zip(seqs, prompts, strict=True)]


def expected_output(free, params):
    """What a request must emit given its free-running greedy continuation: cut at max_new_tokens
    and after the first stop token (inclusive)."""
    out = []
    for t in free[: params.max_new_tokens]:
        out.append(t)
        if t in set(params.stop_token_ids):
            break
    return out


class ScriptedDSpark(DSparkDrafter):
    """A DSpark/DFlash drafter whose block proposals follow a script: the backbone runs as usual (so
    shapes, hidden states and confidences are real) and the base logit of the scripted token gets
    +1e4 at each block position, which makes it the draft whatever the Markov head adds.

    ``script[slot]`` is the full token sequence (prompt + greedy continuation) of the request in
    that slot. Position k of a block anchored at position s proposes ``script[s + 1 + k]`` when
    k < ``right`` (None: always), else a token that is certainly wrong (the next id modulo V)."""

    script: dict
    right = None

    def propose(self, request_ids, anchor_tokens):
        U, h = super().propose(request_ids, anchor_tokens)
        U = U.clone()
        V = U.shape[-1]
        slots = [int(x) for x in torch.as_tensor(request_ids).tolist()]
        pos = self.cache.host_lengths()[slots].tolist()
        for r, (slot, s) in enumerate(zip(slots, pos, strict=True)):
            for k in range(U.shape[1]):
                U[r, k, _scripted_token(self, slot, s + 1 + k, k, V)] += 1e4
        return U, h


class ScriptedEagle3(Eagle3Drafter):
    """EAGLE-3 with scripted chains (same script / ``right`` rules as :class:`ScriptedDSpark`);
    the anchor of request r sits at position cache length + 1 (the pending feature)."""

    script: dict
    right = None

    def propose(self, request_ids, anchor_tokens, steps, temperature=0.0, generator=None):
        V = self.config.vocab_size
        slots = [int(x) for x in torch.as_tensor(request_ids).tolist()]
        pos = self.cache.host_lengths()[slots].tolist()
        toks = torch.tensor(
            [
                [_scripted_token(self, slot, s + 2 + k, k, V) for k in range(steps)]
                for slot, s in zip(slots, pos, strict=True)
            ],
            dtype=torch.int64,
        )
        logits = torch.full((len(slots), steps, V), -30.0)
        logits.scatter_(2, toks[:, :, None], 30.0)
        return toks.to(self.device), logits.to(self.device)


def _scripted_token(d, slot, i, k, V):
    seq = d.script[slot]
    t = seq[i] if i < len(seq) else 0
    return t if d.right is None or k < d.right else (t + 1) % V


def scripted_drafter(target: TargetModel, kind: str, block_size: int, scripts, right=None):
    """``tiny_drafter`` turned into a scripted oracle (``right=None``), a drafter that is always wrong
    (``right=0``) or right for the first ``right`` positions of every block only."""
    d = tiny_drafter(target, kind, block_size=block_size, aligned=False)
    d.__class__ = ScriptedEagle3 if kind == "eagle3" else ScriptedDSpark
    d.script = {i: list(s) for i, s in enumerate(scripts)}
    d.right = right
    return d
