"""Argument types, the one-line parser and the usage error shared by the commands."""

from __future__ import annotations

import argparse
import re
from typing import NoReturn

__all__ = ["OneLineParser", "UsageError", "non_negative_int", "one_line", "parameter_count", "positive_int",
           "rank_list"]


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``prog: error: message``), status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


def parameter_count(text: str) -> int:
    """argparse type: a parameter count: ``40000``, ``40_000``, ``40k``, ``1.5M``.

    Examples
    --------
    >>> parameter_count("40k"), parameter_count("1.5M"), parameter_count("40_000")
    (40000, 1500000, 40000)
    """
    match = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([kKmMgGbB]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a parameter count (e.g. 40000, 40k, 1.5M)")
    value = float(match.group(1).replace("_", "")) * _SUFFIXES[match.group(2).lower()]
    if value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of parameters")
    return int(value)


def rank_list(text: str) -> list[int]:
    """argparse type: comma-separated positive ranks (``1,2,4,8``)."""
    try:
        ranks = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        ranks = []
    if not ranks or any(r < 1 for r in ranks):
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated positive integers (e.g. 1,2,4,8)")
    return ranks


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (also used by the demo's parser)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 0")
    return value


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (``PATH: no such file`` for a missing file)."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename:
        text = f"{exc.filename}: no such file"
    return " ".join(text.split())
