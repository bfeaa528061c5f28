"""The torch-free C API as a C++ engine would use it: compile tests/c/*.c against the shipped
headers and libdspark_core only (no torch, no Python headers), run them, and check the CMake
package config the wheel ships."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import dspark_native

HERE = Path(__file__).resolve().parent
CC = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


@pytest.mark.skipif(CC is None, reason="no C compiler on this machine")
@pytest.mark.parametrize("source", sorted(p.name for p in (HERE / "c").glob("*.c")))
def test_c_program_links_only_the_core(source, tmp_path):
    inc, lib = dspark_native.get_include(), dspark_native.get_library_dir()
    assert Path(inc, "dspark", "verify_chain.h").is_file()
    exe = tmp_path / Path(source).stem
    cmd = [CC, "-std=c11", "-Wall", "-Werror", str(HERE / "c" / source), f"-I{inc}", f"-L{lib}", "-ldspark_core",
           f"-Wl,-rpath,{lib}", "-lm", "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    libs = subprocess.run(["ldd", str(exe)], capture_output=True, text=True).stdout
    assert "libtorch" not in libs and "libpython" not in libs and "libc10" not in libs
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert " 0 failed" in run.stdout


def test_cmake_package_config_is_shipped():
    if not (Path(dspark_native.__file__).parent / "lib").is_dir():
        pytest.skip("running from a development build, not an installed wheel")
    cfg = Path(dspark_native.cmake_prefix_path()) / "dspark" / "dspark-config.cmake"
    assert cfg.is_file()
    assert (Path(dspark_native.cmake_prefix_path()) / "dspark" / "dspark-targets.cmake").is_file()
