"""Pieces every adapter and wrapped layer shares: switching off, attribute pass-through, and
knowing whether a backward pass is running (activation checkpointing re-runs forwards there)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


class Switchable:
    """Mixin for adapters: ``disabled()`` counts nested uses in ``self._disabled``."""

    _disabled: int

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model only, e.g. ``with adapter.disabled(): ref = model(x)``."""
        self._disabled += 1
        try:
            yield
        finally:
            self._disabled -= 1


class ReadsThrough:
    """Mixin for wrappers holding ``base_layer``: attributes they lack (``weight``, ``bias``,
    ``in_features``…) are read from the wrapped module, for code that inspects its layers."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # type: ignore[misc]  # nn.Module's lookup
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(super().__getattr__("base_layer"), name)  # type: ignore[misc]


def graph_task_id() -> int:
    """Id of the autograd backward pass running now, -1 outside one (the private hook
    ``torch.utils.checkpoint`` itself uses; -1 where a torch build lacks it)."""
    probe = getattr(torch._C, "_current_graph_task_id", None)
    return -1 if probe is None else int(probe())
