r"""Fixed random linear maps ``F`` of the SuperLoRA pipeline: Shuffle and Fastfood (docs/math.md §3.7–3.8).

Both are immutable operator objects acting on the last axis (leading axes are a batch) with
``.apply(x)`` (``F x``) and ``.adjoint(y)`` (``Fᵀ y``, the VJP).  Their random maps come from
:mod:`tensoradapt.buffers`, so the same ``(seed, group, generator)`` gives the same operator on
every backend: generator 2 (the default) computes them on the input's device from O(1) keys,
generator 1 holds host buffers whose device copies are cached per (namespace, dtype, device).

This module holds :class:`Shuffle` and is where both operators are imported from.  Fastfood's two
implementations live in their own modules behind one constructor (:mod:`.fastfood`, the factory
and what they share; :mod:`.fastfood_stored`, generator 1; :mod:`.fastfood_counter`, generator 2),
and where the maps are kept once built in :mod:`.map_store`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import buffers
from .._backend import check_floating, compat_namespace, device_of, namespace
from .._frozen import Frozen
from .._validate import check_int
from .fastfood import Fastfood
from .fastfood_counter import CounterFastfood
from .fastfood_stored import StoredFastfood
from .map_store import (
    CounterCache,
    HostBufferCache,
    check_last_axis,
    device_buffer_budget,
    namespace_name,
    read_only_permutation_pair,
)

__all__ = ["CounterFastfood", "Fastfood", "Shuffle", "StoredFastfood", "device_buffer_budget"]

# The names pickles made by version 48104a3 and earlier give the caches (the caches are no longer
# pickled, Frozen._TRANSIENT; these names only let such pickles resolve the objects they hold).
_BufferCache = HostBufferCache
_CounterCache = CounterCache

#: Entries per chunk of a generator-2 Shuffle's walked permutation (the walk's rounds shrink, so
#: larger chunks than Fastfood's keep the per-round overhead small).
WALK_CHUNK = 1 << 16


class Shuffle(Frozen):
    r"""Random permutation ``y = z[π]`` (gather, ``y_i = z_{π(i)}``) of length ``n``.

    ``π`` is a fixed permutation of ``(seed, group, "shuffle")`` (docs/math.md D6, §3.7): with
    generator 2 (the default) :func:`tensoradapt.buffers.counter_walk_permutation`, computed on
    the input's device (O(1) state: one key); with generator 1 the host array
    :func:`tensoradapt.buffers.permutation`.  The adjoint is the inverse permutation,
    ``Fᵀ y = y[π⁻¹]``, so ``adjoint(apply(z)) == z``.

    Parameters
    ----------
    n : int
        Length of the shuffled axis (``>= 1``; at most ``2**32`` with generator 2).
    seed : int
        Non-negative base seed.
    group : int, default 0
        Group index; each group gets an independent permutation.
    generator : str, optional
        One of :data:`tensoradapt.buffers.GENERATORS`; default :data:`tensoradapt.buffers.GENERATOR_ID`.

    Examples
    --------
    >>> import numpy as np
    >>> s = Shuffle.from_permutation(np.array([2, 0, 3, 1]))
    >>> s.apply(np.array([10., 20., 30., 40.])).tolist()
    [30.0, 10.0, 40.0, 20.0]
    """

    __slots__ = ("_cache", "_inverse", "_key", "_permutation", "generator", "group", "n", "seed")
    # the cache of device copies / computed indices is not pickled (Frozen._TRANSIENT)
    _TRANSIENT = ("_cache",)

    def __init__(self, n: int, seed: int, group: int = 0, *, generator: str | None = None) -> None:
        n = check_int("n", n, minimum=1)
        seed = check_int("seed", seed, minimum=0)
        group = check_int("group", group, minimum=0)
        if buffers.check_generator(generator) == buffers.GENERATOR_V2:
            buffers.check_counter_length(n)
            self._freeze(n=n, seed=seed, group=group, generator=buffers.GENERATOR_V2,
                         _key=buffers.CounterKey(seed, group, "shuffle"), _permutation=None, _inverse=None,
                         _cache=CounterCache())
            return
        self._init(buffers.permutation(n, seed, group, "shuffle"), seed, group)

    def _init(self, perm: np.ndarray, seed: int | None, group: int | None) -> None:
        perm, inverse = read_only_permutation_pair(perm)
        self._freeze(n=int(perm.shape[0]), seed=seed, group=group, generator=buffers.GENERATOR_V1, _key=None,
                     _permutation=perm, _inverse=inverse, _cache=HostBufferCache())

    def _restore_transient(self) -> None:
        """After unpickling: a fresh, empty cache of the generator's kind."""
        cache = CounterCache() if self._key is not None else HostBufferCache()
        object.__setattr__(self, "_cache", cache)

    @classmethod
    def from_permutation(cls, permutation: Any) -> Shuffle:
        """Build the operator from an explicit permutation of ``[0, n)`` (e.g. a test vector)."""
        perm = np.asarray(permutation)
        if perm.ndim != 1 or perm.shape[0] < 1 or not np.issubdtype(perm.dtype, np.integer):
            raise ValueError(f"permutation must be a non-empty 1-D integer array, got {permutation!r:.80}")
        if not np.array_equal(np.sort(perm), np.arange(perm.shape[0])):
            raise ValueError(f"permutation must contain each of 0..{perm.shape[0] - 1} exactly once")
        self = cls.__new__(cls)
        self._init(perm, None, None)
        return self

    def __repr__(self) -> str:
        return f"Shuffle(n={self.n}, seed={self.seed}, group={self.group})"

    @staticmethod
    def state_bytes_for(n: int, generator: str | None = None) -> int:
        """:attr:`state_bytes` of ``Shuffle(n, ..., generator=generator)`` without building it."""
        if buffers.check_generator(generator) == buffers.GENERATOR_V2:
            return 8 * 4
        return 16 * n

    @property
    def state_bytes(self) -> int:
        """Bytes of fixed random state held on the host: ``π`` and ``π⁻¹`` as int64 (``16·n``) for
        generator 1, one key of eight 32-bit words for generator 2."""
        if self._key is None:
            return int(self._permutation.nbytes + self._inverse.nbytes)
        return 8 * 4

    @property
    def permutation(self) -> np.ndarray:
        """The host permutation ``π`` (read-only int64 array).  A generator-2 operator holds none;
        this computes it (``8·n`` bytes), for tests and inspection."""
        if self._key is None:
            return self._permutation
        index = np.arange(self.n, dtype=np.int64)
        perm = buffers.counter_walk_permutation(compat_namespace(np), index, self._key, self.n)
        perm.setflags(write=False)
        return perm

    def _counter_index(self, xp: Any, forward: bool, j0: int, j1: int, device: Any) -> Any:
        """``π(j)`` (``forward``) or ``π⁻¹(j)`` for ``j ∈ [j0, j1)``, int64 on ``device``."""
        j = xp.arange(j0, j1, dtype=xp.int64, device=device)
        walk = buffers.counter_walk_permutation if forward else buffers.counter_walk_inverse_permutation
        return walk(xp, j, self._key, self.n)

    def _counter_gather(self, xp: Any, x: Any, forward: bool) -> Any:
        """Generator 2: the gather with indices materialised on the device within the budget of
        :func:`device_buffer_budget` (4 or 8 bytes per entry), else computed chunk by chunk."""
        device, n, last, chunk = device_of(x), self.n, x.ndim - 1, WALK_CHUNK
        key = ("index", forward, namespace_name(xp), str(device))
        store = self._cache.store
        if key not in store:
            itemsize = 4 if n <= 1 << 31 else 8
            store[key] = None
            if self._cache.reserve(n * itemsize):
                int_type = xp.int32 if itemsize == 4 else xp.int64
                store[key] = xp.concat([xp.astype(self._counter_index(xp, forward, j0, min(j0 + chunk, n), device),
                                                  int_type) for j0 in range(0, n, chunk)])
        index = store[key]
        if index is not None:
            return xp.take(x, index, axis=last)
        if n <= chunk:
            return xp.take(x, self._counter_index(xp, forward, 0, n, device), axis=last)
        out = xp.empty(x.shape, dtype=x.dtype, device=device)
        for j0 in range(0, n, chunk):
            j1 = min(j0 + chunk, n)
            out[..., j0:j1] = xp.take(x, self._counter_index(xp, forward, j0, j1, device), axis=last)
        return out

    def _gather(self, x: Any, name: str, which: str) -> Any:
        xp = namespace(**{name: x})
        check_floating(xp, [(name, x)])
        check_last_axis(name, x, self.n)
        if self._key is not None:
            return self._counter_gather(xp, x, which == "perm")
        host = self._permutation if which == "perm" else self._inverse
        index = self._cache.get(xp, which, lambda: host, xp.int64, device_of(x))
        return xp.take(x, index, axis=x.ndim - 1)

    def apply(self, x: Any) -> Any:
        """``y = x[..., π]``; ``x`` of shape ``(..., n)``, result ``(..., n)``."""
        return self._gather(x, "x", "perm")

    def adjoint(self, y: Any) -> Any:
        """``Fᵀ y = y[..., π⁻¹]`` (the inverse permutation); shape ``(..., n)``."""
        return self._gather(y, "y", "inverse")
