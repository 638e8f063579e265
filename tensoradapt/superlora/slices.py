r"""One target's ``ΔW`` and its VJP at the cost of the target, not of its group (docs/math.md §3.2.3).

Without a projection, group ``g``'s output is the generated tensor ``X_g`` itself (shape
``D = (D_1, …, D_M)``, flattened row-major and cut), so a target that covers ``[a, b)`` of the
group's vector reads only the mode-1 slab ``X_g[i_lo:i_hi]`` with ``P = D_2 ⋯ D_M``,
``i_lo = ⌊a / P⌋`` and ``i_hi = ⌈b / P⌉``.  A slab needs only rows of the mode-1 factors:

* one split: ``X[i_lo:i_hi] = C ×_1 A_1[i_lo:i_hi] ×_2 A_2 … ×_M A_M`` (CP and identity cores
  likewise, a dense split its rows, a fixed identity mode the rows of ``I``);
* ``X = X_1 ⊗ … ⊗ X_K``: row ``i`` splits into digits ``i^{(k)} = ⌊i / Π_{k'>k} d_{k'1}⌋ mod d_{k1}``
  and ``X[i] = X_1[i^{(1)}] ⊗ … ⊗ X_K[i^{(K)}]`` (a batched Kronecker product of rows);
* ``X = X_1 ⊙ X_2`` (LoHa): the product of the two slabs.

The stack layout's target is the column block ``X[:, c0:c1]`` of its group's single split: the
same rule on mode 2 (rows ``c0:c1`` of ``A_2``).

Everything here takes the split arrays by local name (``core``, ``weights``, ``factor{m}``,
``dense``) already looked up (and, for the forward, already scaled) by
:class:`~tensoradapt.superlora.generator.SuperLoRA`; the VJPs return unscaled gradients of full
parameter shapes (zeros on the rows a slab does not read), which the generator scales.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .._backend import device_of, from_host
from ..ops import cp_to_tensor, cp_vjp, tucker_to_tensor, tucker_vjp
from ..ops._multilinear import mode_product
from ..ops.kron import interleaved_shape
from .plan import GroupPlan, Plan, SplitPlan, param_name

__all__ = [
    "group_rows",
    "group_rows_vjp",
    "kron_row_plan",
    "kron_rows",
    "kron_rows_vjp",
    "slab_bounds",
    "split_slab",
    "split_slab_vjp",
    "target_delta",
    "target_vjp",
]

#: ``locals_of(g)``: group ``g``'s arrays by split (index ``k − 1``) and local name.
LocalsOf = Callable[[int], list[dict[str, Any]]]


# ---------------------------------------------------------------------------------- index arithmetic
def slab_bounds(shape: Sequence[int], a: int, b: int) -> tuple[int, int, int]:
    """``(i_lo, i_hi, P)``: the mode-1 rows of a row-major tensor of ``shape`` that hold its flat
    entries ``[a, b)``, with ``P = Π shape[1:]`` entries per row.

    >>> slab_bounds((4, 3, 2), 5, 14)
    (0, 3, 6)
    """
    rows = math.prod(shape[1:])
    return a // rows, -(-b // rows), rows


def kron_row_plan(sides: Sequence[int], lo: int, hi: int) -> list[tuple[int, int, np.ndarray | None]]:
    """Which rows of each split the rows ``[lo, hi)`` of ``X_1 ⊗ … ⊗ X_K`` read.

    Parameters
    ----------
    sides : sequence of int
        ``d_{k1}``, the mode-1 size of each split (split 1 the most significant digit, as in
        :func:`~tensoradapt.ops.kron`).
    lo, hi : int
        The rows of the product.

    Returns
    -------
    list of ``(r_lo, r_hi, local)``, one per split
        Split ``k`` is read in its rows ``[r_lo, r_hi)`` (all of them when the digits wrap around);
        ``local[j] = i^{(k)} − r_lo`` for product row ``i = lo + j``, an int64 host array of
        ``hi − lo`` entries, or ``None`` when it is ``0, 1, …`` (no gather needed).

    >>> [(r0, r1, None if t is None else t.tolist()) for r0, r1, t in kron_row_plan([3, 2], 3, 6)]
    [(1, 3, [0, 1, 1]), (0, 2, [1, 0, 1])]
    """
    rows = np.arange(lo, hi, dtype=np.int64)
    stride = math.prod(sides)
    out: list[tuple[int, int, np.ndarray | None]] = []
    for d in sides:
        stride //= d
        first, last = lo // stride, (hi - 1) // stride  # digit blocks of split k met by the rows
        if last - first + 1 >= d or first % d > last % d:
            r_lo, r_hi = 0, d
        else:
            r_lo, r_hi = first % d, last % d + 1
        local = (rows // stride) % d - r_lo
        plain = r_hi - r_lo == hi - lo and bool(np.array_equal(local, np.arange(hi - lo)))
        out.append((r_lo, r_hi, None if plain else local))
    return out


# ---------------------------------------------------------------------------------- one split
def _slab_index(mode: int, lo: int, hi: int) -> tuple[Any, ...]:
    """``[:, …, lo:hi, ...]`` with ``lo:hi`` on axis ``mode`` (a full key, as the array API wants)."""
    return (*(slice(None),) * mode, slice(lo, hi), ...)


def _embed(xp: Any, x: Any, axis: int, lo: int, size: int) -> Any:
    """``x`` placed at ``[lo, lo + x.shape[axis])`` of a zero array with ``size`` along ``axis``
    (the adjoint of taking that slice)."""
    shape = tuple(x.shape)
    before, after = lo, size - lo - shape[axis]
    if not before and not after:
        return x
    parts = [xp.zeros((*shape[:axis], width, *shape[axis + 1:]), dtype=x.dtype, device=device_of(x))
             if width else None for width in (before, after)]
    return xp.concat([p for p in (parts[0], x, parts[1]) if p is not None], axis=axis)


def _slab_factors(xp: Any, split: SplitPlan, local: Mapping[str, Any], mode: int, lo: int,
                  hi: int) -> list[Any]:
    """The split's factors with factor ``mode`` cut to its rows ``[lo, hi)`` (a fixed identity
    mode gives the rows of ``I``: ``eye(hi − lo, d, k=lo)``)."""
    ref = next(iter(local.values()))
    out = []
    for m, d in enumerate(split.shape):
        if m in split.fixed_modes:
            start, stop = (lo, hi) if m == mode else (0, d)
            out.append(xp.eye(stop - start, d, k=start, dtype=ref.dtype, device=device_of(ref)))
        else:
            factor = local[f"factor{m}"]
            out.append(factor[lo:hi, :] if m == mode else factor)
    return out


def split_slab(xp: Any, split: SplitPlan, local: Mapping[str, Any], mode: int, lo: int, hi: int) -> Any:
    r"""The slab ``X[…, lo:hi, …]`` (``lo:hi`` on axis ``mode``) of one split, without the rest.

    ``X = C ×_1 A_1 … ×_M A_M`` restricted to indices ``lo..hi−1`` of mode ``mode`` is the same
    product with ``A_mode`` replaced by its rows ``A_mode[lo:hi]``; likewise for the CP and the
    identity core; a dense split is sliced.

    Parameters
    ----------
    split : SplitPlan
    local : mapping
        The split's arrays by local name.
    mode : int
        0-based axis of the slab.
    lo, hi : int
        ``0 <= lo < hi <= split.shape[mode]``.

    Returns
    -------
    array, shape ``split.shape`` with ``hi − lo`` on axis ``mode``
    """
    if split.kind == "dense":
        return local["dense"][_slab_index(mode, lo, hi)]
    factors = _slab_factors(xp, split, local, mode, lo, hi)
    if split.kind == "tucker":
        return tucker_to_tensor(local["core"], factors)
    return cp_to_tensor(local["weights"] if split.kind == "cp" else None, factors)


def _tucker_slab_vjp(xp: Any, core: Any, factors: list[Any], mode: int, cot: Any,
                     whole: bool) -> tuple[Any, list[Any]]:
    """:func:`tucker_vjp` of a slab whose factor ``mode`` has ``h`` rows, with that factor folded
    into the core first: ``C' = C ×_mode A_s`` (``h`` on ``mode``), the VJP of ``C' ×_{m≠mode} A_m``
    with an identity on ``mode``, then ``C̄ = C̄' ×_mode A_sᵀ`` and
    ``Ā_s = unfold_mode(C̄') unfold_mode(C)ᵀ``.  Where ``h`` is below the rank this keeps every
    intermediate at the slab's size (projecting the slab's cotangent on ``A_sᵀ`` would grow that
    mode from ``h`` to the rank)."""
    rows = factors[mode]
    if whole or rows.shape[0] >= core.shape[mode]:  # a whole split: tucker_vjp itself
        return tucker_vjp(core, factors, cot)
    folded = mode_product(xp, core, mode, rows)
    eye = xp.eye(rows.shape[0], dtype=rows.dtype, device=device_of(rows))
    folded_grad, grads = tucker_vjp(folded, [eye if m == mode else f for m, f in enumerate(factors)], cot)
    others = [m for m in range(core.ndim) if m != mode]
    grads[mode] = xp.tensordot(folded_grad, core, axes=(others, others))
    return mode_product(xp, folded_grad, mode, xp.permute_dims(rows, (1, 0))), grads


def split_slab_vjp(xp: Any, split: SplitPlan, local: Mapping[str, Any], mode: int, lo: int, hi: int,
                   cot: Any) -> dict[str, Any]:
    """VJP of :func:`split_slab`: gradients of the split's arrays (full shapes) given the slab's
    cotangent; ``A_mode`` gets the slab factor's gradient in its rows ``[lo, hi)`` and zeros
    elsewhere, a dense split the cotangent at the slab's place."""
    if split.kind == "dense":
        return {"dense": _embed(xp, cot, mode, lo, split.shape[mode])}
    factors = _slab_factors(xp, split, local, mode, lo, hi)
    if split.kind == "tucker":
        whole = (lo, hi) == (0, split.shape[mode])
        core_grad, factor_grads = _tucker_slab_vjp(xp, local["core"], factors, mode, cot, whole)
        out = {"core": core_grad}
    else:
        weights_grad, factor_grads = cp_vjp(local["weights"] if split.kind == "cp" else None, factors, cot)
        out = {"weights": weights_grad} if split.kind == "cp" else {}
    for m, grad in enumerate(factor_grads):
        if m not in split.fixed_modes:
            out[f"factor{m}"] = _embed(xp, grad, 0, lo, split.shape[m]) if m == mode else grad
    return out


