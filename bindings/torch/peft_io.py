r"""PEFT adapter folders in and out, and any SuperLoRA adapter served as a PEFT LoRA.

:func:`export_peft` writes a folder that ``peft.PeftModel.from_pretrained(base, folder)`` loads
(``adapter_config.json`` + ``adapter_model.safetensors``, PEFT's key names
``base_model.model.<module>.<tensor>``); peft itself is not needed to write it.

* **Exact** (``rank=None``): the LoRA, LoKr and LoHa presets (and any SuperLoRA target whose
  ``ΔW = s·L R`` is a low-rank product of its own ``(o, n)`` shape, a Kronecker product of the
  LyCORIS factorisation, or a Hadamard product of two such products) and GLoRA, each in its own
  PEFT method, with PEFT's conventions where they differ from LyCORIS: PEFT's LoKr always scales
  by ``α/r`` (LyCORIS uses 1 when the second block is full) and factorises a dimension by a
  ``decompose_factor`` that divides it as ``(factor, dim/factor)`` unsorted.  Every scale is
  carried by ``lora_alpha``/``alpha`` (``alpha_pattern`` where targets differ), so PEFT's
  ``ΔW = (α/r)·…`` equals ours; what PEFT cannot express is refused with a message.
* **Rank-r** (``rank=r`` or ``"exact"``): any SuperLoRA adapter (LoRTA, LoNKr, LoTR, Fastfood,
  grouped, …) as a PEFT LoRA whose target ``i`` holds the best rank-``r`` approximation
  ``ΔW_r = U_r Σ_r V_rᵀ`` of ``ΔW_i`` (truncated SVD in float64 on the adapter's device, one target
  at a time; Eckart–Young: ``‖ΔW − ΔW_r‖_F² = Σ_{k>r} σ_k²``), written as
  ``lora_B = U_r Σ_r^{1/2}``, ``lora_A = Σ_r^{1/2} V_rᵀ`` with scaling ``α/r = 1``; the relative
  error ``‖ΔW − B A‖_F / ‖ΔW‖_F`` of what was written is reported per target.

:func:`import_peft` reads a PEFT LoRA, LoKr, LoHa or GLoRA folder into the equivalent tensoradapt
adapter (attached, trainable, savable with ``adapter.save``), refusing what it cannot represent
exactly.  ``rank_pattern`` / ``alpha_pattern`` are resolved per adapted module as PEFT does; a
LoRA or LoHa whose modules differ becomes one adapter of rank ``R = max r_i`` (smaller ranks
zero-padded, other scales folded into the first factor).  Nothing is unpickled; the JSON is
parsed strictly and every tensor shape is checked from the safetensors header before any tensor
is read.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from tensoradapt import GLoRAConfig, SuperLoRA, SuperLoRAConfig, presets
from tensoradapt._safetensors import SafetensorsHeaderError, read_header
from tensoradapt._validate import is_int
from tensoradapt.glora.config import LayerChoice, largest_choice
from tensoradapt.superlora.config import MAX_RANK
from tensoradapt.superlora.factorize import factorization
from tensoradapt.superlora.plan import SplitPlan, param_name

from ._io import LIBRARY, AdapterFileError, adapter_subfolders, check_file, parse_metadata, read_json_file, write_bytes
from ._shared import ADAPTER_FILE, MODULES_TO_SAVE_PREFIX, BaseAdapter, forward_kind, plain_named_modules

__all__ = ["EXACT_TOLERANCE", "ONE_THREAD_SVD_SIDE", "PEFT_CONFIG_FILE", "PROGRESS_MIN_TARGETS", "PeftExport",
           "export_peft", "import_peft"]

#: The relative Frobenius error ``rank="exact"`` allows per target.
EXACT_TOLERANCE = 1e-6
#: The config file of a PEFT adapter folder.
PEFT_CONFIG_FILE = "adapter_config.json"
#: Largest ``adapter_config.json`` :func:`import_peft` reads (PEFT's are a few KiB).
MAX_CONFIG_BYTES = 1 << 20
_PREFIX = "base_model.model."
_PEFT_TYPES = ("LORA", "LOKR", "LOHA", "GLORA")
_GLORA_FORMS = {"lora": "lora", "vector": "vector", "scalar": "constant", "none": "none"}


# ---------------------------------------------------------------------------------- result
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


# ---------------------------------------------------------------------------------- sources
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

    method: str  # "superlora" | "glora"
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


def _layer_of(kind: str, weight_shape: Sequence[int]) -> str:
    """The PEFT layer family of a target recorded as ``kind`` with ``weight_shape``."""
    if kind in ("linear", "quantized"):
        return "linear"
    if kind == "conv1d":
        return "conv1d"
    if kind in ("conv", "embedding"):
        return kind
    # kind "weight": the modules attach supports with such a weight are convolutions and embeddings
    return "embedding" if len(weight_shape) == 2 else "conv"


def _adapted_model(adapter: BaseAdapter) -> nn.Module | None:
    """The model ``adapter`` is attached to (None once detached: the export then knows the targets'
    kinds and shapes only, as from a file)."""
    return adapter.model if adapter.attached else None


def live_source(adapter: BaseAdapter) -> Source:
    """The export's view of a live adapter (its parameters gathered in full under FSDP2)."""
    from ._shared import gather_full  # FSDP2 (fully_shard): the full tensors (a collective)

    params = gather_full({name: p.detach() for name, p in adapter.named_trainable_parameters()
                          if not name.startswith(MODULES_TO_SAVE_PREFIX)})
    model = _adapted_model(adapter)
    if adapter.attached and adapter.merged:
        warnings.warn("exporting a merged adapter: the PEFT folder holds ΔW for the unmerged base weights; loading it "
                      "onto this model (whose weights already hold ΔW) would apply ΔW twice. Load it onto the "
                      "original base model", UserWarning, stacklevel=3)
    elif adapter.merged_into_model:
        warnings.warn("exporting an adapter detached by merge_and_detach(): the PEFT folder holds ΔW for the "
                      "unadapted base weights, and that model's weights already hold ΔW (loading the folder onto it "
                      "would apply ΔW twice): load it onto the original base model", UserWarning, stacklevel=3)
    base = None
    config = getattr(model, "config", None)
    for attr in ("_name_or_path", "name_or_path"):
        value = getattr(config, attr, None)
        if isinstance(value, str) and value:
            base = value
            break
    targets = []
    for i, name in enumerate(adapter.target_names):
        view = adapter.views[i]
        module = None
        if model is not None:
            module = model.get_submodule(name)
            if getattr(module, "is_tensoradapt_wrapper", False):
                module = module.base_layer
        kinds = getattr(adapter, "kinds", None)  # SuperLoRA: each target's forward kind
        layer = _layer_of(kinds[i] if kinds is not None else view.kind, view.weight_shape)
        has_bias = adapter.has_bias[i] if hasattr(adapter, "has_bias") else False
        targets.append(Target(name, layer, tuple(view.shape), tuple(view.weight_shape),
                               getattr(view, "padding_idx", None), module,
                               module is None or type(module) is nn.Linear, has_bias))
    common = dict(targets=targets, params=params, base_model=base, modules_to_save=tuple(adapter.modules_to_save),
                  origin=f"this {type(adapter).__name__}", model=model)
    if isinstance(getattr(adapter, "plan", None), SuperLoRA):
        return Source("superlora", plan=adapter.plan, **common)
    choices = adapter.inference_configs() if adapter.attached else None
    if adapter.attached and adapter.configs is None:
        warnings.warn("exporting a GLoRA supernet without fixed configs: every layer uses its largest choice (what "
                      "eval mode runs); call set_configs() or search() first to export a searched subnet",
                      UserWarning, stacklevel=3)
    if choices is None:
        choices = tuple(largest_choice(adapter.config, has_bias=b).resolve(adapter.config.rank)
                        for b in adapter.has_bias)
    return Source("glora", glora=adapter.config, choices=tuple(choices), **common)


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
    records = metadata["targets"]
    names = [r["name"] for r in records]
    saved = tuple(r["name"] for r in metadata.get("modules_to_save", []))
    params = {k: v for k, v in tensors.items() if k in metadata["parameters"]}
    recorded = metadata.get("base_model")
    base = recorded.get("name_or_path") if isinstance(recorded, dict) else None
    if metadata["method"] == "glora":
        config: GLoRAConfig = metadata["config"]
        targets = [Target(r["name"], _layer_of(r["kind"], ()), tuple(r["shape"]), tuple(r["shape"]),
                           has_bias=r["has_bias"]) for r in records]
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
        from tensoradapt.glora import algebra

        for t in targets:
            for k, shape in algebra.parameter_shapes(*t.shape, config.rank, has_bias=t.has_bias).items():
                expected[f"{t.name}.{k}"] = tuple(shape)
        if {k: tuple(v.shape) for k, v in params.items()} != expected:
            raise AdapterFileError(f"{where}: the stored tensors do not match the GLoRA layers its config makes")
        return Source("glora", targets, params, glora=config, choices=choices, base_model=base,
                       modules_to_save=saved, origin=where, file=file)
    config: SuperLoRAConfig = metadata["config"]  # type: ignore[no-redef]
    targets = [Target(r["name"], _layer_of(r["kind"], r["weight_shape"]), tuple(r["shape"]),
                       tuple(r["weight_shape"])) for r in records]
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
    return Source("superlora", targets, params, plan=plan, base_model=base, modules_to_save=saved, origin=where,
                   file=file)


