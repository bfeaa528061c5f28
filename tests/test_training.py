"""Drafter training and evaluation: losses against hand-computed values, optimisation on a tiny
random target, checkpoint round trip, resume, data build/resume, evaluation metrics."""

import dataclasses
import json
import math

import pytest
import torch

from models_helpers import random_tensors, target_raw_config, target_shapes

from dspark_native.models import build_target, load_drafter
from dspark_native.models.config import ModelConfig
from dspark_native.training.data import (
    DataConfig,
    build_training_data,
    concat_training_data,
    load_training_data,
    select_prompts,
)
from dspark_native.training.evaluate import round_metrics
from dspark_native.training.losses import cosine_lr, dspark_loss, l1_to_target, position_weights
from dspark_native.training.trainer import TrainConfig, batch_for_step, new_drafter, step_loss, train

# ----------------------------------------------------------------------------- losses


def test_dspark_loss_matches_hand_computation():
    # Two rows, V = 3, K = V (exact L1). Row 0 at block position 0, row 1 at position 2.
    z = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    pos = torch.tensor([0, 2])
    valid = torch.tensor([True, True])
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    ids = torch.tensor([[0, 1, 2], [2, 0, 1]])
    probs = p.gather(1, ids)
    conf = torch.tensor([0.0, 1.0])
    loss, st = dspark_loss(z, labels, pos, valid, ids, probs, conf)
    # by hand
    e = [[math.exp(2), 1.0, math.exp(-1)], [1.0, math.e, 1.0]]
    q = [[x / sum(r) for x in r] for r in e]
    ce = [-math.log(q[0][0]), -math.log(q[1][2])]
    l1 = [sum(abs(q[i][v] - p[i, v].item()) for v in range(3)) for i in range(2)]
    tgt = [min(1.0, max(0.0, 1 - x / 2)) for x in l1]
    sig = [0.5, 1 / (1 + math.exp(-1))]
    bce = [-(t * math.log(s) + (1 - t) * math.log(1 - s)) for t, s in zip(tgt, sig, strict=True)]
    w = [1.0, math.exp(-0.5)]
    wm = lambda xs: (xs[0] * w[0] + xs[1] * w[1]) / (w[0] + w[1])  # noqa: E731
    want = 0.1 * wm(ce) + 0.9 * wm(l1) + 1.0 * wm(bce)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert st["ce"] == pytest.approx(wm(ce), rel=1e-5)
    assert st["l1"] == pytest.approx(wm(l1), rel=1e-5)
    assert st["bce"] == pytest.approx(wm(bce), rel=1e-5)
    # an invalid row contributes nothing, whatever its values
    loss2, _ = dspark_loss(
        torch.cat([z, torch.randn(1, 3) * 9]),
        torch.tensor([0, 2, 1]),
        torch.tensor([0, 2, 1]),
        torch.tensor([True, True, False]),
        torch.cat([ids, ids[:1]]),
        torch.cat([probs, probs[:1]]),
        torch.cat([conf, torch.tensor([5.0])]),
    )
    assert loss2.item() == pytest.approx(want, rel=1e-5)


def test_l1_with_truncated_target():
    q = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    # target (0.6, 0.2, 0.15, 0.05) stored as its top-2: ids (0, 1), rest 0.2 in one mass
    got = l1_to_target(q, torch.tensor([[0, 1]]), torch.tensor([[0.6, 0.2]]))
    # |0.4-0.6| + |0.3-0.2| + |(0.2+0.1) - (0.15+0.05)| = 0.2 + 0.1 + 0.1
    assert got.item() == pytest.approx(0.4, abs=1e-6)
    full = l1_to_target(q, torch.tensor([[0, 1, 2, 3]]), torch.tensor([[0.6, 0.2, 0.15, 0.05]]))
    assert full.item() == pytest.approx(0.2 + 0.1 + 0.05 + 0.05, abs=1e-6)


