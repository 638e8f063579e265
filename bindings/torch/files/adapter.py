"""The file half of every adapter: ``save``, ``save_pretrained``, and the tensors and keys they hold.

:class:`AdapterFiles` is a mixin of :class:`tensoradapt.torch.lifecycle.BaseAdapter`; it reads the
adapter through what every adapter provides (``metadata()``, ``_adapter_parameters()``, ``_model``,
``saved_modules``, ``modules_to_save``, ``adapter_name``) and writes with :mod:`.write`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..distributed import writes_here
from ..modules import ADAPTER_ATTRIBUTE
from .card import base_model_record, is_our_card, model_card
from .layout import ADAPTER_FILE, CONFIG_FILE, LIBRARY, MODULES_TO_SAVE_PREFIX, README_FILE
from .write import write_bytes, write_gathered

__all__ = ["AdapterFiles"]


class AdapterFiles:
    """``save`` / ``save_pretrained`` of an adapter, and the tensors and ``state_dict`` keys of its file."""

    # ------------------------------------------------------------------ files

    def _file_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors and each ``modules_to_save`` copy's whole ``state_dict`` (its
        parameters and persistent buffers, e.g. BatchNorm's running statistics)."""
        tensors = {name: p.detach() for name, p in self._adapter_parameters()}
        for key, module in self.saved_modules.items():
            for entry, value in module.state_dict().items():
                tensors[f"{MODULES_TO_SAVE_PREFIX}{key.replace('__', '.')}.{entry}"] = value.detach()
        return tensors

    def _saved_metadata(self) -> list[dict[str, Any]]:
        out = []
        for name, (key, module) in zip(self.modules_to_save, self.saved_modules.items(), strict=True):
            out.append({"name": name, "type": type(module).__name__,  # "parameters": the state_dict's entries
                        "parameters": {p: list(t.shape) for p, t in module.state_dict().items()}})
            assert key == name.replace(".", "__")
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the adapter to ``path`` (``.safetensors``; tensors plus JSON metadata), atomically.

        On a model sharded by FSDP2 (``fully_shard``) this is a collective: call it on every rank;
        the full tensors are gathered and the rank at mesh coordinate 0 writes the file (the same
        bytes as an unsharded model with the same values)."""
        return write_gathered(path, self._file_tensors(), self.file_metadata())

    def file_metadata(self) -> dict[str, Any]:
        """The metadata written to files: :meth:`metadata` plus ``base_model`` (``name_or_path``
        and ``commit`` of a transformers model's config) when the model records them."""
        metadata = self.metadata()
        base = base_model_record(self._model)
        if base:
            metadata["base_model"] = base
        return metadata

    def state_dict_keys(self) -> dict[str, str]:
        """``{name in the adapter file: key in model.state_dict()}`` for every tensor the file holds
        (``tensoradapt.<adapter name>.…``)."""
        prefix = f"{ADAPTER_ATTRIBUTE}.{self.adapter_name}."
        keys = {}
        by_id: dict[int, str] = {}
        for key, value in self.state_dict(keep_vars=True).items():
            by_id.setdefault(id(value), key)
        for name, p in self._adapter_parameters():
            keys[name] = prefix + by_id[id(p)]
        for key, module in self.saved_modules.items():
            for entry in module.state_dict():
                file_name = f"{MODULES_TO_SAVE_PREFIX}{key.replace('__', '.')}.{entry}"
                keys[file_name] = f"{prefix}saved_modules.{key}.{entry}"
        return keys

    def _tensors_from_state_dict(self, state_dict: Any) -> dict[str, torch.Tensor]:
        """The file's tensors taken from a full ``model.state_dict()`` (e.g. one gathered by a
        distributed trainer), checked against the live adapter's shapes; floats in the adapter's dtype."""
        if not isinstance(state_dict, dict) and not hasattr(state_dict, "items"):
            raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
        live = self._file_tensors()
        out = {}
        missing = []
        for name, key in self.state_dict_keys().items():
            value = state_dict.get(key)
            if not isinstance(value, torch.Tensor):
                missing.append(key)
                continue
            mine = live[name]
            if tuple(value.shape) != tuple(mine.shape):
                raise ValueError(f"state_dict[{key!r}] has shape {tuple(value.shape)}, but adapter "
                                 f"{self.adapter_name!r} has {tuple(mine.shape)} there")
            out[name] = value.detach().to(mine.dtype) if mine.dtype.is_floating_point else value.detach()
        if missing:
            raise ValueError(f"state_dict lacks the tensors of adapter {self.adapter_name!r}: {missing[:5]}"
                             f"{' …' if len(missing) > 5 else ''} (pass the model's full state_dict(), or none)")
        return out

    @torch.no_grad()
    def copy_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy an adapter file's tensors (checked against this adapter: same names and shapes) into
        the adapter's parameters and its ``modules_to_save`` copies, in place (the parameter objects
        stay, so an optimiser over them keeps working)."""
        for name, p in self._adapter_parameters():
            p.copy_(tensors[name])
        for key, module in self.saved_modules.items():
            prefix = f"{MODULES_TO_SAVE_PREFIX}{key.replace('__', '.')}."
            module.load_state_dict({entry: tensors[prefix + entry] for entry in module.state_dict()}, strict=True)

    def save_pretrained(self, folder: str | os.PathLike[str], *, state_dict: Any = None) -> Path:
        """Write the adapter folder: ``adapter_model.safetensors`` (tensors and metadata, the
        authority), ``adapter_config.json`` (the same metadata plus ``"library": "tensoradapt"``,
        for humans and tools) and a ``README.md`` model card (written unless the folder has a
        README.md of its own).  Every file is written atomically; the folder is created.
        ``tensoradapt.torch.load(model, folder)`` reads it back.  Returns the ``.safetensors`` path.

        Parameters
        ----------
        folder : path
        state_dict : mapping, optional
            A full ``model.state_dict()`` to take the adapter's tensors from (keys
            ``tensoradapt.<name>.…``, :meth:`state_dict_keys`) instead of the live parameters, as
            ``transformers.Trainer`` passes one under DeepSpeed / FSDP.
        """
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"save_pretrained writes a folder, and {str(folder)!r} is a file")
        folder.mkdir(parents=True, exist_ok=True)
        tensors = self._file_tensors() if state_dict is None else self._tensors_from_state_dict(state_dict)
        metadata = self.file_metadata()
        writer = writes_here(tensors)
        config = folder / CONFIG_FILE
        if writer and (config.exists() or config.is_symlink()):
            config.unlink()  # a crash below leaves a loadable folder: never an old config beside a new file
        path = write_gathered(folder / ADAPTER_FILE, tensors, metadata)
        if writer:
            text = json.dumps({"library": LIBRARY, **metadata}, indent=2, sort_keys=True) + "\n"
            write_bytes(config, text.encode("utf-8"))
            readme = folder / README_FILE
            if not readme.exists() or is_our_card(readme):
                write_bytes(readme, model_card(metadata).encode("utf-8"))
        return path
