"""Former public names kept working for a while: each call warns with the name to use instead."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["renamed"]

F = TypeVar("F", bound=Callable[..., Any])


def renamed(function: F, old_name: str, module: str) -> F:
    """``function`` under its former public name ``old_name`` of ``module``.

    The alias calls ``function`` with the same arguments and returns its result, after a
    ``DeprecationWarning`` that names both (``module.old_name`` is deprecated, use
    ``module.function``), attributed to the caller's line.
    """
    new_name = function.__name__
    message = f"{module}.{old_name} is deprecated; use {module}.{new_name} (same arguments and result)"

    @functools.wraps(function)
    def alias(*args: Any, **kwargs: Any) -> Any:
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        return function(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old_name
    alias.__doc__ = f"Deprecated alias of :func:`{module}.{new_name}` (warns on every call).\n\n{function.__doc__}"
    return alias  # type: ignore[return-value]
