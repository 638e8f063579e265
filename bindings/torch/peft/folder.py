"""A PEFT folder on disk: the output checked (never over a tensoradapt adapter), written atomically
(by one rank under FSDP2), and the tensors' keys and shapes read from the safetensors header
before any tensor is."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tensoradapt._safetensors import SafetensorsHeaderError, read_header

from ..distributed import dtensor_type
from ..files.layout import ADAPTER_FILE, LIBRARY, AdapterFileError
from ..files.read import parse_metadata
from ..files.write import write_bytes
from ..lifecycle import BaseAdapter
from .layout import MAX_CONFIG_BYTES, PEFT_CONFIG_FILE, PREFIX


# ---------------------------------------------------------------------------------- writing
def check_output(folder: str | os.PathLike[str]) -> Path:
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


def write_folder(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` (sorted keys), each atomically."""
    import safetensors.torch

    folder.mkdir(parents=True, exist_ok=True)
    host = {k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())}
    write_bytes(folder / ADAPTER_FILE, safetensors.torch.save(host, metadata={"format": "pt"}))
    text = json.dumps(dict(sorted(config.items())), indent=2, allow_nan=False) + "\n"
    write_bytes(folder / PEFT_CONFIG_FILE, text.encode("utf-8"))


def sharded_mesh(adapter: BaseAdapter) -> Any:
    """The device mesh of ``adapter``'s parameters when FSDP2 (``fully_shard``) shards them, else None."""
    dtensor = dtensor_type()
    if dtensor is None:
        return None
    for _, p in adapter.named_trainable_parameters():
        if isinstance(p, dtensor):
            return p.device_mesh
    return None


def write_on_rank0(mesh: Any, out: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """The rank at mesh coordinate 0 checks ``out`` and writes it; every rank then learns (one
    all-reduce per mesh dimension) whether that succeeded, so a failure raises on every rank
    instead of leaving the others waiting."""
    import torch.distributed as dist

    coordinate = mesh.get_coordinate()
    failure: BaseException | None = None
    if coordinate is not None and all(c == 0 for c in coordinate):
        try:
            check_output(out)
            write_folder(out, config, tensors)
        except BaseException as error:  # reported to the other ranks below, then raised here
            failure = error
    flag = torch.tensor([0 if failure is None else 1], dtype=torch.int32, device=mesh.device_type)
    for dim in range(mesh.ndim):
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
    if failure is not None:
        raise failure
    if int(flag.item()):
        raise RuntimeError(f"the rank writing the PEFT folder {str(out)!r} (mesh coordinate 0) failed; see its error")


# ---------------------------------------------------------------------------------- reading
def read_entries(folder: Path, peft_type: str,
                 suffixes: Sequence[str]) -> tuple[Path, dict[str, dict[str, tuple[int, ...]]]]:
    """``(file, {module: {suffix: shape}})`` from the safetensors header (no tensor read yet): every
    key a float tensor ``base_model.model.<module>.<suffix>`` of one of ``suffixes``."""
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
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if entry["dtype"] not in ("F16", "BF16", "F32", "F64"):
            raise AdapterFileError(f"{where}: tensor {key!r:.80} has dtype {entry['dtype']}, not a float")
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise AdapterFileError(f"{where}: tensor {key!r:.100} is not a {peft_type} adapter tensor tensoradapt "
                                   "imports (DoRA magnitudes, lora biases, effective-conv cores and modules_to_save "
                                   "copies are not supported)")
        module = key[len(PREFIX):-len(suffix) - 1]
        modules.setdefault(module, {})[suffix] = tuple(entry["shape"])
    if not modules:
        raise AdapterFileError(f"{where} holds no adapter tensors")
    return path, modules
