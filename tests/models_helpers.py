"""Test helpers: random checkpoints written from shapes spelled out here (independently of the
package's modules) and straightforward reference math."""

from __future__ import annotations

import json
import math
import os

import torch


def target_raw_config(arch="Qwen3ForCausalLM", **over):
    model_type = {"Qwen3": "qwen3", "Qwen2": "qwen2"}.get(arch[:5], "llama")
    raw = dict(
        architectures=[arch],
        model_type=model_type,
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12 if arch.startswith("Qwen3") else 8,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        hidden_act="silu",
        tie_word_embeddings=False,
        max_position_embeddings=512,
    )
    raw.update(over)
    return raw


def layer_shapes(prefix, c, qk_norm, attn_in=None, qkv_bias=False):
    H, inter = c["hidden_size"], c["intermediate_size"]
    hd, nh, kv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    a = attn_in or H
    s = {
        prefix + "self_attn.q_proj.weight": (nh * hd, a),
        prefix + "self_attn.k_proj.weight": (kv * hd, a),
        prefix + "self_attn.v_proj.weight": (kv * hd, a),
        prefix + "self_attn.o_proj.weight": (H, nh * hd),
        prefix + "mlp.gate_proj.weight": (inter, H),
        prefix + "mlp.up_proj.weight": (inter, H),
        prefix + "mlp.down_proj.weight": (H, inter),
        prefix + "input_layernorm.weight": (H,),
        prefix + "post_attention_layernorm.weight": (H,),
    }
    if qk_norm:
        s[prefix + "self_attn.q_norm.weight"] = (hd,)
        s[prefix + "self_attn.k_norm.weight"] = (hd,)
    if qkv_bias:  # Qwen2: q/k/v have biases, o_proj does not
        s[prefix + "self_attn.q_proj.bias"] = (nh * hd,)
        s[prefix + "self_attn.k_proj.bias"] = (kv * hd,)
        s[prefix + "self_attn.v_proj.bias"] = (kv * hd,)
    return s


def target_shapes(c):
    qk = c["architectures"][0].startswith("Qwen3")
    bias = c["architectures"][0].startswith("Qwen2")
    s = {"model.embed_tokens.weight": (c["vocab_size"], c["hidden_size"]), "model.norm.weight": (c["hidden_size"],)}
    for i in range(c["num_hidden_layers"]):
        s.update(layer_shapes(f"model.layers.{i}.", c, qk, qkv_bias=bias))
    if not c.get("tie_word_embeddings", False):
        s["lm_head.weight"] = (c["vocab_size"], c["hidden_size"])
    return s


def random_tensors(shapes, seed, dtype=torch.float32, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shp in sorted(shapes.items()):
        if k.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shp, generator=g)
        elif k.endswith(".bias"):
            t = 0.1 * torch.randn(shp, generator=g)
        else:
            fan_in = shp[-1] if len(shp) > 1 else 1
            t = torch.randn(shp, generator=g) * (
                scale if k.endswith("embed_tokens.weight") else 1.0 / math.sqrt(fan_in)
            )
        out[k] = t.to(dtype)
    return out


def write_checkpoint(directory, raw, tensors, shards=1):
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(raw, f)
    if shards == 1:
        save_file(tensors, os.path.join(directory, "model.safetensors"))
        return
    keys = sorted(tensors)
    wmap = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[s::shards]}
        save_file(part, os.path.join(directory, name))
        wmap.update({k: name for k in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": wmap}, f)


# ---------------------------------------------------------------- reference math (fp64 capable)


def rms(x, w, eps):
    xf = x.double()
    return (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + eps)) * w.double()


def llama3_inv_freq(d, theta, factor, low_freq_factor, high_freq_factor, original_ctx):
    """Llama 3 RoPE frequencies, the published piecewise rule, one frequency at a time (fp64):
    wavelength 2 pi / f below original_ctx / high_freq_factor keeps f, above
    original_ctx / low_freq_factor gives f / factor, in between a linear blend in
    original_ctx / wavelength."""
    out = []
    for i in range(0, d, 2):
        f = theta ** (-i / d)
        wl = 2 * math.pi / f
        if wl < original_ctx / high_freq_factor:
            out.append(f)
        elif wl > original_ctx / low_freq_factor:
            out.append(f / factor)
        else:
            a = (original_ctx / wl - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - a) * f / factor + a * f)
    return torch.tensor(out, dtype=torch.float64)


