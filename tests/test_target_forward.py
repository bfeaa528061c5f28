"""target_forward (the native whole-forward CPU kernel): agreement with its pure-PyTorch reference
on every GEMM micro-kernel this CPU has, row independence, packing round trip, hostile input,
opcheck, and the model-level path (TargetModel.set_weights("native"))."""

import functools
import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # helpers live beside the tests

from models_helpers import random_tensors, target_raw_config, target_shapes, write_checkpoint

from dspark_native.models import load_target
from dspark_native.ops import inject_context, pack_gate_up_panels, pack_panels, target_forward, target_forward_isa
from dspark_native.reference import inject_context_reference, target_forward_reference
from dspark_native.reference.target_forward import unpack_panels

ISAS = ["generic", "baseline", "avx512", "avx512-bf16", ""]  # "" = the best this CPU has (AMX here)


def _case(arch="Qwen3ForCausalLM", hidden=32, inter=48, seed=0, **over):
    """Random weights of a small target in the op's argument form, and a ragged batch."""
    raw = target_raw_config(arch, hidden_size=hidden, intermediate_size=inter, **over)
    W = random_tensors(target_shapes(raw), seed=seed)
    c = dict(
        H=hidden,
        I=inter,
        Hq=raw["num_attention_heads"],
        Hkv=raw["num_key_value_heads"],
        d=raw["head_dim"],
        V=raw["vocab_size"],
        L=raw["num_hidden_layers"],
    )
    lw = []
    for li in range(c["L"]):
        p = f"model.layers.{li}."
        a = p + "self_attn."
        lw += [
            pack_panels(torch.cat([W[a + "q_proj.weight"], W[a + "k_proj.weight"], W[a + "v_proj.weight"]])),
            pack_panels(W[a + "o_proj.weight"]),
            pack_gate_up_panels(W[p + "mlp.gate_proj.weight"], W[p + "mlp.up_proj.weight"]),
            pack_panels(W[p + "mlp.down_proj.weight"]),
            W[p + "input_layernorm.weight"],
            W[p + "post_attention_layernorm.weight"],
            W.get(a + "q_norm.weight", torch.zeros(0)),
            W.get(a + "k_norm.weight", torch.zeros(0)),
            torch.cat([W[a + "q_proj.bias"], W[a + "k_proj.bias"], W[a + "v_proj.bias"]])
            if a + "q_proj.bias" in W
            else torch.zeros(0),
        ]
    head = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    d = c["d"]
    inv_freq = (1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))).contiguous()
    return c, dict(layer_weights=lw, lm_head=pack_panels(head), final_norm=W["model.norm.weight"], inv_freq=inv_freq), W


