"""DSpark / DFlash / EAGLE-3 drafters vs straightforward implementations written here."""

import os as _os
import sys as _sys

import pytest
import torch

_sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))  # helpers live beside the tests

from models_helpers import (
    drafter_raw_config,
    drafter_shapes,
    random_tensors,
    ref_dspark_block,
    ref_eagle3_layer,
    rms,
    target_raw_config,
    target_shapes,
    write_checkpoint,
)

from dspark_native.models import (
    ConfidenceHead,
    DSparkDrafter,
    Eagle3Drafter,
    MarkovHead,
    load_drafter,
    load_target,
)

TOL = dict(atol=2e-4, rtol=1e-4)


def _t(x):
    return torch.tensor(x, dtype=torch.int64)


def _setup(tmp_path, prefix, drafter_arch, **over):
    torch.manual_seed(0)
    traw = target_raw_config(f"{prefix}ForCausalLM", num_hidden_layers=8)
    tW = random_tensors(target_shapes(traw), seed=10)
    write_checkpoint(str(tmp_path / "t"), traw, tW)
    draw = drafter_raw_config(traw, f"{prefix}{drafter_arch}", **over)
    dW = random_tensors(drafter_shapes(draw), seed=11)
    write_checkpoint(str(tmp_path / "d"), draw, dW)
    target = load_target(str(tmp_path / "t"))
    drafter = load_drafter(str(tmp_path / "d"), target)
    drafter.native_propose = False  # the exact torch backbone; the native one has its own test
    return traw, draw, dW, target, drafter


@pytest.mark.parametrize("native", [False, True], ids=["torch", "native"])
@pytest.mark.parametrize("prefix", ["Qwen3", "Llama"])
def test_dspark_propose_matches_reference(tmp_path, prefix, native):
    """The torch backbone matches the fp64 reference to fp32 rounding; the native one (one
    target_forward call with block attention: bf16 weights and GEMM inputs, whose exact math
    tests/test_target_forward.py checks) to bf16 rounding."""
    traw, c, W, target, drafter = _setup(tmp_path, prefix, "DSparkModel")
    assert isinstance(drafter, DSparkDrafter)
    drafter.native_propose = None if native else False
    if native and not drafter.native_propose_ok():
        pytest.skip("the native propose needs the compiled extension on the CPU")
    assert target.target_layer_ids == [1, 2, 3, 4, 5]  # told by load_drafter
    kH = 5 * c["hidden_size"]
    g = torch.Generator().manual_seed(12)
    ctx_a = torch.randn(7, kH, generator=g)
    ctx_b = torch.randn(3, kH, generator=g)
    drafter.allocate_cache(4, 32)
    # request a arrives in two ingests (4 + 3 rows), the second ragged with request b
    drafter.ingest(_t([2]), ctx_a[:4], _t([0, 4]))
    drafter.ingest(_t([0, 2]), torch.cat([ctx_b, ctx_a[4:]]), _t([0, 3, 6]))
    assert drafter.cache.lengths.tolist() == [3, 0, 7, 0]
    U, h = drafter.propose(_t([2, 0]), _t([5, 9]))
    assert U.dtype == torch.float32 and U.shape == (2, c["block_size"], c["vocab_size"])
    assert h.shape == (2, c["block_size"], c["hidden_size"])
    assert drafter.cache.k_cache.dtype == (torch.float32 if native else drafter.dtype)
    for r, (ctx, anchor) in enumerate([(ctx_a, 5), (ctx_b, 9)]):
        refU, refh = ref_dspark_block(W, c, ctx, anchor)
        if native:
            tol = dict(atol=0.03 * float(refU.abs().max()), rtol=0.05)
            torch.testing.assert_close(U[r].double(), refU, **tol)
            torch.testing.assert_close(h[r].double(), refh, atol=0.03 * float(refh.abs().max()), rtol=0.05)
            assert (U[r].argmax(-1) == refU.argmax(-1)).float().mean() >= 0.7
        else:
            torch.testing.assert_close(U[r].double(), refU, **TOL)
            torch.testing.assert_close(h[r].double(), refh, **TOL)
    # propose does not keep block K/V; crop + re-ingest reproduces the same block
    assert drafter.cache.lengths.tolist() == [3, 0, 7, 0]
    drafter.crop(_t([2]), 4)
    drafter.ingest(_t([2]), ctx_a[4:], _t([0, 3]))
    U2, _ = drafter.propose(_t([2]), _t([5]))
    torch.testing.assert_close(U2[0], U[0], atol=1e-5, rtol=1e-5)
    if native:  # no room for the block's scratch K/V past the context: the torch path, same block
        drafter.allocate_cache(4, 7 + c["block_size"] - 1)
        drafter.ingest(_t([2]), ctx_a, _t([0, 7]))
        drafter.native_propose = False
        U3, _ = drafter.propose(_t([2]), _t([5]))
        drafter.native_propose = None
        U4, _ = drafter.propose(_t([2]), _t([5]))
        torch.testing.assert_close(U4, U3, atol=0, rtol=0)


