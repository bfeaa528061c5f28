"""The fused inference path (TargetModel.set_weights): same results as the reference path and as
an independent whole-sequence reference, for chains, ragged batches, trees and rollback."""

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

from dspark_native.models import load_target
from dspark_native.models.fused import cpu_has_bf16_matmul, cpu_runs_onednn_bf16, resolve_weight_format

ARCHS = ["Qwen3ForCausalLM", "LlamaForCausalLM"]


@pytest.fixture(scope="module", params=ARCHS)
def ckpt(request, tmp_path_factory):
    raw = target_raw_config(request.param, tie_word_embeddings=request.param.startswith("Llama"))
    W = random_tensors(target_shapes(raw), seed=11)
    d = tmp_path_factory.mktemp("fused")
    write_checkpoint(str(d), raw, W)
    return str(d), raw, W


def _t(x):
    return torch.tensor(x, dtype=torch.int64)


def _run_mixed(model, raw, g):
    """Prefill two requests, then one ragged batch (blocks 4, 1, 7) and a uniform decode batch;
    returns the logits of every forward and the hidden features of the ragged one."""
    seqs = [torch.randint(0, raw["vocab_size"], (n,), generator=g) for n in (9, 6, 7)]
    cache = model.new_cache(4, 16)
    outs = [model(seqs[0][:5], _t([0, 5]), _t([2]), cache)[0], model(seqs[1][:5], _t([0, 5]), _t([0]), cache)[0]]
    flat = torch.cat([seqs[0][5:], seqs[1][5:], seqs[2]])
    lg, hid = model(flat, _t([0, 4, 5, 12]), _t([2, 0, 3]), cache)
    outs.append(lg)
    outs.append(model(_t([1, 2, 3]), _t([0, 1, 2, 3]), _t([0, 2, 3]), cache)[0])
    return seqs, outs, hid, cache


