r"""Target shapes from files, text and models, and parameter-count tables built on them.

Sources of target shapes (all return a list of :class:`Target` ``(name, shape)``):

* :func:`parse_shapes` — text such as ``"24x768x768"`` (24 copies of ``768×768``) or
  ``"768x768,768x3072"``, or a path to a ``.json`` / ``.safetensors`` file;
* :func:`shapes_from_safetensors` — the tensor shapes stored in a safetensors file, read from
  its header alone (8-byte length + JSON) with the standard library: the tensor data is never
  read and nothing is unpickled;
* :func:`shapes_from_json` — ``[[768, 768], …]``, ``[{"name": …, "shape": […]}, …]`` or
  ``{"name": [768, 768], …}``;
* :func:`shapes_from_model` — the ``(o, n)`` matrices of a torch model's target modules, as
  :func:`tensoradapt.torch.attach` sees them: read by the binding
  (:func:`tensoradapt.torch.targets.shapes_from_model`), found through an entry point (the core
  never imports torch or the bindings).

:func:`count_table` and :func:`budget_sweep` count parameters of presets or configurations on
those shapes (through :mod:`tensoradapt.budget`); :func:`format_count_table` /
:func:`format_budget_sweep` (in :mod:`.report`, re-exported here) render them as text.

The safetensors header is read by the library's one reader (:mod:`tensoradapt._safetensors`),
and a model's targets are selected and viewed as ``(o, n)`` matrices by the binding, with the
core's rule (:mod:`tensoradapt._targets`).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import tensoradapt._safetensors as safetensors_header

from .._json import StrictJSONError, loads_strict
from .._validate import MAX_DIM, MAX_NDIM, brief, is_int
from .report import format_budget_sweep, format_count_table  # re-exported: the text tables live in report

__all__ = [
    "DEFAULT_PRESETS",
    "DEFAULT_RANKS",
    "OVER_DENSE_NOTE",
    "PRESETS",
    "CountRow",
    "ShapeSourceError",
    "Target",
    "budget_sweep",
    "count_table",
    "format_budget_sweep",
    "format_count_table",
    "parse_preset",
    "parse_shapes",
    "read_safetensors_header",
    "shapes_from_json",
    "shapes_from_model",
    "shapes_from_safetensors",
]

#: Most targets a shape source may describe (text such as ``SxOxN``, a JSON ``count``): refused beyond.
MAX_TARGETS = 10**6
#: Largest shape file read (a JSON shape list; a safetensors header has its own limit).
MAX_SHAPE_FILE_BYTES = 64 * 2**20
#: Deepest nesting of a JSON shape file (``{"targets": [{"shape": [768, 768]}]}`` nests 4 deep).
MAX_SHAPE_FILE_DEPTH = 16


class ShapeSourceError(ValueError):
    """A shape source (text, JSON, safetensors header, model) is malformed or unusable."""


class Target(NamedTuple):
    """One target weight: its name and shape (and, for safetensors files, its dtype)."""

    name: str
    shape: tuple[int, ...]
    dtype: str | None = None


# ---------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------
def _selected(targets: Iterable[Target], min_ndim: int, pattern: str | None) -> list[Target]:
    regex = None
    if pattern is not None:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ShapeSourceError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from None
    return [t for t in targets if len(t.shape) >= min_ndim and (regex is None or regex.search(t.name))]


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed JSON header of a safetensors file (tensor entries and ``__metadata__``).

    Reads the 8-byte little-endian header length and the header only, never the tensor data, and
    checks it with the library's one safetensors reader (:mod:`tensoradapt._safetensors`: the
    header against the file size and the 100 MB limit, dtypes, byte sizes, and offsets that tile
    the data without gap or overlap).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ShapeSourceError
        If the file is too short, the header length exceeds the file or 100 MB, the header is not
        a JSON object, or a tensor entry is malformed or points outside the file.
    """
    path = os.fspath(path)
    try:
        return safetensors_header.read_header(path).header
    except safetensors_header.SafetensorsHeaderError as exc:
        raise ShapeSourceError(f"{path}: {exc}") from None