def test_position_weights_and_schedule():
    assert position_weights(torch.arange(3)).tolist() == pytest.approx([1, math.exp(-0.25), math.exp(-0.5)])
    # 100 steps, 4 % warm-up: 4 linear steps then cosine to 0
    assert cosine_lr(0, 100, 1.0) == pytest.approx(0.25)
    assert cosine_lr(3, 100, 1.0) == pytest.approx(1.0)
    assert cosine_lr(4, 100, 1.0) == pytest.approx(1.0)
    assert cosine_lr(52, 100, 1.0) == pytest.approx(0.5)
    assert cosine_lr(100, 100, 1.0) == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------- tiny target + data


@pytest.fixture(scope="module")
def tiny_target():
    raw = target_raw_config("LlamaForCausalLM", num_hidden_layers=6)
    cfg = ModelConfig.from_dict(raw)
    return build_target(cfg, random_tensors(target_shapes(raw), seed=3, scale=0.5))


def _prompt_file(tmp_path, n=8):
    path = tmp_path / "p.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"turns": [f"prompt {i} " + "ab" * (i % 3 + 1)]}) + "\n")
        f.write("not json\n")
    return str(path)


def _encode(text):
    return [(ord(c) * 7) % 90 + 1 for c in text]


def _data_cfg(files, **kw):
    base = dict(
        files=files,
        limit_per_file=8,
        max_prompt_tokens=40,
        max_new_tokens=12,
        batch=4,
        sequences_per_shard=4,
        topk=8,
        target_layer_ids=[1, 2, 3, 4, 5],
    )
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def tiny_data(tiny_target, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data")
    files = [_prompt_file(tmp)]
    build_training_data(tiny_target, _encode, [], _data_cfg(files), str(tmp / "d"), progress=False)
    return load_training_data(str(tmp / "d"))


def test_data_rows_are_the_targets(tiny_target, tiny_data):
    """Rows captured while generating equal one prefill over prompt + answer (to the bf16 /
    fp16 storage rounding), the answer is the target's greedy continuation, and the prompt rows
    before the last carry no distribution."""
    d = tiny_data
    assert d.num_sequences == 8
    for i in (0, 5):
        o, n = int(d.offsets[i]), int(d.offsets[i + 1] - d.offsets[i])
        seq = d.tokens[o : o + n]
        a = int(d.answer_start[i])
        assert n > a
        cache = tiny_target.new_cache(1, n)
        logits, hid = tiny_target(seq, torch.tensor([0, n]), torch.tensor([0]), cache)
        torch.testing.assert_close(
            d.features[o : o + n].float(), hid.to(torch.bfloat16).float(), atol=2e-2, rtol=1.6e-2
        )
        p = torch.softmax(logits, -1)
        torch.testing.assert_close(
            d.topk_probs[o + a - 1 : o + n].float(), p[a - 1 :].topk(8, -1).values, atol=1e-3, rtol=1e-3
        )
        assert (d.topk_ids[o : o + a - 1] == -1).all() and (d.topk_probs[o : o + a - 1] == 0).all()
        assert seq[a:].tolist() == logits[a - 1 : -1].argmax(-1).tolist()


def test_generate_rows_stops_and_batches(tiny_target):
    """Sequences of one batch stop independently (stop token kept, max_new_tokens exact) and get
    the same rows as when generated alone."""
    from dspark_native.training.data import _generate_rows

    layers = list(tiny_target.config.target_layer_ids)
    tiny_target.set_target_layer_ids([1, 2])
    prompts = [[5, 9, 3, 7], [11, 2], [4, 4, 4, 8, 1, 6]]
    alone = [_generate_rows(tiny_target, [p], 6, [], 4) for p in prompts]
    stop = alone[1][0][0][2]  # the third token the second prompt answers with
    ans, feats, ids, probs = _generate_rows(tiny_target, prompts, 6, [stop], 4)
    off = 0
    for p, (a1, f1, i1, p1) in zip(prompts, alone, strict=True):
        a = a1[0]
        want = a[: a.index(stop) + 1] if stop in a else a
        got = ans[prompts.index(p)]
        assert got == want and len(got) <= 6
        n = len(p) + len(got)
        torch.testing.assert_close(feats[off : off + n].float(), f1[:n].float(), atol=2e-2, rtol=1.6e-2)
        assert torch.equal(ids[off : off + len(p) - 1], i1[: len(p) - 1])
        torch.testing.assert_close(probs[off : off + n].float(), p1[:n].float(), atol=2e-3, rtol=2e-3)
        off += n
    assert feats.shape[0] == ids.shape[0] == probs.shape[0] == off
    tiny_target.set_target_layer_ids(layers)


def test_data_build_resumes(tiny_target, tiny_data, tmp_path):
    files = [_prompt_file(tmp_path)]
    out = str(tmp_path / "d")
    m = build_training_data(tiny_target, _encode, [], _data_cfg(files), out, max_sequences=4, progress=False)
    assert len(m["shards"]) == 1
    m = build_training_data(tiny_target, _encode, [], _data_cfg(files), out, progress=False)
    assert len(m["shards"]) == 2
    again = load_training_data(out)
    assert torch.equal(again.tokens, tiny_data.tokens) and torch.equal(again.features, tiny_data.features)
    with pytest.raises(ValueError, match="another configuration"):
        build_training_data(tiny_target, _encode, [], _data_cfg(files, topk=4), out, progress=False)


def test_select_prompts_interleaves_and_filters(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"turns": [f"a{i}"]}) + "\n" for i in range(3)))
    b.write_text("".join(json.dumps({"turns": ["b" * (i * 30 + 1)]}) + "\n" for i in range(3)))
    got = select_prompts(_data_cfg([str(a), str(b)], sequences_per_shard=100, seed=0), _encode)
    doms = sorted(d for d, _ in got)
    assert doms == ["a", "a", "a", "b", "b"]  # b's 61-char prompt is longer than 40 tokens


