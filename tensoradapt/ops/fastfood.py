r"""Fastfood, the fixed random projection ``F: R^{n_in} → R^{n_out}`` (docs/math.md §3.8): the public
class and the factory that picks its maps' implementation by generator id.

``Fastfood(n_in, n_out, seed, group, generator=…)`` returns a
:class:`~tensoradapt.ops.fastfood_stored.StoredFastfood` for generator 1 (host buffers ``b, π, g``)
or a :class:`~tensoradapt.ops.fastfood_counter.CounterFastfood` for generator 2 (maps computed on
the device from three counter keys); both are :class:`Fastfood` instances, so ``isinstance`` and
every documented attribute work on either.  This module holds what the two share: the size rules,
input checks, the 16-bit compute dtype and the ``apply`` / ``adjoint`` entry points; each
implementation registers itself with its generator id (``class X(Fastfood, generator=id)``).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from .. import buffers
from .._backend import check_floating, compute_dtype, device_of, namespace
from .._frozen import Frozen
from .._validate import check_int
from .map_store import check_last_axis

__all__ = ["ORDERS", "Fastfood"]

#: The two orders of the pipeline: Li et al.'s (default) and the literal SuperLoRA Eq. (3).
ORDERS = ("li", "paper")


class Fastfood(Frozen, ABC):
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
        draws host buffers ``b, π, g`` with ``c = 1/sqrt(N Σ g²)`` as above.  The constructor
        returns the implementation of that generator (module docstring), a :class:`Fastfood`.

    Notes
    -----
    Cost ``O(L log L)`` each way: two FWHTs (Kronecker-GEMM), one gather and three elementwise
    products.  16-bit inputs are computed in float32 and returned in their dtype.
    """

    # every slot of both implementations (each sets its own), so that an object's class can follow
    # its generator id when it is unpickled (a pickle names the class it was made by)
    __slots__ = ("_cache", "_gaussian", "_inverse", "_keys", "_permutation", "_signs", "generator",
                 "group", "length", "n_in", "n_out", "order", "scale", "seed")

    #: The generator id an implementation reproduces.
    GENERATOR: ClassVar[str]
    #: Whether :meth:`adjoint` also takes ``y`` zero-padded to ``(..., L)``.
    ACCEPTS_PADDED: ClassVar[bool] = False
    _implementations: ClassVar[dict[str, type[Fastfood]]] = {}

    def __init_subclass__(cls, *, generator: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.GENERATOR = buffers.check_generator(generator)
        Fastfood._implementations[cls.GENERATOR] = cls

    @staticmethod
    def implementation(generator: str | None = None) -> type[Fastfood]:
        """The class that implements generator id ``generator`` (``None``: the default)."""
        return Fastfood._implementations[buffers.check_generator(generator)]

    def __new__(cls, *args: Any, **kwargs: Any) -> Fastfood:
        if cls is Fastfood:
            generator = kwargs.get("generator")
            # an unknown id takes the default's class, whose __init__ then refuses it in argument order
            known = isinstance(generator, str) and generator in Fastfood._implementations
            cls = Fastfood.implementation(generator if known else None)
        return super().__new__(cls)

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
        generator = buffers.check_generator(generator)
        if generator != self.GENERATOR:
            raise ValueError(f"{type(self).__name__} implements generator {self.GENERATOR!r}, got "
                             f"generator={generator!r} (Fastfood(...) picks the implementation)")
        self._build(n_in, n_out, length, self._check_order(order), seed, group)

    @abstractmethod
    def _build(self, n_in: int, n_out: int, length: int, order: str, seed: int, group: int) -> None:
        """Set the implementation's state from checked arguments."""

    # the cache of device copies / computed maps is not pickled (Frozen._TRANSIENT)
    _TRANSIENT = ("_cache",)

    def _restore_transient(self) -> None:
        """After unpickling: the class that implements the object's generator id (a pickle names
        the class it was made by, ``Fastfood`` itself before the split) and a fresh, empty cache."""
        object.__setattr__(self, "__class__", Fastfood.implementation(self.generator))
        object.__setattr__(self, "_cache", self._new_cache())

    @staticmethod
    @abstractmethod
    def _new_cache() -> Any:
        """An empty cache of the implementation's maps (:mod:`.map_store`)."""

    @staticmethod
    def _check_order(order: Any) -> str:
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        return order

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

    @classmethod
    def from_buffers(cls, n_in: int, n_out: int, signs: Any, permutation: Any, gaussian: Any,
                     *, order: str = "li", allow_shrink: bool = False) -> Fastfood:
        """Build the operator from explicit buffers of length ``L`` (e.g. a checkpoint or a test
        vector): ``signs`` in {±1}, ``permutation`` of ``[0, L)``, ``gaussian`` real.  The result
        holds host buffers, as generator 1 does."""
        stored = Fastfood.implementation(buffers.GENERATOR_V1)
        return stored.from_buffers(n_in, n_out, signs, permutation, gaussian, order=order,
                                   allow_shrink=allow_shrink)

    def __repr__(self) -> str:
        return (f"Fastfood(n_in={self.n_in}, n_out={self.n_out}, seed={self.seed}, "
                f"group={self.group}, order={self.order!r})")

    @property
    def ratio(self) -> float:
        """The projection ratio ``ρ = n_in / n_out``."""
        return self.n_in / self.n_out

    @property
    @abstractmethod
    def buffers(self) -> dict[str, np.ndarray]:
        """The host buffers (read-only): ``signs`` (int8), ``permutation`` (int64) and
        ``gaussian`` (float32), each of length ``L``.  Generator-2 operators hold none; this
        computes them (``8·L`` bytes of int64 working memory), for tests and inspection."""

    @staticmethod
    def state_bytes_for(n_in: int, n_out: int, generator: str | None = None) -> int:
        """:attr:`state_bytes` of ``Fastfood(n_in, n_out, ..., generator=generator)`` without
        building it (``SuperLoRA.describe`` prints it per group)."""
        return Fastfood.implementation(generator).state_bytes_of(Fastfood.length_for(n_in, n_out))

    @staticmethod
    @abstractmethod
    def state_bytes_of(length: int) -> int:
        """Bytes of fixed random state an implementation holds for transforms of ``length``."""

    @property
    def state_bytes(self) -> int:
        """Bytes of fixed random state the operator holds on the host: ``L·(1 + 8 + 8 + 4)`` for
        generator 1 (signs, π, π⁻¹, g), O(1) for generator 2 (three keys)."""
        return self.state_bytes_of(self.length)

    # ------------------------------------------------------------------ shared pieces
    def _prepare(self, name: str, x: Any, length: int) -> tuple[Any, Any, Any, Any]:
        xp = namespace(**{name: x})
        dtype = check_floating(xp, [(name, x)])
        check_last_axis(name, x, length)
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

    # ------------------------------------------------------------------ F and Fᵀ
    def apply(self, x: Any, *, compact: bool = False) -> Any:
        """``y = F x`` for ``x`` of shape ``(..., n_in)``; returns ``(..., n_out)``.

        Generator 2 returns a view of its length-``L`` work array (no copy: the least peak for
        one call); ``compact=True`` returns a copy of the first ``n_out`` entries instead, so that
        ``L − n_out`` entries are not kept alive (for many groups whose outputs are all kept)."""
        xp, x, dtype, work = self._prepare("x", x, self.n_in)
        y = self._apply(xp, x, work, compact and work == dtype)
        return y if work == dtype else xp.astype(y, dtype)

    def adjoint(self, y: Any, *, overwrite: bool = False) -> Any:
        """``z̄ = Fᵀ y`` for ``y`` of shape ``(..., n_out)``; returns ``(..., n_in)`` (the VJP).

        Generator 2 also accepts ``y`` zero-padded to ``(..., L)`` (entries past ``n_out`` must be
        zero), and with ``overwrite=True`` uses such a ``y`` as its workspace (no second length-``L``
        array); the generator passes its freshly gathered group cotangent this way."""
        padded = self.ACCEPTS_PADDED and getattr(y, "ndim", 0) >= 1 and y.shape[-1] == self.length
        xp, y, dtype, work = self._prepare("y", y, self.length if padded else self.n_out)
        z = self._adjoint(xp, y, work, padded, padded and (overwrite or work != dtype))
        return z if work == dtype else xp.astype(z, dtype)

    @abstractmethod
    def _apply(self, xp: Any, x: Any, work: Any, compact: bool) -> Any:
        """``F x`` of ``x`` already in the compute dtype ``work`` (``compact``: no longer than ``n_out``)."""

    @abstractmethod
    def _adjoint(self, xp: Any, y: Any, work: Any, padded: bool, overwrite: bool) -> Any:
        """``Fᵀ y`` of ``y`` in ``work`` (``padded``: of length ``L``; ``overwrite``: ``y`` is scratch)."""


# ``Fastfood(...)`` reads as its ``__init__`` (the documented parameters): ``__new__`` takes
# ``*args, **kwargs`` only to pick the implementation class, and unpickling calls it with none.
Fastfood.__signature__ = inspect.signature(Fastfood.__init__).replace(  # type: ignore[attr-defined]
    parameters=list(inspect.signature(Fastfood.__init__).parameters.values())[1:])