def shapes_from_safetensors(path: str | os.PathLike[str], *, min_ndim: int = 2,
                            pattern: str | None = None) -> list[Target]:
    """Target shapes stored in a safetensors file, from its header alone.

    Parameters
    ----------
    path : path
    min_ndim : int
        Keep tensors with at least this many dimensions (default 2: weight matrices, not biases).
    pattern : str, optional
        Keep only names matching this regular expression (``re.search``).

    Returns
    -------
    list of Target
        In storage order (ascending data offset), which is the order of the header for files
        written by the reference library.

    Raises
    ------
    FileNotFoundError, ShapeSourceError
        See :func:`read_safetensors_header`.
    """
    path = os.fspath(path)
    try:
        tensors = safetensors_header.read_header(path).tensors
    except safetensors_header.SafetensorsHeaderError as exc:
        raise ShapeSourceError(f"{path}: {exc}") from None
    targets = [Target(name, tuple(e["shape"]), e["dtype"]) for name, e in tensors.items()]
    return _selected(targets, min_ndim, pattern)


def _shape_of(value: Any, where: str) -> tuple[int, ...]:
    if (not isinstance(value, (list, tuple)) or not value or len(value) > MAX_NDIM
            or any(not is_int(d) or not 1 <= d <= MAX_DIM for d in value)):
        raise ShapeSourceError(f"{where}: a shape is a non-empty list of positive integers (at most {MAX_NDIM}, "
                               f"each <= 2**64 - 1), got {brief(value)}")
    return tuple(value)


def _read_regular(path: str, limit: int) -> bytes:
    """The bytes of the regular file ``path`` (at most ``limit``): a FIFO, device or folder is
    refused before it is opened, so reading never blocks or runs without end."""
    info = os.stat(path)  # FileNotFoundError / PermissionError
    if not stat.S_ISREG(info.st_mode):
        raise ShapeSourceError(f"{path}: not a regular file")
    if info.st_size > limit:
        raise ShapeSourceError(f"{path}: {info.st_size:,} bytes, more than the {limit:,} a shape file may have")
    with open(path, "rb") as fh:  # read what the file holds (+1 to tell if it grew), not a buffer of `limit`
        raw = fh.read(info.st_size + 1)
    if len(raw) > limit:
        raise ShapeSourceError(f"{path}: more than the {limit:,} bytes a shape file may have")
    return raw