@pytest.mark.parametrize("prefix", ["Qwen3", "Llama"])
def test_native_ingest_matches_torch_ingest(tmp_path, prefix):
    """The native ingest (inject_context: fc, hidden_norm and every layer's K/V in one call on
    bf16 panels) writes the context K/V the torch layers write, to bf16 rounding, at the same
    positions; lengths advance alike."""
    traw, c, W, target, drafter = _setup(tmp_path, prefix, "DSparkModel")
    drafter.native_propose = None
    if not drafter._native_ingest_ok():
        pytest.skip("the native ingest needs the compiled extension on the CPU")
    kH = 5 * c["hidden_size"]
    ctx = torch.randn(9, kH, generator=torch.Generator().manual_seed(3))
    caches = []
    for native in (None, False):
        drafter.native_propose = native
        drafter.allocate_cache(3, 24)
        drafter.ingest(_t([1]), ctx[:2], _t([0, 2]))
        drafter.ingest(_t([0, 1]), ctx[2:], _t([0, 4, 7]))
        assert drafter.cache.lengths.tolist() == [4, 5, 0]
        caches.append((drafter.cache.k_cache.float().clone(), drafter.cache.v_cache.float().clone()))
    (kn, vn), (kt, vt) = caches
    for a, b in ((kn, kt), (vn, vt)):
        assert ((a - b).norm() / b.norm()).item() < 2e-2
        assert torch.equal(a == 0, b == 0)  # the same positions written, nothing else
    drafter.native_propose = None


def test_forward_train_matches_reference(tmp_path):
    traw, c, W, target, drafter = _setup(tmp_path, "Qwen3", "DSparkModel")
    kH = 5 * c["hidden_size"]
    g = torch.Generator().manual_seed(13)
    ctx = torch.randn(1, 9, kH, generator=g)
    anchors = _t([[3, 7, 9]])
    anchor_tok = _t([4, 8, 15])
    blocks = drafter.block_input_ids(anchor_tok)[None]
    U, h = drafter.forward_train(ctx, blocks, anchors)
    for a in range(3):
        s = int(anchors[0, a])
        refU, refh = ref_dspark_block(W, c, ctx[0, :s], int(anchor_tok[a]))
        torch.testing.assert_close(U[0, a].double(), refU, **TOL)
        torch.testing.assert_close(h[0, a].double(), refh, **TOL)
    U.sum().backward()  # differentiable
    assert drafter.fc.weight.grad is not None


def _ref_markov(head_type, P, prev, h, state):
    e = P["w1"][prev].double()
    hd = h.double()
    if head_type == "vanilla":
        return e @ P["w2"].double().T, None
    if head_type == "gated":
        gate = torch.sigmoid(torch.cat([hd, e], -1) @ P["gw"].double().T + P["gb"].double())
        return (gate * e) @ P["w2"].double().T, None
    r = e.shape[-1]
    z = torch.cat([state, e, hd], -1) @ P["jw"].double().T + P["jb"].double()
    gg, cc, oo = z[:, :r], z[:, r : 2 * r], z[:, 2 * r :]
    s = torch.sigmoid(gg) * state + (1 - torch.sigmoid(gg)) * torch.tanh(cc)
    return torch.tanh(oo) @ P["w2"].double().T, s


