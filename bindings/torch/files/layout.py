"""Adapter files and folders: names, constants, the error type, and where a folder's adapter lies.

Layout: the tensors are the adapter's trainable arrays under their own names; the safetensors
header's ``__metadata__`` has ``{"format": "pt", "tensoradapt": "<JSON>"}``, and the JSON holds
``format``, ``format_version``, ``library_version``, the method and its config, the target names
and shapes, the parameter dtype, the seed and the buffer generator id.  A folder holds the adapter
``"default"`` at its root and others in ``folder/<name>/`` (PEFT's layout).
"""

from __future__ import annotations

import os
from pathlib import Path

import tensoradapt._safetensors as safetensors_header

from ..container import check_adapter_name

__all__ = ["ADAPTER_FILE", "CONFIG_FILE", "FORMAT", "FORMAT_VERSION", "LIBRARY", "MAX_CONFIG_BYTES",
           "MAX_METADATA_DEPTH", "METADATA_KEY", "MODULES_TO_SAVE_PREFIX", "PARAM_DTYPES", "README_FILE",
           "AdapterFileError", "adapter_path", "adapter_subfolders", "glob_escape", "locate_adapter"]

FORMAT = "tensoradapt.adapter"
FORMAT_VERSION = 1
#: The safetensors ``__metadata__`` key holding our JSON.
METADATA_KEY = "tensoradapt"
#: Deepest JSON nesting accepted in the metadata (a valid file nests 4 deep).
MAX_METADATA_DEPTH = 16
#: The JSON file ``save_pretrained`` writes beside the adapter file (the same facts, for humans and tools).
CONFIG_FILE = "adapter_config.json"
#: The model card ``save_pretrained`` writes.
README_FILE = "README.md"
#: ``adapter_config.json``'s mark: the ``"library"`` key (PEFT's configs have ``"peft_type"`` instead).
LIBRARY = "tensoradapt"
#: Largest ``adapter_config.json`` read (the safetensors header's own limit).
MAX_CONFIG_BYTES = safetensors_header.MAX_HEADER_BYTES
#: Float dtypes an adapter's tensors may have.
PARAM_DTYPES = ("float16", "bfloat16", "float32", "float64")
ADAPTER_FILE = "adapter_model.safetensors"  # the file save_pretrained writes in its folder
MODULES_TO_SAVE_PREFIX = "modules_to_save."  # tensor-name prefix of saved modules in an adapter file


def glob_escape(name: str) -> str:
    """``name`` with the glob metacharacters escaped."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


class AdapterFileError(ValueError):
    """An adapter file is corrupted, of another format or version, or does not fit the model."""


def adapter_path(path: str | os.PathLike[str]) -> Path:
    """The adapter file of ``path``: the path itself, or ``path/adapter_model.safetensors`` for a
    folder (what ``save_pretrained`` writes)."""
    path = Path(path)
    return path / ADAPTER_FILE if path.is_dir() else path


def locate_adapter(path: str | os.PathLike[str], name: str = "default") -> tuple[Path, Path | None]:
    """``(adapter file, its adapter_config.json or None)`` for a file or a folder.

    A folder holds the adapter ``"default"`` at its root and others in ``folder/<name>/`` (PEFT's
    layout, what ``model.save_pretrained`` writes): ``name`` selects ``folder/<name>/`` when that
    subfolder holds an adapter, else the root, unless the folder has named subfolders (then a name
    it lacks is refused, not read as the root's).  ``FileNotFoundError`` when there is no adapter
    file (naming the subfolders' adapters).
    """
    path = Path(path)
    if not path.is_dir():
        return path, None
    folder = path
    if check_adapter_name(name) != "default":
        if (path / name / ADAPTER_FILE).is_file():
            folder = path / name
        elif adapter_subfolders(path):  # a folder of named adapters: a name it lacks is a typo, not the root's
            raise FileNotFoundError(
                f"{str(path)!r} has no adapter named {name!r}: it holds {adapter_subfolders(path)[:10]} in "
                f"subfolders and 'default' at its root (to load the root's under the name {name!r}, pass the file "
                f"{str(path / ADAPTER_FILE)!r})")
    file = folder / ADAPTER_FILE
    if not file.exists() and not file.is_symlink():
        subfolders = adapter_subfolders(path)
        hint = (f"; the folder holds adapters {subfolders[:10]} in subfolders: pass one's name (or its "
                "subfolder's path)" if subfolders else "")
        raise FileNotFoundError(f"no adapter file at {str(file)!r}{hint}")
    config = folder / CONFIG_FILE
    return file, config if config.exists() or config.is_symlink() else None


def adapter_subfolders(folder: str | os.PathLike[str]) -> list[str]:
    """Names of the subfolders of ``folder`` holding an adapter file (the named adapters
    ``model.save_pretrained`` writes beside the ``"default"`` one), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.is_dir() and p.name.isidentifier() and (p / ADAPTER_FILE).is_file())
