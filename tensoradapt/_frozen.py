"""A tiny base for immutable operator objects (values set once in ``__init__``)."""

from __future__ import annotations

from typing import Any


class Frozen:
    """Objects whose attributes are set once through :meth:`_freeze` and never again."""

    __slots__ = ()

    def _freeze(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; cannot delete {name!r}")

    # Immutable, so copies may share the object; pickling restores the slots without __setattr__.
    def __copy__(self) -> Frozen:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Frozen:
        return self

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple):  # (instance dict or None, slot values)
            parts = [part for part in state if part]
        else:
            parts = [state] if state else []
        for part in parts:
            for name, value in part.items():
                object.__setattr__(self, name, value)
