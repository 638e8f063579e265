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

from .container import container_of, install_save_hook, is_transformers_model, remove_save_hook, save_pretrained
from .files.layout import ADAPTER_FILE, CONFIG_FILE, LIBRARY, AdapterFileError, adapter_subfolders
from .files.read import parse_metadata
from .methods import check_file, of_adapter

__all__ = ["holds_adapter", "install_save_hook", "is_transformers_model", "load_checkpoint", "remove_save_hook",
           "save_pretrained", "use_adapter_checkpoints"]


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
        method = of_adapter(adapter)
        plans.append((adapter, tensors, None if method.file_state is None else method.file_state(metadata)))
    stateful = [(adapter, of_adapter(adapter), state) for adapter, _, state in plans
                if of_adapter(adapter).restore_state is not None]
    previous = [(adapter, method, method.state(adapter)) for adapter, method, _ in stateful]
    try:  # a method's extra state first (GLoRA's per-layer configs): validated, undone if one is refused
        for adapter, method, state in stateful:
            method.restore_state(adapter, state)
    except (TypeError, ValueError, KeyError) as error:
        for adapter, method_, state in previous:
            method_.restore_state(adapter, state)
        raise AdapterFileError(f"{str(folder)!r}: the {method.state_label} are invalid ({error})") from None
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
