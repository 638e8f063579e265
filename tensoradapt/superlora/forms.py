r"""Whether a target's ``ΔW`` is exactly a LoRA, LoHa or LoKr update, and from which blocks.

A SuperLoRA plan generates target ``i``'s update ``ΔW_i`` (its ``(o, n)`` matrix view, ``n`` the
product of the trailing weight sides) from groups, folds and splits (docs/math.md §2).  It is
*exactly* one of the standard structures when one group of its own generates it in its own
``(o, n)`` shape, with nothing projected, cut or padded (``projection="none"``, ``layout="fold"``,
``n_g = N_g = o·n``, fold ``(o, n)``), and its splits are

* **LoRA**: one split, a low-rank matrix ``M = L R`` with ``L (o, q)``, ``R (q, n)`` (identity
  core ``U Vᵀ``, CP ``U diag(λ) Vᵀ`` or Tucker ``U C Vᵀ``): ``ΔW = s · L R``;
* **LoHa** (``fold="matrix"``, ``unit="hadamard"``): two ``(o, n)`` low-rank splits,
  ``ΔW = s · (L₁ R₁) ⊙ (L₂ R₂)``;
* **LoKr** (``fold="matrix"``, ``unit="kron"``): two blocks ``W₁ (a, b)``, ``W₂ (c, e)`` with
  ``a c = o``, ``b e = n``, each dense or low-rank, ``ΔW = s · W₁ ⊗ W₂``; a Tucker second block
  only with equal ranks (its ``L R`` then has the rank the formats store).

``s`` is the group's scale.  :func:`exact_form` makes this decision from the plan's public
attributes (``groups_for``, ``grouping.members``, ``groups``, ``shapes``, ``config``) and returns
an :class:`ExactForm` naming each block's parameters, or a :class:`NotExact` saying why not;
:func:`low_rank_pair` writes a low-rank block as its ``(L, R)`` on any array backend.  Nothing here
imports a framework: the torch bindings' fast low-rank forward and the PEFT / LyCORIS codecs
both read their decision from this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .._backend import device_of, namespace
from .._validate import check_int
from .plan import Plan, SplitPlan, param_name

__all__ = ["Block", "ExactForm", "NotExact", "exact_form", "exact_forms", "low_rank_pair"]

#: The structures :func:`exact_form` recognises.
FORMS = ("lora", "loha", "lokr")


@dataclass(frozen=True)
class Block:
    """One split of an exact form: ``W_k = L R`` (low-rank) or a dense ``W_k``.

    Attributes
    ----------
    number : int
        The split's number ``k`` (from 1) in its group, as in its parameter names.
    split : SplitPlan
        The split itself (kind, shape, ranks, fixed modes).
    rank : int or None
        ``q`` of ``L (d0, q) R (q, d1)`` (:func:`low_rank_pair`); None for a dense block.
    names : dict of str to str
        Each trainable array of the split: local name (``factor0``, ``core``, ``weights``,
        ``dense``) → the plan's parameter name.
    """

    number: int
    split: SplitPlan
    rank: int | None
    names: dict[str, str]

    @property
    def shape(self) -> tuple[int, ...]:
        """``(d0, d1)``, the block's matrix shape."""
        return self.split.shape

    @property
    def dense(self) -> bool:
        """Whether the block is one trainable dense matrix."""
        return self.split.kind == "dense"


@dataclass(frozen=True)
class ExactForm:
    """Target ``index``'s ``ΔW`` is exactly ``kind`` (module docstring) over ``blocks``.

    Attributes
    ----------
    index : int
        The target.
    kind : {"lora", "loha", "lokr"}
    group : int
        The one group generating the target (its own).
    shape : tuple of int
        The target's ``(o, n)`` matrix shape.
    scale : float
        ``s`` of ``ΔW = s · …``.
    blocks : tuple of Block
        One block per split, in split order (LoRA: 1, LoHa and LoKr: 2).
    """

    index: int
    kind: Literal["lora", "loha", "lokr"]
    group: int
    shape: tuple[int, int]
    scale: float
    blocks: tuple[Block, ...]

    @property
    def factored(self) -> tuple[str, str] | None:
        """``(U name, V name)`` when ``ΔW = s U Vᵀ`` with ``U (o, r)`` and ``V (n, r)`` both
        trainable (a LoRA whose split has the identity core and no fixed mode), else None.

        Such a target's layer can compute ``s (x V) Uᵀ`` without forming ``ΔW``.
        """
        block = self.blocks[0]
        if self.kind != "lora" or block.split.kind != "identity" or block.split.fixed_modes:
            return None
        return block.names["factor0"], block.names["factor1"]


@dataclass(frozen=True)
class NotExact:
    """Target ``index``'s ``ΔW`` is none of the exact forms; ``reason`` says why (one clause)."""

    index: int
    reason: str
    kind: None = None


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """A weight shape's ``(o, n)`` view: rows by the product of the trailing sides."""
    return shape[0], math.prod(shape[1:])


def _rank(split: SplitPlan) -> int | None:
    """``q`` of the split's ``L R`` (:func:`low_rank_pair`): the smaller Tucker core side."""
    if split.kind == "dense":
        return None
    return min(split.ranks) if split.kind == "tucker" else split.ranks[0]


def _blocks(group: int, splits: tuple[SplitPlan, ...]) -> tuple[Block, ...]:
    return tuple(Block(k, split, _rank(split), {b: param_name(group, k, b) for b in split.parameter_shapes()})
                 for k, split in enumerate(splits, start=1))