# ---------------------------------------------------------------------------------- export
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
        target the smallest rank whose relative error is at most :data:`EXACT_TOLERANCE`
        (``rank_pattern``; scaling 1 everywhere).
    base_model_name_or_path : str, optional
        Written to the config (default: the model's ``config._name_or_path`` or what our folder
        records).
    device : str or torch.device, optional
        Where a file's ``ΔW`` and SVDs are computed (default: CUDA when available, else CPU);
        an adapter computes on its own device.  A device this PyTorch cannot use (``"cuda"`` without
        CUDA, ``"meta"``) is a ``ValueError``.
    progress : bool
        Draw a progress bar over the targets of a ``rank=r`` / ``"exact"`` export on stderr when
        stderr is a terminal and there are at least :data:`PROGRESS_MIN_TARGETS` targets
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
    about a second for the whole export.  When every
    target has ``min(o, n) <=`` :data:`ONE_THREAD_SVD_SIDE` and the work is on the CPU, the SVDs run
    on one torch thread (``torch.set_num_threads(1)`` for the duration of the call, restored
    after): small SVDs gain little from more threads and, on cores shared with other processes,
    lose many times over waiting for each other.

    Raises
    ------
    TypeError, ValueError
        A bad argument, or a configuration PEFT cannot express exactly (the message says what to pass).
    AdapterFileError, FileNotFoundError
        ``adapter_or_path`` is not a readable adapter.
    """
    rank = check_rank(rank)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {type(progress).__name__} {progress!r:.40}")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError("base_model_name_or_path must be a string or None, got "
                        f"{type(base_model_name_or_path).__name__}")
    target_device = _check_device(device)
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a path, got {type(folder).__name__}")
    mesh = None
    if isinstance(adapter_or_path, BaseAdapter):
        mesh = _sharded_mesh(adapter_or_path)
        if mesh is None:
            _check_output(folder)  # before the work; under FSDP2 the writing rank checks (below)
        source = live_source(adapter_or_path)
    elif isinstance(adapter_or_path, (str, os.PathLike)):
        _check_output(folder)
        source = file_source(adapter_or_path)
        source.params = {k: v.to(target_device) for k, v in source.params.items()}
    else:
        raise TypeError("adapter_or_path must be a tensoradapt adapter or the path of an adapter file or folder, "
                        f"got {type(adapter_or_path).__name__}")
    out = Path(folder)
    if source.modules_to_save:
        raise ValueError(f"{source.origin} trains modules_to_save {list(source.modules_to_save)[:3]} in full; "
                         "export_peft writes the targets' updates only and would drop those trained copies: "
                         "attach without modules_to_save to export to PEFT")
    if source.method == "glora":
        if rank is not None:
            raise ValueError(f"rank={rank!r} applies to SuperLoRA adapters; GLoRA's update W0 ⊙ A + B (and its bias "
                             "terms) is exported exactly as a PEFT GLoRA adapter: pass no rank (rank=None; no --rank "
                             "on the command line)")
        peft_type, config, tensors, ranks, errors = _export_glora(source)
    elif rank is None:
        peft_type, config, tensors, ranks, errors = _export_exact(source)
    else:
        peft_type, config, tensors, ranks, errors = _export_svd(source, rank, progress)
    config["base_model_name_or_path"] = base_model_name_or_path or source.base_model
    if mesh is None:
        _write_folder(out, config, tensors)
    else:
        _write_on_rank0(mesh, out, config, tensors)
    return PeftExport(out, peft_type, ranks, errors)


def _check_device(device: Any) -> torch.device:
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


def _sharded_mesh(adapter: BaseAdapter) -> Any:
    """The device mesh of ``adapter``'s parameters when FSDP2 (``fully_shard``) shards them, else None."""
    from ._shared import dtensor_type

    dtensor = dtensor_type()
    if dtensor is None:
        return None
    for _, p in adapter.named_trainable_parameters():
        if isinstance(p, dtensor):
            return p.device_mesh
    return None


