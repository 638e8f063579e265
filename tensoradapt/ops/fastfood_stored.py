r"""Fastfood with stored maps (generator 1): the host buffers ``b, π, π⁻¹, g`` of length ``L``,
copied once per (namespace, dtype, device), and ``c = 1/sqrt(N Σ g²)`` (docs/math.md §3.8).

Both FWHTs are pruned: the input-side one runs on ``b = 2^⌈log2 n_in⌉`` entries, the output-side
one of the adjoint keeps ``b`` outputs (see :meth:`StoredFastfood._forward`,
:meth:`StoredFastfood._backward`).  Built by ``Fastfood(..., generator=GENERATOR_V1)`` and by
:meth:`Fastfood.from_buffers`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import buffers
from .._backend import device_of
from .fastfood import Fastfood
from .fwht import fwht_last
from .map_store import HostBufferCache, read_only_permutation_pair

__all__ = ["StoredFastfood"]


class StoredFastfood(Fastfood, generator=buffers.GENERATOR_V1):
    """:class:`~tensoradapt.ops.Fastfood` over host buffers drawn by generator 1 (or given)."""

    __slots__ = ()

    @staticmethod
    def _new_cache() -> HostBufferCache:
        return HostBufferCache()

    def _build(self, n_in: int, n_out: int, length: int, order: str, seed: int, group: int) -> None:
        self._init(
            n_in, n_out, order,
            buffers.rademacher(length, seed, group, "fastfood.signs"),
            buffers.permutation(length, seed, group, "fastfood.permutation"),
            buffers.gaussian(length, seed, group, "fastfood.gaussian"),
            seed, group,
        )

    def _init(self, n_in: int, n_out: int, order: str, signs: Any, perm: Any, gauss: Any,
              seed: int | None, group: int | None) -> None:
        order = self._check_order(order)
        perm, inverse = read_only_permutation_pair(perm)
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
                  "_cache": self._new_cache(), "generator": buffers.GENERATOR_V1, **arrays}
        self._freeze(**values)

    @classmethod
    def from_buffers(cls, n_in: int, n_out: int, signs: Any, permutation: Any, gaussian: Any,
                     *, order: str = "li", allow_shrink: bool = False) -> StoredFastfood:
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
        self = object.__new__(StoredFastfood)
        self._init(n_in, n_out, order, host["signs"], host["permutation"], host["gaussian"], None, None)
        return self

    @property
    def buffers(self) -> dict[str, np.ndarray]:
        return {"signs": self._signs, "permutation": self._permutation, "gaussian": self._gaussian}

    @staticmethod
    def state_bytes_of(length: int) -> int:
        """``L·(1 + 8 + 8 + 4)``: signs, π, π⁻¹ and g."""
        return length * (1 + 8 + 8 + 4)

    # ------------------------------------------------------------------ device copies of the buffers
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

    # ------------------------------------------------------------------ F and Fᵀ
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

    def _apply(self, xp: Any, x: Any, work: Any, compact: bool) -> Any:
        signs = self._buffer(xp, "signs", work, device_of(x))
        if self.order == "li":
            return self._forward(xp, x * signs[: self.n_in]) * self.scale
        return self._forward(xp, x) * (signs[: self.n_out] * self.scale)

    def _adjoint(self, xp: Any, y: Any, work: Any, padded: bool, overwrite: bool) -> Any:
        signs = self._buffer(xp, "signs", work, device_of(y))
        if self.order == "li":
            return self._backward(xp, y) * (signs[: self.n_in] * self.scale)
        return self._backward(xp, y * signs[: self.n_out]) * self.scale