def _batch(c, blocks, base, max_requests=4, max_seq=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    T = sum(blocks)
    cache_shape = (c["L"], max_requests, c["Hkv"], max_seq, c["d"])
    k = torch.randn(cache_shape, generator=g) * 0.5
    v = torch.randn(cache_shape, generator=g) * 0.5
    cu = torch.tensor([0] + list(torch.tensor(blocks).cumsum(0).tolist()), dtype=torch.int64)
    base_t = torch.tensor(base, dtype=torch.int64)
    pos = torch.cat([torch.arange(n) + b for n, b in zip(blocks, base, strict=True)]).to(torch.int64)
    h = torch.randn(T, c["H"], generator=g)
    return h, pos, cu, base_t, k, v


def _call(fn, c, args, h, pos, cu, slots, base, k, v, rows, feats):
    return fn(
        h,
        pos,
        cu,
        slots,
        base,
        k,
        v,
        args["layer_weights"],
        args["lm_head"],
        args["final_norm"],
        args["inv_freq"],
        rows,
        feats,
        num_heads=c["Hq"],
        intermediate_size=c["I"],
        vocab_size=c["V"],
        eps=1e-6,
    )


@pytest.mark.parametrize(
    "arch,hidden,inter", [("Qwen3ForCausalLM", 32, 48), ("LlamaForCausalLM", 64, 64), ("Qwen2ForCausalLM", 32, 32)]
)
@pytest.mark.parametrize("layers", [2, 4])
def test_matches_reference(arch, hidden, inter, layers):
    c, args, _ = _case(arch, hidden, inter, num_hidden_layers=layers)
    h, pos, cu, base, k, v = _batch(c, [3, 1, 5], [4, 0, 7])
    slots = torch.tensor([2, 0, 3])
    rows = torch.tensor([0, 2, 3, 8])
    hr, kr, vr = h.clone(), k.clone(), v.clone()
    logits, feats = _call(target_forward, c, args, h, pos, cu, slots, base, k, v, rows, [0, 1])
    rl, rf = _call(target_forward_reference, c, args, hr, pos, cu, slots, base, kr, vr, rows, [0, 1])
    assert logits.shape == (4, c["V"]) and feats.shape == (9, 2 * c["H"])
    pairs = [(logits, rl), (feats, rf), (h, hr), (k, kr), (v, vr)]
    if layers == 2:  # these weights round no GEMM input differently: fp32 summation order only
        for a, b in pairs:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    else:
        # Deeper, an activation within 1e-7 of a bf16 rounding boundary can round the other way
        # (fp32 vs float64 sums) and the flip propagates; a wrong kernel is off by O(1) instead.
        for a, b in pairs:
            assert ((a - b).norm() / b.norm()).item() < 5e-3


@pytest.mark.parametrize("arch,hidden,inter", [("Qwen3ForCausalLM", 32, 48), ("LlamaForCausalLM", 64, 64)])
def test_block_attention_matches_reference(arch, hidden, inter):
    """block_attention (a drafter's parallel block): every row of a request attends to its
    cached context and its whole block, later rows included; checked against the fp64
    reference, and against the causal call (which must differ)."""
    c, args, _ = _case(arch, hidden, inter)
    h, pos, cu, base, k, v = _batch(c, [4, 7], [5, 0])
    slots = torch.tensor([1, 3])
    rows = torch.arange(11)
    hr, kr, vr, hc, kc, vc = h.clone(), k.clone(), v.clone(), h.clone(), k.clone(), v.clone()
    lg, _ = _call(
        functools.partial(target_forward, block_attention=True), c, args, h, pos, cu, slots, base, k, v, rows, []
    )
    ref = functools.partial(target_forward_reference, block_attention=True)
    rl, _ = _call(ref, c, args, hr, pos, cu, slots, base, kr, vr, rows, [])
    torch.testing.assert_close(lg, rl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, hr, atol=1e-5, rtol=1e-5)
    causal, _ = _call(target_forward, c, args, hc, pos, cu, slots, base, kc, vc, rows, [])
    differs = (causal - lg).abs().amax(-1) > 1e-4
    # every row but a block's last sees rows the causal call hides (the last row differs too once
    # a layer's input has mixed in its earlier rows' whole-block view)
    assert differs[[0, 1, 2, 4, 5, 6, 7, 8, 9]].all()
    with pytest.raises(RuntimeError, match="block_attention"):
        target_forward(
            h,
            pos,
            cu,
            slots,
            base,
            k,
            v,
            [],
            args["lm_head"],
            args["final_norm"],
            args["inv_freq"],
            rows,
            [],
            num_heads=c["Hq"],
            intermediate_size=c["I"],
            vocab_size=c["V"],
            eps=1e-6,
            block_attention="yes",
        )


def test_rows_independent_of_batch():
    """A row's logits do not depend on the other rows of the call (fixed reduction order): a
    block verified in one call equals its rows decoded one at a time."""
    c, args, _ = _case()
    h, pos, cu, base, k, v = _batch(c, [6], [5], max_requests=1)
    slots = torch.tensor([0])
    k0, v0 = k.clone(), v.clone()
    block, _ = _call(target_forward, c, args, h.clone(), pos, cu, slots, base, k, v, torch.arange(6), [])
    steps = []
    for i in range(6):
        lg, _ = _call(
            target_forward,
            c,
            args,
            h[i : i + 1].clone(),
            pos[i : i + 1],
            torch.tensor([0, 1]),
            slots,
            base + i,
            k0,
            v0,
            torch.tensor([0]),
            [],
        )
        steps.append(lg)
    assert torch.equal(torch.cat(steps), block)
    assert torch.equal(k0, k) and torch.equal(v0, v)


def test_every_isa_agrees():
    """Each GEMM micro-kernel (forced with DSPARK_CPU_ISA in a fresh process, since the choice is
    made once per process) gives the same result up to fp32 summation rounding, for every row
    count 1-11 (the AVX2 path blocks 4 rows x 1 panel, 2 x 2, 1 x 4 and 3 x 1)."""
    code = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from test_target_forward import _case, _batch, _call
from dspark_native.ops import target_forward, target_forward_isa
c, args, _ = _case("LlamaForCausalLM", 64, 64)
logits, hs = [], []
for blocks, base in (([3, 8], [4, 2]), ([1], [5]), ([2], [3]), ([5], [0]), ([6], [9]), ([7], [1])):
    h, pos, cu, base, k, v = _batch(c, blocks, base)
    slots = torch.arange(len(blocks)).flip(0)
    lg, f = _call(target_forward, c, args, h, pos, cu, slots, base, k, v, torch.arange(sum(blocks)), [1])
    logits += lg.tolist()
    hs += h.tolist()
print(json.dumps(dict(isa=target_forward_isa(), logits=logits, h=hs)))
"""
    here = os.path.dirname(os.path.abspath(__file__))
    out = {}
    for isa in ISAS:
        env = dict(os.environ, DSPARK_CPU_ISA=isa)
        r = subprocess.run([sys.executable, "-c", code, here], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        res = json.loads(r.stdout.strip().splitlines()[-1])
        out[res["isa"]] = res
    assert "generic" in out
    ref = out["generic"]
    for name, res in out.items():
        torch.testing.assert_close(
            torch.tensor(res["logits"]),
            torch.tensor(ref["logits"]),
            atol=2e-3,
            rtol=2e-3,
            msg=lambda m, name=name: f"{name} vs generic: {m}",
        )
        torch.testing.assert_close(torch.tensor(res["h"]), torch.tensor(ref["h"]), atol=2e-3, rtol=2e-3)
    assert target_forward_isa() in out


def test_pack_round_trip_and_padding():
    w = torch.randn(37, 13)
    p = pack_panels(w)
    assert p.dtype == torch.bfloat16 and p.numel() == 3 * 7 * 32
    torch.testing.assert_close(unpack_panels(p, 37, 13), w.bfloat16(), atol=0, rtol=0)
    g, u = torch.randn(32, 8), torch.randn(32, 8)
    both = unpack_panels(pack_gate_up_panels(g, u), 64, 8)
    assert torch.equal(both[:16], g[:16].bfloat16()) and torch.equal(both[16:32], u[:16].bfloat16())
    with pytest.raises(ValueError, match="multiple of 16"):
        pack_gate_up_panels(torch.randn(20, 8), torch.randn(20, 8))


def test_hostile_input_named():
    c, args, _ = _case()
    h, pos, cu, base, k, v = _batch(c, [3, 2], [4, 0])
    good = dict(slots=torch.tensor([1, 0]), rows=torch.tensor([0]))

    def run(**kw):
        a = dict(args)
        x = dict(
            h=h.clone(),
            pos=pos,
            cu=cu,
            slots=good["slots"],
            base=base,
            k=k.clone(),
            v=v.clone(),
            rows=good["rows"],
            feats=[],
        )
        x.update({n: kw.pop(n) for n in list(kw) if n in x})
        a.update(kw)
        return _call(
            target_forward,
            c,
            a,
            x["h"],
            x["pos"],
            x["cu"],
            x["slots"],
            x["base"],
            x["k"],
            x["v"],
            x["rows"],
            x["feats"],
        )

    with pytest.raises(RuntimeError, match="slots must be distinct"):
        run(slots=torch.tensor([1, 1]))
    with pytest.raises(RuntimeError, match="exceeds max_seq"):
        run(base=torch.tensor([23, 0]))
    with pytest.raises(RuntimeError, match=r"logit_rows\[0\] out of"):
        run(rows=torch.tensor([5]))
    with pytest.raises(RuntimeError, match="feature_layers"):
        run(feats=[9])
    with pytest.raises(RuntimeError, match="qkv must hold the panels"):
        run(layer_weights=[args["layer_weights"][0][:-32]] + args["layer_weights"][1:])
    with pytest.raises(RuntimeError, match="layer_weights must hold 9"):
        run(layer_weights=args["layer_weights"][:-1])
    with pytest.raises(TypeError, match="h must be Float"):
        run(h=h.double())
    with pytest.raises(RuntimeError, match="cu_seqlens must start at 0 and end at num_rows"):
        run(cu=torch.tensor([0, 3, 4]))
    k0 = k.clone()
    with pytest.raises(RuntimeError):
        _call(target_forward, c, args, h.clone(), pos, cu, torch.tensor([1, 1]), base, k0, v.clone(), good["rows"], [])
    assert torch.equal(k0, k)  # nothing written on error


def test_opcheck():
    c, args, _ = _case()
    h, pos, cu, base, k, v = _batch(c, [2, 1], [3, 0])
    a = (
        h,
        pos,
        cu,
        torch.tensor([1, 0]),
        base,
        k,
        v,
        args["layer_weights"],
        args["lm_head"],
        args["final_norm"],
        args["inv_freq"],
        torch.tensor([0, 2]),
        [1],
        c["Hq"],
        c["I"],
        c["V"],
        1e-6,
    )
    torch.library.opcheck(torch.ops.dspark.target_forward.default, a, test_utils=("test_schema", "test_faketensor"))


@pytest.fixture(scope="module", params=["Qwen3ForCausalLM", "LlamaForCausalLM"])
def ckpt(request, tmp_path_factory):
    raw = target_raw_config(request.param, tie_word_embeddings=request.param.startswith("Llama"))
    W = random_tensors(target_shapes(raw), seed=21)
    d = tmp_path_factory.mktemp("native")
    write_checkpoint(str(d), raw, W)
    return str(d), raw


def test_model_native_path_close_to_reference_and_prefill_split(ckpt):
    d, raw = ckpt
    ref = load_target(d, target_layer_ids=[1, 3])
    model = load_target(d, target_layer_ids=[1, 3])
    assert model.set_weights("native") == "native"
    g = torch.Generator().manual_seed(4)
    s = torch.randint(0, raw["vocab_size"], (14,), generator=g)
    outs = []
    for m in (ref, model):
        cache = m.new_cache(2, 32)
        a, ha = m(s[:9], torch.tensor([0, 9]), torch.tensor([1]), cache)
        b, hb = m(s[9:], torch.tensor([0, 5]), torch.tensor([1]), cache)
        outs.append((torch.cat([a, b]), torch.cat([ha, hb])))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=0.1, rtol=0.05)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=0.1, rtol=0.05)
    # tree masks are not the kernel's: those forwards take the fused path and still agree
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    cache = model.new_cache(1, 16)
    model(s[:5], torch.tensor([0, 5]), torch.tensor([0]), cache)
    tl, _ = model(s[5:8], torch.tensor([0, 3]), torch.tensor([0]), cache, tree_mask=[mask])
    cache.truncate(0, 5)
    cl, _ = model(s[5:7], torch.tensor([0, 2]), torch.tensor([0]), cache)
    torch.testing.assert_close(tl[:2], cl, atol=0.05, rtol=0.05)
    assert target_forward_isa() in ("amx-bf16", "avx512-bf16", "avx512", "avx2", "generic")


# --------------------------------------------------------------------------- inject_context


def _inject_case(arch="Qwen3ForCausalLM", blocks=(3, 1, 5), base=(4, 0, 7), k_layers=3, seed=5, **over):
    """inject_context arguments on _case's weights: fc [H, k H], context_norm, ragged rows."""
    c, args, _ = _case(arch, **over)
    g = torch.Generator().manual_seed(seed)
    H = c["H"]
    F = k_layers * H
    lw = []
    for li in range(c["L"]):
        w = args["layer_weights"][9 * li : 9 * li + 9]
        lw += [w[0], w[7], w[8]]  # qkv panels, k_norm, qkv_bias
    _, pos, cu, base_t, k, v = _batch(c, list(blocks), list(base), seed=seed)
    feats = torch.randn(sum(blocks), F, generator=g) * 2.0
    fc = torch.randn(H, F, generator=g) / F**0.5
    norm = 1.0 + 0.1 * torch.randn(H, generator=g)
    a = dict(
        features=feats,
        positions=pos,
        cu_seqlens=cu,
        slots=torch.arange(len(blocks)).flip(0).contiguous(),
        base=base_t,
        k_cache=k,
        v_cache=v,
        fc=pack_panels(fc),
        context_norm=norm,
        layer_weights=lw,
        inv_freq=args["inv_freq"],
    )
    return c, a


def _inject(fn, c, a, **over):
    a = dict(a, **over)
    fn(
        a["features"],
        a["positions"],
        a["cu_seqlens"],
        a["slots"],
        a["base"],
        a["k_cache"],
        a["v_cache"],
        a["fc"],
        a["context_norm"],
        a["layer_weights"],
        a["inv_freq"],
        num_heads=c["Hq"],
        eps=1e-6,
    )


@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_inject_context_matches_reference(arch):
    """K/V written where the reference writes them (k norm, bias, RoPE per architecture), to fp32
    summation rounding; every other cache entry untouched."""
    c, a = _inject_case(arch)
    k0, v0 = a["k_cache"].clone(), a["v_cache"].clone()
    kr, vr = k0.clone(), v0.clone()
    _inject(inject_context, c, a)
    _inject(inject_context_reference, c, a, k_cache=kr, v_cache=vr)
    torch.testing.assert_close(a["k_cache"], kr, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(a["v_cache"], vr, atol=2e-5, rtol=2e-5)
    changed = (a["k_cache"] != k0).any(-1)  # [L, slots, Hkv, seq]
    assert int(changed.sum()) == c["L"] * c["Hkv"] * 9  # 9 rows, nothing else moved


def test_inject_context_rows_independent_and_empty():
    """A row's K/V do not depend on the rows beside it (one call = one call per request, bit for
    bit); zero rows write nothing."""
    c, a = _inject_case("LlamaForCausalLM", hidden=64, inter=64)
    ks, vs = a["k_cache"].clone(), a["v_cache"].clone()
    _inject(inject_context, c, a)
    cu = a["cu_seqlens"].tolist()
    for r in range(len(cu) - 1):
        rows = slice(cu[r], cu[r + 1])
        _inject(
            inject_context,
            c,
            a,
            features=a["features"][rows].contiguous(),
            positions=a["positions"][rows].contiguous(),
            cu_seqlens=torch.tensor([0, cu[r + 1] - cu[r]]),
            slots=a["slots"][r : r + 1].contiguous(),
            base=a["base"][r : r + 1].contiguous(),
            k_cache=ks,
            v_cache=vs,
        )
    assert torch.equal(ks, a["k_cache"]) and torch.equal(vs, a["v_cache"])
    k0 = ks.clone()
    none = torch.zeros(0, dtype=torch.int64)
    empty = dict(features=torch.zeros(0, a["features"].shape[1]), positions=none, slots=none, base=none)
    _inject(inject_context, c, a, **empty, cu_seqlens=torch.tensor([0]), k_cache=ks)
    assert torch.equal(ks, k0)


def test_inject_context_every_isa_agrees():
    code = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from test_target_forward import _inject_case, _inject
from dspark_native.ops import inject_context, target_forward_isa
out = []
for blocks, base in (((3, 8), (4, 2)), ((1,), (5,)), ((5,), (0,))):
    c, a = _inject_case("LlamaForCausalLM", blocks=blocks, base=base, hidden=64, inter=64)
    _inject(inject_context, c, a)
    out += a["k_cache"].flatten().tolist() + a["v_cache"].flatten().tolist()
print(json.dumps(dict(isa=target_forward_isa(), kv=out)))
"""
    here = os.path.dirname(os.path.abspath(__file__))
    out = {}
    for isa in ISAS:
        env = dict(os.environ, DSPARK_CPU_ISA=isa)
        r = subprocess.run([sys.executable, "-c", code, here], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        res = json.loads(r.stdout.strip().splitlines()[-1])
        out[res["isa"]] = torch.tensor(res["kv"])
    assert "generic" in out
    for name, kv in out.items():
        torch.testing.assert_close(kv, out["generic"], atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_inject_context_hostile_input_named():
    c, a = _inject_case()
    k0 = a["k_cache"].clone()
    with pytest.raises(RuntimeError, match="slots must be distinct"):
        _inject(inject_context, c, a, slots=torch.tensor([1, 1, 0]))
    with pytest.raises(RuntimeError, match="exceeds max_seq"):
        _inject(inject_context, c, a, base=torch.tensor([4, 0, 20]))
    with pytest.raises(RuntimeError, match="fc must hold the panels"):
        _inject(inject_context, c, a, fc=a["fc"][:-32].contiguous())
    with pytest.raises(RuntimeError, match="3 tensors per layer"):
        _inject(inject_context, c, a, layer_weights=a["layer_weights"][:-1])
    with pytest.raises(TypeError, match="features must be Float"):
        _inject(inject_context, c, a, features=a["features"].double())
    with pytest.raises(RuntimeError, match="cu_seqlens must start at 0 and end at num_rows"):
        _inject(inject_context, c, a, cu_seqlens=torch.tensor([0, 3, 4, 8]))
    assert torch.equal(a["k_cache"], k0)  # nothing written on error
    c2, a2 = _inject_case("LlamaForCausalLM", num_attention_heads=2, num_key_value_heads=1, head_dim=12)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        _inject(inject_context, c2, a2)


def test_inject_context_opcheck():
    c, a = _inject_case(blocks=(2, 1), base=(3, 0))
    args = (
        a["features"],
        a["positions"],
        a["cu_seqlens"],
        a["slots"],
        a["base"],
        a["k_cache"],
        a["v_cache"],
        a["fc"],
        a["context_norm"],
        a["layer_weights"],
        a["inv_freq"],
        c["Hq"],
        1e-6,
    )
    torch.library.opcheck(torch.ops.dspark.inject_context.default, args, test_utils=("test_schema", "test_faketensor"))
