r"""Concatenation of the targeted weights and their split into groups (docs/math.md §2 steps 4–5, §3.1–3.2).

All targeted ``ΔW_i`` (shapes ``(o_i, n_i, …)``) are flattened row-major and concatenated into
``ΔW_all ∈ R^N`` in a fixed target order; the groups are contiguous segments of it.

* ``grouping="weight"``: one group per weight (``G = S``);
* explicit membership lists, e.g. ``[[0, 1], [2, 3]]``: whole weights per group; the
  concatenation order is the order of the groups, then the listed order inside each group;
* an integer ``G``: ``G`` equal contiguous chunks of ``ΔW_all`` with ``numpy.array_split`` sizes
  (``N_g = ⌊N/G⌋ + [g < N mod G]``), which may straddle weights.

Layout ``"fold"`` gives each group a vector of ``N_g`` entries.  Layout ``"stack"`` gives each
group of whole weights with equal row counts ``o`` a matrix ``[ΔW_a, ΔW_b, …] ∈ R^{o × Σ n}``
(horizontal concatenation, weights of more than two modes flattened to ``(o, Π rest)``), sliced
back into column blocks; with an integer ``G`` the weights are split into ``G`` consecutive
whole-weight groups (``array_split`` counts).

Every map is a re-indexing, so each adjoint is its inverse: :meth:`Grouping.to_targets` and
:meth:`Grouping.from_targets` are mutual adjoints, as are :meth:`Grouping.split` and
:meth:`Grouping.merge`, and :func:`concat_targets` and :func:`split_targets`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from .._backend import check_floating, device_of, indexed, namespace
from .._frozen import Frozen
from .._validate import check_int, check_shape

__all__ = ["Grouping", "concat_targets", "split_targets"]

_LAYOUTS = ("fold", "stack")


def _check_shapes(shapes: Any) -> tuple[tuple[int, ...], ...]:
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, Sequence) or len(shapes) == 0:
        raise ValueError(f"shapes must be a non-empty sequence of weight shapes, got {shapes!r:.80}")
    return tuple(check_shape(f"shapes[{i}]", s) for i, s in enumerate(shapes))


def concat_targets(arrays: Sequence[Any]) -> Any:
    """``[vec ΔW_1, …, vec ΔW_S] ∈ R^N`` (row-major ``vec``); adjoint and inverse of
    :func:`split_targets`."""
    if not isinstance(arrays, (list, tuple)) or len(arrays) == 0:
        raise TypeError(f"arrays must be a non-empty list or tuple of arrays, got {arrays!r:.80}")
    xp = namespace(**indexed("arrays", arrays))
    check_floating(xp, [(f"arrays[{i}]", a) for i, a in enumerate(arrays)])
    return xp.concat([xp.reshape(a, (-1,)) for a in arrays])


def split_targets(delta: Any, shapes: Sequence[Sequence[int]]) -> list[Any]:
    """``ΔW_i = unvec_{shape_i}(δ[off_i : off_i + N_i])``; adjoint and inverse of
    :func:`concat_targets`."""
    shapes = _check_shapes(shapes)
    xp = namespace(delta=delta)
    check_floating(xp, [("delta", delta)])
    total = sum(math.prod(s) for s in shapes)
    if delta.ndim != 1 or delta.shape[0] != total:
        raise ValueError(
            f"delta must be 1-D with N = {total} entries (the sum of the target sizes), "
            f"got shape {tuple(delta.shape)}"
        )
    out, offset = [], 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(xp.reshape(delta[offset : offset + size], shape))
        offset += size
    return out


def _array_split_bounds(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    bounds = [0]
    for g in range(parts):
        bounds.append(bounds[-1] + base + (g < extra))
    return bounds


class Grouping(Frozen):
    r"""The plan that maps group outputs to target weights (and back) for one target list.

    Parameters
    ----------
    shapes : sequence of shapes
        The ordered target weight shapes ``(o_i, n_i, …)``; ``S = len(shapes)``.
    grouping : "weight", int or sequence of sequences of int
        ``"weight"`` (one group per weight), an integer ``G`` (equal chunks of ``ΔW_all``; for
        the stack layout, ``G`` consecutive whole-weight groups) or explicit membership lists
        that partition ``range(S)``.
    layout : {"fold", "stack"}
        Group outputs are vectors of ``N_g`` entries (``"fold"``) or ``(o, Σ n)`` matrices of
        horizontally stacked weights (``"stack"``).

    Attributes
    ----------
    shapes : tuple of tuple of int
    layout : str
    order : tuple of int
        Concatenation order of the targets in ``ΔW_all``.
    bounds : tuple of int
        Group ``g`` is ``ΔW_all[bounds[g] : bounds[g+1]]`` (``G + 1`` entries).
    members : tuple of tuple of int
        Targets that receive entries from each group, in concatenation order.

    Examples
    --------
    >>> g = Grouping([(2, 2), (3, 2)], grouping=3)
    >>> g.sizes, g.members
    ((4, 3, 3), ((0,), (1,), (1,)))
    """

    __slots__ = ("_sizes", "_target_groups", "_target_offsets", "bounds", "layout", "members", "order", "shapes")

    def __init__(self, shapes: Sequence[Sequence[int]], grouping: Any = "weight",
                 layout: str = "fold") -> None:
        shapes = _check_shapes(shapes)
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
        count = len(shapes)
        sizes = [math.prod(s) for s in shapes]
        lists = self._membership(grouping, count, layout)
        if lists is None:  # integer G over the concatenated entries (fold layout)
            total = sum(sizes)
            parts = check_int("grouping", grouping, minimum=1)
            if parts > total:
                raise ValueError(
                    f"grouping (G = {parts}) must be <= N = {total}, the number of adapted entries"
                )
            order = tuple(range(count))
            bounds = _array_split_bounds(total, parts)
        else:
            order = tuple(i for group in lists for i in group)
            bounds = [0]
            for group in lists:
                bounds.append(bounds[-1] + sum(sizes[i] for i in group))
        offsets, start = {}, 0
        for i in order:
            offsets[i] = start
            start += sizes[i]
        members = self._overlaps(order, [offsets[i] for i in order], [sizes[i] for i in order], bounds)
        if layout == "stack":
            self._check_stack(shapes, members)
        target_groups: list[list[int]] = [[] for _ in range(count)]  # target -> its groups, O(S + G)
        for g, group in enumerate(members):
            for i in group:
                target_groups[i].append(g)
        self._freeze(shapes=shapes, layout=layout, order=order, bounds=tuple(bounds),
                     members=members, _target_offsets=offsets,
                     _sizes=tuple(hi - lo for lo, hi in itertools.pairwise(bounds)),
                     _target_groups=tuple(tuple(g) for g in target_groups))

    @staticmethod
    def _overlaps(order: Sequence[int], starts: Sequence[int], sizes: Sequence[int],
                  bounds: Sequence[int]) -> tuple[tuple[int, ...], ...]:
        """For each segment ``[bounds[g], bounds[g+1])``, the targets (in concatenation order)
        whose entries ``[start, start + size)`` overlap it: one sweep, ``O(S + G)``."""
        members, first = [], 0
        for lo, hi in itertools.pairwise(bounds):
            while first < len(order) and starts[first] + sizes[first] <= lo:
                first += 1  # targets that end before this segment never overlap a later one
            group, j = [], first
            while j < len(order) and starts[j] < hi:
                if starts[j] + sizes[j] > lo:
                    group.append(order[j])
                j += 1
            members.append(tuple(group))
        return tuple(members)

    @staticmethod
    def _membership(grouping: Any, count: int, layout: str) -> list[list[int]] | None:
        """Whole-weight membership lists, or None for an integer G in the fold layout."""
        if isinstance(grouping, str):
            if grouping != "weight":
                raise ValueError(
                    f"grouping must be 'weight', an integer G or membership lists, got {grouping!r}"
                )
            return [[i] for i in range(count)]
        if isinstance(grouping, Sequence):
            lists = []
            for g, group in enumerate(grouping):
                if isinstance(group, (str, bytes)) or not isinstance(group, Sequence) or not group:
                    raise ValueError(
                        f"grouping[{g}] must be a non-empty list of target indices, got {group!r}"
                    )
                lists.append([check_int(f"grouping[{g}][{j}]", i, minimum=0) for j, i in enumerate(group)])
            flat = sorted(i for group in lists for i in group)
            if flat != list(range(count)):
                raise ValueError(
                    f"grouping lists must partition the {count} targets (each of 0..{count - 1} "
                    f"exactly once), got {grouping!r}"
                )
            return lists
        parts = check_int("grouping", grouping, minimum=1)
        if layout == "fold":
            return None
        if parts > count:
            raise ValueError(
                f"grouping (G = {parts}) must be <= the {count} targets for the stack layout "
                "(stack groups hold whole weights)"
            )
        bounds = _array_split_bounds(count, parts)
        return [list(range(lo, hi)) for lo, hi in itertools.pairwise(bounds)]

    @staticmethod
    def _check_stack(shapes: tuple[tuple[int, ...], ...], members: tuple[tuple[int, ...], ...]) -> None:
        for g, group in enumerate(members):
            for i in group:
                if len(shapes[i]) < 2:
                    raise ValueError(
                        f"the stack layout needs weights with at least 2 modes; target {i} has "
                        f"shape {shapes[i]}"
                    )
            rows = {shapes[i][0] for i in group}
            if len(rows) > 1:
                detail = ", ".join(f"target {i}: {shapes[i][0]}" for i in group)
                raise ValueError(
                    f"the stack layout concatenates weights horizontally, so every weight of a "
                    f"group needs the same row count; group {g} has {detail}"
                )

    # -- sizes -----------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        """``G``."""
        return len(self.bounds) - 1

    @property
    def sizes(self) -> tuple[int, ...]:
        """``N_g``, the entries of ``ΔW_all`` that each group produces (computed once)."""
        return self._sizes

    @property
    def total(self) -> int:
        """``N = Σ_i N_i``."""
        return self.bounds[-1]

    def group_shape(self, g: int) -> tuple[int, ...]:
        """Shape of group ``g``'s output: ``(N_g,)`` (fold) or ``(o, Σ n)`` (stack)."""
        g = check_int("g", g, minimum=0)
        if g >= self.num_groups:
            raise ValueError(f"g must be < the number of groups ({self.num_groups}), got {g}")
        if self.layout == "fold":
            return (self.sizes[g],)
        group = self.members[g]
        rows = self.shapes[group[0]][0]
        return (rows, sum(math.prod(self.shapes[i][1:]) for i in group))

    def groups_for(self, targets: Sequence[int]) -> tuple[int, ...]:
        """The (sorted) groups whose outputs the given targets need."""
        wanted = {check_int("targets[]", t, minimum=0) for t in targets}
        bad = [t for t in wanted if t >= len(self.shapes)]
        if bad:
            raise ValueError(f"targets must be < the number of targets ({len(self.shapes)}), got {bad}")
        if len(wanted) == 1:
            return self._target_groups[next(iter(wanted))]
        return tuple(sorted({g for t in wanted for g in self._target_groups[t]}))

    # -- fold-layout vector maps ---------------------------------------------------------------
    def split(self, delta: Any) -> list[Any]:
        """``ΔW_all ∈ R^N`` (concatenation order) → the group vectors ``δ[a_g : a_g + N_g]``."""
        xp = namespace(delta=delta)
        check_floating(xp, [("delta", delta)])
        if delta.ndim != 1 or delta.shape[0] != self.total:
            raise ValueError(
                f"delta must be 1-D with N = {self.total} entries, got shape {tuple(delta.shape)}"
            )
        return [delta[lo:hi] for lo, hi in itertools.pairwise(self.bounds)]

    def merge(self, parts: Sequence[Any]) -> Any:
        """Adjoint (and inverse) of :meth:`split`: concatenate the group vectors."""
        self._check_parts(parts, vectors=True)
        xp = namespace(**indexed("parts", parts))
        return xp.concat(list(parts))

    def _check_parts(self, parts: Any, vectors: bool = False) -> None:
        if not isinstance(parts, (list, tuple)) or len(parts) != self.num_groups:
            raise ValueError(
                f"expected a list of {self.num_groups} group arrays, got "
                f"{len(parts) if isinstance(parts, (list, tuple)) else type(parts).__name__}"
            )
        for g, part in enumerate(parts):
            expected = (self.sizes[g],) if vectors else self.group_shape(g)
            if tuple(part.shape) != expected:
                raise ValueError(f"group {g} must have shape {expected}, got {tuple(part.shape)}")

    # -- group outputs <-> target weights ---------------------------------------------------------
    def to_targets(self, outputs: Sequence[Any] | Mapping[int, Any],
                   targets: Sequence[int] | None = None) -> list[Any]:
        """Group outputs → ``ΔW_i`` for each requested target (all by default), in the order asked.

        ``outputs`` is a list of all ``G`` group outputs (shapes :meth:`group_shape`) or a
        mapping ``{g: output}`` that holds at least :meth:`groups_for` the requested targets, so
        a caller can build one layer's ``ΔW`` from the few groups it needs.
        """
        wanted = list(range(len(self.shapes))) if targets is None else list(targets)
        needed = self.groups_for(wanted)
        if isinstance(outputs, Mapping):
            missing = [g for g in needed if g not in outputs]
            if missing:
                raise ValueError(f"outputs lacks groups {missing}, which targets {wanted} need")
            chosen = {g: outputs[g] for g in needed}
        else:
            self._check_parts(outputs)
            chosen = {g: outputs[g] for g in needed}
        for g, part in chosen.items():
            if tuple(part.shape) != self.group_shape(g):
                raise ValueError(f"group {g} must have shape {self.group_shape(g)}, got {tuple(part.shape)}")
        xp = namespace(**{f"outputs[{g}]": v for g, v in chosen.items()})
        check_floating(xp, [(f"outputs[{g}]", v) for g, v in chosen.items()])
        if self.layout == "stack":
            return [self._stack_slice(xp, chosen, i) for i in wanted]
        return [self._fold_slice(xp, chosen, i) for i in wanted]

    def _check_target(self, target: int) -> int:
        target = check_int("target", target, minimum=0)
        if target >= len(self.shapes):
            raise ValueError(f"target must be < the number of targets ({len(self.shapes)}), got {target}")
        return target

    def target_pieces(self, target: int) -> tuple[tuple[int, int, int], ...]:
        """Fold layout: the ranges ``(g, a, b)`` of the group vectors that make up ``target``.

        Target ``target`` is ``ΔW_all[off : off + N_i]``; its overlap with group ``g``'s segment
        ``[a_g, a_g + N_g)`` is ``[a, b)`` of that group's own vector, ``a = max(a_g, off) − a_g`` and
        ``b = min(a_g + N_g, off + N_i) − a_g``.  The pieces are in the target's row-major order, so
        ``vec ΔW_i`` is the concatenation of ``y_g[a:b]`` over them (docs/math.md §3.2.3).

        >>> Grouping([(2, 2), (3, 2)], grouping=3).target_pieces(1)
        ((1, 0, 3), (2, 0, 3))
        >>> Grouping([(2, 5)], grouping=3).target_pieces(0)
        ((0, 0, 4), (1, 0, 3), (2, 0, 3))
        """
        if self.layout != "fold":
            raise ValueError("target_pieces applies to the fold layout; a stack-layout target is a column "
                             "block (target_columns)")
        return self._pieces(self._check_target(target))

    def _pieces(self, target: int) -> tuple[tuple[int, int, int], ...]:
        start = self._target_offsets[target]
        stop = start + math.prod(self.shapes[target])
        out = []
        for g in self._target_groups[target]:
            lo, hi = self.bounds[g], self.bounds[g + 1]
            out.append((g, max(lo, start) - lo, min(hi, stop) - lo))
        return tuple(out)

    def _fold_slice(self, xp: Any, chosen: Mapping[int, Any], target: int) -> Any:
        pieces = [chosen[g][a:b] for g, a, b in self._pieces(target)]
        flat = pieces[0] if len(pieces) == 1 else xp.concat(pieces)
        return xp.reshape(flat, self.shapes[target])

    def target_columns(self, target: int) -> tuple[int, int, int]:
        """Stack layout: ``(g, c0, c1)``, the column block ``[c0, c1)`` of group ``g``'s ``(o, Σ n)``
        matrix that holds ``target`` (docs/math.md §3.2.2).

        >>> Grouping([(2, 3), (2, 4)], grouping=1, layout="stack").target_columns(1)
        (0, 3, 7)
        """
        if self.layout != "stack":
            raise ValueError("target_columns applies to the stack layout; a fold-layout target is made of "
                             "vector ranges (target_pieces)")
        return self._columns(self._check_target(target))

    def _columns(self, target: int) -> tuple[int, int, int]:
        (g,) = self._target_groups[target]
        start = 0
        for i in self.members[g]:
            width = math.prod(self.shapes[i][1:])
            if i == target:
                return g, start, start + width
            start += width
        raise AssertionError("target not in its group")  # pragma: no cover

    def _stack_slice(self, xp: Any, chosen: Mapping[int, Any], target: int) -> Any:
        g, lo, hi = self._columns(target)
        return xp.reshape(chosen[g][:, lo:hi], self.shapes[target])

    def from_targets(self, cotangents: Sequence[Any], groups: Sequence[int] | None = None) -> list[Any]:
        """Adjoint of :meth:`to_targets`: per-target ``W̄_i`` → per-group output cotangents.

        Returns the cotangents of ``groups`` (all by default).  A group that is exactly one whole
        target gets a view of that target's cotangent; other groups get one concatenation of their
        own pieces, so memory stays at one group's size beyond the inputs.
        """
        xp = self.check_cotangents(cotangents)
        wanted = range(self.num_groups) if groups is None else groups
        return [self.group_cotangent(xp, cotangents, g) for g in wanted]

    def check_cotangents(self, cotangents: Sequence[Any]) -> Any:
        """Validate one cotangent per target (shape, backend, dtype); return the namespace."""
        if not isinstance(cotangents, (list, tuple)) or len(cotangents) != len(self.shapes):
            raise ValueError(
                f"expected a list of {len(self.shapes)} target cotangents, got {cotangents!r:.80}"
            )
        for i, (c, shape) in enumerate(zip(cotangents, self.shapes, strict=True)):
            if tuple(c.shape) != shape:
                raise ValueError(f"cotangents[{i}] must have the target shape {shape}, got {tuple(c.shape)}")
        xp = namespace(**indexed("cotangents", cotangents))
        check_floating(xp, [(f"cotangents[{i}]", c) for i, c in enumerate(cotangents)])
        return xp

    def group_cotangent(self, xp: Any, cotangents: Sequence[Any], g: int, pad_to: int | None = None) -> Any:
        """Group ``g``'s output cotangent from already validated target cotangents.

        With ``pad_to`` (fold layout), zeros are appended up to that length in the same
        concatenation (the adjoint of a cut fused with the gather of the pieces).
        """
        members = self.members[g]
        if self.layout == "stack":
            blocks = [xp.reshape(cotangents[i], (self.shapes[i][0], -1)) for i in members]
            return blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=1)
        lo, hi = self.bounds[g], self.bounds[g + 1]
        pieces = []
        for i in members:
            start, size = self._target_offsets[i], math.prod(self.shapes[i])
            a, b = max(lo, start) - start, min(hi, start + size) - start
            flat = xp.reshape(cotangents[i], (-1,))
            pieces.append(flat if (a, b) == (0, size) else flat[a:b])
        if pad_to is not None and pad_to > hi - lo:
            # one fresh array written piece by piece: a concat with a zeros block would hold both
            out = xp.empty((pad_to,), dtype=pieces[0].dtype, device=device_of(pieces[0]))
            at = 0
            for piece in pieces:
                out[at:at + piece.shape[0]] = piece
                at += piece.shape[0]
            out[at:] = 0
            return out
        return pieces[0] if len(pieces) == 1 else xp.concat(pieces)