# ---------------------------------------------------------------------------------- batched Kronecker rows
def _rests(rows: Sequence[Any]) -> list[tuple[int, ...]]:
    """Every split's row shape, lower orders promoted with trailing ones (as :func:`~tensoradapt.ops.kron`)."""
    order = max(r.ndim for r in rows) - 1
    return [tuple(r.shape[1:]) + (1,) * (order - r.ndim + 1) for r in rows]


def kron_rows(xp: Any, rows: Sequence[Any]) -> Any:
    r"""Row-wise Kronecker product: ``out[j] = rows[0][j] ⊗ … ⊗ rows[K−1][j]``.

    Parameters
    ----------
    rows : sequence of K arrays, ``rows[k]`` of shape ``(h, e_{k2}, …, e_{kM})``

    Returns
    -------
    array, shape ``(h, Π_k e_{k2}, …, Π_k e_{kM})``
        ``h`` Kronecker products of ``M − 1`` modes at once (the ops.kron digit order).
    """
    rests = _rests(rows)
    h = rows[0].shape[0]
    out = None
    for k, r in enumerate(rows):
        view = xp.reshape(r, (h, *interleaved_shape(rests, k)))
        out = view if out is None else out * view
    sizes = tuple(math.prod(rest[m] for rest in rests) for m in range(len(rests[0])))
    return xp.reshape(out, (h, *sizes))


