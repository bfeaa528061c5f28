"""The ``dspark-native`` command (also ``python -m dspark_native``).

One module per command (``demo``, ``generate``, ``bench``, ``profile_sps``, ``calibrate``,
``train``, ``eval``, ``serve``), each registering itself with :func:`common.command`; what they share
(flags, prompt files, progress, the adapters to :mod:`dspark_native.runtime`) is in
:mod:`.common`. Every command has ``--help``. User mistakes are reported as one line on stderr
with exit status 2, not as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .common import COMMANDS, UserError, command, read_prompt_file, reset_stdin_state

__all__ = ["COMMANDS", "UserError", "build_parser", "command", "main", "read_prompt_file"]

#: command modules, in the order `dspark-native --help` lists them
_MODULES = ("demo", "generate", "bench", "profile_sps", "calibrate", "train", "eval", "serve")
for _m in _MODULES:
    importlib.import_module(f"{__name__}.{_m}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspark-native", description="Fast, exact DSpark speculative decoding.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, factory in COMMANDS.items():
        p = sub.add_parser(name, help=(factory.__doc__ or "").strip().splitlines()[0])
        p.set_defaults(_run=factory(p))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    reset_stdin_state()
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"dspark-native {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
