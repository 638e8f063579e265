""":func:`export_peft`: a tensoradapt adapter (live or a file) as a PEFT adapter folder, through the
codec of its exact form, the GLoRA codec or the SVD export."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from tensoradapt._validate import is_int
from tensoradapt.superlora.forms import exact_forms

from ..lifecycle import BaseAdapter
from . import glora, loha, lokr, lora, svd
from .folder import check_output, sharded_mesh, write_folder, write_on_rank0
from .source import Source, file_source, live_source


@dataclass(frozen=True)
class PeftExport:
    """What :func:`export_peft` wrote.

    Attributes
    ----------
    folder : Path
        The PEFT adapter folder (``adapter_config.json``, ``adapter_model.safetensors``).
    peft_type : str
        ``"LORA"``, ``"LOKR"``, ``"LOHA"`` or ``"GLORA"``.
    ranks : dict of str to int
        Each target's PEFT rank ``r``.
    errors : dict of str to float
        Each target's relative Frobenius error ``‖ΔW − ΔW_exported‖_F / ‖ΔW‖_F`` (0.0 for exact
        exports and for a target whose ``ΔW`` is zero).
    """

    folder: Path
    peft_type: str
    ranks: Mapping[str, int] = field(default_factory=dict)
    errors: Mapping[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        width = max([len("target"), *(len(n) for n in self.ranks)])
        worst = max(self.errors.values(), default=0.0)
        lines = [f"PEFT {self.peft_type} adapter in {str(self.folder)!r}: {len(self.ranks)} targets, "
                 f"largest relative error {worst:.3e}",
                 f"{'target':<{width}}  {'rank':>6}  {'rel. error':>10}"]
        for name, r in self.ranks.items():
            lines.append(f"{name:<{width}}  {r:>6}  {self.errors.get(name, 0.0):>10.3e}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- arguments
def check_rank(rank: Any) -> int | str | None:
    """``rank`` of an SVD export checked: None, ``"exact"`` or a positive int."""
    if rank is None or (isinstance(rank, str) and rank == "exact"):
        return rank
    if isinstance(rank, bool) or not is_int(rank):
        raise TypeError(f"rank must be None, a positive integer or 'exact', got {type(rank).__name__} {rank!r:.40}")
    rank = int(rank)
    if rank < 1:
        raise ValueError(f"rank must be a positive integer or 'exact', got {rank}")
    return rank


def check_device(device: Any) -> torch.device:
    """The device a file's export computes on: ``device``, checked usable (a ``ValueError`` naming it
    otherwise), or CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r:.40} is not a torch device ({error})") from None
    if target.type == "meta":
        raise ValueError(f"device={device!r:.40}: a meta tensor holds no values, so there is no ΔW to export; pass a "
                         "real device (cpu, cuda)")
    backend = getattr(torch, target.type, None)
    if target.type != "cpu" and callable(getattr(backend, "is_available", None)) and not backend.is_available():
        raise ValueError(f"device={device!r:.40} is not available in this PyTorch ({torch.__version__}); pass "
                         "device='cpu'")
    try:
        torch.empty(1, device=target)
    except (RuntimeError, AssertionError, NotImplementedError) as error:
        raise ValueError(f"device={device!r:.40} cannot hold tensors here ({error})") from None
    return target


def _checked(rank: Any, progress: Any, base_model_name_or_path: Any, device: Any,
             folder: Any) -> tuple[int | str | None, torch.device]:
    rank = check_rank(rank)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {type(progress).__name__} {progress!r:.40}")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError("base_model_name_or_path must be a string or None, got "
                        f"{type(base_model_name_or_path).__name__}")
    target_device = check_device(device)
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a path, got {type(folder).__name__}")
    return rank, target_device


def _source(adapter_or_path: Any, folder: str | os.PathLike[str], device: torch.device) -> tuple[Source, Any]:
    """``(source, FSDP2 mesh or None)``; the output checked first unless a sharded rank-0 writes it."""
    mesh = None
    if isinstance(adapter_or_path, BaseAdapter):
        mesh = sharded_mesh(adapter_or_path)
        if mesh is None:
            check_output(folder)  # before the work; under FSDP2 the writing rank checks (write_on_rank0)
        return live_source(adapter_or_path), mesh
    if isinstance(adapter_or_path, (str, os.PathLike)):
        check_output(folder)
        source = file_source(adapter_or_path)
        source.params = {k: v.to(device) for k, v in source.params.items()}
        return source, mesh
    raise TypeError("adapter_or_path must be a tensoradapt adapter or the path of an adapter file or folder, "
                    f"got {type(adapter_or_path).__name__}")


# ---------------------------------------------------------------------------------- encoding
def _encode_exact(source: Source) -> tuple:
    """The exact export: every target in the one PEFT method of its exact form."""
    forms = exact_forms(source.plan)
    kinds = {f.kind for f in forms}
    hint = ("pass a rank (rank=r, or 'exact' for lossless to 1e-6; --rank on the command line) to export it as a "
            "PEFT LoRA of each target's truncated SVD")
    if None in kinds:
        i = next(i for i, f in enumerate(forms) if f.kind is None)
        raise ValueError(f"target {source.targets[i].name!r} of {source.origin} has no exact PEFT form: "
                         f"{forms[i].reason}; " + hint)
    if len(kinds) > 1:
        raise ValueError(f"the targets of {source.origin} mix {sorted(kinds)} structures, and one PEFT folder holds "
                         "one method; " + hint)
    kind = kinds.pop()
    if kind == "lora":
        return lora.encode(source, forms)
    if kind == "loha":
        return loha.encode(source, forms, hint)
    return lokr.encode(source, forms, hint)