@pytest.mark.parametrize("weights", ["fused", "bf16", "native"])
def test_fused_matches_reference_path(ckpt, weights):
    if weights == "bf16" and not cpu_runs_onednn_bf16():
        pytest.skip("oneDNN's bf16 GEMM cannot run on this CPU (no AVX512BW/VL/DQ, no AVX-NE-CONVERT)")
    d, raw, W = ckpt
    ref_model = load_target(d, target_layer_ids=[0, 2, 3])
    model = load_target(d, target_layer_ids=[0, 2, 3])
    assert model.set_weights(weights) == weights and model.weights == weights
    _, ref_outs, ref_hid, ref_cache = _run_mixed(ref_model, raw, torch.Generator().manual_seed(3))
    seqs, outs, hid, cache = _run_mixed(model, raw, torch.Generator().manual_seed(3))
    # fp32 fused: same math in fewer ops; bf16: weights, GEMM inputs and outputs rounded to bf16
    tol = dict(atol=2e-4, rtol=1e-4) if weights == "fused" else dict(atol=0.1, rtol=0.05)
    for a, b in zip(outs, ref_outs, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(hid, ref_hid, **tol)
    assert cache.lengths.tolist() == ref_cache.lengths.tolist() == [7, 0, 10, 8]
    torch.testing.assert_close(cache.k_cache, ref_cache.k_cache, **tol)
    torch.testing.assert_close(cache.v_cache, ref_cache.v_cache, **tol)
    if weights == "fused":  # and against the independent whole-sequence reference
        torch.testing.assert_close(
            outs[2][:4].double(), ref_target_forward(W, raw, seqs[0])[0][5:], atol=2e-4, rtol=1e-4
        )


@pytest.mark.parametrize("weights", ["fused", "bf16", "native"])
def test_fused_rows_do_not_depend_on_the_batch(ckpt, weights):
    """A row's logits must not depend on how many rows share the forward: plain decoding (one
    row) and verification (a block) then agree bit for bit, which keeps speculative output equal
    to plain output on this path."""
    if weights == "bf16" and not cpu_runs_onednn_bf16():
        pytest.skip("oneDNN's bf16 GEMM cannot run on this CPU (no AVX512BW/VL/DQ, no AVX-NE-CONVERT)")
    d, raw, _ = ckpt
    model = load_target(d)
    model.set_weights(weights)
    g = torch.Generator().manual_seed(7)
    s = torch.randint(0, raw["vocab_size"], (12,), generator=g)
    cache = model.new_cache(1, 16)
    model(s[:6], _t([0, 6]), _t([0]), cache)
    block, _ = model(s[6:], _t([0, 6]), _t([0]), cache)
    cache.truncate(0, 6)
    steps = torch.cat([model(s[6 + i : 7 + i], _t([0, 1]), _t([0]), cache)[0] for i in range(6)])
    torch.testing.assert_close(steps, block, atol=1e-5, rtol=1e-5)


def test_fused_tree_and_rollback(ckpt):
    d, raw, W = ckpt
    model = load_target(d)
    model.set_weights("fused")
    g = torch.Generator().manual_seed(5)
    ctx = torch.randint(0, raw["vocab_size"], (5,), generator=g)
    parents = [-1, 0, 0, 1, 1, 2, 5]
    nodes = torch.randint(0, raw["vocab_size"], (len(parents),), generator=g)
    n = len(parents)
    mask = ancestor_mask(parents)
    cache = model.new_cache(2, 32)
    model(ctx, _t([0, 5]), _t([1]), cache)
    base = cache.clone()
    tree_logits, _ = model(nodes, _t([0, n]), _t([1]), cache, tree_mask=[mask])
    for leaf in (3, 4, 6):
        path = [leaf]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        path = path[::-1]
        ref = ref_target_forward(W, raw, torch.cat([ctx, nodes[path]]))[0][5:]
        torch.testing.assert_close(tree_logits[path].double(), ref, atol=2e-4, rtol=1e-4)
    # reject everything, continue: same logits as a fresh forward of the true continuation
    c = base.clone()
    model(nodes[:4], _t([0, 4]), _t([1]), c)
    c.truncate(1, 5)
    cont = torch.randint(0, raw["vocab_size"], (3,), generator=g)
    after, _ = model(cont, _t([0, 3]), _t([1]), c)
    torch.testing.assert_close(
        after.double(), ref_target_forward(W, raw, torch.cat([ctx, cont]))[0][5:], atol=2e-4, rtol=1e-4
    )


@pytest.mark.parametrize("weights", ["reference", "fused", "native"])
def test_logit_rows(ckpt, weights):
    d, raw, _ = ckpt
    model = load_target(d, target_layer_ids=[1])
    model.set_weights(weights)
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, raw["vocab_size"], (9,), generator=g)
    cu, req = _t([0, 4, 4, 9]), _t([0, 1, 2])
    full, hid = model(ids, cu, req, model.new_cache(3, 16))
    last, _ = model(ids, cu, req, model.new_cache(3, 16), logit_rows="last")
    torch.testing.assert_close(last, full[[3, 8]], atol=1e-6, rtol=1e-6)  # empty block: no row
    picked, _ = model(ids, cu, req, model.new_cache(3, 16), logit_rows=_t([0, 5]))
    torch.testing.assert_close(picked, full[[0, 5]], atol=1e-6, rtol=1e-6)
    cache = model.new_cache(3, 16)
    none, hid2 = model(ids, cu, req, cache, logit_rows="none")
    assert none is None and cache.lengths.tolist() == [4, 0, 5]
    torch.testing.assert_close(hid2, hid, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="logit_rows"):
        model(ids, cu, req, model.new_cache(3, 16), logit_rows="first")
    with pytest.raises(ValueError, match="logit_rows"):
        model(ids, cu, req, model.new_cache(3, 16), logit_rows=_t([9]))


def test_weight_format_choice(ckpt):
    d, _, _ = ckpt
    model = load_target(d)
    with pytest.raises(ValueError, match="weights must be one of"):
        model.set_weights("int3")
    assert resolve_weight_format("auto", torch.device("cpu")) == "native"  # the extension is built
    assert resolve_weight_format("auto", torch.device("cpu"), torch.bfloat16) == (
        "bf16" if cpu_has_bf16_matmul() else "fused"
    )
    assert resolve_weight_format("auto", torch.device("cuda")) == "fused"
    with pytest.raises(ValueError, match="fp32 model"):
        resolve_weight_format("native", torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="oneDNN on the CPU"):
        resolve_weight_format("bf16", torch.device("cuda"))
    model.set_weights("fused")
    assert model.set_weights("reference") == "reference" and model.weights == "reference"
