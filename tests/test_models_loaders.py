"""Checkpoint loading: DeepSpec round trips (bit-exact bf16), shared embeddings, sharded
targets, GGUF layout, and a named CheckpointError for every kind of mismatch."""

import json
import os
import os as _os
import sys as _sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

_sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))  # helpers live beside the tests

from models_helpers import (
    drafter_raw_config,
    drafter_shapes,
    random_tensors,
    ref_target_forward,
    rope_interleaved,
    target_raw_config,
    target_shapes,
    write_checkpoint,
)

from dspark_native.models import (
    CheckpointError,
    DrafterConfig,
    default_target_layer_ids,
    load_drafter,
    load_gguf_target,
    load_target,
    save_drafter,
)
from dspark_native.models.gguf_loader import permute_rope_rows, unpermute_rope_rows


def _t(x):
    return torch.tensor(x, dtype=torch.int64)


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    out = {}
    for prefix in ("Qwen3", "Llama"):
        raw = target_raw_config(f"{prefix}ForCausalLM", num_hidden_layers=8)
        W = random_tensors(target_shapes(raw), seed=20, dtype=torch.bfloat16)
        d = str(tmp_path_factory.mktemp(prefix))
        write_checkpoint(d, raw, W)
        out[prefix] = (d, raw, W)
    return out


def _bits(t):
    return t.contiguous().view(torch.int16) if t.dtype == torch.bfloat16 else t


VARIANTS = [
    ("Qwen3", "DSparkModel", dict(markov_head_type="vanilla")),
    ("Qwen3", "DSparkModel", dict(markov_head_type="gated")),
    ("Qwen3", "DSparkModel", dict(markov_head_type="rnn", confidence_head_with_markov=False)),
    ("Qwen3", "DSparkModel", dict(markov_rank=0, enable_confidence_head=False)),  # DFlash
    ("Qwen3", "Eagle3Model", {}),
    ("Llama", "DSparkModel", dict(markov_head_type="rnn")),
    ("Llama", "Eagle3Model", {}),
]


@pytest.mark.parametrize("prefix,arch,over", VARIANTS)
def test_deepspec_round_trip_bit_exact(tmp_path, targets, prefix, arch, over):
    tdir, traw, _ = targets[prefix]
    target = load_target(tdir, dtype=torch.bfloat16)
    raw = drafter_raw_config(traw, prefix + arch, **over)
    W = random_tensors(drafter_shapes(raw), seed=21, dtype=torch.bfloat16)
    write_checkpoint(str(tmp_path / "in"), raw, W)
    drafter = load_drafter(str(tmp_path / "in"), target)
    assert drafter.fc.weight.dtype == torch.bfloat16
    save_drafter(drafter, str(tmp_path / "out"))
    back = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(back) == sorted(W)
    for k in W:
        assert back[k].dtype == torch.bfloat16 and torch.equal(_bits(back[k]), _bits(W[k])), k
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f) == raw
    # fp32 in memory, saved as bf16: still bit-exact (bf16 -> fp32 -> bf16 is lossless)
    d32 = load_drafter(str(tmp_path / "in"), target, dtype=torch.float32)
    assert d32.fc.weight.dtype == torch.float32
    save_drafter(d32, str(tmp_path / "out32"), dtype=torch.bfloat16)
    back32 = load_file(str(tmp_path / "out32" / "model.safetensors"))
    assert all(torch.equal(_bits(back32[k]), _bits(W[k])) for k in W)


