"""Which modules of a model an adapter targets, and how each one's weight maps to a matrix.

Targets are chosen the way PEFT users expect: a list of module-name suffixes, one regular
expression (matched against the whole module name), or a callable ``(name, module) -> bool``.
Matches come in ``model.named_modules()`` order, which is the order of the SuperLoRA target list
(spec Part I §1).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["TargetSpec", "WeightView", "match_targets", "weight_view"]

TargetSpec = str | Sequence[str] | Callable[[str, nn.Module], bool]


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W`` stored ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


@dataclass(frozen=True)
class WeightView:
    """How a target's stored weight relates to the ``(o, n)`` matrix the adapter generates.

    Attributes
    ----------
    kind : {"linear", "conv1d", "weight"}
        ``"linear"``: ``nn.Linear`` (weight ``(o, n)``); ``"conv1d"``: transformers' ``Conv1D``
        (weight stored transposed, ``(n, o)``); ``"weight"``: any other module with an ``(o, …)``
        weight (convolutions: ``(o, i/groups, k…)``), adapted as the ``(o, ∏ rest)`` matrix.
    shape : tuple of int
        The ``(o, n)`` matrix shape ``ΔW`` has.
    weight_shape : tuple of int
        The stored weight's shape.
    """

    kind: str
    shape: tuple[int, int]
    weight_shape: tuple[int, ...]

    def to_weight(self, delta: torch.Tensor) -> torch.Tensor:
        """``ΔW`` ``(o, n)`` → the stored weight's layout (transposed for Conv1D, reshaped for convs)."""
        if self.kind == "conv1d":
            return delta.t()
        if self.kind == "weight" and len(self.weight_shape) != 2:
            return delta.reshape(self.weight_shape)
        return delta


def weight_view(name: str, module: nn.Module) -> WeightView:
    """The :class:`WeightView` of a targeted module; ``TypeError`` when it has no usable weight."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"target {name!r} ({type(module).__name__}) has no `weight` tensor; targets must be nn.Linear, "
            "transformers' Conv1D or a module with a 2-D or convolution weight"
        )
    shape = tuple(int(d) for d in weight.shape)
    if _is_conv1d(module):
        if len(shape) != 2:
            raise TypeError(f"target {name!r}: a Conv1D weight must be 2-D, got shape {shape}")
        return WeightView("conv1d", (shape[1], shape[0]), shape)
    if isinstance(module, nn.Linear):
        return WeightView("linear", (shape[0], shape[1]), shape)
    if len(shape) < 2:
        raise TypeError(
            f"target {name!r} ({type(module).__name__}) has a {len(shape)}-D weight of shape {shape}; "
            "only 2-D and convolution (o, i, k…) weights can be adapted"
        )
    return WeightView("weight", (shape[0], math.prod(shape[1:])), shape)


def _matcher(targets: TargetSpec) -> Callable[[str, nn.Module], bool]:
    if callable(targets):
        return targets
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as error:
            raise ValueError(f"targets={targets!r} is not a valid regular expression: {error}") from None
        return lambda name, module: pattern.fullmatch(name) is not None
    if isinstance(targets, Sequence) and targets and all(isinstance(t, str) and t for t in targets):
        suffixes = tuple(targets)
        return lambda name, module: any(name == s or name.endswith("." + s) for s in suffixes)
    raise TypeError(
        "targets must be a non-empty list of module-name suffixes, a regular expression string, or a "
        f"callable (name, module) -> bool; got {targets!r:.80}"
    )


def match_targets(model: nn.Module, targets: TargetSpec) -> list[tuple[str, nn.Module]]:
    """The modules of ``model`` that ``targets`` selects, in ``model.named_modules()`` order.

    Parameters
    ----------
    model : nn.Module
    targets : list of str, str or callable
        Module-name suffixes (``["q_proj", "v_proj"]`` matches ``layers.0.attn.q_proj``; a
        suffix matches whole name components only), a regular expression that must match the
        whole name (``r".*\\.(query|value)"``), or ``callable(name, module) -> bool``.

    Returns
    -------
    list of (name, module)

    Raises
    ------
    ValueError
        Nothing matched (the message lists a few module names to help fix the pattern).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    keep = _matcher(targets)
    found = [(name, module) for name, module in model.named_modules() if name and keep(name, module)]
    if not found:
        names = [name for name, _ in model.named_modules() if name]
        raise ValueError(
            f"targets={targets!r:.80} matched no module of {type(model).__name__}; "
            f"module names look like {names[:6]}"
        )
    return found
