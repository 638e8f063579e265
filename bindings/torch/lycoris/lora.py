"""Kohya's LoRA / LoCon both ways: ``lora_down.weight`` (``A``), ``lora_up.weight`` (``B``) in PEFT's
LoRA layout (:func:`tensoradapt.torch.peft.lora.factor_shapes`: a convolution's ``A (r, c,
*kernel)``, ``B (o, r, 1, …)``) and a scalar ``alpha``, ``ΔW = (α/r) B A``; and the one-rank
tensoradapt config of LoRA-like modules (shared with LoHa)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tensoradapt import SuperLoRAConfig, presets
from tensoradapt.superlora.forms import ExactForm

from ..peft import lora as peft_lora
from ..peft.layout import most_common
from ..peft.source import Source, Target
from .entry import Entry, encode_alpha

UP, DOWN = "lora_up.weight", "lora_down.weight"
#: The tensors of a LoRA/LoCon module (besides ``alpha``).
SUFFIXES = (UP, DOWN)


def tensors(target: Target, up: torch.Tensor, down: torch.Tensor, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{suffix: tensor}`` of ``ΔW = (α/r) up down`` (``up (o, r)``, ``down (r, n)``) on ``target``."""
    up, down = peft_lora.shaped(target, up, down)
    return {UP: up, DOWN: down, "alpha": alpha}


def algorithm(target: Target) -> str:
    """``"locon"`` on a convolution, else ``"lora"``."""
    return "locon" if target.layer == "conv" else "lora"


def encode(source: Source, target: Target, form: ExactForm, pairs: Sequence[Any]) -> tuple[str, dict, int]:
    """``(algorithm, tensors, rank)`` of a target that is exactly a LoRA."""
    L, R = pairs[0]
    plain = form.blocks[0].split.kind == "identity"
    return algorithm(target), tensors(target, L, R, encode_alpha(source.plan.config, form, L.shape[1], plain)), \
        L.shape[1]


def check(item: Entry, where: str) -> None:
    """Check the module's ``lora_down`` / ``lora_up`` shapes and set its rank."""
    o, n = item.view.shape
    weight = tuple(item.view.weight_shape)
    conv = len(weight) > 2 and item.view.kind != "linear"
    down, up = item.shapes[DOWN], item.shapes[UP]
    r = item.rank(down[0], where) if down else 0
    b_shape, a_shape = peft_lora.factor_shapes(o, n, r, weight, conv)
    if down != a_shape:
        raise item.mismatch(f"lora_down.weight must be {list(a_shape)}", where)
    if up != b_shape:
        raise item.mismatch(f"lora_up.weight must be {list(b_shape)}", where)
    item.ranks = (r,)


def pairs(item: Entry) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(B (o, r), Aᵀ (n, r))]`` of the module's stored factors."""
    o, n = item.view.shape
    return [(peft_lora.b_matrix(item.values[UP], o), peft_lora.a_matrix(item.values[DOWN], n))]


def config(items: list[Entry]) -> SuperLoRAConfig:
    """LoRA/LoHa: rank ``R = max r_i``; the file's ``alpha`` when every module shares rank and alpha
    (``α/R`` bit for bit), else the most common scale (the others folded into the first factor)."""
    make = presets.lora if items[0].algo == "lora" else presets.loha
    R = max(max(i.ranks) for i in items)
    alphas = {i.alpha() for i in items}
    if len(alphas) == 1 and None not in alphas and all(set(i.ranks) == {R} for i in items):
        return make(R, alphas.pop())
    return make(R).replace(scale=most_common([i.scale() for i in items]))