def kron_rows_vjp(xp: Any, rows: Sequence[Any], cot: Any) -> list[Any]:
    """VJP of :func:`kron_rows`: ``rows̄[k][j]`` contracts ``cot[j]`` (split into its digits) with
    the other splits' rows ``j`` over their digits; nothing larger than ``cot`` is formed."""
    rests = _rests(rows)
    h, count = rows[0].shape[0], len(rows)
    views = [xp.reshape(r, (h, *interleaved_shape(rests, k))) for k, r in enumerate(rows)]
    full = xp.reshape(cot, (h, *(rest[m] for m in range(len(rests[0])) for rest in rests)))
    grads = []
    for k in range(count):
        t = full
        for j, view in enumerate(views):
            if j != k:
                t = t * view
        axes = tuple(1 + m * count + j for m in range(len(rests[0])) for j in range(count) if j != k)
        summed = xp.sum(t, axis=axes) if axes else t
        grads.append(xp.reshape(summed, tuple(rows[k].shape)))
    return grads


def _gather(xp: Any, x: Any, local: np.ndarray | None) -> Any:
    return x if local is None else xp.take(x, from_host(xp, local, device=device_of(x)), axis=0)


def _scatter_add(xp: Any, cot: Any, local: np.ndarray | None, count: int) -> Any:
    """Adjoint of :func:`_gather`: row ``r`` of the result sums the rows ``j`` of ``cot`` with
    ``local[j] = r`` (a one-hot ``(count, h)`` matrix times ``cot``)."""
    if local is None:
        return cot
    onehot = (np.arange(count)[:, None] == local[None, :]).astype(np.float64)
    flat = from_host(xp, onehot, dtype=cot.dtype, device=device_of(cot)) @ xp.reshape(cot, (local.shape[0], -1))
    return xp.reshape(flat, (count, *cot.shape[1:]))


