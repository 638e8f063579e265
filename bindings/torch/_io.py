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
from tensoradapt._json import StrictJSONError, loads_strict

__all__ = ["CONFIG_FILE", "FORMAT", "FORMAT_VERSION", "LIBRARY", "README_FILE", "AdapterFileError", "adapter_path",
           "adapter_subfolders", "canonical_header", "check_config_file", "check_file", "locate_adapter",
           "read_adapter", "read_metadata", "write_adapter", "write_bytes"]

FORMAT = "tensoradapt.adapter"
FORMAT_VERSION = 1
_METADATA_KEY = "tensoradapt"
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


def glob_escape(name: str) -> str:
    """``name`` with the glob metacharacters escaped."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


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
    return write_bytes(path, canonical_header(_safetensors().save(host, metadata=header)))


def canonical_header(blob: bytes) -> bytes:
    """``blob`` (a safetensors file) with its header re-serialised in a fixed order: safetensors
    writes the ``__metadata__`` entries in a per-process hash order, so the same adapter saved by
    two processes (two ranks, two runs) would differ in bytes.  Tensor data offsets are relative
    to the end of the header, so only the header changes; it is space-padded to a multiple of 8
    bytes as safetensors pads it."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    if isinstance(header.get(safetensors_header.METADATA_KEY), dict):
        header[safetensors_header.METADATA_KEY] = dict(sorted(header[safetensors_header.METADATA_KEY].items()))
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + size:]


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (a temporary file in the same folder, fsync,
    ``os.replace``, fsync of the folder); return the path.

    A crash mid-write leaves the old file or the new one, never a torn file; a temporary file left
    by a killed write (``.NAME.<pid>.*.tmp``) is removed by the next write of the same file, unless
    its process still runs (a concurrent writer of the same path).  The file
    keeps the mode of the one it replaces (else ``open()``'s: 0666 minus the umask).
    """
    path = Path(path)
    if not path.parent.exists():
        raise FileNotFoundError(f"folder {str(path.parent)!r} does not exist")
    for stale in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):  # left by a save that was killed
        if _writer_alive(stale, path.name):
            continue  # another process (or thread) is writing it now: not stale
        try:
            stale.unlink()
        except OSError:  # pragma: no cover - raced with another cleaner
            pass
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes the file 0600; give it the usual mode
            os.fchmod(fd, _file_mode(path))
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
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


def _writer_alive(temp: Path, name: str) -> bool:
    """Whether the temporary file ``temp`` must be left alone by a write of ``name``: it belongs to
    a write that may still run (``.NAME.<pid>.<random>.tmp`` of this process, i.e. another thread, or
    of a live process, e.g. another rank saving the same path), or it is not a temporary of ``NAME``
    at all (the glob also matches ``.NAME.bak.safetensors.<pid>.<random>.tmp`` of another file).
    ``.NAME.<random>.tmp`` (an older version's, no pid) and those of finished processes are stale."""
    parts = temp.name[len(name) + 2:-len(".tmp")].split(".")  # mkstemp's random part has no dot
    if len(parts) == 1:
        return False
    if len(parts) != 2 or not parts[0].isascii() or not parts[0].isdigit() or len(parts[0]) > 10:
        return True
    pid = int(parts[0])
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):  # alive under another user, or unknowable: keep it
        return True
    return True


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


def adapter_path(path: str | os.PathLike[str]) -> Path:
    """The adapter file of ``path``: the path itself, or ``path/adapter_model.safetensors`` for a
    folder (what ``save_pretrained`` writes)."""
    from ._shared import ADAPTER_FILE

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
    from ._shared import ADAPTER_FILE, check_adapter_name

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
    from ._shared import ADAPTER_FILE

    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.is_dir() and p.name.isidentifier() and (p / ADAPTER_FILE).is_file())


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
    path, config = locate_adapter(path, name)
    if not path.exists():
        raise FileNotFoundError(f"no adapter file at {str(path)!r}")
    if not path.is_file():  # a FIFO, a device, a folder without the adapter file: never opened
        raise AdapterFileError(f"{str(path)!r} is not a regular file (an adapter is a .safetensors file or a folder "
                               "holding adapter_model.safetensors)")
    header = _read_header(path)  # __metadata__ is checked there: an object of strings to strings
    text = (header.get(safetensors_header.METADATA_KEY) or {}).get(_METADATA_KEY)
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
    metadata = read_metadata(path, name=name)
    path, _ = locate_adapter(path, name)
    tensors = _load_tensors(path)
    _check_tensors(tensors, metadata, repr(str(path)))
    return tensors, metadata


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return dict(_safetensors().load_file(str(path), device="cpu"))
    except Exception as error:  # safetensors raises its own error type for every corruption
        raise AdapterFileError(f"{str(path)!r} is corrupted: {error}") from None


# ---------------------------------------------------------------------------------- strict checks
def _strict_int(value: Any) -> bool:
    return type(value) is int


def _shape(value: Any, what: str, where: str, *, length: int | None = None, positive: bool = False) -> list[int]:
    if not isinstance(value, list) or not all(_strict_int(d) and (d > 0 if positive else d >= 0) for d in value) \
            or (length is not None and len(value) != length) or any(d >= 2**63 for d in value):
        raise AdapterFileError(f"{where} is corrupted: {what} is {value!r:.80}, not a list of "
                               f"{length or ''}{' ' if length else ''}{'positive' if positive else 'non-negative'} "
                               "integers")
    return value


