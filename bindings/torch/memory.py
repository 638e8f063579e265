"""Predicted extra memory of one AdamW train step: a SuperLoRA adapter's and PEFT LoRA's on the same
targets (docs/math.md §6.4).

"Extra" is what the adapter adds to the frozen model, its inputs and the activations the base
layers save anyway: the trainable tensors with their gradients and optimiser states, the
activations the adapter saves for its own backward, and the largest working set alive at one
time inside a step.  Shapes only: it works on a model built on the ``meta`` device (a 7B plan
costs nothing), and ``benchmarks/bench_llm_step.py`` measures the same quantity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tensoradapt.ops import Fastfood

__all__ = ["StepMemory", "lora_step_memory", "step_memory"]

#: Tensors per trainable entry in an AdamW step: the parameter, its gradient and two moments.
ADAMW_COPIES = 4


@dataclass(frozen=True)
class StepMemory:
    """Bytes of one train step beyond the frozen model and its own activations.

    ``trainable``: parameters, gradients and AdamW moments; ``saved``: activations the adapter
    keeps for its backward; ``working``: the largest set of temporaries alive at one time (one
    target's ``ΔW`` path, or a projected component's outputs, cotangents and transform).
    """

    trainable: int
    saved: int
    working: int

    @property
    def total(self) -> int:
        return self.trainable + self.saved + self.working

    def __str__(self) -> str:
        return (f"{_gib(self.total)} (trainable + AdamW {_gib(self.trainable)}, saved activations "
                f"{_gib(self.saved)}, largest working set {_gib(self.working)})")


def _gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB"


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _working_set(entries: int, weight_bytes: int, update_bytes: int) -> int:
    """Bytes alive in the backward of one target of ``entries`` that regenerates ``ΔW``
    (docs/math.md §6.4): ``ΔW`` and its ``(o, n)`` gradient in the factors' dtype, ``W + ΔW`` and
    its gradient in the weight's dtype, and the slice VJP's slab cotangent (about one more ``ΔW``)."""
    return entries * (3 * update_bytes + 2 * weight_bytes)


def _transform_entries(plan: Any, g: int) -> int:
    """Entries of group ``g``'s projection work array: Fastfood's ``L = 2^⌈log2 max(n_g, N_g)⌉``
    (docs/math.md §3.8), a Shuffle's ``N_g``; computed from the sizes, no operator built."""
    group = plan.groups[g]
    if plan.config.projection == "fastfood":
        return Fastfood.length_for(group.n, group.size)
    return group.size


def step_memory(plan: Any, paths: Sequence[str], weight_dtypes: Sequence[torch.dtype], param_dtype: torch.dtype,
                components: Sequence[tuple[Sequence[int], Sequence[int]]], *, tokens: int = 0) -> StepMemory:
    """The predicted extra memory of an AdamW step of a SuperLoRA adapter over ``plan`` whose target
    ``i`` runs the path ``paths[i]`` (``"factored"``, ``"bypass"``, ``"sliced"``, ``"projected"`` or ``"materialised"``,
    docs/math.md §6) on a weight of ``weight_dtypes[i]``; ``components`` are the plan's
    ``(targets, groups)``; ``tokens`` (per step) sizes what the activation paths save."""
    param_bytes = _itemsize(param_dtype)
    trainable = ADAMW_COPIES * plan.num_params * param_bytes
    saved = working = 0
    for path, shape, dtype in zip(paths, plan.shapes, weight_dtypes, strict=True):
        o, n = shape[0], math.prod(shape[1:])
        if path == "factored":
            saved += tokens * plan.config.ranks[0] * _itemsize(dtype)
        elif path == "bypass":  # the mode products' intermediates and their permuted copies (an estimate)
            saved += tokens * (o + n) * _itemsize(dtype) * 5 // 4
        elif path == "materialised":  # W + ΔW kept for the backward
            saved += o * n * _itemsize(dtype)
            working = max(working, _working_set(o * n, _itemsize(dtype), param_bytes))
        elif path == "sliced":
            working = max(working, _working_set(o * n, _itemsize(dtype), param_bytes))
    for targets, groups in components:
        if not any(paths[t] == "projected" for t in targets):
            continue
        entries = sum(math.prod(plan.shapes[t]) for t in targets)
        transform = sum(_transform_entries(plan, g) for g in groups)
        largest = max(_working_set(math.prod(plan.shapes[t]), param_bytes, param_bytes) for t in targets)
        working = max(working, (2 * entries + transform) * param_bytes + largest)
    return StepMemory(trainable, saved, working)


def lora_step_memory(shapes: Sequence[Sequence[int]], rank: int, *, tokens: int = 0,
                     param_bytes: int = 4, activation_bytes: int = 4) -> StepMemory:
    """PEFT LoRA's extra memory on targets of ``(o, n)`` ``shapes``: ``r (o + n)`` trainable entries
    per target with AdamW, and the ``tokens × r`` output of ``lora_A`` each target saves (no dropout)."""
    entries = sum(rank * (int(s[0]) + math.prod(int(d) for d in s[1:])) for s in shapes)
    return StepMemory(ADAMW_COPIES * entries * param_bytes, len(shapes) * tokens * rank * activation_bytes, 0)
