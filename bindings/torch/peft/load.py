""":func:`import_peft`: a PEFT LoRA, LoKr, LoHa or GLoRA folder attached as the equivalent
tensoradapt adapter, every check made before the model is touched."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..api import attach
from ..files.layout import AdapterFileError
from ..files.read import load_tensors
from ..lifecycle import BaseAdapter
from ..modules import forward_kind, plain_named_modules, weight_view
from .codecs import CODECS
from .config import read_config
from .folder import read_entries


def _found_modules(model: nn.Module, entries: dict, peft_type: str, where: str) -> list[tuple[str, nn.Module]]:
    """The model's modules the folder adapts (``named_modules`` order), each one tensoradapt adapts
    with PEFT's outputs."""
    modules = dict(plain_named_modules(model))
    missing = [m for m in entries if m not in modules]
    if missing:
        raise AdapterFileError(f"{where} adapts modules the model does not have: {missing[:5]}")
    found = [(n, m) for n, m in plain_named_modules(model) if n in entries]
    for n, m in found:
        try:
            kind = forward_kind(n, m)
        except TypeError as error:
            raise AdapterFileError(f"{where}: {error}") from None
        if kind == "conv" and peft_type == "LORA" and (m.groups != 1 or any(d != 1 for d in m.dilation)):
            raise AdapterFileError(f"{where}: PEFT's LoRA on conv {n!r} (groups={m.groups}, dilation={m.dilation}) "
                                   "runs lora_A without the layer's groups and dilation; no tensoradapt adapter "
                                   "reproduces its outputs")
        if kind == "conv" and m.padding_mode != "zeros":
            raise AdapterFileError(f"{where}: PEFT computes the update of conv {n!r} with zero padding, not its "
                                   f"padding_mode={m.padding_mode!r}; no tensoradapt adapter reproduces it")
    return found


def import_peft(model: nn.Module, folder: str | os.PathLike[str], *, name: str = "default",
                freeze_base: bool = True) -> BaseAdapter:
    """Attach the PEFT LoRA, LoKr, LoHa or GLoRA adapter in ``folder`` to ``model`` as the equivalent
    tensoradapt adapter (trainable, savable with ``adapter.save``).

    The outputs equal ``peft.PeftModel.from_pretrained(model, folder)``'s (up to float rounding):
    LoRA becomes ``presets.lora(r, lora_alpha)`` (``use_rslora``: scale ``α/√r``), LoKr
    ``presets.lokr`` with PEFT's factorisation and ``α/r`` scale, LoHa ``presets.loha(r, alpha)``,
    GLoRA a :class:`~tensoradapt.GLoRAConfig` of rank ``r`` with PEFT's forms fixed on every layer.

    Parameters
    ----------
    model : nn.Module
        The base model (the one PEFT adapted; module names as PEFT's ``base_model.model.<name>``).
    folder : path
        A PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
    name : str
        The adapter's name on the model.
    freeze_base : bool
        As in :func:`tensoradapt.torch.attach`.

    Raises
    ------
    FileNotFoundError
        A file is missing.
    AdapterFileError
        The folder is malformed, or holds what no tensoradapt adapter represents exactly (LoKr
        modules of different ranks, DoRA, trained biases, lora biases, effective-conv LoKr/LoHa,
        modules_to_save, unsupported modules…); the model is not changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a path, got {type(folder).__name__}")
    folder = Path(folder)
    options = read_config(folder)
    codec = CODECS[options["peft_type"]]
    path, entries = read_entries(folder, codec.PEFT_TYPE, codec.SUFFIXES)
    where = repr(str(path))
    found = _found_modules(model, entries, codec.PEFT_TYPE, where)
    views = [weight_view(n, m) for n, m in found]
    decoded = codec.decode(options, entries, found, views, where)
    tensors = load_tensors(path)
    wanted = {n for n, _ in found}
    try:
        adapter = attach(model, decoded.config, lambda n, m: n in wanted, name=name, freeze_base=freeze_base)
    except (TypeError, ValueError) as error:  # e.g. a tied weight: refused before anything is installed
        raise AdapterFileError(f"{where}: {error}") from None
    try:
        decoded.fill(adapter, tensors)
    except BaseException:
        adapter.detach()
        raise
    return adapter
