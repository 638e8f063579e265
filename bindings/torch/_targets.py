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

from tensoradapt._targets import TargetView, select_targets, target_matcher, target_view

__all__ = ["DIFFUSERS_ATTENTION", "DIFFUSERS_DEFAULT_TARGETS", "DIFFUSERS_RESNET_CONVS", "TargetSpec", "WeightView",
           "diffusers_targets", "is_diffusers_model", "match_targets", "weight_view"]

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

    def weight_to_update(self, grad: torch.Tensor) -> torch.Tensor:
        """The adjoint of :meth:`update_to_weight`: a gradient in the stored weight's layout → the
        gradient of the ``(o, n)`` update (padding row zeroed, Conv1D transposed back, convolutions
        flattened)."""
        if self.padding_idx is not None:
            keep = torch.ones(grad.shape[0], 1, dtype=grad.dtype, device=grad.device)
            keep[self.padding_idx] = 0
            grad = grad * keep
        if self.kind == "conv1d":
            return grad.t()
        return grad.reshape(self.shape)


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


# ---------------------------------------------------------------------------------- diffusers
#: The attention projections of diffusers' attention blocks (``Attention.to_q`` … ``to_out[0]``).
DIFFUSERS_ATTENTION: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
#: The convolutions of diffusers' ResNet blocks (``ResnetBlock2D`` and kin), LoCon's conv targets.
DIFFUSERS_RESNET_CONVS: tuple[str, ...] = ("conv1", "conv2", "conv_shortcut")
#: The module-name suffixes ``attach(model)`` adapts on a diffusers model, by class name (the
#: attention projections, as diffusers' own LoRA training scripts choose); any other diffusers model
#: with ``to_q`` layers gets :data:`DIFFUSERS_ATTENTION` too.
DIFFUSERS_DEFAULT_TARGETS: dict[str, tuple[str, ...]] = dict.fromkeys((
    "UNet2DConditionModel", "UNet2DModel", "UNet3DConditionModel", "UNetSpatioTemporalConditionModel",
    "SD3Transformer2DModel", "FluxTransformer2DModel", "Transformer2DModel", "DiTTransformer2DModel",
    "PixArtTransformer2DModel", "HunyuanDiT2DModel", "SanaTransformer2DModel", "AuraFlowTransformer2DModel",
    "CogVideoXTransformer3DModel", "LTXVideoTransformer3DModel", "WanTransformer3DModel",
), DIFFUSERS_ATTENTION)


def is_diffusers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a diffusers model (a subclass of ``diffusers.ModelMixin``; diffusers is
    not imported)."""
    return any(cls.__name__ == "ModelMixin" and cls.__module__.split(".")[0] == "diffusers"
               for cls in type(model).__mro__)


def diffusers_targets(model: nn.Module, *, attention: bool = True, resnets: bool = False) -> list[str]:
    """The module names of a diffusers model to adapt: its attention projections and, with
    ``resnets=True``, the convolutions of its ResNet blocks (LoCon-style conv targets).

    Parameters
    ----------
    model : nn.Module
        A diffusers model (``UNet2DConditionModel``, ``SD3Transformer2DModel``,
        ``FluxTransformer2DModel``, …) or any module holding one.
    attention : bool
        Include ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` (:data:`DIFFUSERS_ATTENTION`).
    resnets : bool
        Include ``conv1``, ``conv2`` and ``conv_shortcut`` of every ResNet block
        (:data:`DIFFUSERS_RESNET_CONVS`; the blocks whose class name starts with ``Resnet``).

    Returns
    -------
    list of str
        In ``model.named_modules()`` order; pass it as ``targets=`` to :func:`tensoradapt.torch.attach`.

    Raises
    ------
    ValueError
        Nothing was selected, or both kinds were switched off.

    Examples
    --------
    >>> from torch import nn
    >>> class Attention(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.to_q, self.to_k, self.to_v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
    ...         self.to_out = nn.ModuleList([nn.Linear(4, 4), nn.Dropout()])
    >>> diffusers_targets(nn.ModuleDict({"attn": Attention()}))
    ['attn.to_q', 'attn.to_k', 'attn.to_v', 'attn.to_out.0']
    """
    from ._shared import plain_named_modules

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (attention or resnets):
        raise ValueError("attention=False and resnets=False select nothing; switch one on")
    modules = dict(plain_named_modules(model))
    projection = target_matcher(list(DIFFUSERS_ATTENTION))  # the core's suffix rule
    names = []
    for name, module in modules.items():
        parent, _, last = name.rpartition(".")
        if attention and projection(name, module) and isinstance(module, nn.Linear):
            names.append(name)
        elif resnets and last in DIFFUSERS_RESNET_CONVS and isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) \
                and type(modules.get(parent)).__name__.startswith("Resnet"):
            names.append(name)
    if not names:
        kinds = " and ".join(k for k, on in (("attention projections", attention), ("ResNet convolutions", resnets))
                             if on)
        raise ValueError(f"{type(model).__name__} has no diffusers {kinds} "
                         f"({', '.join(DIFFUSERS_ATTENTION + DIFFUSERS_RESNET_CONVS)})")
    return names


def diffusers_default_targets(model: nn.Module) -> list[str] | None:
    """What ``attach(model)`` adapts on a diffusers model (its attention projections,
    :data:`DIFFUSERS_DEFAULT_TARGETS`), None for any other model or one without them."""
    if not is_diffusers_model(model):
        return None
    suffixes = DIFFUSERS_DEFAULT_TARGETS.get(type(model).__name__, DIFFUSERS_ATTENTION)
    from ._shared import plain_named_modules

    found = [name for name, module in select_targets(plain_named_modules(model), list(suffixes))
             if isinstance(module, nn.Linear)]
    return found or None
