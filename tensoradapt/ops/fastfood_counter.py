r"""Fastfood with counter maps (generator 2, the default): ``b``, ``π`` and ``g`` computed on the
input's device from three counter keys (O(1) state), ``c = 1/sqrt(N·L)`` (docs/math.md D6, §3.8).

The maps are elementwise in the position, so they are computed in chunks (or, within
:func:`~tensoradapt.ops.map_store.device_buffer_budget`, materialised once per direction, dtype
and device) without changing a bit; the transforms run in place on one length-``L`` work array.
Built by ``Fastfood(..., generator=GENERATOR_V2)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from .. import buffers
from .._backend import compat_namespace, device_of, from_host
from .fastfood import Fastfood
from .fwht import fwht_inplace, writes_in_place
from .map_store import CounterCache, namespace_name

__all__ = ["COMPUTED_CHUNK", "MAP_CHUNK", "STORED_CHUNK", "CounterFastfood"]

#: Entries of ``L`` handled per chunk by generator 2's on-device maps.
MAP_CHUNK = 1 << 12
#: Entries per chunk when a generator-2 Fastfood's maps are stored on the device (one gather each).
STORED_CHUNK = 1 << 18
#: Most entries per chunk when generator-2 maps and signs are computed per call (see _computed_chunk).
COMPUTED_CHUNK = 1 << 16


def _computed_chunk(length: int) -> int:
    """Entries per chunk of maps and signs computed per call for a transform of ``length`` entries:
    ``length / 256`` between ``MAP_CHUNK`` and ``COMPUTED_CHUNK``.  Few device calls on long
    transforms (4096-entry chunks made an unstored map of ``L = 2^27`` cost 32,768 rounds of Python
    dispatch per pass), while a chunk's hashing temporaries (about 200 bytes per entry) stay under
    a fifth of the transform's own float32 arrays."""
    return max(MAP_CHUNK, min(COMPUTED_CHUNK, length >> 8))


