"""``attach`` and ``load``: the two public entry points that choose an adapter method.

``attach`` picks the method by the config's type, ``load`` by the file's ``"method"``, both through
the registry (:mod:`.methods`): this module knows no method.  The methods' packages
(:mod:`.superlora`, :mod:`.glora`) sit above it and register themselves when ``tensoradapt.torch``
is imported (before any of its submodules can run); ``GLoRAAdapter.load`` and the PEFT and LyCORIS
importers build on :func:`load` and :func:`attach`.  ``tensoradapt.torch`` re-exports everything
public.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from tensoradapt import SuperLoRAConfig, presets

from .container import check_adapter_name, container_of
from .files.read import check_saved_modules
from .lifecycle import BaseAdapter
from .methods import by_config, by_name, check_file, names
from .targets import resolve_targets, select_modules_to_save

__all__ = ["TORCH_VERSION", "attach", "default_config", "load"]

#: The version of the PyTorch these bindings run on.
TORCH_VERSION = torch.__version__

def default_config() -> SuperLoRAConfig:
    """The configuration ``attach(model)`` uses without one: LoRA of rank 8, ``alpha=8``
    (``presets.lora(8)``, PEFT's ``LoraConfig()`` defaults)."""
    return presets.lora(8)


def attach(model: nn.Module, config: Any = None, targets: Any = None, *, name: str = "default",
           exclude: Any = None, modules_to_save: Any = None, freeze_base: bool = True, **options: Any) -> BaseAdapter:
    """Attach an adapter to ``model`` and return it (an ``nn.Module`` registered as ``model.tensoradapt``).

    Parameters
    ----------
    model : torch.nn.Module
    config : tensoradapt.SuperLoRAConfig or tensoradapt.GLoRAConfig, optional
        Which adapter (see :mod:`tensoradapt.presets` for LoRA, LoKr, LoTR, LoRTA, LoNKr, …);
        default :func:`default_config` (LoRA rank 8).
    targets : list of str, str or callable, optional
        Module-name suffixes (``["c_attn"]``, ``["query", "value"]``), a regular expression matched
        against the whole module name, ``callable(name, module) -> bool``, or ``"all-linear"``
        (every ``nn.Linear``/``Conv1D`` except the output head).  Default: :func:`default_targets`
        (the attention projections of known architectures, else ``"all-linear"``).  The matches, in
        ``model.named_modules()`` order, are the SuperLoRA target list.  Supported: ``nn.Linear``,
        transformers' ``Conv1D``, ``nn.Conv1d/2d/3d`` and ``nn.Embedding`` (GLoRA: the first two).
    name : str
        The adapter's name (a Python identifier), ``model.tensoradapt[name]``.  Several adapters
        may be attached under different names, on disjoint or shared targets; on a shared target
        the active adapters' updates add (SuperLoRA only: a GLoRA adapter shares no layer).
    exclude : same forms as ``targets``, optional
        Modules removed from the targets.
    modules_to_save : list of str, optional
        Modules (e.g. ``["classifier"]``) trained in full as copies, saved in the adapter file,
        put back by :func:`load` and replaced by the untouched originals at ``detach()``.
    freeze_base : bool
        Set ``requires_grad=False`` on every base parameter (restored by ``detach()``).
    **options
        ``dtype`` of the trainable tensors (default float32, float64 for a float64 model);
        SuperLoRA also ``seed`` (initialisation seed, default ``config.seed``) and ``generator``
        (the fixed projections' buffer generator, one of ``tensoradapt.buffers.GENERATORS``; default
        ``buffers.GENERATOR_ID``, generator 2), stored as ``adapter.generator_id`` and in saved files.

    Returns
    -------
    SuperLoRAAdapter or GLoRAAdapter
        ``merge()``, ``unmerge()``, ``detach()``, ``disabled()``, ``summary()``, ``save(path)``, ….
    """
    if config is None:
        config = default_config()
    method = by_config(config)
    if method is None:
        default = by_config(default_config())  # named first, then the others as registered
        kinds = " or ".join(m.config_type.__name__ for m in sorted(map(by_name, names()), key=lambda m: m != default))
        raise TypeError(f"config must be a tensoradapt.{kinds}, got {type(config).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = resolve_targets(model, targets, exclude)
    saved = select_modules_to_save(model, modules_to_save, [n for n, _ in found])
    return method.attach(model, config, found, freeze_base=freeze_base, modules_to_save=saved, name=name, **options)


def load(model: nn.Module, path: str | os.PathLike[str], *, name: str = "default",
         freeze_base: bool = True) -> BaseAdapter:
    """Attach the adapter saved at ``path`` (a file written by ``adapter.save(path)``, or a folder
    written by ``adapter.save_pretrained(folder)`` / ``model.save_pretrained(folder)``) to ``model``
    under ``name`` (refused when the model already has an adapter of that name).  In a folder, the
    adapter ``name`` is read from ``folder/<name>/`` when that subfolder holds one (the layout of
    several adapters), else from the folder itself; its ``adapter_config.json``, when present, must
    agree with the ``.safetensors`` metadata.

    Reads safetensors plus JSON metadata only (never pickle) and checks everything before touching
    the model: the file exists (``FileNotFoundError``); its format, version and strict JSON types;
    every tensor against the metadata; the config against the stored tensor shapes (before
    allocating anything the config sizes); GLoRA's per-layer configs; that the model has every
    target (and saved module) with the recorded kind and shape.  Any failure raises
    :class:`AdapterFileError` (a ``ValueError``) naming the file, and leaves the model bit-identical.
    """
    file, tensors, metadata = check_file(path, name=name)
    where = repr(str(file))
    container = container_of(model)
    taken = check_adapter_name(name) in container if container is not None else hasattr(model, "tensoradapt")
    if taken:
        raise RuntimeError(f"the model already has an attribute 'tensoradapt' holding an adapter named {name!r}; "
                           "load under another name= or detach it first")
    saved, values = check_saved_modules(model, metadata, tensors, where)
    adapter: BaseAdapter = by_name(metadata["method"]).load(model, tensors, metadata, path=where,
                                                            freeze_base=freeze_base)
    adapter.install(saved, values, name=name)
    return adapter

