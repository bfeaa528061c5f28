"""Loading of the compiled torch extension (``_C``) and of the paths a C/C++ user needs.

The extension is a plain shared library registered with ``torch.ops.load_library``; its ops live in
the ``torch.ops.dspark`` namespace. ``DSPARK_NATIVE_LIB=/path/to/_C.so`` loads a development
build instead of the installed one.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path

import torch

_PKG_DIR = Path(__file__).resolve().parent
_lock = threading.Lock()
_loaded: Path | None = None


class NativeLibraryError(ImportError):
    """The compiled extension could not be found or loaded."""


def _package_dirs() -> list[Path]:
    """Every directory the package is made of, in import order.

    A regular install has one (site-packages/dspark_native). An editable install by
    scikit-build-core (``pip install -e .``) has two: the CMake install tree in site-packages
    (``_C.so``, ``lib/``, ``include/``) and the source tree (the ``.py`` files); its import hook
    puts both in ``dspark_native.__path__``, so the built files are looked up there rather than
    beside this file."""
    pkg = sys.modules.get(__package__ or "dspark_native")
    dirs = [Path(p).resolve() for p in getattr(pkg, "__path__", None) or ()]
    if _PKG_DIR not in dirs:
        dirs.append(_PKG_DIR)
    return dirs


def _find_in_package(name: str) -> Path | None:
    """First package directory holding ``name`` (file or directory)."""
    for d in _package_dirs():
        if (d / name).exists():
            return d / name
    return None


def _candidates() -> list[Path]:
    env = os.environ.get("DSPARK_NATIVE_LIB")
    if env:
        return [Path(env)]
    found: list[Path] = []
    # The import system knows where `_C` is (the file's suffix is an extension-module suffix even
    # though it is loaded with torch.ops.load_library, not imported). For an editable install
    # asked to rebuild on import (-Ceditable.rebuild=true) this lookup also runs the rebuild.
    try:
        spec = importlib.util.find_spec(f"{__package__ or 'dspark_native'}._C")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin and os.path.isfile(spec.origin):
        found.append(Path(spec.origin))
    for d in _package_dirs():
        found += sorted(d.glob("_C*.so")) + sorted(d.glob("_C*.pyd"))
    return list(dict.fromkeys(found))


def load_library() -> Path:
    """Load the extension once (thread-safe) and return its path."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        cands = _candidates()
        if not cands or not cands[0].exists():
            where = os.environ.get("DSPARK_NATIVE_LIB") or " or ".join(str(d) for d in _package_dirs())
            raise NativeLibraryError(
                f"dspark_native: compiled extension _C not found in {where}. Install the package with "
                "`pip install --no-build-isolation --no-deps .` (or `-e .`) from the source tree (torch must be "
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
    inc = _find_in_package("include")
    if inc is None or not inc.is_dir():  # running from a source tree
        inc = _PKG_DIR.parents[1] / "csrc" / "include"
    return str(inc)


def get_library_dir() -> str:
    """Directory holding ``libdspark_core`` (link with ``-L<dir> -ldspark_core``)."""
    lib = _find_in_package("lib")
    if lib is not None and lib.is_dir():
        return str(lib)
    loaded = load_library()
    # A development build (DSPARK_NATIVE_LIB=build/dev/_C.so) has the core beside _C; an installed
    # tree elsewhere has it in lib/.
    if not (loaded.parent / "libdspark_core.so").exists() and (loaded.parent / "lib").is_dir():
        return str(loaded.parent / "lib")
    return str(loaded.parent)


def cmake_prefix_path() -> str:
    """Prefix to add to ``CMAKE_PREFIX_PATH`` so ``find_package(dspark)`` finds ``dspark::core``."""
    lib = _find_in_package("lib")
    return str((lib if lib is not None else _PKG_DIR / "lib") / "cmake")
