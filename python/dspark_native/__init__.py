"""dspark-native: fast, exact DSpark speculative decoding.

The fused ops (``verify_chain``, ...) are in :mod:`dspark_native.ops` and need the compiled
extension, which is loaded on first use of an op so that the pure-Python parts (models, scheduler
policies, references) import without it. C/C++ users find the torch-free core with
:func:`get_include`, :func:`get_library_dir` and :func:`cmake_prefix_path`.
"""

from __future__ import annotations

import os as _os
import sys as _sys


def _is_cli_process() -> bool:
    a0 = _sys.argv[0] if _sys.argv and _sys.argv[0] else ""
    base = _os.path.basename(a0)
    return base == "dspark-native" or (base == "__main__.py" and "dspark_native" in a0)


if "torch" not in _sys.modules and _is_cli_process():
    # The `dspark-native` command, before torch loads libgomp: OpenMP workers otherwise spin
    # for milliseconds (GOMP_SPINCOUNT 300k) after every parallel torch op and take the 2 cores
    # a CPU target's own kernel team needs next; a short spin made speculative decoding 20%
    # faster here (docs/engine.md). A value the user set is kept. Library users may export it.
    _os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from ._native import cmake_prefix_path, get_include, get_library_dir, has_cuda, has_native, load_library  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "get_include",
    "get_library_dir",
    "cmake_prefix_path",
    "has_cuda",
    "has_native",
    "load_library",
    "__version__",
]


def __getattr__(name):
    # `dn.verify_chain(...)` works without importing dspark_native.ops first; the extension is
    # loaded only when an op is actually asked for.
    if name.startswith("_"):
        raise AttributeError(f"module 'dspark_native' has no attribute {name!r}")
    import importlib

    try:
        # import_module, not `from . import ops`: the latter looks the name up on this module
        # first, which would call this __getattr__ again.
        ops = importlib.import_module(".ops", __name__)
    except ImportError as exc:
        raise AttributeError(f"module 'dspark_native' has no attribute {name!r} ({exc})") from exc
    if name == "ops":
        return ops
    if name in getattr(ops, "__all__", ()) or hasattr(ops, name):
        return getattr(ops, name)
    raise AttributeError(f"module 'dspark_native' has no attribute {name!r}")
