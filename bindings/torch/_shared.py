"""The lifecycle both adapters (SuperLoRA's and GLoRA's) share.

:class:`BaseAdapter` gives :class:`tensoradapt.torch.SuperLoRAAdapter` and
:class:`tensoradapt.torch.GLoRAAdapter` one public API and one behaviour: installing wrappers in
place of the targets (in the model's train/eval mode) and taking them out again bit for bit,
``disabled()``, ``modules_to_save`` (modules trained in full, as copies), reporting, files, and a
``state_dict`` that never double-counts a merged ``ΔW``.  Also here: the refusals made at attach
(unsupported module kinds, tied or aliased weights) and :func:`base_forward`, the explicit
functional form of every supported module kind with the module's own settings (no forward swaps or
mutates a module's parameters, so concurrent forwards are safe).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tensoradapt._targets import is_conv1d, select_targets

ADAPTER_ATTRIBUTE = "tensoradapt"  # where an adapter registers itself on its model
ADAPTER_FILE = "adapter_model.safetensors"  # the file save_pretrained writes in its folder
MODULES_TO_SAVE_PREFIX = "modules_to_save."  # tensor-name prefix of saved modules in an adapter file

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# ---------------------------------------------------------------------------------- module kinds
def is_quantized(module: nn.Module) -> bool:
    """A quantised linear layer: bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, or an ``nn.Linear``
    whose weight is a tensor subclass (torchao's int8 weight-only quantisation)."""
    kind = type(module)
    if kind.__module__.split(".")[0] == "bitsandbytes" and kind.__name__ in ("Linear4bit", "Linear8bitLt"):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and isinstance(weight, torch.Tensor) \
        and type(weight.data) not in (torch.Tensor, nn.Parameter)


def forward_kind(name: str, module: nn.Module) -> str:
    """How a target's forward is computed functionally: ``"linear"``, ``"conv1d"`` (transformers'
    Conv1D), ``"conv"`` (``nn.Conv1d/2d/3d``), ``"embedding"`` or ``"quantized"`` (a quantised
    linear layer, run as ``base(x) + x ΔWᵀ``); ``TypeError`` for anything else (a module whose
    forward the adapter cannot reproduce with another weight)."""
    kind = type(module)
    if is_quantized(module):
        return "quantized"
    if is_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Linear) and kind.forward is nn.Linear.forward:
        return "linear"
    for conv in _CONVS:
        if isinstance(module, conv) and kind.forward is conv.forward:
            return "conv"
    if isinstance(module, nn.Embedding) and kind.forward is nn.Embedding.forward:
        if module.max_norm is not None:
            raise TypeError(f"target {name!r} is an nn.Embedding with max_norm={module.max_norm}: its forward "
                            "renormalises the weight in place, which an adapter cannot do safely; target "
                            "other layers or set max_norm=None")
        return "embedding"
    raise TypeError(
        f"target {name!r} is a {kind.__name__}; adapters support nn.Linear, transformers' Conv1D, "
        "nn.Conv1d/2d/3d and nn.Embedding (modules whose forward can be run with another weight)"
    )


