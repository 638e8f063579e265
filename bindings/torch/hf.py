"""Hugging Face integration: ``model.save_pretrained`` and ``transformers.Trainer`` checkpoints.

Attaching an adapter to a transformers ``PreTrainedModel`` puts an instance attribute
``save_pretrained`` on the model (removed when the last adapter is detached or merged away), so
``model.save_pretrained(folder)`` - and so ``Trainer.save_model()`` and every ``Trainer`` checkpoint
- writes the **adapter folder only**, as transformers does for its own PEFT integration: the
adapter ``"default"`` at the folder's root, every other adapter in ``folder/<name>/`` (PEFT's
layout), each folder holding ``adapter_model.safetensors``, ``adapter_config.json`` and
``README.md``.  :func:`use_adapter_checkpoints` is the one line that lets a ``Trainer`` read such
checkpoints back (``resume_from_checkpoint``, ``load_best_model_at_end``).

transformers is never imported here: the hooks recognise a ``PreTrainedModel`` by its class
hierarchy, and :func:`use_adapter_checkpoints` only patches the trainer it is given.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

import tensoradapt._safetensors as header

from ._io import CONFIG_FILE, LIBRARY, AdapterFileError, adapter_subfolders, check_file, parse_metadata
from ._shared import ADAPTER_FILE, container_of, fsdp_sharded
from .glora import GLoRAAdapter

__all__ = ["is_transformers_model", "load_checkpoint", "save_pretrained", "use_adapter_checkpoints"]

#: ``transformers.PreTrainedModel.save_pretrained`` keywords accepted (and what they may be) by the hook.
_ACCEPTED = {"max_shard_size", "token", "save_peft_format", "save_original_format", "variant",
             "distributed_checkpoint", "commit_message", "repo_id", "create_pr", "private"}


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


def _unwrap(model: nn.Module) -> nn.Module:
    """``model`` without DataParallel / DDP / compile wrappers (the module holding the adapters)."""
    seen = 0
    while container_of(model) is None and seen < 8:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model, seen = inner, seen + 1
    return model


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


#: Metadata fields a checkpoint's adapter must share with the attached one to be restored into it.
_SAME = ("method", "config", "targets", "parameters", "param_dtype", "seed", "generator_id", "modules_to_save")


def load_checkpoint(model: nn.Module, folder: str | os.PathLike[str]) -> tuple[str, ...]:
    """Copy the adapters saved in ``folder`` (by ``model.save_pretrained``: ``"default"`` at the
    root, others in ``folder/<name>/``) into the adapters attached to ``model``, **in place** (the
    same parameter objects, so an optimiser keeps working); return the names restored.

    Every check of :func:`tensoradapt.torch.load` is made on every file first, then that each file
    fits its attached adapter (same method, config, targets, parameter shapes and dtype, seed,
    generator, saved modules) and that the folder holds an adapter for every attached one and no
    other; only then is anything written.  GLoRA's fixed per-layer configs are restored too.

    Raises
    ------
    RuntimeError
        ``model`` has no adapter attached, or one is merged.
    FileNotFoundError, AdapterFileError
        A file is missing, corrupted, or does not fit the attached adapter; the model is unchanged.
    """
    model = _unwrap(model)
    container = container_of(model)
    if container is None:
        raise RuntimeError(f"{type(model).__name__} has no tensoradapt adapter attached: attach the same adapters "
                           "first, or load the folder onto a fresh base with tensoradapt.torch.load")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no adapter folder at {str(folder)!r}")
    names = container.names
    present = adapter_subfolders(folder)
    unknown = [n for n in present if n not in names]
    if unknown:
        raise AdapterFileError(f"{str(folder)!r} holds adapters {unknown[:5]} that the model does not have attached "
                               f"(it has {list(names)})")
    plans = []
    for adapter in container.adapters():
        name = adapter.adapter_name
        if adapter.merged:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge it before loading a checkpoint into it")
        if name != "default" and name not in present:
            raise FileNotFoundError(f"no adapter file at {str(folder / name / ADAPTER_FILE)!r} for the attached "
                                    f"adapter {name!r}")
        file, tensors, metadata = check_file(folder, name=name)
        theirs = dict(metadata)
        theirs["config"] = metadata["config"].to_dict()
        mine = adapter.file_metadata()
        differ = [k for k in _SAME if _canonical(theirs.get(k)) != _canonical(mine.get(k))]
        if differ:
            raise AdapterFileError(f"{str(file)!r} does not fit the attached adapter {name!r}: they differ in "
                                   f"{differ} (attach the adapter the checkpoint was trained with)")
        plans.append((adapter, tensors, metadata.get("configs") if isinstance(adapter, GLoRAAdapter) else None))
    previous = [(adapter, adapter.configs) for adapter, _, _ in plans if isinstance(adapter, GLoRAAdapter)]
    try:  # GLoRA's per-layer configs first: validated by set_configs, undone if one is refused
        for adapter, _, configs in plans:
            if isinstance(adapter, GLoRAAdapter):
                adapter.set_configs(configs)
    except (TypeError, ValueError, KeyError) as error:
        for adapter, configs in previous:
            adapter.set_configs(configs)
        raise AdapterFileError(f"{str(folder)!r}: the per-layer configs of a GLoRA adapter are invalid "
                               f"({error})") from None
    for adapter, tensors, _ in plans:
        adapter.copy_tensors(tensors)
    return names


def holds_adapter(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is a tensoradapt adapter folder (its adapter file carries tensoradapt
    metadata, or its ``adapter_config.json`` says ``"library": "tensoradapt"``), at the root or in
    a named subfolder.  Never raises for a folder of another kind."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    for place in [folder, *(folder / n for n in adapter_subfolders(folder))]:
        config = place / CONFIG_FILE
        try:
            if config.is_file() and config.stat().st_size < 1 << 20 \
                    and parse_metadata(config.read_text(encoding="utf-8"), repr(str(config)),
                                       what="JSON").get("library") == LIBRARY:
                return True
        except (OSError, ValueError, AttributeError):  # AdapterFileError (strict JSON) and bad UTF-8 are ValueErrors
            pass
        file = place / ADAPTER_FILE
        try:
            if file.is_file() and LIBRARY in (header.read_header(file).header.get(header.METADATA_KEY) or {}):
                return True
        except (OSError, header.SafetensorsHeaderError):
            pass
    return False


def use_adapter_checkpoints(trainer: Any) -> Any:
    """Let a ``transformers.Trainer`` read back the adapter-only checkpoints an adapted model writes.

    An adapted model's ``save_pretrained`` writes only the adapter folder, so ``Trainer``
    checkpoints are small; but ``Trainer`` reloads a checkpoint of a model that is not a
    ``peft.PeftModel`` as a full state dict, and fails on a folder without one.  After
    ``use_adapter_checkpoints(trainer)``, ``trainer.train(resume_from_checkpoint=...)`` and
    ``load_best_model_at_end`` copy the checkpoint's adapter tensors into the attached adapters in
    place (:func:`load_checkpoint`); the optimizer, scheduler, RNG and trainer state are restored
    by ``Trainer`` itself, so training continues where it stopped.  Folders that are not
    tensoradapt's go to ``Trainer``'s own loader.  Returns ``trainer``; calling it twice is harmless.

    ``trainer.train(resume_from_checkpoint=...)`` needs the same adapters attached to
    ``trainer.model`` as when the checkpoint was written (same config, targets, names).
    """
    if not callable(getattr(trainer, "_load_from_checkpoint", None)) \
            or not callable(getattr(trainer, "_load_best_model", None)):
        raise TypeError(f"use_adapter_checkpoints needs a transformers.Trainer, got {type(trainer).__name__}")
    if getattr(trainer, "_tensoradapt_checkpoints", False):
        return trainer
    load_from_checkpoint = trainer._load_from_checkpoint
    load_best_model = trainer._load_best_model

    def _load_from_checkpoint(resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if holds_adapter(resume_from_checkpoint):
            load_checkpoint(trainer.model if model is None else model, resume_from_checkpoint)
            return None
        return load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model() -> None:
        best = trainer.state.best_model_checkpoint
        if best is not None and holds_adapter(best):
            load_checkpoint(trainer.model, best)
            return None
        return load_best_model()

    trainer._load_from_checkpoint = _load_from_checkpoint
    trainer._load_best_model = _load_best_model
    trainer._tensoradapt_checkpoints = True
    return trainer