def shapes_from_json(source: str | os.PathLike[str] | Any, *, min_ndim: int = 1,
                     pattern: str | None = None) -> list[Target]:
    """Target shapes from a JSON file (or an already parsed JSON value).

    Accepted forms: a list of shapes ``[[768, 768], [768, 3072]]``; a list of objects
    ``[{"name": "q", "shape": [768, 768]}, …]`` (``"count"`` optionally repeats an entry); an
    object ``{"q": [768, 768], …}``; or an object with a ``"targets"`` key holding one of these.
    A file is read strictly (:func:`tensoradapt._json.loads_strict`): at most
    :data:`MAX_SHAPE_FILE_BYTES` bytes of UTF-8 nesting at most :data:`MAX_SHAPE_FILE_DEPTH` levels
    (checked before parsing), no repeated key, NaN or over-long integer.

    Examples
    --------
    >>> [t.shape for t in shapes_from_json([[2, 3], {"name": "v", "shape": [4, 4], "count": 2}])]
    [(2, 3), (4, 4), (4, 4)]
    """
    where = "JSON shapes"
    if isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
        raw = _read_regular(where, MAX_SHAPE_FILE_BYTES)
        try:  # depth checked before parsing: a deep file is refused in linear time, never recursed into
            data = loads_strict(raw.decode("utf-8"), max_depth=MAX_SHAPE_FILE_DEPTH)
        except UnicodeDecodeError as exc:
            raise ShapeSourceError(f"{where}: the file is not UTF-8 text (byte {exc.start})") from None
        except StrictJSONError as exc:
            raise ShapeSourceError(f"{where}: the file {exc}") from None
    else:
        data = source
    if isinstance(data, Mapping) and "targets" in data:
        data = data["targets"]
    targets: list[Target] = []
    if isinstance(data, Mapping):
        targets = [Target(str(k), _shape_of(v, f"{where}[{str(k)[:60]!r}]")) for k, v in data.items()]
    elif isinstance(data, list):
        for i, item in enumerate(data):
            if isinstance(item, Mapping):
                if "shape" not in item:
                    raise ShapeSourceError(f"{where}[{i}]: an object entry needs a 'shape', got keys "
                                           f"{sorted(map(str, item))[:8]}")
                count = item.get("count", 1)
                if not is_int(count) or count < 1:
                    raise ShapeSourceError(f"{where}[{i}]: 'count' must be a positive integer, got {brief(count)}")
                if len(targets) + count > MAX_TARGETS:
                    raise ShapeSourceError(f"{where}: more than {MAX_TARGETS:,} targets (the documented cap)")
                shape = _shape_of(item["shape"], f"{where}[{i}]")
                name = str(item.get("name", i))
                targets += [Target(name if count == 1 else f"{name}.{c}", shape) for c in range(count)]
            else:
                targets.append(Target(str(i), _shape_of(item, f"{where}[{i}]")))
            if len(targets) > MAX_TARGETS:
                raise ShapeSourceError(f"{where}: more than {MAX_TARGETS:,} targets (the documented cap)")
    else:
        raise ShapeSourceError(f"{where}: expected a list of shapes or an object of name -> shape, "
                               f"got {type(data).__name__}")
    if not targets:
        raise ShapeSourceError(f"{where}: no target shapes")
    return _selected(targets, min_ndim, pattern)


_DIM = r"[1-9][0-9]*"
_ITEM = re.compile(rf"^({_DIM})[xX*×]({_DIM})(?:[xX*×]({_DIM}))?$")


def parse_shapes(spec: str, *, min_ndim: int = 2, pattern: str | None = None) -> list[Target]:
    """Target shapes from a command-line style specification.

    ``spec`` is either a path to a ``.json`` or ``.safetensors`` file, or comma-separated items
    ``OxN`` (one ``O×N`` weight) and ``SxOxN`` (``S`` copies of ``O×N``).

    Examples
    --------
    >>> [t.shape for t in parse_shapes("2x768x768,768x3072")]
    [(768, 768), (768, 768), (768, 3072)]

    Raises
    ------
    FileNotFoundError
        For a ``.json`` / ``.safetensors`` path that does not exist.
    ShapeSourceError
        For a malformed item (the message names it and the accepted forms).
    """
    text = str(spec).strip()
    lowered = text.lower()
    if lowered.endswith(".safetensors"):
        return shapes_from_safetensors(text, min_ndim=min_ndim, pattern=pattern)
    if lowered.endswith(".json"):
        return shapes_from_json(text, min_ndim=min_ndim, pattern=pattern)
    if os.path.exists(text):
        raise ShapeSourceError(f"{text}: shape files must end in .json or .safetensors")
    if len(text) > MAX_SHAPE_FILE_BYTES:
        raise ShapeSourceError(f"the shape text has {len(text):,} characters, more than {MAX_SHAPE_FILE_BYTES:,}")
    targets: list[Target] = []
    items = [item.strip() for item in text.split(",")]
    for item in items:
        match = _ITEM.match(item)
        if match is None:
            raise ShapeSourceError(f"malformed shape {item[:60]!r} in {text[:80]!r}: use OxN (one weight), SxOxN "
                                   "(S weights of O×N), comma-separated, or a .json/.safetensors path")
        if any(len(part) > 20 for part in match.groups() if part is not None):
            raise ShapeSourceError(f"shape {item[:60]!r}: a number has more than 20 digits (dimensions are at most "
                                   "2**64 - 1)")
        a, b, c = (None if part is None else int(part) for part in match.groups())
        dims = (a, b) if c is None else (b, c)
        if max(dims) > MAX_DIM:
            raise ShapeSourceError(f"shape {item[:60]!r}: a dimension exceeds 2**64 - 1")
        count = 1 if c is None else a
        if len(targets) + count > MAX_TARGETS:
            raise ShapeSourceError(f"{text[:80]!r} describes more than {MAX_TARGETS:,} targets (the documented cap)")
        targets += [Target(str(len(targets) + s), dims) for s in range(count)]
    return _selected(targets, 0, pattern)


