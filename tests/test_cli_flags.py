"""Every flag of the model commands either changes what the command does or is refused with a
clear message: --device, --dtype, --target FILE.gguf, --system, prompts from standard input,
--stop; calibrate and eval refuse the policy flags they cannot honour (and eval --temperature);
generate builds the plain engine only for the baseline; train's default prompts come from the
working directory or $DSPARK_TRAIN_PROMPTS, never from where the package lives."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch

from cli_helpers import make_cli_dirs, run_cli

from dspark_native import runtime
from dspark_native.models.tokenizer import ChatTemplate

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    root = tmp_path_factory.mktemp("flags")
    out = make_cli_dirs(root)
    chat = root / "chat_target"
    chat.mkdir()
    for f in os.listdir(out["target"]):
        (chat / f).write_bytes((root / "target" / f).read_bytes())
    (chat / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    out["chat"] = str(chat)
    return out


def _err(rc, err, *needles):
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def _gen(capsys, d, *extra, prompt="w1 w2 w3", js=None, target=None):
    args = [
        "generate",
        prompt,
        "--target",
        target or d["target"],
        "--drafter",
        d["drafter"],
        "--max-new-tokens",
        "12",
        *extra,
    ]
    if js is not None:
        args += ["--json", js]
    return run_cli(capsys, *args)


# ------------------------------------------------------------------------------------------------
# --device, --dtype
# ------------------------------------------------------------------------------------------------


def test_generate_device_and_dtype_reach_the_model(d, capsys, tmp_path):
    js = tmp_path / "g.json"
    base = None
    for dtype in ("float32", "float16", "bfloat16"):
        rc, out, err = _gen(capsys, d, "--device", "cpu", "--dtype", dtype, js=js)
        assert rc == 0, err
        res = json.load(open(js))
        assert res["summary"]["dtype"] == dtype and res["summary"]["device"] == "cpu"
        assert all(o["identical_to_plain"] for o in res["outputs"])
        base = base or res
    if not torch.cuda.is_available():
        _err(*_gen(capsys, d, "--device", "cuda")[::2], "--device", "CUDA is not available")
    _err(*_gen(capsys, d, "--device", "cuda:99")[::2], "--device")
    _err(*_gen(capsys, d, "--device", "tpu")[::2], "--device", "cpu, cuda")


@pytest.mark.parametrize("cmd", ["bench", "eval", "calibrate", "profile-sps", "train"])
def test_every_model_command_takes_device_and_float16(cmd, d, capsys, tmp_path):
    pre = {
        "bench": [d["prompts"]],
        "eval": [d["prompts"]],
        "calibrate": [d["prompts"]],
        "profile-sps": [],
        "train": ["--prompts", d["prompts"], "--out", tmp_path / "run", "--data-dir", tmp_path / "data"],
    }[cmd]
    rc, out, err = run_cli(capsys, cmd, *pre, "--target", d["target"], "--device", "gpu0")
    _err(rc, err, "--device")
    if cmd == "profile-sps":  # and it runs with them: the table records where it was measured
        sps = tmp_path / "sps.json"
        rc, out, err = run_cli(
            capsys,
            cmd,
            "--target",
            d["target"],
            "--device",
            "cpu",
            "--dtype",
            "float16",
            "--max-tokens",
            "4",
            "--context",
            "4",
            "--repeats",
            "1",
            "--out",
            sps,
        )
        assert rc == 0, err
        assert len(json.load(open(sps))["sps"]) == 4
    if cmd == "bench":
        res = tmp_path / "b.json"
        rc, out, err = run_cli(
            capsys,
            cmd,
            d["prompts"],
            "--target",
            d["target"],
            "--drafter",
            d["drafter"],
            "--dtype",
            "float16",
            "--limit",
            "1",
            "--max-new-tokens",
            "4",
            "--out",
            res,
        )
        assert rc == 0, err
        r = json.load(open(res))
        assert r["dtype"] == "float16" and r["device"] == "cpu" and r["domains"][0]["identical_greedy"]


# ------------------------------------------------------------------------------------------------
# --target FILE.gguf
# ------------------------------------------------------------------------------------------------


def test_target_must_be_a_directory_or_a_gguf_file(d, capsys, tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"not a model")
    _err(*_gen(capsys, d, target=str(f))[::2], "--target", "GGUF")
    _err(*_gen(capsys, d, target=str(tmp_path / "missing.gguf"))[::2], "--target", "not a directory or a .gguf")


@pytest.mark.slow
def test_target_gguf_file_gives_the_embedded_models_output(capsys, tmp_path):
    """The SmolLM2 GGUF loaded directly (--target FILE.gguf) answers token for token like the
    embedded model (converted from the same file)."""
    from dspark_native.models.embedded import find_smollm2_gguf

    try:
        gguf = find_smollm2_gguf()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    outs = []
    for target in ([], ["--target", gguf]):
        js = tmp_path / f"g{len(outs)}.json"
        rc, out, err = run_cli(
            capsys,
            "generate",
            "What is 2 + 2?",
            *target,
            "--max-new-tokens",
            "8",
            "--no-baseline",
            "--threads",
            "1",
            "--json",
            js,
        )
        assert rc == 0, err
        outs.append(json.load(open(js))["outputs"][0])
    assert outs[1]["tokens"] == outs[0]["tokens"] and len(outs[0]["tokens"]) > 0
    assert outs[1]["prompt_tokens"] == outs[0]["prompt_tokens"]  # same chat template from the GGUF


# ------------------------------------------------------------------------------------------------
# --system, standard input, --stop
# ------------------------------------------------------------------------------------------------


def test_system_message_goes_through_the_chat_template(d, capsys, tmp_path):
    tok_dir = d["chat"]
    t = runtime.load_chat_target(tok_dir)
    assert isinstance(t.chat_template, ChatTemplate)
    with_sys = t.chat_template.render([{"role": "system", "content": "w9 w8"}, {"role": "user", "content": "w1"}])
    assert t.encode("w1", "w9 w8") == t.tokenizer.encode(with_sys, add_special_tokens=False).ids
    js = tmp_path / "s.json"
    counts = []
    for extra in ([], ["--system", "w9 w8 w7 w6"]):
        rc, out, err = _gen(capsys, d, *extra, js=js, target=tok_dir)
        assert rc == 0, err
        counts.append(json.load(open(js))["outputs"][0]["prompt_tokens"])
    assert counts[1] > counts[0]
    # a target without a chat template has nowhere to put it
    _err(*_gen(capsys, d, "--system", "w9")[::2], "--system", "chat template")


def test_prompts_from_standard_input(d, capsys, tmp_path, monkeypatch):
    js = tmp_path / "in.json"
    monkeypatch.setattr("sys.stdin", io.StringIO("w4 w5 w6\n"))
    rc, out, err = _gen(capsys, d, prompt="-", js=js)
    assert rc == 0, err
    assert json.load(open(js))["outputs"][0]["prompt"] == "w4 w5 w6\n"
    monkeypatch.setattr("sys.stdin", io.StringIO('{"turns": ["w1 w2"]}\n{"turns": ["w3"]}\n'))
    rc, out, err = run_cli(
        capsys,
        "generate",
        "--prompts",
        "-",
        "--target",
        d["target"],
        "--drafter",
        d["drafter"],
        "--max-new-tokens",
        "4",
        "--json",
        js,
    )
    assert rc == 0, err
    assert [o["prompt"] for o in json.load(open(js))["outputs"]] == ["w1 w2", "w3"]
    monkeypatch.setattr("sys.stdin", io.StringIO('{"turns": ["w7 w8"]}\n'))
    res = tmp_path / "b.json"
    rc, out, err = run_cli(
        capsys, "bench", "-", "--target", d["target"], "--drafter", d["drafter"], "--max-new-tokens", "4", "--out", res
    )
    assert rc == 0, err
    assert [x["domain"] for x in json.load(open(res))["domains"]] == ["stdin"]
    monkeypatch.setattr("sys.stdin", io.StringIO('{"turns": ["w7 w8"]}\n'))
    _err(*run_cli(capsys, "bench", "-", "-", "--target", d["target"])[::2], "standard input", "once")


def test_stop_strings_end_the_answer_identically_in_both_engines(d, capsys, tmp_path):
    js = tmp_path / "stop.json"
    rc, out, err = _gen(capsys, d, js=js)
    assert rc == 0, err
    full = json.load(open(js))["outputs"][0]
    words = full["answer"].split()
    assert len(words) >= 6 and len(set(words[:6])) == 6
    stop = f"{words[3]} {words[4]}"
    tok = runtime.load_chat_target(d["target"]).tokenizer
    keep = next(n for n in range(1, len(full["tokens"]) + 1) if stop in tok.decode(full["tokens"][:n]))
    rc, out, err = _gen(capsys, d, "--stop", stop, "--stop", "never-seen", js=js)
    assert rc == 0, err
    o = json.load(open(js))["outputs"][0]
    assert o["answer"] == full["answer"][: full["answer"].index(stop)]
    assert o["tokens"] == full["tokens"][:keep] and o["finish_reason"] == "stop" and o["identical_to_plain"]
    assert out.splitlines()[0] == o["answer"]  # the streamed answer stops there too
    _err(*_gen(capsys, d, "--stop", "")[::2], "--stop")


def test_generate_builds_the_plain_engine_only_for_the_baseline(d, capsys, monkeypatch):
    calls = []
    real = runtime.build_plain_engine
    monkeypatch.setattr(runtime, "build_plain_engine", lambda *a, **k: calls.append(1) or real(*a, **k))
    rc, out, err = _gen(capsys, d, "--no-baseline")
    assert rc == 0 and calls == [] and "speedup" not in out
    rc, out, err = _gen(capsys, d)
    assert rc == 0 and calls == [1] and "speedup" in out


def test_generate_refuses_flags_its_policy_does_not_read(d, capsys, tmp_path):
    sts = tmp_path / "sts.json"
    sts.write_text(json.dumps({"sts_temperature": [1.0] * 5}))
    _err(*_gen(capsys, d, "--threshold", "0.3")[::2], "--threshold", "--policy threshold")
    _err(*_gen(capsys, d, "--sps", str(sts), "--policy", "static")[::2], "--sps", "causal")
    _err(*_gen(capsys, d, "--sts", str(sts), "--policy", "static")[::2], "--sts", "static")
    # without --policy the causal scheduler runs (it reads --sts; an SPS table is profiled and cached)
    rc, out, err = _gen(capsys, d, "--sts", str(sts))
    assert rc == 0 and "policy causal" in err, err
    rc, out, err = _gen(capsys, d, "--sts", str(sts), "--policy", "threshold", "--threshold", "0.3")
    assert rc == 0, err


# ------------------------------------------------------------------------------------------------
# calibrate and eval: the flags they cannot honour are refused, the others work
# ------------------------------------------------------------------------------------------------


def test_calibrate_flags(d, capsys, tmp_path):
    T = [d["prompts"], "--target", d["target"], "--drafter", d["drafter"], "--max-new-tokens", "16"]
    sts = tmp_path / "sts.json"
    sts.write_text(json.dumps({"sts_temperature": [1.0] * 5}))
    for flag, value, needle in (
        ("--policy", "threshold", "static policy"),
        ("--policy", "causal", "censor"),
        ("--sps", str(sts), "SPS"),
        ("--threshold", "0.3", "threshold"),
        ("--sts", str(sts), "raw confidences"),
        ("--num-drafts", "3", "block is 5"),
    ):
        _err(*run_cli(capsys, "calibrate", *T, flag, value, "--out", tmp_path / "x.json")[::2], flag, needle)
    assert not (tmp_path / "x.json").exists()
    res = {}
    for extra in ([], ["--num-drafts", "5"], ["--temperature", "30"], ["--max-new-tokens", "6"]):
        out_path = tmp_path / f"c{len(res)}.json"
        rc, out, err = run_cli(capsys, "calibrate", *T, *extra, "--out", out_path)
        assert rc == 0, err
        res[" ".join(extra)] = json.load(open(out_path))
    assert res["--num-drafts 5"] == res[""]  # the block itself: accepted, same fit
    assert res["--temperature 30"] != res[""]  # sampled decoding gives other rounds (the tiny target is peaked)
    assert res["--max-new-tokens 6"]["rounds"] < res[""]["rounds"]


def test_eval_flags(d, capsys, tmp_path):
    T = [d["prompts"], "--target", d["target"], "--drafter", d["drafter"], "--max-new-tokens", "8", "--limit", "2"]
    for flag, value, needle in (
        ("--policy", "async", "bench"),
        ("--sps", d["prompts"], "SPS"),
        ("--threshold", "0.3", "threshold"),
        ("--temperature", "1", "--temperatures"),
    ):
        _err(*run_cli(capsys, "eval", *T, flag, value, "--out", tmp_path / "x.json")[::2], flag, needle)
    out_path = tmp_path / "e.json"
    rc, out, err = run_cli(capsys, "eval", *T, "--num-drafts", "3", "--temperatures", "0", "--out", out_path)
    assert rc == 0, err
    r = json.load(open(out_path))
    assert r["num_drafts"] == 3 and set(r["temperatures"]) == {"0"}
    assert len(r["temperatures"]["0"]["overall"]["cond_accept"]) == 3


# ------------------------------------------------------------------------------------------------
# train: where the default prompts come from
# ------------------------------------------------------------------------------------------------


def test_train_default_prompts_come_from_the_working_directory(d, capsys, tmp_path, monkeypatch):
    train = [
        "train",
        "--target",
        d["target"],
        "--steps",
        "1",
        "--layers",
        "1",
        "--markov-rank",
        "4",
        "--block-size",
        "3",
        "--answer-tokens",
        "4",
        "--data-batch",
        "2",
        "--max-sequences",
        "2",
        "--anchors",
        "1",
        "--batch-sequences",
        "1",
        "--save-every",
        "1",
    ]
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    monkeypatch.delenv("DSPARK_TRAIN_PROMPTS", raising=False)
    rc, out, err = run_cli(capsys, *train, "--out", tmp_path / "r0", "--data-dir", tmp_path / "d0")
    _err(rc, err, "no --prompts", "DSPARK_TRAIN_PROMPTS")
    shared = tmp_path / "shared" / "data" / "prompts" / "train"
    shared.mkdir(parents=True)
    (shared / "a.jsonl").write_text('{"turns": ["w1 w2 w3"]}\n{"turns": ["w4 w5"]}\n')
    rc, out, err = run_cli(capsys, *train, "--out", tmp_path / "r1", "--data-dir", tmp_path / "d1")
    assert rc == 0, err
    assert "training data: 2 sequences" in err
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "b.jsonl").write_text('{"turns": ["w6 w7 w8"]}\n')
    monkeypatch.setenv("DSPARK_TRAIN_PROMPTS", str(other))
    rc, out, err = run_cli(capsys, *train, "--out", tmp_path / "r2", "--data-dir", tmp_path / "d2")
    assert rc == 0, err
    assert "training data: 1 sequences" in err
    _err(
        *run_cli(capsys, *train, "--prompts", "-", "--out", tmp_path / "r3", "--data-dir", tmp_path / "d3")[::2],
        "--prompts -",
        "files",
    )
