"""What every adapter shares: switching it off for a while."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


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
