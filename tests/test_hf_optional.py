"""transformers stays optional: the core package never imports it, and without it the backend
choice fails with errors that name the extra to install."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dspark_native.models import CheckpointError, hf_target, select_backend

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python")


def test_core_does_not_import_transformers():
    code = (
        "import sys\n"
        "import dspark_native, dspark_native.models, dspark_native.engine, dspark_native.cli\n"
        "import dspark_native.training.trainer, dspark_native.training.data, dspark_native.hf_generate\n"
        "from dspark_native.models import TransformersTarget, load_target\n"
        "bad = [m for m in ('transformers', 'accelerate') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_backend_choice_without_transformers(monkeypatch):
    monkeypatch.setattr(hf_target, "transformers_available", lambda: False)
    assert select_backend({"architectures": ["LlamaForCausalLM"]}) == "native"
    want = r"Gemma3ForCausalLM.*no native implementation.*dspark-native\[transformers\]"
    with pytest.raises(CheckpointError, match=want):
        select_backend({"architectures": ["Gemma3ForCausalLM"]})
    with pytest.raises(CheckpointError, match=r"dspark-native\[transformers\]"):
        select_backend({"architectures": ["LlamaForCausalLM"]}, "transformers")
    with pytest.raises(ValueError, match="backend must be one of"):
        select_backend({}, "tensorrt")
