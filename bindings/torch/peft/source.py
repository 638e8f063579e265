"""The export source: an adapter as the PEFT and LyCORIS exports see it, live or from a file.

A :class:`Source` holds the targets (:class:`Target`: name, PEFT layer family, ``(o, n)`` and
weight shapes, the module when live), the trainable tensors by name (SuperLoRA: the plan's
parameter names; GLoRA: ``"<target>.<tensor>"``) and what builds ``ΔW`` from them (the SuperLoRA
plan, or the GLoRA config and each layer's choice).  :func:`live_source` reads an adapter (its
parameters gathered in full under FSDP2), :func:`file_source` one of our adapter files or folders
(every stored shape checked against what its config makes).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensoradapt import GLoRAConfig, SuperLoRA, SuperLoRAConfig
from tensoradapt.glora import algebra
from tensoradapt.glora.config import LayerChoice, largest_choice

from ..distributed import gather_full
from ..files.layout import ADAPTER_FILE, MODULES_TO_SAVE_PREFIX, AdapterFileError, adapter_subfolders
from ..lifecycle import BaseAdapter
from ..methods import by_name, check_file, of_adapter


@dataclass
class Target:
    """One target as the export sees it: the PEFT layer family and what is known of the module."""

    name: str
    layer: str  # "linear" (nn.Linear, quantised linear), "conv1d" (transformers Conv1D), "conv", "embedding"
    shape: tuple[int, int]
    weight_shape: tuple[int, ...]
    padding_idx: int | None = None
    module: nn.Module | None = None  # None when read from a file (its settings are unknown)
    plain_linear: bool = True  # type(module) is nn.Linear (PEFT's GLoRA needs exactly that)
    has_bias: bool = False


@dataclass
class Source:
    """An adapter as the exports see it (:func:`live_source`, :func:`file_source`)."""

    method: str  # the adapter's method name, as its files record it (the method registry's)
    targets: list[Target]
    params: dict[str, torch.Tensor]  # SuperLoRA: generator name -> tensor; GLoRA: "<target>.<tensor>"
    plan: SuperLoRA | None = None
    glora: GLoRAConfig | None = None
    choices: tuple[LayerChoice, ...] | None = None
    base_model: str | None = None
    modules_to_save: tuple[str, ...] = ()
    origin: str = "the adapter"
    file: Path | None = None
    model: nn.Module | None = None  # the adapted model (a live adapter only)


def layer_of(kind: str, weight_shape: Sequence[int]) -> str:
    """The PEFT layer family of a target recorded as ``kind`` with ``weight_shape``."""
    if kind in ("linear", "quantized"):
        return "linear"
    if kind == "conv1d":
        return "conv1d"
    if kind in ("conv", "embedding"):
        return kind
    # kind "weight": the modules attach supports with such a weight are convolutions and embeddings
    return "embedding" if len(weight_shape) == 2 else "conv"


def _warn_merged(adapter: BaseAdapter) -> None:
    if adapter.attached and adapter.merged:
        warnings.warn("exporting a merged adapter: the PEFT folder holds ΔW for the unmerged base weights; loading it "
                      "onto this model (whose weights already hold ΔW) would apply ΔW twice. Load it onto the "
                      "original base model", UserWarning, stacklevel=5)
    elif adapter.merged_into_model:
        warnings.warn("exporting an adapter detached by merge_and_detach(): the PEFT folder holds ΔW for the "
                      "unadapted base weights, and that model's weights already hold ΔW (loading the folder onto it "
                      "would apply ΔW twice): load it onto the original base model", UserWarning, stacklevel=5)


def _base_model_name(model: nn.Module | None) -> str | None:
    config = getattr(model, "config", None)
    for attr in ("_name_or_path", "name_or_path"):
        value = getattr(config, attr, None)
        if isinstance(value, str) and value:
            return value
    return None


def _live_targets(adapter: BaseAdapter, model: nn.Module | None) -> list[Target]:
    targets = []
    for i, name in enumerate(adapter.target_names):
        view = adapter.views[i]
        module = None
        if model is not None:
            module = model.get_submodule(name)
            if getattr(module, "is_tensoradapt_wrapper", False):
                module = module.base_layer
        kinds = getattr(adapter, "kinds", None)  # SuperLoRA: each target's forward kind
        layer = layer_of(kinds[i] if kinds is not None else view.kind, view.weight_shape)
        has_bias = adapter.has_bias[i] if hasattr(adapter, "has_bias") else False
        targets.append(Target(name, layer, tuple(view.shape), tuple(view.weight_shape),
                              getattr(view, "padding_idx", None), module,
                              module is None or type(module) is nn.Linear, has_bias))
    return targets


def live_source(adapter: BaseAdapter) -> Source:
    """The export's view of a live adapter (its parameters gathered in full under FSDP2)."""
    # FSDP2 (fully_shard): the full tensors (a collective)
    params = gather_full({name: p.detach() for name, p in adapter.named_trainable_parameters()
                          if not name.startswith(MODULES_TO_SAVE_PREFIX)})
    model = adapter.model if adapter.attached else None  # detached: kinds and shapes only, as from a file
    _warn_merged(adapter)
    common = dict(targets=_live_targets(adapter, model), params=params, base_model=_base_model_name(model),
                  modules_to_save=tuple(adapter.modules_to_save), origin=f"this {type(adapter).__name__}",
                  model=model)
    method = of_adapter(adapter).name
    plan = getattr(adapter, "plan", None)
    if isinstance(plan, SuperLoRA):  # ΔW from a core plan
        return Source(method, plan=plan, **common)
    choices = adapter.inference_configs() if adapter.attached else None
    if adapter.attached and adapter.configs is None:
        warnings.warn("exporting a GLoRA supernet without fixed configs: every layer uses its largest choice (what "
                      "eval mode runs); call set_configs() or search() first to export a searched subnet",
                      UserWarning, stacklevel=4)
    if choices is None:
        choices = tuple(largest_choice(adapter.config, has_bias=b).resolve(adapter.config.rank)
                        for b in adapter.has_bias)
    return Source(method, glora=adapter.config, choices=tuple(choices), **common)


