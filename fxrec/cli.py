"""The `fxrec` command line. Each sub-command lives in fxrec/commands/<name>.py and
exposes `HELP`, `add_arguments(parser)` and `run(args) -> int`; this file only
dispatches, so that adding a command never touches another's code."""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import fxrec.commands as _commands


def _command_modules():
    for info in sorted(pkgutil.iter_modules(_commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            yield info.name.replace("_", "-"), f"fxrec.commands.{info.name}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxrec", description="fxrec: shard, lower and inspect recommendation models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, modname in _command_modules():
        mod = importlib.import_module(modname)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:  # `fxrec plan ... | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush cannot fail again
        return 1


if __name__ == "__main__":
    sys.exit(main())
