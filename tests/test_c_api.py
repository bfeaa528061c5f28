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
    cmd = [
        CC,
        "-std=c11",
        "-Wall",
        "-Werror",
        str(HERE / "c" / source),
        f"-I{inc}",
        f"-L{lib}",
        "-ldspark_core",
        f"-Wl,-rpath,{lib}",
        "-lm",
        "-o",
        str(exe),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    libs = subprocess.run(["ldd", str(exe)], capture_output=True, text=True).stdout
    assert "libtorch" not in libs and "libpython" not in libs and "libc10" not in libs
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert " 0 failed" in run.stdout


@pytest.mark.skipif(CC is None or shutil.which("cmake") is None, reason="needs cmake and a C compiler")
def test_cmake_find_package_builds_a_consumer(tmp_path):
    """A downstream CMake project finds the core with find_package(dspark) and links dspark::core."""
    if not (Path(dspark_native.__file__).parent / "lib").is_dir():
        pytest.skip("running from a development build, not an installed wheel")
    src = tmp_path / "src"
    src.mkdir()
    (src / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(consumer C)\nfind_package(dspark 0.1 REQUIRED)\n"
        f"add_executable(consumer {HERE / 'c' / 'test_c_api.c'})\n"
        "target_link_libraries(consumer PRIVATE dspark::core m)\n"
    )
    build = tmp_path / "build"
    subprocess.run(
        ["cmake", "-S", str(src), "-B", str(build), f"-DCMAKE_PREFIX_PATH={dspark_native.cmake_prefix_path()}"],
        check=True,
        capture_output=True,
        text=True,
    )
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True, text=True)
    run = subprocess.run([str(build / "consumer")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and " 0 failed" in run.stdout, run.stdout + run.stderr