def _own_group(plan: Plan, index: int, shape: tuple[int, int]) -> Any:
    """The group generating target ``index`` alone in its own ``(o, n)``, or the reason (a str)."""
    cfg = plan.config
    if cfg.projection != "none":
        return f"projection={cfg.projection!r} mixes the entries of ΔW"
    if cfg.layout != "fold":
        return f"layout={cfg.layout!r} models several targets as one matrix"
    groups = plan.groups_for([index])
    if len(groups) != 1 or tuple(plan.grouping.members[groups[0]]) != (index,):
        return "its group spans several targets (grouping)"
    group = plan.groups[groups[0]]
    if group.n != group.size or group.padding or group.size != math.prod(shape):
        return f"its fold {group.shape} is not its own (o, n) = {shape}"
    return group


def _kind(plan: Plan, shape: tuple[int, int], group: Any) -> str:
    """``"lora"`` / ``"loha"`` / ``"lokr"`` of a group generating exactly its target's ``o·n``
    entries, else the reason (prefixed ``"not: "``)."""
    cfg, splits = plan.config, group.splits
    if len(splits) == 1 and splits[0].kind in ("identity", "cp", "tucker") and splits[0].shape == shape:
        return "lora"
    if len(splits) == 2 and cfg.fold == "matrix" and cfg.unit == "hadamard":
        return "loha"
    if len(splits) == 2 and cfg.fold == "matrix" and cfg.unit == "kron" and group.shape == shape:
        if splits[1].kind == "tucker" and len(set(splits[1].ranks)) > 1:
            return "not: its second Kronecker block is a Tucker product of unequal ranks"
        return "lokr"
    structure = " x ".join(s.kind + str(list(s.shape)) for s in splits)
    return f"not: its structure ({structure}) is not LoRA, LoKr or LoHa"


def exact_form(plan: Plan, index: int) -> ExactForm | NotExact:
    """Whether target ``index`` of ``plan`` is exactly LoRA, LoHa or LoKr (module docstring).

    Parameters
    ----------
    plan : Plan
        A SuperLoRA plan (a :class:`~tensoradapt.SuperLoRA` is one).
    index : int
        A target of the plan, ``0 <= index < len(plan.shapes)``.

    Returns
    -------
    ExactForm or NotExact
        ``result.kind`` is ``"lora"``, ``"loha"``, ``"lokr"`` or None; a :class:`NotExact` carries
        the reason, e.g. ``"projection='fastfood' mixes the entries of ΔW"``.

    Raises
    ------
    TypeError
        If ``plan`` is not a :class:`Plan` or ``index`` not an integer.
    ValueError
        If ``index`` is not a target of ``plan``.

    Examples
    --------
    >>> from tensoradapt import SuperLoRA, presets
    >>> form = exact_form(SuperLoRA(presets.lora(4), [(16, 8)]), 0)
    >>> form.kind, form.factored, form.blocks[0].rank
    ('lora', ('g0.split1.factor0', 'g0.split1.factor1'), 4)
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a SuperLoRA Plan, got {type(plan).__name__}")
    index = check_int("index", index, minimum=0, maximum=len(plan.shapes) - 1)
    shape = _matrix_shape(plan.shapes[index])
    group = _own_group(plan, index, shape)
    if isinstance(group, str):
        return NotExact(index, group)
    kind = _kind(plan, shape, group)
    if kind.startswith("not: "):
        return NotExact(index, kind.removeprefix("not: "))
    return ExactForm(index, kind, group.index, shape, float(group.scale),  # type: ignore[arg-type]
                     _blocks(group.index, group.splits))


def exact_forms(plan: Plan) -> tuple[ExactForm | NotExact, ...]:
    """:func:`exact_form` of every target of ``plan``, in target order."""
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a SuperLoRA Plan, got {type(plan).__name__}")
    return tuple(exact_form(plan, i) for i in range(len(plan.shapes)))


def low_rank_pair(block: Block, params: Mapping[str, Any]) -> tuple[Any, Any]:
    """``(L (d0, q), R (q, d1))`` with ``L R`` the low-rank block's matrix, on ``params``' backend.

    Identity core: ``(U, Vᵀ)``; CP: ``(U diag(λ), Vᵀ)``; Tucker core ``C (r0, r1)``:
    ``(U, C Vᵀ)`` when ``r0 <= r1``, else ``(U C, Vᵀ)``, so ``q = min(r0, r1)``.  A fixed mode's
    factor is the identity of its side.

    Parameters
    ----------
    block : Block
        A low-rank block of an :class:`ExactForm` (not dense).
    params : mapping of str to array
        The plan's parameters by name (at least the block's :attr:`Block.names`).

    Raises
    ------
    ValueError
        If the block is dense.
    KeyError
        If ``params`` lacks one of the block's arrays.
    """
    if block.dense:
        raise ValueError(f"block {block.number} is dense ({block.shape}): it has no low-rank pair")
    local = {b: params[name] for b, name in block.names.items()}
    ref = next(iter(local.values()))
    xp = namespace(**local)
    split = block.split

    def factor(m: int) -> Any:
        if m in split.fixed_modes:
            return xp.eye(split.shape[m], dtype=ref.dtype, device=device_of(ref))
        return local[f"factor{m}"]

    U, Vt = factor(0), xp.matrix_transpose(factor(1))
    if split.kind == "identity":
        return U, Vt
    if split.kind == "cp":
        return U * local["weights"], Vt
    core = local["core"]
    return (U, core @ Vt) if core.shape[0] <= core.shape[1] else (U @ core, Vt)
