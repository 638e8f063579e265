r"""Tucker reconstruction ``X = C ×_1 A_1 ×_2 … ×_M A_M`` and its VJP (docs/math.md §3.4).

.. math::  X[i_1,…,i_M] = \sum_{j_1…j_M} C[j_1,…,j_M] \prod_m A_m[i_m, j_m]

with core ``C`` of shape ``(r_1, …, r_M)`` and factors ``A_m`` of shape ``(d_m, r_m)``; the
output has shape ``(d_1, …, d_M)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .._backend import check_floating, indexed, namespace
from ._multilinear import mode_product, project_modes

__all__ = ["tucker_to_tensor", "tucker_vjp"]


def _validate(core: Any, factors: Sequence[Any]) -> Any:
    if not isinstance(factors, (list, tuple)):
        raise TypeError(f"factors must be a list or tuple of 2-D arrays, got {type(factors).__name__}")
    xp = namespace(core=core, **indexed("factors", factors))
    check_floating(xp, [("core", core)] + [(f"factors[{m}]", a) for m, a in enumerate(factors)])
    if core.ndim < 1:
        raise ValueError("core must have at least one mode, got a 0-D array")
    if len(factors) != core.ndim:
        raise ValueError(
            f"factors must have one matrix per core mode: core has {core.ndim} modes "
            f"(shape {tuple(core.shape)}) but {len(factors)} factors were given"
        )
    for m, a in enumerate(factors):
        if a.ndim != 2:
            raise ValueError(f"factors[{m}] must be 2-D (d_m, r_m), got shape {tuple(a.shape)}")
        if a.shape[1] != core.shape[m]:
            raise ValueError(
                f"factors[{m}] has {a.shape[1]} columns but core mode {m} has size "
                f"{core.shape[m]} (factor m must be (d_m, r_m) with r_m = core.shape[m])"
            )
    return xp


def _chain_cost(shape: Sequence[int], outs: Sequence[int], order: Sequence[int]) -> int:
    sizes, cost = list(shape), 0
    for m in order:
        cost += math.prod(sizes) * outs[m]
        sizes[m] = outs[m]
    return cost


def _rotating_chain(xp: Any, x: Any, matrices: Sequence[Any], ascending: bool) -> Any:
    """Apply ``x ×_m matrices[m]`` for all modes, one GEMM each and no transposed copies.

    Descending: the last mode is transformed and becomes the first (``A @ X^T``); after M steps
    the modes are back in order.  Ascending: the first mode is transformed and becomes the last.
    """
    order = range(len(matrices)) if ascending else reversed(range(len(matrices)))
    for m in order:
        shape = tuple(x.shape)
        a = matrices[m]
        if ascending:
            flat = xp.reshape(x, (shape[0], -1))
            x = xp.reshape(flat.mT @ a.mT, (*shape[1:], a.shape[0]))
        else:
            flat = xp.reshape(x, (-1, shape[-1]))
            x = xp.reshape(a @ flat.mT, (a.shape[0], *shape[:-1]))
    return x


def _apply_all_modes(xp: Any, x: Any, matrices: Sequence[Any]) -> Any:
    """``x ×_1 M_1 … ×_M M_M`` in the cheaper of the two rotation directions."""
    shape = tuple(x.shape)
    outs = [a.shape[0] for a in matrices]
    modes = list(range(len(matrices)))
    ascending = _chain_cost(shape, outs, modes) < _chain_cost(shape, outs, modes[::-1])
    return _rotating_chain(xp, x, matrices, ascending)


def tucker_to_tensor(core: Any, factors: Sequence[Any]) -> Any:
    r"""Reconstruct a Tucker tensor ``X = C ×_1 A_1 ×_2 … ×_M A_M``.

    Parameters
    ----------
    core : array, shape ``(r_1, …, r_M)``
        Core tensor ``C``.
    factors : sequence of M arrays, ``factors[m]`` of shape ``(d_m, r_m)``
        Factor matrices ``A_m``.

    Returns
    -------
    array, shape ``(d_1, …, d_M)``
        On the namespace, device and dtype of the inputs.

    Notes
    -----
    Sequential mode products, one GEMM per mode on free reshapes (no transposed copies), in the
    cheaper of the two cyclic orders.  Parameters: ``Π r_m + Σ d_m r_m``.

    Examples
    --------
    >>> import numpy as np
    >>> C = np.array([[1., 2.], [3., 4.]])
    >>> A1 = np.array([[1., 0.], [0., 1.], [1., 1.]]); A2 = np.array([[1., 2.], [0., 1.]])
    >>> tucker_to_tensor(C, [A1, A2]).tolist()
    [[5.0, 2.0], [11.0, 4.0], [16.0, 6.0]]
    """
    xp = _validate(core, factors)
    return _apply_all_modes(xp, core, list(factors))


def tucker_vjp(core: Any, factors: Sequence[Any], cotangent: Any) -> tuple[Any, list[Any]]:
    r"""VJP of :func:`tucker_to_tensor` with respect to the core and every factor.

    Parameters
    ----------
    core, factors
        As for :func:`tucker_to_tensor`.
    cotangent : array, shape ``(d_1, …, d_M)``
        ``X̄ = ∂L/∂X``.

    Returns
    -------
    core_grad : array, shape ``(r_1, …, r_M)``
        ``C̄ = X̄ ×_1 A_1ᵀ … ×_M A_Mᵀ``.
    factor_grads : list of arrays, shapes ``(d_m, r_m)``
        ``Ā_m = unfold_m(X̄ ×_{k≠m} A_kᵀ) · unfold_m(C)ᵀ``.

    Notes
    -----
    The projections ``X̄ ×_{k≠m} A_kᵀ`` of all M factor gradients share their partial products
    through a balanced binary split of the modes, so the full-size cotangent is read by two
    projections only (instead of M), then everything works on shrunken tensors.
    """
    xp = _validate(core, factors)
    check_floating(xp, [("core", core), ("cotangent", cotangent)])
    namespace(core=core, cotangent=cotangent)
    out_shape = tuple(a.shape[0] for a in factors)
    if tuple(cotangent.shape) != out_shape:
        raise ValueError(
            f"cotangent must have the output shape {out_shape} (d_1, …, d_M), "
            f"got {tuple(cotangent.shape)}"
        )
    transposed = [a.mT for a in factors]
    order = core.ndim
    partial: dict[int, Any] = {}

    def descend(t: Any, lo: int, hi: int) -> None:
        # t = X̄ projected on every mode outside [lo, hi).
        if hi - lo == 1:
            partial[lo] = t
            return
        mid = (lo + hi) // 2
        descend(project_modes(xp, t, transposed, range(mid, hi)), lo, mid)
        descend(project_modes(xp, t, transposed, range(lo, mid)), mid, hi)

    descend(cotangent, 0, order)
    all_modes = list(range(order))
    factor_grads = []
    for m in all_modes:
        others = [k for k in all_modes if k != m]
        grad = xp.tensordot(partial[m], core, axes=(others, others)) if others else (
            partial[m][:, None] * core[None, :]
        )
        factor_grads.append(grad)
    core_grad = mode_product(xp, partial[0], 0, transposed[0])
    return core_grad, factor_grads
