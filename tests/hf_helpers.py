"""Tiny random transformers models of every tested family, written to disk from configs spelled
out here (no hub access), and DSpark drafters built for them.

``bigram`` > 0 gives the model the structure of test_engine_helpers.tiny_target: large input
embeddings and an lm_head aligned to a permutation f of the vocabulary, so greedy continuations
mostly follow f while the random layers keep them context dependent; ``aligned_drafter`` then
knows f through its Markov head, so long draft blocks get accepted and partial rejections
(rollback inside a block) happen often."""

from __future__ import annotations

import json
import os

import torch

# model_type and the settings that make each family itself: sliding windows small enough that
# the short tests cross them, Gemma's alternating layer types, Qwen2's q/k/v biases (its default).
FAMILIES = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"]),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"]),
    "gemma2": dict(
        model_type="gemma2",
        architectures=["Gemma2ForCausalLM"],
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention"] * 2,
        query_pre_attn_scalar=8,
    ),
    "gemma3": dict(
        model_type="gemma3_text",
        architectures=["Gemma3ForCausalLM"],
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention"] * 2,
        query_pre_attn_scalar=8,
    ),
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=6),
}


def hf_config_dict(family: str, V: int = 64, H: int = 32, layers: int = 4, **over) -> dict:
    raw = dict(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=V - 1,
        pad_token_id=0,
    )
    raw.update(FAMILIES[family])
    raw.update(over)
    return raw


@torch.no_grad()
def write_hf_model(directory: str, family: str, seed: int = 0, bigram: float = 0.0, **over) -> str:
    """Write config.json (from :func:`hf_config_dict`) and random weights to ``directory``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    os.makedirs(directory, exist_ok=True)
    raw = hf_config_dict(family, **over)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(raw, f)
    cfg = AutoConfig.from_pretrained(directory, local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    if bigram:
        g = torch.Generator().manual_seed(seed + 1)
        V, H = cfg.vocab_size, cfg.hidden_size
        f = torch.randperm(V, generator=g)
        E = torch.randn(V, H, generator=g)
        emb = model.get_input_embeddings()
        scale = float(getattr(emb, "embed_scale", 1.0))  # Gemma multiplies embeddings by sqrt(H)
        emb.weight.copy_(E * 3.0 / scale)
        head = torch.zeros(V, H)
        head[f] = E / E.norm(dim=1, keepdim=True)  # lm_head[f(x)] ~ direction of E[x]
        model.get_output_embeddings().weight.copy_(head * bigram + 0.3 * torch.randn(V, H, generator=g))
        torch.save(f, os.path.join(directory, "bigram_perm.pt"))
    model.save_pretrained(directory)
    return directory


def bigram_perm(directory: str):
    return torch.load(os.path.join(directory, "bigram_perm.pt"))


@torch.no_grad()
def aligned_drafter(
    target, perm=None, block_size: int = 4, rank: int = 16, markov_scale: float = 40.0, layers: int = 1, seed: int = 1
):
    """The package's default DSpark drafter for ``target`` (shared embedding / head), with a Markov
    head that predicts f(prev) when ``perm`` (f) is given."""
    from dspark_native.engine import default_drafter

    d = default_drafter(target, num_layers=layers, block_size=block_size, markov_rank=rank, seed=seed)
    if perm is not None:
        V = target.config.vocab_size
        g = torch.Generator().manual_seed(seed)
        W1 = torch.randn(V, rank, generator=g)
        W1 = W1 / W1.norm(dim=1, keepdim=True)
        W2 = torch.zeros(V, rank)
        W2[perm] = W1 * markov_scale  # bias_v = scale <W1[f^-1(v)], W1[prev]>: peaks at v = f(prev)
        d.markov_head.markov_w1.weight.copy_(W1)
        d.markov_head.markov_w2.weight.copy_(W2)
    return d


@torch.no_grad()
def hf_greedy(model, prompt, max_new_tokens: int, eos=None):
    """transformers' own greedy generate of one prompt -> new token ids."""
    ids = torch.tensor([list(prompt)])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        eos_token_id=eos,
        pad_token_id=0,
    )
    return out[0, ids.shape[1] :].tolist()


@torch.no_grad()
def hf_full_logits(model, ids) -> torch.Tensor:
    """Logits fp32 [n, V] of one whole sequence through transformers without any cache."""
    return model(torch.tensor([list(ids)]), use_cache=False).logits[0].float()
