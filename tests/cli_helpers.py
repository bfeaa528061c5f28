"""Files for command-line tests: a tiny target directory with a word-level tokenizer (words
w0..w62), a DSpark drafter aligned with it, and prompt files in the shared turns format."""

from __future__ import annotations

import json
import os
from pathlib import Path

from test_engine_helpers import tiny_drafter, tiny_target

from dspark_native import cli
from dspark_native.models import save_drafter, save_target

WORDS = ["[UNK]"] + [f"w{i}" for i in range(63)]


def make_cli_dirs(root: Path, block_size: int = 5) -> dict:
    """root/target (HF-style directory + tokenizer.json), root/drafter (DSpark, aligned so blocks
    get accepted), root/prompts.jsonl (5 prompts)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = tiny_target(64)
    tdir = str(root / "target")
    save_target(t, tdir)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(tdir, "tokenizer.json"))
    with open(os.path.join(tdir, "tokenizer_config.json"), "w") as f:
        json.dump({}, f)
    ddir = str(root / "drafter")
    save_drafter(tiny_drafter(t, "dspark", block_size=block_size, aligned=True), ddir, include_shared=True)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [f"w{i} w{i + 3} w{i + 7}"]}) + "\n" for i in range(5)))
    return dict(root=root, target=tdir, drafter=ddir, prompts=str(prompts))


def run_cli(capsys, *argv):
    """(exit status, stdout, stderr) of `dspark-native ARGV...` run in-process."""
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err