def _encode(source: Source, rank: int | str | None, progress: bool) -> tuple:
    """``(peft_type, config, tensors, ranks, errors)`` of ``source``."""
    if source.modules_to_save:
        raise ValueError(f"{source.origin} trains modules_to_save {list(source.modules_to_save)[:3]} in full; "
                         "export_peft writes the targets' updates only and would drop those trained copies: "
                         "attach without modules_to_save to export to PEFT")
    if source.plan is None:  # GLoRA: W0 ⊙ A + B and its bias terms, exactly
        if rank is not None:
            raise ValueError(f"rank={rank!r} applies to SuperLoRA adapters; GLoRA's update W0 ⊙ A + B (and its bias "
                             "terms) is exported exactly as a PEFT GLoRA adapter: pass no rank (rank=None; no --rank "
                             "on the command line)")
        return glora.encode(source)
    if rank is None:
        return _encode_exact(source)
    return svd.encode(source, rank, progress)


def export_peft(adapter_or_path: BaseAdapter | str | os.PathLike[str], folder: str | os.PathLike[str], *,
                rank: int | Literal["exact"] | None = None, base_model_name_or_path: str | None = None,
                device: str | torch.device | None = None, progress: bool = True) -> PeftExport:
    """Write a tensoradapt adapter as a PEFT adapter folder.

    Parameters
    ----------
    adapter_or_path : SuperLoRAAdapter, GLoRAAdapter, or path
        An adapter, or one of our adapter files / ``save_pretrained`` folders (rebuilt from its
        metadata alone: target names, kinds and shapes; no model is needed).
    folder : path
        The output folder (created); its ``adapter_config.json`` and ``adapter_model.safetensors``
        are replaced, each atomically.  A folder holding a tensoradapt adapter file is refused.
    rank : None, int or "exact"
        ``None``: the exact export in the adapter's own PEFT method (LoRA, LoKr, LoHa, GLoRA),
        anything else refused (pass ``rank=``).  ``r`` (``1 <= r <= min(o, n)`` for every target):
        a PEFT LoRA of rank ``r`` holding each target's truncated SVD of ``ΔW``.  ``"exact"``: per
        target the smallest rank whose relative error is at most :data:`tensoradapt.torch.peft.svd.EXACT_TOLERANCE`
        (``rank_pattern``; scaling 1 everywhere).
    base_model_name_or_path : str, optional
        Written to the config (default: the model's ``config._name_or_path`` or what our folder
        records).
    device : str or torch.device, optional
        Where a file's ``ΔW`` and SVDs are computed (default: CUDA when available, else CPU); an
        adapter computes on its own device.  A device this PyTorch cannot use (``"cuda"`` without
        CUDA, ``"meta"``) is a ``ValueError``.
    progress : bool
        Draw a progress bar over the targets of a ``rank=r`` / ``"exact"`` export on stderr when
        stderr is a terminal and there are at least :data:`tensoradapt.torch.peft.svd.PROGRESS_MIN_TARGETS` targets
        (``False``: never).

    Returns
    -------
    PeftExport
        The same on every rank under FSDP2.

    Notes
    -----
    On a model sharded by FSDP2 (``fully_shard``) this is a **collective**, like ``adapter.save``:
    every rank of the mesh must call it (the shards are gathered); the rank at mesh coordinate 0
    checks the folder and writes it, and every rank then learns whether that succeeded (a failure
    raises on every rank, the writer's own error there, ``RuntimeError`` on the others).

    The folder holds ``ΔW`` for the *unmerged* base weights: exporting a merged (or detached)
    adapter warns, since loading the folder onto a model whose weights already hold ``ΔW`` would
    apply it twice.  For ``rank=r`` / ``"exact"``, ``ΔW`` is computed in float64 from the
    parameters, so a half-precision adapter's factors approximate its exact update (its own
    forward rounds ``ΔW`` to its dtype); they are written in float32.

    The SVD export takes time proportional to its targets' SVDs (``O(o n min(o, n))`` each): the
    28 projections of a 4-layer, 256-wide Llama take about half a second of SVDs on one CPU core,
    about a second for the whole export.  When every target has ``min(o, n) <=``
    :data:`tensoradapt.torch.peft.svd.ONE_THREAD_SVD_SIDE` and the work is on the CPU, the SVDs run on one torch thread
    (``torch.set_num_threads(1)`` for the call, restored after): small SVDs gain little from more
    threads and, on cores shared with other processes, lose many times over waiting for each other.

    Raises
    ------
    TypeError, ValueError
        A bad argument, or a configuration PEFT cannot express exactly (the message says what to pass).
    AdapterFileError, FileNotFoundError
        ``adapter_or_path`` is not a readable adapter.
    """
    rank, target_device = _checked(rank, progress, base_model_name_or_path, device, folder)
    source, mesh = _source(adapter_or_path, folder, target_device)
    peft_type, config, tensors, ranks, errors = _encode(source, rank, progress)
    config["base_model_name_or_path"] = base_model_name_or_path or source.base_model
    out = Path(folder)
    if mesh is None:
        write_folder(out, config, tensors)
    else:
        write_on_rank0(mesh, out, config, tensors)
    return PeftExport(out, peft_type, ranks, errors)
