"""GLoRA's files and its registration: attach, read a saved adapter back, check its target records,
and its extra state (the fixed per-layer configs a file carries).

Importing this module registers GLoRA in :mod:`tensoradapt.torch.methods`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tensoradapt.glora import algebra
from tensoradapt.glora.config import GLoRAConfig, LayerChoice, check_bias

from ..files.layout import AdapterFileError
from ..methods import Method, register
from ..modules import TargetSpec, forward_kind, weight_view
from ..targets import check_model_targets, check_targets, match_targets
from .adapter import GLoRAAdapter, GLoRALayer

__all__ = ["METHOD", "attach_glora", "check_target_record", "load_glora"]


def attach_glora(model: nn.Module, config: GLoRAConfig, targets: TargetSpec, *, freeze_base: bool = True,
                 dtype: torch.dtype | None = None, modules_to_save: Any = (), name: str = "default") -> GLoRAAdapter:
    """Attach a GLoRA supernet to ``model``.

    Parameters
    ----------
    model : nn.Module
    config : GLoRAConfig
    targets : list of str, str or callable
        Module-name suffixes, a regular expression on the whole name, or ``callable(name, module)``
        (see :func:`tensoradapt.torch.match_targets`); every match must be an ``nn.Linear`` or a
        transformers ``Conv1D`` (``TypeError`` otherwise).
    freeze_base : bool
        ``requires_grad=False`` on every base parameter (restored by ``detach()``).
    dtype : torch.dtype, optional
        Dtype of the trainable tensors (default float32; float64 for a float64 model).  ``W'`` and
        ``b'`` are computed in it and cast to the input's dtype.
    modules_to_save : list of str, optional
        Modules trained in full (copies), saved in the adapter file.

    Returns
    -------
    GLoRAAdapter
        Registered on the model as ``model.tensoradapt``.
    """
    if not isinstance(config, GLoRAConfig):
        raise TypeError(f"config must be a GLoRAConfig, got {type(config).__name__}")
    found = check_targets(model, match_targets(model, targets) if not isinstance(targets, list)
                          or not targets or not isinstance(targets[0], tuple) else targets)
    adapter = GLoRAAdapter(model, config, found, freeze_base=freeze_base, dtype=dtype)
    adapter.install(modules_to_save, name=name)
    return adapter


def load_glora(model: nn.Module, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any], *,
               path: str = "the adapter file", freeze_base: bool = True) -> GLoRAAdapter:
    """Build a saved GLoRA adapter for ``model`` from a checked file
    (:func:`tensoradapt.torch.methods.check_file`): same targets (checked by name, kind, ``(o, n)``
    and bias), the stored tensors checked against the shapes the config makes *before* anything is
    allocated, the saved per-layer configs checked.
    The adapter is returned uninstalled (the caller installs it).

    Raises
    ------
    AdapterFileError
        Anything in the file does not fit the model; the model is not touched.
    """
    config = metadata["config"]
    records = metadata["targets"]
    found = check_model_targets(model, dict(metadata), path)
    problems = []
    for (name, module), record in zip(found, records, strict=True):
        try:
            forward_kind(name, module)
            view = weight_view(name, module)
        except TypeError as error:
            raise AdapterFileError(f"{path}: {error}") from None
        if view.kind not in ("linear", "conv1d"):
            problems.append(f"{name}: a {type(module).__name__}, which GLoRA does not adapt")
        elif (view.kind, view.shape) != (record["kind"], tuple(record["shape"])):
            problems.append(f"{name}: file {record['kind']} {tuple(record['shape'])} vs model {view.kind} {view.shape}")
        elif (getattr(module, "bias", None) is not None) != record["has_bias"]:
            problems.append(f"{name}: file has_bias={record['has_bias']} vs model has_bias={not record['has_bias']}")
    if problems:
        raise AdapterFileError(f"{path} does not fit this model: " + "; ".join(problems[:5]))
    expected = {}
    for record in records:
        o, n = record["shape"]
        for k, shape in algebra.parameter_shapes(o, n, config.rank, has_bias=record["has_bias"]).items():
            expected[f"{record['name']}.{k}"] = tuple(shape)
    stored = {k: tuple(v.shape) for k, v in tensors.items() if k in metadata["parameters"]}
    if stored != expected:
        raise AdapterFileError(f"{path}: the stored tensors do not match the GLoRA layers its config makes "
                               f"(rank {config.rank})")
    saved = metadata.get("configs")
    choices = None
    if saved is not None:
        if not isinstance(saved, list) or len(saved) != len(records):
            raise AdapterFileError(f"{path}: configs must be null or one per target, got {saved!r:.80}")
        choices = []
        for record, data in zip(records, saved, strict=True):
            try:
                if not isinstance(data, dict):
                    raise TypeError(f"a layer choice must be an object, got {data!r:.40}")
                choice = LayerChoice.from_dict(data)
                check_bias(choice, record["has_bias"])
                if choice.rank is not None and (type(choice.rank) is not int or not 0 < choice.rank <= config.rank):
                    raise ValueError(f"rank {choice.rank!r:.40} is not in 1..{config.rank}")
                choices.append(choice.resolve(config.rank))
            except (TypeError, ValueError, KeyError) as error:
                raise AdapterFileError(f"{path}: the saved config of layer {record['name']!r} is invalid "
                                       f"({error})") from None
    dtype = getattr(torch, metadata["param_dtype"])
    adapter = GLoRAAdapter(model, config, found, freeze_base=freeze_base, dtype=dtype)
    with torch.no_grad():
        for name, layer in zip(adapter.target_names, adapter.layers, strict=True):
            for k, p in layer.items():
                p.copy_(tensors[f"{name}.{k}"])
    adapter.pending_configs = None if choices is None else tuple(choices)
    return adapter


def check_target_record(record: dict[str, Any], name: str, where: str) -> None:
    """GLoRA's own field of a file's target record: ``has_bias``, true or false."""
    if type(record["has_bias"]) is not bool:
        raise AdapterFileError(f"{where} is corrupted: has_bias of target {name!r:.80} is "
                               f"{record['has_bias']!r:.40}, not true or false")


#: GLoRA in the method registry (its extra state: the fixed per-layer configs).
METHOD = register(Method(
    name="glora", config_type=GLoRAConfig, adapter_type=GLoRAAdapter, layer_type=GLoRALayer,
    attach=attach_glora, load=load_glora, target_keys=frozenset({"name", "kind", "shape", "has_bias"}),
    check_target=check_target_record, file_state=lambda metadata: metadata.get("configs"),
    state=lambda adapter: adapter.configs, restore_state=lambda adapter, configs: adapter.set_configs(configs),
    state_label="per-layer configs of a GLoRA adapter",
))
