r"""How a :class:`SuperLoRAConfig` and target shapes become groups, folds and splits.

A :class:`Plan` is built from shapes only (nothing is materialised), so parameter counts of
7B-model configurations are instant.  For each group ``g`` (docs/math.md §2) it fixes

* ``N_g`` (the entries of ``ΔW_all`` the group produces) and ``n_g = max(1, ⌈ρ·N_g⌉)``;
* the fold: the shape ``X_g`` is generated in (:func:`group_fold_shape`);
* the Kronecker (or Hadamard) splits ``X_{g,1}, …, X_{g,K}`` with their kinds and ranks
  (:func:`plan_splits`);
* the fixed projection ``F_g`` (:meth:`Plan.projection`).

Every trainable array is named ``g{g}.split{k}.{block}`` (``k`` from 1; ``block`` is ``core``,
``weights``, ``factor{m}`` or ``dense``); :func:`param_name` builds such a name and
:func:`parse_param_name` reads one back.  No other module writes the scheme by hand.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import buffers
from .._deprecation import renamed
from ..ops import Fastfood, Grouping, Shuffle, kron_shape
from ..ops.fold import cubic_fold_shape
from .config import SuperLoRAConfig
from .factorize import factorization, split_side

__all__ = [
    "MAX_GENERATED_FACTOR",
    "MAX_TARGETS",
    "SIZE_SLACK",
    "GroupPlan",
    "Plan",
    "SplitPlan",
    "fold_shape",
    "group_fold_shape",
    "layer_groups",
    "param_name",
    "param_prefix",
    "parse_param_name",
    "plan_group",
    "plan_splits",
]

_NAME = re.compile(r"g(\d+)\.split(\d+)\.([A-Za-z_][A-Za-z0-9_]*)")

# What the shapes allow (docs/reliability.md): a group generates at most
# MAX_GENERATED_FACTOR · n_g + SIZE_SLACK entries before the cut (the rest is padding) and has at most
# MAX_GENERATED_FACTOR · N_g + SIZE_SLACK trainable parameters, so init / delta / vjp never allocate
# more than a fixed multiple of ΔW itself; a plan over more than MAX_TARGETS targets is refused.
#: Largest ratio of a group's generated entries (and of its parameters) to its own entries.
MAX_GENERATED_FACTOR = 64
#: Entries (and parameters) a group may have beyond that ratio, so that tiny groups keep small folds.
SIZE_SLACK = 2**16
#: Most targets of one plan.
MAX_TARGETS = 10**6


# ---------------------------------------------------------------------------------- names
def param_name(group: int, split: int, block: str) -> str:
    """The name of trainable array ``block`` of split ``split`` (from 1) of group ``group``.

    >>> param_name(0, 1, "factor0")
    'g0.split1.factor0'
    """
    return f"{param_prefix(group, split)}{block}"


def param_prefix(group: int, split: int | None = None) -> str:
    """The common prefix of a group's names (``"g3."``) or of one split's (``"g3.split2."``)."""
    return f"g{group}." if split is None else f"g{group}.split{split}."


def parse_param_name(name: str) -> tuple[int, int, str]:
    """``(group, split, block)`` of a name made by :func:`param_name`.

    >>> parse_param_name("g2.split1.core")
    (2, 1, 'core')

    Raises
    ------
    ValueError
        If ``name`` does not follow the scheme ``g{g}.split{k}.{block}``.
    """
    match = _NAME.fullmatch(str(name))
    if match is None:
        raise ValueError(f"{name!r} is not a SuperLoRA parameter name (g{{group}}.split{{k}}.{{block}})")
    return int(match.group(1)), int(match.group(2)), match.group(3)


# ---------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class SplitPlan:
    """One factor ``X_{g,k}`` of a group: its kind, output shape, ranks and fixed modes."""

    kind: str  # "tucker" | "cp" | "identity" | "dense"
    shape: tuple[int, ...]
    ranks: tuple[int, ...]
    fixed_modes: tuple[int, ...] = ()

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Trainable arrays of this split by local name (``core``, ``weights``, ``factor{m}``, ``dense``)."""
        if self.kind == "dense":
            return {"dense": self.shape}
        out: dict[str, tuple[int, ...]] = {}
        if self.kind == "tucker":
            out["core"] = self.ranks
        elif self.kind == "cp":
            out["weights"] = (self.ranks[0],)
        for m, (d, r) in enumerate(zip(self.shape, self.ranks, strict=True)):
            if m not in self.fixed_modes:
                out[f"factor{m}"] = (d, r)
        return out

    @functools.cached_property
    def num_params(self) -> int:  # cached: many groups of a plan share one SplitPlan
        return sum(math.prod(s) for s in self.parameter_shapes().values())

    @property
    def zero_block(self) -> str:
        """The one block zeroed at init so that the product starts at 0 (docs/math.md D10)."""
        return {"tucker": "core", "cp": "weights", "dense": "dense"}.get(self.kind, "factor0")


