r"""Fixed random linear maps ``F`` of the SuperLoRA pipeline: Shuffle and Fastfood (docs/math.md §3.7–3.8).

Both are immutable operator objects acting on the last axis (leading axes are a batch) with
``.apply(x)`` (``F x``) and ``.adjoint(y)`` (``Fᵀ y``, the VJP).  Their random maps come from
:mod:`tensoradapt.buffers`, so the same ``(seed, group, generator)`` gives the same operator on
every backend: generator 2 (the default) computes them on the input's device from O(1) keys,
generator 1 holds host buffers whose device copies are cached per (namespace, dtype, device).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import buffers
from .._backend import check_floating, compat_namespace, compute_dtype, device_of, from_host, namespace
from .._frozen import Frozen
from .._validate import check_int
from .fwht import fwht_inplace, fwht_last, writes_in_place

__all__ = ["Fastfood", "Shuffle", "device_buffer_budget"]

_ORDERS = ("li", "paper")


class _BufferCache:
    """Per-(namespace, dtype, device) copies of host buffers (constants, not backend state)."""

    __slots__ = ("_store",)

    def __init__(self) -> None:
        self._store: dict[tuple[str, str, str, str], Any] = {}

    def get(self, xp: Any, name: str, host: Callable[[], np.ndarray], dtype: Any, device: Any) -> Any:
        """The cached device copy of ``host()`` (called only on a miss)."""
        key = (getattr(xp, "__name__", repr(xp)), name, str(dtype), str(device))
        value = self._store.get(key)
        if value is None:
            value = from_host(xp, host(), dtype=dtype, device=device)
            self._store[key] = value
        return value


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
#: Entries per chunk of a generator-2 Shuffle's walked permutation (the walk's rounds shrink, so
#: larger chunks than Fastfood's keep the per-round overhead small).
WALK_CHUNK = 1 << 16

_BUDGET = {"limit": 512 << 20, "used": 0}


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


class _CounterCache:
    """Device state of a generator-2 operator: small tables and, within the budget, materialised maps."""

    def __init__(self) -> None:
        self.store: dict[Any, Any] = {}
        self.nbytes = 0
        self._finalizer = weakref.finalize(self, _release, 0)

    def reserve(self, nbytes: int) -> bool:
        if _BUDGET["used"] + nbytes > _BUDGET["limit"]:
            return False
        _BUDGET["used"] += nbytes
        self.nbytes += nbytes
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _release, self.nbytes)
        return True


def _read_only_permutation_pair(perm: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(π, π⁻¹)`` as read-only int64 host arrays."""
    perm = np.array(perm, dtype=np.int64)
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(perm.shape[0], dtype=np.int64)
    perm.setflags(write=False)
    inverse.setflags(write=False)
    return perm, inverse


def _check_last_axis(name: str, x: Any, length: int) -> None:
    if x.ndim < 1 or x.shape[-1] != length:
        raise ValueError(
            f"{name} must have length {length} along its last axis, got shape {tuple(x.shape)}"
        )


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

    def __init__(self, n: int, seed: int, group: int = 0, *, generator: str | None = None) -> None:
        n = check_int("n", n, minimum=1)
        seed = check_int("seed", seed, minimum=0)
        group = check_int("group", group, minimum=0)
        if buffers.check_generator(generator) == buffers.GENERATOR_V2:
            buffers.check_counter_length(n)
            self._freeze(n=n, seed=seed, group=group, generator=buffers.GENERATOR_V2,
                         _key=buffers.CounterKey(seed, group, "shuffle"), _permutation=None, _inverse=None,
                         _cache=_CounterCache())
            return
        self._init(buffers.permutation(n, seed, group, "shuffle"), seed, group)

    def _init(self, perm: np.ndarray, seed: int | None, group: int | None) -> None:
        perm, inverse = _read_only_permutation_pair(perm)
        self._freeze(n=int(perm.shape[0]), seed=seed, group=group, generator=buffers.GENERATOR_V1, _key=None,
                     _permutation=perm, _inverse=inverse, _cache=_BufferCache())

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
        key = ("index", forward, getattr(xp, "__name__", repr(xp)), str(device))
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
        _check_last_axis(name, x, self.n)
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


