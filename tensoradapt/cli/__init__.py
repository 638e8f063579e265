"""The ``tensoradapt`` command line: ``count``, ``compare``, and the commands other packages add (``demo``).

Examples
--------
::

    tensoradapt count 24x768x768                          # parameter table of the default presets
    tensoradapt count 24x768x768 --preset lora --preset lorta:order=3,groups=1 --rank 1,4,8
    tensoradapt count model.safetensors --budget 40k      # budget sweep (header read only)
    tensoradapt compare lora.safetensors dense.safetensors --plot geometry.png
    tensoradapt export-peft gpt2-lorta/ served/ --rank 16  # any adapter as a PEFT LoRA (needs torch)
    tensoradapt demo --help

Every subcommand has ``--help``.  Bad input (a missing file, an unknown preset, malformed shapes)
exits with status 2 and a one-line message on stderr.

Layout: this module holds :func:`main`, the parser and the dispatch to plugin commands;
:mod:`._args` the argument types, :class:`OneLineParser` and :class:`UsageError`;
:mod:`.count` and :mod:`.compare` one command each (their tables and the plot come from
:mod:`tensoradapt.analysis.report` and :mod:`tensoradapt.analysis.plot`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import compare, count
from ._args import OneLineParser, UsageError, non_negative_int, one_line, positive_int

__all__ = ["COMMAND_GROUP", "OneLineParser", "UsageError", "main", "non_negative_int", "one_line",
           "plugin_commands", "positive_int"]

_PROG = "tensoradapt"
_COMMANDS = {"count": count, "compare": compare}


# ---------------------------------------------------------------------------------------------
# commands from other packages (the demo, the study), found through an entry point
# ---------------------------------------------------------------------------------------------
#: Entry-point group of the commands other packages add; each entry names ``module:function`` with
#: ``function(argv: list[str]) -> int``.  ``tensoradapt demo`` and ``tensoradapt study`` are such
#: commands (they train torch models, so the core cannot import them).
COMMAND_GROUP = "tensoradapt.commands"
#: The optional extra that installs what a bundled plugin command needs (default ``demo``).
_EXTRAS = {"export-peft": "torch"}


def plugin_commands() -> dict[str, Any]:
    """The installed commands of :data:`COMMAND_GROUP`, by name (entry points, not yet loaded)."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=COMMAND_GROUP) if ep.name not in _COMMANDS}


def _run_plugin(name: str, entry: Any, argv: list[str]) -> int:
    try:
        command = entry.load()
    except ModuleNotFoundError as exc:
        missing = exc.name or "?"
        if missing.split(".")[0] == "tensoradapt":
            raise UsageError(f"the {name} command is not available in this installation (no module {missing})") \
                from None
        extra = _EXTRAS.get(name, "demo")
        raise UsageError(f"the {name} command needs the package {missing!r}: pip install 'tensoradapt[{extra}]'") \
            from None
    result = command(list(argv))
    return int(result) if result is not None else 0


# ---------------------------------------------------------------------------------------------
# parser and entry point
# ---------------------------------------------------------------------------------------------
def _build_parser() -> tuple[OneLineParser, dict[str, argparse.ArgumentParser]]:
    from .._version import __version__

    parser = OneLineParser(prog=_PROG, description="SuperLoRA-family adapters: parameter tables, budget sweeps, "
                     "geometric comparison of weight updates, and the demo.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    commands = {name: module.add_parser(sub) for name, module in _COMMANDS.items()}
    for name, entry in sorted(plugin_commands().items()):
        sub.add_parser(name, add_help=False, help=f"runs {entry.value} (`{_PROG} {name} --help` lists its options)")
    return parser, commands


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 2 bad input)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    plugins = plugin_commands()
    if arguments[:1] and arguments[0] in plugins:  # everything after the name belongs to it (--help too)
        name = arguments[0]
        try:
            return _run_plugin(name, plugins[name], arguments[1:])
        except UsageError as exc:
            print(f"{_PROG} {name}: error: {one_line(exc)}", file=sys.stderr)
            return 2
    parser, _ = _build_parser()
    args = parser.parse_or_status(arguments)
    if isinstance(args, int):  # --help, --version or a usage error
        return args
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return _COMMANDS[args.command].run(args)
    except UsageError as exc:
        print(f"{_PROG} {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `tensoradapt count … | head`: the reader left, stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush cannot fail again
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