def rope(x, pos, theta, inv=None):
    """Rotate-half RoPE on x [n, heads, d] at integer positions pos [n] (fp64); ``inv``: the
    frequencies (default theta^(-2i/d))."""
    d = x.shape[-1]
    if inv is None:
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def rope_interleaved(x, pos, theta):
    """llama.cpp "normal" RoPE: rotates adjacent pairs (x[2i], x[2i+1]) by pos * theta^(-2i/d)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)


def attend(q, k, v, allowed):
    """q [n, nh, d], k/v [m, nkv, d], allowed bool [n, m] -> [n, nh*d] (loops over heads)."""
    nh, nkv, d = q.shape[1], k.shape[1], q.shape[2]
    outs = []
    for h in range(nh):
        kh = h // (nh // nkv)
        s = q[:, h] @ k[:, kh].T / math.sqrt(d)
        s = s.masked_fill(~allowed, float("-inf"))
        outs.append(torch.softmax(s, -1) @ v[:, kh])
    return torch.stack(outs, 1).reshape(q.shape[0], -1)


def mlp(x, W, p):
    g = x @ W[p + "mlp.gate_proj.weight"].double().T
    u = x @ W[p + "mlp.up_proj.weight"].double().T
    return (torch.nn.functional.silu(g) * u) @ W[p + "mlp.down_proj.weight"].double().T


def _proj(W, name, x):
    """x @ W[name.weight]^T (+ W[name.bias] when the checkpoint has it), fp64."""
    y = x @ W[name + ".weight"].double().T
    b = W.get(name + ".bias")
    return y if b is None else y + b.double()


def ref_target_forward(W, c, ids, allowed=None, pos=None, rope_fn=None):
    """Whole-sequence reference forward. ids [n]; allowed [n, n] (default causal); q/k/v biases
    are added when W has them (Qwen2); ``rope_fn(x, pos, theta)`` replaces plain RoPE;
    returns logits [n, V] and the list of raw layer outputs, fp64."""
    qk = c["architectures"][0].startswith("Qwen3")
    n = ids.numel()
    eps, th = c["rms_norm_eps"], c["rope_theta"]
    hd = c["head_dim"]
    if allowed is None:
        allowed = torch.ones(n, n, dtype=torch.bool).tril()
    if pos is None:
        pos = torch.arange(n)
    h = W["model.embed_tokens.weight"].double()[ids]
    outs = []
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms(h, W[p + "input_layernorm.weight"], eps)
        q, k, v = (_proj(W, p + f"self_attn.{name}", x).reshape(n, -1, hd) for name in ("q_proj", "k_proj", "v_proj"))
        if qk:
            q = rms(q, W[p + "self_attn.q_norm.weight"], eps)
            k = rms(k, W[p + "self_attn.k_norm.weight"], eps)
        rf = rope_fn or rope
        q, k = rf(q, pos, th), rf(k, pos, th)
        h = h + attend(q, k, v, allowed) @ W[p + "self_attn.o_proj.weight"].double().T
        h = h + mlp(rms(h, W[p + "post_attention_layernorm.weight"], eps), W, p)
        outs.append(h)
    head = W.get("lm_head.weight", W["model.embed_tokens.weight"]).double()
    logits = rms(h, W["model.norm.weight"], eps) @ head.T
    return logits, outs


# ---------------------------------------------------------------- DeepSpec drafters


def drafter_raw_config(target_raw, arch="Qwen3DSparkModel", **over):
    """DeepSpec drafter config: a copy of the target's config plus the drafter fields."""
    raw = dict(target_raw)
    raw.update(
        architectures=[arch],
        num_target_layers=target_raw["num_hidden_layers"],
        target_layer_ids=[1, 2, 3, 4, 5],
        tie_word_embeddings=False,
    )
    if "Eagle3" in arch:
        raw.update(num_hidden_layers=1, ttt_length=7)
    else:
        raw.update(
            num_hidden_layers=2,
            block_size=5,
            mask_token_id=target_raw["vocab_size"] - 1,
            markov_rank=8,
            markov_head_type="vanilla",
            enable_confidence_head=True,
            confidence_head_with_markov=True,
        )
    raw.update(over)
    return raw