class Fastfood(Frozen):
    r"""Fastfood random projection ``F: R^{n_in} → R^{n_out}`` (Li et al. 2018 order).

    .. math::  F z = c · \mathrm{Trunc}_{N}\big(H_L\, \mathrm{diag}(g)\, P_π\, H_L\,
               \mathrm{diag}(b)\, \mathrm{Pad}_L(z)\big), \qquad c = 1/\sqrt{N Σ_i g_i^2}

    with ``N = n_out``, ``L = 2^⌈log2 max(n_in, n_out)⌉``, unnormalised Hadamard ``H_L``,
    Rademacher ``b``, permutation ``π`` (``P_π v = v[π]``) and Gaussian ``g``, all of length
    ``L`` and drawn from ``(seed, group)``.  The normaliser makes ``E‖Fz‖² ≈ ‖z‖²``.  The adjoint
    is the reversed pipeline with ``π⁻¹``:
    ``Fᵀ y = c · Trunc_{n_in}(diag(b) H_L P_πᵀ diag(g) H_L Pad_L(y))``.

    ``order="paper"`` applies the literal SuperLoRA Eq. (3) order instead:
    ``F z = c · diag(b_{:N}) Trunc_N(H_L P_πᵀ diag(g) H_L Pad_L(z))``.

    Parameters
    ----------
    n_in, n_out : int
        Input length ``n`` (the generated entries) and output length ``N`` (the group).
        ``n_in > n_out`` (a ratio ``ρ = n_in / n_out > 1``) is rejected unless ``allow_shrink``.
    seed : int
        Non-negative base seed.
    group : int, default 0
        Group index; every group gets independent buffers.
    order : {"li", "paper"}
        Canonical Li et al. order (default) or the literal Eq. (3) order.
    allow_shrink : bool, default False
        Allow ``n_in > n_out``.
    generator : str, optional
        One of :data:`tensoradapt.buffers.GENERATORS`; default :data:`tensoradapt.buffers.GENERATOR_ID`
        (generator 2: counter-based maps computed on the device, ``c = 1/sqrt(N·L)``).  Generator 1
        draws host buffers ``b, π, g`` with ``c = 1/sqrt(N Σ g²)`` as above.

    Notes
    -----
    Cost ``O(L log L)`` each way: two FWHTs (Kronecker-GEMM), one gather and three elementwise
    products.  16-bit inputs are computed in float32 and returned in their dtype.
    """

    __slots__ = ("_cache", "_gaussian", "_inverse", "_keys", "_permutation", "_signs", "generator",
                 "group", "length", "n_in", "n_out", "order", "scale", "seed")

    def __init__(
        self,
        n_in: int,
        n_out: int,
        seed: int,
        group: int = 0,
        *,
        order: str = "li",
        allow_shrink: bool = False,
        generator: str | None = None,
    ) -> None:
        n_in, n_out, length = self._check_sizes(n_in, n_out, allow_shrink)
        seed = check_int("seed", seed, minimum=0)
        group = check_int("group", group, minimum=0)
        if buffers.check_generator(generator) == buffers.GENERATOR_V2:
            self._init_counter(n_in, n_out, length, order, seed, group)
            return
        self._init(
            n_in, n_out, order,
            buffers.rademacher(length, seed, group, "fastfood.signs"),
            buffers.permutation(length, seed, group, "fastfood.permutation"),
            buffers.gaussian(length, seed, group, "fastfood.gaussian"),
            seed, group,
        )

    @staticmethod
    def _check_sizes(n_in: Any, n_out: Any, allow_shrink: bool) -> tuple[int, int, int]:
        n_in = check_int("n_in", n_in, minimum=1)
        n_out = check_int("n_out", n_out, minimum=1)
        if n_in > n_out and not allow_shrink:
            raise ValueError(
                f"n_in ({n_in}) must be <= n_out ({n_out}): the projection ratio "
                f"rho = n_in / n_out = {n_in / n_out:.4g} must be <= 1 (pass allow_shrink=True "
                "to project to fewer entries)"
            )
        return n_in, n_out, Fastfood.length_for(n_in, n_out)

    @staticmethod
    def length_for(n_in: int, n_out: int) -> int:
        """``L = 2^⌈log2 max(n_in, n_out)⌉``, the length every transform of the operator works in
        (docs/math.md §3.8), from the sizes alone."""
        return 1 << (max(n_in, n_out) - 1).bit_length()

    def _init(self, n_in: int, n_out: int, order: str, signs: Any, perm: Any, gauss: Any,
              seed: int | None, group: int | None) -> None:
        if order not in _ORDERS:
            raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
        perm, inverse = _read_only_permutation_pair(perm)
        gauss = np.asarray(gauss, dtype=np.float32)
        total = float(np.sum(gauss.astype(np.float64) ** 2))
        if total == 0.0:
            raise ValueError("gaussian buffer must not be all zeros (the normaliser would be infinite)")
        arrays = {"_signs": np.array(signs, dtype=np.int8), "_permutation": perm,
                  "_inverse": inverse, "_gaussian": np.array(gauss, dtype=np.float32)}
        for array in (arrays["_signs"], arrays["_gaussian"]):
            array.setflags(write=False)
        values = {"n_in": n_in, "n_out": n_out, "length": int(perm.shape[0]), "order": order,
                  "seed": seed, "group": group, "scale": 1.0 / math.sqrt(n_out * total),
                  "_cache": _BufferCache(), "generator": buffers.GENERATOR_V1, "_keys": None, **arrays}
        self._freeze(**values)

    def _init_counter(self, n_in: int, n_out: int, length: int, order: str, seed: int, group: int) -> None:
        """Generator 2: three counter keys, no buffers; ``c = 1/sqrt(N·L)`` (docs/math.md §3.8)."""
        if order not in _ORDERS:
            raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
        buffers.check_counter_length(length)
        keys = {name: buffers.CounterKey(seed, group, "fastfood." + name)
                for name in ("signs", "permutation", "gaussian")}
        self._freeze(n_in=n_in, n_out=n_out, length=length, order=order, seed=seed, group=group,
                     scale=1.0 / math.sqrt(n_out * length), generator=buffers.GENERATOR_V2,
                     _keys=keys, _cache=_CounterCache(), _signs=None, _permutation=None,
                     _inverse=None, _gaussian=None)

    @classmethod
    def from_buffers(cls, n_in: int, n_out: int, signs: Any, permutation: Any, gaussian: Any,
                     *, order: str = "li", allow_shrink: bool = False) -> Fastfood:
        """Build the operator from explicit buffers of length ``L`` (e.g. a checkpoint or a test
        vector): ``signs`` in {±1}, ``permutation`` of ``[0, L)``, ``gaussian`` real."""
        n_in, n_out, length = cls._check_sizes(n_in, n_out, allow_shrink)
        host = {name: np.asarray(v) for name, v in
                (("signs", signs), ("permutation", permutation), ("gaussian", gaussian))}
        for name, value in host.items():
            if value.shape != (length,):
                raise ValueError(
                    f"{name} must have shape (L,) = ({length},) for n_in={n_in}, n_out={n_out}, "
                    f"got {value.shape}"
                )
        if not np.all(np.abs(host["signs"]) == 1):
            raise ValueError("signs must contain only -1 and +1")
        if not np.array_equal(np.sort(host["permutation"]), np.arange(length)):
            raise ValueError(f"permutation must contain each of 0..{length - 1} exactly once")
        self = cls.__new__(cls)
        self._init(n_in, n_out, order, host["signs"], host["permutation"], host["gaussian"], None, None)
        return self

    def __repr__(self) -> str:
        return (f"Fastfood(n_in={self.n_in}, n_out={self.n_out}, seed={self.seed}, "
                f"group={self.group}, order={self.order!r})")

    @property
    def ratio(self) -> float:
        """The projection ratio ``ρ = n_in / n_out``."""
        return self.n_in / self.n_out

    @property
    def buffers(self) -> dict[str, np.ndarray]:
        """The host buffers (read-only): ``signs`` (int8), ``permutation`` (int64) and
        ``gaussian`` (float32), each of length ``L``.  Generator-2 operators hold none; this
        computes them (``8·L`` bytes of int64 working memory), for tests and inspection."""
        if self._keys is None:
            return {"signs": self._signs, "permutation": self._permutation, "gaussian": self._gaussian}
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
    def state_bytes_for(n_in: int, n_out: int, generator: str | None = None) -> int:
        """:attr:`state_bytes` of ``Fastfood(n_in, n_out, ..., generator=generator)`` without
        building it (``SuperLoRA.describe`` prints it per group)."""
        length = Fastfood.length_for(n_in, n_out)
        if buffers.check_generator(generator) == buffers.GENERATOR_V2:
            return 3 * 8 * 4
        return length * (1 + 8 + 8 + 4)

    @property
    def state_bytes(self) -> int:
        """Bytes of fixed random state the operator holds on the host: ``L·(1 + 8 + 8 + 4)`` for
        generator 1 (signs, π, π⁻¹, g), O(1) for generator 2 (three keys)."""
        if self._keys is None:
            return sum(int(a.nbytes) for a in (self._signs, self._permutation, self._inverse, self._gaussian))
        return 3 * 8 * 4

    def _prepare(self, name: str, x: Any, length: int) -> tuple[Any, Any, Any, Any]:
        xp = namespace(**{name: x})
        dtype = check_floating(xp, [(name, x)])
        _check_last_axis(name, x, length)
        work = compute_dtype(xp, dtype)
        if work != dtype:
            x = xp.astype(x, work)
        return xp, x, dtype, work

    def _pad(self, xp: Any, x: Any, length: int) -> Any:
        missing = length - x.shape[-1]
        if missing == 0:
            return x
        zeros = xp.zeros((*x.shape[:-1], missing), dtype=x.dtype, device=device_of(x))
        return xp.concat([x, zeros], axis=x.ndim - 1)

    @property
    def _short(self) -> int:
        """``b``: the power of two ``>= n_in`` on which the input-side transform is pruned."""
        return 1 << (self.n_in - 1).bit_length()

    def _host(self, name: str) -> np.ndarray:
        if name == "signs":
            return self._signs
        if name == "gaussian":
            return self._gaussian
        if name == "gaussian_inverse":
            derived = self._gaussian[self._inverse]
        else:
            index = self._permutation if name.startswith("perm") else self._inverse
            if not name.endswith("_short"):
                return index
            derived = index % self._short
        derived.setflags(write=False)  # shared, not copied, by a NumPy cache entry
        return derived

    def _buffer(self, xp: Any, name: str, dtype: Any, device: Any) -> Any:
        return self._cache.get(xp, name, lambda: self._host(name), dtype, device)

    def _gather_scaled(self, xp: Any, v: Any, index: str, gauss: str) -> Any:
        """``take(v, index) * gauss`` along the last axis, multiplied in place."""
        device = device_of(v)
        out = xp.take(v, self._buffer(xp, index, xp.int64, device), axis=v.ndim - 1)
        out *= self._buffer(xp, gauss, v.dtype, device)
        return out

    def _forward(self, xp: Any, u: Any) -> Any:
        r"""``Trunc_N(H_L · G' · P' · H_L · Pad_L(u))`` with the input-side transform pruned.

        With ``L = a·b`` (``b`` = :attr:`_short`) and ``u`` in the first ``b`` entries only,
        ``H_L Pad_L(u) = tile(H_b Pad_b(u), a)`` because the first column of ``H_a`` is all ones;
        so the gather that follows reads from the short transform ``r`` with indices ``mod b``.
        Li order: ``G' P' = diag(g) P_π``; paper order: ``P_πᵀ diag(g) = diag(g[π⁻¹]) P_πᵀ``.
        """
        short = fwht_last(xp, self._pad(xp, u, self._short))
        index, gauss = ("perm_short", "gaussian") if self.order == "li" else ("inverse_short", "gaussian_inverse")
        # passed as a temporary so that fwht_last can free it after its first pass
        return fwht_last(xp, self._gather_scaled(xp, short, index, gauss))[..., : self.n_out]

    def _backward(self, xp: Any, y: Any) -> Any:
        r"""``Trunc_{n_in}(H_L · P'ᵀ · G' · H_L · Pad_L(y))`` with the output-side transform pruned.

        Only the first ``b`` outputs of the last ``H_L`` are kept, and row 0 of ``H_a`` is all
        ones, so they are ``H_b`` of the sum of the ``a`` rows of the ``(a, b)`` view.
        """
        v = fwht_last(xp, self._pad(xp, y, self.length))
        if self.order == "li":
            w = self._gather_scaled(xp, v, "inverse", "gaussian_inverse")
        else:
            w = self._gather_scaled(xp, v, "perm", "gaussian")
        del v
        rows = xp.reshape(w, (*w.shape[:-1], self.length // self._short, self._short))
        return fwht_last(xp, xp.sum(rows, axis=rows.ndim - 2))[..., : self.n_in]

    def apply(self, x: Any, *, compact: bool = False) -> Any:
        """``y = F x`` for ``x`` of shape ``(..., n_in)``; returns ``(..., n_out)``.

        Generator 2 returns a view of its length-``L`` work array (no copy: the least peak for
        one call); ``compact=True`` returns a copy of the first ``n_out`` entries instead, so that
        ``L − n_out`` entries are not kept alive (for many groups whose outputs are all kept)."""
        xp, x, dtype, work = self._prepare("x", x, self.n_in)
        if self._keys is not None:
            y = self._counter_apply(xp, x)
            if compact and self.length > self.n_out and work == dtype:
                y = xp.asarray(y, copy=True)
            return y if work == dtype else xp.astype(y, dtype)
        signs = self._buffer(xp, "signs", work, device_of(x))
        if self.order == "li":
            y = self._forward(xp, x * signs[: self.n_in]) * self.scale
        else:
            y = self._forward(xp, x) * (signs[: self.n_out] * self.scale)
        return y if work == dtype else xp.astype(y, dtype)

    def adjoint(self, y: Any, *, overwrite: bool = False) -> Any:
        """``z̄ = Fᵀ y`` for ``y`` of shape ``(..., n_out)``; returns ``(..., n_in)`` (the VJP).

        Generator 2 also accepts ``y`` zero-padded to ``(..., L)`` (entries past ``n_out`` must be
        zero), and with ``overwrite=True`` uses such a ``y`` as its workspace (no second length-``L``
        array); the generator passes its freshly gathered group cotangent this way."""
        if self._keys is not None and getattr(y, "ndim", 0) >= 1 and y.shape[-1] == self.length:
            xp, y, dtype, work = self._prepare("y", y, self.length)
            z = self._counter_adjoint(xp, y, padded=True, overwrite=overwrite or work != dtype)
            return z if work == dtype else xp.astype(z, dtype)
        xp, y, dtype, work = self._prepare("y", y, self.n_out)
        if self._keys is not None:
            z = self._counter_adjoint(xp, y)
            return z if work == dtype else xp.astype(z, dtype)
        signs = self._buffer(xp, "signs", work, device_of(y))
        if self.order == "li":
            z = self._backward(xp, y) * (signs[: self.n_in] * self.scale)
        else:
            z = self._backward(xp, y * signs[: self.n_out]) * self.scale
        return z if work == dtype else xp.astype(z, dtype)

    # ------------------------------------------------------------------ generator 2 (on the device)
    def _tables(self, xp: Any, device: Any) -> tuple[Any, ...]:
        key = ("tables", getattr(xp, "__name__", repr(xp)), str(device))
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

    def _maps(self, xp: Any, forward: bool, dtype: Any, device: Any, stored_chunk: int = MAP_CHUNK):
        """Yield ``(j0, j1, index, g)`` chunks of ``stored_chunk`` entries (a power of two: few,
        large gathers) from materialised arrays when the budget allows, else computed in chunks of
        at most :func:`_computed_chunk`; the maps are elementwise, so the chunking never changes a
        value."""
        length, chunk = self.length, min(self.length, MAP_CHUNK)
        key = ("maps", forward, getattr(xp, "__name__", repr(xp)), str(dtype), str(device))
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
        cached = store[key]
        # stored maps come in chunks of stored_chunk entries, computed ones of _computed_chunk(L)
        wanted = stored_chunk if cached is not None else min(stored_chunk, _computed_chunk(length))
        chunk = min(length, max(chunk, wanted))
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

    def _counter_apply(self, xp: Any, x: Any) -> Any:
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
            step = _computed_chunk(self.length)
            for j0 in range(0, self.n_out, step):
                j1 = min(j0 + step, self.n_out)
                out[..., j0:j1] = out[..., j0:j1] * (self._signs_chunk(xp, j0, j1, dtype, device) * self.scale)
        return out[..., : self.n_out]

    def _counter_adjoint(self, xp: Any, y: Any, padded: bool = False, overwrite: bool = False) -> Any:
        device, dtype = device_of(y), y.dtype
        n_out = self.n_out
        if padded and overwrite and writes_in_place(xp, y):
            v = y
            if self.order != "li":
                step = _computed_chunk(self.length)
                for j0 in range(0, n_out, step):
                    j1 = min(j0 + step, n_out)
                    v[..., j0:j1] = v[..., j0:j1] * self._signs_chunk(xp, j0, j1, dtype, device)
        elif self.order == "li":
            v = xp.zeros((*y.shape[:-1], self.length), dtype=dtype, device=device)
            v[..., :n_out] = y[..., :n_out]
        else:
            v = self._signed(xp, y, n_out, self.length)
        v = fwht_inplace(xp, v)
        b = self._short
        rows = xp.zeros((*y.shape[:-1], b), dtype=dtype, device=device)
        last = v.ndim - 1
        # stored maps come in chunks of at most b entries when b >= MAP_CHUNK (each entry of rows then
        # gets one addition per chunk, in the same order as with MAP_CHUNK: the same bits), else MAP_CHUNK
        stored = min(STORED_CHUNK, b) if b >= MAP_CHUNK else MAP_CHUNK
        for j0, j1, index, g in self._maps(xp, False, dtype, device, stored):
            w = xp.take(v, index, axis=last) * g
            if j1 - j0 >= b:
                rows += xp.sum(xp.reshape(w, (*w.shape[:-1], (j1 - j0) // b, b)), axis=w.ndim - 1)
            else:
                lo = j0 % b
                rows[..., lo:lo + j1 - j0] += w
        del v
        z = fwht_inplace(xp, rows)[..., : self.n_in]
        if writes_in_place(xp, rows):  # rows is ours: sign and scale it in place (no n_in-long copies)
            if self.order == "li":
                step = _computed_chunk(self.length)
                for j0 in range(0, self.n_in, step):
                    j1 = min(j0 + step, self.n_in)
                    z[..., j0:j1] *= self._signs_chunk(xp, j0, j1, dtype, device) * self.scale
            else:
                z *= self.scale
            return z
        if self.order == "li":
            return self._signed(xp, z, self.n_in, self.n_in) * self.scale
        return z * self.scale
