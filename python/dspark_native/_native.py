"""Loading of the compiled torch extension (``_C``) and of the paths a C/C++ user needs.

The extension is a plain shared library registered with ``torch.ops.load_library``; its ops live in
the ``torch.ops.dspark`` namespace. ``DSPARK_NATIVE_LIB=/path/to/_C.so`` loads a development
build instead of the installed one.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

_PKG_DIR = Path(__file__).resolve().parent
_lock = threading.Lock()
_loaded: Path | None = None


class NativeLibraryError(ImportError):
    """The compiled extension could not be found or loaded."""


def _candidates() -> list[Path]:
    env = os.environ.get("DSPARK_NATIVE_LIB")
    if env:
        return [Path(env)]
    return sorted(_PKG_DIR.glob("_C*.so")) + sorted(_PKG_DIR.glob("_C*.pyd"))


def load_library() -> Path:
    """Load the extension once (thread-safe) and return its path."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        cands = _candidates()
        if not cands or not cands[0].exists():
            where = os.environ.get("DSPARK_NATIVE_LIB") or str(_PKG_DIR)
            raise NativeLibraryError(
                f"dspark_native: compiled extension _C not found in {where}. Install the package with "
                "`pip install --no-build-isolation --no-deps .` from the source tree (torch must be "
                "installed first), or set DSPARK_NATIVE_LIB to a built _C.so."
            )
        try:
            torch.ops.load_library(str(cands[0]))
        except OSError as exc:  # pragma: no cover - depends on a broken install
            raise NativeLibraryError(f"dspark_native: could not load {cands[0]}: {exc}") from exc
        _loaded = cands[0]
        return _loaded


def has_native() -> bool:
    """True when the compiled extension can be loaded."""
    try:
        load_library()
        return True
    except NativeLibraryError:
        return False


def has_cuda() -> bool:
    """True when the loaded extension has CUDA kernels (a CUDA build of torch and nvcc at build time)."""
    import ctypes

    load_library()
    lib = ctypes.CDLL(str(Path(get_library_dir()) / "libdspark_core.so"))
    return bool(lib.dspark_has_cuda())


def get_include() -> str:
    """Directory holding the public C headers (``#include <dspark/verify_chain.h>``)."""
    inc = _PKG_DIR / "include"
    if not inc.is_dir():  # running from a source tree
        inc = _PKG_DIR.parents[1] / "csrc" / "include"
    return str(inc)


def get_library_dir() -> str:
    """Directory holding ``libdspark_core`` (link with ``-L<dir> -ldspark_core``)."""
    lib = _PKG_DIR / "lib"
    if lib.is_dir():
        return str(lib)
    loaded = load_library()
    return str(loaded.parent)


def cmake_prefix_path() -> str:
    """Prefix to add to ``CMAKE_PREFIX_PATH`` so ``find_package(dspark)`` finds ``dspark::core``."""
    return str(_PKG_DIR / "lib" / "cmake")
