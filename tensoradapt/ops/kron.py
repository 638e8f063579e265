r"""Kronecker product of K tensors of equal order and its VJP (docs/math.md §3.6).

For splits ``X_k`` of shape ``(d_{k1}, …, d_{kM})`` the product has shape ``(D_1, …, D_M)`` with
``D_m = Π_k d_{km}`` and

.. math::  X[i_1, …, i_M] = \prod_k X_k[i_{k1}, …, i_{kM}],
           \qquad i_m = \sum_k i_{km} \prod_{k' > k} d_{k'm},

i.e. split 1 is the most significant digit (the ``np.kron`` / ``torch.kron`` convention).  A split
of lower order is promoted by appending trailing singleton modes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .._backend import check_floating, indexed, namespace

__all__ = ["kron", "kron_shape", "kron_vjp"]


def _validate(tensors: Sequence[Any]) -> tuple[Any, list[tuple[int, ...]]]:
    if not isinstance(tensors, (list, tuple)) or len(tensors) == 0:
        raise TypeError(f"tensors must be a non-empty list or tuple of arrays, got {tensors!r:.80}")
    xp = namespace(**indexed("tensors", tensors))
    check_floating(xp, [(f"tensors[{k}]", t) for k, t in enumerate(tensors)])
    for k, t in enumerate(tensors):
        if t.ndim < 1:
            raise ValueError(f"tensors[{k}] must have at least one mode, got a 0-D array")
    order = max(t.ndim for t in tensors)
    shapes = [tuple(t.shape) + (1,) * (order - t.ndim) for t in tensors]
    return xp, shapes


def kron_shape(shapes: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Output shape ``D_m = Π_k d_{km}`` (lower-order shapes promoted with trailing ones)."""
    order = max(len(s) for s in shapes)
    out = [1] * order
    for s in shapes:
        for m, d in enumerate(s):
            out[m] *= int(d)
    return tuple(out)


def interleaved_shape(shapes: Sequence[tuple[int, ...]], k: int) -> tuple[int, ...]:
    """Shape of split ``k`` placed on the (mode-major, split-minor) axes of the K·M grid."""
    n_splits, order = len(shapes), len(shapes[0])
    grid = [1] * (n_splits * order)
    for m in range(order):
        grid[m * n_splits + k] = shapes[k][m]
    return tuple(grid)


def kron(tensors: Sequence[Any]) -> Any:
    r"""Kronecker product ``X_1 ⊗ X_2 ⊗ … ⊗ X_K`` of K tensors of equal order M.

    Parameters
    ----------
    tensors : sequence of K arrays, ``tensors[k]`` of shape ``(d_{k1}, …, d_{kM})``
        Lower-order tensors are promoted with trailing singleton modes.

    Returns
    -------
    array, shape ``(Π_k d_{k1}, …, Π_k d_{kM})``
        Equal to ``np.kron(X_1, np.kron(X_2, …))`` for arrays of equal order.

    Examples
    --------
    >>> import numpy as np
    >>> kron([np.array([[1., 2.]]), np.array([[0., 1.], [1., 0.]])]).tolist()
    [[0.0, 1.0, 0.0, 2.0], [1.0, 0.0, 2.0, 0.0]]
    """
    xp, shapes = _validate(tensors)
    out = None
    for k, t in enumerate(tensors):
        view = xp.reshape(t, interleaved_shape(shapes, k))
        out = view if out is None else out * view
    return xp.reshape(out, kron_shape(shapes))


def kron_vjp(tensors: Sequence[Any], cotangent: Any) -> list[Any]:
    r"""VJP of :func:`kron` with respect to every split.

    Parameters
    ----------
    tensors
        As for :func:`kron`.
    cotangent : array, shape ``(D_1, …, D_M)``
        ``X̄ = ∂L/∂X``.

    Returns
    -------
    list of arrays
        ``X̄_k`` with the shape of ``tensors[k]``: ``X̄`` viewed as a ``K·M``-way tensor (each
        mode split into its K digits) contracted with every other split ``X_{k'}`` over that
        split's digits.

    Notes
    -----
    Nothing larger than ``X̄`` is materialised.  The splits are contracted along a balanced
    binary tree, so ``X̄`` itself is read by two contractions whatever K is.
    """
    xp, shapes = _validate(tensors)
    namespace(**indexed("tensors", tensors), cotangent=cotangent)
    check_floating(xp, [("tensors[0]", tensors[0]), ("cotangent", cotangent)])
    out_shape = kron_shape(shapes)
    if tuple(cotangent.shape) != out_shape:
        raise ValueError(
            f"cotangent must have the Kronecker output shape {out_shape}, got {tuple(cotangent.shape)}"
        )
    order = len(out_shape)
    promoted = [xp.reshape(t, s) for t, s in zip(tensors, shapes, strict=True)]
    grads: list[Any] = [None] * len(tensors)

    def contract(t: Any, alive: list[int], drop: list[int]) -> tuple[Any, list[int]]:
        # t has axes (m, k) for k in `alive`, mode-major; contract the splits in `drop`.
        for k in drop:
            width = len(alive)
            pos = alive.index(k)
            if order == 2:
                t = _contract_matrix_split(xp, t, width, pos, promoted[k])
            else:
                axes_t = [m * width + pos for m in range(order)]
                t = xp.tensordot(t, promoted[k], axes=(axes_t, list(range(order))))
            alive = [a for a in alive if a != k]
        return t, alive

    def descend(t: Any, alive: list[int]) -> None:
        if len(alive) == 1:
            k = alive[0]
            grads[k] = xp.reshape(t, tuple(tensors[k].shape))
            return
        half = len(alive) // 2
        left, right = alive[:half], alive[half:]
        descend(contract(t, alive, right)[0], left)
        descend(contract(t, alive, left)[0], right)

    full = xp.reshape(cotangent, tuple(d for m in range(order) for d in (s[m] for s in shapes)))
    descend(full, list(range(len(tensors))))
    return grads


def _contract_matrix_split(xp: Any, t: Any, width: int, pos: int, split: Any) -> Any:
    """Contract a 2-mode split out of ``t`` without copying ``t`` (no transposition).

    ``t`` has axes ``(k_0 … k_{w-1})`` of mode 0 then the same of mode 1; the split's digits are
    at ``pos`` and ``width + pos``.  With ``t`` viewed as ``(P0, s0, P1, s1, P2)`` the result is
    ``Σ_i X[i] · t[:, i]`` over ``s0`` rows of the split: one batched GEMV per row, each reading a
    strided view, so the only new memory is the ``(P0, P1, P2)`` result.
    """
    shape = tuple(t.shape)
    p0, s0 = math.prod(shape[:pos]), shape[pos]
    p1, s1 = math.prod(shape[pos + 1 : width + pos]), shape[width + pos]
    p2 = math.prod(shape[width + pos + 1 :])
    rest = shape[:pos] + shape[pos + 1 : width + pos] + shape[width + pos + 1 :]
    acc = None
    if p2 == 1:
        view = xp.reshape(t, (p0, s0, p1, s1))
        for i in range(s0):
            term = view[:, i, :, :] @ split[i, :]
            acc = term if acc is None else acc + term
    else:
        view = xp.reshape(t, (p0, s0, p1, s1, p2))
        for i in range(s0):
            term = split[i : i + 1, :] @ view[:, i, :, :, :]
            acc = term if acc is None else acc + term
    return xp.reshape(acc, rest)
