"""The one progress bar of ``tensoradapt export-peft``, ``demo`` and ``study`` (tqdm on a terminal)."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["progress_bar"]


def progress_bar(total: int, label: str, enabled: bool, *, unit: str = "step", leave: bool = False) -> Any:
    """A tqdm bar on stderr when stderr is a terminal, else ``None`` (also when not ``enabled`` or
    without tqdm): the one progress bar of ``tensoradapt export-peft``, ``demo`` and ``study``.

    Parameters
    ----------
    total : int
        How many updates make the bar full.
    label : str
        Shown before the bar.
    enabled : bool
        ``False``: no bar (``None``).
    unit : str
        What one update counts.
    leave : bool
        Keep the finished bar on the terminal.

    Returns
    -------
    tqdm or None
        Call ``update(1)`` per step and ``close()`` at the end.
    """
    if not enabled or not sys.stderr.isatty():  # nothing in logs, pipes or captured output
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return None
    return tqdm(total=total, desc=label, leave=leave, unit=unit, file=sys.stderr)
