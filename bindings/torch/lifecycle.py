"""The lifecycle both adapters (SuperLoRA's and GLoRA's) share.

:class:`BaseAdapter` gives :class:`tensoradapt.torch.SuperLoRAAdapter` and
:class:`tensoradapt.torch.GLoRAAdapter` one public API and one behaviour: installing wrappers in
place of the targets (in the model's train/eval mode) and taking them out again bit for bit,
``disabled()``, ``modules_to_save`` (modules trained in full, as copies), merging in order,
reporting, and a ``state_dict`` that never double-counts a merged ``ΔW``.  Its files are
:class:`~.files.adapter.AdapterFiles`' (no file code here).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .container import AdapterContainer, check_adapter_name, container_of, install_save_hook, remove_save_hook
from .distributed import refuse_if_sharded
from .files.adapter import AdapterFiles
from .files.layout import MODULES_TO_SAVE_PREFIX
from .modules import ADAPTER_ATTRIBUTE, replace_module

__all__ = ["BaseAdapter"]


class BaseAdapter(AdapterFiles, nn.Module):
    """What SuperLoRA and GLoRA adapters share (one public API).

    Subclasses set up ``target_names``, ``_originals`` and ``views`` and implement
    ``_make_wrapper``, ``_adapter_tensors`` (``{file name: tensor}``), ``_apply_merge``,
    ``_apply_unmerge``, ``_plain_modules`` (the modules ``merge_and_detach`` leaves), ``metadata``
    and ``num_params``.  Files (``save``, ``save_pretrained``, …) come from
    :class:`~.files.adapter.AdapterFiles`.
    """

    method = "?"
    #: Whether :meth:`merge` writes the update into the base weights (SuperLoRA) rather than keeping
    #: the merged layer apart (GLoRA); :meth:`disabled` then unmerges for its block.
    merge_writes_base = False

    def _setup_lifecycle(self, model: nn.Module, found: list[tuple[str, nn.Module]], freeze_base: bool) -> None:
        object.__setattr__(self, "_model", model)  # not a submodule: the adapter is the model's child
        self.target_names = tuple(name for name, _ in found)
        self._originals = [module for _, module in found]
        self._wrappers: list[nn.Module] = []
        self._requires_grad: dict[str, bool] = {}
        self._freeze_base = freeze_base
        self._attached = False
        self._merged = False
        self._disabled = 0
        self.saved_modules = nn.ModuleDict()  # the trainable copies of modules_to_save (keys: name with __)
        self.modules_to_save: tuple[str, ...] = ()
        self._saved_originals: list[nn.Module] = []
        self._hooks: list[Any] = []
        self._selected = True  # chosen by the container's set_active
        self.adapter_name = "default"

    def _apply_merge(self) -> None:
        raise NotImplementedError

    def _apply_unmerge(self) -> None:
        raise NotImplementedError

    @property
    def merge_position(self) -> int:
        """This adapter's place in the order of merges on its model (0: merged first); -1 when not merged."""
        container = container_of(self._model)
        order = container.merge_order if container is not None else []
        return order.index(self) if self in order else -1

    def _can_share(self, wrapper: nn.Module) -> bool:
        """Whether this adapter can add its update to ``wrapper`` (another adapter's, same target)."""
        return False

    # ------------------------------------------------------------------ install / uninstall
    def install(self, modules_to_save: Sequence[str] = (),
                saved_values: dict[str, dict[str, torch.Tensor]] | None = None, *, name: str = "default") -> None:
        """Freeze the base (if asked), copy the ``modules_to_save``, replace every target by its
        wrapper (in the target's train/eval mode) and register the adapter on the model."""
        model = self._model
        adapter_name = name = check_adapter_name(name)
        container = container_of(model)
        if container is None and hasattr(model, ADAPTER_ATTRIBUTE):
            raise RuntimeError(f"the model already has an attribute {ADAPTER_ATTRIBUTE!r} that is not tensoradapt's")
        others = container.adapters() if container is not None else []
        for target, module in zip(self.target_names, self._originals, strict=True):
            current = model.get_submodule(target)
            for other in others:
                for saved in other.modules_to_save:
                    if saved == target or target.startswith(saved + "."):
                        raise ValueError(f"target {target!r} is in modules_to_save of adapter "
                                         f"{other.adapter_name!r}; do not target it")
            if current is not module:
                owners = [o.adapter_name for o in others if current in o._wrappers]
                if getattr(current, "base_layer", None) is not module or not self._can_share(current):
                    raise RuntimeError(
                        f"module {target!r} belongs to an attached adapter {owners[0] if owners else '?'!r} "
                        f"({type(current).__name__}) and a {type(self).__name__} cannot share a layer with it: "
                        "SuperLoRA adapters add on a shared layer, GLoRA shares no layer (GLoRA's W0⊙A "
                        "would not be defined on another adapter's W0 + ΔW); target other layers"
                    )
        if container is not None and name in container:
            raise RuntimeError(
                f"the model already has an attribute {ADAPTER_ATTRIBUTE!r} holding an adapter named {name!r}; "
                "attach under another name= or detach it first"
            )
        copies = []
        for name in modules_to_save:  # copies first: nothing is installed if one fails
            original = model.get_submodule(name)
            duplicate = copy.deepcopy(original)
            if saved_values is not None:  # the file's parameters and buffers (its state_dict), checked by load
                duplicate.load_state_dict(saved_values[name], strict=True)
            copies.append((name, original, duplicate))
        if container is None:
            container = AdapterContainer()
        if self._freeze_base:
            mine = {id(p) for p in container.parameters()}
            for pname, p in model.named_parameters():
                if id(p) not in mine and not pname.startswith(ADAPTER_ATTRIBUTE + "."):
                    plain = pname.replace(".base_layer.", ".")
                    container.requires_grad_flags.setdefault(plain, p.requires_grad)
                    p.requires_grad_(False)
        for name_, original, duplicate in copies:
            for p in duplicate.parameters():
                p.requires_grad_(True)
            duplicate.train(original.training)
            self.saved_modules[name_.replace(".", "__")] = duplicate
            self._saved_originals.append(original)
            replace_module(model, name_, duplicate)
        self.modules_to_save = tuple(n for n, _, _ in copies)
        for i, (target, module) in enumerate(zip(self.target_names, self._originals, strict=True)):
            current = model.get_submodule(target)
            if current is not module:  # another adapter's wrapper: add this one's update to it
                current.join(self, i)
                self._wrappers.append(current)
                continue
            wrapper = self._make_wrapper(i, module)
            wrapper.train(module.training)
            self._wrappers.append(wrapper)
            replace_module(model, target, wrapper)
        self.adapter_name = adapter_name
        container.add_module(adapter_name, self)
        if container_of(model) is None:
            model.add_module(ADAPTER_ATTRIBUTE, container)
            container.train(model.training)
            install_save_hook(model)
        self.train(model.training)
        self._attached = True

    def _uninstall(self, modules: Sequence[nn.Module]) -> nn.Module:
        """Put ``modules`` back at the targets and the original ``modules_to_save`` back (in the mode
        the model has there now), unregister the adapter and restore the ``requires_grad`` flags."""
        model = self._model
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for name, module, wrapper in zip(self.target_names, modules, self._wrappers, strict=True):
            release = getattr(wrapper, "release", None)
            if release is not None and release(self):
                continue  # other adapters still use this wrapper (and its base layer)
            module.train(model.get_submodule(name).training)
            replace_module(model, name, module)
        for name, original in zip(self.modules_to_save, self._saved_originals, strict=True):
            original.train(model.get_submodule(name).training)
            replace_module(model, name, original)
        container = container_of(model)
        if container is not None and self.adapter_name in container and container[self.adapter_name] is self:
            container.remove(self.adapter_name)
            if not container.names:  # the last adapter: the model as before
                delattr(model, ADAPTER_ATTRIBUTE)
                remove_save_hook(model)
                for name, p in model.named_parameters():
                    if name in container.requires_grad_flags:
                        p.requires_grad_(container.requires_grad_flags[name])
        self._wrappers = []
        self._attached = False
        self._merged = False
        return model

    def _check_attached(self) -> None:
        if not self._attached:
            raise RuntimeError(f"this {type(self).__name__} was detached from its model")

    # ------------------------------------------------------------------ state
    @property
    def active(self) -> bool:
        """Whether the adapted layers add their update (attached, not merged, not disabled, selected
        by ``model.tensoradapt.set_active``)."""
        return self._attached and not self._merged and self._disabled == 0 and self._selected

    @property
    def model(self) -> nn.Module:
        """The model this adapter was attached to (after ``detach()``, the model it was detached from)."""
        return self._model

    @property
    def merged_into_model(self) -> bool:
        """Whether :meth:`merge_and_detach` left ``ΔW`` in the model's weights (the model no longer
        is the base this adapter's update applies to)."""
        return getattr(self, "_merged_into_model", False)

    @property
    def merged(self) -> bool:
        """Whether :meth:`merge` is in effect."""
        return self._merged

    @property
    def attached(self) -> bool:
        """Whether the adapter is on its model (not detached)."""
        return self._attached

    @property
    def wrappers(self) -> tuple[nn.Module, ...]:
        """The layers installed at the targets, in target order (a layer shared with another adapter
        is that adapter's wrapper); empty once detached."""
        return tuple(self._wrappers)

    @property
    def is_disabled(self) -> bool:
        """Whether a :meth:`disabled` block is running."""
        return self._disabled > 0

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model only, e.g. ``with adapter.disabled(): ref = model(x)`` (the
        ``modules_to_save`` copies stay in place).  A merged adapter whose merge wrote into the
        base weights (SuperLoRA) is unmerged for the block and merged again after it, bit for bit."""
        self._disabled += 1
        remerge = self._disabled == 1 and self._merged and self.merge_writes_base
        try:
            if remerge:
                self.unmerge()
            yield
        finally:
            self._disabled -= 1
            if remerge:
                self.merge()

    # ------------------------------------------------------------------ parameters and reporting
    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of every trainable tensor: the adapter's (as named in its file)
        then the ``modules_to_save`` copies' (``modules_to_save.<module>.<param>``)."""
        yield from self._adapter_parameters()
        for key, module in self.saved_modules.items():
            for pname, p in module.named_parameters():
                yield f"{MODULES_TO_SAVE_PREFIX}{key.replace('__', '.')}.{pname}", p

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapter's trainable tensors (give these to the optimiser), modules_to_save included."""
        return [p for _, p in self.named_trainable_parameters()]

    def _trainable_line(self) -> str:
        model = self._model
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"

    def print_trainable_parameters(self) -> None:
        """Print the first line of :meth:`summary` (PEFT's format)."""
        print(self.summary().splitlines()[0])

    # ------------------------------------------------------------------ merge / detach
    def merge(self) -> None:
        """Add the update into the targets (inference without overhead); :meth:`unmerge` undoes it
        bit for bit.  Refuses (``RuntimeError``) a second merge and (``FloatingPointError``) a
        result that is not finite in the weight's own dtype; then nothing is written."""
        self._check_attached()
        if self._merged:
            raise RuntimeError("the adapter is already merged; call unmerge() first")
        refuse_if_sharded(self._model, "merge()")
        self._apply_merge()
        self._merged = True
        container = container_of(self._model)
        if container is not None:
            container.merge_order.append(self)

    def unmerge(self) -> None:
        """Undo :meth:`merge` (the original weights come back bit for bit)."""
        self._check_attached()
        if not self._merged:
            raise RuntimeError("the adapter is not merged")
        refuse_if_sharded(self._model, "unmerge()")
        container = container_of(self._model)
        order = container.merge_order if container is not None else []
        later = order[order.index(self) + 1:] if self in order else []
        for other in reversed(later):  # adapters merged after this one: undo them first (bit for bit)
            other._apply_unmerge()
        self._apply_unmerge()
        for other in later:  # and merge them again on the restored weights
            other._apply_merge()
        if self in order:
            order.remove(self)
        self._merged = False

    def detach(self) -> nn.Module:
        """Remove the adapter: the original modules (and the original ``modules_to_save``) go back
        in place with their original weights, ``requires_grad`` flags restored; returns the model.
        ``state_dict()`` then equals the one before attach bit for bit."""
        self._check_attached()
        refuse_if_sharded(self._model, "detach()")
        if self._merged:
            self.unmerge()
        return self._uninstall(self._originals)

    def merge_and_detach(self) -> nn.Module:
        """Merge and remove the adapter: a plain model with updated weights (the trained
        ``modules_to_save`` copies stay in it)."""
        self._check_attached()
        refuse_if_sharded(self._model, "merge_and_detach()")
        if not self._merged:
            self.merge()
        modules = self._plain_modules()
        kept = list(self.saved_modules.values())
        self._saved_originals = kept  # the trained copies stay
        self._merged_into_model = True
        return self._uninstall(modules)
