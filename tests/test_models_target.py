"""Target model: ragged forward vs a whole-sequence reference, KV cache, tree blocks."""

import os as _os
import sys as _sys

import pytest
import torch

_sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))  # helpers live beside the tests

from models_helpers import (
    ancestor_mask,
    random_tensors,
    ref_target_forward,
    target_raw_config,
    target_shapes,
    write_checkpoint,
)

from dspark_native.models import ContextLengthError, load_target

ARCHS = ["Qwen3ForCausalLM", "LlamaForCausalLM"]


@pytest.fixture(scope="module", params=ARCHS)
def ckpt(request, tmp_path_factory):
    torch.manual_seed(0)
    raw = target_raw_config(request.param, tie_word_embeddings=request.param.startswith("Llama"))
    W = random_tensors(target_shapes(raw), seed=1)
    d = tmp_path_factory.mktemp("target")
    write_checkpoint(str(d), raw, W)
    return str(d), raw, W


def _t(x):
    return torch.tensor(x, dtype=torch.int64)


def test_prefill_matches_reference_and_features(ckpt):
    d, raw, W = ckpt
    model = load_target(d, target_layer_ids=[0, 2, 3])
    ids = torch.randint(0, raw["vocab_size"], (11,), generator=torch.Generator().manual_seed(2))
    ref_logits, ref_outs = ref_target_forward(W, raw, ids)
    cache = model.new_cache(2, 32)
    logits, hidden = model(ids, _t([0, 11]), _t([1]), cache)
    assert logits.dtype == torch.float32 and logits.shape == (11, raw["vocab_size"])
    torch.testing.assert_close(logits.double(), ref_logits, atol=2e-4, rtol=1e-4)
    H = raw["hidden_size"]
    assert hidden.shape == (11, 3 * H)
    for j, layer in enumerate([0, 2, 3]):
        # raw layer output, before the final norm (layer 3 is the last one)
        torch.testing.assert_close(hidden[:, j * H : (j + 1) * H].double(), ref_outs[layer], atol=2e-4, rtol=1e-4)
    assert cache.lengths.tolist() == [0, 11]