def _check_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, Any], where: str) -> None:
    """Every tensor the metadata names (adapter ``parameters`` and ``modules_to_save``) is in the
    file with its recorded shape and dtype, and nothing else is."""
    expected = metadata.get("parameters")
    if not isinstance(expected, dict) or not expected or not all(isinstance(k, str) and k for k in expected):
        raise AdapterFileError(f"{where} is corrupted: its metadata has no 'parameters' table")
    dtype = metadata.get("param_dtype")
    if dtype not in PARAM_DTYPES:
        raise AdapterFileError(f"{where}: param_dtype {dtype!r:.40} is not one of {list(PARAM_DTYPES)}")
    shapes = {name: _shape(shape, f"the shape of {name!r:.80}", where) for name, shape in expected.items()}
    from ._shared import MODULES_TO_SAVE_PREFIX

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
            shapes[key] = _shape(shape, f"the shape of {key!r:.80}", where)
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


_TARGET_KEYS = {"superlora": {"name", "kind", "shape", "weight_shape"}, "glora": {"name", "kind", "shape", "has_bias"}}


def check_file(path: str | os.PathLike[str], *, name: str = "default") -> tuple[Path, dict[str, torch.Tensor],
                                                                             dict[str, Any]]:
    """``(path, tensors, metadata)`` of an adapter file (or of the adapter ``name`` of a folder,
    :func:`locate_adapter`), everything checked that the file alone can tell: format and version,
    strict JSON types of every field, the folder's ``adapter_config.json`` against the metadata,
    the config (built: ``metadata["config"]`` is the config object), the targets, the tensors
    against the metadata and the seed.  Raises ``FileNotFoundError`` or :class:`AdapterFileError`
    (naming the file)."""
    from tensoradapt import GLoRAConfig, SuperLoRAConfig, buffers
    from tensoradapt._targets import KINDS

    metadata = read_metadata(path, name=name)
    path, _ = locate_adapter(path, name)
    where = repr(str(path))
    method = metadata.get("method")
    if not isinstance(method, str) or method not in _TARGET_KEYS:
        raise AdapterFileError(f"{where}: unknown adapter method {method!r:.40}")
    targets = metadata.get("targets")
    if not isinstance(targets, list) or not targets:
        raise AdapterFileError(f"{where} is corrupted: its target list is {targets!r:.80} (a non-empty list needed)")
    names = []
    for record in targets:
        if not isinstance(record, dict) or set(record) != _TARGET_KEYS[method]:
            raise AdapterFileError(f"{where} is corrupted: a target record is {record!r:.80}; expected the keys "
                                   f"{sorted(_TARGET_KEYS[method])}")
        name = record["name"]
        if not isinstance(name, str) or not name:
            raise AdapterFileError(f"{where} is corrupted: a target name is {name!r:.40}, not a module name")
        if record["kind"] not in KINDS:
            raise AdapterFileError(f"{where} is corrupted: target {name!r:.80} has kind {record['kind']!r:.40}")
        _shape(record["shape"], f"the shape of target {name!r:.80}", where, length=2, positive=True)
        if method == "superlora":
            _shape(record["weight_shape"], f"the weight shape of target {name!r:.80}", where, positive=True)
        elif type(record["has_bias"]) is not bool:
            raise AdapterFileError(f"{where} is corrupted: has_bias of target {name!r:.80} is "
                                   f"{record['has_bias']!r:.40}, not true or false")
        names.append(name)
    if len(set(names)) != len(names):
        raise AdapterFileError(f"{where} is corrupted: the target list repeats a name")
    seed = metadata.get("seed")
    if not _strict_int(seed) or not 0 <= seed < 2**64:
        raise AdapterFileError(f"{where} is corrupted: seed is {seed!r:.40}, not a non-negative 64-bit integer")
    generator = metadata.get("generator_id")
    if not isinstance(generator, str) or generator not in buffers.GENERATORS:
        raise AdapterFileError(
            f"{where} was made with buffer generator {generator!r:.80}, which this tensoradapt cannot reproduce "
            f"(it knows {list(buffers.GENERATORS)}), so its fixed projections would differ"
        )
    config_type = SuperLoRAConfig if method == "superlora" else GLoRAConfig
    raw = metadata.get("config")
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{where} is corrupted: its config is {raw!r:.80}, not an object")
    try:
        config = config_type.from_dict(raw)
    except (TypeError, ValueError, KeyError, OverflowError) as error:
        raise AdapterFileError(f"{where}: unreadable {config_type.__name__} ({type(error).__name__}: "
                               f"{str(error)[:300]})") from None
    tensors = _load_tensors(path)
    _check_tensors(tensors, metadata, where)
    checked = dict(metadata)
    checked["config"] = config
    return path, tensors, checked


def check_model_targets(model: torch.nn.Module, metadata: dict[str, Any], where: str) -> list[tuple[str, Any]]:
    """The model's modules the file targets, refused like at attach (``AdapterFileError``)."""
    from ._shared import check_targets, plain_named_modules

    modules = dict(plain_named_modules(model))
    names = [r["name"] for r in metadata["targets"]]
    missing = [n for n in names if n not in modules]
    if missing:
        raise AdapterFileError(
            f"{where} targets modules the model does not have: {missing[:5]}"
            f"{' …' if len(missing) > 5 else ''} ({len(missing)} of {len(names)})"
        )
    try:
        return check_targets(model, [(n, modules[n]) for n in names])
    except (TypeError, ValueError, RuntimeError) as error:
        raise AdapterFileError(f"{where}: {error}") from None


def check_saved_modules(model: torch.nn.Module, metadata: dict[str, Any], tensors: dict[str, torch.Tensor],
                        where: str) -> tuple[list[str], dict[str, dict[str, torch.Tensor]]]:
    """``(names, {name: {param: tensor}})`` of the file's ``modules_to_save``, checked against the
    model's modules (same parameters and shapes)."""
    from ._shared import MODULES_TO_SAVE_PREFIX

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
