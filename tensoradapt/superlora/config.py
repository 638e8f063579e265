"""``SuperLoRAConfig``: every hyper-parameter of a SuperLoRA adapter, validated, JSON round-trip."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from .._validate import MAX_DIM, brief, check_bool, check_choice, check_float, check_int, config_fields, is_int

__all__ = ["CORES", "FOLDS", "LAYOUTS", "MAX_GROUPS", "MAX_ORDER", "MAX_RANK", "MAX_SEED", "MAX_SPLITS",
           "PROJECTIONS", "SuperLoRAConfig"]

CORES = ("tucker", "cp", "identity", "dense")
PROJECTIONS = ("none", "shuffle", "fastfood")
LAYOUTS = ("fold", "stack")
FOLDS = ("cubic", "matrix", "layers")
UNITS = ("kron", "hadamard")
SHUFFLE_SCOPES = ("group", "global")
FASTFOOD_ORDERS = ("li", "paper")
CONFIG_VERSION = 1

# Caps on the size-like fields, checked on construction before anything is allocated (the shapes
# bound them further when a plan is built, see tensoradapt.superlora.plan; docs/reliability.md).
#: Largest tensor order ``M`` (a fold of 2**64 entries has at most 64 modes of side >= 2).
MAX_ORDER = 64
#: Most Kronecker splits ``K`` (each split multiplies the generated size by at least 2 per mode).
MAX_SPLITS = 64
#: Largest rank of a mode.
MAX_RANK = 2**24
#: Largest integer ``G`` of ``grouping`` (and the most membership lists).
MAX_GROUPS = 2**24
#: Largest ``seed`` (an unsigned 64-bit integer, as stored in adapter files).
MAX_SEED = 2**64 - 1


def _as_int(value: Any) -> Any:
    """NumPy (or other ``__index__``) integers as Python ints, recursively in tuples; anything else as is."""
    if isinstance(value, tuple):
        return tuple(_as_int(v) for v in value)
    return int(value) if is_int(value) else value


def _capped(name: str, value: Any, rule: str | None, cap: int, *, minimum: int | None = 1) -> int:
    """``check_int`` with ``rule`` for the kind and lower bound, then the documented ``cap``."""
    as_int = check_int(name, value, minimum=minimum, rule=rule)
    if as_int > cap:
        raise ValueError(f"{name} must be at most {brief(cap)} (the documented cap, docs/reliability.md), "
                         f"got {brief(as_int)}")
    return as_int


def _as_tuple(name: str, value: Any, limit: int) -> Any:
    """A list (e.g. from JSON) as a tuple, refusing more than ``limit`` entries before copying
    them; anything else as is (the field's own check names what is wrong with it)."""
    if isinstance(value, list):
        if len(value) > limit:
            raise ValueError(f"{name} has {len(value)} entries; at most {limit} are allowed")
        return tuple(value)
    if isinstance(value, tuple) and len(value) > limit:
        raise ValueError(f"{name} has {len(value)} entries; at most {limit} are allowed")
    return value


@dataclass(frozen=True)
class SuperLoRAConfig:
    r"""Hyper-parameters of a SuperLoRA adapter (docs/math.md §0 and §2).

    For every group ``g`` of ``ΔW_all`` (see ``grouping``)::

        ΔW_group_g = F_g( Cut_{n_g}( X_{g,1} ⊗ … ⊗ X_{g,K} ) ),   X_{g,k} = C_{gk} ×_1 A_{gk1} … ×_M A_{gkM}
        ΔW_i = s · (the entries of target i),   n_g = max(1, ⌈ρ·N_g⌉)

    Parameters
    ----------
    rank : int or tuple of int
        Tucker/CP rank ``r`` (one per mode as a tuple of length ``order``).  With an integer, a
        fixed identity mode (``fixed_identity_modes``) takes its fold size as its rank.
    order : int
        Tensor order ``M`` of each split (``M = 1`` with ``core="dense"`` is dense fine-tuning).
    splits : int
        Number ``K`` of Kronecker splits.
    dense_side : int, optional
        Side ``f`` of a dense first split (the LoNKr/LoKr "dense factor"); needs ``splits >= 2``.
        With ``fold="matrix"`` it is the LyCORIS ``factor`` of the factorisation (``-1``: none).
    grouping : "weight", "layer", int or tuple of tuples of int
        One group per weight, per layer (needs target names), ``G`` equal chunks of ``ΔW_all``, or
        explicit membership lists (see :class:`tensoradapt.ops.Grouping`).
    layout : {"fold", "stack"}
        ``"stack"``: horizontally stacked equal-row weights modelled by one matrix (``M = 2``).
    fold : {"cubic", "matrix", "layers"} or tuple of int
        Shape the generator produces before the cut: the hyper-cubic ``(d,)*M`` with
        ``d = fold_side(n_g, M)``; each (single-weight) group's own ``(o, n)``; ``(S, o, n)`` for a
        group of ``S`` equal-shape weights (LoTR); or an explicit shape with ``Π ≥ n_g``.  With
        ``ρ < 1``, ``"matrix"`` and ``"layers"`` fold the reduced vector instead: ``(d, d)`` with
        ``d = fold_side(n_g, 2)``, or ``(S, d, d)`` with ``d = fold_side(⌈n_g / S⌉, 2)``.
    core : {"tucker", "cp", "identity", "dense"}
        Full Tucker core, trainable diagonal ``λ``, fixed superdiagonal ones, or a free tensor.
    unit : {"kron", "hadamard"}
        How the K splits combine: Kronecker product (SuperLoRA) or elementwise product (LoHa).
    decompose_both : bool
        ``fold="matrix"``, ``K = 2`` (LoKr): factorise the dense first split too when small enough.
    fixed_identity_modes : tuple of int
        Modes whose Tucker factor is the fixed identity (not trainable); LoTR's layer mode ``(0,)``.
    projection : {"none", "shuffle", "fastfood"}
        The fixed map ``F``.
    ratio : float
        Projection ratio ``ρ ∈ (0, 1]``; identity and shuffle need ``ρ = 1`` (only Fastfood
        generates ``n_g < N_g`` entries and maps them to ``N_g``).
    shuffle_scope : {"group", "global"}
        One permutation per group, or one over all of ``ΔW_all``.
    fastfood_order : {"li", "paper"}
        Fastfood order (see :class:`tensoradapt.ops.Fastfood`).
    seed : int
        Base seed of every fixed random buffer.
    scale : float
        Global scale ``s`` on ``ΔW`` (used when ``alpha`` is None).
    alpha : float, optional
        LoRA-style ``α``: the scale becomes ``α / r`` (``r`` = the first mode's rank).
    """

    rank: int | tuple[int, ...] = 8
    order: int = 2
    splits: int = 1
    dense_side: int | None = None
    grouping: str | int | tuple[tuple[int, ...], ...] = "weight"
    layout: str = "fold"
    fold: str | tuple[int, ...] = "cubic"
    core: str = "identity"
    unit: str = "kron"
    decompose_both: bool = False
    fixed_identity_modes: tuple[int, ...] = field(default=())
    projection: str = "none"
    ratio: float = 1.0
    shuffle_scope: str = "group"
    fastfood_order: str = "li"
    seed: int = 0
    scale: float = 1.0
    alpha: float | None = None

    def __post_init__(self) -> None:
        # normalise lists (e.g. from JSON) to tuples so the config stays hashable, integers to int
        for name in ("rank", "fold"):
            object.__setattr__(self, name, _as_tuple(name, getattr(self, name), MAX_ORDER))
        grouping = _as_tuple("grouping", self.grouping, MAX_GROUPS)
        if isinstance(grouping, tuple):
            grouping = tuple(tuple(m) if isinstance(m, list) else m for m in grouping)
        object.__setattr__(self, "grouping", grouping)
        modes = _as_tuple("fixed_identity_modes", self.fixed_identity_modes, MAX_ORDER)
        if not isinstance(modes, tuple):
            raise TypeError(f"fixed_identity_modes must be a tuple of mode indices, got {brief(modes)}")
        object.__setattr__(self, "fixed_identity_modes", modes)
        check_bool("decompose_both", self.decompose_both)
        object.__setattr__(self, "decompose_both", bool(self.decompose_both))
        for name in ("rank", "order", "splits", "dense_side", "grouping", "fold", "fixed_identity_modes", "seed"):
            object.__setattr__(self, name, _as_int(getattr(self, name)))
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        """Every rule, one group at a time; the first broken rule raises (``TypeError`` for a
        value of the wrong kind, ``ValueError`` otherwise), naming the fields and the rule."""
        self._check_sizes()
        self._check_choices()
        self._check_ranks()
        self._check_dense_side()
        self._check_fold()
        self._check_stack()
        self._check_projection()
        self._check_unit()
        self._check_fixed_modes()
        self._check_seed_and_scale()
        self._check_grouping()

    def _check_sizes(self) -> None:
        for name, cap in (("order", MAX_ORDER), ("splits", MAX_SPLITS)):
            _capped(name, getattr(self, name), "an integer >= 1", cap)

    def _check_choices(self) -> None:
        for name, allowed in (("core", CORES), ("projection", PROJECTIONS), ("layout", LAYOUTS),
                              ("unit", UNITS), ("shuffle_scope", SHUFFLE_SCOPES),
                              ("fastfood_order", FASTFOOD_ORDERS)):
            check_choice(name, getattr(self, name), allowed)

    def _check_ranks(self) -> None:
        if isinstance(self.rank, tuple):
            for m, r in enumerate(self.rank):
                _capped(f"rank[{m}]", r, "a positive integer", MAX_RANK)
            if len(self.rank) != self.order:
                raise ValueError(f"rank {self.rank!r} has {len(self.rank)} entries but order is {self.order} "
                                 "(give one rank per mode)")
        else:
            _capped("rank", self.rank, "a positive integer or a tuple of them", MAX_RANK)
        if self.core in ("identity", "cp") and len(set(self.ranks)) > 1:
            raise ValueError(f"core={self.core!r} needs equal ranks in every mode (a diagonal core), got {self.rank!r}")

    def _check_dense_side(self) -> None:
        f = self.dense_side
        if f is None:
            return
        rule = "a positive integer (or -1 with fold='matrix')"
        if _capped("dense_side", f, rule, MAX_DIM, minimum=None) < 1 and f != -1:
            raise ValueError(f"dense_side must be {rule}, got {f!r}")
        if self.splits < 2:
            raise ValueError(f"dense_side={f} needs splits >= 2 (the dense factor is split 1 of a Kronecker "
                             f"product), got splits={self.splits}")
        if f == -1 and self.fold != "matrix":
            raise ValueError("dense_side=-1 (no factorisation limit) only applies with fold='matrix'")

    def _check_fold(self) -> None:
        fold = self.fold
        if isinstance(fold, tuple):
            if not fold:
                raise ValueError(f"fold must be one of {FOLDS} or a tuple of positive ints, got {fold!r}")
            if len(fold) != self.order:
                raise ValueError(f"fold shape {brief(fold)} has {len(fold)} modes but order is {self.order}")
            for m, d in enumerate(fold):
                _capped(f"fold[{m}]", d, "a positive integer", MAX_DIM)
            return
        if not isinstance(fold, str) or fold not in FOLDS:
            raise ValueError(f"fold must be one of {FOLDS} or a tuple of positive ints, got {brief(fold)}")
        needed = {"matrix": (2, "each weight's (o, n) matrix"), "layers": (3, "an (S, o, n) tensor")}.get(fold)
        if needed is not None and self.order != needed[0]:
            raise ValueError(f"fold={fold!r} generates {needed[1]}, so order must be {needed[0]}, got {self.order}")
        if fold in ("matrix", "layers") and self.splits > 2:
            raise ValueError(f"fold={fold!r} supports at most 2 Kronecker splits (the LyCORIS factorisation), "
                             f"got splits={self.splits}")
        if fold == "layers" and self.splits != 1:
            raise ValueError("fold='layers' (LoTR) needs splits=1")

    def _check_stack(self) -> None:
        if self.layout != "stack":
            return
        if self.order != 2 or self.splits != 1:
            raise ValueError(f"layout='stack' models each group as one (o, Σn) matrix: it needs order=2 and "
                             f"splits=1, got order={self.order}, splits={self.splits}")
        if self.projection != "none":
            raise ValueError(f"layout='stack' generates the group's exact shape, so projection must be 'none', "
                             f"got {self.projection!r}")
        if self.fold != "cubic":
            raise ValueError("layout='stack' ignores fold; leave fold='cubic'")

    def _check_projection(self) -> None:
        ratio = check_float("ratio", self.ratio)
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio (rho) must be in (0, 1], got {self.ratio!r} (a projection never shrinks ΔW)")
        if self.projection in ("none", "shuffle") and ratio != 1:
            raise ValueError(f"projection={self.projection!r} needs ratio=1 (only fastfood changes the size), "
                             f"got {self.ratio!r}")
        if self.shuffle_scope == "global" and self.projection != "shuffle":
            raise ValueError(f"shuffle_scope='global' needs projection='shuffle', got {self.projection!r}")

    def _check_unit(self) -> None:
        if self.unit == "hadamard" and (self.splits != 2 or self.fold != "matrix" or self.core != "identity"):
            raise ValueError("unit='hadamard' (LoHa) needs splits=2, fold='matrix' and core='identity'")
        if self.decompose_both and (self.fold != "matrix" or self.splits != 2 or self.unit != "kron"):
            raise ValueError("decompose_both needs fold='matrix', splits=2 and unit='kron' (LyCORIS LoKr)")

    def _check_fixed_modes(self) -> None:
        modes = self.fixed_identity_modes
        if not modes:
            return
        if self.core != "tucker":
            raise ValueError(f"fixed_identity_modes needs core='tucker', got core={self.core!r}")
        for m in modes:
            check_int("fixed_identity_modes", m, minimum=0, maximum=self.order - 1,
                      rule=f"modes in [0, {self.order})")
        if len(set(modes)) == self.order:
            raise ValueError("fixed_identity_modes cannot fix every mode (nothing but the core would train)")

    def _check_seed_and_scale(self) -> None:
        _capped("seed", self.seed, "a non-negative integer", MAX_SEED, minimum=0)
        check_float("scale", self.scale)
        if self.alpha is not None:
            check_float("alpha", self.alpha)

    def _check_grouping(self) -> None:
        g = self.grouping
        if isinstance(g, str):
            if g not in ("weight", "layer"):
                raise ValueError(f"grouping must be 'weight', 'layer', an integer G or membership lists, "
                                 f"got {brief(g)}")
        elif is_int(g):
            _capped("grouping (G)", g, None, MAX_GROUPS)
        elif isinstance(g, tuple):
            if not g or any(not isinstance(m, tuple) or not m or any(not is_int(i) or not 0 <= i <= MAX_DIM for i in m)
                            for m in g):
                raise ValueError(f"grouping lists must be non-empty lists of target indices, got {brief(g)}")
        else:
            raise ValueError(f"grouping must be 'weight', 'layer', an integer G or membership lists, got {brief(g)}")

    # ------------------------------------------------------------------ derived values
    @property
    def ranks(self) -> tuple[int, ...]:
        """The per-mode ranks ``(r_1, …, r_M)``."""
        return self.rank if isinstance(self.rank, tuple) else (self.rank,) * self.order

    @property
    def effective_scale(self) -> float:
        """``s = α / r_1`` when ``alpha`` is set, else ``scale``."""
        return self.alpha / self.ranks[0] if self.alpha is not None else float(self.scale)

    def projected_size(self, group_size: int) -> int:
        """``n_g = max(1, ⌈ρ·N_g⌉)`` in exact rational arithmetic on the decimal value of ρ."""
        if self.ratio == 1:
            return max(1, group_size)
        return max(1, math.ceil(Fraction(str(self.ratio)) * group_size))

    def replace(self, **changes: Any) -> SuperLoRAConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists) with a ``config_version`` key."""
        out: dict[str, Any] = {"config_version": CONFIG_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SuperLoRAConfig:
        """Inverse of :meth:`to_dict`; unknown keys and other config versions are refused."""
        return cls(**config_fields(cls, data, CONFIG_VERSION))