#: The entry-point group through which a framework binding supplies :func:`shapes_from_model`
#: (``tensoradapt.torch`` registers ``torch = tensoradapt.torch.targets:shapes_from_model``): the core
#: imports neither a framework nor a binding, it finds the reader by name.
MODEL_SHAPES_GROUP = "tensoradapt.model_shapes"


def shapes_from_model(model: Any, targets: str | Sequence[str] | Callable[[str, Any], bool] | None = None, *,
                      min_ndim: int = 2) -> list[Target]:
    r"""Target weights of a framework's model, in its module order (docs/math.md D1): the ``(o, n)``
    matrices an adapter generates for the selected modules, by the rule its binding's ``attach``
    uses, so ``count_params(config, shapes_from_model(model, targets))`` is the ``num_params`` of
    ``attach(model, config, targets)``.

    The reader is the binding's (for torch: :func:`tensoradapt.torch.targets.shapes_from_model`,
    which documents ``targets``, ``min_ndim``, the shapes and the errors), found through the
    :data:`MODEL_SHAPES_GROUP` entry points by the framework of the model's class (with no such
    entry point, as in an install whose metadata predates it, the torch binding by its module name).

    Raises
    ------
    ImportError
        No binding is installed (``pip install tensoradapt[torch]``), or PyTorch is but the binding
        does not import (reinstall tensoradapt).
    TypeError, ShapeSourceError
        As the binding's reader raises them (a model it cannot read, no module matching ``targets``).
    """
    return _model_reader(model)(model, targets, min_ndim=min_ndim)


def _model_reader(model: Any) -> Callable[..., list[Target]]:
    """The installed binding's ``shapes_from_model`` for ``model``: the one named after a top-level
    package of the model's class hierarchy (``torch`` for an ``nn.Module``), else the only one; with
    no entry point at all (stale install metadata), the torch binding's if it imports."""
    from importlib.metadata import entry_points

    readers = {ep.name: ep for ep in entry_points(group=MODEL_SHAPES_GROUP)}
    if not readers:
        return _torch_reader()
    frameworks = [cls.__module__.split(".")[0] for cls in type(model).__mro__]
    name = next((f for f in frameworks if f in readers), None)
    if name is None and len(readers) > 1:
        raise TypeError(f"model must be a model of one of {sorted(readers)}, got {type(model).__name__}")
    return readers[name if name is not None else next(iter(readers))].load()


def _torch_reader() -> Callable[..., list[Target]]:
    """The torch binding's reader found without its entry point: the package's metadata can lack the
    entry point (an editable install made before it was declared) while the binding imports fine.
    Looked up by name at call time, so the core still imports no binding (docs/architecture.md)."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise ImportError("shapes_from_model reads a model through a framework binding, and none is installed "
                          "(pip install tensoradapt[torch])")
    try:
        module = importlib.import_module("tensoradapt.torch.targets")
    except ImportError as error:
        raise ImportError("shapes_from_model found no framework binding: PyTorch is installed but tensoradapt.torch "
                          f"is not importable ({error}); reinstall tensoradapt (pip install --force-reinstall "
                          "tensoradapt[torch])") from error
    return module.shapes_from_model


# the parameter tables live in .counts; importable from here as before (docs/analysis.md lists them here)
from .counts import (  # noqa: E402  (counts reads Target, defined above)
    DEFAULT_PRESETS,
    DEFAULT_RANKS,
    OVER_DENSE_NOTE,
    PRESETS,
    CountRow,
    budget_sweep,
    count_table,
    parse_preset,
)
