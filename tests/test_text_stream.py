"""Streamed text equals the final decoded text in any language: runtime.TextStream / RequestText on
the real SmolLM2 tokenizer (byte-level BPE: a CJK character or an emoji is 3-4 bytes, often split
over tokens), token by token and in random-sized pieces (speculative rounds deliver several
tokens at once); stop strings cut the text and the tokens exactly; and `generate` on a model that
answers with such characters prints exactly its final answer."""

from __future__ import annotations

import json
import os

import pytest
import torch

from cli_helpers import run_cli

from dspark_native.runtime import RequestText, TextStream

TEXTS = [
    "巴黎是法国的首都🇫🇷，也是一座美丽的城市😀",
    "Mixed: naïve café, 東京タワー, Ελληνικά, emoji 👩‍👩‍👧 and 🤖!",
    "一二三四五六七八九十 🎉🎉 done",
]


@pytest.fixture(scope="module")
def tok():
    """The embedded SmolLM2 tokenizer (converted cache if present, else from the GGUF)."""
    from tokenizers import Tokenizer

    from dspark_native.models.embedded import default_cache_dir, find_smollm2_gguf

    cached = os.path.join(default_cache_dir(), "smollm2-135m-instruct-q4_1", "tokenizer.json")
    if os.path.isfile(cached):
        return Tokenizer.from_file(cached)
    try:
        path = find_smollm2_gguf()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    from dspark_native.models.gguf_loader import gguf_tokenizer, read_gguf

    return gguf_tokenizer(read_gguf(path)[1])[0]


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def test_the_strings_split_characters_over_tokens(tok):
    """The inputs exercise the hard case: a prefix of the tokens decodes to a U+FFFD."""
    for text in TEXTS:
        ids = _ids(tok, text)
        assert tok.decode(ids) == text
        assert any(tok.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids))), text


@pytest.mark.parametrize("text", TEXTS)
def test_stream_token_by_token_equals_the_decode(tok, text):
    ids = _ids(tok, text)
    ts = TextStream(tok)
    pieces = [ts.push([t]) for t in ids]
    pieces.append(ts.flush())
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces[:-1]  # some tokens completed no character and were held back
    # the naive stream (decode the prefix, print what is new) loses characters here
    shown = ""
    naive = []
    for i in range(1, len(ids) + 1):
        cur = tok.decode(ids[:i])
        naive.append(cur[len(shown) :])
        shown = cur
    assert "".join(naive) != text


def test_stream_in_random_pieces_and_against_decode_stream(tok):
    g = torch.Generator().manual_seed(0)
    for text in TEXTS:
        ids = _ids(tok, text)
        for _ in range(5):
            ts, out, i = TextStream(tok), [], 0
            while i < len(ids):
                n = int(torch.randint(1, 6, (1,), generator=g))
                out.append(ts.push(ids[i : i + n]))
                i += n
            out.append(ts.flush())
            assert "".join(out) == text
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:
        return
    for text in TEXTS:  # the library's own stream agrees chunk by chunk
        ids = _ids(tok, text)
        ds, ours = DecodeStream(skip_special_tokens=True), TextStream(tok)
        for t in ids:
            assert (ds.step(tok, t) or "") == ours.push([t])


def test_truncated_character_at_the_end_matches_the_decode(tok):
    ids = _ids(tok, "結果😀")
    cut = next(i for i in range(len(ids) - 1, 0, -1) if tok.decode(ids[:i]).endswith("\ufffd"))
    ts = TextStream(tok)
    s = ts.push(ids[:cut]) + ts.flush()
    assert s == tok.decode(ids[:cut])  # max_new_tokens mid-character: same replacement char as the decode


