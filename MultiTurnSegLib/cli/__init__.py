"""The ``multiturnseg`` command.

Each subcommand lives in its own module exposing ``register(subparsers)``,
which adds a parser whose default ``func(args) -> int`` runs it. Modules keep
heavy imports (torch, highdicom, fastapi) inside ``func`` so that ``slice``
works where only the light dependencies are installed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

from .. import __version__
from ..errors import MultiTurnSegError

# Order is the order of ``multiturnseg --help``.
SUBCOMMAND_MODULES = ("demo", "slice_cmd", "chat", "eval_cmd", "worker_cmd", "export_cmd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multiturnseg",
        description="Multi-turn MediRound segmentation of medical volumes, slice by slice.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith(__name__):
                continue  # subcommand not part of this installation
            raise
        module.register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MultiTurnSegError as exc:
        print(f"multiturnseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("multiturnseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