class CounterFastfood(Fastfood, generator=buffers.GENERATOR_V2):
    """:class:`~tensoradapt.ops.Fastfood` whose maps are computed on the device (generator 2)."""

    __slots__ = ()
    ACCEPTS_PADDED = True

    @staticmethod
    def _new_cache() -> CounterCache:
        return CounterCache()

    def _build(self, n_in: int, n_out: int, length: int, order: str, seed: int, group: int) -> None:
        """Three counter keys, no buffers; ``c = 1/sqrt(N·L)`` (docs/math.md §3.8)."""
        buffers.check_counter_length(length)
        keys = {name: buffers.CounterKey(seed, group, "fastfood." + name)
                for name in ("signs", "permutation", "gaussian")}
        self._freeze(n_in=n_in, n_out=n_out, length=length, order=order, seed=seed, group=group,
                     scale=1.0 / math.sqrt(n_out * length), generator=buffers.GENERATOR_V2,
                     _keys=keys, _cache=self._new_cache())

    @property
    def buffers(self) -> dict[str, np.ndarray]:
        xp = compat_namespace(np)
        index = np.arange(self.length, dtype=np.int64)
        bits = self.length.bit_length() - 1
        out = {"signs": buffers.counter_signs(xp, index, self._keys["signs"], np.int8),
               "permutation": buffers.counter_permutation(xp, index, self._keys["permutation"], bits),
               "gaussian": buffers.counter_gaussian(xp, index, self._keys["gaussian"],
                                                    buffers.gaussian_tables(), np.float32)}
        for value in out.values():
            value.setflags(write=False)
        return out

    @staticmethod
    def state_bytes_of(length: int) -> int:
        """Three keys of eight 32-bit words, whatever ``length``."""
        return 3 * 8 * 4

    # ------------------------------------------------------------------ the maps, chunk by chunk
    def _tables(self, xp: Any, device: Any) -> tuple[Any, ...]:
        key = ("tables", namespace_name(xp), str(device))
        store = self._cache.store
        if key not in store:
            store[key] = tuple(from_host(xp, t, dtype=xp.float64, device=device)
                               for t in buffers.gaussian_tables())
        return store[key]

    def _signs_chunk(self, xp: Any, j0: int, j1: int, dtype: Any, device: Any) -> Any:
        index = xp.arange(j0, j1, dtype=xp.int64, device=device)
        return buffers.counter_signs(xp, index, self._keys["signs"], dtype)

    def _map_chunk(self, xp: Any, j0: int, j1: int, forward: bool, dtype: Any, device: Any) -> tuple[Any, Any]:
        """``(index, g)`` for output positions ``[j0, j1)`` of the gather-and-scale step.

        Li forward ``v[π(j)] · g(j)``, Li adjoint ``v[π⁻¹(j)] · g(π⁻¹(j))``; paper order the other
        way round.  Forward indices read the short transform (``mod b``)."""
        bits = self.length.bit_length() - 1
        j = xp.arange(j0, j1, dtype=xp.int64, device=device)
        if forward == (self.order == "li"):
            index = buffers.counter_permutation(xp, j, self._keys["permutation"], bits)
            at = j
        else:
            index = buffers.counter_inverse_permutation(xp, j, self._keys["permutation"], bits)
            at = index
        g = buffers.counter_gaussian(xp, at, self._keys["gaussian"], self._tables(xp, device), xp.float32)
        if g.dtype != dtype:
            g = xp.astype(g, dtype)  # the Gaussians are float32 values in every compute dtype
        if forward:
            index = xp.bitwise_and(index, self._short - 1)
        return index, g

    def _stored_maps(self, xp: Any, forward: bool, dtype: Any, device: Any) -> Any:
        """The whole ``(index, g)`` of a direction on the device when the budget allows (kept),
        else None."""
        length, chunk = self.length, min(self.length, MAP_CHUNK)
        key = ("maps", forward, namespace_name(xp), str(dtype), str(device))
        store = self._cache.store
        if key not in store:
            itemsize = 4 if length <= 1 << 31 else 8
            nbytes = length * (itemsize + xp.finfo(dtype).bits // 8)
            store[key] = None
            if self._cache.reserve(nbytes):
                int_type = xp.int32 if itemsize == 4 else xp.int64
                parts = [self._map_chunk(xp, j0, min(j0 + chunk, length), forward, dtype, device)
                         for j0 in range(0, length, chunk)]
                store[key] = (xp.concat([xp.astype(p[0], int_type) for p in parts]),
                              xp.concat([p[1] for p in parts]))
        return store[key]

    def _maps(self, xp: Any, forward: bool, dtype: Any, device: Any,
              stored_chunk: int = MAP_CHUNK) -> Iterator[tuple[int, int, Any, Any]]:
        """Yield ``(j0, j1, index, g)`` chunks of ``stored_chunk`` entries (a power of two: few,
        large gathers) from materialised arrays when the budget allows, else computed in chunks of
        at most :func:`_computed_chunk`; the maps are elementwise, so the chunking never changes a
        value."""
        length = self.length
        cached = self._stored_maps(xp, forward, dtype, device)
        # stored maps come in chunks of stored_chunk entries, computed ones of _computed_chunk(L)
        wanted = stored_chunk if cached is not None else min(stored_chunk, _computed_chunk(length))
        chunk = min(length, max(min(length, MAP_CHUNK), wanted))
        for j0 in range(0, length, chunk):
            j1 = min(j0 + chunk, length)
            if cached is None:
                index, g = self._map_chunk(xp, j0, j1, forward, dtype, device)
            else:
                index, g = cached[0][j0:j1], cached[1][j0:j1]
            yield j0, j1, index, g

    def _signed(self, xp: Any, x: Any, length: int, total: int) -> Any:
        """``Pad_total(b_{:length} ⊙ x)`` as a fresh array, built chunk by chunk."""
        device = device_of(x)
        out = xp.zeros((*x.shape[:-1], total), dtype=x.dtype, device=device)
        step = _computed_chunk(total)  # elementwise: the chunk size changes no value
        for j0 in range(0, length, step):
            j1 = min(j0 + step, length)
            out[..., j0:j1] = x[..., j0:j1] * self._signs_chunk(xp, j0, j1, x.dtype, device)
        return out

    def _sign_in_place(self, xp: Any, v: Any, count: int, factor: float | None = None) -> None:
        """``v[..., :count] *= b_{:count}`` (times ``factor``), chunk by chunk."""
        device, dtype = device_of(v), v.dtype
        step = _computed_chunk(self.length)
        for j0 in range(0, count, step):
            j1 = min(j0 + step, count)
            signs = self._signs_chunk(xp, j0, j1, dtype, device)
            v[..., j0:j1] = v[..., j0:j1] * (signs if factor is None else signs * factor)

    # ------------------------------------------------------------------ F and Fᵀ
    def _apply(self, xp: Any, x: Any, work: Any, compact: bool) -> Any:
        device, dtype = device_of(x), x.dtype
        if self.order == "li":
            short = self._signed(xp, x, self.n_in, self._short)
        else:
            short = self._pad(xp, xp.asarray(x, copy=True), self._short)
        short = fwht_inplace(xp, short)
        out = xp.empty((*x.shape[:-1], self.length), dtype=dtype, device=device)
        last = short.ndim - 1
        for j0, j1, index, g in self._maps(xp, True, dtype, device, STORED_CHUNK):
            out[..., j0:j1] = xp.take(short, index, axis=last) * g
        del short
        out = fwht_inplace(xp, out)
        if self.order == "li":
            out *= self.scale
        else:
            self._sign_in_place(xp, out, self.n_out, self.scale)
        y = out[..., : self.n_out]
        if compact and self.length > self.n_out:
            y = xp.asarray(y, copy=True)
        return y

    def _adjoint(self, xp: Any, y: Any, work: Any, padded: bool, overwrite: bool) -> Any:
        device, dtype = device_of(y), y.dtype
        n_out = self.n_out
        if padded and overwrite and writes_in_place(xp, y):
            v = y
            if self.order != "li":
                self._sign_in_place(xp, v, n_out)
        elif self.order == "li":
            v = xp.zeros((*y.shape[:-1], self.length), dtype=dtype, device=device)
            v[..., :n_out] = y[..., :n_out]
        else:
            v = self._signed(xp, y, n_out, self.length)
        rows = self._gathered_rows(xp, fwht_inplace(xp, v))
        z = fwht_inplace(xp, rows)[..., : self.n_in]
        if writes_in_place(xp, rows):  # rows is ours: sign and scale it in place (no n_in-long copies)
            if self.order == "li":
                self._scale_signs_in_place(xp, z)
            else:
                z *= self.scale
            return z
        if self.order == "li":
            return self._signed(xp, z, self.n_in, self.n_in) * self.scale
        return z * self.scale

    def _gathered_rows(self, xp: Any, v: Any) -> Any:
        """``Σ_rows`` of the ``(L/b, b)`` view of ``P'ᵀ G' v`` (the pruned last transform's input),
        accumulated chunk by chunk; ``v`` is consumed."""
        b = self._short
        rows = xp.zeros((*v.shape[:-1], b), dtype=v.dtype, device=device_of(v))
        last = v.ndim - 1
        # stored maps come in chunks of at most b entries when b >= MAP_CHUNK (each entry of rows then
        # gets one addition per chunk, in the same order as with MAP_CHUNK: the same bits), else MAP_CHUNK
        stored = min(STORED_CHUNK, b) if b >= MAP_CHUNK else MAP_CHUNK
        for j0, j1, index, g in self._maps(xp, False, v.dtype, device_of(v), stored):
            w = xp.take(v, index, axis=last) * g
            if j1 - j0 >= b:
                rows += xp.sum(xp.reshape(w, (*w.shape[:-1], (j1 - j0) // b, b)), axis=w.ndim - 1)
            else:
                lo = j0 % b
                rows[..., lo:lo + j1 - j0] += w
        return rows

    def _scale_signs_in_place(self, xp: Any, z: Any) -> None:
        """``z *= b_{:n_in} · c`` in place, chunk by chunk (``*=``, as the reference pipeline)."""
        device, dtype = device_of(z), z.dtype
        step = _computed_chunk(self.length)
        for j0 in range(0, self.n_in, step):
            j1 = min(j0 + step, self.n_in)
            z[..., j0:j1] *= self._signs_chunk(xp, j0, j1, dtype, device) * self.scale
