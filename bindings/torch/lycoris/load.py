""":func:`import_lycoris`: a LyCORIS / kohya ``.safetensors`` file attached as the equivalent
tensoradapt adapter(s).

Every check runs before the model is touched (:mod:`.reader`, then each module's shapes by its
codec, then the tensoradapt plan they make); any failure is an
:class:`~tensoradapt.torch.AdapterFileError` naming the file, with the model bit-identical.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from tensoradapt import SuperLoRA, SuperLoRAConfig
from tensoradapt.superlora.plan import param_name

from ..api import attach
from ..container import container_of
from ..files.layout import AdapterFileError
from ..lifecycle import BaseAdapter
from . import lokr, lora
from .codecs import ALGORITHMS, CODECS
from .entry import KIND_NAMES, Entry
from .names import check_prefix, name_table
from .reader import read_entries, read_values, resolve


def _values(items: list[Entry], plan: SuperLoRA) -> dict[str, torch.Tensor]:
    """``{parameter name: value}`` of the plan: each module's tensors in tensoradapt's layout, padded
    to the plan's rank, the file's scale over the plan's folded into the first factor."""
    out: dict[str, torch.Tensor] = {}
    for g, (item, group) in enumerate(zip(items, plan.groups, strict=True)):
        fold = item.scale() / float(group.scale)
        if item.algo == "lokr":
            out.update(lokr.values(item, g, group, fold))
            continue
        rank = group.splits[0].ranks[0]
        for k, (left, right) in enumerate(CODECS[item.algo].pairs(item), start=1):
            left = left.to(torch.float64) * (fold if k == 1 else 1.0)
            pad = rank - left.shape[1]
            out[param_name(g, k, "factor0")] = nn.functional.pad(left, (0, pad)) if pad else left
            out[param_name(g, k, "factor1")] = nn.functional.pad(right, (0, pad)) if pad else right
    return out


def _prepare(model: nn.Module, file: Path, where: str,
             prefix: str | None) -> list[tuple[str, SuperLoRAConfig, list[Entry], dict[str, torch.Tensor]]]:
    """Every check, then per algorithm ``(algorithm, config, modules, {parameter name: value})``,
    the algorithm of most modules first; the model is only read."""
    entries = read_entries(file, where, prefix)
    items = resolve(model, entries, name_table(model, prefix), where)
    for item in items:
        CODECS[item.algo].check(item, where)
    read_values(file, items, where)
    counts = {a: sum(i.algo == a for i in items) for a in ALGORITHMS}
    groups = []
    for algo in sorted((a for a in ALGORITHMS if counts[a]), key=lambda a: -counts[a]):
        members = [i for i in items if i.algo == algo]
        cfg = lokr.config(members, where) if algo == "lokr" else lora.config(members)
        try:
            plan = SuperLoRA(cfg, [i.view.shape for i in members], [i.name for i in members])
        except (TypeError, ValueError, OverflowError) as error:
            raise AdapterFileError(f"{where}: its {KIND_NAMES[algo]} modules make no tensoradapt plan "
                                   f"({error})") from None
        values = _values(members, plan)
        expected = {k: tuple(s) for k, s in plan.parameter_shapes().items()}
        if {k: tuple(v.shape) for k, v in values.items()} != expected:  # pragma: no cover - ruled out above
            raise AdapterFileError(f"{where}: the tensors do not fit the tensoradapt plan they make")
        groups.append((algo, cfg, members, values))
    return groups


def import_lycoris(model: nn.Module, path: str | os.PathLike[str], *, prefix: str | None = None,
                   name: str = "default", freeze_base: bool = True) -> BaseAdapter:
    """Attach the LoRA/LoCon, LoKr or LoHa adapter of a LyCORIS / kohya ``.safetensors`` file to
    ``model`` as the equivalent tensoradapt adapter (trainable, savable with ``adapter.save``).

    The outputs equal LyCORIS's own (``lycoris.kohya.create_network_from_weights`` applied to the
    model) up to float rounding: LoRA/LoCon becomes ``presets.lora``, LoHa ``presets.loha``, LoKr
    the ``presets.lokr``-style config of the file's block layout, each with LyCORIS's scale ``α/r``
    (a missing ``alpha`` or ``α = 0`` is ``α = r``; two full LoKr blocks scale 1).  Modules of
    different ranks become one adapter of the largest rank (zero-padded) and different scales are
    folded into the first factor.  A file of several algorithms (e.g. LoKr blocks beside the exact
    LoCon :func:`export_lycoris` writes for convolutions LyCORIS lays out otherwise) attaches one
    adapter per algorithm on disjoint modules, all active: ``name`` for the algorithm of most
    modules, ``f"{name}_{algo}"`` (``algo`` one of ``lora``, ``lokr``, ``loha``) for each other.

    Parameters
    ----------
    model : nn.Module
        The base model; a kohya name is ``<prefix>_<module path with . → _>`` for any prefix of
        :data:`tensoradapt.torch.lycoris.KOHYA_PREFIXES` (or per pipeline component for a model
        holding ``unet`` / ``transformer`` / ``text_encoder…`` children).
    path : path
        The ``.safetensors`` file.
    prefix : str, optional
        Read only the keys under this prefix (``"lora_unet"``: the UNet part of a file that also
        adapts text encoders); default: every key, each of which must name a module of ``model``.
    name : str
        The adapter's name on the model.
    freeze_base : bool
        As in :func:`tensoradapt.torch.attach`.

    Returns
    -------
    SuperLoRAAdapter
        The adapter ``name`` (``model.tensoradapt.names`` lists the others of a mixed file).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    RuntimeError
        An adapter name the import needs is taken on the model.
    AdapterFileError
        A corrupted file; a key of no module, an unknown or unsupported tensor (Tucker cores, DoRA,
        full/IA3/OFT/GLoRA modules), an incomplete module, one module of two algorithms, a non-float
        dtype, a shape that does not fit its module, a NaN or infinite value, or a LoKr layout no
        tensoradapt LoKr has.  The model is not changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a path, got {type(path).__name__}")
    prefix = check_prefix(prefix)
    file = Path(path)
    where = repr(str(file))
    if not file.exists():
        raise FileNotFoundError(f"no LyCORIS file at {str(file)!r}")
    groups = _prepare(model, file, where, prefix)
    names = [name] + [f"{name}_{algo}" for algo, *_ in groups[1:]]
    container = container_of(model)
    taken = [n for n in names if container is not None and n in container]
    if taken:
        raise RuntimeError(f"the model already has an adapter named {taken[0]!r} (this file needs the names "
                           f"{names}); import under another name= or detach it first")
    return _attach(model, groups, names, where, freeze_base)


def _attach(model: nn.Module, groups: list[tuple], names: list[str], where: str, freeze_base: bool) -> BaseAdapter:
    """Attach one adapter per group and copy its values in; on any failure detach them all."""
    attached: list[BaseAdapter] = []
    try:
        for adapter_name, (_, cfg, items, values) in zip(names, groups, strict=True):
            wanted = {i.name for i in items}
            try:
                adapter = attach(model, cfg, lambda n, m, wanted=wanted: n in wanted, name=adapter_name,
                                 freeze_base=freeze_base)
            except (TypeError, ValueError) as error:  # e.g. a tied weight: refused before anything is installed
                raise AdapterFileError(f"{where}: {error}") from None
            attached.append(adapter)
            with torch.no_grad():
                for pname, value in values.items():
                    adapter.params[pname.replace(".", "__")].copy_(value)
    except BaseException:
        for adapter in reversed(attached):
            adapter.detach()
        raise
    return attached[0]