def test_select_prompts_skips_an_earlier_builds_prompts(tmp_path):
    """skip_per_file drops what a build with (limit, max tokens) took: a second build with a
    longer token limit gets the long prompts the first one filtered out, and later short ones."""
    a = tmp_path / "a.jsonl"
    lens = [5, 50, 6, 7, 60, 8, 9]  # characters = tokens under _encode
    a.write_text("".join(json.dumps({"turns": [chr(97 + i) * n]}) + "\n" for i, n in enumerate(lens)))
    first = select_prompts(_data_cfg([str(a)], limit_per_file=3, sequences_per_shard=100), _encode)
    assert sorted(len(ids) for _, ids in first) == [5, 6, 7]
    second = _data_cfg([str(a)], limit_per_file=3, max_prompt_tokens=80, skip_per_file=3, skip_max_prompt_tokens=40)
    got = select_prompts(dataclasses.replace(second, sequences_per_shard=100), _encode)
    assert sorted(len(ids) for _, ids in got) == [8, 50, 60]
    assert not {tuple(i) for _, i in first} & {tuple(i) for _, i in got}


def test_training_data_from_several_directories(tiny_data):
    both = concat_training_data([tiny_data, tiny_data])
    n = tiny_data.num_sequences
    assert both.num_sequences == 2 * n and both.domains == tiny_data.domains * 2
    a, b = both.split(n)
    assert torch.equal(b.tokens, tiny_data.tokens) and torch.equal(b.features, tiny_data.features)
    assert torch.equal(b.offsets, tiny_data.offsets) and torch.equal(a.answer_start, tiny_data.answer_start)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", ["dspark", "dflash", "eagle3"])
