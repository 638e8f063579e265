"""Small argument checks shared by the public functions (messages name argument, value, rule)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import operator
from collections.abc import Mapping
from typing import Any

__all__ = ["MAX_DIM", "MAX_NDIM", "check_bool", "check_choice", "check_float", "check_int", "check_shape",
           "config_fields", "is_int"]

#: Largest dimension of a target shape (an unsigned 64-bit integer, as in a safetensors header).
MAX_DIM = 2**64 - 1
#: Most dimensions of a target shape (NumPy's own limit).
MAX_NDIM = 64


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer: a Python or NumPy int (anything with ``__index__``), not a bool."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
              rule: str | None = None) -> int:
    """Return ``value`` as an ``int`` if it is an integer (not a bool) in ``[minimum, maximum]``.

    ``rule`` replaces the default wording of the requirement in both messages, e.g.
    ``check_int("order", 0, minimum=1, rule="an integer >= 1")`` raises
    ``ValueError("order must be an integer >= 1, got 0")``.

    Raises
    ------
    TypeError
        If ``value`` is not an integer.
    ValueError
        If ``value < minimum`` or ``value > maximum``.
    """
    if not is_int(value):
        raise TypeError(f"{name} must be {rule or 'an integer'}, got {type(value).__name__} {brief(value)}")
    as_int = operator.index(value)
    if minimum is not None and as_int < minimum:
        raise ValueError(f"{name} must be {rule or f'>= {minimum}'}, got {brief(as_int)}")
    if maximum is not None and as_int > maximum:
        raise ValueError(f"{name} must be {rule or f'<= {brief(maximum)}'}, got {brief(as_int)}")
    return as_int


def brief(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters; an integer too long to print in full (more than
    40 digits, or past the interpreter's digit limit) as its number of digits, e.g. ``10**30`` as
    ``'an integer of 31 digits'``."""
    if is_int(value) and not isinstance(value, bool):
        as_int = operator.index(value)
        if abs(as_int).bit_length() > 132:  # > 40 digits: printing could be slow or refused
            digits = math.floor(abs(as_int).bit_length() * math.log10(2)) + 1
            return f"an integer of about {digits} digits" if digits > 4000 else \
                f"an integer of {len(str(abs(as_int)))} digits"
        return repr(as_int)
    try:
        text = repr(value)
    except Exception:  # e.g. a container of huge integers
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_float(name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
                open_minimum: bool = False, rule: str | None = None) -> float:
    """Return ``value`` as a ``float`` if it is a finite real number (not a bool) in range.

    The range is ``[minimum, maximum]``, or ``(minimum, maximum]`` with ``open_minimum=True``;
    ``rule`` replaces the default wording of the range in the ``ValueError``.

    Raises
    ------
    TypeError
        If ``value`` is not a real number (ints and floats, NumPy's included).
    ValueError
        If ``value`` is NaN or infinite, or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number, got {type(value).__name__} {brief(value)}")
    try:
        as_float = float(value)
    except OverflowError:  # an integer beyond the float range
        raise ValueError(f"{name} must be a finite number, got {brief(value)}") from None
    if not math.isfinite(as_float):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    low = minimum is not None and (as_float <= minimum if open_minimum else as_float < minimum)
    high = maximum is not None and as_float > maximum
    if low or high:
        if rule is None:
            lower = "" if minimum is None else f"{'>' if open_minimum else '>='} {minimum:g}"
            upper = "" if maximum is None else f"<= {maximum:g}"
            rule = " and ".join(part for part in (lower, upper) if part)
        raise ValueError(f"{name} must be {rule}, got {brief(value)}")
    return as_float


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool (Python's or NumPy's), else raise ``TypeError``: a flag is
    ``True`` or ``False``, never ``()``, ``"no"``, ``0`` or ``1``."""
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {type(value).__name__} {brief(value)}")


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of the strings ``allowed``, else raise ``ValueError`` listing them."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {brief(value)}")
    return value


def check_shape(name: str, shape: Any, *, min_ndim: int = 1) -> tuple[int, ...]:
    """Return ``shape`` as a tuple of positive ints, with at least ``min_ndim`` entries."""
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise TypeError(f"{name} must be a sequence of integers, got {brief(shape)}")
    if isinstance(shape, (tuple, list)) and len(shape) <= MAX_NDIM and all(type(d) is int and 1 <= d <= MAX_DIM
                                                                        for d in shape):
        dims = tuple(shape)  # the common case, checked without a call per entry
    else:
        dims = tuple(check_int(f"{name}[{i}]", d, minimum=1, maximum=MAX_DIM)
                     for i, d in enumerate(itertools.islice(shape, MAX_NDIM + 1)))
        if len(dims) > MAX_NDIM:
            raise ValueError(f"{name} must have at most {MAX_NDIM} entries, got {brief(shape)}")
    if len(dims) < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} entries, got {brief(shape)}")
    return dims


def config_fields(cls: type, data: Mapping[str, Any], version: int, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """``data`` (a config's ``to_dict``) without its ``config_version``, checked: the version must
    be ``version`` and every other key a field of the dataclass ``cls`` or one of ``extra``."""
    if not isinstance(data, Mapping):
        raise TypeError(f"a {cls.__name__} dict must be a mapping of field -> value, got {type(data).__name__}")
    data = dict(data)
    found = data.pop("config_version", version)
    if not is_int(found) or found != version:
        raise ValueError(f"config_version {brief(found)} is not supported (this library reads {version})")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known - set(extra), key=repr)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields are {sorted(known)}")
    return data