@dataclass(frozen=True)
class GroupPlan:
    """Sizes and splits of one group."""

    index: int
    size: int  # N_g, entries of ΔW_all this group produces
    n: int  # n_g, entries generated before the projection
    shape: tuple[int, ...]  # the generator's output shape (product of the split shapes)
    splits: tuple[SplitPlan, ...]
    scale: float

    @property
    def num_params(self) -> int:
        return sum(s.num_params for s in self.splits)

    @property
    def padding(self) -> int:
        """Generated entries discarded by the cut."""
        return math.prod(self.shape) - self.n


def layer_groups(names: Sequence[str]) -> list[list[int]]:
    """Consecutive targets with the same parent module name form one group.

    Names are module names (``h.0.attn.c_attn``, as ``attach`` gives them) or tensor names
    (``h.0.attn.c_attn.weight``, as safetensors files and ``shapes_from_model`` give them); a
    trailing ``.weight`` is dropped first, so both group ``c_attn`` with ``c_proj`` of ``h.0.attn``.
    """
    groups: list[list[int]] = []
    last = None
    for i, name in enumerate(names):
        module = name.removesuffix(".weight")
        parent = module.rsplit(".", 1)[0] if "." in module else ""
        if groups and parent == last:
            groups[-1].append(i)
        else:
            groups.append([i])
        last = parent
    return groups


# ---------------------------------------------------------------------------------- folds
def group_fold_shape(config: SuperLoRAConfig, grouping: Grouping, g: int, n: int) -> tuple[int, ...]:
    """The shape group ``g`` is generated in, before the cut to its ``n = n_g`` entries.

    ``layout="stack"``: the group's own ``(o, Σn)``; ``fold="cubic"``: the cube
    :func:`~tensoradapt.ops.fold.cubic_fold_shape` ``(n, M)``; ``fold="matrix"`` / ``"layers"``:
    the weight's ``(o, n)`` / the ``(S, o, n)`` stack (:func:`_weight_fold`); an explicit shape as
    given (``Π ≥ n``).
    """
    if config.layout == "stack":
        return grouping.group_shape(g)
    if config.fold == "cubic":
        return cubic_fold_shape(n, config.order)
    if config.fold in ("matrix", "layers"):
        return _weight_fold(config, grouping, g, n)
    shape = tuple(config.fold)
    if math.prod(shape) < n:
        raise ValueError(f"fold shape {shape} holds {math.prod(shape)} entries, fewer than the "
                         f"n_g = {n} entries of group {g}")
    return shape


#: Deprecated name of :func:`group_fold_shape` (``ops.fold.cubic_fold_shape`` is the cube of ``n``).
fold_shape = renamed(group_fold_shape, "fold_shape", "tensoradapt.superlora.plan")


