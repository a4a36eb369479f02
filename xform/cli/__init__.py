"""The ``xform`` command line: ``xform env``, ``xform config``, ``xform estimate-memory``.

Each subcommand is a module of this package with three names:

- ``HELP``: a one-line summary for ``xform --help``; the module's docstring is the
  longer description for ``xform <command> --help``;
- ``add_arguments(parser)``: adds the command's arguments to its ``argparse`` parser;
- ``run(args) -> int``: does the work and returns the exit code. User errors are raised
  as ``CommandError`` (printed as ``xform <command>: error: ...``, exit code 2).

Adding a command is one line in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

import attrs

__all__ = ["main", "Command", "COMMANDS", "CommandError", "build_parser"]


class CommandError(Exception):
    """A user error in a command: bad flags, a bad config file, a model that cannot be built."""


@attrs.frozen
class Command:
    """A subcommand: its name on the command line and the module that implements it."""

    name: str
    module: str


COMMANDS: tuple[Command, ...] = (
    Command("env", "xform.cli._env"),
    Command("config", "xform.cli._config"),
    Command("estimate-memory", "xform.cli._estimate"),
    Command("launch", "xform.cli._launch"),
    Command("plan", "xform.cli._plan"),
)

_EPILOG = "Run 'xform <command> --help' for a command's options."


def _version() -> str:
    from xform.toolbox.sysinfo import package_version

    return package_version("xform") or "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xform",
        description="xform: PyTorch training with the programming model of JAX. Tools for a run's setup.",
        epilog=_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"xform {_version()}")
    sub = parser.add_subparsers(title="commands", dest="command", metavar="<command>")
    for cmd in COMMANDS:
        module = importlib.import_module(cmd.module)
        p = sub.add_parser(
            cmd.name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``xform`` command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except CommandError as e:
        print(f"xform {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"xform {args.command}: interrupted", file=sys.stderr)
        return 130
