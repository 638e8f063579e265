"""``SuperLoRAConfig``: every hyper-parameter of a SuperLoRA adapter, validated, JSON round-trip."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from .._validate import config_fields

__all__ = ["CORES", "FOLDS", "LAYOUTS", "PROJECTIONS", "SuperLoRAConfig"]

CORES = ("tucker", "cp", "identity", "dense")
PROJECTIONS = ("none", "shuffle", "fastfood")
LAYOUTS = ("fold", "stack")
FOLDS = ("cubic", "matrix", "layers")
UNITS = ("kron", "hadamard")
SHUFFLE_SCOPES = ("group", "global")
FASTFOOD_ORDERS = ("li", "paper")
CONFIG_VERSION = 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SuperLoRAConfig:
    r"""Hyper-parameters of a SuperLoRA adapter (spec Part I and Part II §2).

    For every group ``g`` of ``ΔW_all`` (see ``grouping``)::

        ΔW_group_g = F_g( Cut_{n_g}( X_{g,1} ⊗ … ⊗ X_{g,K} ) ),   X_{g,k} = C_{gk} ×_1 A_{gk1} … ×_M A_{gkM}
        ΔW_i = s · (the entries of target i),   n_g = max(1, ⌈ρ·N_g⌉)

    Parameters
    ----------
    rank : int or tuple of int
        Tucker/CP rank ``r`` (one per mode as a tuple of length ``order``).
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
        group of ``S`` equal-shape weights (LoTR); or an explicit shape with ``Π ≥ n_g``.
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
        Projection ratio ``ρ ∈ (0, 1]``; identity and shuffle need ``ρ = 1``.
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
        # normalise lists (e.g. from JSON) to tuples so the config stays hashable
        for name in ("rank", "fold"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.grouping, list):
            object.__setattr__(self, "grouping", tuple(tuple(g) for g in self.grouping))
        object.__setattr__(self, "fixed_identity_modes", tuple(self.fixed_identity_modes))
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        def bad(rule: str) -> None:
            raise ValueError(rule)

        for name in ("order", "splits"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                bad(f"{name} must be an integer >= 1, got {value!r}")
        for name, allowed in (("core", CORES), ("projection", PROJECTIONS), ("layout", LAYOUTS),
                              ("unit", UNITS), ("shuffle_scope", SHUFFLE_SCOPES),
                              ("fastfood_order", FASTFOOD_ORDERS)):
            if getattr(self, name) not in allowed:
                bad(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        ranks = self.ranks
        if any(not _is_int(r) or r < 1 for r in ranks):
            bad(f"rank must be a positive integer or a tuple of them, got {self.rank!r}")
        if isinstance(self.rank, tuple) and len(self.rank) != self.order:
            bad(f"rank {self.rank!r} has {len(self.rank)} entries but order is {self.order} "
                "(give one rank per mode)")
        if self.core in ("identity", "cp") and len(set(ranks)) > 1:
            bad(f"core={self.core!r} needs equal ranks in every mode (a diagonal core), got {self.rank!r}")
        if self.dense_side is not None:
            if not _is_int(self.dense_side) or (self.dense_side < 1 and self.dense_side != -1):
                bad(f"dense_side must be a positive integer (or -1 with fold='matrix'), got {self.dense_side!r}")
            if self.splits < 2:
                bad(f"dense_side={self.dense_side} needs splits >= 2 (the dense factor is split 1 of "
                    f"a Kronecker product), got splits={self.splits}")
            if self.dense_side == -1 and self.fold != "matrix":
                bad("dense_side=-1 (no factorisation limit) only applies with fold='matrix'")
        if isinstance(self.fold, tuple):
            if not self.fold or any(not _is_int(d) or d < 1 for d in self.fold):
                bad(f"fold must be one of {FOLDS} or a tuple of positive ints, got {self.fold!r}")
            if len(self.fold) != self.order:
                bad(f"fold shape {self.fold!r} has {len(self.fold)} modes but order is {self.order}")
        elif self.fold not in FOLDS:
            bad(f"fold must be one of {FOLDS} or a tuple of positive ints, got {self.fold!r}")
        if self.fold == "matrix" and self.order != 2:
            bad(f"fold='matrix' generates each weight's (o, n) matrix, so order must be 2, got {self.order}")
        if self.fold == "layers" and self.order != 3:
            bad(f"fold='layers' generates an (S, o, n) tensor, so order must be 3, got {self.order}")
        if self.fold in ("matrix", "layers") and self.splits > 2:
            bad(f"fold={self.fold!r} supports at most 2 Kronecker splits (the LyCORIS factorisation), "
                f"got splits={self.splits}")
        if self.fold == "layers" and self.splits != 1:
            bad("fold='layers' (LoTR) needs splits=1")
        if self.layout == "stack":
            if self.order != 2 or self.splits != 1:
                bad(f"layout='stack' models each group as one (o, Σn) matrix: it needs order=2 and "
                    f"splits=1, got order={self.order}, splits={self.splits}")
            if self.projection != "none":
                bad(f"layout='stack' generates the group's exact shape, so projection must be 'none', "
                    f"got {self.projection!r}")
            if self.fold != "cubic":
                bad("layout='stack' ignores fold; leave fold='cubic'")
        if not isinstance(self.ratio, (int, float)) or isinstance(self.ratio, bool) or not math.isfinite(self.ratio):
            bad(f"ratio must be a finite number in (0, 1], got {self.ratio!r}")
        if not 0 < self.ratio <= 1:
            bad(f"ratio (rho) must be in (0, 1], got {self.ratio!r} (a projection never shrinks ΔW)")
        if self.projection in ("none", "shuffle") and self.ratio != 1:
            bad(f"projection={self.projection!r} needs ratio=1 (only fastfood changes the size), "
                f"got {self.ratio!r}")
        if self.ratio != 1 and (self.fold in ("matrix", "layers")):
            bad(f"fold={self.fold!r} fixes the generated size to the weights' own, so ratio must be 1, "
                f"got {self.ratio!r}")
        if self.shuffle_scope == "global" and self.projection != "shuffle":
            bad(f"shuffle_scope='global' needs projection='shuffle', got {self.projection!r}")
        if self.unit == "hadamard" and (self.splits != 2 or self.fold != "matrix" or self.core != "identity"):
            bad("unit='hadamard' (LoHa) needs splits=2, fold='matrix' and core='identity'")
        if self.decompose_both and (self.fold != "matrix" or self.splits != 2 or self.unit != "kron"):
            bad("decompose_both needs fold='matrix', splits=2 and unit='kron' (LyCORIS LoKr)")
        if self.fixed_identity_modes:
            if self.core != "tucker":
                bad(f"fixed_identity_modes needs core='tucker', got core={self.core!r}")
            if any(not _is_int(m) or not 0 <= m < self.order for m in self.fixed_identity_modes):
                bad(f"fixed_identity_modes must be modes in [0, {self.order}), got {self.fixed_identity_modes!r}")
            if len(set(self.fixed_identity_modes)) == self.order:
                bad("fixed_identity_modes cannot fix every mode (nothing but the core would train)")
        if self.core == "dense" and self.fixed_identity_modes:
            bad("core='dense' has no factors to fix")
        if not _is_int(self.seed) or self.seed < 0:
            bad(f"seed must be a non-negative integer, got {self.seed!r}")
        for name in ("scale", "alpha"):
            value = getattr(self, name)
            if value is None and name == "alpha":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                bad(f"{name} must be a finite number, got {value!r}")
        self._validate_grouping()

    def _validate_grouping(self) -> None:
        g = self.grouping
        if isinstance(g, str):
            if g not in ("weight", "layer"):
                raise ValueError(f"grouping must be 'weight', 'layer', an integer G or membership lists, got {g!r}")
        elif _is_int(g):
            if g < 1:
                raise ValueError(f"grouping (G) must be >= 1, got {g}")
        elif isinstance(g, tuple):
            if not g or any(not isinstance(m, tuple) or not m or any(not _is_int(i) or i < 0 for i in m)
                            for m in g):
                raise ValueError(f"grouping lists must be non-empty lists of target indices, got {g!r}")
        else:
            raise ValueError(f"grouping must be 'weight', 'layer', an integer G or membership lists, got {g!r}")

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
