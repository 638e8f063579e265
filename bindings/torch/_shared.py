"""Pieces both adapters (SuperLoRA's and GLoRA's) share: putting wrappers in place of the targets
and taking them out again, switching off, attribute pass-through, and knowing whether a backward
pass is running (activation checkpointing re-runs forwards there)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

ADAPTER_ATTRIBUTE = "tensoradapt"  # where an adapter registers itself on its model


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


class Switchable:
    """Mixin for adapters (``nn.Module`` subclasses with ``_model``, ``target_names``,
    ``_originals``, ``_wrappers``, ``_requires_grad``, ``_freeze_base``, ``_attached`` and
    ``_disabled``): installing and removing the wrappers, and ``disabled()``."""

    _disabled: int

    def _wrap_targets(self, make: Callable[[int, nn.Module], nn.Module]) -> None:
        """Freeze the base (if asked), replace every target by ``make(index, original)`` and
        register the adapter on the model."""
        model = self._model
        if hasattr(model, ADAPTER_ATTRIBUTE):
            raise RuntimeError(
                f"the model already has an attribute {ADAPTER_ATTRIBUTE!r} (an adapter is attached?); detach it first"
            )
        if self._freeze_base:
            self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
            for p in model.parameters():
                p.requires_grad_(False)
        for i, (name, module) in enumerate(zip(self.target_names, self._originals, strict=True)):
            wrapper = make(i, module)
            self._wrappers.append(wrapper)
            replace_module(model, name, wrapper)
        model.add_module(ADAPTER_ATTRIBUTE, self)
        self._attached = True

    def _unwrap_targets(self, modules: Sequence[nn.Module]) -> nn.Module:
        """Put ``modules`` back at the targets (in the train/eval mode the model has there now),
        unregister the adapter and restore the ``requires_grad`` flags; returns the model."""
        model = self._model
        for name, module in zip(self.target_names, modules, strict=True):
            module.train(model.get_submodule(name).training)
            replace_module(model, name, module)
        if getattr(model, ADAPTER_ATTRIBUTE, None) is self:
            delattr(model, ADAPTER_ATTRIBUTE)
        for name, p in model.named_parameters():
            if name in self._requires_grad:
                p.requires_grad_(self._requires_grad[name])
        self._attached = False
        return model

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model only, e.g. ``with adapter.disabled(): ref = model(x)``."""
        self._disabled += 1
        try:
            yield
        finally:
            self._disabled -= 1


class ReadsThrough:
    """Mixin for wrappers holding ``base_layer``: attributes they lack (``weight``, ``bias``,
    ``in_features``…) are read from the wrapped module, for code that inspects its layers."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # type: ignore[misc]  # nn.Module's lookup
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(super().__getattr__("base_layer"), name)  # type: ignore[misc]


def graph_task_id() -> int:
    """Id of the autograd backward pass running now, -1 outside one (the private hook
    ``torch.utils.checkpoint`` itself uses; -1 where a torch build lacks it)."""
    probe = getattr(torch._C, "_current_graph_task_id", None)
    return -1 if probe is None else int(probe())
