"""Reading adapter files strictly: the header by the library's one reader, the metadata by the one
strict JSON reader, every field's type, the tensors against the metadata.  Nothing is unpickled.

A path is resolved once per read (:func:`~.layout.locate_adapter`), and everything a file alone can
tell is checked before a model is touched; what only a method knows (its target records, its config
type) comes from the method registry (:func:`check_file`'s ``methods``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import tensoradapt._safetensors as safetensors_header
from tensoradapt import buffers
from tensoradapt._json import StrictJSONError, loads_strict
from tensoradapt._targets import KINDS

from .layout import (
    FORMAT,
    FORMAT_VERSION,
    LIBRARY,
    MAX_CONFIG_BYTES,
    MAX_METADATA_DEPTH,
    METADATA_KEY,
    MODULES_TO_SAVE_PREFIX,
    PARAM_DTYPES,
    AdapterFileError,
    locate_adapter,
)
from .write import safetensors_torch

__all__ = ["check_config_file", "check_file", "check_saved_modules", "check_tensors", "load_tensors",
           "parse_metadata", "read_adapter", "read_json_file", "read_located", "read_metadata", "shape_field",
           "strict_int"]


def _read_header(path: Path) -> dict[str, Any]:
    """The checked safetensors header (the library's one reader), errors naming the file."""
    try:
        return safetensors_header.read_header(path).header
    except safetensors_header.SafetensorsHeaderError as error:
        raise AdapterFileError(f"{str(path)!r} is corrupted or not a safetensors file: {error}") from None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def read_json_file(path: Path, *, max_bytes: int) -> Any:
    """The JSON of the file ``path`` (an ``adapter_config.json``, ours or PEFT's), strictly: a regular
    file of at most ``max_bytes`` bytes, UTF-8, parsed by :func:`parse_metadata`'s rules;
    ``AdapterFileError`` naming the file otherwise."""
    where = repr(str(path))
    if not path.is_file():
        raise AdapterFileError(f"{where} is not a regular file")
    size = path.stat().st_size
    if size > max_bytes:
        raise AdapterFileError(f"{where} is corrupted: {size:,} bytes, over the limit of {max_bytes:,}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise AdapterFileError(f"{where} is corrupted: not UTF-8 ({error})") from None
    return parse_metadata(text, where, what="JSON")


def check_config_file(config: Path, metadata: dict[str, Any], file: Path) -> None:
    """Refuse (``AdapterFileError`` naming ``config``) an ``adapter_config.json`` that is not
    tensoradapt's or that disagrees with the metadata of the adapter file beside it (which is
    authoritative): parsed with the limits of :func:`parse_metadata`, at most
    :data:`MAX_CONFIG_BYTES`, UTF-8, ``"library": "tensoradapt"`` and every other key equal (as
    JSON) to the file's metadata, none missing."""
    where = repr(str(config))
    data = read_json_file(config, max_bytes=MAX_CONFIG_BYTES)
    if not isinstance(data, dict):
        raise AdapterFileError(f"{where} is corrupted: not a JSON object")
    library = data.get("library")
    if library != LIBRARY:
        if "peft_type" in data:
            raise AdapterFileError(f"{where} is a PEFT adapter config (peft_type {data['peft_type']!r:.40}), not a "
                                   "tensoradapt one: load that folder with peft.PeftModel.from_pretrained")
        raise AdapterFileError(f"{where} has library {library!r:.40}, expected {LIBRARY!r} (not a tensoradapt "
                               "adapter config)")
    facts = {k: v for k, v in data.items() if k != "library"}
    differ = sorted(set(facts) ^ set(metadata))
    differ += sorted(k for k in set(facts) & set(metadata) if _canonical(facts[k]) != _canonical(metadata[k]))
    if differ:
        raise AdapterFileError(
            f"{where} disagrees with {str(file)!r} (whose metadata is authoritative) on {differ[:5]}: the folder was "
            "edited or mixed from two saves; save the adapter again, or delete adapter_config.json to load the "
            ".safetensors file alone"
        )


def parse_metadata(text: str, where: str, *, what: str = "tensoradapt metadata") -> Any:
    """The JSON ``text`` (the ``what`` of the file ``where``), by the one strict reader
    (:func:`tensoradapt._json.loads_strict`): at most :data:`MAX_METADATA_DEPTH` deep (checked
    before parsing), no NaN/Infinity, no repeated key, no integer of more than 4300 digits;
    ``AdapterFileError`` ("``where`` is corrupted: its ``what`` ...") otherwise."""
    try:
        return loads_strict(text, max_depth=MAX_METADATA_DEPTH)
    except StrictJSONError as error:
        raise AdapterFileError(f"{where} is corrupted: its {what} {error}") from None


def read_metadata(path: str | os.PathLike[str], *, name: str = "default") -> dict[str, Any]:
    """The tensoradapt metadata of an adapter file or folder (reads the header only, never the tensors).

    For a folder, the adapter ``name`` (see :func:`locate_adapter`), and its ``adapter_config.json``
    when there is one, checked against the metadata (:func:`check_config_file`).

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    AdapterFileError
        Not a safetensors file, no tensoradapt metadata, an unsupported format version, or an
        ``adapter_config.json`` that is not tensoradapt's or disagrees with the file.
    """
    return read_located(*locate_adapter(path, name))


def read_located(path: Path, config: Path | None) -> dict[str, Any]:
    """:func:`read_metadata` of the adapter file ``path`` and its ``adapter_config.json``
    (``config``, or None) as :func:`~.layout.locate_adapter` found them (a path is resolved once)."""
    if not path.exists():
        raise FileNotFoundError(f"no adapter file at {str(path)!r}")
    if not path.is_file():  # a FIFO, a device, a folder without the adapter file: never opened
        raise AdapterFileError(f"{str(path)!r} is not a regular file (an adapter is a .safetensors file or a folder "
                               "holding adapter_model.safetensors)")
    header = _read_header(path)  # __metadata__ is checked there: an object of strings to strings
    text = (header.get(safetensors_header.METADATA_KEY) or {}).get(METADATA_KEY)
    if text is None:
        raise AdapterFileError(f"{str(path)!r} is a safetensors file without tensoradapt metadata (not an adapter)")
    data = parse_metadata(text, repr(str(path)))
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise AdapterFileError(f"{str(path)!r} has format {data.get('format') if isinstance(data, dict) else None!r}, "
                               f"expected {FORMAT!r}")
    version = data.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        newer = type(version) is int and version > FORMAT_VERSION
        raise AdapterFileError(
            f"{str(path)!r} has format_version {version!r:.40}; this tensoradapt reads version {FORMAT_VERSION}"
            + (" (the file was written by a newer tensoradapt: upgrade)" if newer else "")
        )
    _check_base_model(data.get("base_model"), repr(str(path)))
    if config is not None:
        check_config_file(config, data, path)
    return data


def _check_base_model(record: Any, where: str) -> None:
    """``base_model`` (optional): an object with ``name_or_path`` and/or ``commit``, non-empty strings."""
    if record is None:
        return
    if not isinstance(record, dict) or not record or not set(record) <= {"name_or_path", "commit"} \
            or not all(isinstance(v, str) and v for v in record.values()):
        raise AdapterFileError(f"{where} is corrupted: base_model is {record!r:.80}, not an object of "
                               "name_or_path / commit strings")


def read_adapter(path: str | os.PathLike[str], *, name: str = "default") -> tuple[dict[str, torch.Tensor],
                                                                                  dict[str, Any]]:
    """``(tensors, metadata)`` of an adapter file or folder, checked (:func:`check_file`), the
    metadata's ``config`` left as its JSON object."""
    path, config = locate_adapter(path, name)
    metadata = read_located(path, config)
    tensors = load_tensors(path)
    check_tensors(tensors, metadata, repr(str(path)))
    return tensors, metadata


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path``, on the CPU (``AdapterFileError`` when corrupted)."""
    try:
        return dict(safetensors_torch().load_file(str(path), device="cpu"))
    except Exception as error:  # safetensors raises its own error type for every corruption
        raise AdapterFileError(f"{str(path)!r} is corrupted: {error}") from None


# ---------------------------------------------------------------------------------- strict checks
def strict_int(value: Any) -> bool:
    """Whether ``value`` is an ``int`` itself (JSON integers; ``bool`` is not one)."""
    return type(value) is int


def shape_field(value: Any, what: str, where: str, *, length: int | None = None, positive: bool = False) -> list[int]:
    """``value`` when it is a list of (``length``) non-negative (``positive``) integers below 2**63;
    ``AdapterFileError`` naming ``what`` of the file ``where`` otherwise."""
    if not isinstance(value, list) or not all(strict_int(d) and (d > 0 if positive else d >= 0) for d in value) \
            or (length is not None and len(value) != length) or any(d >= 2**63 for d in value):
        raise AdapterFileError(f"{where} is corrupted: {what} is {value!r:.80}, not a list of "
                               f"{length or ''}{' ' if length else ''}{'positive' if positive else 'non-negative'} "
                               "integers")
    return value


def check_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, Any], where: str) -> None:
    """Every tensor the metadata names (adapter ``parameters`` and ``modules_to_save``) is in the
    file with its recorded shape and dtype, and nothing else is."""
    expected = metadata.get("parameters")
    if not isinstance(expected, dict) or not expected or not all(isinstance(k, str) and k for k in expected):
        raise AdapterFileError(f"{where} is corrupted: its metadata has no 'parameters' table")
    dtype = metadata.get("param_dtype")
    if dtype not in PARAM_DTYPES:
        raise AdapterFileError(f"{where}: param_dtype {dtype!r:.40} is not one of {list(PARAM_DTYPES)}")
    shapes = {name: shape_field(shape, f"the shape of {name!r:.80}", where) for name, shape in expected.items()}
    saved = metadata.get("modules_to_save", [])
    if not isinstance(saved, list):
        raise AdapterFileError(f"{where} is corrupted: modules_to_save is {saved!r:.80}, not a list")
    saved_names = set()
    for record in saved:
        if not isinstance(record, dict) or set(record) != {"name", "type", "parameters"} \
                or not isinstance(record["name"], str) or not record["name"] or not isinstance(record["type"], str) \
                or not isinstance(record["parameters"], dict) or record["name"] in saved_names:
            raise AdapterFileError(f"{where} is corrupted: a modules_to_save entry is {record!r:.80}")
        saved_names.add(record["name"])
        for pname, shape in record["parameters"].items():
            key = f"{MODULES_TO_SAVE_PREFIX}{record['name']}.{pname}"
            if key in shapes:
                raise AdapterFileError(f"{where} is corrupted: {key!r} is listed twice")
            shapes[key] = shape_field(shape, f"the shape of {key!r:.80}", where)
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise AdapterFileError(f"{where} is corrupted: tensors missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in shapes.items():
        tensor = tensors[name]
        if list(tensor.shape) != list(shape):
            raise AdapterFileError(
                f"{where}: tensor {name!r} has shape {list(tensor.shape)} but the metadata says {list(shape)}"
            )
        if name in expected and str(tensor.dtype).removeprefix("torch.") != dtype:
            raise AdapterFileError(
                f"{where}: dtype mismatch, tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')} "
                f"but the adapter's parameters are {dtype}"
            )
        if name in expected and not tensor.dtype.is_floating_point:  # saved modules' buffers: check_saved_modules
            raise AdapterFileError(f"{where}: tensor {name!r} is {tensor.dtype}, not a floating dtype")


def check_file(path: str | os.PathLike[str], methods: Mapping[str, Any], *,
               name: str = "default") -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    """``(path, tensors, metadata)`` of an adapter file (or of the adapter ``name`` of a folder,
    :func:`locate_adapter`), everything checked that the file alone can tell: format and version,
    strict JSON types of every field, the folder's ``adapter_config.json`` against the metadata,
    the config (built: ``metadata["config"]`` is the config object), the targets, the tensors
    against the metadata and the seed.  ``methods`` maps each method name a file may carry to what
    the method checks itself (its registry record, :class:`tensoradapt.torch.methods.Method`:
    ``target_keys``, ``check_target(record, name, where)``, ``config_type``).  Raises
    ``FileNotFoundError`` or :class:`AdapterFileError` (naming the file)."""
    path, config_file = locate_adapter(path, name)
    metadata = read_located(path, config_file)
    where = repr(str(path))
    method = metadata.get("method")
    if not isinstance(method, str) or method not in methods:
        raise AdapterFileError(f"{where}: unknown adapter method {method!r:.40}")
    targets = metadata.get("targets")
    if not isinstance(targets, list) or not targets:
        raise AdapterFileError(f"{where} is corrupted: its target list is {targets!r:.80} (a non-empty list needed)")
    method_checks = methods[method]
    keys = method_checks.target_keys
    names = []
    for record in targets:
        if not isinstance(record, dict) or set(record) != keys:
            raise AdapterFileError(f"{where} is corrupted: a target record is {record!r:.80}; expected the keys "
                                   f"{sorted(keys)}")
        name = record["name"]
        if not isinstance(name, str) or not name:
            raise AdapterFileError(f"{where} is corrupted: a target name is {name!r:.40}, not a module name")
        if record["kind"] not in KINDS:
            raise AdapterFileError(f"{where} is corrupted: target {name!r:.80} has kind {record['kind']!r:.40}")
        shape_field(record["shape"], f"the shape of target {name!r:.80}", where, length=2, positive=True)
        method_checks.check_target(record, name, where)
        names.append(name)
    if len(set(names)) != len(names):
        raise AdapterFileError(f"{where} is corrupted: the target list repeats a name")
    seed = metadata.get("seed")
    if not strict_int(seed) or not 0 <= seed < 2**64:
        raise AdapterFileError(f"{where} is corrupted: seed is {seed!r:.40}, not a non-negative 64-bit integer")
    generator = metadata.get("generator_id")
    if not isinstance(generator, str) or generator not in buffers.GENERATORS:
        raise AdapterFileError(
            f"{where} was made with buffer generator {generator!r:.80}, which this tensoradapt cannot reproduce "
            f"(it knows {list(buffers.GENERATORS)}), so its fixed projections would differ"
        )
    config_type = method_checks.config_type
    raw = metadata.get("config")
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{where} is corrupted: its config is {raw!r:.80}, not an object")
    try:
        config = config_type.from_dict(raw)
    except (TypeError, ValueError, KeyError, OverflowError) as error:
        raise AdapterFileError(f"{where}: unreadable {config_type.__name__} ({type(error).__name__}: "
                               f"{str(error)[:300]})") from None
    tensors = load_tensors(path)
    check_tensors(tensors, metadata, where)
    checked = dict(metadata)
    checked["config"] = config
    return path, tensors, checked


def check_saved_modules(model: torch.nn.Module, metadata: dict[str, Any], tensors: dict[str, torch.Tensor],
                        where: str) -> tuple[list[str], dict[str, dict[str, torch.Tensor]]]:
    """``(names, {name: {param: tensor}})`` of the file's ``modules_to_save``, checked against the
    model's modules (same parameters and shapes)."""
    names, values = [], {}
    targets = [r["name"] for r in metadata["targets"]]
    for record in metadata.get("modules_to_save", []):
        name = record["name"]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise AdapterFileError(f"{where} saves module {name!r:.80}, which the model does not have") from None
        if any(t == name or t.startswith(name + ".") or name.startswith(t + ".") for t in targets):
            raise AdapterFileError(f"{where} saves module {name!r:.80}, which overlaps a target")
        if record["type"] != type(module).__name__:
            raise AdapterFileError(f"{where} saves module {name!r:.80} as a {record['type']!r:.40}, but the "
                                   f"model's is a {type(module).__name__}")
        own = {p: list(t.shape) for p, t in module.state_dict().items()}
        if own != record["parameters"]:
            raise AdapterFileError(f"{where}: saved module {name!r:.80} has parameters and buffers "
                                   f"{sorted(record['parameters'])[:5]} with other names or shapes than the model's")
        values[name] = {p: tensors[f"{MODULES_TO_SAVE_PREFIX}{name}.{p}"] for p in own}
        state = module.state_dict()
        for entry, tensor in values[name].items():  # floats stay floats, integer buffers keep their dtype
            mine = state[entry].dtype
            if tensor.dtype != mine and not (tensor.dtype.is_floating_point and mine.is_floating_point):
                raise AdapterFileError(f"{where}: saved module {name!r:.80} entry {entry!r:.40} is {tensor.dtype}, "
                                       f"the model's is {mine}")
        names.append(name)
    return names, values
