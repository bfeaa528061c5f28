"""The transformers backend (TransformersTarget) on tiny random models of six families written by
the tests (Llama, Qwen2, Qwen3, Gemma 2, Gemma 3, Mistral; sliding windows of 6 so that the
sequences cross them): ragged forward and KV rollback against transformers' own cache-free
forward, hidden features of the chosen layers (the off-by-one against ``hidden_states``), greedy
speculative decoding token-identical to transformers' ``generate``, sampling losslessness
(chi-square at ALPHA = 1e-3, tests/stats.py, fixed seeds), agreement with the native target,
backend choice, bad input, and SmolLM2 through transformers' GGUF loader against our native
target."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from hf_helpers import FAMILIES, aligned_drafter, bigram_perm, hf_config_dict, hf_full_logits, hf_greedy, write_hf_model  # noqa: E402
from stats import assert_matches_distribution  # noqa: E402

from dspark_native.engine import Engine, SamplingParams  # noqa: E402
from dspark_native.models import CheckpointError, TargetModel, load_drafter, load_target, save_drafter  # noqa: E402
from dspark_native.models.hf_target import HFKVCache, TransformersTarget, layer_windows  # noqa: E402

FAMS = list(FAMILIES)


@pytest.fixture(autouse=True, scope="module")
def _quiet_one_thread():
    from transformers.utils import logging as hf_logging

    n, level = torch.get_num_threads(), hf_logging.get_verbosity()
    torch.set_num_threads(1)  # tiny models: threads only add contention on shared CI cores
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    yield
    torch.set_num_threads(n)
    hf_logging.set_verbosity(level)
    hf_logging.enable_progress_bar()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: write_hf_model(str(root / f), f, seed=i, bigram=1.5) for i, f in enumerate(FAMS)}


def _t(x):
    return torch.tensor(x, dtype=torch.int64)


# ----------------------------------------------------------------------------- forward and cache


@pytest.mark.parametrize("family", FAMS)
def test_ragged_forward_rollback_and_features(model_dirs, family):
    """(c) verify, reject, continue = the logits of a fresh cache-free forward; a ragged batch of
    two requests; the features of layers 0, 2 and the last (which transformers reports normed)."""
    tgt = load_target(model_dirs[family], backend="transformers", target_layer_ids=[0, 2, 3])
    assert isinstance(tgt, TransformersTarget) and tgt.backend == "transformers"
    # Gemma 2 runs eager attention (additive float masks), the others sdpa (boolean masks)
    assert tgt.mask_kind == ("float" if family == "gemma2" else "bool")
    hf = tgt.hf
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, 64, (9,), generator=g).tolist()
    other = torch.randint(0, 64, (4,), generator=g).tolist()
    block = torch.randint(0, 64, (5,), generator=g).tolist()  # anchor + 4 drafts
    cont = torch.randint(0, 64, (3,), generator=g).tolist()
    cache = tgt.new_cache(3, 40)
    # prefill slot 2 with the prompt and slot 0 with another request, in one ragged batch
    lg, hid = tgt(_t(prompt + other), _t([0, 9, 13]), _t([2, 0]), cache)
    torch.testing.assert_close(lg[:9], hf_full_logits(hf, prompt), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lg[9:], hf_full_logits(hf, other), atol=2e-5, rtol=1e-5)
    with torch.no_grad():
        ref = hf(_t([prompt]), output_hidden_states=True, use_cache=False).hidden_states
    H = 32
    torch.testing.assert_close(hid[:9, :H], ref[1][0], atol=2e-5, rtol=1e-5)  # layer 0 = hidden_states[1]
    torch.testing.assert_close(hid[:9, H : 2 * H], ref[3][0], atol=2e-5, rtol=1e-5)  # layer 2 = hidden_states[3]
    last = hid[:9, 2 * H :]  # raw output of the last layer: transformers' last entry is norm(it)
    assert not torch.allclose(last, ref[4][0], atol=1e-3)
    torch.testing.assert_close(tgt.norm(last), ref[4][0], atol=2e-5, rtol=1e-5)
    # verify a block on slot 2 (slot 0 decodes one token alongside), then keep anchor + 1 draft
    lg, _ = tgt(_t(block + [5]), _t([0, 5, 6]), _t([2, 0]), cache, return_hidden=False)
    torch.testing.assert_close(lg[:5], hf_full_logits(hf, prompt + block)[9:], atol=2e-5, rtol=1e-5)
    cache.truncate([2], 9 + 2)
    lg, _ = tgt(_t(cont), _t([0, 3]), _t([2]), cache, return_hidden=False)
    seq = prompt + block[:2] + cont  # 14 positions: past the sliding window of 6
    torch.testing.assert_close(lg, hf_full_logits(hf, seq)[11:], atol=2e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [5, 0, 14]
    # slot 0 was untouched by the rollback of slot 2
    lg, _ = tgt(_t([9]), _t([0, 1]), _t([0]), cache, return_hidden=False, logit_rows="last")
    torch.testing.assert_close(lg[0], hf_full_logits(hf, other + [5, 9])[-1], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3", "mistral"])
def test_tree_verification_matches_each_branch(model_dirs, family):
    """A token tree (two branches under the anchor) gives every node the logits of its own path."""
    tgt = load_target(model_dirs[family], backend="transformers")
    prompt = [3, 1, 4, 1, 5, 9, 2]
    nodes = [6, 5, 3, 5, 8]  # 0 anchor; 1 -> 0; 2 -> 1; 3 -> 0; 4 -> 3
    parent = [-1, 0, 1, 0, 3]
    mask = torch.zeros(5, 5, dtype=torch.bool)
    for i in range(5):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parent[j]
    cache = tgt.new_cache(1, 20)
    tgt(_t(prompt), _t([0, 7]), _t([0]), cache, return_hidden=False)
    lg, _ = tgt(_t(nodes), _t([0, 5]), _t([0]), cache, tree_mask=[mask], return_hidden=False)
    for i, path in enumerate([[0], [0, 1], [0, 1, 2], [0, 3], [0, 3, 4]]):
        want = hf_full_logits(tgt.hf, prompt + [nodes[j] for j in path])[-1]
        torch.testing.assert_close(lg[i], want, atol=2e-5, rtol=1e-5, msg=f"node {i}")


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("family", FAMS)
def test_greedy_speculative_equals_transformers_generate(model_dirs, family):
    """(a) Engine + a DSpark drafter built for the target == transformers' greedy generate, for a
    batch of prompts of different lengths, one with a stop token met inside a block."""
    tgt = load_target(model_dirs[family], backend="transformers")
    drafter = aligned_drafter(tgt, bigram_perm(model_dirs[family]), block_size=4)
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [20], [33, 34]]
    want = [hf_greedy(tgt.hf, p, 24) for p in prompts]
    stop = want[1][9]
    params = [SamplingParams(max_new_tokens=24)] * 4
    params[1] = SamplingParams(max_new_tokens=24, stop_token_ids=[stop])
    want[1] = want[1][: want[1].index(stop) + 1]
    outs = Engine(tgt, drafter, max_batch=3, max_seq=40).generate(prompts, params)
    for i, (o, w) in enumerate(zip(outs, want, strict=True)):
        assert o.token_ids == w, f"request {i}: {o.token_ids} != transformers {w}"
    acc = sum(o.stats.accepted_drafts for o in outs)
    rounds = sum(o.stats.rounds for o in outs)
    budget = sum(o.stats.budget for o in outs)
    assert 0 < acc < budget, "test premise: some drafts accepted, some rejected"
    assert rounds < sum(len(w) for w in want)


V_S, N_TOK, N_SAMPLES = 8, 3, 3000
PROMPT = [1, 2]


@torch.no_grad()
def _exact_probs(hf, temperature=1.0):
    """P(x_1..x_3 | PROMPT) for all V^3 sequences (index x_1 V^2 + x_2 V + x_3), from transformers'
    cache-free forward of every prefix (fp64)."""
    probs = torch.ones(1, dtype=torch.float64)
    prefixes = [[]]
    for _ in range(N_TOK):
        batch = torch.tensor([PROMPT + p for p in prefixes])
        last = hf(batch, use_cache=False).logits[:, -1].double()
        step = torch.softmax(last / temperature, -1)
        probs = (probs[:, None] * step).reshape(-1)
        prefixes = [p + [v] for p in prefixes for v in range(V_S)]
    return probs


@pytest.fixture(scope="module")
def small_vocab_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_small")
    return {
        f: write_hf_model(str(root / f), f, seed=10 + i, bigram=0.15, V=V_S, eos_token_id=None)
        for i, f in enumerate(FAMS)
    }


@pytest.mark.parametrize("family", FAMS)
def test_sampling_lossless(small_vocab_dirs, family):
    """(b) sequences of 3 sampled tokens (DSpark drafting, lossless verification) follow the
    target's exact distribution, enumerated from transformers' own forward."""
    d = small_vocab_dirs[family]
    tgt = load_target(d, backend="transformers")
    drafter = aligned_drafter(tgt, bigram_perm(d), block_size=3, rank=8, markov_scale=3.0)
    eng = Engine(tgt, drafter, max_batch=1000, max_seq=len(PROMPT) + N_TOK + 1)
    params = [SamplingParams(max_new_tokens=N_TOK, temperature=1.0, seed=500 + i) for i in range(N_SAMPLES)]
    outs = eng.generate([PROMPT] * N_SAMPLES, params)
    assert all(len(o.token_ids) == N_TOK for o in outs)
    idx = torch.tensor([(o.token_ids[0] * V_S + o.token_ids[1]) * V_S + o.token_ids[2] for o in outs])
    exact = _exact_probs(tgt.hf)
    assert exact.max() > 4.0 / exact.numel(), "test premise: the target distribution is far from uniform"
    assert_matches_distribution(idx, exact, family)
    assert sum(o.stats.accepted_drafts for o in outs) > N_SAMPLES // 10, "test premise: drafts get accepted"


# ----------------------------------------------------------------------------- native vs transformers


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_auto_picks_native_and_both_backends_agree(model_dirs, family):
    d = model_dirs[family]
    native = load_target(d, target_layer_ids=[1, 3])
    hf = load_target(d, backend="transformers", target_layer_ids=[1, 3])
    assert isinstance(native, TargetModel) and native.backend == "native"
    ids = _t([4, 8, 15, 16, 23, 42, 7, 1])
    a = native(ids, _t([0, 8]), _t([0]), native.new_cache(1, 8))
    b = hf(ids, _t([0, 8]), _t([0]), hf.new_cache(1, 8))
    torch.testing.assert_close(a[0], b[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a[1], b[1], atol=1e-4, rtol=1e-4)


def test_auto_choice_follows_the_native_table(model_dirs):
    """ "auto" is table-driven: native for the architectures in TARGET_ARCHITECTURES (the table
    the native side extends), transformers for every other family."""
    from dspark_native.models.config import TARGET_ARCHITECTURES

    for f in FAMS:
        t = load_target(model_dirs[f])
        native = FAMILIES[f]["architectures"][0] in TARGET_ARCHITECTURES
        assert isinstance(t, TargetModel if native else TransformersTarget), f
        assert t.backend == ("native" if native else "transformers")
        if not native:
            assert isinstance(t.new_cache(1, 4), HFKVCache)
    for f in ("gemma2", "gemma3", "mistral"):  # no native implementation: transformers
        assert FAMILIES[f]["architectures"][0] not in TARGET_ARCHITECTURES


def test_drafter_round_trip_on_a_transformers_target(model_dirs, tmp_path):
    """A drafter for Gemma saves without the shared tensors and loads back onto the target."""
    tgt = load_target(model_dirs["gemma3"])
    d = aligned_drafter(tgt, block_size=4)
    save_drafter(d, str(tmp_path / "dr"))
    back = load_drafter(str(tmp_path / "dr"), target=tgt, dtype=torch.float32)
    assert set(back.shared_keys) == {"embed_tokens.weight", "lm_head.weight"}
    assert back.embed_tokens.weight is tgt.embed_tokens.weight
    assert back.config.architecture == "LlamaDSparkModel"
    assert tgt.target_layer_ids == list(back.config.target_layer_ids)


# ----------------------------------------------------------------------------- bad input


def _write_raw(directory, raw):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(raw, f)
    return str(directory)


def test_unsupported_architecture_and_missing_fields(model_dirs, tmp_path):
    d = _write_raw(tmp_path / "foo", dict(hf_config_dict("llama"), architectures=["FooForCausalLM"], model_type="foo"))
    with pytest.raises(CheckpointError, match="foo"):
        load_target(d)
    d = _write_raw(tmp_path / "bert", dict(hf_config_dict("llama"), architectures=["BertModel"], model_type="bert"))
    with pytest.raises(CheckpointError, match="'architectures' = 'BertModel'"):
        load_target(d)
    with pytest.raises(CheckpointError, match="unknown architecture 'Gemma3ForCausalLM'"):
        load_target(model_dirs["gemma3"], backend="native")
    for field in ("hidden_size", "vocab_size", "num_hidden_layers"):
        raw = {k: v for k, v in hf_config_dict("gemma3").items() if k != field}
        with pytest.raises(CheckpointError, match=f"missing required field '{field}'"):
            load_target(_write_raw(tmp_path / f"no_{field}", raw))
    # a native architecture with a setting the native code refuses: the error says so and names
    # the other backend, which runs it
    d = str(tmp_path / "gelu")
    write_hf_model(d, "llama", hidden_act="gelu")
    with pytest.raises(CheckpointError, match="hidden_act.*backend='transformers'"):
        load_target(d)
    assert load_target(d, backend="transformers").backend == "transformers"
    with pytest.raises(ValueError, match="backend"):
        load_target(d, backend="onnx")


def test_unsupported_layers_attention_and_weights(model_dirs, tmp_path):
    from types import SimpleNamespace

    from safetensors.torch import load_file, save_file

    with pytest.raises(CheckpointError, match="linear_attention"):
        layer_windows(
            SimpleNamespace(
                num_hidden_layers=2, layer_types=["full_attention", "linear_attention"], sliding_window=None
            )
        )
    assert layer_windows(SimpleNamespace(num_hidden_layers=2, sliding_window=5)) == [5, 5]
    tgt = load_target(model_dirs["llama"], backend="transformers")
    tgt.hf.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(CheckpointError, match="attn_implementation 'flash_attention_2'"):
            TransformersTarget(tgt.hf)
    finally:
        tgt.hf.config._attn_implementation = "sdpa"
    with pytest.raises(TypeError, match="PreTrainedModel"):
        TransformersTarget(torch.nn.Linear(2, 2))
    # the native fast paths do not exist here (runtime / --weights pass them through)
    assert tgt.set_weights("auto") == "transformers" and tgt.weights == "transformers"
    with pytest.raises(ValueError, match="weights 'native'"):
        tgt.set_weights("native")
    # a weight missing from the checkpoint is an error, not a silent random init
    d = str(tmp_path / "missing")
    write_hf_model(d, "mistral")
    w = load_file(os.path.join(d, "model.safetensors"))
    del w["model.layers.1.mlp.up_proj.weight"]
    save_file(w, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor.*layers\.1\.mlp\.up_proj"):
        load_target(d)
    # a cache of the native kind, or of another shape
    with pytest.raises(TypeError, match="new_cache"):
        tgt(_t([1]), _t([0, 1]), _t([0]), load_target(model_dirs["llama"]).new_cache(1, 4))


def test_drafter_size_mismatch_names_the_field(model_dirs, tmp_path):
    gemma = load_target(model_dirs["gemma3"])
    other_vocab = load_target(write_hf_model(str(tmp_path / "v72"), "qwen2", V=72))
    other_hidden = load_target(write_hf_model(str(tmp_path / "h48"), "qwen2", H=48, head_dim=12))
    for other, field in ((other_vocab, "vocab_size"), (other_hidden, "hidden_size")):
        d = aligned_drafter(other, block_size=3)
        save_drafter(d, str(tmp_path / field), include_shared=True)
        with pytest.raises(CheckpointError, match=f"'{field}' = .* does not match the target's"):
            load_drafter(str(tmp_path / field), target=gemma)
        with pytest.raises(ValueError, match=r"(vocabulary|hidden_size) \(\d+\) differs from the target's \(\d+\)"):
            Engine(gemma, d)


# ----------------------------------------------------------------------------- SmolLM2 via GGUF


@pytest.mark.slow
def test_smollm2_gguf_through_transformers_matches_native():
    """transformers' GGUF loader on the embedded SmolLM2 Q4_1 file vs our native target (both
    dequantise the same blocks to fp32): logits within 2e-3 absolute (|logit| ~ 20), features
    within 1e-3 relative, same greedy continuation, through the same ragged verification path."""
    pytest.importorskip("accelerate")
    from dspark_native.models import find_smollm2_gguf, load_embedded_smollm2

    try:
        path = find_smollm2_gguf()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        em = load_embedded_smollm2()
        native = em.model
        native.set_target_layer_ids([1, 8, 14, 20, 27, 29])
        hf = TransformersTarget.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), target_layer_ids=[1, 8, 14, 20, 27, 29]
        )
        ids = _t(em.encode_chat([{"role": "user", "content": "What is the capital of France?"}]))
        T = ids.numel()
        a_l, a_h = native(ids, _t([0, T]), _t([0]), native.new_cache(1, T + 8))
        b_l, b_h = hf(ids, _t([0, T]), _t([0]), hf.new_cache(1, T + 8))
        assert (a_l - b_l).abs().max().item() < 2e-3
        assert ((a_h - b_h).norm(dim=-1) / a_h.norm(dim=-1)).max().item() < 1e-3
        assert native.generate_greedy(ids.tolist(), 12) == hf.generate_greedy(ids.tolist(), 12)
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_dflash_and_eagle3_drafters_on_a_transformers_target(model_dirs, kind):
    """The other drafter kinds, built for Gemma 2 by the trainer's constructor (random), decode
    exactly transformers' greedy output."""
    from dspark_native.training.trainer import TrainConfig, new_drafter

    tgt = load_target(model_dirs["gemma2"])
    drafter = new_drafter(tgt, TrainConfig(kind=kind, num_layers=1, block_size=3), [0, 1, 2, 3]).eval()
    prompts = [[2, 7, 1, 8], [2, 8]]
    outs = Engine(tgt, drafter, max_batch=2, max_seq=32).generate(prompts, SamplingParams(max_new_tokens=16))
    assert [o.token_ids for o in outs] == [hf_greedy(tgt.hf, p, 16) for p in prompts]
