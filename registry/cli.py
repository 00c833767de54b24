"""The ``llavakit`` command line. Each subcommand lives in ``llavakit.registry.commands.<name>`` and
exposes ``add_parser(subparsers)``; this module only wires them together (and stays fast to import)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from llavakit.core.errors import LlavakitError

#: Subcommand modules, in the order ``llavakit --help`` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "llavakit.registry.commands.plugins",
    "llavakit.registry.commands.inspect",
    "llavakit.registry.commands.convert",
    "llavakit.registry.commands.generate",
    "llavakit.registry.commands.chat",
    "llavakit.registry.commands.train",
    "llavakit.registry.commands.eval_demo",
)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("llavakit")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llavakit",
        description="LLaVA-NeXT-style vision-language models with swappable parts.",
    )
    parser.add_argument("--version", action="version", version=f"llavakit {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LlavakitError as err:
        # Our errors already say what went wrong and what to do: no traceback for the user.
        print(f"llavakit {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