def _write_on_rank0(mesh: Any, out: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """The rank at mesh coordinate 0 checks ``out`` and writes it; every rank then learns (one
    all-reduce per mesh dimension) whether that succeeded, so a failure raises on every rank
    instead of leaving the others waiting."""
    import torch.distributed as dist

    coordinate = mesh.get_coordinate()
    failure: BaseException | None = None
    if coordinate is not None and all(c == 0 for c in coordinate):
        try:
            _check_output(out)
            _write_folder(out, config, tensors)
        except BaseException as error:  # reported to the other ranks below, then raised here
            failure = error
    flag = torch.tensor([0 if failure is None else 1], dtype=torch.int32, device=mesh.device_type)
    for dim in range(mesh.ndim):
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
    if failure is not None:
        raise failure
    if int(flag.item()):
        raise RuntimeError(f"the rank writing the PEFT folder {str(out)!r} (mesh coordinate 0) failed; see its error")


def _check_output(folder: str | os.PathLike[str]) -> Path:
    """``folder`` as a Path, refused when it is a file or holds a tensoradapt adapter at its root (an
    adapter file whose header carries tensoradapt metadata, of any format version, or a config
    saying ``"library": "tensoradapt"``), which the PEFT files would replace."""
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise ValueError(f"folder {str(out)!r} exists and is not a folder")
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ValueError(f"folder {str(out)!r} cannot be created: {str(above)!r} is a file, not a folder")
    weights, config = out / ADAPTER_FILE, out / PEFT_CONFIG_FILE
    ours = False
    try:
        ours = weights.is_file() and LIBRARY in read_header(weights).metadata
    except (OSError, SafetensorsHeaderError):
        pass
    try:
        ours = ours or (config.is_file() and config.stat().st_size <= MAX_CONFIG_BYTES and parse_metadata(
            config.read_text(encoding="utf-8"), repr(str(config)), what="JSON").get("library") == LIBRARY)
    except (OSError, ValueError, AttributeError):  # not ours: AdapterFileError and bad UTF-8 are ValueErrors
        pass
    if ours:
        raise ValueError(f"{str(out)!r} holds a tensoradapt adapter ({ADAPTER_FILE}); export_peft would overwrite "
                         "it with the PEFT files: write the PEFT folder elsewhere")
    return out


def _modules_list(source: Source) -> str:
    """``target_modules``: the regular expression matching exactly the target names (PEFT
    ``re.fullmatch``-es a string; a list would select ``name`` and every ``*.name``, which from a
    file, without the model, cannot be ruled out)."""
    return "^(?:" + "|".join(re.escape(t.name) for t in source.targets) + ")$"


def _pattern_key(name: str) -> str:
    """A ``rank_pattern`` / ``alpha_pattern`` key selecting exactly the module ``name`` (PEFT matches
    keys as ``re.match(rf"(.*\\.)?({key})$", module)``; the anchor rules out every longer name)."""
    return "^" + re.escape(name)


def _patterns(values: dict[str, Any], default: Any) -> dict[str, Any]:
    return {_pattern_key(n): v for n, v in values.items() if v != default}


def _most_common(values: Sequence[Any]) -> Any:
    counts: dict[Any, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda v: (counts[v], -values.index(v)))


def _base_config(peft_type: str, source: Source) -> dict[str, Any]:
    return {"peft_type": peft_type, "task_type": None, "inference_mode": True, "revision": None,
            "target_modules": _modules_list(source), "exclude_modules": None, "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None}


# ---------------------------------------------------------------------------------- SuperLoRA, exact
def local_params(source: Source, group: int, k: int, split: SplitPlan) -> dict[str, torch.Tensor]:
    """``{block name: tensor}`` of split ``k`` of group ``group``."""
    return {b: source.params[param_name(group, k, b)] for b in split.parameter_shapes()}


def _eye_or(split: SplitPlan, local: dict[str, torch.Tensor], m: int, ref: torch.Tensor) -> torch.Tensor:
    if m in split.fixed_modes:
        return torch.eye(split.shape[m], dtype=ref.dtype, device=ref.device)
    return local[f"factor{m}"]


def low_rank(split: SplitPlan, local: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L (d0, q), R (q, d1))`` with ``L R`` the split's matrix (identity, CP or Tucker core)."""
    ref = next(iter(local.values()))
    U, V = _eye_or(split, local, 0, ref), _eye_or(split, local, 1, ref)
    if split.kind == "identity":
        return U, V.t()
    if split.kind == "cp":
        return U * local["weights"], V.t()
    core = local["core"]
    return (U, core @ V.t()) if core.shape[0] <= core.shape[1] else (U @ core, V.t())


def exact_form(source: Source, i: int) -> tuple[str | None, Any]:
    """``("lora" | "lokr" | "loha", (group, splits))`` when target ``i``'s ``ΔW`` is one of PEFT's
    structures on its own ``(o, n)``, else ``(None, why)``."""
    plan = source.plan
    assert plan is not None
    cfg = plan.config
    target = source.targets[i]
    if cfg.projection != "none":
        return None, f"projection={cfg.projection!r} mixes the entries of ΔW"
    if cfg.layout != "fold":
        return None, f"layout={cfg.layout!r} models several targets as one matrix"
    groups = plan.groups_for([i])
    if len(groups) != 1 or tuple(plan.grouping.members[groups[0]]) != (i,):
        return None, "its group spans several targets (grouping)"
    group = plan.groups[groups[0]]
    if group.n != group.size or group.padding or group.size != math.prod(target.shape):
        return None, f"its fold {group.shape} is not its own (o, n) = {target.shape}"
    splits = group.splits
    if len(splits) == 1 and splits[0].kind in ("identity", "cp", "tucker") and splits[0].shape == target.shape:
        return "lora", group
    if len(splits) == 2 and cfg.fold == "matrix" and cfg.unit == "hadamard":
        return "loha", group
    if len(splits) == 2 and cfg.fold == "matrix" and cfg.unit == "kron" and group.shape == target.shape:
        if splits[1].kind == "tucker" and len(set(splits[1].ranks)) > 1:
            return None, "its second Kronecker block is a Tucker product of unequal ranks"
        return "lokr", group
    return None, f"its structure ({' x '.join(s.kind + str(list(s.shape)) for s in splits)}) is not LoRA, LoKr or LoHa"


def _export_exact(source: Source) -> tuple[str, dict[str, Any], dict[str, torch.Tensor], dict, dict]:
    forms = [exact_form(source, i) for i in range(len(source.targets))]
    kinds = {f for f, _ in forms}
    hint = ("pass a rank (rank=r, or 'exact' for lossless to 1e-6; --rank on the command line) to export it as a "
            "PEFT LoRA of each target's truncated SVD")
    if None in kinds:
        i = next(i for i, (f, _) in enumerate(forms) if f is None)
        raise ValueError(f"target {source.targets[i].name!r} of {source.origin} has no exact PEFT form: {forms[i][1]}; "
                         + hint)
    if len(kinds) > 1:
        raise ValueError(f"the targets of {source.origin} mix {sorted(kinds)} structures, and one PEFT folder holds "
                         "one method; " + hint)
    kind = kinds.pop()
    groups = [g for _, g in forms]
    if kind == "lora":
        return _export_lora_exact(source, groups)
    if kind == "loha":
        return _export_loha(source, groups, hint)
    return _export_lokr(source, groups, hint)


def _check_conv(target: Target, method: str, hint: str, *, lora: bool) -> None:
    module = target.module
    if target.layer == "conv1d" and method != "LoRA":
        raise ValueError(f"PEFT's {method} supports nn.Linear, nn.Conv1d and nn.Conv2d; target {target.name!r} is a "
                         f"transformers Conv1D; " + hint)
    if target.layer == "embedding" and method != "LoRA":
        raise ValueError(f"PEFT's {method} does not adapt embeddings (target {target.name!r}); " + hint)
    if target.layer != "conv":
        return
    if method != "LoRA" and len(target.weight_shape) not in (3, 4):
        raise ValueError(f"PEFT's {method} supports nn.Conv1d and nn.Conv2d; target {target.name!r} has weight shape "
                         f"{target.weight_shape}; " + hint)
    if module is None:
        return
    if module.padding_mode != "zeros":
        raise ValueError(f"target {target.name!r} pads with padding_mode={module.padding_mode!r}, but PEFT's {method} "
                         "computes its update with zero padding, so the outputs would differ")
    if lora and (module.groups != 1 or any(d != 1 for d in module.dilation)):
        raise ValueError(f"target {target.name!r} has groups={module.groups}, dilation={module.dilation}: PEFT's LoRA "
                         "conv layers run lora_A without the layer's groups and dilation, so no PEFT LoRA reproduces "
                         "its update; only groups=1, dilation=1 convolutions can be exported as LoRA")


def _lora_tensors(target: Target, B: torch.Tensor, A: torch.Tensor) -> dict[str, torch.Tensor]:
    """PEFT LoRA tensors of ``ΔW = B A`` (``B (o, r)``, ``A (r, n)``) on ``target``."""
    key = _PREFIX + target.name
    r = B.shape[1]
    if target.layer == "embedding":
        return {f"{key}.lora_embedding_A": B.t(), f"{key}.lora_embedding_B": A.t()}
    if target.layer == "conv":
        kernel = target.weight_shape[2:]
        return {f"{key}.lora_A.weight": A.reshape(r, *target.weight_shape[1:]),
                f"{key}.lora_B.weight": B.reshape(B.shape[0], r, *(1,) * len(kernel))}
    return {f"{key}.lora_A.weight": A, f"{key}.lora_B.weight": B}


def _zero_padding_row(target: Target, B: torch.Tensor) -> torch.Tensor:
    """``B`` with an embedding's padding row zeroed (tensoradapt never updates it; PEFT would)."""
    if target.layer != "embedding" or target.padding_idx is None:
        return B
    B = B.clone()
    B[target.padding_idx] = 0
    return B


def _lora_config(source: Source, ranks: dict[str, int], alphas: dict[str, float]) -> dict[str, Any]:
    names = list(ranks)
    r = _most_common([ranks[n] for n in names])
    alpha = _most_common([alphas[n] for n in names if ranks[n] == r])
    config = _base_config("LORA", source)
    config.update({
        "r": r, "lora_alpha": alpha, "rank_pattern": _patterns(ranks, r), "alpha_pattern": _patterns(alphas, alpha),
        "fan_in_fan_out": any(t.layer == "conv1d" for t in source.targets), "bias": "none", "use_rslora": False,
        "use_dora": False, "lora_bias": False, "lora_dropout": 0.0, "init_lora_weights": True,
        "target_parameters": None, "layer_replication": None,
    })
    return config


def _export_lora_exact(source: Source, groups: list[Any]) -> tuple:
    plan = source.plan
    assert plan is not None
    cfg = plan.config
    hint = "pass a rank (rank=r, or 'exact'; --rank on the command line) to export a truncated SVD instead"
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for target, group in zip(source.targets, groups, strict=True):
        _check_conv(target, "LoRA", hint, lora=True)
        split = group.splits[0]
        with torch.no_grad():
            L, R = low_rank(split, local_params(source, group.index, 1, split))
        q = L.shape[1]
        if cfg.alpha is not None and split.kind == "identity" and q == cfg.ranks[0]:
            alphas[target.name] = float(cfg.alpha)  # PEFT's alpha / r is then our scale, bit for bit
        else:
            alphas[target.name] = float(group.scale) * q
        ranks[target.name] = q
        tensors.update(_lora_tensors(target, _zero_padding_row(target, L), R))
    return "LORA", _lora_config(source, ranks, alphas), tensors, ranks, dict.fromkeys(ranks, 0.0)


def _export_loha(source: Source, groups: list[Any], hint: str) -> tuple:
    plan = source.plan
    assert plan is not None
    cfg = plan.config
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for target, group in zip(source.targets, groups, strict=True):
        _check_conv(target, "LoHa", hint, lora=False)
        key = _PREFIX + target.name
        pairs = [low_rank(s, local_params(source, group.index, k, s)) for k, s in enumerate(group.splits, start=1)]
        q = pairs[0][0].shape[1]
        for index, (L, R) in enumerate(pairs, start=1):
            tensors[f"{key}.hada_w{index}_a"] = L
            tensors[f"{key}.hada_w{index}_b"] = R
        ranks[target.name] = q
        alphas[target.name] = float(cfg.alpha) if cfg.alpha is not None else float(group.scale) * q
    r = _most_common(list(ranks.values()))
    alpha = _most_common([alphas[n] for n in ranks if ranks[n] == r])
    config = _base_config("LOHA", source)
    config.update({"r": r, "alpha": alpha, "rank_pattern": _patterns(ranks, r),
                   "alpha_pattern": _patterns(alphas, alpha),
                   "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False, "init_weights": True})
    return "LOHA", config, tensors, ranks, dict.fromkeys(ranks, 0.0)


def peft_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's (LyCORIS's) ``factorization``: ``(factor, dimension // factor)`` **unsorted** when
    ``factor > 0`` divides ``dimension``, else the sorted pair nearest ``√dimension`` that ``factor``
    allows (then equal to :func:`tensoradapt.superlora.factorize.factorization`)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    return factorization(dimension, factor)


def _peft_lokr_layout(target: Target, r: int, decompose_both: bool, factor: int) -> tuple:
    """``((a, b), (c, e), kernel, use_w1, use_w2)`` PEFT's LoKr builds on ``target``: ``w1 (a, b)``,
    ``w2 (c, e)`` with ``e`` the flattened ``in_n · Π kernel``."""
    o = target.weight_shape[0]
    i = target.shape[1] if target.layer != "conv" else target.weight_shape[1]
    kernel = tuple(target.weight_shape[2:]) if target.layer == "conv" else ()
    out_l, out_k = peft_factorization(o, factor)
    in_m, in_n = peft_factorization(i, factor)
    use_w1 = not (decompose_both and r < max(out_l, in_m) / 2)
    use_w2 = not (r < max(out_k, in_n) / 2)
    return (out_l, in_m), (out_k, in_n * math.prod(kernel)), kernel, use_w1, use_w2


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def _export_lokr(source: Source, groups: list[Any], hint: str) -> tuple:
    plan = source.plan
    assert plan is not None
    cfg = plan.config
    for target in source.targets:
        _check_conv(target, "LoKr", hint, lora=False)
    ours = []
    for group in groups:
        first, second = group.splits
        ours.append((first.shape, second.shape, first.kind == "dense", second.kind == "dense",
                     first.ranks[0] if first.kind != "dense" else None,
                     second.ranks[0] if second.kind != "dense" else None))
    low = {q for *_, q1, q2 in ours for q in (q1, q2) if q is not None}
    if len(low) > 1:
        raise ValueError(f"the LoKr blocks of {source.origin} have ranks {sorted(low)}; PEFT's LoKr has one r")
    all_dense = not low
    ranks_c = [low.pop()] if not all_dense else sorted({cfg.ranks[0], max(
        math.ceil(max(s2) / 2) for _, s2, *_ in ours)})
    first_t = source.targets[0]
    factors = [cfg.dense_side if cfg.dense_side is not None else -1, -1]
    for d in _divisors(first_t.weight_shape[0]) + _divisors(first_t.weight_shape[1] if first_t.layer == "conv"
                                                              else first_t.shape[1]):
        if d not in factors:
            factors.append(d)
    chosen = None
    for r in ranks_c:
        for db in (cfg.decompose_both, not cfg.decompose_both):
            for f in factors:
                ok = True
                for target, (s1, s2, d1, d2, _, _) in zip(source.targets, ours, strict=True):
                    w1, w2, _, use_w1, use_w2 = _peft_lokr_layout(target, r, db, f)
                    if (w1, w2, use_w1, use_w2) != (tuple(s1), tuple(s2), d1, d2):
                        ok = False
                        break
                if ok:
                    chosen = (r, db, f)
                    break
            if chosen:
                break
        if chosen:
            break
    if chosen is None:
        t, (s1, s2, *_) = source.targets[0], ours[0]
        raise ValueError(f"no PEFT LoKr (one r, decompose_both, decompose_factor for all targets) has the Kronecker "
                         f"blocks of {source.origin} (e.g. {t.name!r}: {s1} x {s2}); PEFT factorises the input "
                         "channels "
                         "of a convolution apart from its kernel and keeps (factor, dim/factor) unsorted; " + hint)
    r, db, f = chosen
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for target, group in zip(source.targets, groups, strict=True):
        key = _PREFIX + target.name
        for k, split in enumerate(group.splits, start=1):
            local = local_params(source, group.index, k, split)
            if split.kind == "dense":
                value = local["dense"]
                if k == 2 and target.layer == "conv":
                    value = value.reshape(split.shape[0], target.weight_shape[1] // _peft_lokr_layout(
                        target, r, db, f)[0][1], *target.weight_shape[2:])
                tensors[f"{key}.lokr_w{k}"] = value
            else:
                L, R = low_rank(split, local)
                tensors[f"{key}.lokr_w{k}_a"] = L
                tensors[f"{key}.lokr_w{k}_b"] = R
        ranks[target.name] = r
        if cfg.alpha is not None and r == cfg.ranks[0] and group.scale == cfg.effective_scale:
            alphas[target.name] = float(cfg.alpha)  # PEFT's alpha / r is then our scale, bit for bit
        else:
            alphas[target.name] = float(group.scale) * r  # LyCORIS's full second block: 1 · r
    alpha = _most_common(list(alphas.values()))
    config = _base_config("LOKR", source)
    config.update({"r": r, "alpha": alpha, "rank_pattern": {}, "alpha_pattern": _patterns(alphas, alpha),
                   "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False,
                   "decompose_both": db, "decompose_factor": f, "rank_dropout_scale": False, "init_weights": True})
    return "LOKR", config, tensors, ranks, dict.fromkeys(ranks, 0.0)


# ---------------------------------------------------------------------------------- SuperLoRA, rank r
#: Most targets an SVD export handles without a progress bar (more draw one when stderr is a terminal).
PROGRESS_MIN_TARGETS = 8
#: Largest ``min(o, n)`` whose CPU SVDs run on one thread.  A small SVD gains little from a second
#: thread on a quiet machine (256x256: 11 ms on two threads, 16 ms on one) and loses a lot when the
#: cores are shared: every step of MKL's SVD waits for the slowest thread, and with another process
#: on the cores a 4-layer, 256-wide Llama's 28 SVDs took 4-7 s on two threads against 0.5 s on one.
ONE_THREAD_SVD_SIDE = 512


def _progress(total: int) -> Any:
    """The export's progress bar over ``total`` targets (``None`` when there are few of them, or
    when stderr is not a terminal): the one bar of the torch command lines and the demo."""
    if total < PROGRESS_MIN_TARGETS:
        return None
    from .cli import progress_bar

    return progress_bar(total, "export-peft", True, unit="target")


@contextlib.contextmanager
def svd_threads(source: Source) -> Iterator[None]:
    """One torch thread inside the block when every target is small and the work is on the CPU
    (see :data:`ONE_THREAD_SVD_SIDE`); the previous thread count is restored after."""
    device = next(iter(source.params.values())).device if source.params else torch.device("cpu")
    small = all(min(t.shape) <= ONE_THREAD_SVD_SIDE for t in source.targets)
    previous = torch.get_num_threads()
    if device.type != "cpu" or not small or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _export_svd(source: Source, rank: int | str, progress: bool = True) -> tuple:
    plan = source.plan
    assert plan is not None
    for target in source.targets:
        _check_conv(target, "LoRA", "", lora=True)
        if isinstance(rank, int) and rank > min(target.shape):
            smallest = min(min(t.shape) for t in source.targets)
            raise ValueError(f"rank={rank} exceeds min(o, n) = {min(target.shape)} of target {target.name!r} "
                             f"(o, n) = {target.shape}; pass a rank <= {smallest} (the smallest min(o, n) "
                             "of all targets) or 'exact'")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    # ΔW in float64 from the parameters (a half-precision adapter's own forward rounds it); the factors are
    # written in the adapter's dtype, float32 for a half-precision one (PEFT loads them into its layers' dtype)
    dtype = next(iter(source.params.values())).dtype if source.params else torch.float32
    out_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    bar = _progress(len(source.targets)) if progress else None
    try:
        with svd_threads(source):
            for targets, groups in plan.components():
                params = {name: source.params[name].to(torch.float64) for name in plan.parameter_shapes(groups)}
                with torch.no_grad():
                    deltas = plan.delta_for(params, targets)
                del params
                for t, delta in zip(targets, deltas, strict=True):
                    target = source.targets[t]
                    B, A, q, error = truncated(target, delta, rank, out_dtype)
                    ranks[target.name] = q
                    errors[target.name] = error
                    tensors.update(_lora_tensors(target, B, A))
                    if bar is not None:
                        bar.update(1)
                del deltas
    finally:
        if bar is not None:
            bar.close()
    alphas = {n: float(q) for n, q in ranks.items()}  # scaling α/r = 1 on every target
    return "LORA", _lora_config(source, ranks, alphas), tensors, ranks, errors


def truncated(target: Target, delta: torch.Tensor, rank: int | str,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """``(B, A, r, relative error)`` of the rank-``r`` truncated SVD of ``ΔW`` (float64 on its device),
    ``B`` and ``A`` in ``dtype`` (the error is that of the factors in ``dtype``)."""
    work = delta.detach().to(torch.float64)
    if target.layer == "embedding" and target.padding_idx is not None:
        work = work.clone()
        work[target.padding_idx] = 0  # the row tensoradapt never updates
    total = float(torch.linalg.matrix_norm(work))
    if total == 0.0:  # an untrained LoRA-like ΔW = 0: rank 1 of zeros, exact
        q = 1 if rank == "exact" else int(rank)
        zero_b = torch.zeros(work.shape[0], q, dtype=dtype, device=work.device)
        return zero_b, torch.zeros(q, work.shape[1], dtype=dtype, device=work.device), q, 0.0
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    # tail[k] = ‖σ_{k..}‖: the Eckart–Young error of rank k
    tail = torch.flip(torch.cumsum(torch.flip(S * S, [0]), 0), [0]).sqrt()
    tail = torch.cat([tail, torch.zeros(1, dtype=tail.dtype, device=tail.device)])

    def factors(q: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        root = S[:q].sqrt()
        B = (U[:, :q] * root).to(dtype)
        A = (root[:, None] * Vh[:q]).to(dtype)
        error = float(torch.linalg.matrix_norm(work - B.to(torch.float64) @ A.to(torch.float64))) / total
        return B, A, error

    if rank != "exact":
        B, A, error = factors(int(rank))
        return B, A, int(rank), error
    limit = min(work.shape)
    # the smallest q whose truncation error is within the tolerance; the factors' rounding to
    # `dtype` can push the error of what is written above it, then q grows (doubling the step,
    # then bisecting: O(log r) evaluations of the error, each O(o n q), not one per rank)
    q = max(1, int((tail[1:] <= EXACT_TOLERANCE * total).nonzero()[0, 0]) + 1) if limit else 1
    best = factors(q)
    if best[2] <= EXACT_TOLERANCE or q >= limit:
        return best[0], best[1], q, best[2]
    failing, step = q, 1  # the largest rank known to fail
    while True:
        q = min(limit, failing + step)
        best = factors(q)
        if best[2] <= EXACT_TOLERANCE:
            break
        if q >= limit:  # nothing within the tolerance: the full rank (its error is the rounding's)
            return best[0], best[1], q, best[2]
        failing, step = q, 2 * step
    while q - failing > 1:
        middle = (failing + q) // 2
        found = factors(middle)
        if found[2] <= EXACT_TOLERANCE:
            q, best = middle, found
        else:
            failing = middle
    return best[0], best[1], q, best[2]


# ---------------------------------------------------------------------------------- GLoRA
def _export_glora(source: Source) -> tuple:
    config, choices = source.glora, source.choices
    assert config is not None and choices is not None
    for target, choice in zip(source.targets, choices, strict=True):
        if target.layer != "linear" or not target.plain_linear:
            raise ValueError(f"PEFT's GLoRA adapts plain nn.Linear layers only; target {target.name!r} is "
                             f"{'a transformers Conv1D' if target.layer == 'conv1d' else 'not an nn.Linear'}")
        if not target.has_bias and (choice.C != "none" or choice.E != "none"):
            raise ValueError(f"layer {target.name!r} has no bias and uses C={choice.C!r}, E={choice.E!r} (which "
                             "give it one); PEFT's GLoRA drops C, D and E on bias-free layers, so it cannot express "
                             "this")

    def rank_of(form: str, choice: LayerChoice) -> int:
        return {"lora": choice.rank or 0, "vector": 1, "scalar": 1}.get(form, 0)

    ab = {(c.A, c.B, c.rank if "lora" in (c.A, c.B) else None) for c in choices}
    biased = [c for t, c in zip(source.targets, choices, strict=True) if t.has_bias]
    cs = {(c.C, c.rank if c.C == "lora" else None) for c in biased}
    de = {(c.D, c.E) for c in biased}
    form_ab = _GLORA_FORMS[next(iter(ab))[0]] if len(ab) == 1 and next(iter(ab))[0] == next(iter(ab))[1] else "lora"
    form_c = next(iter(cs))[0] if len(cs) == 1 else ("lora" if cs else "none")
    form_de = _GLORA_FORMS[next(iter(de))[0]] if len(de) == 1 and next(iter(de))[0] == next(iter(de))[1] else (
        "vector" if de else "none")
    needed = [1]
    if form_ab == "lora":
        needed += [rank_of(c.A, c) for c in choices] + [rank_of(c.B, c) for c in choices]
    if form_c == "lora":
        needed += [rank_of(c.C, c) for c in biased]
    R = max(needed) if (form_ab == "lora" or form_c == "lora") else config.rank
    tensors: dict[str, torch.Tensor] = {}
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in source.params.items():
        layer, _, tensor = k.rpartition(".")
        by_layer.setdefault(layer, {})[tensor] = v
    for target, choice in zip(source.targets, choices, strict=True):
        key = _PREFIX + target.name
        p = by_layer[target.name]
        o, n = target.shape
        ref = p["A_d"]
        for name, form in (("A", choice.A), ("B", choice.B)):
            d, u = p[f"{name}_d"], p[f"{name}_u"]
            tensors.update(_glora_path(f"{key}.glora_{name}", form_ab, form, choice.rank, d, u, (o, n), R, ref))
        if target.has_bias:
            tensors.update(_glora_path(f"{key}.glora_C", form_c, choice.C, choice.rank, p["C_d"], p["C_u"], (n, 1), R,
                                       ref))
            for name, form in (("D", choice.D), ("E", choice.E)):
                tensors.update(_glora_vector(f"{key}.glora_{name}", form_de, form, p[name]))
        else:
            zero = {"C": (n, 1), "D": (o,), "E": (o,)}
            for name, shape in zero.items():
                tensors[f"{key}.glora_{name}.zeros"] = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
    peft_config = _base_config("GLORA", source)
    peft_config.update({"r": R, "config_A_B": form_ab, "config_C": form_c, "config_D_E": form_de, "bias": "none",
                        "init_weights": True})
    names = [t.name for t in source.targets]
    return "GLORA", peft_config, tensors, dict.fromkeys(names, R), dict.fromkeys(names, 0.0)


def _glora_path(key: str, peft_form: str, form: str, rank: int | None, d: torch.Tensor, u: torch.Tensor,
                shape: tuple[int, int], R: int, ref: torch.Tensor) -> dict[str, torch.Tensor]:
    """PEFT's tensors of one matrix path (A, B or C) holding our ``form`` in PEFT's ``peft_form``."""
    rows, cols = shape
    if peft_form == "none":
        return {f"{key}.zeros": torch.zeros(shape, dtype=ref.dtype, device=ref.device)}
    if peft_form == "vector":
        return {f"{key}.X": d[:, 0:1].clone()}
    if peft_form == "constant":
        return {f"{key}.X": d[0, 0:1].clone()}
    Xd = torch.zeros(rows, R, dtype=d.dtype, device=d.device)
    Xu = torch.zeros(R, cols, dtype=d.dtype, device=d.device)
    if form == "lora":
        Xd[:, :rank] = d[:, :rank]
        Xu[:rank] = u[:rank]
    elif form in ("vector", "scalar"):
        Xd[:, 0] = d[:, 0] if form == "vector" else d[0, 0]
        Xu[0] = 1
    return {f"{key}.Xd": Xd, f"{key}.Xu": Xu}


def _glora_vector(key: str, peft_form: str, form: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    if peft_form == "none":
        return {f"{key}.zeros": torch.zeros_like(value)}
    if peft_form == "constant":
        return {f"{key}.X": value[0:1].clone()}
    if form == "vector":
        return {f"{key}.X": value.clone()}
    return {f"{key}.X": torch.full_like(value, float(value[0])) if form == "scalar" else torch.zeros_like(value)}


# ---------------------------------------------------------------------------------- writing
def _write_folder(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    import safetensors.torch

    folder.mkdir(parents=True, exist_ok=True)
    host = {k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())}
    write_bytes(folder / ADAPTER_FILE, safetensors.torch.save(host, metadata={"format": "pt"}))
    text = json.dumps(dict(sorted(config.items())), indent=2, allow_nan=False) + "\n"
    write_bytes(folder / PEFT_CONFIG_FILE, text.encode("utf-8"))


# ---------------------------------------------------------------------------------- import

#: Options read (and type-checked) by :func:`import_peft`, per PEFT type.
_READ = {
    "LORA": {"r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora"},
    "LOKR": {"r", "alpha", "rank_pattern", "alpha_pattern", "decompose_both", "decompose_factor"},
    "LOHA": {"r", "alpha", "rank_pattern", "alpha_pattern"},
    "GLORA": {"r", "config_A_B", "config_C", "config_D_E"},
}
#: Options that do not change the adapted model's outputs in eval mode (or that the tensors decide).
_HARMLESS = {"peft_type", "base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version",
             "auto_mapping", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
             "init_lora_weights", "init_weights", "lora_dropout", "rank_dropout", "module_dropout",
             "rank_dropout_scale", "megatron_core", "qalora_group_size", "fan_in_fan_out", "ensure_weight_tying",
             "use_effective_conv2d", "bias"}
_DEFAULTS = {"r": 8, "lora_alpha": 8, "alpha": 8, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False,
             "decompose_both": False, "decompose_factor": -1, "config_A_B": "lora", "config_C": "lora",
             "config_D_E": "constant"}


def _number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / PEFT_CONFIG_FILE
    where = repr(str(path))
    if not path.exists():
        raise FileNotFoundError(f"no PEFT adapter config at {str(path)!r}")
    data = read_json_file(path, max_bytes=MAX_CONFIG_BYTES)  # the limits of our own metadata (tensoradapt._json)
    if not isinstance(data, dict):
        raise AdapterFileError(f"{where} is corrupted: the config is {type(data).__name__}, not an object")
    if data.get("library") == "tensoradapt" or "peft_type" not in data:
        raise AdapterFileError(f"{where} is not a PEFT adapter config (no peft_type); a tensoradapt folder loads "
                               "with tensoradapt.torch.load")
    peft_type = data["peft_type"]
    if not isinstance(peft_type, str) or peft_type not in _PEFT_TYPES:
        raise AdapterFileError(f"{where}: peft_type {peft_type!r:.40} is not one tensoradapt imports "
                               f"({', '.join(_PEFT_TYPES)})")
    read = _READ[peft_type]
    for key, value in data.items():
        if key in read or value in (None, False, [], {}, ""):
            continue
        if key in ("init_lora_weights", "init_weights") and value not in (True, "gaussian", "lycoris"):
            raise AdapterFileError(f"{where}: {key}={value!r:.40} initialises the adapter from the base weights (and "
                                   "may change them); import_peft reads adapters trained on the unchanged base only")
        if key == "bias" and value != "none":
            raise AdapterFileError(f"{where}: bias={value!r:.40} trains the base layers' biases; tensoradapt imports "
                                   "bias='none' adapters only")
        if key not in _HARMLESS:
            raise AdapterFileError(f"{where}: the PEFT option {key}={value!r:.60} is not supported by import_peft "
                                   "(no tensoradapt adapter reproduces it exactly)")
    out = {k: data.get(k, _DEFAULTS[k]) for k in read}
    for key, value in out.items():
        if key in ("r",) and (type(value) is not int or value < 1):
            raise AdapterFileError(f"{where}: r is {value!r:.40}, not a positive integer")
        if key in ("r",) and value > MAX_RANK:
            raise AdapterFileError(f"{where}: r is {value:.3g}, above the largest tensoradapt rank {MAX_RANK}")
        if key in ("lora_alpha", "alpha") and not _number(value):
            raise AdapterFileError(f"{where}: {key} is {value!r:.40}, not a finite number")
        if key in ("use_rslora", "decompose_both") and type(value) is not bool:
            raise AdapterFileError(f"{where}: {key} is {value!r:.40}, not true or false")
        if key == "decompose_factor" and (type(value) is not int or (value < 1 and value != -1)):
            raise AdapterFileError(f"{where}: decompose_factor is {value!r:.40}, not -1 or a positive integer")
        if key in ("rank_pattern", "alpha_pattern"):
            if not isinstance(value, dict) or not all(isinstance(k, str) and _number(v) for k, v in value.items()):
                raise AdapterFileError(f"{where}: {key} is {value!r:.60}, not an object of numbers")
            if key == "rank_pattern" and not all(type(v) is int and 1 <= v <= MAX_RANK for v in value.values()):
                raise AdapterFileError(f"{where}: rank_pattern is {value!r:.60}, not an object of integers in "
                                       f"[1, {MAX_RANK}]")
            # judged per adapted module in import_peft (_module_ranks): only the values applied matter
        if key.startswith("config_") and not isinstance(value, str):
            raise AdapterFileError(f"{where}: {key} is {value!r:.40}, not a string")
    if peft_type == "GLORA":
        for key, allowed in (("config_A_B", ("lora", "vector", "constant", "none")),
                             ("config_C", ("lora", "vector", "none")), ("config_D_E", ("vector", "constant", "none"))):
            if out[key] not in allowed:
                raise AdapterFileError(f"{where}: {key}={out[key]!r:.40} is not one of {allowed}")
    for value in (out.get("rank_pattern", {}), out.get("alpha_pattern", {})):
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as error:
                raise AdapterFileError(f"{where}: pattern {pattern!r:.60} is not a regular expression "
                                       f"({error})") from None
    out["peft_type"] = peft_type
    return out


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key ``k`` with
    ``re.match(rf"(.*\\.)?({k})$", module)``, else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


_SUFFIXES = {
    "LORA": ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B"),
    "LOKR": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    "LOHA": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "GLORA": tuple(f"glora_{t}.{p}" for t in "ABCDE" for p in ("Xd", "Xu", "X", "zeros")),
}


def _read_entries(folder: Path, peft_type: str) -> tuple[Path, dict[str, dict[str, tuple[int, ...]]]]:
    """``{module: {suffix: shape}}`` from the safetensors header (no tensor read yet)."""
    path = folder / ADAPTER_FILE
    where = repr(str(path))
    if not path.is_file():
        if (folder / "adapter_model.bin").exists():
            raise AdapterFileError(f"{str(folder)!r} holds adapter_model.bin (a pickle); tensoradapt reads safetensors "
                                   "only: re-save it with peft's save_pretrained(safe_serialization=True)")
        raise FileNotFoundError(f"no {ADAPTER_FILE} in {str(folder)!r}")
    try:
        header = read_header(path).header
    except SafetensorsHeaderError as error:
        raise AdapterFileError(f"{where} is corrupted or not a safetensors file: {error}") from None
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    suffixes = _SUFFIXES[peft_type]
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if entry["dtype"] not in ("F16", "BF16", "F32", "F64"):
            raise AdapterFileError(f"{where}: tensor {key!r:.80} has dtype {entry['dtype']}, not a float")
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if not key.startswith(_PREFIX) or suffix is None:
            raise AdapterFileError(f"{where}: tensor {key!r:.100} is not a {peft_type} adapter tensor tensoradapt "
                                   "imports (DoRA magnitudes, lora biases, effective-conv cores and modules_to_save "
                                   "copies are not supported)")
        module = key[len(_PREFIX):-len(suffix) - 1]
        modules.setdefault(module, {})[suffix] = tuple(entry["shape"])
    if not modules:
        raise AdapterFileError(f"{where} holds no adapter tensors")
    return path, modules


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
    config = _read_config(folder)
    path, entries = _read_entries(folder, config["peft_type"])
    where = repr(str(path))
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
        if kind == "conv" and config["peft_type"] == "LORA" and (m.groups != 1 or any(d != 1 for d in m.dilation)):
            raise AdapterFileError(f"{where}: PEFT's LoRA on conv {n!r} (groups={m.groups}, dilation={m.dilation}) "
                                   "runs lora_A without the layer's groups and dilation; no tensoradapt adapter "
                                   "reproduces its outputs")
        if kind == "conv" and m.padding_mode != "zeros":
            raise AdapterFileError(f"{where}: PEFT computes the update of conv {n!r} with zero padding, not its "
                                   f"padding_mode={m.padding_mode!r}; no tensoradapt adapter reproduces it")
    from . import attach
    from ._targets import weight_view

    views = [weight_view(n, m) for n, m in found]
    names = [n for n, _ in found]
    peft_type = config["peft_type"]
    if peft_type == "GLORA":
        return _import_glora(model, folder, path, where, config, entries, found, name, freeze_base)
    cfg, values = _superlora_values(config, entries, found, views, where)
    try:
        plan = SuperLoRA(cfg, [v.shape for v in views], names)
    except (TypeError, ValueError, OverflowError) as error:
        raise AdapterFileError(f"{where}: its {peft_type} config makes no tensoradapt plan ({error})") from None
    expected = plan.parameter_shapes()
    shapes = {k: tuple(v[1]) for k, v in values.items()}
    if shapes != {k: tuple(s) for k, s in expected.items()}:
        raise AdapterFileError(f"{where}: the {peft_type} tensors do not fit the tensoradapt plan of r={config['r']}")
    tensors = _load(path, where)
    wanted = set(names)
    try:
        adapter = attach(model, cfg, lambda n, m: n in wanted, name=name, freeze_base=freeze_base)
    except (TypeError, ValueError) as error:  # e.g. a tied weight: refused before anything is installed
        raise AdapterFileError(f"{where}: {error}") from None
    try:
        with torch.no_grad():
            for pname, (build, _) in values.items():
                adapter.params[pname.replace(".", "__")].copy_(build(tensors))
    except BaseException:
        adapter.detach()
        raise
    return adapter


def _load(path: Path, where: str) -> dict[str, torch.Tensor]:
    import safetensors.torch

    try:
        return dict(safetensors.torch.load_file(str(path), device="cpu"))
    except Exception as error:  # safetensors raises its own error type for every corruption
        raise AdapterFileError(f"{where} is corrupted: {error}") from None


def _superlora_values(config: dict[str, Any], entries: dict, found: list, views: list, where: str) -> tuple:
    """The tensoradapt config and ``{param name: (builder(tensors) -> value, shape)}``."""
    peft_type, r = config["peft_type"], config["r"]
    values: dict[str, Any] = {}

    def need(module: str, suffixes: Sequence[str]) -> dict[str, tuple[int, ...]]:
        got = entries[module]
        if set(got) != set(suffixes):
            raise AdapterFileError(f"{where}: module {module!r} has tensors {sorted(got)}, expected {sorted(suffixes)}")
        return got

    def key(module: str, suffix: str) -> str:
        return f"{_PREFIX}{module}.{suffix}"

    if peft_type in ("LORA", "LOHA"):
        # the rank and alpha PEFT applies to each adapted module (rank_pattern / alpha_pattern resolved)
        alpha = config["lora_alpha" if peft_type == "LORA" else "alpha"]
        rslora = peft_type == "LORA" and config["use_rslora"]
        ranks = [_pattern_value(config["rank_pattern"], module, r) for module, _ in found]
        alphas = [_pattern_value(config["alpha_pattern"], module, alpha) for module, _ in found]
        scales = [a / math.sqrt(q) if rslora else a / q for a, q in zip(alphas, ranks, strict=True)]
        R = max(ranks)
        make = presets.lora if peft_type == "LORA" else presets.loha
        if set(ranks) == {R} and len(set(alphas)) == 1 and not rslora:
            cfg, common = make(R, alphas[0]), scales[0]  # alpha / r, bit for bit
        else:
            # one rank R = max r_i (smaller ranks padded with zero columns, which stay zero in training: their
            # gradients vanish) and the most common scale; another module's scale is folded into its first factor
            common = _most_common(scales)
            cfg = make(R).replace(scale=common)
    else:
        return _lokr_values(config, entries, found, views, where)

    def padded(x: torch.Tensor, fold: float = 1.0) -> torch.Tensor:
        x = x * fold if fold != 1.0 else x
        return torch.nn.functional.pad(x, (0, R - x.shape[1])) if x.shape[1] < R else x

    if peft_type == "LORA":
        for g, ((module, m), view, q, sc) in enumerate(zip(found, views, ranks, scales, strict=True)):
            o, n = view.shape
            fold = sc / common
            if isinstance(m, nn.Embedding):
                got = need(module, ("lora_embedding_A", "lora_embedding_B"))
                if got["lora_embedding_A"] != (q, o) or got["lora_embedding_B"] != (n, q):
                    raise AdapterFileError(f"{where}: LoRA tensors of embedding {module!r} have shapes {got}, not "
                                           f"rank {q} of ({o}, {n})")
                a, b = key(module, "lora_embedding_A"), key(module, "lora_embedding_B")
                pad = m.padding_idx
                values[param_name(g, 1, "factor0")] = (lambda t, a=a, pad=pad, module=module, fold=fold: padded(
                    _padding_checked(t[a].t(), pad, module, where), fold), (o, R))
                values[param_name(g, 1, "factor1")] = (lambda t, b=b: padded(t[b]), (n, R))
                continue
            got = need(module, ("lora_A.weight", "lora_B.weight"))
            if math.prod(got["lora_A.weight"]) != q * n or got["lora_A.weight"][0] != q or \
                    tuple(got["lora_B.weight"][:2]) != (o, q) or math.prod(got["lora_B.weight"]) != o * q:
                raise AdapterFileError(f"{where}: LoRA tensors of {module!r} have shapes {got}, not rank {q} of "
                                       f"({o}, {n})")
            a, b = key(module, "lora_A.weight"), key(module, "lora_B.weight")
            values[param_name(g, 1, "factor0")] = (lambda t, b=b, o=o, q=q, fold=fold: padded(
                t[b].reshape(o, q), fold), (o, R))
            values[param_name(g, 1, "factor1")] = (lambda t, a=a, q=q: padded(t[a].reshape(q, -1).t()), (n, R))
        return cfg, values
    for g, ((module, _), view, q, sc) in enumerate(zip(found, views, ranks, scales, strict=True)):
        o, n = view.shape
        got = need(module, _SUFFIXES["LOHA"])
        for k in (1, 2):
            if got[f"hada_w{k}_a"] != (o, q) or got[f"hada_w{k}_b"] != (q, n):
                raise AdapterFileError(f"{where}: LoHa tensors of {module!r} have shapes {got}, not rank {q} of "
                                       f"({o}, {n})")
            a, b = key(module, f"hada_w{k}_a"), key(module, f"hada_w{k}_b")
            fold = sc / common if k == 1 else 1.0
            values[param_name(g, k, "factor0")] = (lambda t, a=a, fold=fold: padded(t[a], fold), (o, R))
            values[param_name(g, k, "factor1")] = (lambda t, b=b: padded(t[b].t()), (n, R))
    return cfg, values



def _padding_checked(U: torch.Tensor, pad: int | None, module: str, where: str) -> torch.Tensor:
    if pad is not None and bool((U[pad] != 0).any()):
        raise AdapterFileError(f"{where}: the LoRA of embedding {module!r} updates its padding row {pad}, which "
                               "tensoradapt (like PyTorch) keeps fixed; no tensoradapt adapter reproduces it")
    return U


def _lokr_values(config: dict[str, Any], entries: dict, found: list, views: list, where: str) -> tuple:
    alpha, db = config["alpha"], config["decompose_both"]
    ranks = {module: _pattern_value(config["rank_pattern"], module, config["r"]) for module, _ in found}
    if len(set(ranks.values())) > 1:  # each rank shapes PEFT's LoKr layout (which blocks are low-rank)
        raise AdapterFileError(f"{where}: rank_pattern gives the LoKr modules ranks {sorted(set(ranks.values()))}; a "
                               "tensoradapt LoKr has one rank")
    r = next(iter(ranks.values()))
    layout = []  # per module: (w1 shape, w2 shape as (c, e)), dense flags
    for module, m in found:
        got = entries[module]
        if isinstance(m, nn.Embedding) or type(m).__name__ == "Conv1D" or (
                isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.weight.dim() not in (3, 4)):
            raise AdapterFileError(f"{where}: PEFT's LoKr does not adapt {type(m).__name__} {module!r}")
        dense1, dense2 = "lokr_w1" in got, "lokr_w2" in got
        expected = {"lokr_w1"} if dense1 else {"lokr_w1_a", "lokr_w1_b"}
        expected |= {"lokr_w2"} if dense2 else {"lokr_w2_a", "lokr_w2_b"}
        if set(got) != expected:
            raise AdapterFileError(f"{where}: module {module!r} has LoKr tensors {sorted(got)}")
        s1 = got["lokr_w1"] if dense1 else (got["lokr_w1_a"][0], got["lokr_w1_b"][-1])
        if dense2:
            w2 = got["lokr_w2"]
            s2 = (w2[0], math.prod(w2[1:]))
        else:
            s2 = (got["lokr_w2_a"][0], got["lokr_w2_b"][-1])
        layout.append((tuple(s1), tuple(s2), dense1, dense2))
    first = views[0]
    factors = [config["decompose_factor"], -1]
    for d in _divisors(first.shape[0]) + _divisors(first.shape[1]):
        if d not in factors:
            factors.append(d)
    alphas = [_pattern_value(config["alpha_pattern"], module, alpha) for module, _ in found]
    if len(set(alphas)) == 1:
        scale_fields: dict[str, Any] = {"scale": alphas[0] / r}  # PEFT's alpha / r on every module
    elif all(a == (r if lay[3] else alpha) for a, lay in zip(alphas, layout, strict=True)):
        scale_fields = {"alpha": alpha}  # LyCORIS's rule (what export_peft writes): full w2 -> alpha = r, scale 1
    else:
        raise AdapterFileError(f"{where}: alpha_pattern gives the LoKr modules alphas {sorted(set(alphas))}; a "
                               "tensoradapt LoKr has one alpha/r (or LyCORIS's 1 on full second blocks)")
    chosen = None
    for f in factors:
        try:
            cfg = SuperLoRAConfig(rank=r, order=2, splits=2, dense_side=f, fold="matrix", core="identity",
                                  decompose_both=db, **scale_fields)
            plan = SuperLoRA(cfg, [v.shape for v in views], [n for n, _ in found])
        except (ValueError, TypeError):
            continue
        if all((tuple(g.splits[0].shape), tuple(g.splits[1].shape), g.splits[0].kind == "dense",
                g.splits[1].kind == "dense") == lay for g, lay in zip(plan.groups, layout, strict=True)):
            chosen = cfg
            break
    if chosen is None:
        module = found[0][0]
        raise AdapterFileError(f"{where}: the LoKr blocks of {module!r} ({layout[0][0]} x {layout[0][1]}) are not a "
                               "tensoradapt LoKr factorisation (tensoradapt keeps the smaller factor first, so PEFT's "
                               "unsorted (factor, dim/factor) with factor > dim/factor, and conv kernels split apart "
                               "from the channels, have no tensoradapt equivalent)")
    values: dict[str, Any] = {}
    for g, ((module, _), lay) in enumerate(zip(found, layout, strict=True)):
        s1, s2, dense1, dense2 = lay
        for k, (shape, dense) in enumerate(((s1, dense1), (s2, dense2)), start=1):
            if dense:
                name = f"{_PREFIX}{module}.lokr_w{k}"
                values[param_name(g, k, "dense")] = (lambda t, name=name, shape=shape: t[name].reshape(shape), shape)
            else:
                a, b = f"{_PREFIX}{module}.lokr_w{k}_a", f"{_PREFIX}{module}.lokr_w{k}_b"
                values[param_name(g, k, "factor0")] = (lambda t, a=a: t[a], (shape[0], r))
                values[param_name(g, k, "factor1")] = (lambda t, b=b: t[b].t(), (shape[1], r))
    return chosen, values


def _import_glora(model: nn.Module, folder: Path, path: Path, where: str, config: dict[str, Any], entries: dict,
                  found: list, name: str, freeze_base: bool) -> BaseAdapter:
    r = config["r"]
    form = {"A": config["config_A_B"], "C": config["config_C"], "D": config["config_D_E"]}
    ours = {"lora": "lora", "vector": "vector", "constant": "scalar", "none": "none"}
    choices = []
    plans = []
    for module, m in found:
        if type(m) is not nn.Linear:
            raise AdapterFileError(f"{where}: PEFT's GLoRA adapts plain nn.Linear layers; {module!r} is a "
                                   f"{type(m).__name__}")
        bias = m.bias is not None
        o, n = m.weight.shape
        c = {t: ours[form["A" if t in "AB" else "C" if t == "C" else "D"]] for t in "ABCDE"}
        if not bias:
            c.update(C="none", D="none", E="none")
        choice = LayerChoice(**c, rank=r)
        shapes = {"A": (o, n), "B": (o, n), "C": (n, 1), "D": (o,), "E": (o,)}
        expected = {}
        for t in "ABCDE":
            f = c[t]
            if f == "lora":
                expected[f"glora_{t}.Xd"] = (shapes[t][0], r)
                expected[f"glora_{t}.Xu"] = (r, shapes[t][1])
            elif f == "vector":
                expected[f"glora_{t}.X"] = (shapes[t][0], 1) if t in "ABC" else (o,)
            elif f == "scalar":
                expected[f"glora_{t}.X"] = (1,)
            else:
                expected[f"glora_{t}.zeros"] = shapes[t]
        if entries[module] != expected:
            raise AdapterFileError(f"{where}: module {module!r} has GLoRA tensors {entries[module]}, "
                                   f"expected {expected}")
        choices.append(choice)
        plans.append((module, c, bias))
    tensors = _load(path, where)
    from . import attach

    wanted = {n for n, _ in found}
    try:
        adapter = attach(model, GLoRAConfig(rank=r), lambda n, m: n in wanted, name=name, freeze_base=freeze_base)
    except (TypeError, ValueError) as error:
        raise AdapterFileError(f"{where}: {error}") from None
    try:
        adapter.set_configs(choices)
        with torch.no_grad():
            for (module, c, _), layer in zip(plans, adapter.layers, strict=True):
                for p in layer.values():
                    p.zero_()
                for t in "ABC":
                    key = f"{_PREFIX}{module}.glora_{t}"
                    if c[t] == "lora":
                        layer[f"{t}_d"][:, :r].copy_(tensors[f"{key}.Xd"])
                        layer[f"{t}_u"][:r].copy_(tensors[f"{key}.Xu"])
                    elif c[t] == "vector":
                        layer[f"{t}_d"][:, 0].copy_(tensors[f"{key}.X"][:, 0])
                    elif c[t] == "scalar":
                        layer[f"{t}_d"][0, 0].copy_(tensors[f"{key}.X"][0])
                for t in "DE":
                    key = f"{_PREFIX}{module}.glora_{t}"
                    if c[t] == "vector":
                        layer[t].copy_(tensors[f"{key}.X"])
                    elif c[t] == "scalar":
                        layer[t][0].copy_(tensors[f"{key}.X"][0])
    except BaseException:
        adapter.detach()
        raise
    return adapter
