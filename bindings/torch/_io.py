"""Adapter files: one safetensors file whose header carries our JSON metadata.

Layout: the tensors are the adapter's trainable arrays under their own names; the safetensors
header's ``__metadata__`` has ``{"format": "pt", "tensoradapt": "<JSON>"}``, and the JSON holds
``format``, ``format_version``, ``library_version``, the method and its config, the target names
and shapes, the parameter dtype, the seed and the buffer generator id.  Nothing is unpickled.
Files are written atomically (a temporary file in the same folder, fsync, ``os.replace``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import tensoradapt._safetensors as safetensors_header

__all__ = ["FORMAT", "FORMAT_VERSION", "AdapterFileError", "read_adapter", "read_metadata", "write_adapter"]

FORMAT = "tensoradapt.adapter"
FORMAT_VERSION = 1
_METADATA_KEY = "tensoradapt"


class AdapterFileError(ValueError):
    """An adapter file is corrupted, of another format or version, or does not fit the model."""


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as error:  # pragma: no cover - safetensors is a dependency of the torch extra
        raise ImportError("saving and loading adapters needs safetensors: pip install safetensors") from error
    return safetensors.torch


def write_adapter(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, Any]) -> Path:
    """Write ``tensors`` and ``metadata`` to ``path`` atomically; return the path.

    The tensors are copied to contiguous CPU tensors first.  A crash mid-write leaves either the
    old file or the new one, never a torn file.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"adapter files end in .safetensors, got {str(path)!r}")
    if not path.parent.exists():
        raise FileNotFoundError(f"folder {str(path.parent)!r} does not exist")
    host = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    header = {"format": "pt", _METADATA_KEY: json.dumps(dict(metadata), sort_keys=True)}
    blob = _safetensors().save(host, metadata=header)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes the file 0600; give it the usual mode
            os.fchmod(fd, _file_mode(path))
        with os.fdopen(fd, "wb") as handle:
            handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    try:  # make the rename durable where the platform allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return path
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dir_fd)
    return path


def _file_mode(path: Path) -> int:
    """The mode of the file being replaced, else what ``open()`` would give (0666 minus the umask)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _read_header(path: Path) -> dict[str, Any]:
    """The checked safetensors header (the library's one reader), errors naming the file."""
    try:
        return safetensors_header.read_header(path).header
    except safetensors_header.SafetensorsHeaderError as error:
        raise AdapterFileError(f"{str(path)!r} is corrupted or not a safetensors file: {error}") from None


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The tensoradapt metadata of an adapter file (reads the header only, never the tensors).

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    AdapterFileError
        Not a safetensors file, no tensoradapt metadata, or an unsupported format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {str(path)!r}")
    header = _read_header(path)  # __metadata__ is checked there: an object of strings to strings
    text = (header.get(safetensors_header.METADATA_KEY) or {}).get(_METADATA_KEY)
    if text is None:
        raise AdapterFileError(f"{str(path)!r} is a safetensors file without tensoradapt metadata (not an adapter)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise AdapterFileError(f"{str(path)!r} is corrupted: its tensoradapt metadata is not JSON ({error})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise AdapterFileError(f"{str(path)!r} has format {data.get('format') if isinstance(data, dict) else None!r}, "
                               f"expected {FORMAT!r}")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise AdapterFileError(
            f"{str(path)!r} has format_version {version!r}; this tensoradapt reads version {FORMAT_VERSION}"
            + (" (the file was written by a newer tensoradapt: upgrade)" if newer else "")
        )
    return data


def read_adapter(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of an adapter file, checked: format, version, and that every tensor
    named in the metadata is present with the recorded shape and dtype.

    Tensors are read with ``safetensors`` (never pickle) onto the CPU.
    """
    path = Path(path)
    metadata = read_metadata(path)
    try:
        tensors = dict(_safetensors().load_file(str(path), device="cpu"))
    except Exception as error:  # safetensors raises its own error type for every corruption
        raise AdapterFileError(f"{str(path)!r} is corrupted: {error}") from None
    expected = metadata.get("parameters")
    if not isinstance(expected, dict):
        raise AdapterFileError(f"{str(path)!r} is corrupted: its metadata has no 'parameters' table")
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise AdapterFileError(f"{str(path)!r} is corrupted: tensors missing {missing[:5]}, unexpected {extra[:5]}")
    dtype = metadata.get("param_dtype")
    for name, shape in expected.items():
        tensor = tensors[name]
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise AdapterFileError(f"{str(path)!r} is corrupted: the shape of {name!r} is {shape!r}, "
                                   "not a list of ints")
        if list(tensor.shape) != list(shape):
            raise AdapterFileError(
                f"{str(path)!r}: tensor {name!r} has shape {list(tensor.shape)} but the metadata says {list(shape)}"
            )
        if str(tensor.dtype).removeprefix("torch.") != dtype:
            raise AdapterFileError(
                f"{str(path)!r}: dtype mismatch, tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')} "
                f"but the adapter's parameters are {dtype}"
            )
    return tensors, metadata
