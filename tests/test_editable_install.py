"""`pip install --no-build-isolation --no-deps -e .` gives a working package.

A fresh virtual environment (with the system site-packages, so torch, scikit-build-core and pip
are reused and nothing is downloaded) gets an editable install of this source tree; a Python in it
must import dspark_native from the source tree, find the compiled `_C.so` in the CMake install
tree (not beside the .py files) and run one op, bit-identical to the pure-PyTorch reference.

The install reuses the source tree's build directory (`build/{wheel_tag}`, the one
`scripts/setup.sh` builds), so after setup it only re-links: seconds, not a full build.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent(
    """
    import json, sys
    import torch
    import dspark_native as dn
    from dspark_native.reference import verify_chain_reference

    lib = dn.load_library()
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 4, 6])
    target = torch.randn(6, 50, generator=g)
    drafts = torch.randint(0, 50, (4,), generator=g)
    drafts[0] = target[0].argmax()  # at least one accepted draft
    kw = dict(temperature=0.0, seed=torch.tensor([1, 2]), offset=0, max_drafts=3)
    out = dn.verify_chain(target, cu, drafts, **kw)
    ref = verify_chain_reference(target, cu, drafts, **kw)
    print(json.dumps(dict(
        module=dn.__file__, lib=str(lib), lib_dir=dn.get_library_dir(), include=dn.get_include(),
        prefix=dn.cmake_prefix_path(),
        same=bool(torch.equal(out.tokens, ref[0]) and torch.equal(out.num_accepted, ref[1])),
        accepted=out.num_accepted.tolist())))
    """
)


def _why_not() -> str | None:
    if not (ROOT / "pyproject.toml").is_file() or not (ROOT / "CMakeLists.txt").is_file():
        return "not running from a source tree (no pyproject.toml / CMakeLists.txt beside tests/)"
    for mod in ("pip", "scikit_build_core", "venv"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (bash scripts/setup.sh installs it)"
    if shutil.which("cmake") is None:
        return "no cmake on PATH"
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++")):
        return "no C++ compiler on PATH"
    if not os.access(ROOT, os.W_OK):
        return f"{ROOT} is not writable (the install reuses its build/ directory)"
    return None


@pytest.mark.slow
def test_editable_install_finds_the_extension(tmp_path):
    why = _why_not()
    if why:
        pytest.skip(f"editable install cannot run here: {why}")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("DSPARK_NATIVE_LIB", "PYTHONPATH", "PYTHONHOME")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1", PYTHONNOUSERSITE="1")
    # pip from the system site-packages installs into the venv (its sys.prefix), never globally.
    r = subprocess.run(
        [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", str(ROOT)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    r = subprocess.run([py, "-c", CHECK], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    src = ROOT / "python" / "dspark_native"
    assert Path(info["module"]).resolve().parent == src, info  # editable: the .py files of this tree
    lib = Path(info["lib"]).resolve()
    assert lib.name.startswith("_C") and lib.parent != src, info  # the CMake install tree, not python/
    assert (Path(info["lib_dir"]) / "libdspark_core.so").is_file(), info
    assert (Path(info["include"]) / "dspark" / "verify_chain.h").is_file(), info
    assert (Path(info["prefix"]) / "dspark" / "dspark-config.cmake").is_file(), info
    assert info["same"] and info["accepted"][0] >= 1, info
