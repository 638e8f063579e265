"""Argument types, the one-line parser and the usage error shared by the commands."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from fractions import Fraction
from typing import NoReturn

__all__ = ["OneLineParser", "UsageError", "non_negative_int", "one_line", "parameter_count", "positive_int",
           "rank_list"]


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``prog: error: message``), status 2."""

    def parse_or_status(self, argv: Sequence[str] | None = None) -> argparse.Namespace | int:
        """The parsed arguments, or the exit status where parsing ended the command (``--help`` and
        ``--version``: 0; a usage error, already reported on one line: 2)."""
        try:
            return self.parse_args(argv)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)

    def error(self, message: str) -> NoReturn:
        text = " ".join(message.split())  # an argument with a newline must not break the one line
        if len(text) > 1000:
            text = text[:997] + "..."
        self.exit(2, f"{self.prog}: error: {text} (see --help)\n")


_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}
#: Largest parameter count accepted on the command line (--budget, --min-params).
MAX_COUNT = 10**18
#: Largest rank accepted on the command line (the library's cap, SuperLoRAConfig MAX_RANK).
MAX_RANK = 2**24


def parameter_count(text: str) -> int:
    """argparse type: a parameter count: ``40000``, ``40_000``, ``40k``, ``1.5M``.

    Examples
    --------
    >>> parameter_count("40k"), parameter_count("1.5M"), parameter_count("40_000")
    (40000, 1500000, 40000)
    """
    shown = text if len(text) <= 40 else text[:37] + "..."
    match = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([kKmMgGbB]?)\s*", text[:200])
    if match is None:
        raise argparse.ArgumentTypeError(f"{shown!r} is not a parameter count (e.g. 40000, 40k, 1.5M)")
    digits = match.group(1).replace("_", "")
    if len(digits) > 30:
        raise argparse.ArgumentTypeError(f"{shown!r} is too large a parameter count (at most {MAX_COUNT:.0e})")
    value = Fraction(digits) * _SUFFIXES[match.group(2).lower()]  # exact: no float rounding
    if value.denominator != 1:
        raise argparse.ArgumentTypeError(f"{shown!r} is not a whole number of parameters")
    if value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{shown!r} is too large a parameter count (at most {MAX_COUNT:.0e})")
    return int(value)


def rank_list(text: str) -> list[int]:
    """argparse type: comma-separated positive ranks (``1,2,4,8``)."""
    shown = text if len(text) <= 40 else text[:37] + "..."
    parts = [p.strip() for p in text.split(",") if p.strip()]
    ranks = [int(p) for p in parts if p.isdigit() and len(p) <= 10] if len(parts) <= 64 else []
    if not ranks or len(ranks) != len(parts) or any(r < 1 for r in ranks):
        raise argparse.ArgumentTypeError(f"{shown!r} must be at most 64 comma-separated positive integers "
                                         "(e.g. 1,2,4,8)")
    if max(ranks) > MAX_RANK:
        raise argparse.ArgumentTypeError(f"rank {max(ranks)} is larger than the cap {MAX_RANK} (docs/reliability.md)")
    return ranks


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (also used by the demo's parser)."""
    try:
        value = int(text) if len(text.strip()) <= 20 else 0
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} must be a positive integer (at most 20 digits)")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text) if len(text.strip()) <= 20 else -1
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} must be an integer >= 0 (at most 20 digits)")
    return value


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (``PATH: no such file`` for a missing file)."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename:
        text = f"{exc.filename}: no such file"
    text = " ".join(text.split())
    return text if len(text) <= 1000 else text[:997] + "..."