def test_shared_embedding_and_head_from_target(tmp_path, targets):
    tdir, traw, tW = targets["Qwen3"]
    target = load_target(tdir, dtype=torch.bfloat16)
    raw = drafter_raw_config(traw, "Qwen3DSparkModel")
    W = random_tensors(drafter_shapes(raw, with_shared=False), seed=22, dtype=torch.bfloat16)
    assert "embed_tokens.weight" not in W and "lm_head.weight" not in W
    write_checkpoint(str(tmp_path / "d"), raw, W)
    drafter = load_drafter(str(tmp_path / "d"), target)
    assert torch.equal(drafter.embed_tokens.weight, tW["model.embed_tokens.weight"])
    assert torch.equal(drafter.lm_head.weight, tW["lm_head.weight"])
    assert drafter.embed_tokens.weight.data_ptr() == target.embed_tokens.weight.data_ptr()
    save_drafter(drafter, str(tmp_path / "out"))
    assert sorted(load_file(str(tmp_path / "out" / "model.safetensors"))) == sorted(W)
    save_drafter(drafter, str(tmp_path / "full"), include_shared=True)
    assert "lm_head.weight" in load_file(str(tmp_path / "full" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="embed_tokens.weight"):
        load_drafter(str(tmp_path / "d"))  # nothing to take them from


def test_sharded_target_equals_single_file(tmp_path):
    raw = target_raw_config("Qwen3ForCausalLM")
    W = random_tensors(target_shapes(raw), seed=23)
    write_checkpoint(str(tmp_path / "one"), raw, W)
    write_checkpoint(str(tmp_path / "three"), raw, W, shards=3)
    assert not os.path.exists(tmp_path / "three" / "model.safetensors")
    a, b = load_target(str(tmp_path / "one")), load_target(str(tmp_path / "three"))
    ids = _t([3, 1, 4, 1, 5])
    la, _ = a(ids, _t([0, 5]), _t([0]), a.new_cache(1, 8))
    lb, _ = b(ids, _t([0, 5]), _t([0]), b.new_cache(1, 8))
    assert torch.equal(la, lb)


def test_default_target_layer_ids(tmp_path, targets):
    assert default_target_layer_ids(36) == [1, 9, 17, 25, 33]
    assert default_target_layer_ids(30) == [1, 8, 14, 20, 27]
    tdir, traw, _ = targets["Qwen3"]
    raw = drafter_raw_config(traw, "Qwen3DSparkModel")
    del raw["target_layer_ids"]
    assert DrafterConfig.from_dict(raw).target_layer_ids == default_target_layer_ids(8)


# ------------------------------------------------------------------------ errors


def _drafter_case(tmp_path, traw, arch="Qwen3DSparkModel", raw_over=None, drop=(), add=None, reshape=None, cfg_del=()):
    raw = drafter_raw_config(traw, arch, **(raw_over or {}))
    W = random_tensors(drafter_shapes(raw), seed=24, dtype=torch.bfloat16)
    for k in drop:
        del W[k]
    if add:
        W.update(add)
    if reshape:
        W[reshape[0]] = torch.zeros(reshape[1], dtype=torch.bfloat16)
    for k in cfg_del:
        del raw[k]
    d = str(tmp_path / "bad")
    write_checkpoint(d, raw, W)
    return d


ERROR_CASES = [
    ("vocab_size", dict(raw_over=dict(vocab_size=101, mask_token_id=5))),
    ("hidden_size", dict(raw_over=dict(hidden_size=48, head_dim=12))),
    ("target_layer_ids", dict(raw_over=dict(target_layer_ids=[1, 2, 3, 4, 8]))),
    ("num_target_layers", dict(raw_over=dict(num_target_layers=12))),
    ("Qwen3FooModel", dict(arch="Qwen3FooModel")),
    ("layers.1.mlp.up_proj.weight", dict(drop=["layers.1.mlp.up_proj.weight"])),
    ("markov_head.markov_w2.weight", dict(drop=["markov_head.markov_w2.weight"])),
    (
        "layers.0.self_attn.q_proj.bias",
        dict(add={"layers.0.self_attn.q_proj.bias": torch.zeros(48, dtype=torch.bfloat16)}),
    ),
    ("fc.weight", dict(reshape=("fc.weight", (32, 128)))),
    ("confidence_head.proj.weight", dict(reshape=("confidence_head.proj.weight", (1, 32)))),
    ("block_size", dict(cfg_del=["block_size"])),
    ("mask_token_id", dict(cfg_del=["mask_token_id"])),
    ("head_dim", dict(cfg_del=["head_dim"])),
    ("rms_norm_eps", dict(cfg_del=["rms_norm_eps"])),
    ("markov_head_type", dict(raw_over=dict(markov_head_type="lstm"))),
    ("layers.0.hidden_norm.weight", dict(arch="Qwen3Eagle3Model", drop=["layers.0.hidden_norm.weight"])),
]


@pytest.mark.parametrize("name,case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_drafter_mismatch_errors_name_the_culprit(tmp_path, targets, name, case):
    tdir, traw, _ = targets["Qwen3"]
    target = load_target(tdir)
    d = _drafter_case(tmp_path, traw, **case)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_drafter(d, target)


def test_layer_ids_checked_against_target_when_config_lacks_num_target_layers(tmp_path, targets):
    tdir, traw, _ = targets["Qwen3"]
    d = _drafter_case(tmp_path, traw, raw_over=dict(target_layer_ids=[1, 2, 3, 4, 9]), cfg_del=["num_target_layers"])
    with pytest.raises(CheckpointError, match="target_layer_ids.*9"):
        load_drafter(d, load_target(tdir))


def test_corrupt_and_unreadable_files(tmp_path, targets):
    tdir, traw, _ = targets["Qwen3"]
    target = load_target(tdir)
    d = _drafter_case(tmp_path, traw)
    path = os.path.join(d, "model.safetensors")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_drafter(d, target)
    with open(path, "wb") as f:
        f.write(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_drafter(d, target)
    os.remove(path)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_drafter(d, target)
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_drafter(d, target)
    with pytest.raises(CheckpointError, match="config.json"):
        load_target(str(tmp_path / "nowhere"))
    bad_gguf = tmp_path / "x.gguf"
    bad_gguf.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(CheckpointError, match="x.gguf"):
        load_gguf_target(str(bad_gguf))


def test_target_errors(tmp_path):
    raw = target_raw_config("Qwen3ForCausalLM")
    W = random_tensors(target_shapes(raw), seed=25)
    cases = [
        ("GPT2LMHeadModel", dict(raw, architectures=["GPT2LMHeadModel"]), W),
        ("hidden_size", {k: v for k, v in raw.items() if k != "hidden_size"}, W),
        ("lm_head.weight", raw, {k: v for k, v in W.items() if k != "lm_head.weight"}),
        (
            "model.layers.0.self_attn.q_norm.weight",
            raw,
            dict(W, **{"model.layers.0.self_attn.q_norm.weight": torch.ones(5)}),
        ),
        (
            "model.layers.9.mlp.up_proj.weight",
            raw,
            dict(W, **{"model.layers.9.mlp.up_proj.weight": torch.ones(48, 32)}),
        ),
        ("rope_scaling", dict(raw, rope_scaling={"rope_type": "yarn", "factor": 4.0}), W),
        ("num_key_value_heads", dict(raw, num_key_value_heads=3), W),
    ]
    for i, (name, r, w) in enumerate(cases):
        d = str(tmp_path / f"c{i}")
        write_checkpoint(d, r, w)
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            load_target(d)
    # a shard listed in the index but missing on disk
    d = str(tmp_path / "shards")
    write_checkpoint(d, raw, W, shards=2)
    os.remove(os.path.join(d, "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match="model-00002-of-00002"):
        load_target(d)
    with pytest.raises(CheckpointError, match="target_layer_ids"):
        load_target(str(tmp_path / "shards"), target_layer_ids=[7])


# ------------------------------------------------------------------------ GGUF layout


def test_rope_permutation_round_trip():
    w = torch.randn(4 * 6, 5)
    assert torch.equal(unpermute_rope_rows(permute_rope_rows(w, 4), 4), w)
    assert not torch.equal(permute_rope_rows(w, 4), w)


def test_tiny_gguf_matches_llama_cpp_rope_convention(tmp_path):
    """A GGUF written like llama.cpp's converter (q/k rows permuted, interleaved-pair RoPE)
    must give the logits of the HF model; checked against a reference that uses the GGUF
    weights as stored with interleaved RoPE (the llama.cpp semantics)."""
    import gguf

    raw = target_raw_config("LlamaForCausalLM", num_hidden_layers=2, tie_word_embeddings=True)
    raw["rms_norm_eps"] = float(np.float32(1e-5))
    W = random_tensors(target_shapes(raw), seed=26)
    nh, nkv = raw["num_attention_heads"], raw["num_key_value_heads"]

    def llama_cpp_permute(w, n):  # written from llama.cpp's convert_hf_to_gguf description
        return w.reshape(n, 2, w.shape[0] // n // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)

    names = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    gW = {}
    wr = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    wr.add_block_count(2)
    wr.add_context_length(64)
    wr.add_embedding_length(raw["hidden_size"])
    wr.add_feed_forward_length(raw["intermediate_size"])
    wr.add_head_count(nh)
    wr.add_head_count_kv(nkv)
    wr.add_layer_norm_rms_eps(raw["rms_norm_eps"])
    wr.add_rope_freq_base(raw["rope_theta"])
    wr.add_vocab_size(raw["vocab_size"])
    for k, v in W.items():
        if k == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif k == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            i, rest = k[len("model.layers.") :].split(".", 1)
            gname = f"blk.{i}.{names[rest]}"
        arr = v.numpy()
        if gname.endswith("attn_q.weight"):
            arr = llama_cpp_permute(arr, nh)
        elif gname.endswith("attn_k.weight"):
            arr = llama_cpp_permute(arr, nkv)
        gW[k] = torch.from_numpy(np.ascontiguousarray(arr))
        wr.add_tensor(gname, np.ascontiguousarray(arr))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()

    model, _, _ = load_gguf_target(str(tmp_path / "tiny.gguf"), with_tokenizer=False)
    assert model.config.tie_word_embeddings
    ids = _t([5, 17, 3, 88, 42, 1, 60])
    logits, _ = model(ids, _t([0, 7]), _t([0]), model.new_cache(1, 8))
    hf_ref = ref_target_forward(W, raw, ids)[0]
    cpp_ref = ref_target_forward(gW, raw, ids, rope_fn=rope_interleaved)[0]
    torch.testing.assert_close(hf_ref, cpp_ref, atol=1e-9, rtol=1e-9)  # the two conventions agree
    torch.testing.assert_close(logits.double(), cpp_ref, atol=2e-4, rtol=1e-4)
    # without undoing the permutation the HF-RoPE model would be wrong
    wrong = ref_target_forward(gW, raw, ids)[0]
    assert (wrong - cpp_ref).abs().max() > 1e-2


def test_cache_dir_env_override(monkeypatch, tmp_path):
    from dspark_native.models.embedded import default_cache_dir

    monkeypatch.setenv("DSPARK_NATIVE_CACHE", str(tmp_path))
    assert default_cache_dir() == str(tmp_path)
    monkeypatch.delenv("DSPARK_NATIVE_CACHE")
    assert default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "dspark_native")


@pytest.mark.parametrize("tied", [False, True])
def test_save_target_round_trip(tmp_path, tied):
    from dspark_native.models import save_target

    raw = target_raw_config("LlamaForCausalLM", tie_word_embeddings=tied)
    W = random_tensors(target_shapes(raw), seed=27)
    write_checkpoint(str(tmp_path / "a"), raw, W)
    model = load_target(str(tmp_path / "a"))
    save_target(model, str(tmp_path / "b"))
    back = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert sorted(back) == sorted(W)  # tied head not written
    assert all(torch.equal(back[k], W[k]) for k in W)
    with open(tmp_path / "b" / "config.json") as f:
        assert json.load(f) == raw
