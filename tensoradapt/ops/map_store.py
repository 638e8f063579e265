"""Where the fixed random maps of Shuffle and Fastfood live once built (docs/math.md D6).

* :class:`HostBufferCache`: a generator-1 operator's per-(namespace, dtype, device) copies of its
  host buffers (constants, not backend state).
* :class:`CounterCache` and :func:`device_buffer_budget`: a generator-2 operator's device tables
  and, within one process-wide byte budget, its materialised maps (which change speed, never bits).
* :func:`read_only_permutation_pair` and :func:`check_last_axis`: what both operators check and
  keep of a permutation and of an input.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from .._backend import from_host
from .._validate import check_int

__all__ = ["CounterCache", "HostBufferCache", "check_last_axis", "device_buffer_budget",
           "namespace_name", "read_only_permutation_pair"]

_BUDGET = {"limit": 512 << 20, "used": 0}


def namespace_name(xp: Any) -> str:
    """The key part naming an array namespace in a cache."""
    return getattr(xp, "__name__", repr(xp))


class HostBufferCache:
    """Per-(namespace, dtype, device) copies of host buffers (constants, not backend state)."""

    __slots__ = ("_store",)

    def __init__(self) -> None:
        self._store: dict[tuple[str, str, str, str], Any] = {}

    def get(self, xp: Any, name: str, host: Callable[[], np.ndarray], dtype: Any, device: Any) -> Any:
        """The cached device copy of ``host()`` (called only on a miss)."""
        key = (namespace_name(xp), name, str(dtype), str(device))
        value = self._store.get(key)
        if value is None:
            value = from_host(xp, host(), dtype=dtype, device=device)
            self._store[key] = value
        return value


def device_buffer_budget(limit: int | None = None) -> dict[str, int]:
    """Read (and with ``limit``, set) the process-wide byte budget for materialised generator-2
    buffers.  Generator-2 Fastfood and Shuffle operators compute their maps on the device per call,
    in chunks (O(1) state); while the budget allows, an operator keeps the computed index (and
    Fastfood's Gaussian) arrays of a direction on that device instead (Fastfood 8 bytes per entry
    of ``L``, Shuffle 4 per entry of ``n``), which changes the speed, never the result.
    ``limit=0`` turns materialisation off.  Returns ``{"limit", "used"}``."""
    if limit is not None:
        _BUDGET["limit"] = check_int("limit", limit, minimum=0)
    return dict(_BUDGET)


def _release(nbytes: int) -> None:
    _BUDGET["used"] -= nbytes


class CounterCache:
    """Device state of a generator-2 operator: small tables and, within the budget, materialised maps."""

    def __init__(self) -> None:
        self.store: dict[Any, Any] = {}
        self.nbytes = 0
        self._finalizer = weakref.finalize(self, _release, 0)

    def reserve(self, nbytes: int) -> bool:
        """Count ``nbytes`` more against :func:`device_buffer_budget` (given back when this cache
        is collected); False, counting nothing, when they do not fit."""
        if _BUDGET["used"] + nbytes > _BUDGET["limit"]:
            return False
        _BUDGET["used"] += nbytes
        self.nbytes += nbytes
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _release, self.nbytes)
        return True


def read_only_permutation_pair(perm: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(π, π⁻¹)`` as read-only int64 host arrays."""
    perm = np.array(perm, dtype=np.int64)
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(perm.shape[0], dtype=np.int64)
    perm.setflags(write=False)
    inverse.setflags(write=False)
    return perm, inverse


def check_last_axis(name: str, x: Any, length: int) -> None:
    """``ValueError`` unless ``x`` has ``length`` entries along its last axis."""
    if x.ndim < 1 or x.shape[-1] != length:
        raise ValueError(
            f"{name} must have length {length} along its last axis, got shape {tuple(x.shape)}"
        )
