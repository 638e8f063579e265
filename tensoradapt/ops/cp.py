r"""CP (diagonal-core) and identity-core reconstruction and its VJP (docs/math.md §3.5).

.. math::  X = \sum_{j=1}^{r} λ_j\, a_{1j} ∘ a_{2j} ∘ … ∘ a_{Mj}

with factors ``A_m`` of shape ``(d_m, r)`` (``a_{mj}`` is column ``j``) and weights ``λ`` of
shape ``(r,)``; ``weights=None`` is the identity (superdiagonal) core ``λ = 1``.  M = 2 with the
identity core is LoRA: ``X = A_1 A_2ᵀ``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .._backend import check_floating, device_of, indexed, namespace
from ._multilinear import khatri_rao

__all__ = ["cp_to_tensor", "cp_vjp"]


def _validate(weights: Any, factors: Sequence[Any]) -> tuple[Any, int]:
    if not isinstance(factors, (list, tuple)) or len(factors) == 0:
        raise TypeError(
            f"factors must be a non-empty list or tuple of 2-D arrays, got {factors!r:.80}"
        )
    xp = namespace(weights=weights, **indexed("factors", factors))
    check_floating(xp, [("weights", weights)] + [(f"factors[{m}]", a) for m, a in enumerate(factors)])
    for m, a in enumerate(factors):
        if a.ndim != 2:
            raise ValueError(f"factors[{m}] must be 2-D (d_m, r), got shape {tuple(a.shape)}")
    rank = factors[0].shape[1]
    for m, a in enumerate(factors):
        if a.shape[1] != rank:
            raise ValueError(
                f"all factors must have the same number of columns (the CP rank): factors[0] has "
                f"{rank} but factors[{m}] has {a.shape[1]}"
            )
    if weights is not None and tuple(weights.shape) != (rank,):
        raise ValueError(
            f"weights must have shape (r,) = ({rank},) to match the factors' rank, "
            f"got {tuple(weights.shape)}"
        )
    return xp, rank


def _split_point(dims: Sequence[int]) -> int:
    """The ``p`` that best balances ``Π dims[:p]`` against ``Π dims[p:]`` (``1 <= p <= M``)."""
    if len(dims) == 1:
        return 1
    return min(range(1, len(dims)), key=lambda p: max(math.prod(dims[:p]), math.prod(dims[p:])))


def cp_to_tensor(weights: Any | None, factors: Sequence[Any]) -> Any:
    r"""Reconstruct ``X = Σ_j λ_j a_{1j} ∘ … ∘ a_{Mj}`` (CP / identity core).

    Parameters
    ----------
    weights : array of shape ``(r,)`` or None
        Diagonal core ``λ``; ``None`` means the identity core (all ones, no parameters).
    factors : sequence of M arrays, ``factors[m]`` of shape ``(d_m, r)``

    Returns
    -------
    array, shape ``(d_1, …, d_M)``

    Notes
    -----
    Balanced two-halves contraction (numerics.md §3.3): the Khatri–Rao products of the first
    ``p`` and of the last ``M − p`` factors (``p`` balances their row counts), then one GEMM
    that writes the output once: ``X = (KR_left · diag λ) · KR_rightᵀ``.

    Examples
    --------
    >>> import numpy as np
    >>> a, b = np.array([[1.], [2.]]), np.array([[3.], [4.]])
    >>> cp_to_tensor(None, [a, b]).tolist()
    [[3.0, 4.0], [6.0, 8.0]]
    """
    xp, rank = _validate(weights, factors)
    dims = [a.shape[0] for a in factors]
    p = _split_point(dims)
    dtype, device = factors[0].dtype, device_of(factors[0])
    left = khatri_rao(xp, factors[:p], rank, dtype, device)
    right = khatri_rao(xp, factors[p:], rank, dtype, device)
    if weights is not None:
        left = left * weights
    return xp.reshape(left @ right.mT, tuple(dims))


def _contract_all_but(xp: Any, t: Any, factors: Sequence[Any], keep: int) -> Any:
    """``t`` of shape ``(d_1, …, d_q, r)``: contract every mode ``k ≠ keep`` with column ``j`` of
    ``factors[k]`` for each ``j`` (shared last index); returns ``(d_keep, r)``."""
    rank = t.shape[-1]
    for k in reversed(range(len(factors))):
        if k == keep:
            continue
        shape = tuple(t.shape)
        before, after = math.prod(shape[:k]), math.prod(shape[k + 1 : -1])
        view = xp.reshape(t, (before, shape[k], after, rank))
        t = xp.sum(view * xp.reshape(factors[k], (1, shape[k], 1, rank)), axis=1)
        t = xp.reshape(t, (*shape[:k], *shape[k + 1 :]))
    return t


def cp_vjp(weights: Any | None, factors: Sequence[Any], cotangent: Any) -> tuple[Any | None, list[Any]]:
    r"""VJP of :func:`cp_to_tensor`.

    Parameters
    ----------
    weights, factors
        As for :func:`cp_to_tensor`.
    cotangent : array, shape ``(d_1, …, d_M)``
        ``X̄ = ∂L/∂X``.

    Returns
    -------
    weights_grad : array of shape ``(r,)``, or None when ``weights`` is None
        ``λ̄_j = X̄ ×_1 a_{1j}ᵀ … ×_M a_{Mj}ᵀ``.
    factor_grads : list of arrays, shapes ``(d_m, r)``
        ``Ā_m = unfold_m(X̄) · KR_{k≠m}(A_k) · diag(λ)`` (an MTTKRP).

    Notes
    -----
    With ``X̄`` viewed as a ``(D_left, D_right)`` matrix, two GEMMs ``T_L = X̄ · KR_right`` and
    ``T_R = X̄ᵀ · KR_left`` are the only passes over the full cotangent; each factor gradient is
    then a small column-wise contraction of ``T_L`` or ``T_R``.
    """
    xp, rank = _validate(weights, factors)
    check_floating(xp, [("factors[0]", factors[0]), ("cotangent", cotangent)])
    namespace(**indexed("factors", factors), cotangent=cotangent)
    dims = tuple(a.shape[0] for a in factors)
    if tuple(cotangent.shape) != dims:
        raise ValueError(
            f"cotangent must have the output shape {dims} (d_1, …, d_M), got {tuple(cotangent.shape)}"
        )
    p = _split_point(dims)
    dtype, device = factors[0].dtype, device_of(factors[0])
    left = khatri_rao(xp, factors[:p], rank, dtype, device)
    right = khatri_rao(xp, factors[p:], rank, dtype, device)
    grid = xp.reshape(cotangent, (left.shape[0], right.shape[0]))
    t_left = grid @ right
    t_right = grid.mT @ left
    weights_grad = xp.sum(t_left * left, axis=0) if weights is not None else None
    grads = []
    t_left = xp.reshape(t_left, (*dims[:p], rank))
    t_right = xp.reshape(t_right, (*dims[p:], rank))
    for m in range(len(factors)):
        if m < p:
            g = _contract_all_but(xp, t_left, factors[:p], m)
        else:
            g = _contract_all_but(xp, t_right, factors[p:], m - p)
        grads.append(g * weights if weights is not None else g)
    return weights_grad, grads