# ---------------------------------------------------------------------------------- a group's mode-1 slab
def group_rows(xp: Any, group: GroupPlan, locals_: Sequence[Mapping[str, Any]], unit: str, lo: int,
               hi: int) -> Any:
    """Rows ``[lo, hi)`` of group ``group``'s generated tensor ``X_g``, shape ``(hi − lo, *D[1:])``.

    ``locals_[k]`` holds split ``k + 1``'s arrays (scaled as the caller wants ``X_g``); ``unit`` is
    ``"kron"`` or ``"hadamard"``.
    """
    splits = group.splits
    if len(splits) == 1:
        return split_slab(xp, splits[0], locals_[0], 0, lo, hi)
    if unit == "hadamard":
        return split_slab(xp, splits[0], locals_[0], 0, lo, hi) * split_slab(xp, splits[1], locals_[1], 0, lo, hi)
    plan = kron_row_plan([s.shape[0] for s in splits], lo, hi)
    rows = [_gather(xp, split_slab(xp, s, p, 0, r_lo, r_hi), local)
            for s, p, (r_lo, r_hi, local) in zip(splits, locals_, plan, strict=True)]
    return xp.reshape(kron_rows(xp, rows), (hi - lo, *group.shape[1:]))


def group_rows_vjp(xp: Any, group: GroupPlan, locals_: Sequence[Mapping[str, Any]], unit: str, lo: int,
                   hi: int, cot: Any) -> list[dict[str, Any]]:
    """VJP of :func:`group_rows`: each split's gradients by local name (unscaled ``locals_``)."""
    splits = group.splits
    if len(splits) == 1:
        return [split_slab_vjp(xp, splits[0], locals_[0], 0, lo, hi, cot)]
    if unit == "hadamard":
        first = split_slab(xp, splits[0], locals_[0], 0, lo, hi)
        second = split_slab(xp, splits[1], locals_[1], 0, lo, hi)
        return [split_slab_vjp(xp, splits[0], locals_[0], 0, lo, hi, cot * second),
                split_slab_vjp(xp, splits[1], locals_[1], 0, lo, hi, cot * first)]
    plan = kron_row_plan([s.shape[0] for s in splits], lo, hi)
    rows = [_gather(xp, split_slab(xp, s, p, 0, r_lo, r_hi), local)
            for s, p, (r_lo, r_hi, local) in zip(splits, locals_, plan, strict=True)]
    row_cots = kron_rows_vjp(xp, rows, cot)
    out = []
    for s, p, (r_lo, r_hi, local), c in zip(splits, locals_, plan, row_cots, strict=True):
        out.append(split_slab_vjp(xp, s, p, 0, r_lo, r_hi, _scatter_add(xp, c, local, r_hi - r_lo)))
    return out