def _conv_padding(module: nn.Module) -> tuple[list[int], Any]:
    """``(F.pad amounts, the padding F.convNd gets)`` for a convolution whose padding_mode is not
    'zeros' (the rule of torch's own ``_ConvNd``)."""
    kernel, dilation = module.kernel_size, module.dilation
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return [0, 0] * len(kernel), 0
        amounts: list[int] = []
        for d, k in zip(reversed(dilation), reversed(kernel), strict=True):
            total = d * (k - 1)
            amounts += [total // 2, total - total // 2]
        return amounts, 0
    amounts = []
    for p in reversed(module.padding):
        amounts += [p, p]
    return amounts, 0


def base_forward(module: nn.Module, kind: str, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """``module``'s forward on ``x`` with ``weight`` (in the stored layout) and ``bias`` in place of
    its own, with the module's own settings; the module itself is never touched."""
    if kind == "linear":
        return F.linear(x, weight, bias)
    if kind == "conv1d":  # transformers' Conv1D: y = x W + b, W stored (in, out)
        flat = x.reshape(-1, x.shape[-1])
        out = flat @ weight if bias is None else torch.addmm(bias, flat, weight)
        return out.reshape(*x.shape[:-1], weight.shape[1])
    if kind == "conv":
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(module.kernel_size)]
        padding: Any = module.padding
        if module.padding_mode != "zeros":
            amounts, padding = _conv_padding(module)
            x = F.pad(x, amounts, mode=module.padding_mode)
        return conv(x, weight, bias, module.stride, padding, module.dilation, module.groups)
    if kind == "embedding":
        return F.embedding(x, weight, module.padding_idx, None, module.norm_type, module.scale_grad_by_freq,
                           module.sparse)
    raise TypeError(f"unknown module kind {kind!r}")  # pragma: no cover - forward_kind refuses first


# ---------------------------------------------------------------------------------- refusals
def _storage_key(tensor: torch.Tensor) -> Any:
    if tensor.numel() == 0 or tensor.device.type == "meta":  # meta tensors all report storage 0
        return ("id", id(tensor))
    try:
        return (str(tensor.device), tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
        return ("id", id(tensor))


def plain_named_modules(model: nn.Module, remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` as if no adapter were attached: the adapters' container is
    skipped and every wrapper is replaced by its ``base_layer`` under the wrapper's name."""
    renames: dict[str, str] = {}
    for name, module in model.named_modules(remove_duplicate=remove_duplicate):
        if name == ADAPTER_ATTRIBUTE or name.startswith(ADAPTER_ATTRIBUTE + "."):
            continue
        for old, new in renames.items():
            if name == old or name.startswith(old + "."):
                name = new + name[len(old):]
                break
        if getattr(module, "is_tensoradapt_wrapper", False):
            renames[f"{name}.base_layer" if name else "base_layer"] = name
            continue
        yield name, module


def container_of(model: nn.Module) -> AdapterContainer | None:
    """The model's :class:`AdapterContainer` (``model.tensoradapt``), None when it has none."""
    found = model.__dict__.get("_modules", {}).get(ADAPTER_ATTRIBUTE)
    return found if isinstance(found, AdapterContainer) else None


def check_targets(model: nn.Module, found: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Refuse targets a wrapper cannot adapt faithfully: already adapted modules, modules reachable
    under several names, weights shared with any other module (tied weights: a merge would change
    both), and the ``out_proj`` of an ``nn.MultiheadAttention``."""
    found = [(name, module.base_layer if getattr(module, "is_tensoradapt_wrapper", False) else module)
             for name, module in found]  # a target another adapter already wraps: shared (checked at install)
    for name, module in found:
        if getattr(module, "is_tensoradapt_wrapper", False) or ".base_layer" in f".{name}" \
                or f"{ADAPTER_ATTRIBUTE}." in f"{name}.":
            raise RuntimeError(f"module {name!r} belongs to an attached adapter; detach it first")
    aliases: dict[int, list[str]] = {}
    owners: dict[Any, list[str]] = {}  # storage of every parameter → "module.param" names
    for name, module in plain_named_modules(model, remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
        for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
            where = f"{name}.{pname}" if name else pname
            keys = {("id", id(p)), _storage_key(p)}
            for key in keys:
                owners.setdefault(key, [])
                if where not in owners[key]:
                    owners[key].append(where)
    for name, module in found:
        names = aliases.get(id(module), [name])
        if len(names) > 1:
            raise ValueError(
                f"target {name!r} is one module reachable under several names {names}: a wrapper on one name "
                "would leave the others unadapted; untie the module or do not target it"
            )
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            own = f"{name}.weight"
            sharing: list[str] = []
            for key in ({("id", id(weight)), _storage_key(weight)}):
                sharing += [w for w in owners.get(key, []) if w != own and w not in sharing]
            if sharing:
                others = ", ".join(repr(w.rpartition(".")[0] or w) for w in sharing[:3])
                raise ValueError(
                    f"target {name!r} shares its weight with module {others} (tied weights, e.g. an output "
                    "head tied to the input embedding): merging or saving would change both; untie them "
                    "(tie_word_embeddings=False) or do not target it"
                )
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, nn.MultiheadAttention):
            raise TypeError(
                f"target {name!r} belongs to an nn.MultiheadAttention, whose forward reads its weights "
                "directly and would bypass the adapter; target other layers"
            )
    return found


def select_modules_to_save(model: nn.Module, spec: Any, targets: Sequence[str]) -> list[str]:
    """Names of the modules ``modules_to_save`` selects (same forms as targets), checked: not a
    target, not nested in another selected module, not the model itself."""
    if spec is None:
        return []
    if isinstance(spec, str) and not any(c in spec for c in "\\.*+?[](){}|^$"):
        spec = [spec]
    found = [name for name, _ in select_targets(model.named_modules(), spec)]
    if not found:
        raise ValueError(f"modules_to_save={spec!r:.80} matched no module of {type(model).__name__}")
    for name in found:
        if f"{ADAPTER_ATTRIBUTE}." in f"{name}." or ".base_layer" in f".{name}":
            raise RuntimeError(f"module {name!r} belongs to an attached adapter")
        for target in targets:
            if target == name or target.startswith(name + ".") or name.startswith(target + "."):
                raise ValueError(f"module {name!r} is both a target (or holds one: {target!r}) and in "
                                 "modules_to_save; choose one")
    container = container_of(model)
    for adapter in container.adapters() if container is not None else ():
        for name in found:
            for other in (*adapter.modules_to_save, *adapter.target_names):
                if other == name or other.startswith(name + ".") or name.startswith(other + "."):
                    raise ValueError(f"module {name!r} overlaps {other!r} of adapter {adapter.adapter_name!r} "
                                     "(a target or in its modules_to_save); choose another module")
    nested = [n for n in found if any(n.startswith(m + ".") for m in found)]
    return [n for n in found if n not in nested]


# ---------------------------------------------------------------------------------- the container
class AdapterContainer(nn.Module):
    """``model.tensoradapt``: the adapters attached to a model, by name (PEFT's habits).

    Registered once on the model and holding every adapter as a submodule, so
    ``model.parameters()``, ``state_dict()`` and ``.to()`` see all of them.  ``names``,
    ``container[name]``, ``name in container``, ``set_active(name or [names] or None)``,
    ``active`` (the names whose updates are used) and ``delete(name)`` (= ``detach()`` of that
    adapter).  With a single adapter attached, other attributes are read from it
    (``model.tensoradapt.merge()`` works as in 0.x).  It is removed with the last adapter.
    """

    def __init__(self) -> None:
        super().__init__()
        self._merge_order: list[BaseAdapter] = []  # merged adapters, oldest first
        self._requires_grad: dict[str, bool] = {}  # base parameters' flags before the first freeze

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The identity on its first argument (``nn.Sequential`` passes through it unchanged)."""
        return args[0] if args else None

    @property
    def names(self) -> tuple[str, ...]:
        """The adapters' names, in attach order."""
        return tuple(self._modules)

    def adapters(self) -> list[BaseAdapter]:
        """The adapters, in attach order."""
        return list(self._modules.values())  # type: ignore[arg-type]

    def __getitem__(self, name: str) -> BaseAdapter:
        if not isinstance(name, str) or name not in self._modules:
            raise KeyError(f"no adapter named {name!r}; the model has {list(self._modules)}")
        return self._modules[name]  # type: ignore[return-value]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._modules

    @property
    def active(self) -> tuple[str, ...]:
        """The names of the adapters :meth:`set_active` selected (all of them by default)."""
        return tuple(name for name, adapter in self._modules.items() if adapter._selected)  # type: ignore[union-attr]

    def set_active(self, names: str | Sequence[str] | None) -> None:
        """Use only the updates of ``names`` (one name, a list, or None / ``[]`` for none): the
        others contribute nothing until selected again.  Merged adapters stay in the weights."""
        wanted = [] if names is None else [names] if isinstance(names, str) else list(names)
        unknown = [n for n in wanted if n not in self]
        if unknown:
            raise KeyError(f"no adapter named {unknown[0]!r}; the model has {list(self._modules)}")
        for name, adapter in self._modules.items():
            adapter._selected = name in wanted  # type: ignore[union-attr]

    def remove(self, name: str) -> None:
        """Forget the adapter ``name`` (used by its ``detach()``; call :meth:`delete` instead)."""
        adapter = self._modules.pop(name)
        if adapter in self._merge_order:
            self._merge_order.remove(adapter)

    def delete(self, name: str) -> nn.Module:
        """Detach the adapter ``name`` (the others keep working); returns the model."""
        return self[name].detach()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name.startswith("_") or len(modules) != 1:
                if len(modules) > 1 and not name.startswith("_"):
                    raise AttributeError(f"model.tensoradapt holds several adapters {list(modules)}: pick one, "
                                         f"e.g. model.tensoradapt[{next(iter(modules))!r}].{name}") from None
                raise
            return getattr(next(iter(modules.values())), name)

    def extra_repr(self) -> str:
        return f"active={list(self.active)}"


def check_adapter_name(name: Any) -> str:
    if not isinstance(name, str) or not name.isidentifier() or hasattr(AdapterContainer, name) \
            or name in AdapterContainer().__dict__:
        raise ValueError(f"adapter name must be a Python identifier that is not an attribute of the container, "
                         f"got {name!r}")
    return name


# ---------------------------------------------------------------------------------- the base
class BaseAdapter(nn.Module):
    """What SuperLoRA and GLoRA adapters share (one public API).

    Subclasses set up ``target_names``, ``_originals`` and ``views`` and implement
    ``_make_wrapper``, ``_adapter_tensors`` (``{file name: tensor}``), ``_apply_merge``,
    ``_apply_unmerge``, ``_plain_modules`` (the modules ``merge_and_detach`` leaves), ``metadata``
    and ``num_params``.
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
        order = container._merge_order if container is not None else []
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
                    container._requires_grad.setdefault(plain, p.requires_grad)
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
            install_model_hooks(model)
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
                remove_model_hooks(model)
                for name, p in model.named_parameters():
                    if name in container._requires_grad:
                        p.requires_grad_(container._requires_grad[name])
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
            container._merge_order.append(self)

    def unmerge(self) -> None:
        """Undo :meth:`merge` (the original weights come back bit for bit)."""
        self._check_attached()
        if not self._merged:
            raise RuntimeError("the adapter is not merged")
        refuse_if_sharded(self._model, "unmerge()")
        container = container_of(self._model)
        order = container._merge_order if container is not None else []
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

    # ------------------------------------------------------------------ files
    def _file_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors and each ``modules_to_save`` copy's whole ``state_dict`` (its
        parameters and persistent buffers, e.g. BatchNorm's running statistics)."""
        tensors = {name: p.detach() for name, p in self._adapter_parameters()}
        for key, module in self.saved_modules.items():
            for entry, value in module.state_dict().items():
                tensors[f"{MODULES_TO_SAVE_PREFIX}{key.replace('__', '.')}.{entry}"] = value.detach()
        return tensors

    def _saved_metadata(self) -> list[dict[str, Any]]:
        out = []
        for name, (key, module) in zip(self.modules_to_save, self.saved_modules.items(), strict=True):
            out.append({"name": name, "type": type(module).__name__,  # "parameters": the state_dict's entries
                        "parameters": {p: list(t.shape) for p, t in module.state_dict().items()}})
            assert key == name.replace(".", "__")
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the adapter to ``path`` (``.safetensors``; tensors plus JSON metadata), atomically.

        On a model sharded by FSDP2 (``fully_shard``) this is a collective: call it on every rank;
        the full tensors are gathered and the rank at mesh coordinate 0 writes the file (the same
        bytes as an unsharded model with the same values)."""
        return write_gathered(path, self._file_tensors(), self.file_metadata())

    def file_metadata(self) -> dict[str, Any]:
        """The metadata written to files: :meth:`metadata` plus ``base_model`` (``name_or_path``
        and ``commit`` of a transformers model's config) when the model records them."""
        metadata = self.metadata()
        base = base_model_record(self._model)
        if base:
            metadata["base_model"] = base
        return metadata

    def state_dict_keys(self) -> dict[str, str]:
        """``{name in the adapter file: key in model.state_dict()}`` for every tensor the file holds
        (``tensoradapt.<adapter name>.…``)."""
        prefix = f"{ADAPTER_ATTRIBUTE}.{self.adapter_name}."
        keys = {}
        by_id: dict[int, str] = {}
        for key, value in self.state_dict(keep_vars=True).items():
            by_id.setdefault(id(value), key)
        for name, p in self._adapter_parameters():
            keys[name] = prefix + by_id[id(p)]
        for key, module in self.saved_modules.items():
            for entry in module.state_dict():
                file_name = f"{MODULES_TO_SAVE_PREFIX}{key.replace('__', '.')}.{entry}"
                keys[file_name] = f"{prefix}saved_modules.{key}.{entry}"
        return keys

    def _tensors_from_state_dict(self, state_dict: Any) -> dict[str, torch.Tensor]:
        """The file's tensors taken from a full ``model.state_dict()`` (e.g. one gathered by a
        distributed trainer), checked against the live adapter's shapes; floats in the adapter's dtype."""
        if not isinstance(state_dict, dict) and not hasattr(state_dict, "items"):
            raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
        live = self._file_tensors()
        out = {}
        missing = []
        for name, key in self.state_dict_keys().items():
            value = state_dict.get(key)
            if not isinstance(value, torch.Tensor):
                missing.append(key)
                continue
            mine = live[name]
            if tuple(value.shape) != tuple(mine.shape):
                raise ValueError(f"state_dict[{key!r}] has shape {tuple(value.shape)}, but adapter "
                                 f"{self.adapter_name!r} has {tuple(mine.shape)} there")
            out[name] = value.detach().to(mine.dtype) if mine.dtype.is_floating_point else value.detach()
        if missing:
            raise ValueError(f"state_dict lacks the tensors of adapter {self.adapter_name!r}: {missing[:5]}"
                             f"{' …' if len(missing) > 5 else ''} (pass the model's full state_dict(), or none)")
        return out

    @torch.no_grad()
    def copy_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy an adapter file's tensors (checked against this adapter: same names and shapes) into
        the adapter's parameters and its ``modules_to_save`` copies, in place (the parameter objects
        stay, so an optimiser over them keeps working)."""
        for name, p in self._adapter_parameters():
            p.copy_(tensors[name])
        for key, module in self.saved_modules.items():
            prefix = f"{MODULES_TO_SAVE_PREFIX}{key.replace('__', '.')}."
            module.load_state_dict({entry: tensors[prefix + entry] for entry in module.state_dict()}, strict=True)

    def save_pretrained(self, folder: str | os.PathLike[str], *, state_dict: Any = None) -> Path:
        """Write the adapter folder: ``adapter_model.safetensors`` (tensors and metadata, the
        authority), ``adapter_config.json`` (the same metadata plus ``"library": "tensoradapt"``,
        for humans and tools) and a ``README.md`` model card (written unless the folder has a
        README.md of its own).  Every file is written atomically; the folder is created.
        ``tensoradapt.torch.load(model, folder)`` reads it back.  Returns the ``.safetensors`` path.

        Parameters
        ----------
        folder : path
        state_dict : mapping, optional
            A full ``model.state_dict()`` to take the adapter's tensors from (keys
            ``tensoradapt.<name>.…``, :meth:`state_dict_keys`) instead of the live parameters, as
            ``transformers.Trainer`` passes one under DeepSpeed / FSDP.
        """
        from ._io import CONFIG_FILE, LIBRARY, README_FILE, write_bytes

        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"save_pretrained writes a folder, and {str(folder)!r} is a file")
        folder.mkdir(parents=True, exist_ok=True)
        tensors = self._file_tensors() if state_dict is None else self._tensors_from_state_dict(state_dict)
        metadata = self.file_metadata()
        writer = _writes_files(tensors)
        config = folder / CONFIG_FILE
        if writer and (config.exists() or config.is_symlink()):
            config.unlink()  # a crash below leaves a loadable folder: never an old config beside a new file
        path = write_gathered(folder / ADAPTER_FILE, tensors, metadata)
        if writer:
            text = json.dumps({"library": LIBRARY, **metadata}, indent=2, sort_keys=True) + "\n"
            write_bytes(config, text.encode("utf-8"))
            readme = folder / README_FILE
            if not readme.exists() or _is_our_card(readme):
                write_bytes(readme, model_card(metadata).encode("utf-8"))
        return path


# ---------------------------------------------------------------------------------- folders and state dicts
_CARD_MARK = "library_name: tensoradapt"  # the front-matter line that marks a README.md as ours


def base_model_record(model: nn.Module) -> dict[str, str]:
    """``{"name_or_path": …, "commit": …}`` of a transformers model's config (the keys it records,
    non-empty strings only; ``{}`` for a model built from a config or a plain module)."""
    config = getattr(model, "config", None)
    record = {}
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    if isinstance(name, str) and name:
        record["name_or_path"] = name
    commit = getattr(config, "_commit_hash", None)
    if isinstance(commit, str) and commit:
        record["commit"] = commit
    return record


def _writes_files(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether this process writes a folder's files: always, except on a model sharded by FSDP2
    (DTensors), where the rank at mesh coordinate 0 does (as in :func:`write_gathered`)."""
    dtensor = dtensor_type()
    sharded = [t for t in tensors.values() if dtensor is not None and isinstance(t, dtensor)]
    if not sharded:
        return True
    coordinate = sharded[0].device_mesh.get_coordinate()
    return coordinate is not None and all(c == 0 for c in coordinate)


def _is_our_card(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    return head.startswith("---\n") and _CARD_MARK in head.split("\n---", 1)[0]


def model_card(metadata: dict[str, Any]) -> str:
    """The ``README.md`` of an adapter folder: Hugging Face front matter (``library_name``, tags,
    ``base_model`` when known), the method, the trainable parameters, the targets and how to load."""
    def count(shape: list[int]) -> int:
        total = 1
        for d in shape:
            total *= d
        return total

    method = metadata["method"]
    base = (metadata.get("base_model") or {}).get("name_or_path")
    trainable = sum(count(s) for s in metadata["parameters"].values())
    saved = metadata.get("modules_to_save") or []
    saved_count = sum(count(s) for r in saved for s in r["parameters"].values())
    targets = metadata["targets"]
    lines = ["---", _CARD_MARK, "tags:", "- tensoradapt", f"- {method}"]
    if base:
        lines.append(f"base_model: {json.dumps(base)}")
    lines += ["---", "", f"# {method} adapter (tensoradapt {metadata['library_version']})", ""]
    lines.append(f"- method: `{method}`, config: `{json.dumps(metadata['config'], sort_keys=True)}`")
    lines.append(f"- trainable parameters: {trainable:,} in {len(metadata['parameters'])} tensors"
                 + (f", plus {saved_count:,} in modules_to_save {[r['name'] for r in saved]}" if saved else ""))
    if base:
        lines.append(f"- base model: `{base}`" + (f" (commit `{metadata['base_model']['commit']}`)"
                                                   if "commit" in metadata["base_model"] else ""))
    lines.append(f"- targets ({len(targets)}, the adapted (o, n) matrices):")
    for record in targets[:20]:
        lines.append(f"  - `{record['name']}`: {record['kind']} {record['shape'][0]}×{record['shape'][1]}")
    if len(targets) > 20:
        lines.append(f"  - … and {len(targets) - 20} more (adapter_config.json lists them all)")
    lines += [
        "",
        "Files: `adapter_model.safetensors` (the tensors; its header's metadata is authoritative) and",
        "`adapter_config.json` (the same metadata, readable). No pickle.",
        "",
        "## Load",
        "",
        "```text",
        "import tensoradapt.torch as tat",
        "adapter = tat.load(base_model, \"path/to/this/folder\")   # the same architecture and base weights",
        "```",
        "",
    ]
    return "\n".join(lines)


def report_base_keys(module: nn.Module, state: dict[str, Any], prefix: str, local: Any) -> None:
    """``state_dict`` post-hook of the wrappers: the base layer's entries under the wrapper's own
    name (``…c_attn.weight``, not ``…c_attn.base_layer.weight``), so a full state dict of an adapted
    model has the plain model's keys (plus ``tensoradapt.…``) and loads into a plain model."""
    inner = f"{prefix}base_layer."
    for key in [k for k in state if k.startswith(inner)]:  # the wrapper's entries came last: order kept
        state[prefix + key[len(inner):]] = state.pop(key)


def accept_base_keys(module: nn.Module, state: dict[str, Any], prefix: str, local: Any, strict: bool,
                     missing: list[str], unexpected: list[str], errors: list[str]) -> None:
    """``load_state_dict`` pre-hook of the wrappers: entries under the wrapper's name go to its
    base layer, so both a plain model's state dict and one of the older ``base_layer`` form load."""
    inner = f"{prefix}base_layer."
    for key in [k for k in state if k.startswith(prefix) and not k.startswith(inner)]:
        if inner + key[len(prefix):] not in state:
            state[inner + key[len(prefix):]] = state.pop(key)


def install_model_hooks(model: nn.Module) -> None:
    """Hooks the first attached adapter installs on its model (transformers' ``save_pretrained``)."""
    from .hf import install_save_hook

    install_save_hook(model)


def remove_model_hooks(model: nn.Module) -> None:
    """Undo :func:`install_model_hooks` (when the last adapter leaves)."""
    from .hf import remove_save_hook

    remove_save_hook(model)


class ReadsThrough:
    """Mixin for wrappers holding ``base_layer``: attributes they lack (``weight``, ``bias``,
    ``in_features``…) are read from the wrapped module, for code that inspects its layers."""

    is_tensoradapt_wrapper = True

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # type: ignore[misc]  # nn.Module's lookup
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(super().__getattr__("base_layer"), name)  # type: ignore[misc]


class ThreadState:
    """Forward-scoped state, one per thread (a ``threading.local`` that survives ``copy.deepcopy``
    and pickling by starting empty)."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._local = threading.local()

    def get(self) -> Any:
        state = getattr(self._local, "value", None)
        if state is None:
            state = self._local.value = self._factory()
        return state

    def clear(self) -> None:
        self._local = threading.local()

    def __deepcopy__(self, memo: dict[int, Any]) -> ThreadState:
        return ThreadState(self._factory)

    def __getstate__(self) -> dict[str, Any]:
        return {"_factory": self._factory}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._factory = state["_factory"]
        self._local = threading.local()


def graph_task_id() -> int:
    """Id of the autograd backward pass running now, -1 outside one (the private hook
    ``torch.utils.checkpoint`` itself uses; -1 where a torch build lacks it)."""
    probe = getattr(torch._C, "_current_graph_task_id", None)
    return -1 if probe is None else int(probe())


# ---------------------------------------------------------------------------------- FSDP2 (fully_shard)
def dtensor_type() -> type | None:
    """``DTensor`` when ``torch.distributed.tensor`` was imported (no DTensor can exist before), else None."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def fsdp_sharded(model: nn.Module) -> bool:
    """Whether ``model`` or one of its submodules was sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``)."""
    fsdp_module = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)  # None: never imported
    return fsdp_module is not None and any(isinstance(m, fsdp_module) for m in model.modules())


def refuse_if_sharded(model: nn.Module, what: str) -> None:
    """``RuntimeError`` when ``model`` is sharded by FSDP2: ``what`` (``merge()``, ``detach()``…)
    would write into sharded parameters (or take modules out of FSDP's parameter groups)."""
    if fsdp_sharded(model):
        raise RuntimeError(
            f"{what} is not supported on a model sharded by FSDP2 (fully_shard): its weights are sharded "
            "DTensors and FSDP keeps managing the adapter's tensors. Save the adapter (adapter.save(...) on "
            "every rank) and load it onto an unsharded model, then merge or detach there. The model was not changed"
        )


def gather_full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every DTensor replaced by its full (unsharded) value, detached.

    A collective when there is a DTensor (FSDP2 parameters outside a forward): every rank of its
    mesh must call it with the same names in the same order.  Without DTensors the very same
    tensors come back (no copy).
    """
    dtensor = dtensor_type()
    if dtensor is None or not any(isinstance(t, dtensor) for t in tensors.values()):
        return tensors
    return {name: t.detach().full_tensor() if isinstance(t, dtensor) else t for name, t in tensors.items()}


def write_gathered(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor],
                   metadata: dict[str, Any]) -> Path:
    """Write an adapter file from ``tensors`` that may be DTensors (FSDP2).

    Without DTensors this is :func:`._io.write_adapter`.  With DTensors it is a collective over
    their device mesh: every rank gathers the full tensors (the shards live on different ranks),
    the rank at mesh coordinate 0 alone writes the file (concurrent writers of one path would
    race), and all ranks then learn whether the write succeeded (the file exists when any rank
    returns; a failure raises on every rank).
    """
    from ._io import write_adapter

    dtensor = dtensor_type()
    sharded = [t for t in tensors.values() if dtensor is not None and isinstance(t, dtensor)]
    if not sharded:
        return write_adapter(path, tensors, metadata)
    import torch.distributed as dist

    mesh = sharded[0].device_mesh
    full = gather_full(tensors)
    coordinate = mesh.get_coordinate()
    writer = coordinate is not None and all(c == 0 for c in coordinate)
    failure: BaseException | None = None
    if writer:
        try:
            written = write_adapter(path, full, metadata)
        except BaseException as error:  # reported to the other ranks below, then raised here
            failure = error
    flag = torch.tensor([0 if failure is None else 1], dtype=torch.int32, device=mesh.device_type)
    for dim in range(mesh.ndim):  # dimension by dimension: the writer's flag reaches every rank of the mesh
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
    if failure is not None:
        raise failure
    if int(flag.item()):
        raise RuntimeError(f"the rank writing the adapter file {str(path)!r} (mesh coordinate 0) failed; "
                           "see its error")
    return written if writer else Path(path)


def refuse_sharded_values(values: Any) -> None:
    """``RuntimeError`` when one of ``values`` (the adapter tensors a layer is about to use) is a DTensor.

    Under FSDP2 the adapter's tensors are plain (all-gathered) tensors inside the root module's
    forward; they are still sharded when a wrapped layer runs outside it, or when
    ``model.tensoradapt`` (or the adapter) was given its own ``fully_shard`` group, whose forward
    never runs because the wrapped layers use its tensors directly.
    """
    if torch.compiler.is_compiling():  # nothing to check in a traced graph (and no graph break for it)
        return
    dtensor = dtensor_type()
    if dtensor is not None and any(isinstance(v, dtensor) for v in values):
        raise RuntimeError(
            "the adapter's tensors are sharded DTensors here: under FSDP2 they are gathered by the forward "
            "of the FSDP group that holds them. Call fully_shard(model) on the root after the blocks and give "
            "model.tensoradapt no fully_shard of its own (the wrapped layers use its tensors directly), and run "
            "adapted layers inside the model's forward"
        )