@pytest.mark.parametrize("head_type", ["vanilla", "gated", "rnn"])
def test_markov_and_confidence_heads(head_type):
    torch.manual_seed(14)
    V, H, r, R, g = 50, 16, 6, 3, 4
    head = MarkovHead(V, H, r, head_type)
    P = {"w1": head.markov_w1.weight.detach(), "w2": head.markov_w2.weight.detach()}
    assert tuple(P["w2"].shape) == (V, r)
    if head_type == "gated":
        assert tuple(head.gate_proj.weight.shape) == (r, H + r)
        P["gw"], P["gb"] = head.gate_proj.weight.detach(), head.gate_proj.bias.detach()
    if head_type == "rnn":
        assert tuple(head.joint_proj.weight.shape) == (3 * r, 2 * r + H)
        with torch.no_grad():
            head.joint_proj.weight.mul_(4)  # make the state matter
        P["jw"], P["jb"] = head.joint_proj.weight.detach(), head.joint_proj.bias.detach()
    prev = torch.randint(0, V, (R, g))
    hs = torch.randn(R, g, H)
    state = head.init_state(R)
    ref_state = torch.zeros(R, r, dtype=torch.float64)
    steps = []
    for k in range(g):
        b, e, state = head.step(prev[:, k], hs[:, k], state)
        rb, ref_state = _ref_markov(head_type, P, prev[:, k], hs[:, k], ref_state)
        torch.testing.assert_close(b.double(), rb, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(e, P["w1"][prev[:, k]])
        steps.append(b)
    tf, tf_e = head.teacher_forced(prev, hs)
    torch.testing.assert_close(tf, torch.stack(steps, 1), atol=1e-6, rtol=1e-6)
    if head_type == "rnn":  # the state carries history: a different earlier token changes step 2
        prev2 = prev.clone()
        prev2[:, 0] = (prev2[:, 0] + 1) % V
        assert not torch.allclose(head.teacher_forced(prev2, hs)[0][:, 2], tf[:, 2])
    conf = ConfidenceHead(H + r)
    c = conf(hs, tf_e)
    w, bias = conf.proj.weight.detach().double(), conf.proj.bias.detach().double()
    ref_c = torch.sigmoid(torch.cat([hs.double(), tf_e.double()], -1) @ w.T + bias).squeeze(-1)
    assert c.dtype == torch.float32 and c.shape == (R, g)
    torch.testing.assert_close(c.double(), ref_c, atol=1e-6, rtol=1e-6)


def test_drafter_heads_teacher_forced(tmp_path):
    traw, c, W, target, drafter = _setup(tmp_path, "Qwen3", "DSparkModel", markov_head_type="gated")
    drafter.allocate_cache(1, 16)
    drafter.ingest(_t([0]), torch.randn(4, 5 * c["hidden_size"]), _t([0, 4]))
    U, h = drafter.propose(_t([0]), _t([3]))
    prev = torch.cat([_t([3]), U[0, :-1].argmax(-1)])[None]
    z, conf = drafter.heads_teacher_forced(U, h, prev)
    e = W["markov_head.markov_w1.weight"].double()[prev[0]]
    gate = torch.sigmoid(
        torch.cat([h[0].double(), e], -1) @ W["markov_head.gate_proj.weight"].double().T
        + W["markov_head.gate_proj.bias"].double()
    )
    ref_z = U[0].double() + (gate * e) @ W["markov_head.markov_w2.weight"].double().T
    torch.testing.assert_close(z[0].double(), ref_z, atol=1e-5, rtol=1e-5)
    ref_c = torch.sigmoid(
        torch.cat([h[0].double(), e], -1) @ W["confidence_head.proj.weight"].double().T
        + W["confidence_head.proj.bias"].double()
    ).squeeze(-1)
    torch.testing.assert_close(conf[0].double(), ref_c, atol=1e-6, rtol=1e-6)


def test_dflash_is_rank0_without_heads(tmp_path):
    traw, c, W, target, drafter = _setup(tmp_path, "Qwen3", "DSparkModel", markov_rank=0, enable_confidence_head=False)
    assert drafter.markov_head is None and drafter.confidence_head is None
    assert not any(k.startswith(("markov_head", "confidence_head")) for k in W)
    drafter.allocate_cache(1, 16)
    ctx = torch.randn(5, 5 * c["hidden_size"])
    drafter.ingest(_t([0]), ctx, _t([0, 5]))
    U, h = drafter.propose(_t([0]), _t([7]))
    torch.testing.assert_close(U[0].double(), ref_dspark_block(W, c, ctx, 7)[0], **TOL)
    z, conf = drafter.heads_teacher_forced(U, h, torch.zeros(1, c["block_size"], dtype=torch.long))
    assert conf is None and torch.equal(z, U)


@pytest.mark.parametrize("prefix", ["Qwen3", "Llama"])
def test_eagle3_chain_matches_reference(tmp_path, prefix):
    traw, c, W, target, drafter = _setup(tmp_path, prefix, "Eagle3Model")
    assert isinstance(drafter, Eagle3Drafter)
    H = c["hidden_size"]
    gen = torch.Generator().manual_seed(15)
    n = 6
    feats = torch.randn(n, 5 * H, generator=gen)
    toks = torch.randint(0, c["vocab_size"], (n,), generator=gen)
    anchor = 11
    drafter.allocate_cache(2, 32)
    drafter.ingest(_t([1]), feats[:2], _t([0, 2]), toks[:2])
    drafter.ingest(_t([1]), feats[2:], _t([0, 4]), toks[2:])
    assert drafter.cache.lengths.tolist() == [0, n - 1]
    d, logits = drafter.propose(_t([1]), _t([anchor]), steps=3)
    assert d.shape == (1, 3) and logits.shape == (1, 3, c["vocab_size"])
    assert drafter.cache.lengths.tolist() == [0, n - 1]  # rolled back
    # reference: pairs (g_t, token_{t+1}); drafting feeds back the pre-norm layer output
    g_seq = feats.double() @ W["fc.weight"].double().T
    pair_tok = torch.cat([toks[1:], _t([anchor])])
    head = W["lm_head.weight"].double()
    for k in range(3):
        out = ref_eagle3_layer(W, c, pair_tok, g_seq)
        ref_logits = rms(out[-1], W["norm.weight"], c["rms_norm_eps"]) @ head.T
        torch.testing.assert_close(logits[0, k].double(), ref_logits, **TOL)
        nxt = int(ref_logits.argmax())
        assert int(d[0, k]) == nxt
        pair_tok = torch.cat([pair_tok, _t([nxt])])
        g_seq = torch.cat([g_seq, out[-1:]])
    # sampling path draws valid tokens reproducibly
    s1, _ = drafter.propose(_t([1]), _t([anchor]), 3, temperature=1.0, generator=torch.Generator().manual_seed(0))
    s2, _ = drafter.propose(_t([1]), _t([anchor]), 3, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s1, s2)
    with pytest.raises(RuntimeError, match="ingest"):
        drafter.propose(_t([0]), _t([1]), 2)
    # batched with a second request of another context length: same drafts for request 1
    drafter.ingest(_t([0]), feats[:3], _t([0, 3]), toks[:3])
    db, lb = drafter.propose(_t([0, 1]), _t([4, anchor]), steps=3)
    torch.testing.assert_close(lb[1], logits[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(db[1], d[0])
    d0, l0 = drafter.propose(_t([0]), _t([4]), steps=3)
    torch.testing.assert_close(lb[0], l0[0], atol=1e-5, rtol=1e-5)


def test_drafter_input_errors(tmp_path):
    traw, c, W, target, drafter = _setup(tmp_path, "Qwen3", "DSparkModel")
    with pytest.raises(RuntimeError, match="allocate_cache"):
        drafter.propose(_t([0]), _t([1]))
    drafter.allocate_cache(2, 4)
    with pytest.raises(ValueError, match="ctx_features"):
        drafter.ingest(_t([0]), torch.randn(2, 3), _t([0, 2]))
    with pytest.raises(ValueError, match="max_seq"):
        drafter.ingest(_t([0]), torch.randn(5, 5 * c["hidden_size"]), _t([0, 5]))
    with pytest.raises(ValueError, match="anchor_tokens"):
        drafter.propose(_t([0]), _t([c["vocab_size"]]))
    with pytest.raises(ValueError, match="request_ids"):
        drafter.ingest(_t([1, 1]), torch.randn(2, 5 * c["hidden_size"]), _t([0, 1, 2]))
    assert drafter.cache.lengths.tolist() == [0, 0]


def test_bf16_drafter_close_to_fp32(tmp_path):
    traw, c, W, target, d32 = _setup(tmp_path, "Qwen3", "DSparkModel")
    d16 = load_drafter(str(tmp_path / "d"), target, dtype=torch.bfloat16)
    assert d16.fc.weight.dtype == torch.bfloat16
    ctx = torch.randn(6, 5 * c["hidden_size"], generator=torch.Generator().manual_seed(16))
    outs = []
    for d in (d32, d16):
        d.allocate_cache(1, 16)
        d.ingest(_t([0]), ctx, _t([0, 6]))
        outs.append(d.propose(_t([0]), _t([3])))
    (U32, h32), (U16, h16) = outs
    assert U16.dtype == torch.float32 and h16.dtype == torch.bfloat16
    assert (U16 - U32).abs().max() / U32.abs().max() < 0.05
