"""``model.tensoradapt``: the per-model container of the attached adapters, and the model's hooks.

:class:`AdapterContainer` holds every adapter attached to a model by name (PEFT's habits);
:func:`container_of` finds it.  The first adapter attached to a transformers model makes its
``model.save_pretrained`` write the adapter folder (:func:`install_save_hook`,
:func:`save_pretrained`); the last one to leave takes the hook away.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from .distributed import fsdp_sharded
from .modules import ADAPTER_ATTRIBUTE

if TYPE_CHECKING:
    from .lifecycle import BaseAdapter

__all__ = ["AdapterContainer", "check_adapter_name", "container_of", "install_save_hook", "is_transformers_model",
           "remove_save_hook", "save_pretrained"]

#: ``transformers.PreTrainedModel.save_pretrained`` keywords accepted (and what they may be) by the hook.
_ACCEPTED = {"max_shard_size", "token", "save_peft_format", "save_original_format", "variant",
             "distributed_checkpoint", "commit_message", "repo_id", "create_pr", "private"}


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
    def merge_order(self) -> list[BaseAdapter]:
        """The merged adapters, oldest first (the list itself: :meth:`BaseAdapter.merge` appends to it)."""
        return self._merge_order

    @property
    def requires_grad_flags(self) -> dict[str, bool]:
        """The base parameters' ``requires_grad`` flags before the first freeze, by plain name (the
        dict itself: the adapters record into it and restore from it)."""
        return self._requires_grad

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


def container_of(model: nn.Module) -> AdapterContainer | None:
    """The model's :class:`AdapterContainer` (``model.tensoradapt``), None when it has none."""
    found = model.__dict__.get("_modules", {}).get(ADAPTER_ATTRIBUTE)
    return found if isinstance(found, AdapterContainer) else None


# ---------------------------------------------------------------------------------- transformers' save_pretrained
def is_transformers_model(model: Any) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (by its class hierarchy; transformers
    is not imported)."""
    return any(cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers.")
               for cls in type(model).__mro__)


class _SavePretrained:
    """The ``save_pretrained`` instance attribute of an adapted transformers model (a plain object
    holding the model, so ``copy.deepcopy`` and pickling carry it over to the copy)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> None:
        return save_pretrained(self.model, save_directory, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<tensoradapt save_pretrained of {type(self.model).__name__}: writes the adapter folder only>"


def install_save_hook(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` write the adapter folder (transformers models only; an
    instance attribute the user set is left alone)."""
    if is_transformers_model(model) and "save_pretrained" not in model.__dict__:
        object.__setattr__(model, "save_pretrained", _SavePretrained(model))


def remove_save_hook(model: nn.Module) -> None:
    """Remove what :func:`install_save_hook` installed: ``model.save_pretrained`` is the class's again."""
    if isinstance(model.__dict__.get("save_pretrained"), _SavePretrained):
        del model.__dict__["save_pretrained"]


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike[str], is_main_process: bool = True,
                    state_dict: Any = None, push_to_hub: bool = False, safe_serialization: bool | None = None,
                    **kwargs: Any) -> None:
    """``model.save_pretrained(...)`` of a model with adapters: every attached adapter's folder
    (``adapter.save_pretrained``), the adapter ``"default"`` in ``save_directory`` and any other in
    ``save_directory/<name>/``; nothing of the base model.

    Takes ``transformers.PreTrainedModel.save_pretrained``'s arguments as ``Trainer`` passes them:
    ``is_main_process=False`` writes nothing (on a model sharded by FSDP2 without ``state_dict``
    every rank still joins the gathering save, and the rank at mesh coordinate 0 writes);
    ``state_dict`` (a full ``model.state_dict()``, e.g. gathered under DeepSpeed / FSDP) supplies
    the adapter's tensors; ``safe_serialization`` must not be False (safetensors only).
    ``push_to_hub``, a ``variant`` and ``distributed_checkpoint`` are refused (``ValueError``);
    sharding options do not apply and are ignored.  Without an adapter attached, the class's own
    ``save_pretrained`` runs.
    """
    unknown = sorted(set(kwargs) - _ACCEPTED)
    if unknown:
        raise TypeError(f"save_pretrained() got unexpected keyword arguments {unknown}")
    container = container_of(model)
    if container is None:  # the hook outlived its adapters (it should not): behave like the class
        return type(model).save_pretrained(model, save_directory, is_main_process=is_main_process,
                                           state_dict=state_dict, push_to_hub=push_to_hub, **kwargs)
    if push_to_hub:
        raise ValueError("push_to_hub is not supported for an adapted model: save the folder, then upload it "
                         "(huggingface_hub.upload_folder)")
    if safe_serialization is False:
        raise ValueError("safe_serialization=False asks for pickle files; tensoradapt writes safetensors only")
    if kwargs.get("variant") is not None:
        raise ValueError(f"variant={kwargs['variant']!r}: adapter folders have no variants")
    if kwargs.get("distributed_checkpoint"):
        raise ValueError("distributed_checkpoint=True is not supported for an adapted model (the adapter's "
                         "tensors are small: save them whole)")
    if not isinstance(is_main_process, bool):
        raise TypeError(f"is_main_process must be True or False, got {is_main_process!r:.40}")
    sharded = state_dict is None and fsdp_sharded(model)
    if not is_main_process and not sharded:
        return None
    folder = Path(save_directory)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_pretrained writes a folder, and {str(folder)!r} is a file")
    # Under FSDP2 without a gathered state_dict every rank joins the adapters' save (a collective that
    # gathers the full tensors; the rank at mesh coordinate 0 writes), is_main_process or not.
    for adapter in container.adapters():
        name = adapter.adapter_name
        adapter.save_pretrained(folder if name == "default" else folder / name, state_dict=state_dict)
    return None
