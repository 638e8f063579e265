"""The one strict JSON reader for untrusted text (standard library only).

Every reader of a file a user or an attacker supplies (a safetensors header, an adapter's metadata,
an ``adapter_config.json``, a shape file) parses it with :func:`loads_strict`, which refuses, with
one error type (:class:`StrictJSONError`) and a short reason:

* nesting deeper than ``max_depth`` levels, counted on the characters by :func:`nesting_depth`
  *before* anything is parsed (so a file of a million ``[`` is refused in milliseconds, and the
  recursive parser never sees nesting it could not handle);
* a repeated key in an object (RFC 8259 leaves the result undefined; we refuse it);
* ``NaN``, ``Infinity``, ``-Infinity`` (not JSON) and a float literal that overflows to infinity;
* an integer with more than ``max_int_digits`` digits (converting a long decimal string to an
  integer takes time quadratic in its length);
* a floating-point number where only integers are allowed (``allow_floats=False``);
* anything else that is not JSON (or, for ``bytes``, not UTF-8).

The depth of a JSON value is 0 for a scalar and ``1 + max(depth of the children)`` (0 without
children) for an array or object: ``[]`` has depth 1, ``{"a": [1]}`` depth 2.

Each caller adds its own subject and error type to the reason, which is written to follow a
subject: ``f"the header {error}"`` reads "the header nests deeper than 8 levels".
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from operator import sub
from typing import Any, Literal

__all__ = ["MAX_INT_DIGITS", "StrictJSONError", "loads_strict", "nesting_depth"]

#: Most digits of an integer :func:`loads_strict` converts (the interpreter's default limit on
#: ``int(str)``, ``sys.get_int_max_str_digits()``, fixed here so that it does not depend on settings).
MAX_INT_DIGITS = 4300

Kind = Literal["depth", "key", "constant", "float", "integer", "syntax"]

# Only the brackets survive ``bytes.translate``: "[" and "{" become 2, "]" and "}" become 0 (1 + the step in depth).
_BRACKETS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_RUNS = re.compile(rb"\x02+|\x00+")


class StrictJSONError(ValueError):
    """Untrusted JSON refused by :func:`loads_strict`.

    ``str(error)`` is a short reason that follows a subject ("nests deeper than 8 levels",
    "is not valid JSON (repeats the key 'w')"); :attr:`kind` says which rule was broken:
    ``"depth"``, ``"key"``, ``"constant"``, ``"float"``, ``"integer"`` or ``"syntax"``.
    """

    def __init__(self, reason: str, kind: Kind) -> None:
        super().__init__(reason)
        self.kind: Kind = kind


def nesting_depth(text: str | bytes) -> int:
    """How deep the JSON ``text`` nests: the most arrays/objects open at once (0 for a scalar).

    Counted on the characters in linear time without recursion (every step is a ``bytes`` method
    or one regular expression, so a million levels take milliseconds): escapes are dropped
    (``\\\\`` pairs, then ``\\"``), the text between the remaining quotes (the strings) is
    dropped, and the brackets left are counted, so brackets inside strings do not count.  For
    text that is not JSON the count is exact up to the first backslash outside a string (as far
    as a parser reads): an unclosed ``[[[`` nests 3 deep.

    Parameters
    ----------
    text : str or bytes
        JSON text (``bytes`` as UTF-8).

    Returns
    -------
    int
        ``max(0, max_k (opened_k - closed_k))`` over the prefixes ``k`` of ``text`` with strings removed.

    Examples
    --------
    >>> nesting_depth('{"a": [1, "]]]"]}'), nesting_depth("7"), nesting_depth("[]")
    (2, 0, 1)
    """
    if isinstance(text, str):
        raw = text.encode("utf-8", "surrogatepass")  # every byte of a non-ASCII character is >= 0x80
    elif isinstance(text, (bytes, bytearray)):
        raw = bytes(text)
    else:
        raise TypeError(f"nesting_depth takes the JSON text as str or bytes, got {type(text).__name__}")
    if b"\\" in raw:  # an escaped backslash, then an escaped quote (left to right, as a parser pairs them)
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    if b'"' in raw:  # outside strings a quote always opens one: the even pieces are outside
        raw = b"".join(raw.split(b'"')[::2])
    codes = raw.translate(_BRACKETS, _NOT_BRACKETS)
    if not codes:
        return 0
    if 4 * (codes.count(b"\x02\x00") + codes.count(b"\x00\x02")) < len(codes):
        # long runs (deep nesting): one step per run of openers or closers
        return max(0, max(accumulate(len(run) if run[0] == 2 else -len(run) for run in _RUNS.findall(codes))))
    # depth after the k-th bracket = sum over the first k of (code - 1) = prefix sum of codes - k
    return max(0, max(map(sub, accumulate(codes), range(1, len(codes) + 1))))


def _decoded(text: Any, max_depth: Any, max_int_digits: Any) -> tuple[str, str]:
    """``(text as str, how invalid text is described)`` once the arguments are checked and the
    nesting depth is within ``max_depth`` (before anything is decoded or parsed)."""
    for name, value, least in (("max_depth", max_depth, 0), ("max_int_digits", max_int_digits, 1)):
        if type(value) is not int or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r:.40}")
    if not isinstance(text, (str, bytes, bytearray)):
        raise TypeError(f"loads_strict takes str or bytes, got {type(text).__name__}")
    if nesting_depth(text) > max_depth:  # before anything is decoded or parsed
        raise StrictJSONError(f"nests deeper than {max_depth} levels", "depth")
    if isinstance(text, str):
        return text, "is not valid JSON"
    invalid = "is not valid UTF-8 JSON"
    try:
        return bytes(text).decode("utf-8"), invalid
    except UnicodeDecodeError as error:
        raise StrictJSONError(f"{invalid} (byte {error.start} is not UTF-8)", "syntax") from None


class _Hooks:
    """The :func:`json.loads` hooks that refuse what :func:`loads_strict` refuses, as it parses."""

    def __init__(self, invalid: str, allow_floats: bool, max_int_digits: int) -> None:
        self.invalid, self.allow_floats, self.max_int_digits = invalid, allow_floats, max_int_digits

    def unique(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            seen: set[str] = set()
            key = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
            raise StrictJSONError(f"{self.invalid} (repeats the key {key[:80]!r})", "key")
        return out

    def constant(self, word: str) -> Any:
        raise StrictJSONError(f"{self.invalid} (the number {word!r}: NaN and Infinity are not JSON)", "constant")

    def number(self, word: str) -> float:
        if not self.allow_floats:
            raise StrictJSONError(f"holds the number {word[:24]!r} where only integers are allowed", "float")
        value = float(word)
        if not math.isfinite(value):
            raise StrictJSONError(f"{self.invalid} (the number {word[:24]!r} overflows a float)", "constant")
        return value

    def integer(self, word: str) -> int:
        digits = len(word) - word.startswith("-")
        if digits > self.max_int_digits:
            raise StrictJSONError(f"{self.invalid} (an integer of {digits} digits; at most {self.max_int_digits} "
                                  "are read)", "integer")
        return int(word)


def loads_strict(text: str | bytes, *, max_depth: int, allow_floats: bool = True,
                 max_int_digits: int = MAX_INT_DIGITS) -> Any:
    """Parse untrusted JSON ``text`` strictly (see the module documentation for what is refused).

    Parameters
    ----------
    text : str or bytes
        The JSON; ``bytes`` must be UTF-8.
    max_depth : int
        Deepest nesting accepted (:func:`nesting_depth`), checked before parsing; ``>= 0``.
    allow_floats : bool
        Whether numbers with a fraction or an exponent are accepted (finite ones only).
    max_int_digits : int
        Most digits of an integer (the sign not counted); ``>= 1``.

    Returns
    -------
    Any
        The value, as :func:`json.loads` gives it (objects are ``dict`` in file order).

    Raises
    ------
    StrictJSONError
        When the text breaks a rule; the message is the reason, :attr:`StrictJSONError.kind` the rule.
    TypeError, ValueError
        For a bad argument (not the text's fault).

    Examples
    --------
    >>> loads_strict('{"a": [1, 2]}', max_depth=2)
    {'a': [1, 2]}
    >>> loads_strict("[[[]]]", max_depth=2)
    Traceback (most recent call last):
    ...
    tensoradapt._json.StrictJSONError: nests deeper than 2 levels
    """
    text, invalid = _decoded(text, max_depth, max_int_digits)
    hooks = _Hooks(invalid, allow_floats, max_int_digits)
    try:
        return json.loads(text, object_pairs_hook=hooks.unique, parse_constant=hooks.constant,
                          parse_float=hooks.number, parse_int=hooks.integer)
    except StrictJSONError:
        raise
    except RecursionError:  # only when max_depth exceeds what the interpreter's stack allows
        raise StrictJSONError(f"nests deeper than the parser can follow (max_depth={max_depth} is too large)",
                              "depth") from None
    except ValueError as error:  # json.JSONDecodeError
        raise StrictJSONError(f"{invalid} ({str(error)[:200]})", "syntax") from None
