"""A tiny base for immutable operator objects (values set once in ``__init__``)."""

from __future__ import annotations

from typing import Any, ClassVar


class Frozen:
    """Objects whose attributes are set once through :meth:`_freeze` and never again."""

    __slots__ = ()

    #: Slots a pickle leaves out (caches of device copies and computed maps): an unpickled object
    #: gets them from :meth:`_restore_transient`, so a pickle names no cache class and holds no
    #: backend arrays.
    _TRANSIENT: ClassVar[tuple[str, ...]] = ()

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

    def __getstate__(self) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """``(instance dict or None, slot values)`` as Python's default, less :attr:`_TRANSIENT`."""
        slots: dict[str, Any] = {}
        for klass in type(self).__mro__:
            for name in klass.__dict__.get("__slots__", ()):
                if name not in self._TRANSIENT and hasattr(self, name):
                    slots[name] = getattr(self, name)
        instance = {k: v for k, v in getattr(self, "__dict__", {}).items() if k not in self._TRANSIENT}
        return instance or None, slots

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple):  # (instance dict or None, slot values)
            parts = [part for part in state if part]
        else:
            parts = [state] if state else []
        for part in parts:
            for name, value in part.items():
                if name not in self._TRANSIENT:  # pickles of earlier versions (to 48104a3) hold caches
                    object.__setattr__(self, name, value)
        if self._TRANSIENT:
            self._restore_transient()

    def _restore_transient(self) -> None:
        """Set the :attr:`_TRANSIENT` slots of an unpickled object (their values as built)."""