def test_few_steps_reduce_the_loss(tiny_target, tiny_data, tmp_path, kind):
    cfg = TrainConfig(
        kind=kind,
        num_layers=1,
        markov_rank=8,
        block_size=4,
        steps=40,
        batch_sequences=4,
        anchors_per_sequence=4,
        lr=3e-3,
        save_every=100,
        log_every=100,
    )
    fixed = batch_for_step(tiny_data, cfg, 10_000)
    d0 = new_drafter(tiny_target, cfg, [1, 2, 3, 4, 5])
    with torch.no_grad():
        before = step_loss(d0, kind, fixed)[0].item()
    d = train(tiny_target, tiny_data, cfg, str(tmp_path / kind), target_layer_ids=[1, 2, 3, 4, 5], progress=False)
    with torch.no_grad():
        after = step_loss(d, kind, fixed)[0].item()
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("kind", ["dspark", "eagle3"])
def test_checkpoint_round_trips_through_loader(tiny_target, tiny_data, tmp_path, kind):
    cfg = TrainConfig(
        kind=kind,
        num_layers=1,
        markov_rank=8,
        block_size=4,
        steps=3,
        batch_sequences=2,
        anchors_per_sequence=2,
        save_every=100,
        log_every=100,
    )
    d = train(tiny_target, tiny_data, cfg, str(tmp_path), target_layer_ids=[1, 2, 3, 4, 5], progress=False)
    loaded = load_drafter(str(tmp_path / "final"), target=tiny_target, dtype=torch.float32)
    assert set(loaded.shared_keys) == {"embed_tokens.weight", "lm_head.weight"}
    sd, ld = d.state_dict(), loaded.state_dict()
    assert set(sd) == set(ld)
    for k in sd:  # trained weights are stored in bf16; the shared ones come from the target
        want = sd[k] if k in loaded.shared_keys else sd[k].to(torch.bfloat16).float()
        torch.testing.assert_close(ld[k], want, atol=0, rtol=0, msg=k)


def test_resume_continues_from_saved_step(tiny_target, tiny_data, tmp_path):
    cfg = TrainConfig(
        kind="dspark",
        num_layers=1,
        markov_rank=8,
        block_size=4,
        steps=8,
        batch_sequences=2,
        anchors_per_sequence=3,
        save_every=3,
        log_every=1,
    )
    full = train(tiny_target, tiny_data, cfg, str(tmp_path / "a"), target_layer_ids=[1, 2, 3, 4, 5], progress=False)
    # interrupted after 5 steps: the state on disk is from step 3, so steps 4..5 are redone
    train(
        tiny_target, tiny_data, cfg, str(tmp_path / "b"), target_layer_ids=[1, 2, 3, 4, 5], progress=False, stop_after=5
    )
    assert torch.load(tmp_path / "b" / "train_state.pt", weights_only=False)["step"] == 3
    assert not (tmp_path / "b" / "final").exists()
    resumed = train(tiny_target, tiny_data, cfg, str(tmp_path / "b"), target_layer_ids=[1, 2, 3, 4, 5], progress=False)
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, atol=0, rtol=0, msg=k)
    steps = [json.loads(x)["step"] for x in open(tmp_path / "b" / "log.jsonl")]
    assert steps[-1] == 8
    with pytest.raises(ValueError, match="another configuration"):
        train(
            tiny_target,
            tiny_data,
            TrainConfig(kind="dspark", steps=9, num_layers=1, markov_rank=8, block_size=4),
            str(tmp_path / "b"),
            target_layer_ids=[1, 2, 3, 4, 5],
            progress=False,
        )


def test_train_config_errors():
    with pytest.raises(ValueError, match="kind"):
        TrainConfig(kind="medusa").validate()
    with pytest.raises(ValueError, match="markov_rank"):
        TrainConfig(kind="dspark", markov_rank=0).validate()
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0).validate()


# ----------------------------------------------------------------------------- evaluation