def file_source(path: str | os.PathLike[str]) -> Source:
    """The export's view of one of our adapter files or folders, rebuilt from its metadata."""
    place = Path(path)
    if place.is_dir() and not (place / ADAPTER_FILE).exists():
        named = adapter_subfolders(place)
        if named:
            raise FileNotFoundError(f"{str(place)!r} holds no adapter at its root, only the named adapters {named[:5]} "
                                    f"in subfolders: pass a subfolder's path to export one (e.g. "
                                    f"{str(place / named[0])!r})")
    file, tensors, metadata = check_file(path)
    where = repr(str(file))
    recorded = metadata.get("base_model")
    common = dict(params={k: v for k, v in tensors.items() if k in metadata["parameters"]},
                  base_model=recorded.get("name_or_path") if isinstance(recorded, dict) else None,
                  modules_to_save=tuple(r["name"] for r in metadata.get("modules_to_save", [])), origin=where,
                  file=file)
    # a method whose files carry per-layer state beside the tensors (GLoRA's layer configs) exports layer by
    # layer; any other makes a SuperLoRA plan of its config
    layered = by_name(metadata["method"]).file_state is not None
    return (_layered_file if layered else _plan_file)(metadata, where, common)


def _layered_file(metadata: dict[str, Any], where: str, common: dict[str, Any]) -> Source:
    """A GLoRA file's source: its layer configs (the largest choice where none is recorded)."""
    config: GLoRAConfig = metadata["config"]
    targets = [Target(r["name"], layer_of(r["kind"], ()), tuple(r["shape"]), tuple(r["shape"]),
                      has_bias=r["has_bias"]) for r in metadata["targets"]]
    raw = metadata.get("configs")
    try:
        if raw is None:
            choices = tuple(largest_choice(config, has_bias=t.has_bias).resolve(config.rank) for t in targets)
        else:
            if not isinstance(raw, list) or len(raw) != len(targets):
                raise ValueError(f"configs must be null or one per target, got {raw!r:.80}")
            choices = tuple(LayerChoice.from_dict(c).resolve(config.rank) for c in raw)
    except (TypeError, ValueError) as error:
        raise AdapterFileError(f"{where}: unreadable GLoRA layer configs ({error})") from None
    expected = {}
    for t in targets:
        for k, shape in algebra.parameter_shapes(*t.shape, config.rank, has_bias=t.has_bias).items():
            expected[f"{t.name}.{k}"] = tuple(shape)
    if {k: tuple(v.shape) for k, v in common["params"].items()} != expected:
        raise AdapterFileError(f"{where}: the stored tensors do not match the GLoRA layers its config makes")
    return Source(metadata["method"], targets, glora=config, choices=choices, **common)


def _plan_file(metadata: dict[str, Any], where: str, common: dict[str, Any]) -> Source:
    """A SuperLoRA file's source: the plan its config makes on the recorded targets."""
    config: SuperLoRAConfig = metadata["config"]
    records = metadata["targets"]
    targets = [Target(r["name"], layer_of(r["kind"], r["weight_shape"]), tuple(r["shape"]),
                      tuple(r["weight_shape"])) for r in records]
    names = [r["name"] for r in records]
    params = common["params"]
    try:
        try:
            plan = SuperLoRA(config, [t.shape for t in targets], names, generator=metadata.get("generator_id"))
        except TypeError:  # a generator id the plan does not take as a keyword
            plan = SuperLoRA(config, [t.shape for t in targets], names)
        expected = plan.parameter_shapes()
    except (ValueError, TypeError, OverflowError) as error:
        raise AdapterFileError(f"{where}: its config does not fit the targets ({error})") from None
    if set(expected) != set(params) or any(tuple(params[k].shape) != tuple(s) for k, s in expected.items()):
        raise AdapterFileError(f"{where}: the stored parameters do not match the plan their config makes")
    return Source(metadata["method"], targets, plan=plan, **common)