def test_decode_with_cache_and_ragged_batch_match_prefill(ckpt):
    d, raw, W = ckpt
    model = load_target(d)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, raw["vocab_size"], (n,), generator=g) for n in (9, 6, 7)]
    refs = [ref_target_forward(W, raw, s)[0] for s in seqs]
    # token-by-token decode
    cache = model.new_cache(1, 16)
    step = torch.cat([model(s[None], _t([0, 1]), _t([0]), cache)[0] for s in seqs[0]])
    torch.testing.assert_close(step.double(), refs[0], atol=2e-4, rtol=1e-4)
    # ragged: different cached prefixes, then one batched forward with blocks of 4, 1, 7 rows
    cache = model.new_cache(4, 16)
    model(seqs[0][:5], _t([0, 5]), _t([2]), cache)
    model(seqs[1][:5], _t([0, 5]), _t([0]), cache)
    flat = torch.cat([seqs[0][5:], seqs[1][5:], seqs[2]])
    logits, _ = model(flat, _t([0, 4, 5, 12]), _t([2, 0, 3]), cache)
    torch.testing.assert_close(logits[:4].double(), refs[0][5:], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(logits[4:5].double(), refs[1][5:], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(logits[5:].double(), refs[2], atol=2e-4, rtol=1e-4)
    assert cache.lengths.tolist() == [6, 0, 9, 7]
    # same-size blocks (the padding-free path), R = 3 decode rows
    nxt = _t([1, 2, 3])
    l1, _ = model(nxt, _t([0, 1, 2, 3]), _t([0, 2, 3]), cache)
    for r, (s, _slot) in enumerate(zip([seqs[1], seqs[0], seqs[2]], [0, 2, 3], strict=True)):
        full = torch.cat([s, nxt[r : r + 1]])
        torch.testing.assert_close(l1[r].double(), ref_target_forward(W, raw, full)[0][-1], atol=2e-4, rtol=1e-4)


def test_truncate_rolls_back_chain_verification(ckpt):
    d, raw, W = ckpt
    model = load_target(d)
    g = torch.Generator().manual_seed(4)
    s = torch.randint(0, raw["vocab_size"], (12,), generator=g)
    cache = model.new_cache(1, 16)
    model(s[:6], _t([0, 6]), _t([0]), cache)
    model(torch.randint(0, raw["vocab_size"], (5,), generator=g), _t([0, 5]), _t([0]), cache)
    cache.truncate(0, 6)  # all drafts rejected
    logits, _ = model(s[6:], _t([0, 6]), _t([0]), cache)
    torch.testing.assert_close(logits.double(), ref_target_forward(W, raw, s)[0][6:], atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="new_lengths"):
        cache.truncate(0, 13)
    cache.truncate(torch.tensor([True]), 3)
    assert cache.lengths.tolist() == [3]


def test_tree_block_equals_chain_forwards(ckpt):
    d, raw, W = ckpt
    model = load_target(d)
    g = torch.Generator().manual_seed(5)
    ctx = torch.randint(0, raw["vocab_size"], (5,), generator=g)
    parents = [-1, 0, 0, 1, 1, 2, 5]
    nodes = torch.randint(0, raw["vocab_size"], (len(parents),), generator=g)
    n = len(parents)
    mask = ancestor_mask(parents)
    cache = model.new_cache(3, 32)
    model(ctx, _t([0, 5]), _t([1]), cache)
    base = cache.clone()
    # a chain request rides along in the same batch (slot 0, fresh)
    other = torch.randint(0, raw["vocab_size"], (3,), generator=g)
    tree_logits, _ = model(torch.cat([nodes, other]), _t([0, n, n + 3]), _t([1, 0]), cache, tree_mask=[mask, None])
    for leaf in (3, 4, 6):
        path = [leaf]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        path = path[::-1]
        c = base.clone()
        chain, _ = model(nodes[path], _t([0, len(path)]), _t([1]), c)
        torch.testing.assert_close(tree_logits[path], chain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tree_logits[n:].double(), ref_target_forward(W, raw, other)[0], atol=2e-4, rtol=1e-4)
    # padded tensor form of the same masks gives the same result
    padded = torch.zeros(2, n, n, dtype=torch.bool)
    padded[0] = mask
    padded[1, :3, :3] = torch.ones(3, 3, dtype=torch.bool).tril()
    c = base.clone()
    again, _ = model(torch.cat([nodes, other]), _t([0, n, n + 3]), _t([1, 0]), c, tree_mask=padded)
    torch.testing.assert_close(again, tree_logits, atol=0, rtol=0)
    bad = mask.clone()
    bad[1, 3] = True
    with pytest.raises(ValueError, match="topological"):
        model(nodes, _t([0, n]), _t([2]), cache, tree_mask=[bad])


def test_bf16_close_to_reference(ckpt):
    d, raw, W = ckpt
    model = load_target(d, dtype=torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(0, raw["vocab_size"], (8,), generator=torch.Generator().manual_seed(6))
    ref = ref_target_forward(W, raw, ids)[0]
    cache = model.new_cache(1, 8)
    logits, hidden = model(ids[:5], _t([0, 5]), _t([0]), cache)
    l2, _ = model(ids[5:], _t([0, 3]), _t([0]), cache)
    out = torch.cat([logits, l2]).double()
    assert out.dtype == torch.float64 and logits.dtype == torch.float32
    err = (out - ref).abs().max() / ref.abs().max()
    assert err < 0.05, err


def test_errors_named(ckpt):
    d, raw, W = ckpt
    model = load_target(d)
    cache = model.new_cache(2, 8)
    ids = _t([1, 2, 3])
    with pytest.raises(ContextLengthError, match="max_seq"):
        model(torch.arange(9), _t([0, 9]), _t([0]), cache)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids, _t([0, 2]), _t([0]), cache)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids, _t([0, 3]), _t([0, 1]), cache)
    with pytest.raises(ValueError, match="request_ids"):
        model(ids, _t([0, 1, 3]), _t([1, 1]), cache)
    with pytest.raises(ValueError, match="request_ids"):
        model(ids, _t([0, 3]), _t([5]), cache)
    with pytest.raises(ValueError, match="input_ids"):
        model(_t([raw["vocab_size"]]), _t([0, 1]), _t([0]), cache)
    with pytest.raises(ValueError, match="tree_mask"):
        model(ids, _t([0, 3]), _t([0]), cache, tree_mask=[torch.ones(2, 2, dtype=torch.bool)])
    assert cache.lengths.tolist() == [0, 0]  # failed calls leave the cache untouched
    empty_logits, _ = model(_t([]), _t([0, 0]), _t([0]), cache)
    assert empty_logits.shape == (0, raw["vocab_size"])