def test_round_metrics_on_scripted_rounds():
    g = 3
    # (conf [R, g], verified lengths [R], accepted [R]) per round
    log = [
        (torch.tensor([[0.9, 0.8, 0.5], [0.6, 0.5, 0.5]]), torch.tensor([3, 3]), torch.tensor([3, 0])),
        (torch.tensor([[0.9, 0.9, 0.9]]), torch.tensor([3]), torch.tensor([1])),
        (torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([1]), torch.tensor([1])),
    ]
    m = round_metrics(log, g)
    assert m["rounds"] == 4
    assert m["tau"] == pytest.approx((4 + 1 + 2 + 2) / 4)
    # position 0: verified in all 4 rounds, accepted in 3; position 1: reached by the rounds with
    # L >= 2 verified and draft 0 accepted: rounds 1 (acc 3) and 3 (acc 1) -> 1 of 2; round 4
    # verified only 1 draft. Position 2: round 1 only, accepted.
    assert m["reached"] == [4, 2, 1]
    assert m["cond_accept"] == pytest.approx([0.75, 0.5, 1.0])
    assert m["confidence_rounds"] == 3
    c = m["confidence"]
    assert c[0]["reached"] == 3 and c[0]["cond_accept"] == pytest.approx(2 / 3)
    # prefix survival of position 0 is predicted by c0: (0.9 -> 1), (0.6 -> 0), (0.9 -> 1)
    assert c[0]["brier_cum"] == pytest.approx((0.01 + 0.36 + 0.01) / 3)
    # a round with nothing drafted (no confidences) changes tau but not the confidence metrics
    m3 = round_metrics(log + [(None, torch.tensor([0]), torch.tensor([0]))], g)
    assert m3["tau"] == pytest.approx((4 + 1 + 2 + 2 + 1) / 5)
    assert m3["confidence"][0]["brier_cum"] == pytest.approx(c[0]["brier_cum"])
    m2 = round_metrics(log, g, sts_temperature=[1.0, 1.0, 1.0])
    assert m2["confidence_sts"][0]["brier_cum"] == pytest.approx(c[0]["brier_cum"])
    with pytest.raises(ValueError, match="accepted more"):
        round_metrics([(None, torch.tensor([1]), torch.tensor([2]))], g)


# ----------------------------------------------------------------------------- draft vocabulary


def test_draft_vocab_from_data_picks_the_most_frequent_answer_tokens(tiny_data):
    from dspark_native.training.trainer import draft_vocab_from_data, vocab_coverage

    offs, starts = tiny_data.offsets.tolist(), tiny_data.answer_start.tolist()
    ans = torch.cat([tiny_data.tokens[o + a : e] for o, a, e in zip(offs, starts, offs[1:], strict=False)])
    V = 128
    counts = torch.bincount(ans, minlength=V)
    n = 5
    ids = draft_vocab_from_data(tiny_data, n, V)
    assert ids.tolist() == sorted(ids.tolist()) and ids.unique().numel() == n
    # every chosen token is at least as frequent as every token left out
    left = torch.ones(V, dtype=torch.bool)
    left[ids] = False
    assert int(counts[ids].min()) >= int(counts[left].max())
    assert vocab_coverage(tiny_data, ids) == pytest.approx(float(counts[ids].sum()) / ans.numel())
    assert vocab_coverage(tiny_data, torch.arange(V)) == 1.0
    with pytest.raises(ValueError, match="draft vocabulary size"):
        draft_vocab_from_data(tiny_data, 0, V)


def test_dspark_loss_ignores_labels_outside_the_draft_vocabulary():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 6, generator=g)
    pos = torch.zeros(4, dtype=torch.long)
    valid = torch.ones(4, dtype=torch.bool)
    tk = torch.tensor([[0, 1], [2, -1], [3, 4], [-1, 5]])
    tp = torch.tensor([[0.5, 0.3], [0.6, 0.2], [0.7, 0.1], [0.4, 0.4]])
    _, a = dspark_loss(z, torch.tensor([0, -1, 3, -1]), pos, valid, tk, tp)
    _, b = dspark_loss(z[[0, 2]], torch.tensor([0, 3]), pos[:2], valid[:2], tk[[0, 2]], tp[[0, 2]])
    assert a["ce"] == pytest.approx(b["ce"], rel=1e-6), "rows with label -1 carry no CE"
    # L1 counts a top-k token the drafter cannot hold (-1) as |0 - p|
    q = torch.softmax(z[1], -1)
    want = (q[2] - 0.6).abs() + 0.2 + (1 - q[2] - 0.2).abs()
    assert float(l1_to_target(torch.softmax(z, -1), tk, tp)[1]) == pytest.approx(float(want), rel=1e-5)


