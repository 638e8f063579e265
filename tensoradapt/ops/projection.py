r"""Fixed random linear maps ``F`` of the SuperLoRA pipeline: Shuffle and Fastfood (docs/math.md §3.7–3.8).

Both are immutable operator objects acting on the last axis (leading axes are a batch) with
``.apply(x)`` (``F x``) and ``.adjoint(y)`` (``Fᵀ y``, the VJP).  Their random buffers come from
:mod:`tensoradapt.buffers`, so the same ``(seed, group)`` gives the same operator on every
backend.  Device copies of the buffers are cached per (namespace, dtype, device).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import buffers
from .._backend import check_floating, compute_dtype, device_of, from_host, namespace
from .._frozen import Frozen
from .._validate import check_int
from .fwht import fwht_last

__all__ = ["Fastfood", "Shuffle"]

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

    ``π`` is :func:`tensoradapt.buffers.permutation` of ``(seed, group, "shuffle")``.  The adjoint
    is the inverse permutation, ``Fᵀ y = y[π⁻¹]``, so ``adjoint(apply(z)) == z``.

    Parameters
    ----------
    n : int
        Length of the shuffled axis (``>= 1``).
    seed : int
        Non-negative base seed.
    group : int, default 0
        Group index; each group gets an independent permutation.

    Examples
    --------
    >>> import numpy as np
    >>> s = Shuffle.from_permutation(np.array([2, 0, 3, 1]))
    >>> s.apply(np.array([10., 20., 30., 40.])).tolist()
    [30.0, 10.0, 40.0, 20.0]
    """

    __slots__ = ("_cache", "_inverse", "_permutation", "group", "n", "seed")

    def __init__(self, n: int, seed: int, group: int = 0) -> None:
        n = check_int("n", n, minimum=1)
        seed = check_int("seed", seed, minimum=0)
        group = check_int("group", group, minimum=0)
        self._init(buffers.permutation(n, seed, group, "shuffle"), seed, group)

    def _init(self, perm: np.ndarray, seed: int | None, group: int | None) -> None:
        perm, inverse = _read_only_permutation_pair(perm)
        self._freeze(n=int(perm.shape[0]), seed=seed, group=group, _permutation=perm,
                     _inverse=inverse, _cache=_BufferCache())

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

    @property
    def permutation(self) -> np.ndarray:
        """The host permutation ``π`` (read-only int64 array)."""
        return self._permutation

    def _gather(self, x: Any, name: str, which: str) -> Any:
        xp = namespace(**{name: x})
        check_floating(xp, [(name, x)])
        _check_last_axis(name, x, self.n)
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

    Notes
    -----
    Cost ``O(L log L)`` each way: two FWHTs (Kronecker-GEMM), one gather and three elementwise
    products.  16-bit inputs are computed in float32 and returned in their dtype.
    """

    __slots__ = ("_cache", "_gaussian", "_inverse", "_permutation", "_signs", "group",
                 "length", "n_in", "n_out", "order", "scale", "seed")

    def __init__(
        self,
        n_in: int,
        n_out: int,
        seed: int,
        group: int = 0,
        *,
        order: str = "li",
        allow_shrink: bool = False,
    ) -> None:
        n_in, n_out, length = self._check_sizes(n_in, n_out, allow_shrink)
        seed = check_int("seed", seed, minimum=0)
        group = check_int("group", group, minimum=0)
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
        return n_in, n_out, 1 << (max(n_in, n_out) - 1).bit_length()

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
                  "_cache": _BufferCache(), **arrays}
        self._freeze(**values)

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
        ``gaussian`` (float32), each of length ``L``."""
        return {"signs": self._signs, "permutation": self._permutation, "gaussian": self._gaussian}

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

    def apply(self, x: Any) -> Any:
        """``y = F x`` for ``x`` of shape ``(..., n_in)``; returns ``(..., n_out)``."""
        xp, x, dtype, work = self._prepare("x", x, self.n_in)
        signs = self._buffer(xp, "signs", work, device_of(x))
        if self.order == "li":
            y = self._forward(xp, x * signs[: self.n_in]) * self.scale
        else:
            y = self._forward(xp, x) * (signs[: self.n_out] * self.scale)
        return y if work == dtype else xp.astype(y, dtype)

    def adjoint(self, y: Any) -> Any:
        """``z̄ = Fᵀ y`` for ``y`` of shape ``(..., n_out)``; returns ``(..., n_in)`` (the VJP)."""
        xp, y, dtype, work = self._prepare("y", y, self.n_out)
        signs = self._buffer(xp, "signs", work, device_of(y))
        if self.order == "li":
            z = self._backward(xp, y) * (signs[: self.n_in] * self.scale)
        else:
            z = self._backward(xp, y * signs[: self.n_out]) * self.scale
        return z if work == dtype else xp.astype(z, dtype)