# ---------------------------------------------------------------------------------- one target
def target_delta(xp: Any, plan: Plan, index: int, locals_of: LocalsOf) -> Any:
    """``ΔW_index`` in its own shape from the slabs of the groups it reads (docs/math.md §3.2.3).

    Fold layout: for each piece ``(g, a, b)`` of :meth:`~tensoradapt.ops.Grouping.target_pieces`,
    rows ``[⌊a/P⌋, ⌈b/P⌉)`` of ``X_g``, flattened and cut to ``[a − i_lo·P, b − i_lo·P)``; the
    pieces concatenated.  Stack layout: the column block ``[c0, c1)`` of the group's one split
    (a mode-2 slab), also proportional to the target.  ``plan`` has no projection.
    """
    shape = plan.shapes[index]
    if plan.config.layout == "stack":
        g, c0, c1 = plan.grouping.target_columns(index)
        (split,) = plan.groups[g].splits
        return xp.reshape(split_slab(xp, split, locals_of(g)[0], 1, c0, c1), shape)
    pieces = []
    for g, a, b in plan.grouping.target_pieces(index):
        group = plan.groups[g]
        i_lo, i_hi, rows = slab_bounds(group.shape, a, b)
        slab = group_rows(xp, group, locals_of(g), plan.config.unit, i_lo, i_hi)
        pieces.append(xp.reshape(slab, (-1,))[a - i_lo * rows : b - i_lo * rows])
    return xp.reshape(pieces[0] if len(pieces) == 1 else xp.concat(pieces), shape)


def target_vjp(xp: Any, plan: Plan, index: int, cotangent: Any,
               locals_of: LocalsOf) -> dict[int, dict[str, Any]]:
    """Unscaled gradients of every array of the groups ``index`` reads, given ``W̄_index``, as
    ``{g: {full name: array}}``: each piece of the cotangent is zero-padded to its slab (the
    adjoint of the cut to ``[a, b)``), then sent through :func:`group_rows_vjp`."""
    if plan.config.layout == "stack":
        g, c0, c1 = plan.grouping.target_columns(index)
        (split,) = plan.groups[g].splits
        block = xp.reshape(cotangent, (split.shape[0], c1 - c0))
        local = split_slab_vjp(xp, split, locals_of(g)[0], 1, c0, c1, block)
        return {g: {param_name(g, 1, name): v for name, v in local.items()}}
    grads: dict[int, dict[str, Any]] = {}
    flat, at = xp.reshape(cotangent, (-1,)), 0
    for g, a, b in plan.grouping.target_pieces(index):
        group = plan.groups[g]
        i_lo, i_hi, rows = slab_bounds(group.shape, a, b)
        piece = _embed(xp, flat[at : at + b - a], 0, a - i_lo * rows, (i_hi - i_lo) * rows)
        at += b - a
        slab_cot = xp.reshape(piece, (i_hi - i_lo, *group.shape[1:]))
        per_split = group_rows_vjp(xp, group, locals_of(g), plan.config.unit, i_lo, i_hi, slab_cot)
        grads[g] = {param_name(g, k, name): v for k, local in enumerate(per_split, start=1)
                    for name, v in local.items()}
    return grads