def drafter_shapes(c, with_shared=True):
    """Exact DeepSpec key names / shapes (DSPARK.md)."""
    H, V = c["hidden_size"], c["vocab_size"]
    arch = c["architectures"][0]
    qk = arch.startswith("Qwen3")
    k = len(c["target_layer_ids"])
    s = {"norm.weight": (H,), "fc.weight": (H, k * H)}
    if with_shared:
        s["embed_tokens.weight"] = (V, H)
        s["lm_head.weight"] = (V, H)
    if "Eagle3" in arch:
        s.update(layer_shapes("layers.0.", c, qk, attn_in=2 * H))
        s["layers.0.hidden_norm.weight"] = (H,)
        return s
    s["hidden_norm.weight"] = (H,)
    for i in range(c["num_hidden_layers"]):
        s.update(layer_shapes(f"layers.{i}.", c, qk))
    r = c.get("markov_rank", 0)
    if r > 0:
        s["markov_head.markov_w1.weight"] = (V, r)
        s["markov_head.markov_w2.weight"] = (V, r)
        if c["markov_head_type"] == "gated":
            s["markov_head.gate_proj.weight"] = (r, H + r)
            s["markov_head.gate_proj.bias"] = (r,)
        if c["markov_head_type"] == "rnn":
            s["markov_head.joint_proj.weight"] = (3 * r, 2 * r + H)
            s["markov_head.joint_proj.bias"] = (3 * r,)
    if c.get("enable_confidence_head"):
        cin = H + (r if c.get("confidence_head_with_markov", True) and r > 0 else 0)
        s["confidence_head.proj.weight"] = (1, cin)
        s["confidence_head.proj.bias"] = (1,)
    return s


def ref_dspark_block(W, c, ctx, anchor):
    """Straightforward DSpark backbone: ctx [S, k*H] features of positions 0..S-1, anchor token
    at position S. Returns U [g, V], h [g, H] (fp64)."""
    qk = c["architectures"][0].startswith("Qwen3")
    eps, th, hd, g = c["rms_norm_eps"], c["rope_theta"], c["head_dim"], c["block_size"]
    S = ctx.shape[0]
    C = rms(ctx.double() @ W["fc.weight"].double().T, W["hidden_norm.weight"], eps)
    ids = torch.full((g,), c["mask_token_id"], dtype=torch.int64)
    ids[0] = anchor
    h = W["embed_tokens.weight"].double()[ids]
    pos_all = torch.arange(S + g)
    for i in range(c["num_hidden_layers"]):
        p = f"layers.{i}."
        x = rms(h, W[p + "input_layernorm.weight"], eps)
        q = (x @ W[p + "self_attn.q_proj.weight"].double().T).reshape(g, -1, hd)
        kv_in = torch.cat([C, x])  # context rows first
        k = (kv_in @ W[p + "self_attn.k_proj.weight"].double().T).reshape(S + g, -1, hd)
        v = (kv_in @ W[p + "self_attn.v_proj.weight"].double().T).reshape(S + g, -1, hd)
        if qk:
            q = rms(q, W[p + "self_attn.q_norm.weight"], eps)
            k = rms(k, W[p + "self_attn.k_norm.weight"], eps)
        q = rope(q, pos_all[S:], th)
        k = rope(k, pos_all, th)
        allowed = torch.ones(g, S + g, dtype=torch.bool)  # no mask at all
        h = h + attend(q, k, v, allowed) @ W[p + "self_attn.o_proj.weight"].double().T
        h = h + mlp(rms(h, W[p + "post_attention_layernorm.weight"], eps), W, p)
    hn = rms(h, W["norm.weight"], eps)
    return hn @ W["lm_head.weight"].double().T, hn


def ref_eagle3_layer(W, c, toks, g_in):
    """EAGLE-3 layer over a whole causal sequence of pairs: toks [n] (token t+1), g_in [n, H]
    (feature of t), positions 0..n-1. Returns the layer output [n, H] (pre-norm) fp64."""
    qk = c["architectures"][0].startswith("Qwen3")
    eps, th, hd = c["rms_norm_eps"], c["rope_theta"], c["head_dim"]
    n = toks.numel()
    p = "layers.0."
    e = rms(W["embed_tokens.weight"].double()[toks], W[p + "input_layernorm.weight"], eps)
    x = torch.cat([e, rms(g_in.double(), W[p + "hidden_norm.weight"], eps)], -1)
    q = (x @ W[p + "self_attn.q_proj.weight"].double().T).reshape(n, -1, hd)
    k = (x @ W[p + "self_attn.k_proj.weight"].double().T).reshape(n, -1, hd)
    v = (x @ W[p + "self_attn.v_proj.weight"].double().T).reshape(n, -1, hd)
    if qk:
        q = rms(q, W[p + "self_attn.q_norm.weight"], eps)
        k = rms(k, W[p + "self_attn.k_norm.weight"], eps)
    pos = torch.arange(n)
    q, k = rope(q, pos, th), rope(k, pos, th)
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    h = g_in.double() + attend(q, k, v, allowed) @ W[p + "self_attn.o_proj.weight"].double().T
    return h + mlp(rms(h, W[p + "post_attention_layernorm.weight"], eps), W, p)


def ancestor_mask(parents):
    """bool [n, n] tree mask from parent indices (-1 = root): node i sees itself and its ancestors."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        mask[i, i] = True
        while p >= 0:
            mask[i, p] = True
            p = parents[p]
    return mask
