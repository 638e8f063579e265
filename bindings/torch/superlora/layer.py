"""The layer SuperLoRA puts in place of each target: the module's own forward with ``W + ΔW``.

A layer takes one of the paths of docs/math.md §6 (:meth:`.adapter.SuperLoRAAdapter.target_path`):
LoRA-shaped targets add ``s (x V) Uᵀ``; weight-shaped Kronecker/Hadamard products apply their
factors to ``x``; every other target generates its ``ΔW`` inside its forward and again inside its
backward (:func:`tensoradapt.torch.target_forward.adapted_forward`).  Several named adapters on one
target add their updates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import ReadsThrough, WeightView, accept_base_keys, base_forward, report_base_keys
from ..target_forward import adapted_forward, add_update

if TYPE_CHECKING:
    from .adapter import SuperLoRAAdapter

__all__ = ["AdaptedLayer", "SuperLoRALayer"]


class SuperLoRALayer(ReadsThrough, nn.Module):
    """A targeted module with its SuperLoRA adapter: ``forward`` runs the module's own forward
    (functionally, with its own settings) with ``W + ΔW``.

    ``base_layer`` is the original module (its parameters untouched).  While the adapter is
    merged or disabled, the base layer runs as is.
    """

    _owner: SuperLoRAAdapter

    def __init__(self, base_layer: nn.Module, index: int, view: WeightView, kind: str,
                 owner: SuperLoRAAdapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.index = index
        self.view = view
        self.kind = kind
        object.__setattr__(self, "_owner", owner)  # not a submodule: the adapter is registered once, on the model
        # every adapter adding its update here: [(adapter, its target index)], the first one is _owner
        object.__setattr__(self, "_contributions", [(owner, index)])
        self.register_state_dict_post_hook(_report_original_weight)
        self.register_state_dict_post_hook(report_base_keys)  # after the one above: plain model keys
        self.register_load_state_dict_pre_hook(accept_base_keys)

    @property
    def contributions(self) -> list[tuple[SuperLoRAAdapter, int]]:
        """``[(adapter, its target index)]`` of every adapter adding its update to this layer."""
        return list(self._contributions)

    def join(self, owner: SuperLoRAAdapter, index: int) -> None:
        """Add ``owner``'s update (its target ``index``) to this layer (a named adapter on a shared target)."""
        self._contributions.append((owner, index))

    def release(self, owner: SuperLoRAAdapter) -> bool:
        """Drop ``owner``'s update; True when other adapters still use this wrapper."""
        rest = [(o, i) for o, i in self._contributions if o is not owner]
        object.__setattr__(self, "_contributions", rest)
        if rest:
            object.__setattr__(self, "_owner", rest[0][0])
            self.index = rest[0][1]
        return bool(rest)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self._contributions) > 1:
            return self._forward_shared(x)
        return self._forward_one(self._owner, self.index, x)

    def _forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """Several adapters on this layer: the active ones' updates add (``W + ΔW_a + ΔW_b``)."""
        active = [(o, i) for o, i in self._contributions if o.active]
        if len(active) <= 1:
            return self.base_layer(x) if not active else self._forward_one(active[0][0], active[0][1], x)
        base = self.base_layer
        factored = [(o, i) for o, i in active if i in o.factored_targets or i in o.bypass_targets]
        dense = [(o, i) for o, i in active if i not in o.factored_targets and i not in o.bypass_targets]
        if self.kind == "quantized":
            out = base(x)
            for o, i in dense:
                delta = o.target_delta(i).to(out.device)
                out = out + F.linear(x.to(delta.dtype), delta).to(out.dtype)
        elif dense:
            weight = base.weight
            total: torch.Tensor | None = None
            for o, i in dense:
                delta = self.view.update_to_weight(o.target_delta(i)).to(weight.device)
                total = delta if total is None else total + delta.to(total.dtype)
            assert total is not None
            out = base_forward(base, self.kind, x, add_update(weight, total), getattr(base, "bias", None))
        else:
            out = base(x)
        for o, i in factored:
            update = o.low_rank_update if i in o.factored_targets else o.bypass_update
            out = out + update(i, x.to(out.device)).to(out.dtype)
        return out

    def _forward_one(self, owner: SuperLoRAAdapter, index: int, x: torch.Tensor) -> torch.Tensor:
        if not owner.active:
            return self.base_layer(x)
        if index in owner.factored_targets:
            out = self.base_layer(x)
            return out + owner.low_rank_update(index, x.to(out.device)).to(out.dtype)
        if index in owner.bypass_targets:
            out = self.base_layer(x)
            return out + owner.bypass_update(index, x.to(out.device)).to(out.dtype)
        base = self.base_layer
        if not (torch.compiler.is_compiling() or owner.keeps_delta):  # ΔW made here, again in the backward
            source, inputs = owner.target_source(index)
            if self.kind == "quantized":  # never touch the quantised weight: base(x) + x ΔWᵀ
                out = base(x)
                return out + adapted_forward(self, source, x.to(out.device), None, None, inputs).to(out.dtype)
            return adapted_forward(self, source, x, base.weight, getattr(base, "bias", None), inputs)
        # a small model-wide ΔW (kept for the backward), or torch.compile (the component's ΔW is one
        # custom operator, no graph break): ΔW generated once per forward and added to W
        if self.kind == "quantized":
            out = base(x)
            delta = owner.target_delta(index).to(out.device)
            return out + F.linear(x.to(delta.dtype), delta).to(out.dtype)
        weight = base.weight
        delta = self.view.update_to_weight(owner.target_delta(index)).to(weight.device)  # no-op on one device
        return base_forward(base, self.kind, x, add_update(weight, delta), getattr(base, "bias", None))

    def extra_repr(self) -> str:
        return f"target={self.index}, kind={self.view.kind}, delta_shape={self.view.shape}"


def _report_original_weight(module: SuperLoRALayer, state: dict[str, Any], prefix: str, local: Any) -> None:
    """While merged, ``state_dict()`` reports the original base weight (never ``W + ΔW``), so a
    state dict loaded back into an adapted model does not count ``ΔW`` twice."""
    merged = [(o, i) for o, i in module.contributions if o.original_weight(i) is not None]
    merged.sort(key=lambda item: item[0].merge_position)
    original = merged[0][0].original_weight(merged[0][1]) if merged else None  # the weight before any merge
    key = f"{prefix}base_layer.weight"
    if original is not None and key in state:
        state[key] = original.detach()


AdaptedLayer = SuperLoRALayer  # the 0.x name
