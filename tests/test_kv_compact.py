"""kv_compact: reference agreement on the contiguous (stacked and per-layer list) and paged layouts
for random acceptance patterns, poisoning (other requests' and other positions' entries untouched),
chain idempotence and the length-only fast path, hostile input, opcheck, CUDA agreement."""

from __future__ import annotations

import pytest
import torch

import dspark_native.ops as ops
from dspark_native.reference import kv_compact_reference


def random_accepted(R, W, old, cap, g, n_verified=None):
    """Strictly increasing index lists (often starting at 0 like a tree path), -1 padded."""
    acc = torch.full((R, W), -1, dtype=torch.int64)
    nv = torch.zeros(R, dtype=torch.int64)
    for r in range(R):
        n = int(torch.randint(1, W + 1, (1,), generator=g)) if n_verified is None else int(n_verified[r])
        n = min(n, cap - int(old[r]))
        nv[r] = n
        if n <= 0:
            continue
        k = int(torch.randint(0, min(n, W) + 1, (1,), generator=g))
        idx = torch.sort(torch.randperm(n, generator=g)[:k]).values
        if k > 0 and torch.rand(1, generator=g) < 0.7:
            if n > 1:
                picks = torch.randperm(n - 1, generator=g)[: k - 1] + 1
                idx = torch.sort(torch.cat([torch.zeros(1, dtype=torch.int64), picks])).values
        acc[r, : idx.numel()] = idx
    return acc, nv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8])
@pytest.mark.parametrize("form", ["stacked", "list"])
def test_contiguous_matches_reference_and_poisoning(dtype, form):
    g = torch.Generator().manual_seed(7)
    L, slots, H, S, D = 3, 6, 2, 24, 8
    for _trial in range(6):
        k = (torch.randn(L, slots, H, S, D, generator=g) * 50).to(dtype)  # poison everywhere
        v = (torch.randn(L, slots, H, S, D, generator=g) * 50).to(dtype)
        R = int(torch.randint(1, slots + 1, (1,), generator=g))
        sl = torch.randperm(slots, generator=g)[:R]
        old = torch.randint(0, S - 2, (R,), generator=g)
        acc, nv = random_accepted(R, 8, old, S, g)
        k0, v0 = k.clone(), v.clone()
        kr, vr = k.clone(), v.clone()
        if form == "stacked":
            out = ops.kv_compact(k, v, old, acc, num_verified=nv, slots=sl)
        else:
            out = ops.kv_compact(list(k.unbind(0)), list(v.unbind(0)), old, acc, num_verified=nv, slots=sl)
        ref = kv_compact_reference(kr, vr, old, acc, num_verified=nv, slots=sl)
        assert torch.equal(out.new_lengths, ref[0])
        assert torch.equal(k, kr) and torch.equal(v, vr)
        # untouched: slots outside the batch, positions below old_length, positions >= old + max index
        others = torch.ones(slots, dtype=torch.bool)
        others[sl] = False
        assert torch.equal(k[:, others], k0[:, others]) and torch.equal(v[:, others], v0[:, others])
        for r in range(R):
            hi = int(old[r]) + int(acc[r].max().clamp(min=0)) + 1
            for a, b in ((k, k0), (v, v0)):
                assert torch.equal(a[:, sl[r], :, : int(old[r])], b[:, sl[r], :, : int(old[r])])
                assert torch.equal(a[:, sl[r], :, hi:], b[:, sl[r], :, hi:])
            kept = [int(x) for x in acc[r] if x >= 0]
            for j, a_ in enumerate(kept):  # the kept entries are the original ones, in order
                assert torch.equal(k[:, sl[r], :, int(old[r]) + j], k0[:, sl[r], :, int(old[r]) + a_])
            assert int(out.new_lengths[r]) == int(old[r]) + len(kept)


