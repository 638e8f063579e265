""":func:`export_lycoris`: an adapter as one LyCORIS / kohya ``.safetensors`` file, LoRA, LoKr and LoHa
targets natively (their codecs), any other target as the LoRA/LoCon of its truncated SVD."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from tensoradapt._safetensors import SafetensorsHeaderError, read_header
from tensoradapt._version import __version__
from tensoradapt.superlora.forms import exact_form, low_rank_pair

from ..files.layout import LIBRARY
from ..files.write import canonical_header, write_bytes
from ..lifecycle import BaseAdapter
from ..peft import svd as peft_svd
from ..peft.export import check_rank
from ..peft.source import Source, file_source, live_source
from . import svd
from .codecs import CODECS
from .names import check_prefix, kohya_names


@dataclass(frozen=True)
class LycorisExport:
    """What :func:`export_lycoris` wrote.

    Attributes
    ----------
    path : Path
        The ``.safetensors`` file.
    keys : dict of str to str
        Each target's kohya name (the key prefix of its tensors).
    algorithms : dict of str to str
        Each target's LyCORIS algorithm: ``"lora"`` (``"locon"`` on a convolution), ``"lokr"`` or
        ``"loha"``.
    ranks : dict of str to int
        Each target's rank (0 for a LoKr whose two blocks are full).
    errors : dict of str to float
        Each target's relative error ``‖ΔW − ΔW_file‖_F / ‖ΔW‖_F`` (0.0 when written exactly; for
        GLoRA the bias update, which a kohya file cannot hold, counts as error too).
    """

    path: Path
    keys: Mapping[str, str] = field(default_factory=dict)
    algorithms: Mapping[str, str] = field(default_factory=dict)
    ranks: Mapping[str, int] = field(default_factory=dict)
    errors: Mapping[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        width = max([len("target"), *(len(n) for n in self.keys)])
        worst = max(self.errors.values(), default=0.0)
        lines = [f"LyCORIS file {str(self.path)!r}: {len(self.keys)} targets, largest relative error {worst:.3e}",
                 f"{'target':<{width}}  {'algo':>5}  {'rank':>5}  {'rel. error':>10}"]
        for name in self.keys:
            lines.append(f"{name:<{width}}  {self.algorithms[name]:>5}  {self.ranks[name]:>5}  "
                         f"{self.errors.get(name, 0.0):>10.3e}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- checks
def _check_path(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a path, got {type(path).__name__}")
    out = Path(path)
    if out.suffix != ".safetensors":
        raise ValueError(f"path must end in .safetensors, got {str(out)!r}")
    if out.is_dir():
        raise ValueError(f"path {str(out)!r} is a folder; pass the file to write")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"folder {str(out.parent)!r} does not exist")
    try:
        ours = out.is_file() and LIBRARY in read_header(out).metadata
    except (OSError, SafetensorsHeaderError):
        ours = False
    if ours:
        raise ValueError(f"{str(out)!r} holds a tensoradapt adapter; export_lycoris would overwrite it: write the "
                         "LyCORIS file elsewhere")
    return out


def _source_of(adapter: Any) -> Source:
    if isinstance(adapter, BaseAdapter):
        if adapter.attached and adapter.merged:
            warnings.warn("exporting a merged adapter: the file holds ΔW for the unmerged base weights; load it onto "
                          "the original base model, not this one (whose weights already hold ΔW)", UserWarning,
                          stacklevel=3)
        elif adapter.merged_into_model:
            warnings.warn("exporting an adapter detached by merge_and_detach(): the file holds ΔW for the original "
                          "base weights; that model's weights already hold it", UserWarning, stacklevel=3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its warnings speak of PEFT folders; ours are above
            return live_source(adapter)
    if isinstance(adapter, (str, os.PathLike)):
        source = file_source(adapter)
        source.params = {k: v.to("cpu") for k, v in source.params.items()}
        return source
    raise TypeError(f"adapter must be a tensoradapt adapter or the path of an adapter file, got "
                    f"{type(adapter).__name__}")


def _check_targets(source: Source, rank: int | str | None) -> None:
    if isinstance(rank, int):
        for target in source.targets:
            if rank > min(target.shape):
                smallest = min(min(t.shape) for t in source.targets)
                raise ValueError(f"rank={rank} exceeds min(o, n) = {min(target.shape)} of target {target.name!r} "
                                 f"(o, n) = {target.shape}; pass a rank <= {smallest} (the smallest min(o, n) "
                                 "of all targets) or 'exact'")
    if source.modules_to_save:
        raise ValueError(f"{source.origin} trains modules_to_save {list(source.modules_to_save)[:3]} in full; a "
                         "kohya file holds the targets' updates only and would drop them: attach without "
                         "modules_to_save to export it")
    for target in source.targets:
        if target.layer not in ("linear", "conv"):
            what = "a transformers Conv1D" if target.layer == "conv1d" else "an nn.Embedding"
            raise ValueError(f"target {target.name!r} is {what}; LyCORIS and kohya files adapt nn.Linear and "
                             "nn.Conv1d/2d/3d layers only: exclude it")
        module = target.module
        if target.layer == "conv" and module is not None and getattr(module, "padding_mode", "zeros") != "zeros":
            raise ValueError(f"target {target.name!r} pads with padding_mode={module.padding_mode!r}, but LyCORIS "
                             "and ComfyUI run a convolution's update with zero padding: the outputs would differ")


# ---------------------------------------------------------------------------------- entries
def _native(source: Source, i: int) -> tuple[str, dict[str, torch.Tensor], int] | None:
    """``(algorithm, tensors, rank)`` of target ``i`` written exactly, None when it has no LyCORIS form."""
    form = exact_form(source.plan, i)
    if form.kind is None:
        return None
    with torch.no_grad():
        pairs = [low_rank_pair(b, source.params) if not b.dense else None for b in form.blocks]
    return CODECS[form.kind].encode(source, source.targets[i], form, pairs)


def _entries(adapter: Any, source: Source, rank: int | str | None) -> dict[int, tuple]:
    """``{target: (algorithm, tensors, rank, error)}``: native forms first (``rank=None``), SVDs after."""
    if source.plan is None:  # GLoRA: W0 ⊙ A + B needs the base weights
        return svd.layer_entries(adapter, source, "exact" if rank is None else rank)
    entries: dict[int, tuple] = {}
    if rank is None:
        for i in range(len(source.targets)):
            native = _native(source, i)
            if native is not None:
                entries[i] = (*native, 0.0)
    todo = [i for i in range(len(source.targets)) if i not in entries]
    if todo:
        entries.update(svd.plan_entries(source, todo, "exact" if rank is None else rank))
    return entries


def export_lycoris(adapter: BaseAdapter | str | os.PathLike[str], path: str | os.PathLike[str],
                   rank: int | Literal["exact"] | None = None, prefix: str | None = None) -> LycorisExport:
    """Write an adapter as one LyCORIS / kohya ``.safetensors`` file (ComfyUI, LyCORIS, kohya-ss,
    diffusers' ``load_lora_weights`` for LoRA/LoCon).

    Parameters
    ----------
    adapter : SuperLoRAAdapter, GLoRAAdapter or path
        An adapter, or one of our adapter files (rebuilt from its metadata; names then get the
        ``"lora_unet"`` prefix unless ``prefix`` is given).
    path : path
        The ``.safetensors`` file, replaced atomically (a tensoradapt adapter file is refused).
    rank : None, int or "exact"
        ``None``: LoRA, LoKr and LoHa targets natively (exact: LoRA/LoCon, LoKr in LyCORIS's block
        layout, LoHa), every other target as the LoRA/LoCon of smallest rank within
        :data:`tensoradapt.torch.peft.svd.EXACT_TOLERANCE` (``"exact"``).  ``r`` or ``"exact"``:
        every target as a LoRA/LoCon of its truncated SVD (rank ``r``, or the smallest exact one).
    prefix : str, optional
        The key prefix of every target (``"lora_unet"``, ``"lora_te1"``, …).  Default: per model,
        :func:`kohya_names` (``lora_unet`` for a UNet, ``lora_transformer`` for a diffusers DiT,
        ``lora_te`` for a text encoder; a model of pipeline components by component).

    Returns
    -------
    LycorisExport
        The file, each target's kohya name, algorithm, rank and relative error.

    Raises
    ------
    TypeError, ValueError
        A bad argument, a target kohya files cannot adapt (embeddings, transformers' Conv1D,
        non-zero padding modes), ``modules_to_save``, or two modules of one kohya name.
    AdapterFileError, FileNotFoundError
        ``adapter`` is not a readable adapter file, or the output folder is missing.

    Notes
    -----
    The safetensors metadata records ``tensoradapt_version``, ``tensoradapt_method`` and
    ``tensoradapt_config`` (the adapter's config as JSON) and ``tensoradapt_targets`` (each
    target's key, algorithm, rank and error); ``ss_network_module`` is ``"lycoris.kohya"``.  The
    file holds ``ΔW`` for the unmerged base weights.  ``alpha`` is float32 (``α/r`` equals the
    adapter's scale to float32 rounding, exactly when the config sets ``alpha``).
    """
    rank = check_rank(rank)
    prefix = check_prefix(prefix)
    out = _check_path(path)
    source = _source_of(adapter)
    _check_targets(source, rank)
    keys = kohya_names(source.model, [t.name for t in source.targets], prefix)
    with peft_svd.svd_threads(source):  # small SVDs on the CPU run on one torch thread, as in export_peft
        entries = _entries(adapter, source, rank)
    tensors: dict[str, torch.Tensor] = {}
    for i, target in enumerate(source.targets):
        for suffix, value in entries[i][1].items():
            tensors[f"{keys[target.name]}.{suffix}"] = value
    names = [t.name for t in source.targets]
    result = LycorisExport(out, {n: keys[n] for n in names}, {n: entries[i][0] for i, n in enumerate(names)},
                           {n: int(entries[i][2]) for i, n in enumerate(names)},
                           {n: float(entries[i][3]) for i, n in enumerate(names)})
    _write(out, tensors, _metadata(source, result, rank))
    return result


def _metadata(source: Source, result: LycorisExport, rank: Any) -> dict[str, str]:
    config = source.plan.config if source.plan is not None else source.glora
    records = [{"name": n, "key": result.keys[n], "algo": result.algorithms[n], "rank": result.ranks[n],
                "error": result.errors[n]} for n in result.keys]
    return {"format": "pt", "ss_network_module": "lycoris.kohya", "tensoradapt_version": __version__,
            "tensoradapt_method": source.method,
            "tensoradapt_config": json.dumps(config.to_dict(), sort_keys=True, allow_nan=False),
            "tensoradapt_export_rank": json.dumps(rank),
            "tensoradapt_targets": json.dumps(records, allow_nan=False),
            "tensoradapt_tolerance": repr(peft_svd.EXACT_TOLERANCE)}


def _write(out: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    import safetensors.torch

    host = {k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())}
    write_bytes(out, canonical_header(safetensors.torch.save(host, metadata=metadata)))
