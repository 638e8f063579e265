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
  :func:`tensoradapt.torch.attach` sees them (torch is imported only inside that function; the
  core never imports it).

:func:`count_table` and :func:`budget_sweep` count parameters of presets or configurations on
those shapes (through :mod:`tensoradapt.budget`); :func:`format_count_table` /
:func:`format_budget_sweep` (in :mod:`.report`, re-exported here) render them as text.

The safetensors header is read by the library's one reader (:mod:`tensoradapt._safetensors`),
and a model's targets are selected and viewed as ``(o, n)`` matrices by the rule the torch
bindings use (:mod:`tensoradapt._targets`).
"""

from __future__ import annotations

import inspect
import math
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import tensoradapt._safetensors as safetensors_header
import tensoradapt._targets as target_rules

from .._json import StrictJSONError, loads_strict
from .._validate import MAX_DIM, MAX_NDIM, brief, is_int
from ..superlora import presets as _presets
from ..superlora.budget import FAMILIES, BudgetEntry, budget, count_many
from ..superlora.config import SuperLoRAConfig
from ..superlora.generator import SuperLoRA
from .report import format_budget_sweep, format_count_table  # re-exported: the text tables live in report

__all__ = [
    "DEFAULT_PRESETS",
    "DEFAULT_RANKS",
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

#: Preset names usable in :func:`parse_preset` (the functions of :mod:`tensoradapt.presets`).
PRESETS = ("dense", "lora", "lokr", "krona", "loha", "lotr", "lonkr", "lorta")
#: Presets of the default count table.
DEFAULT_PRESETS = ("dense", "lora", "lokr", "loha", "lotr", "lonkr:splits=3", "lorta:order=3", "lorta:order=4")
#: Ranks swept for presets given without an explicit rank.
DEFAULT_RANKS = (1, 2, 4, 8, 16)

#: The note of a count-table row with more trainable parameters than dense fine-tuning (``> N``).
OVER_DENSE_NOTE = "more parameters than dense fine-tuning: over-parameterised, not an adapter"
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


def shapes_from_model(model: Any, targets: str | Sequence[str] | Callable[[str, Any], bool] | None = None, *,
                      min_ndim: int = 2) -> list[Target]:
    r"""Target weights of a torch model, in ``model.named_modules()`` order (docs/math.md D1).

    The shapes are the ``(o, n)`` matrices an adapter generates for the modules, by the same rule
    :func:`tensoradapt.torch.attach` uses, so ``count_params(config, shapes_from_model(model,
    targets))`` is the ``num_params`` of ``attach(model, config, targets)``: ``(out, in)`` for
    ``nn.Linear`` and for transformers' ``Conv1D`` (whose weight is stored ``(in, out)``),
    ``(o, i/groups · Π k)`` for convolutions, ``(num, dim)`` for embeddings.  A weight of fewer than
    two dimensions (with ``min_ndim=1``) keeps its stored shape.

    Parameters
    ----------
    model : torch.nn.Module
    targets : sequence of str, str or callable, optional
        Module selection, as for :func:`tensoradapt.torch.attach`: a sequence of names, each
        matching a module whose qualified name equals it or ends with ``"." + name`` (PEFT's
        ``target_modules`` rule, e.g. ``["query", "value"]``), one string used as a regular
        expression (``re.fullmatch`` on the qualified name), or ``callable(name, module) -> bool``.
        Default: every module with a weight of at least ``min_ndim`` dimensions.
    min_ndim : int
        Skip weights with fewer dimensions (default 2; norms and biases are not targets).

    Returns
    -------
    list of Target
        Names are the weights' ``state_dict`` keys (``<module>.weight``).

    Raises
    ------
    TypeError
        If ``model`` is not a ``torch.nn.Module``, ``targets`` is not a selection, or a selected
        module has no weight ``attach`` could adapt (the same message ``attach`` gives).
    ShapeSourceError
        If no module matches, or ``targets`` is not a valid regular expression.
    """
    import torch  # lazily: the core never imports torch at import time

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = list(model.named_modules())
    if targets is not None:  # the modules attach() would target (never the root module)
        try:
            modules = target_rules.select_targets(modules, targets)
        except ValueError as exc:
            raise ShapeSourceError(str(exc)) from None
    out = []
    for qualified, module in modules:
        weight = getattr(module, "weight", None)
        is_tensor = isinstance(weight, torch.Tensor)
        # a selected module attach() would refuse raises attach()'s error here too
        view = target_rules.target_view(qualified, module) if (targets is not None and not is_tensor) or (
            is_tensor and weight.ndim >= 2) else None
        if not is_tensor or weight.ndim < min_ndim:
            continue
        shape = view.shape if view is not None else tuple(int(d) for d in weight.shape)
        out.append(Target(f"{qualified}.weight" if qualified else "weight", shape,
                          str(weight.dtype).removeprefix("torch.")))
    if not out:
        raise ShapeSourceError(f"no module of the model matches targets={targets!r} "
                               f"(with a weight of at least {min_ndim} dimensions)")
    return out


# ---------------------------------------------------------------------------------------------
# presets and tables
# ---------------------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_preset(spec: str, shapes: Sequence[Sequence[int]] | None = None,
                 ranks: Sequence[int] | None = None) -> list[tuple[str, SuperLoRAConfig]]:
    """Configurations from a preset specification ``name[:key=value,…]``.

    ``name`` is one of :data:`PRESETS`; the keys are the preset function's arguments (e.g.
    ``lorta:order=3,groups=1``, ``lokr:factor=8``, ``lora:rank=8``).  A preset that takes a rank
    and is given none is expanded over ``ranks`` (default :data:`DEFAULT_RANKS`).  ``lotr`` stacks
    all the targets (``S`` is taken from the shapes when the plan is built), so ``shapes`` is no
    longer needed here; it is accepted for existing callers and ignored.

    Returns
    -------
    list of (label, SuperLoRAConfig)

    Examples
    --------
    >>> [label for label, _ in parse_preset("lorta:order=3", ranks=[2, 4])]
    ['lorta(order=3, rank=2)', 'lorta(order=3, rank=4)']

    Raises
    ------
    ValueError
        Unknown preset name or argument, malformed ``key=value``, or an invalid configuration.
    """
    name, _, rest = str(spec).strip().partition(":")
    name = name.strip().lower()
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets are {', '.join(PRESETS)}")
    func = getattr(_presets, name)
    params = inspect.signature(func).parameters
    kwargs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"preset argument {item!r} in {spec!r} must look like key=value")
        if key not in params:
            raise ValueError(f"preset {name!r} has no argument {key!r}; its arguments are {', '.join(params)}")
        if key in kwargs:
            raise ValueError(f"preset {spec!r} gives {key!r} twice")
        kwargs[key] = _parse_value(value.strip())
    sweep = ("rank" in params and "rank" not in kwargs)
    missing = [p.name for p in params.values() if p.default is inspect.Parameter.empty
               and p.name not in kwargs and not (sweep and p.name == "rank")]
    if missing:
        raise ValueError(f"preset {name!r} needs {', '.join(f'{m}=…' for m in missing)} "
                         f"(e.g. {name}:{missing[0]}=3); its arguments are {', '.join(params)}")
    rank_list = list(ranks) if ranks is not None else list(DEFAULT_RANKS)
    variants = [{**kwargs, "rank": r} for r in rank_list] if sweep else [kwargs]
    out = []
    for kw in variants:
        label = f"{name}({', '.join(f'{k}={v}' for k, v in kw.items())})"
        try:
            config = func(**kw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"preset {spec!r}: {exc}") from None
        out.append((label, config))
    return out


@dataclass(frozen=True)
class CountRow:
    """One row of a parameter table.

    Attributes
    ----------
    label : str
    params : int or None
        Trainable parameters (``None`` when the configuration does not apply to the shapes).
    fraction : float or None
        ``params / N`` with ``N`` the number of entries of all targets (dense fine-tuning).
    groups : int or None
    config : SuperLoRAConfig
    note : str
        Why the configuration does not apply (empty otherwise).
    """

    label: str
    params: int | None
    fraction: float | None
    groups: int | None
    config: SuperLoRAConfig
    note: str = ""


def _plain_shapes(shapes: Sequence[Any]) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in (s.shape if isinstance(s, Target) else s)) for s in shapes]


def count_table(shapes: Sequence[Any], configs: Iterable[str] | Mapping[str, SuperLoRAConfig] | None = None,
                *, ranks: Sequence[int] | None = None, names: Sequence[str] | None = None) -> list[CountRow]:
    """Trainable parameters of presets or configurations on the target ``shapes``.

    Parameters
    ----------
    shapes : sequence of shapes or Target
    configs : iterable of preset specifications, or mapping label -> SuperLoRAConfig, optional
        Default :data:`DEFAULT_PRESETS` (specifications as in :func:`parse_preset`).
    ranks : sequence of int, optional
        Ranks for presets given without one.
    names : sequence of str, optional
        Target names (needed by ``grouping="layer"``).

    Returns
    -------
    list of CountRow
        Configurations that cannot be built on the shapes (e.g. LoTR over unequal shapes) get
        ``params=None`` and a note.

    Examples
    --------
    >>> rows = count_table([(768, 768)] * 24, ["lora"], ranks=[1, 8])
    >>> [(r.label, r.params) for r in rows]
    [('lora(rank=1)', 36864), ('lora(rank=8)', 294912)]
    """
    plain = _plain_shapes(shapes)
    if not plain:
        raise ValueError("shapes must hold at least one target shape")
    if names is None and shapes and all(isinstance(s, Target) for s in shapes):
        names = [s.name for s in shapes]
    total = sum(math.prod(s) for s in plain)
    if configs is None:
        configs = DEFAULT_PRESETS
    if isinstance(configs, Mapping):
        labelled = list(configs.items())
    else:
        labelled = [item for spec in configs for item in parse_preset(spec, plain, ranks)]
    rows = []
    simple = [config.grouping == "weight" or is_int(config.grouping) for _, config in labelled]
    # weight-wise and G-chunk configurations are counted without the full plan, the shapes checked once
    counts = iter(count_many([config for (_, config), easy in zip(labelled, simple, strict=True) if easy],
                             plain, names))
    for (label, config), easy in zip(labelled, simple, strict=True):
        try:
            if easy:
                params = next(counts)
                if isinstance(params, ValueError):
                    raise params
                groups = len(plain) if config.grouping == "weight" else config.grouping
            else:
                plan = SuperLoRA(config, plain, names)
                params, groups = plan.num_params, len(plan.groups)
        except ValueError as exc:
            rows.append(CountRow(label, None, None, None, config, str(exc).split("\n")[0]))
            continue
        note = OVER_DENSE_NOTE if params > total else ""
        rows.append(CountRow(label, params, params / total, groups, config, note))
    return rows


def budget_sweep(shapes: Sequence[Any], max_params: int, families: Iterable[str] = FAMILIES, *,
                 min_params: int = 0, top: int | None = None) -> list[BudgetEntry]:
    """:func:`tensoradapt.budget` on the shapes, keeping the ``top`` largest entries (all if None).

    Examples
    --------
    >>> [e.params for e in budget_sweep([(768, 768)] * 24, 40_000, ["lora"])]
    [36864]
    """
    entries = budget(_plain_shapes(shapes), max_params, families, min_params=min_params)
    if top is not None:
        entries = entries[-top:] if top > 0 else []
    return entries