def test_training_with_a_draft_vocabulary_resumes_bit_exactly_and_loads(tiny_target, tiny_data, tmp_path):
    cfg = TrainConfig(
        kind="dspark",
        num_layers=1,
        markov_rank=8,
        block_size=4,
        steps=6,
        batch_sequences=2,
        anchors_per_sequence=3,
        save_every=3,
        log_every=1,
        draft_vocab=20,
        bf16=True,
        init_from_target=True,
    )
    kw = dict(target_layer_ids=[1, 2, 3, 4, 5], progress=False)
    full = train(tiny_target, tiny_data, cfg, str(tmp_path / "a"), **kw)
    assert full.config.draft_vocab_size == 20 and full.lm_head.weight.shape == (20, tiny_target.config.hidden_size)
    torch.testing.assert_close(full.lm_head.weight, tiny_target.lm_head.weight[full.draft_to_target])
    train(tiny_target, tiny_data, cfg, str(tmp_path / "b"), stop_after=4, **kw)
    resumed = train(tiny_target, tiny_data, cfg, str(tmp_path / "b"), **kw)
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, atol=0, rtol=0, msg=k)
    loaded = load_drafter(str(tmp_path / "a" / "final"), target=tiny_target, dtype=torch.float32)
    assert torch.equal(loaded.draft_to_target, full.draft_to_target)
    torch.testing.assert_close(loaded.lm_head.weight, full.lm_head.weight)


def test_init_from_a_saved_drafter_starts_from_its_weights(tiny_target, tiny_data, tmp_path):
    cfg = TrainConfig(
        kind="dspark", num_layers=1, markov_rank=8, block_size=4, steps=3, batch_sequences=2,
        anchors_per_sequence=3, save_every=3, draft_vocab=20,
    )  # fmt: skip
    kw = dict(target_layer_ids=[1, 2, 3, 4, 5], progress=False)
    train(tiny_target, tiny_data, cfg, str(tmp_path / "a"), **kw)
    src = load_drafter(str(tmp_path / "a" / "final"), target=tiny_target, dtype=torch.float32)
    warm = dataclasses.replace(cfg, init_from=str(tmp_path / "a" / "final"), steps=5)
    d = train(tiny_target, tiny_data, warm, str(tmp_path / "b"), stop_after=0, **kw)
    assert torch.equal(d.draft_to_target, src.draft_to_target)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(d.state_dict()[k], v, atol=0, rtol=0, msg=k)
    moved = train(tiny_target, tiny_data, warm, str(tmp_path / "b"), **kw)  # and it trains on from there
    assert not torch.equal(moved.layers[0].mlp.up_proj.weight, src.layers[0].mlp.up_proj.weight)
    for bad, field in ((dict(markov_rank=4), "markov_rank"), (dict(num_layers=2), "num_hidden_layers")):
        with pytest.raises(ValueError, match=field):
            train(tiny_target, tiny_data, dataclasses.replace(warm, **bad), str(tmp_path / field), **kw)
    with pytest.raises(ValueError, match="exclusive"):
        dataclasses.replace(warm, init_from_target=True).validate()


def test_init_from_target_copies_the_last_layers(tiny_target):
    cfg = TrainConfig(kind="dspark", num_layers=2, markov_rank=8, block_size=4, init_from_target=True)
    d = new_drafter(tiny_target, cfg, [1, 2, 3, 4, 5])
    for dl, tl in zip(d.layers, list(tiny_target.layers)[-2:], strict=True):
        for k, v in tl.state_dict().items():
            torch.testing.assert_close(dl.state_dict()[k], v.float(), atol=0, rtol=0, msg=k)


def test_dev_metrics_tau_is_one_plus_leading_hits(tiny_target, tiny_data):
    from dspark_native.training.trainer import dev_metrics

    cfg = TrainConfig(kind="dspark", num_layers=1, markov_rank=8, block_size=4, batch_sequences=2)
    d = new_drafter(tiny_target, cfg, [1, 2, 3, 4, 5])
    m = dev_metrics(d, cfg, tiny_data, batches=2)
    assert 1.0 <= m["tau"] <= 1.0 + cfg.block_size and m["blocks"] > 0
    assert len(m["acc"]) == cfg.block_size
    # an upper bound: tau - 1 <= sum of per-position accuracies
    assert m["tau"] - 1 <= sum(m["acc"]) + 1e-6
