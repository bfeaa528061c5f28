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
    raw = dict(architectures=[arch], vocab_size=V, hidden_size=H, intermediate_size=48, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0,
               hidden_act="silu", tie_word_embeddings=False, max_position_embeddings=512)
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
def tiny_drafter(target: TargetModel, kind="dspark", block_size=7, seed=1, aligned=True, head_type="vanilla",
                 rank=16, layers=2, confidence=True, markov_scale=40.0):
    V = target.config.vocab_size
    tl = [1, target.config.num_hidden_layers - 1]
    torch.manual_seed(seed)
    if kind == "eagle3":
        raw = _raw(V, layers=1, arch="LlamaEagle3Model", target_layer_ids=tl, ttt_length=block_size)
        d = Eagle3Drafter(DrafterConfig.from_dict(raw))
    else:
        raw = _raw(V, layers=layers, arch="LlamaDSparkModel", target_layer_ids=tl, block_size=block_size,
                   mask_token_id=V - 1, markov_rank=rank if kind == "dspark" else 0, markov_head_type=head_type,
                   enable_confidence_head=confidence and kind == "dspark")
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