@pytest.mark.parametrize("stop", ["首都", "🇫🇷", "美丽的城", "。never"])
def test_stop_strings_cut_text_and_tokens(tok, stop):
    text = TEXTS[0]
    ids = _ids(tok, text)
    rt, shown = RequestText(tok, [stop, "zzz"]), []
    g = torch.Generator().manual_seed(1)
    i = 0
    while i < len(ids):
        n = int(torch.randint(1, 4, (1,), generator=g))
        shown.append(rt.push(ids[i : i + n]))
        i += n
    shown.append(rt.finish())
    pos = text.find(stop)
    if pos < 0:
        assert not rt.stopped and rt.text == text and "".join(shown) == text
        return
    assert rt.stopped and rt.text == text[:pos] and "".join(shown) == text[:pos]
    # the kept tokens: the shortest prefix whose text contains the stop string
    k = next(n for n in range(1, len(ids) + 1) if stop in tok.decode(ids[:n]))
    assert rt.num_tokens == k


def test_stop_string_prefix_is_held_back_until_decided(tok):
    rt = RequestText(tok, ["都🇫🇷X"])  # starts like the text, then diverges
    ids = _ids(tok, TEXTS[0])
    seen = ""
    for t in ids:
        seen += rt.push([t])
        assert TEXTS[0].startswith(seen)
        assert not seen.endswith("都")  # "都" could begin the stop string until the flag shows it does not
    seen += rt.finish()
    assert seen == TEXTS[0] and not rt.stopped


# ------------------------------------------------------------------------------------------------
# generate end to end: a target whose greedy answer is a fixed token chain through such characters
# ------------------------------------------------------------------------------------------------

CHAIN_TEXT = "巴黎法国市东京塔😀中文"  # most characters are 2-3 tokens; no token is used twice


def _chain_tokens(tok):
    """Distinct token ids whose decode is CHAIN_TEXT (characters split over tokens)."""
    chain = [t for ch in CHAIN_TEXT for t in _ids(tok, ch)]
    assert len(set(chain)) == len(chain) and tok.decode(chain) == CHAIN_TEXT
    return chain


@pytest.fixture(scope="module")
def chain_target(tok, tmp_path_factory):
    """A target directory (SmolLM2 vocabulary, 1 layer whose attention and MLP write nothing) whose
    next token after x is chain[x]: embeddings random, lm_head row of chain[x] aligned with x's
    embedding. The prompt "hi" then continues through the chain and ends with <|im_end|>."""
    from test_engine_helpers import _raw

    from dspark_native.models import ModelConfig, TargetModel, save_target

    V = tok.get_vocab_size()
    chain = _chain_tokens(tok)
    start, end = _ids(tok, "hi")[-1], tok.token_to_id("<|im_end|>")
    assert start not in chain and end not in chain and len(chain) >= 12
    seq = [start] + chain + [end]
    torch.manual_seed(0)
    m = TargetModel(ModelConfig.from_dict(_raw(V, layers=1)))
    with torch.no_grad():
        E = torch.randn(V, m.config.hidden_size)
        m.embed_tokens.weight.copy_(E)
        head = torch.randn(V, m.config.hidden_size) * 0.01
        for a, b in zip(seq[:-1], seq[1:], strict=True):
            head[b] = 10 * E[a] / E[a].norm()
        m.lm_head.weight.copy_(head)
        for layer in m.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    d = tmp_path_factory.mktemp("chain") / "target"
    save_target(m, str(d))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text("{}")
    return str(d), tok.decode(chain)


def test_generate_streams_exactly_the_final_answer(chain_target, capsys, tmp_path):
    d, want = chain_target
    js = tmp_path / "g.json"
    rc, out, err = run_cli(capsys, "generate", "hi", "--target", d, "--max-new-tokens", "80", "--json", js)
    assert rc == 0, err
    rec = json.load(open(js))["outputs"][0]
    streamed = out.split("\ntau = ")[0]
    assert want == CHAIN_TEXT and rec["answer"] == want and streamed == want
    assert rec["finish_reason"] == "stop" and rec["identical_to_plain"]
    # a stop string made of split characters: the stream stops exactly before it
    cut = want.index("塔😀")
    rc, out, err = run_cli(
        capsys, "generate", "hi", "--target", d, "--max-new-tokens", "80", "--stop", "塔😀", "--json", js
    )
    assert rc == 0, err
    rec = json.load(open(js))["outputs"][0]
    assert out.split("\ntau = ")[0] == rec["answer"] == want[:cut]
    assert rec["finish_reason"] == "stop" and rec["identical_to_plain"]