def _weight_fold(config: SuperLoRAConfig, grouping: Grouping, g: int, n: int) -> tuple[int, ...]:
    """``fold="matrix"``: the group's one weight as ``(o, n)``; ``fold="layers"``: its ``S``
    equal-shape weights as ``(S, o, n)``.

    With ``ρ < 1`` the generator makes ``n_g < N_g`` entries, so the matrix is the square fold of
    the reduced vector instead: ``(d, d)`` with ``d = fold_side(n_g, 2)``, or ``(S, d, d)`` with
    ``d = fold_side(⌈n_g / S⌉, 2)``; the split rules apply to it as to ``(o, n)``.
    """
    fold, shapes, members = config.fold, grouping.shapes, grouping.members[g]
    whole = grouping.bounds[g + 1] - grouping.bounds[g] == sum(math.prod(shapes[i]) for i in members)
    if not whole:
        raise ValueError(f"fold={fold!r} needs whole-weight groups; group {g} cuts a weight "
                         "(use grouping='weight', 'layer' or membership lists)")
    mats = [(shapes[i][0], math.prod(shapes[i][1:])) for i in members]
    if fold == "matrix" and len(members) != 1:
        raise ValueError(f"fold='matrix' needs one weight per group; group {g} has targets {list(members)}")
    if fold == "layers" and len(set(mats)) != 1:
        raise ValueError(f"fold='layers' stacks weights of one shape; group {g} has shapes "
                         f"{[shapes[i] for i in members]} (LoTR needs equal-shape targets: pass "
                         "grouping lists of equal-shape targets)")
    reduced = n < grouping.sizes[g]
    if fold == "matrix":
        return cubic_fold_shape(n, 2) if reduced else mats[0]
    count = len(members)
    return (count, *cubic_fold_shape(-(-n // count), 2)) if reduced else (count, *mats[0])


# ---------------------------------------------------------------------------------- splits
def plan_group(config: SuperLoRAConfig, grouping: Grouping, g: int) -> GroupPlan:
    """Sizes, fold and splits of group ``g``.

    Raises ``ValueError`` when the group would generate, or train, more than
    ``MAX_GENERATED_FACTOR`` times its own entries plus ``SIZE_SLACK`` (e.g. ``order=40`` on a
    16-entry weight folds it into ``2**40`` entries): checked on shapes, before anything exists.
    """
    size = grouping.sizes[g]
    n = size if config.layout == "stack" else config.projected_size(size)
    shape = group_fold_shape(config, grouping, g, n)
    _check_fixed_modes(config, shape, g)
    _check_generated(config, "generates", math.prod(shape), n, g)
    splits, scale = plan_splits(config, shape)
    out_shape = splits[0].shape if config.unit == "hadamard" else kron_shape([s.shape for s in splits])
    _check_generated(config, "generates", math.prod(out_shape), n, g)
    _check_generated(config, "trains", sum(s.num_params for s in splits), size, g)
    return GroupPlan(g, size, n, out_shape, splits, scale)


def _check_generated(config: SuperLoRAConfig, verb: str, count: int, entries: int, g: int) -> None:
    limit = MAX_GENERATED_FACTOR * entries + SIZE_SLACK
    if count > limit:
        what = "entries" if verb == "generates" else "parameters"
        shown = f"{count:,}" if count < 10**40 else f"about 10^{len(str(count)) - 1}"
        raise ValueError(f"group {g} {verb} {shown} {what} for its {entries:,} entries (order={config.order}, "
                         f"splits={config.splits}, rank={config.rank!r}, fold={config.fold!r}); at most "
                         f"{MAX_GENERATED_FACTOR}x its entries + {SIZE_SLACK:,} are allowed (docs/reliability.md)")


def _group_key(config: SuperLoRAConfig, grouping: Grouping, g: int) -> Any:
    """What :func:`plan_group` depends on besides ``g``: groups with equal keys have equal plans
    (so a plan over 10^5 equal-shape weights plans one group, not 10^5)."""
    size = grouping.sizes[g]
    if config.layout == "stack" or config.fold in ("matrix", "layers"):
        shapes, members = grouping.shapes, grouping.members[g]
        if len(members) == 1:
            shape = shapes[members[0]]
            return size, (shape,), math.prod(shape) == size
        return size, tuple(shapes[i] for i in members), sum(math.prod(shapes[i]) for i in members) == size
    return (size,)


def _check_fixed_modes(config: SuperLoRAConfig, shape: tuple[int, ...], g: int) -> None:
    """A fixed identity factor is square: an explicit rank of its mode must be the fold size
    (an integer ``rank`` gives such a mode its fold size, see :func:`_ranks`)."""
    if not isinstance(config.rank, tuple):
        return
    for m in config.fixed_identity_modes:
        if config.ranks[m] != shape[m]:
            raise ValueError(f"fixed identity mode {m} needs rank[{m}] = the fold size {shape[m]} "
                             f"(group {g}), got {config.ranks[m]}")


def plan_splits(config: SuperLoRAConfig, shape: tuple[int, ...]) -> tuple[tuple[SplitPlan, ...], float]:
    """The splits that generate ``shape`` and the group's scale (LoKr's full second block sets it
    to 1, LyCORIS's ``α := r``)."""
    scale = config.effective_scale
    if config.splits == 1:
        unit = _unit(config, shape)
        return (SplitPlan(unit.kind, unit.shape, unit.ranks, config.fixed_identity_modes),), scale
    if config.fold == "matrix":
        return _matrix_splits(config, shape, scale)
    return _cubic_splits(config, shape), scale


def _ranks(config: SuperLoRAConfig, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The ranks of a unit of ``shape``: ``config.ranks``, except that a fixed identity mode of
    an integer ``rank`` takes its size (LoTR's ``S`` comes from the shapes)."""
    if isinstance(config.rank, tuple) or not config.fixed_identity_modes:
        return config.ranks
    return tuple(shape[m] if m in config.fixed_identity_modes else r for m, r in enumerate(config.ranks))


def _unit(config: SuperLoRAConfig, shape: tuple[int, ...]) -> SplitPlan:
    if config.core == "dense":
        return SplitPlan("dense", shape, ())
    return SplitPlan(config.core, shape, _ranks(config, shape))


def _cubic_splits(config: SuperLoRAConfig, shape: tuple[int, ...]) -> tuple[SplitPlan, ...]:
    """``K`` equal units of side ``split_side`` per mode, after an optional dense split of side ``f``."""
    f = config.dense_side
    sides = [split_side(d, config.splits, f) for d in shape]
    first = [SplitPlan("dense", (f,) * config.order, ())] if f is not None else []
    rest = [_unit(config, tuple(sides)) for _ in range(config.splits - len(first))]
    return tuple(first + rest)


def _matrix_splits(config: SuperLoRAConfig, shape: tuple[int, ...],
                   scale: float) -> tuple[tuple[SplitPlan, ...], float]:
    """LoHa's two ``(o, n)`` identity units, or LoKr's ``w1 ⊗ w2`` by the LyCORIS factorisation."""
    rank = config.ranks[0]
    o, n = shape
    if config.unit == "hadamard":
        return (SplitPlan("identity", shape, (rank, rank)),) * 2, scale
    factor = config.dense_side if config.dense_side is not None else -1
    a, c = factorization(o, factor)
    b, e = factorization(n, factor)
    if config.decompose_both and rank < max(a, b) / 2:
        first = SplitPlan("identity", (a, b), (rank, rank))
    else:
        first = SplitPlan("dense", (a, b), ())
    if rank < max(c, e) / 2 and config.core != "dense":
        second = SplitPlan(config.core, (c, e), (rank, rank))
    else:  # LyCORIS: a full second block, and alpha := rank (scale 1) when alpha is used
        second = SplitPlan("dense", (c, e), ())
        if config.alpha is not None:
            scale = 1.0
    return (first, second), scale


# ---------------------------------------------------------------------------------- Plan
class Plan:
    r"""Groups, folds, splits and projections of a configuration on an ordered list of targets.

    Parameters
    ----------
    config : SuperLoRAConfig
    shapes : sequence of shapes
        Target weight shapes ``(o_i, n_i, …)`` in target order.
    names : sequence of str, optional
        Target names (module paths); needed for ``grouping="layer"`` (consecutive targets with
        the same parent module form one group).

    Attributes
    ----------
    config, names, shapes : the inputs (shapes as tuples)
    grouping : :class:`~tensoradapt.ops.Grouping`
    groups : tuple of GroupPlan
    """

    def __init__(self, config: SuperLoRAConfig, shapes: Sequence[Sequence[int]],
                 names: Sequence[str] | None = None, *, generator: str | None = None) -> None:
        if not isinstance(config, SuperLoRAConfig):
            raise TypeError(f"config must be a SuperLoRAConfig, got {type(config).__name__}")
        grouping_spec: Any = config.grouping
        if names is not None:
            names = [str(n) for n in names]
            if len(names) != len(shapes):
                raise ValueError(f"names has {len(names)} entries but shapes has {len(shapes)}")
        if grouping_spec == "layer":
            if names is None:
                raise ValueError("grouping='layer' needs the target names (names=[...]) to find the layers")
            grouping_spec = layer_groups(names)
        if hasattr(shapes, "__len__") and len(shapes) > MAX_TARGETS:
            raise ValueError(f"shapes has {len(shapes):,} targets; at most {MAX_TARGETS:,} are allowed "
                             "(docs/reliability.md)")
        self.config = config
        self.names = tuple(names) if names is not None else None
        self.grouping = Grouping(shapes, grouping_spec, layout=config.layout)
        self.shapes = self.grouping.shapes
        planned: dict[Any, GroupPlan] = {}  # one plan per distinct group (linear in the targets)
        groups = []
        for g in range(self.grouping.num_groups):
            key = _group_key(config, self.grouping, g)
            known = planned.get(key)
            if known is None:
                known = planned[key] = plan_group(config, self.grouping, g)
            groups.append(known if known.index == g else
                          GroupPlan(g, known.size, known.n, known.shape, known.splits, known.scale))
        self.groups = tuple(groups)
        self._operators: dict[Any, Any] = {}
        #: the fixed-buffer generator of the projections (``buffers.GENERATORS``; docs/math.md D6)
        self.generator_id = buffers.check_generator(generator)

    # ------------------------------------------------------------------ sizes and names
    @property
    def num_params(self) -> int:
        """Trainable parameters (fixed buffers and identity factors excluded)."""
        return sum(g.num_params for g in self.groups)

    @property
    def num_arrays(self) -> int:
        """Number of trainable arrays (entries of :meth:`parameter_shapes`)."""
        return sum(len(split.parameter_shapes()) for group in self.groups for split in group.splits)

    def parameter_shapes(self, groups: Sequence[int] | None = None) -> dict[str, tuple[int, ...]]:
        """Every trainable array's name (:func:`param_name`) and shape.

        With ``groups``, only the arrays of those groups.
        """
        out = {}
        chosen = self.groups if groups is None else [self.groups[g] for g in groups]
        for group in chosen:
            for k, split in enumerate(group.splits, start=1):
                for block, shape in split.parameter_shapes().items():
                    out[param_name(group.index, k, block)] = shape
        return out

    # ------------------------------------------------------------------ projections
    @property
    def global_shuffle(self) -> bool:
        """Whether one Shuffle runs over all of ``ΔW_all`` (``shuffle_scope="global"``)."""
        return self.config.projection == "shuffle" and self.config.shuffle_scope == "global"

    def projection(self, g: int | None) -> Any:
        """The fixed operator of group ``g`` (``None``: the global Shuffle over ``ΔW_all``),
        built on first use and cached; see :meth:`group_projection` for which groups have one."""
        cfg = self.config
        if g not in self._operators:
            if g is None:
                op = Shuffle(self.grouping.total, cfg.seed, group=self.grouping.num_groups, generator=self.generator_id)
            elif cfg.projection == "shuffle":
                op = Shuffle(self.groups[g].size, cfg.seed, group=g, generator=self.generator_id)
            else:
                op = Fastfood(self.groups[g].n, self.groups[g].size, cfg.seed, group=g,
                              order=cfg.fastfood_order, generator=self.generator_id)
            self._operators[g] = op
        return self._operators[g]

    def group_projection(self, g: int) -> Any:
        """``F_g`` of group ``g``, or ``None`` when the group has none of its own (no projection,
        or a global Shuffle applied after all groups)."""
        if self.config.projection == "none" or self.global_shuffle:
            return None
        return self.projection(g)

    def groups_for(self, indices: Sequence[int]) -> tuple[int, ...]:
        """The groups whose outputs the targets ``indices`` need (all groups under a global shuffle)."""
        if self.global_shuffle:
            self.grouping.groups_for(indices)  # validates the indices
            return tuple(range(len(self.groups)))
        return self.grouping.groups_for(indices)
