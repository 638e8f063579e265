"""Which modules of a model an adapter targets, and how each one's weight maps to a matrix.

Targets are chosen the way PEFT users expect: a list of module-name suffixes, one regular
expression (matched against the whole module name), or a callable ``(name, module) -> bool``.
Matches come in ``model.named_modules()`` order, which is the order of the SuperLoRA target list
(docs/math.md D1).  The selection rule and the module → ``(kind, (o, n), stored shape)`` rule live
in the core (:mod:`tensoradapt._targets`), shared with
:func:`tensoradapt.analysis.shapes_from_model`; this module adds the torch-side checks and
:meth:`WeightView.to_weight`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tensoradapt._targets import TargetView, select_targets, target_view

__all__ = ["TargetSpec", "WeightView", "match_targets", "weight_view"]

TargetSpec = str | Sequence[str] | Callable[[str, nn.Module], bool]


@dataclass(frozen=True)
class WeightView(TargetView):
    """A :class:`tensoradapt._targets.TargetView` (``kind``, ``(o, n)`` ``shape``,
    ``weight_shape``) that maps ``ΔW`` back to the stored layout.  ``padding_idx``: an embedding's
    padding row, which PyTorch keeps fixed and an update therefore never changes."""

    padding_idx: int | None = None

    def to_weight(self, delta: torch.Tensor) -> torch.Tensor:
        """``ΔW`` ``(o, n)`` → the stored weight's layout (transposed for Conv1D, reshaped for convs)."""
        if self.kind == "conv1d":
            return delta.t()
        if self.kind == "weight" and len(self.weight_shape) != 2:
            return delta.reshape(self.weight_shape)
        return delta

    def update_to_weight(self, delta: torch.Tensor) -> torch.Tensor:
        """An update ``ΔW`` in the stored layout (:meth:`to_weight`), with an embedding's padding row
        zeroed (out of place, so gradients flow to every other row)."""
        update = self.to_weight(delta)
        if self.padding_idx is None:
            return update
        keep = torch.ones(update.shape[0], 1, dtype=update.dtype, device=update.device)
        keep[self.padding_idx] = 0
        return update * keep


def _is_tensor(value: object) -> bool:
    return isinstance(value, torch.Tensor)


def weight_view(name: str, module: nn.Module) -> WeightView:
    """The :class:`WeightView` of a targeted module; ``TypeError`` when it has no usable weight."""
    from ._shared import is_quantized

    if is_quantized(module):  # the stored weight is packed: the layer's own sizes give (o, n)
        shape = (int(module.out_features), int(module.in_features))
        return WeightView("linear", shape, shape)
    view = target_view(name, module, is_array=_is_tensor)
    padding = getattr(module, "padding_idx", None) if isinstance(module, nn.Embedding) else None
    return WeightView(view.kind, view.shape, view.weight_shape, None if padding is None else int(padding))


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
    found = select_targets(model.named_modules(), targets)
    if not found:
        names = [name for name, _ in model.named_modules() if name]
        raise ValueError(
            f"targets={targets!r:.80} matched no module of {type(model).__name__}; "
            f"module names look like {names[:6]}"
        )
    return found
