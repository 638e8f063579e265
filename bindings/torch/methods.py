"""The one registry of adapter methods (:func:`tensoradapt.torch.attach` and ``load`` choose a method here).

Each method (SuperLoRA, GLoRA) registers one :class:`Method` from its own package
(:mod:`tensoradapt.torch.superlora`, :mod:`tensoradapt.torch.glora`): its config type, adapter and
layer types, how it attaches, how it reads its files back, what its file's target records hold,
and any extra state a file carries beside the tensors (GLoRA's per-layer configs).  Nothing outside
this module and a method's own package asks which method it holds: everything else looks the
method up here (:func:`by_config`, :func:`by_name`, :func:`of_adapter`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .files.read import check_file as check_file_with

__all__ = ["Method", "by_config", "by_name", "check_file", "names", "of_adapter", "register"]


@dataclass(frozen=True)
class Method:
    """One adapter method, as its package registers it.

    Attributes
    ----------
    name : str
        The ``"method"`` of its files (``"superlora"``, ``"glora"``).
    config_type, adapter_type, layer_type : type
        Its config (what ``attach`` dispatches on), its adapter and the layer it puts at a target.
    attach : callable
        ``attach(model, config, found, *, freeze_base, modules_to_save, name, **options)``: the
        adapter attached to the checked ``(name, module)`` targets ``found``.
    load : callable
        ``load(model, tensors, metadata, *, path, freeze_base)``: the adapter of a checked file, not
        yet installed.
    target_keys : frozenset of str
        The keys of each target record of its files.
    check_target : callable
        ``check_target(record, name, where)``: its own fields of a target record (``AdapterFileError``).
    file_state, state, restore_state : callable or None
        Extra state beside the tensors (GLoRA's fixed per-layer configs): read from a file's
        metadata, read from an adapter, put on an adapter (``ValueError``/``TypeError`` if invalid).
    state_label : str
        What that state is, for messages.
    """

    name: str
    config_type: type
    adapter_type: type
    layer_type: type
    attach: Callable[..., Any]
    load: Callable[..., Any]
    target_keys: frozenset[str]
    check_target: Callable[[dict[str, Any], str, str], None]
    file_state: Callable[[Mapping[str, Any]], Any] | None = None
    state: Callable[[Any], Any] | None = None
    restore_state: Callable[[Any, Any], None] | None = None
    state_label: str = ""


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (once per name; a method's package calls this on import)."""
    if not isinstance(method, Method):
        raise TypeError(f"register takes a Method, got {type(method).__name__}")
    if method.name in _METHODS and _METHODS[method.name] != method:
        raise ValueError(f"a method named {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def names() -> tuple[str, ...]:
    """The registered methods' names, in registration order."""
    return tuple(_METHODS)


def by_name(name: str) -> Method:
    """The method of a file's ``"method"`` (``KeyError`` for one not registered)."""
    return _METHODS[name]


def by_config(config: Any) -> Method | None:
    """The method whose config type ``config`` is, None for anything else."""
    return next((m for m in _METHODS.values() if isinstance(config, m.config_type)), None)


def of_adapter(adapter: Any) -> Method:
    """The method of an attached adapter (``TypeError`` for anything else)."""
    found = next((m for m in _METHODS.values() if isinstance(adapter, m.adapter_type)), None)
    if found is None:
        raise TypeError(f"{type(adapter).__name__} is not an adapter of a registered method ({list(_METHODS)})")
    return found


def check_file(path: str | os.PathLike[str], *, name: str = "default") -> tuple[Path, dict[str, torch.Tensor],
                                                                             dict[str, Any]]:
    """``(path, tensors, metadata)`` of an adapter file or folder, every check a file alone allows
    made, the method's own by its registered :class:`Method` (:func:`.files.read.check_file`)."""
    return check_file_with(path, _METHODS, name=name)
