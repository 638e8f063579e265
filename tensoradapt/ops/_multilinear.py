"""Mode products and Khatri–Rao products on any array-API namespace (internal helpers).

All helpers work by reshapes and matrix products only (the array-API standard has no
``einsum``), and prefer the forms that need no transposed copies: a product on the first or the
last mode of a row-major tensor is one GEMM on a free reshape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["khatri_rao", "mode_product", "project_modes"]


def mode_product(xp: Any, x: Any, mode: int, matrix: Any) -> Any:
    """``x ×_mode matrix``: mode ``mode`` of ``x`` (size ``s``) becomes ``matrix.shape[0]``.

    ``(x ×_m A)[…, i, …] = Σ_j x[…, j, …] A[i, j]`` for ``A`` of shape ``(p, s)``.
    """
    shape = tuple(x.shape)
    size, p = shape[mode], matrix.shape[0]
    before, after = math.prod(shape[:mode]), math.prod(shape[mode + 1 :])
    out_shape = (*shape[:mode], p, *shape[mode + 1 :])
    if after == 1:
        y = xp.reshape(x, (before, size)) @ matrix.mT
    elif before == 1:
        y = matrix @ xp.reshape(x, (size, after))
    elif before <= 8:
        # A few batched GEMMs with a broadcast matrix: (p, s) @ (before, s, after).
        y = matrix @ xp.reshape(x, (before, size, after))
    else:
        # Bring the mode last (one copy), one GEMM, and put it back.
        moved = xp.reshape(xp.permute_dims(xp.reshape(x, (before, size, after)), (0, 2, 1)),
                           (before * after, size))
        y = xp.permute_dims(
            xp.reshape(moved @ matrix.mT, (before, after, p)), (0, 2, 1)
        )
    return xp.reshape(y, out_shape)


def project_modes(xp: Any, x: Any, matrices: Sequence[Any], modes: Sequence[int]) -> Any:
    """Apply ``x ×_m matrices[m]`` for every ``m`` in ``modes``, shrinking modes first; among equal
    ratios the first and last modes go first, because they need no transposed copy of ``x``."""
    last = x.ndim - 1
    order = sorted(modes, key=lambda m: (matrices[m].shape[0] / max(1, x.shape[m]), m not in (0, last)))
    for m in order:
        x = mode_product(xp, x, m, matrices[m])
    return x


def khatri_rao(xp: Any, factors: Sequence[Any], rank: int, dtype: Any, device: Any) -> Any:
    """Column-wise Kronecker product ``KR(A_1, …, A_p)`` of shape ``(Π d_m, rank)``.

    Row index is row-major over ``(i_1, …, i_p)``; an empty list gives ``ones((1, rank))``.
    """
    if not factors:
        return xp.ones((1, rank), dtype=dtype, device=device)
    out = factors[0]
    for factor in factors[1:]:
        out = xp.reshape(out[:, None, :] * factor[None, :, :], (-1, rank))
    return out
