"""Integer factorisations used to size Kronecker splits (LyCORIS rule and the cubic rule)."""

from __future__ import annotations

import functools

from .._validate import check_int

__all__ = ["MAX_FACTORIZED_DIM", "factorization", "split_side"]

#: Largest dimension :func:`factorization` splits (its divisor search is ``O(√dim)``: about a
#: million steps at this cap, a fraction of a second).
MAX_FACTORIZED_DIM = 2**40


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dim = m · n`` with ``m <= n`` by the LyCORIS rule (docs/math.md §5.3).

    If ``factor > 0`` divides ``dim``, return ``(min(factor, dim/factor), max(…))``.  Otherwise
    (``factor = -1`` means no limit) walk ``m`` up through the divisors of ``dim`` while ``m < n``
    held before the step and the new ``m <= factor``: the pair nearest ``√dim`` that ``factor``
    allows.

    Examples
    --------
    >>> factorization(768), factorization(768, 6), factorization(768, 10), factorization(127)
    ((24, 32), (6, 128), (8, 96), (1, 127))
    """
    dim = check_int("dim", dim, minimum=1)
    factor = check_int("factor", factor)
    if factor == 0 or factor < -1:
        raise ValueError(f"factor must be -1 (no limit) or a positive integer, got {factor}")
    if dim > MAX_FACTORIZED_DIM and not (0 < factor and dim % factor == 0):
        raise ValueError(f"dim {dim:,} is too large to factorise (at most 2**40; docs/reliability.md)")
    return _factorization(dim, factor)


@functools.lru_cache(maxsize=4096)
def _factorization(dim: int, factor: int) -> tuple[int, int]:
    if factor > 0 and dim % factor == 0:
        other = dim // factor
        return (min(factor, other), max(factor, other))
    limit = dim if factor == -1 else factor
    m, n = 1, dim
    for divisor in _divisors(dim)[1:]:
        if not m < n or divisor > limit:
            break
        m, n = divisor, dim // divisor
    return (min(m, n), max(m, n))


def _divisors(dim: int) -> list[int]:
    """All divisors of ``dim`` in ascending order (O(√dim))."""
    small = [d for d in range(1, int(dim**0.5) + 2) if d * d <= dim and dim % d == 0]
    large = [dim // d for d in reversed(small) if d * d != dim]
    return small + large


def split_side(side: int, splits: int, dense_side: int | None = None) -> int:
    """The side ``s`` of the non-dense Kronecker splits that cover ``side`` (docs/math.md §3.6).

    Without a dense factor: the smallest ``s`` with ``s^K >= side``; with a dense first split of
    side ``f``: the smallest ``s`` with ``f · s^(K-1) >= side``.
    """
    from ..ops.fold import fold_side

    side = check_int("side", side, minimum=1)
    splits = check_int("splits", splits, minimum=1)
    if dense_side is None:
        return fold_side(side, splits)
    f = check_int("dense_side", dense_side, minimum=1)
    if splits < 2:
        raise ValueError(f"a dense factor needs splits >= 2, got {splits}")
    return fold_side(-(-side // f), splits - 1)
