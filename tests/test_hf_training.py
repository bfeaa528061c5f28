"""Drafter training on a transformers target: a tiny Gemma 3 model (no native implementation),
data built from its own greedy answers and features, a few DSpark steps reduce the loss, the
checkpoint loads back onto the target and decodes losslessly; and ``dspark-native train
--backend transformers`` end to end."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from hf_helpers import write_hf_model  # noqa: E402

from dspark_native.engine import Engine, SamplingParams  # noqa: E402
from dspark_native.models import load_drafter, load_target  # noqa: E402
from dspark_native.models.hf_target import TransformersTarget  # noqa: E402
from dspark_native.training.data import DataConfig, build_training_data, load_training_data  # noqa: E402
from dspark_native.training.trainer import TrainConfig, batch_for_step, new_drafter, step_loss, train  # noqa: E402

LAYERS = [0, 1, 2, 3]


@pytest.fixture(autouse=True, scope="module")
def _quiet_one_thread():
    from transformers.utils import logging as hf_logging

    n, level = torch.get_num_threads(), hf_logging.get_verbosity()
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    yield
    torch.set_num_threads(n)
    hf_logging.set_verbosity(level)
    hf_logging.enable_progress_bar()


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    d = write_hf_model(str(tmp_path_factory.mktemp("gemma")), "gemma3", seed=2, bigram=1.5, V=96)
    return d, load_target(d)


def _prompts(path, n=8):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"turns": [f"w{i} w{i + 3} w{(i * 7) % 20}"]}) + "\n")
    return str(path)


def _encode(text):
    return [1 + (sum(map(ord, w)) * 13) % 90 for w in text.split()]


@pytest.fixture(scope="module")
def data(gemma, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gdata")
    cfg = DataConfig(
        files=[_prompts(tmp / "p.jsonl")],
        limit_per_file=8,
        max_prompt_tokens=16,
        max_new_tokens=16,
        batch=4,
        sequences_per_shard=4,
        topk=8,
        target_layer_ids=LAYERS,
    )
    build_training_data(gemma[1], _encode, [], cfg, str(tmp / "d"), progress=False)
    return load_training_data(str(tmp / "d"))


def test_data_rows_are_the_transformers_targets(gemma, data):
    target = gemma[1]
    assert isinstance(target, TransformersTarget)
    o, n = int(data.offsets[3]), int(data.offsets[4] - data.offsets[3])
    seq = data.tokens[o : o + n]
    with torch.no_grad():
        out = target.hf(seq[None], output_hidden_states=True, use_cache=False)
    torch.testing.assert_close(
        data.features[o : o + n, :32].float(), out.hidden_states[1][0].to(torch.bfloat16).float()
    )
    a = int(data.answer_start[3])
    assert seq[a:].tolist() == out.logits[0, a - 1 : -1].argmax(-1).tolist()  # its own greedy answer


def test_gemma_drafter_trains_and_loads_back(gemma, data, tmp_path):
    target = gemma[1]
    cfg = TrainConfig(
        kind="dspark",
        num_layers=1,
        markov_rank=8,
        block_size=4,
        steps=30,
        batch_sequences=4,
        anchors_per_sequence=4,
        lr=3e-3,
        save_every=100,
        log_every=100,
    )
    fixed = batch_for_step(data, cfg, 10_000)
    d0 = new_drafter(target, cfg, LAYERS)
    # Gemma's final norm scales by 1 + weight: the drafter starts from that effective scale
    torch.testing.assert_close(d0.norm.weight, 1.0 + target.norm.weight.float(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        before = step_loss(d0, "dspark", fixed)[0].item()
    d = train(target, data, cfg, str(tmp_path), target_layer_ids=LAYERS, progress=False)
    with torch.no_grad():
        after = step_loss(d, "dspark", fixed)[0].item()
    assert after < 0.8 * before, (before, after)
    loaded = load_drafter(str(tmp_path / "final"), target=target, dtype=torch.float32)
    assert loaded.embed_tokens.weight is target.embed_tokens.weight
    for k, v in d.state_dict().items():
        want = v if k in loaded.shared_keys else v.to(torch.bfloat16).float()
        torch.testing.assert_close(loaded.state_dict()[k], want, atol=0, rtol=0, msg=k)
    prompts = [[1, 2, 3], [40, 41]]
    plain = Engine(target, None, max_batch=2, max_seq=40).generate(prompts, SamplingParams(max_new_tokens=16))
    spec = Engine(target, loaded, max_batch=2, max_seq=40).generate(prompts, SamplingParams(max_new_tokens=16))
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]


def test_cli_train_with_transformers_backend(gemma, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from dspark_native import cli

    tdir = gemma[0]
    words = ["[UNK]"] + [f"w{i}" for i in range(95)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(tdir, "tokenizer.json"))
    with open(os.path.join(tdir, "tokenizer_config.json"), "w") as f:
        json.dump({}, f)
    run = tmp_path / "run"
    args = [
        "train",
        "--target",
        tdir,
        "--backend",
        "transformers",
        "--prompts",
        _prompts(tmp_path / "p.jsonl", 4),
        "--data-dir",
        str(tmp_path / "data"),
        "--out",
        str(run),
        "--steps",
        "3",
        "--layers",
        "1",
        "--markov-rank",
        "8",
        "--block-size",
        "4",
        "--answer-tokens",
        "6",
        "--data-batch",
        "2",
        "--anchors",
        "2",
        "--batch-sequences",
        "2",
    ]
    assert cli.main(args) == 0, capsys.readouterr().err
    assert (run / "final" / "model.safetensors").exists()
    cfg = json.load(open(run / "final" / "config.json"))
    assert cfg["architectures"] == ["LlamaDSparkModel"] and cfg["dspark_target_architecture"] == "Gemma3ForCausalLM"
    rc = cli.main(["generate", "w1 w2", "--target", tdir, "--drafter", str(run / "final"), "--max-new-tokens", "6"])
    assert rc == 0, capsys.readouterr().err
