"""SuperLoRA's files and its registration: attach, read a saved adapter back, check its target records.

Importing this module registers SuperLoRA in :mod:`tensoradapt.torch.methods`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tensoradapt import SuperLoRA, SuperLoRAConfig, buffers

from ..files.layout import AdapterFileError
from ..files.read import shape_field
from ..methods import Method, register
from ..modules import TargetSpec, forward_kind, weight_view
from ..targets import check_model_targets, check_targets, match_targets
from .adapter import SuperLoRAAdapter
from .layer import SuperLoRALayer

__all__ = ["METHOD", "attach_superlora", "check_target_record", "load_superlora"]


def attach_superlora(model: nn.Module, config: SuperLoRAConfig, targets: TargetSpec, *, freeze_base: bool = True,
                     seed: int | None = None, dtype: torch.dtype | None = None,
                     modules_to_save: Any = (), name: str = "default",
                     generator: str | None = None) -> SuperLoRAAdapter:
    """Attach SuperLoRA to ``model`` (see :func:`tensoradapt.torch.attach`); ``generator`` is one of
    ``tensoradapt.buffers.GENERATORS`` (default ``buffers.GENERATOR_ID``), checked before anything else."""
    generator = buffers.check_generator(generator)
    if not isinstance(config, SuperLoRAConfig):
        raise TypeError(f"config must be a SuperLoRAConfig, got {type(config).__name__}")
    found = check_targets(model, match_targets(model, targets) if not isinstance(targets, list)
                          or not targets or not isinstance(targets[0], tuple) else targets)
    adapter = SuperLoRAAdapter(model, config, found, freeze_base=freeze_base, seed=seed, dtype=dtype,
                               generator=generator)
    adapter.install(modules_to_save, name=name)
    return adapter


def load_superlora(model: nn.Module, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], *,
                   path: str, freeze_base: bool = True) -> SuperLoRAAdapter:
    """Rebuild a saved SuperLoRA adapter on ``model`` from a checked file
    (:func:`tensoradapt.torch.methods.check_file`): the model's targets are checked against the
    file first, the config's plan against the stored tensors before anything sized by the config
    is allocated."""
    config = metadata["config"]
    names = [r["name"] for r in metadata["targets"]]
    found = check_model_targets(model, metadata, path)
    for name, module in found:
        try:
            forward_kind(name, module)
        except TypeError as error:
            raise AdapterFileError(f"{path}: {error}") from None
    mismatched = []
    for (name, module), record in zip(found, metadata["targets"], strict=True):
        view = weight_view(name, module)
        shape, kind, weight_shape = tuple(record["shape"]), record["kind"], tuple(record["weight_shape"])
        if (view.shape, view.kind, view.weight_shape) != (shape, kind, weight_shape):
            mismatched.append(f"{name}: file {kind} {shape} (weight {weight_shape}) vs model {view.kind} "
                              f"{view.shape} (weight {view.weight_shape})")
    if mismatched:
        raise AdapterFileError(f"{path} does not fit this model, target shapes differ: " + "; ".join(mismatched[:5]))
    try:
        plan = SuperLoRA(config, [tuple(r["shape"]) for r in metadata["targets"]], names,
                         generator=metadata["generator_id"])
        expected = plan.parameter_shapes()
    except (ValueError, TypeError, OverflowError) as error:
        raise AdapterFileError(f"{path}: its config does not fit the targets ({error})") from None
    adapter_tensors = {k: v for k, v in tensors.items() if k in metadata["parameters"]}
    if set(expected) != set(adapter_tensors) or any(
            list(adapter_tensors[k].shape) != list(s) for k, s in expected.items()):
        raise AdapterFileError(f"{path}: the stored parameters do not match the plan their config makes")
    dtype = getattr(torch, metadata["param_dtype"])
    return SuperLoRAAdapter(model, config, found, freeze_base=freeze_base, seed=metadata["seed"], dtype=dtype,
                            values=adapter_tensors, generator=metadata["generator_id"])  # installed by the caller


def check_target_record(record: dict[str, Any], name: str, where: str) -> None:
    """SuperLoRA's own field of a file's target record: the stored ``weight_shape``."""
    shape_field(record["weight_shape"], f"the weight shape of target {name!r:.80}", where, positive=True)


#: SuperLoRA in the method registry.
METHOD = register(Method(
    name="superlora", config_type=SuperLoRAConfig, adapter_type=SuperLoRAAdapter, layer_type=SuperLoRALayer,
    attach=attach_superlora, load=load_superlora, target_keys=frozenset({"name", "kind", "shape", "weight_shape"}),
    check_target=check_target_record,
))
