"""PyTorch bindings of tensoradapt, installed as :mod:`tensoradapt.torch`.

``attach(model, config, targets)`` puts an adapter on a model (SuperLoRA for a
:class:`tensoradapt.SuperLoRAConfig`, GLoRA for a :class:`tensoradapt.GLoRAConfig`; both are
:class:`BaseAdapter` subclasses with one API); ``load(model, path_or_folder)`` rebuilds a saved one.
:mod:`tensoradapt.torch.functional` has autograd Functions over the core operators for users who
compose their own adapters.
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

from tensoradapt import GLoRAConfig, SuperLoRAConfig, presets

from . import functional, glora, hf
from ._io import FORMAT_VERSION, AdapterFileError, read_metadata
from ._shared import AdapterContainer, BaseAdapter
from ._targets import DIFFUSERS_DEFAULT_TARGETS, diffusers_targets, match_targets
from .adapter import AdaptedLayer, Adapter, SuperLoRAAdapter, SuperLoRALayer, attach_superlora, load_superlora
from .glora import GLoRAAdapter, GLoRALayer, attach_glora, load_glora
from .hf import use_adapter_checkpoints
from .lycoris_io import LycorisExport, export_lycoris, import_lycoris
from .peft_io import PeftExport, export_peft, import_peft

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
TORCH_VERSION = _torch.__version__

#: The attention projections ``attach(model)`` adapts, by ``model.config.model_type`` (PEFT's choice).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn",),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "phi": ("q_proj", "v_proj"),
    "opt": ("q_proj", "v_proj"),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "vit": ("q_proj", "v_proj", "query", "value"),
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "bart": ("q_proj", "v_proj"),
    "gpt_neox": ("query_key_value",),
    "falcon": ("query_key_value",),
    "bloom": ("query_key_value",),
}
#: Last name components treated as an output head by the ``"all-linear"`` fallback.
_HEADS = ("lm_head", "classifier", "score", "head", "qa_outputs", "output_projection")


def default_config() -> SuperLoRAConfig:
    """The configuration ``attach(model)`` uses without one: LoRA of rank 8, ``alpha=8``
    (``presets.lora(8)``, PEFT's ``LoraConfig()`` defaults)."""
    return presets.lora(8)


def _linear_like(module: _torch.nn.Module) -> bool:
    from tensoradapt._targets import is_conv1d, is_linear

    return is_linear(module) or is_conv1d(module)


def default_targets(model: _torch.nn.Module) -> list[str]:
    """The module names ``attach(model)`` adapts without targets: the attention projections of a
    known architecture (:data:`DEFAULT_TARGETS`, by ``model.config.model_type``), else every
    ``nn.Linear`` / ``Conv1D`` except the output head (the ``"all-linear"`` rule).  A diffusers
    model gets its attention projections (:data:`DIFFUSERS_DEFAULT_TARGETS`)."""
    from ._targets import diffusers_default_targets

    diffusion = diffusers_default_targets(model)
    if diffusion:
        return diffusion
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    suffixes = DEFAULT_TARGETS.get(model_type) if isinstance(model_type, str) else None
    if suffixes:
        found = [name for name, _ in match_targets_or_empty(model, list(suffixes))]
        if found:
            return found
    return _all_linear(model)


def match_targets_or_empty(model: _torch.nn.Module, targets: Any) -> list[tuple[str, _torch.nn.Module]]:
    from tensoradapt._targets import select_targets

    from ._shared import plain_named_modules

    return select_targets(plain_named_modules(model), targets)


def _all_linear(model: _torch.nn.Module) -> list[str]:
    head = None
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
    from ._shared import plain_named_modules

    modules = list(plain_named_modules(model))
    names = [name for name, module in modules if name and _linear_like(module)
             and module is not head and name.rpartition(".")[2] not in _HEADS]
    if head is None and names and not any(n.rpartition(".")[2] in _HEADS for n, _ in modules):
        names = names[:-1]  # no known head: the last linear layer is the output
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear / Conv1D layer to adapt besides its output head")
    return names


def _resolve_targets(model: _torch.nn.Module, targets: Any, exclude: Any) -> list[tuple[str, _torch.nn.Module]]:
    if targets is None:
        names = default_targets(model)
    elif isinstance(targets, str) and targets == "all-linear":
        names = _all_linear(model)
    else:
        names = [name for name, _ in match_targets(model, targets)]
        names = [n for n in names if not n.endswith(".base_layer") or n[:-11] not in names]
    if exclude is not None:
        dropped = {name for name, _ in match_targets_or_empty(model, exclude)}
        names = [n for n in names if n not in dropped]
        if not names:
            raise ValueError(f"exclude={exclude!r:.80} removes every target")
    modules = dict(model.named_modules())
    return [(n, modules[n]) for n in names]  # wrappers of other adapters: their base layer (check_targets)


def attach(model: _torch.nn.Module, config: Any = None, targets: Any = None, *, name: str = "default",
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
    if not isinstance(config, (SuperLoRAConfig, GLoRAConfig)):
        raise TypeError(f"config must be a tensoradapt.SuperLoRAConfig or GLoRAConfig, got {type(config).__name__}")
    if not isinstance(model, _torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = _resolve_targets(model, targets, exclude)
    from ._shared import select_modules_to_save

    saved = select_modules_to_save(model, modules_to_save, [n for n, _ in found])
    if isinstance(config, SuperLoRAConfig):
        return attach_superlora(model, config, found, freeze_base=freeze_base, modules_to_save=saved, name=name,
                                **options)
    return attach_glora(model, config, found, freeze_base=freeze_base, modules_to_save=saved, name=name, **options)


def load(model: _torch.nn.Module, path: str | os.PathLike[str], *, name: str = "default",
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
    from ._io import check_file, check_saved_modules

    file, tensors, metadata = check_file(path, name=name)
    where = repr(str(file))
    from ._shared import check_adapter_name, container_of

    container = container_of(model)
    taken = check_adapter_name(name) in container if container is not None else hasattr(model, "tensoradapt")
    if taken:
        raise RuntimeError(f"the model already has an attribute 'tensoradapt' holding an adapter named {name!r}; "
                           "load under another name= or detach it first")
    names, values = check_saved_modules(model, metadata, tensors, where)
    if metadata["method"] == "superlora":
        adapter: BaseAdapter = load_superlora(model, tensors, metadata, path=where, freeze_base=freeze_base)
    else:
        adapter = load_glora(model, tensors, metadata, path=where, freeze_base=freeze_base)
    adapter.install(names, values, name=name)
    return adapter
