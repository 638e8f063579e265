r"""Folding a target vector into a hyper-cubic tensor: sizing, ``Cut`` and its adjoint ``Pad``.

A group of ``n`` entries is generated as a tensor ``X`` of shape ``(d_1, …, d_M)`` with
``Π d_m ≥ n``.  ``Cut_n`` keeps the first ``n`` entries of ``X`` in row-major order (docs/math.md §3.3)
and ``Pad`` (its adjoint, and right inverse) writes them back and fills the tail with zeros:

.. math::  \mathrm{Cut}_n(X) = \mathrm{vec}(X)[0:n], \qquad
           \mathrm{Cut}_n^\top(v) = \mathrm{reshape}([v; 0_{ΠD-n}], (d_1, …, d_M)).
"""

from __future__ import annotations

import math
from typing import Any

from .._backend import check_floating, device_of, namespace
from .._deprecation import renamed
from .._validate import check_int, check_shape

__all__ = ["cubic_fold_shape", "cut", "cut_vjp", "fold_shape", "fold_side", "pad"]


def fold_side(n: int, order: int) -> int:
    """The smallest integer ``d >= 1`` with ``d**order >= n``, computed exactly in integers.

    Parameters
    ----------
    n : int
        Number of entries to hold (``>= 1``).
    order : int
        Tensor order ``M`` (``>= 1``).

    Returns
    -------
    int
        The hyper-cubic side ``d = ⌈n^(1/M)⌉``.  Floating-point roots are wrong for exact
        powers (``3125 ** (1/5) = 5.000000000000001``), so the root is corrected in integers.

    Examples
    --------
    >>> fold_side(10, 2), fold_side(27, 3), fold_side(28, 3), fold_side(3125, 5)
    (4, 3, 4, 5)
    """
    n = check_int("n", n, minimum=1)
    order = check_int("order", order, minimum=1)
    if order == 1:
        return n
    d = max(1, round(n ** (1.0 / order)))
    while d**order < n:
        d += 1
    while d > 1 and (d - 1) ** order >= n:
        d -= 1
    return d


def cubic_fold_shape(n: int, order: int) -> tuple[int, ...]:
    """The hyper-cubic fold shape ``(d,)*order`` with ``d = fold_side(n, order)``: the smallest
    ``order``-way cube holding ``n`` entries.

    >>> cubic_fold_shape(10, 2)
    (4, 4)
    """
    return (fold_side(n, order),) * check_int("order", order, minimum=1)


#: Deprecated name of :func:`cubic_fold_shape` (``plan.group_fold_shape`` is a group's fold).
fold_shape = renamed(cubic_fold_shape, "fold_shape", "tensoradapt.ops.fold")


def cut(x: Any, n: int) -> Any:
    """``Cut_n(X)``: the first ``n`` entries of ``X`` flattened in row-major order.

    Parameters
    ----------
    x : array, shape ``(d_1, …, d_M)``
        Generated tensor with ``Π d_m >= n``.
    n : int
        Number of entries kept.

    Returns
    -------
    array, shape ``(n,)``
    """
    xp = namespace(x=x)
    check_floating(xp, [("x", x)])
    n = check_int("n", n, minimum=0)
    size = math.prod(x.shape)
    if n > size:
        raise ValueError(
            f"n must be <= the number of entries of x ({size} for shape {tuple(x.shape)}), got {n}"
        )
    return xp.reshape(x, (size,))[:n]


def pad(v: Any, shape: Any) -> Any:
    """``Cut_n^T(v)``: zero-pad ``v`` to ``Π shape`` entries and reshape (row-major) to ``shape``.

    This is the adjoint of :func:`cut` and its right inverse: ``cut(pad(v, s), len(v)) == v``.

    Parameters
    ----------
    v : array, shape ``(n,)``
    shape : sequence of int
        Target shape ``(d_1, …, d_M)`` with ``Π d_m >= n``.

    Returns
    -------
    array, shape ``shape``
    """
    xp = namespace(v=v)
    dtype = check_floating(xp, [("v", v)])
    shape = check_shape("shape", shape)
    if v.ndim != 1:
        raise ValueError(f"v must be 1-D, got shape {tuple(v.shape)}")
    n, size = v.shape[0], math.prod(shape)
    if n > size:
        raise ValueError(
            f"shape {shape} holds {size} entries, fewer than the {n} entries of v "
            "(the fold must satisfy prod(shape) >= len(v))"
        )
    if n == size:
        return xp.reshape(v, shape)
    tail = xp.zeros((size - n,), dtype=dtype, device=device_of(v))
    return xp.reshape(xp.concat([v, tail]), shape)


def cut_vjp(cotangent: Any, shape: Any) -> Any:
    """VJP of :func:`cut`: the cotangent of ``X`` is ``pad(cotangent, X.shape)``."""
    return pad(cotangent, shape)