@pytest.mark.parametrize("form", ["stacked", "list"])
def test_paged_matches_reference_and_freed_pages(form):
    g = torch.Generator().manual_seed(8)
    L, pages, P, H, D = 2, 40, 4, 3, 8
    for _trial in range(6):
        k = torch.randn(L, pages, P, H, D, generator=g)
        v = torch.randn(L, pages, P, H, D, generator=g)
        R, per_req = 4, 6
        bt = torch.randperm(pages, generator=g)[: R * per_req].view(R, per_req).int()
        cap = per_req * P
        old = torch.randint(0, cap - 6, (R,), generator=g)
        acc, nv = random_accepted(R, 7, old, cap, g)
        k0, v0 = k.clone(), v.clone()
        kr, vr = k.clone(), v.clone()
        kk, vv = (k, v) if form == "stacked" else (list(k.unbind(0)), list(v.unbind(0)))
        out = ops.kv_compact(kk, vv, old, acc, num_verified=nv, block_table=bt)
        ref = kv_compact_reference(kr, vr, old, acc, num_verified=nv, block_table=bt)
        for a, b in zip(out, ref, strict=True):
            assert torch.equal(a, b)
        assert torch.equal(k, kr) and torch.equal(v, vr)
        unused = torch.ones(pages, dtype=torch.bool)
        unused[bt.flatten().long()] = False
        assert torch.equal(k[:, unused], k0[:, unused]) and torch.equal(v[:, unused], v0[:, unused])
        for r in range(R):
            new, end = int(out.new_lengths[r]), int(old[r]) + int(nv[r])
            assert int(out.free_from[r]) == -(-new // P)
            assert int(out.num_freed[r]) == max(0, -(-end // P) - -(-new // P))


def test_chain_idempotent_and_length_only_path():
    g = torch.Generator().manual_seed(9)
    k = torch.randn(2, 4, 2, 16, 4, generator=g)
    v = torch.randn_like(k)
    k0, v0 = k.clone(), v.clone()
    old = torch.tensor([0, 3, 7, 10])
    num_acc = torch.tensor([2, 0, 4, 5])
    acc = torch.full((4, 6), -1, dtype=torch.int64)
    for r in range(4):
        acc[r, : int(num_acc[r]) + 1] = torch.arange(int(num_acc[r]) + 1)
    out1 = ops.kv_compact(k, v, old, acc)
    out2 = ops.kv_compact(k, v, old, acc)
    assert torch.equal(k, k0) and torch.equal(v, v0)  # nothing moves for a chain
    assert torch.equal(out1.new_lengths, out2.new_lengths)
    assert torch.equal(out1.new_lengths, ops.kv_commit_chain(old, num_acc))


def test_feeds_from_verify_tree():
    """verify_tree's path goes straight into kv_compact; the kept entries are the path's nodes."""
    g = torch.Generator().manual_seed(10)
    V, n = 16, 9
    par = torch.tensor([-1, 0, 0, 1, 1, 2, 3, 3, 6])
    tl = torch.randn(n, V, generator=g)
    toks = torch.randint(0, V, (n,), generator=g)
    toks[1] = tl[0].argmax()
    toks[3] = tl[1].argmax()
    tv = ops.verify_tree(tl, torch.tensor([0, n]), par, toks)
    assert tv.num_accepted.item() >= 2
    k = torch.randn(1, 1, 1, 32, 4, generator=g)
    k0 = k.clone()
    old = torch.tensor([5])
    out = ops.kv_compact(k, None, old, tv.path, num_verified=torch.tensor([n]))
    path = [int(x) for x in tv.path[0] if x >= 0]
    assert int(out.new_lengths) == 5 + len(path)
    for j, a in enumerate(path):
        assert torch.equal(k[0, 0, 0, 5 + j], k0[0, 0, 0, 5 + a])


def test_hostile_input_errors_and_leaves_cache_untouched():
    k = torch.randn(2, 3, 2, 8, 4)
    v = torch.randn_like(k)
    k0 = k.clone()
    old = torch.tensor([2, 3])
    cases = [
        (torch.tensor([[0, 2, 1], [0, -1, -1]]), {}, "accepted"),  # not increasing
        (torch.tensor([[0, 0, -1], [0, -1, -1]]), {}, "accepted"),  # duplicate
        (torch.tensor([[0, 6, -1], [0, -1, -1]]), {}, "accepted"),  # beyond capacity (2 + 6 = 8)
        (torch.tensor([[0, 3, -1], [0, -1, -1]]), dict(num_verified=torch.tensor([3, 3])), "num_verified"),
        (torch.tensor([[0, 1, -1], [0, -1, -1]]), dict(slots=torch.tensor([1, 1])), "slots"),
        (torch.tensor([[0, 1, -1], [0, -1, -1]]), dict(slots=torch.tensor([0, 3])), "slots"),
    ]
    for acc, kw, what in cases:
        with pytest.raises(RuntimeError, match=what):
            ops.kv_compact(k, v, old, acc, **kw)
        with pytest.raises(ValueError):
            kv_compact_reference(k.clone(), v.clone(), old, acc, **kw)
        assert torch.equal(k, k0)
    with pytest.raises(RuntimeError, match="old_lengths"):
        ops.kv_compact(k, v, torch.tensor([9, 0]), torch.tensor([[0], [0]]))
    with pytest.raises(RuntimeError, match="old_lengths"):
        ops.kv_compact(k, v, torch.tensor([-1, 0]), torch.tensor([[0], [0]]))
    # paged: a block-table entry outside the pool
    kp = torch.randn(1, 5, 4, 2, 4)
    bt = torch.tensor([[0, 1, 9]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="block_table"):
        ops.kv_compact(kp, None, torch.tensor([6]), torch.tensor([[0, 3]]), block_table=bt)
    # layout/argument errors name the argument
    with pytest.raises((RuntimeError, TypeError), match="accepted"):
        ops.kv_compact(k, v, old, torch.tensor([[0, 1]], dtype=torch.int64))
    with pytest.raises((RuntimeError, TypeError), match="v_cache"):
        ops.kv_compact(k, v[:, :2], old, torch.tensor([[0], [0]]))
    with pytest.raises((RuntimeError, TypeError), match="old_lengths"):
        ops.kv_compact(k, v, old.int(), torch.tensor([[0], [0]]))
    # an empty list of indices keeps nothing; an empty batch is a no-op
    out = ops.kv_compact(k, v, old, torch.full((2, 2), -1, dtype=torch.int64))
    assert out.new_lengths.tolist() == [2, 3]
    out = ops.kv_compact(k, v, old, torch.zeros(2, 0, dtype=torch.int64))
    assert out.new_lengths.tolist() == [2, 3] and torch.equal(k, k0)
    out = ops.kv_compact(k, v, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 3, dtype=torch.int64))
    assert out.new_lengths.numel() == 0


def test_opcheck():
    k = torch.randn(2, 3, 2, 8, 4)
    v = torch.randn_like(k)
    args = ([k], [v], torch.tensor([1, 2]), torch.tensor([[0, 2, 3], [0, 1, -1]]), None, None, None)
    torch.library.opcheck(torch.ops.dspark.kv_compact.default, args)


@pytest.mark.cuda
@pytest.mark.parametrize("paged", [False, True])
def test_cuda_matches_cpu(paged):
    g = torch.Generator().manual_seed(12)
    L, H, D = 4, 3, 64
    if paged:
        pages, P, R, per = 64, 8, 6, 8
        k = torch.randn(L, pages, P, H, D, generator=g).bfloat16()
        bt = torch.randperm(pages, generator=g)[: R * per].view(R, per).int()
        cap, kw = per * P, dict(block_table=bt)
    else:
        R, S = 6, 40
        k = torch.randn(L, 8, H, S, D, generator=g).bfloat16()
        cap, kw = S, dict(slots=torch.randperm(8, generator=g)[:R])
    v = torch.randn(k.shape, generator=g).bfloat16()
    old = torch.randint(0, cap - 12, (R,), generator=g)
    acc, nv = random_accepted(R, 10, old, cap, g)
    kc, vc = k.clone(), v.clone()
    out = ops.kv_compact(kc, vc, old, acc, num_verified=nv, **kw)
    kg, vg = k.cuda(), v.cuda()
    outg = ops.kv_compact(
        kg, vg, old.cuda(), acc.cuda(), num_verified=nv.cuda(), **{a: b.cuda() for a, b in kw.items()}
    )
    for a, b in zip(out, outg, strict=True):
        assert torch.equal(a, b.cpu())
    assert torch.equal(kc, kg.cpu()) and torch.equal(vc, vg.cpu())
    # invalid request on CUDA: untouched, new length -1
    bad = acc.clone()
    bad[0, :3] = torch.tensor([0, 2, 1])
    outg = ops.kv_compact(kg, vg, old.cuda(), bad.cuda(), **{a: b.cuda() for a, b in kw.items()})
    assert int(outg.new_lengths[0]) == -1


def test_c_api_program(tmp_path):
    """tests/c/test_tree_kv_c_api.c links only libdspark_core: the C API works without torch."""
    import os
    import shutil
    import subprocess

    from dspark_native._native import get_include, load_library

    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    lib_dir = os.path.dirname(str(load_library()))
    for cand in (lib_dir, os.path.join(lib_dir, "lib")):
        if os.path.exists(os.path.join(cand, "libdspark_core.so")):
            lib_dir = cand
            break
    else:
        pytest.skip("libdspark_core.so not found next to the loaded extension")
    if cc is None:
        pytest.skip("no C compiler")
    src = os.path.join(os.path.dirname(__file__), "c", "test_tree_kv_c_api.c")
    exe = tmp_path / "test_tree_kv_c_api"
    subprocess.run(
        [
            cc,
            "-std=c99",
            "-O1",
            "-I",
            get_include(),
            src,
            "-L",
            lib_dir,
            "-ldspark_core",
            f"-Wl,-rpath,{lib_dir}",
            "-o",
            str(exe),
        ],
        check=True,
    )
    res = subprocess.run([str(exe)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
