"""Weight-shaped Kronecker and Hadamard updates applied to activations without forming ``ΔW``
(docs/math.md §6.2, §6.3).

A target whose group is exactly its own weight (fold ``(o, n)``, no cut, no projection) with
``K`` matrix splits ``X_k ∈ R^{a_k × b_k}`` has

* ``ΔW = s · X_1 ⊗ … ⊗ X_K`` (LoKr, KronA, LoNKr on a square weight): with row-major ``vec``,
  ``ΔW x = s · vec(X ×_1 X_1 ×_2 … ×_K X_K)`` where ``X = x.reshape(b_1, …, b_K)``: each split
  acts on its own mode, at ``O(n Σ_k a_k)`` per token instead of ``O(o n)``;
* ``ΔW = s · X_1 ⊙ X_2`` with ``X_k = L_k R_kᵀ`` of rank ``q_k`` (LoHa): the face-splitting
  identity ``(L_1 R_1ᵀ) ⊙ (L_2 R_2ᵀ) = (L_1 • L_2)(R_1 • R_2)ᵀ`` (``•`` the row-wise Kronecker
  product) makes it a rank-``q_1 q_2`` LoRA, ``s (x Q) Pᵀ``.

Every split is written ``X_k = L_k R_kᵀ`` (dense: ``R_k`` absent; identity core ``U Vᵀ``; CP
``(U diag λ) Vᵀ``; Tucker ``(U C) Vᵀ``), so the product is applied factor by factor and autograd
differentiates plain torch operations: no ``ΔW`` and no ``(o, n)`` weight gradient exists.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tensoradapt import SuperLoRA
from tensoradapt.superlora.plan import param_name

__all__ = ["BypassForm", "apply_bypass", "bypass_form"]

#: Split kinds written as ``L Rᵀ`` (dense splits are their own ``L``).
_FACTORED_KINDS = ("identity", "cp", "tucker")


@dataclass(frozen=True)
class BypassForm:
    """How a target's update is applied to activations: ``unit`` (``"kron"`` or ``"hadamard"``),
    per split its kind, ``(a_k, b_k)`` and ``{block: parameter name}``, and the group scale."""

    unit: str
    splits: tuple[tuple[str, tuple[int, int], tuple[tuple[str, str], ...]], ...]
    scale: float


def bypass_form(plan: SuperLoRA, index: int, shape: tuple[int, int]) -> BypassForm | None:
    """The :class:`BypassForm` of target ``index`` (its ``(o, n)`` update ``shape``), or None when
    its update is not a weight-shaped product of matrix splits (or the bypass would cost more than
    forming ``ΔW``).  The caller checks the module kind (``nn.Linear``, ``Conv1D``, quantised)."""
    cfg = plan.config
    groups = plan.grouping.groups_for([index])
    if len(groups) != 1 or cfg.projection != "none" or cfg.layout != "fold":
        return None
    g = groups[0]
    if tuple(plan.grouping.members[g]) != (index,):
        return None
    group = plan.groups[g]
    if len(group.splits) < 2 or group.shape != tuple(shape) or group.padding or group.n != group.size:
        return None
    if any(len(s.shape) != 2 or s.fixed_modes for s in group.splits):
        return None
    splits = tuple((s.kind, (s.shape[0], s.shape[1]),
                    tuple((block, param_name(g, k, block)) for block in s.parameter_shapes()))
                   for k, s in enumerate(group.splits, start=1))
    if cfg.unit == "hadamard":
        if len(splits) != 2 or any(kind not in _FACTORED_KINDS for kind, _, _ in splits):
            return None
        width = math.prod(_rank(s) for s in group.splits)
        if width * 2 > min(shape):  # a rank-q1·q2 product wider than half the weight: forming ΔW is cheaper
            return None
        return BypassForm("hadamard", splits, float(group.scale))
    return BypassForm("kron", splits, float(group.scale))


def _rank(split: object) -> int:
    return int(split.ranks[-1]) if split.kind == "tucker" else int(split.ranks[0])  # type: ignore[attr-defined]


def _factors(kind: str, blocks: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(L, R)`` with ``X = L Rᵀ`` (``R`` None for a dense split)."""
    if kind == "dense":
        return blocks["dense"], None
    left, right = blocks["factor0"], blocks["factor1"]
    if kind == "cp":
        left = left * blocks["weights"]
    elif kind == "tucker":
        left = left @ blocks["core"]
    return left, right


def _mode_product(x: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    """``x ×_axis matrix``: contract ``x``'s ``axis`` (size ``matrix.shape[1]``) with ``matrix``."""
    # tensordot folds the other axes into one GEMM (a batched matmul over a moved axis does not)
    return torch.movedim(torch.tensordot(x, matrix, dims=([axis], [1])), -1, axis)


def apply_bypass(form: BypassForm, param: Callable[[str], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``x ΔWᵀ`` for ``x`` of shape ``(..., n)`` → ``(..., o)``; ``param(name)`` returns a parameter."""
    dtype = x.dtype if x.is_floating_point() else param(form.splits[0][2][0][1]).dtype
    device = x.device.type
    if torch.is_autocast_enabled(device):  # one compute dtype for every product (autocast's)
        dtype = torch.get_autocast_dtype(device)
    with torch.autocast(device, enabled=False):
        return _apply(form, param, x.to(dtype), dtype)


def _apply(form: BypassForm, param: Callable[[str], torch.Tensor], x: torch.Tensor,
           dtype: torch.dtype) -> torch.Tensor:
    factors = [_factors(kind, {b: param(name).to(dtype) for b, name in blocks}) for kind, _, blocks in form.splits]
    lead = x.shape[:-1]
    if form.unit == "hadamard":
        (l1, r1), (l2, r2) = factors
        assert r1 is not None and r2 is not None
        left = (l1[:, :, None] * l2[:, None, :]).reshape(l1.shape[0], -1)
        right = (r1[:, :, None] * r2[:, None, :]).reshape(r1.shape[0], -1)
        out = (x @ right) @ left.t()
        return out * form.scale if form.scale != 1.0 else out
    k = len(form.splits)
    out = x.reshape(*lead, *(b for _, (_, b), _ in form.splits))
    for axis, (left, right) in enumerate(factors, start=out.dim() - k):
        if right is not None:
            out = _mode_product(out, axis, right.t())
        out = _mode_product(out, axis, left)
    out = out.reshape(*lead, -1)
    return out * form.scale if form.scale != 1.0 else out
