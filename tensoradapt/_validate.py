"""Small argument checks shared by the public functions (messages name argument, value, rule)."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping
from typing import Any

__all__ = ["check_int", "check_shape"]


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """Return ``value`` as an ``int`` if it is an integer (not a bool) ``>= minimum``.

    Raises
    ------
    TypeError
        If ``value`` is not an integer.
    ValueError
        If ``value < minimum``.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool {value!r}")
    try:
        as_int = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None
    if minimum is not None and as_int < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {as_int}")
    return as_int


def check_shape(name: str, shape: Any, *, min_ndim: int = 1) -> tuple[int, ...]:
    """Return ``shape`` as a tuple of positive ints, with at least ``min_ndim`` entries."""
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise TypeError(f"{name} must be a sequence of integers, got {shape!r}")
    dims = tuple(check_int(f"{name}[{i}]", d, minimum=1) for i, d in enumerate(shape))
    if len(dims) < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} entries, got {shape!r}")
    return dims


def config_fields(cls: type, data: Mapping[str, Any], version: int, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """``data`` (a config's ``to_dict``) without its ``config_version``, checked: the version must
    be ``version`` and every other key a field of the dataclass ``cls`` or one of ``extra``."""
    data = dict(data)
    found = data.pop("config_version", version)
    if found != version:
        raise ValueError(f"config_version {found!r} is not supported (this library reads {version})")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known - set(extra))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields are {sorted(known)}")
    return data
