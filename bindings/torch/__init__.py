"""PyTorch bindings of tensoradapt, installed as :mod:`tensoradapt.torch`.

``attach(model, config, targets)`` puts an adapter on a model (SuperLoRA for a
:class:`tensoradapt.SuperLoRAConfig`, GLoRA for a :class:`tensoradapt.GLoRAConfig`; both are
:class:`BaseAdapter` subclasses with one API); ``load(model, path_or_folder)`` rebuilds a saved one.
:mod:`tensoradapt.torch.functional` has autograd Functions over the core operators for users who
compose their own adapters.

This module only re-exports: docs/architecture.md draws the layers that define each name.
"""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401  (a clear message when PyTorch is missing)
except ImportError as error:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "tensoradapt.torch needs PyTorch; install it with `pip install tensoradapt[torch]`"
    ) from error

from . import functional, glora, hf
from ._pickle_compat import *  # noqa: F403  (defines no name: registers earlier versions' module paths for old pickles)
from .api import TORCH_VERSION, attach, default_config, load
from .container import AdapterContainer
from .files.layout import FORMAT_VERSION, AdapterFileError
from .files.read import read_metadata
from .glora import GLoRAAdapter, GLoRALayer
from .glora import attach_glora as attach_glora  # importable here as before (not in __all__)
from .glora import load_glora as load_glora
from .hf import use_adapter_checkpoints
from .lifecycle import BaseAdapter
from .lycoris import LycorisExport, export_lycoris, import_lycoris
from .peft import PeftExport, export_peft, import_peft
from .superlora import AdaptedLayer, Adapter, SuperLoRAAdapter, SuperLoRALayer
from .superlora import attach_superlora as attach_superlora  # importable here as before (not in __all__)
from .superlora import load_superlora as load_superlora
from .targets import DEFAULT_TARGETS, DIFFUSERS_DEFAULT_TARGETS, default_targets, diffusers_targets, match_targets

__all__ = [
    "DEFAULT_TARGETS",
    "DIFFUSERS_DEFAULT_TARGETS",
    "FORMAT_VERSION",
    "TORCH_VERSION",
    "AdaptedLayer",
    "Adapter",
    "AdapterContainer",
    "AdapterFileError",
    "BaseAdapter",
    "GLoRAAdapter",
    "GLoRALayer",
    "LycorisExport",
    "PeftExport",
    "SuperLoRAAdapter",
    "SuperLoRALayer",
    "attach",
    "default_config",
    "default_targets",
    "diffusers_targets",
    "export_lycoris",
    "export_peft",
    "functional",
    "glora",
    "hf",
    "import_lycoris",
    "import_peft",
    "load",
    "match_targets",
    "read_metadata",
    "use_adapter_checkpoints",
]
