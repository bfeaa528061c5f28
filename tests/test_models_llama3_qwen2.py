"""Targets the field uses: Llama 3.x (rope_type "llama3" frequency scaling) and Qwen2 / Qwen2.5
(q/k/v biases). Random checkpoints written by the test are checked against the fp64 reference
forward of tests/models_helpers.py (its own llama3 frequency rule, written from the published
piecewise definition), and, where `transformers` is importable, against Hugging Face's own
models (skipped cleanly when it is not)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from models_helpers import (
    llama3_inv_freq,
    random_tensors,
    ref_target_forward,
    rope,
    target_raw_config,
    target_shapes,
    write_checkpoint,
)

from dspark_native.models import CheckpointError, ModelConfig, load_target
from dspark_native.models.fused import cpu_runs_onednn_bf16
from dspark_native.models.layers import rope_inv_freq

# head_dim 16, theta 1e4: wavelengths 6.3, 19.9, 62.8, 199, ... With L = 64, low 1, high 4 the
# bands are w < 16 (kept: 6.3), 16 <= w <= 64 (blended: 19.9, 62.8) and w > 64 (divided): all three.
LLAMA3 = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
)
HD = 16


def _llama3_raw(**over):
    return target_raw_config(
        "LlamaForCausalLM",
        head_dim=HD,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_scaling=dict(LLAMA3),
        max_position_embeddings=1024,
        **over,
    )


def _llama3_rope(theta):
    inv = llama3_inv_freq(HD, theta, 8.0, 1.0, 4.0, 64)
    return lambda x, pos, th: rope(x, pos, th, inv)


def _ids(n, V, seed):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- frequencies


def test_llama3_inv_freq_matches_the_piecewise_definition():
    cfg = ModelConfig.from_dict(_llama3_raw())
    sc = cfg.rope_scaling
    assert (sc.factor, sc.low_freq_factor, sc.high_freq_factor) == (8.0, 1.0, 4.0)
    assert sc.original_max_position_embeddings == 64
    got = rope_inv_freq(HD, 10000.0, sc).double()
    want = llama3_inv_freq(HD, 10000.0, 8.0, 1.0, 4.0, 64)
    torch.testing.assert_close(got, want, rtol=2e-7, atol=0)
    plain = rope_inv_freq(HD, 10000.0).double()
    wl = 2 * math.pi / plain
    assert bool((got[wl < 16] == plain[wl < 16]).all())  # high frequencies kept
    torch.testing.assert_close(got[wl > 64], plain[wl > 64] / 8, rtol=1e-6, atol=0)  # low ones divided
    mid = (wl >= 16) & (wl <= 64)
    assert int(mid.sum()) == 2 and bool(((got[mid] < plain[mid]) & (got[mid] > plain[mid] / 8)).all())


def test_rope_config_spellings_and_errors():
    # transformers 5 writes rope_parameters (with rope_theta inside) instead of rope_theta/rope_scaling
    v5 = _llama3_raw()
    del v5["rope_scaling"], v5["rope_theta"]
    v5["rope_parameters"] = dict(LLAMA3, rope_theta=500000.0)
    c = ModelConfig.from_dict(v5)
    assert c.rope_theta == 500000.0 and c.rope_scaling == ModelConfig.from_dict(_llama3_raw()).rope_scaling
    plain = target_raw_config("LlamaForCausalLM", rope_parameters={"rope_type": "default", "rope_theta": 123.0})
    del plain["rope_theta"]
    c = ModelConfig.from_dict(plain)
    assert c.rope_theta == 123.0 and c.rope_scaling is None
    for bad, match in [
        (dict(rope_type="yarn", factor=4.0), "rope_type 'yarn'"),
        (dict(LLAMA3, factor=None), "factor"),
        (dict(LLAMA3, high_freq_factor=1.0), "high_freq_factor"),
        (dict(LLAMA3, original_max_position_embeddings=0), "original_max_position_embeddings"),
        ("llama3", "rope_scaling"),
    ]:
        with pytest.raises(CheckpointError, match=match):
            ModelConfig.from_dict(_llama3_raw() | {"rope_scaling": bad})
    with pytest.raises(CheckpointError, match="use_sliding_window"):
        ModelConfig.from_dict(target_raw_config("Qwen2ForCausalLM", use_sliding_window=True))


# ----------------------------------------------------------------------------- against the fp64 reference


@pytest.fixture(scope="module")
def llama3_ckpt(tmp_path_factory):
    raw = _llama3_raw()
    W = random_tensors(target_shapes(raw), seed=31)
    d = tmp_path_factory.mktemp("llama3")
    write_checkpoint(str(d), raw, W)
    return str(d), raw, W


def test_llama3_target_matches_reference(llama3_ckpt):
    d, raw, W = llama3_ckpt
    model = load_target(d)
    n = 150  # positions well past original_max_position_embeddings (64)
    ids = _ids(n, raw["vocab_size"], 5)
    want, _ = ref_target_forward(W, raw, ids, rope_fn=_llama3_rope(raw["rope_theta"]))
    # prefill 120, then decode 30 one at a time through the cache
    cache = model.new_cache(1, n)
    first, _ = model(ids[:120], torch.tensor([0, 120]), torch.tensor([0]), cache, return_hidden=False)
    rows = [first]
    for i in range(120, n):
        lg, _ = model(ids[i : i + 1], torch.tensor([0, 1]), torch.tensor([0]), cache, return_hidden=False)
        rows.append(lg)
    got = torch.cat(rows)
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)
    # the scaling matters here: plain RoPE on the same weights is far off
    plain, _ = ref_target_forward(W, raw, ids)
    assert float((plain - want)[64:].abs().max()) > 100 * 2e-4


@pytest.fixture(scope="module")
def qwen2_ckpt(tmp_path_factory):
    raw = target_raw_config("Qwen2ForCausalLM", tie_word_embeddings=True, rope_theta=1e6)
    W = random_tensors(target_shapes(raw), seed=32)
    for k in W:  # biases large enough to matter
        if k.endswith(".bias"):
            W[k] = W[k] * 10
    d = tmp_path_factory.mktemp("qwen2")
    write_checkpoint(str(d), raw, W)
    return str(d), raw, W


def test_qwen2_target_matches_reference(qwen2_ckpt):
    d, raw, W = qwen2_ckpt
    model = load_target(d)
    assert model.layers[0].self_attn.q_proj.bias is not None and model.layers[0].self_attn.o_proj.bias is None
    ids = _ids(40, raw["vocab_size"], 6)
    want, _ = ref_target_forward(W, raw, ids)
    cache = model.new_cache(2, 64)
    got, _ = model(ids, torch.tensor([0, 40]), torch.tensor([1]), cache, return_hidden=False)
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)
    nobias = {k: (torch.zeros_like(v) if k.endswith(".bias") else v) for k, v in W.items()}
    assert float((ref_target_forward(nobias, raw, ids)[0] - want).abs().max()) > 100 * 2e-4


@pytest.mark.parametrize("weights", ["fused", "bf16", "native"])
def test_fast_target_paths_keep_scaling_and_biases(llama3_ckpt, qwen2_ckpt, weights):
    """The fused / bf16 / native forward paths implement Llama 3 scaling and Qwen2's biases: a
    prefill past the original context, then cached decode, agrees with the reference path
    (fp32 fused tightly; the bf16 paths to bf16 rounding; dropping either feature is far off)."""
    if weights == "bf16" and not cpu_runs_onednn_bf16():
        pytest.skip("oneDNN's bf16 GEMM cannot run on this CPU (no AVX512BW/VL/DQ, no AVX-NE-CONVERT)")
    for d, raw, _ in (llama3_ckpt, qwen2_ckpt):
        ref, fast = load_target(d), load_target(d)
        assert fast.set_weights(weights) == weights
        ids = _ids(100, raw["vocab_size"], 8)
        outs = []
        for m in (ref, fast):
            cache = m.new_cache(1, 100)
            a, _ = m(ids[:90], torch.tensor([0, 90]), torch.tensor([0]), cache, return_hidden=False)
            b, _ = m(ids[90:], torch.tensor([0, 10]), torch.tensor([0]), cache, return_hidden=False)
            outs.append(torch.cat([a, b]))
        tol = dict(atol=2e-4, rtol=1e-4) if weights == "fused" else dict(atol=0.15, rtol=0.05)
        torch.testing.assert_close(outs[1], outs[0], **tol)


def test_qwen2_checkpoint_without_biases_is_refused(qwen2_ckpt, tmp_path):
    _, raw, W = qwen2_ckpt
    W = {k: v for k, v in W.items() if k != "model.layers.1.self_attn.k_proj.bias"}
    write_checkpoint(str(tmp_path), raw, W)
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.k_proj.bias"):
        load_target(str(tmp_path))


def test_qwen2_and_llama3_through_the_engine(llama3_ckpt, qwen2_ckpt):
    """Greedy speculative decoding with the default drafter (which inherits rope_scaling) equals
    an engine-free argmax loop over the reference forward."""
    from dspark_native.engine import Engine, SamplingParams, default_drafter

    for (d, raw, W), rope_fn in ((llama3_ckpt, _llama3_rope(llama3_ckpt[1]["rope_theta"])), (qwen2_ckpt, None)):
        model = load_target(d)
        drafter = default_drafter(model, num_layers=1, block_size=4)
        assert drafter.config.rope_scaling == model.config.rope_scaling
        prompt = _ids(70, raw["vocab_size"], 7).tolist()
        out = Engine(model, drafter, max_batch=1, max_seq=96).generate([prompt], SamplingParams(max_new_tokens=6))[0]
        seq = list(prompt)
        for _ in range(6):
            seq.append(int(ref_target_forward(W, raw, torch.tensor(seq), rope_fn=rope_fn)[0][-1].argmax()))
        assert out.token_ids == seq[len(prompt) :]


# ----------------------------------------------------------------------------- against transformers


def _hf_randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                scale = 0.3 if "embed_tokens" in name else 1.0 / math.sqrt(p.shape[-1])
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _hf_case(kind):
    tr = pytest.importorskip("transformers", reason="transformers not installed: the HF comparison is skipped")
    common = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=1024,
        attn_implementation="eager",
    )
    if kind == "llama3":
        cfg = tr.LlamaConfig(
            head_dim=HD, rope_theta=10000.0, rope_scaling=dict(LLAMA3), tie_word_embeddings=False, **common
        )
        model = tr.LlamaForCausalLM(cfg)
    else:
        cfg = tr.Qwen2Config(rope_theta=1e6, tie_word_embeddings=True, **common)
        model = tr.Qwen2ForCausalLM(cfg)
    _hf_randomise(model, 40)
    return model.eval()


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
def test_matches_transformers(kind, tmp_path):
    hf = _hf_case(kind)
    hf.save_pretrained(str(tmp_path))
    raw = json.load(open(os.path.join(str(tmp_path), "config.json")))
    model = load_target(str(tmp_path))
    if kind == "llama3":
        assert model.config.rope_scaling is not None
    else:
        assert model.config.qkv_bias and model.config.tie_word_embeddings
    n = 150
    ids = _ids(n, 97, 8)
    with torch.no_grad():
        want = hf(ids[None]).logits[0].double()
    cache = model.new_cache(1, n)
    a, _ = model(ids[:100], torch.tensor([0, 100]), torch.tensor([0]), cache, return_hidden=False)
    b, _ = model(ids[100:], torch.tensor([0, n - 100]), torch.tensor([0]), cache, return_hidden=False)
    got = torch.cat([a, b]).double()
    torch.testing.assert_close(got, want, atol=5e-4, rtol=1e-4)
    assert float(want.std()) > 0.5, "test premise: logits that depend on the weights"
    if kind == "llama3":  # without the scaling the same checkpoint gives different logits
        plain_dir = tmp_path / "plain"
        raw_plain = dict(raw)
        raw_plain.pop("rope_scaling", None)
        raw_plain["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
        os.makedirs(plain_dir)
        json.dump(raw_plain, open(plain_dir / "config.json", "w"))
        os.link(tmp_path / "model.safetensors", plain_dir / "model.safetensors")
        plain = load_target(str(plain_dir))
        c2 = plain.new_cache(1, n)
        p, _ = plain(ids, torch.tensor([0, n]), torch.tensor([0]), c2, return_hidden=False)
        assert float((p.double() - want)[64:].abs().max()) > 100 * 5e-4
