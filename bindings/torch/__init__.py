"""PyTorch bindings of tensoradapt, installed as :mod:`tensoradapt.torch`.

``attach(model, config, targets)`` puts an adapter on a model (SuperLoRA for a
:class:`tensoradapt.SuperLoRAConfig`, GLoRA for a :class:`tensoradapt.GLoRAConfig`);
``load(model, path)`` rebuilds a saved one.  :mod:`tensoradapt.torch.functional` has autograd
Functions over the core operators for users who compose their own adapters.
"""

from __future__ import annotations

import os
from typing import Any

try:
    import torch as _torch
except ImportError as error:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "tensoradapt.torch needs PyTorch; install it with `pip install tensoradapt[torch]`"
    ) from error

from tensoradapt import GLoRAConfig, SuperLoRAConfig

from . import functional, glora
from ._io import FORMAT_VERSION, AdapterFileError, read_metadata
from ._targets import match_targets
from .adapter import AdaptedLayer, Adapter, attach_superlora, load_superlora
from .glora import GLoRAAdapter, GLoRALayer, attach_glora, load_glora

__all__ = [
    "FORMAT_VERSION",
    "TORCH_VERSION",
    "AdaptedLayer",
    "Adapter",
    "AdapterFileError",
    "GLoRAAdapter",
    "GLoRALayer",
    "attach",
    "functional",
    "glora",
    "load",
    "match_targets",
    "read_metadata",
]
TORCH_VERSION = _torch.__version__


def attach(model: _torch.nn.Module, config: Any, targets: Any, *, freeze_base: bool = True, **options: Any) -> Any:
    """Attach an adapter to ``model`` and return it (an ``nn.Module`` registered as ``model.tensoradapt``).

    Parameters
    ----------
    model : torch.nn.Module
    config : tensoradapt.SuperLoRAConfig or tensoradapt.GLoRAConfig
        Which adapter (see :mod:`tensoradapt.presets` for LoRA, LoKr, LoTR, LoRTA, LoNKr, …).
    targets : list of str, str or callable
        Module-name suffixes (``["c_attn"]``, ``["query", "value"]``), a regular expression matched
        against the whole module name, or ``callable(name, module) -> bool``.  The matches, in
        ``model.named_modules()`` order, are the SuperLoRA target list.  Supported: ``nn.Linear``,
        transformers' ``Conv1D`` and any module with a 2-D or convolution ``weight``
        (``ΔW`` is generated as the ``(o, ∏ rest)`` matrix and reshaped like the weight).
    freeze_base : bool
        Set ``requires_grad=False`` on every base parameter (restored by ``detach()``).
    **options
        SuperLoRA: ``seed`` (initialisation seed, default ``config.seed``) and ``dtype`` of the
        trainable tensors (default float32, float64 for a float64 model).

    Returns
    -------
    Adapter
        ``merge()``, ``unmerge()``, ``detach()``, ``disabled()``, ``summary()``, ``save(path)``.
    """
    if isinstance(config, SuperLoRAConfig):
        return attach_superlora(model, config, targets, freeze_base=freeze_base, **options)
    if isinstance(config, GLoRAConfig):
        return attach_glora(model, config, targets, freeze_base=freeze_base, **options)
    raise TypeError(f"config must be a tensoradapt.SuperLoRAConfig or GLoRAConfig, got {type(config).__name__}")


def load(model: _torch.nn.Module, path: str | os.PathLike[str], *, freeze_base: bool = True) -> Any:
    """Attach the adapter saved at ``path`` (by ``adapter.save(path)``) to ``model``.

    Reads safetensors plus JSON metadata only (never pickle) and checks, before touching the
    model: the file exists (``FileNotFoundError``), its format and version, that it is not
    corrupted, that every tensor has the recorded shape and dtype, and that the model has every
    target with the recorded shape (:class:`AdapterFileError`, a ``ValueError``).
    """
    from ._io import read_adapter

    tensors, metadata = read_adapter(path)
    method = metadata.get("method")
    if method == "superlora":
        return load_superlora(model, tensors, metadata, path=str(path), freeze_base=freeze_base)
    if method == "glora":
        return load_glora(model, tensors, metadata, freeze_base=freeze_base)
    raise AdapterFileError(f"{str(path)!r}: unknown adapter method {method!r}")
