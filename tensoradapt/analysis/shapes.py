r"""Target shapes from files, text and models, and parameter-count tables built on them.

Sources of target shapes (all return a list of :class:`Target` ``(name, shape)``):

* :func:`parse_shapes` — text such as ``"24x768x768"`` (24 copies of ``768×768``) or
  ``"768x768,768x3072"``, or a path to a ``.json`` / ``.safetensors`` file;
* :func:`shapes_from_safetensors` — the tensor shapes stored in a safetensors file, read from
  its header alone (8-byte length + JSON) with the standard library: the tensor data is never
  read and nothing is unpickled;
* :func:`shapes_from_json` — ``[[768, 768], …]``, ``[{"name": …, "shape": […]}, …]`` or
  ``{"name": [768, 768], …}``;
* :func:`shapes_from_model` — the weights of a torch model's target modules (torch is imported
  only inside that function; the core never imports it).

:func:`count_table` and :func:`budget_sweep` count parameters of presets or configurations on
those shapes (through :mod:`tensoradapt.budget`), and :func:`format_count_table` /
:func:`format_budget_sweep` render them as text.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..superlora import presets as _presets
from ..superlora.budget import FAMILIES, BudgetEntry, budget
from ..superlora.config import SuperLoRAConfig
from ..superlora.generator import SuperLoRA

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

# safetensors: header length limit of the reference implementation, and the bytes per element
_MAX_HEADER = 100_000_000
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}


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
    checks the header against the file size.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ShapeSourceError
        If the file is too short, the header length exceeds the file or 100 MB, the header is not
        a JSON object, or a tensor entry is malformed or points outside the file.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)  # FileNotFoundError for a missing file
    if size < 8:
        raise ShapeSourceError(f"{path}: not a safetensors file ({size} bytes, fewer than the 8-byte header length)")
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length > size - 8:
            raise ShapeSourceError(f"{path}: header length {length} exceeds the {size - 8} bytes after it "
                                   "(not a safetensors file, or truncated)")
        if length > _MAX_HEADER:
            raise ShapeSourceError(f"{path}: header length {length} exceeds the 100 MB limit of the format")
        raw = fh.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 / JSON, huge integers, deep nesting
        raise ShapeSourceError(f"{path}: the header is not valid UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise ShapeSourceError(f"{path}: the header must be a JSON object, got {type(header).__name__}")
    data_size = size - 8 - length
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict):
                raise ShapeSourceError(f"{path}: __metadata__ must be a JSON object, got {type(entry).__name__}")
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise ShapeSourceError(f"{path}: tensor {name!r} needs 'dtype', 'shape' and 'data_offsets', "
                                   f"got {entry!r:.80}")
        shape, offsets, dtype = entry["shape"], entry["data_offsets"], entry["dtype"]
        if (not isinstance(shape, list)
                or any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape)):
            raise ShapeSourceError(f"{path}: tensor {name!r} has shape {shape!r}; a shape is a list of ints >= 0")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or any(not isinstance(o, int) or isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise ShapeSourceError(f"{path}: tensor {name!r} has data_offsets {offsets!r}, outside the "
                                   f"{data_size} data bytes")
        if dtype in _DTYPE_BYTES and offsets[1] - offsets[0] != _DTYPE_BYTES[dtype] * math.prod(shape):
            raise ShapeSourceError(f"{path}: tensor {name!r} ({dtype}, shape {shape}) needs "
                                   f"{_DTYPE_BYTES[dtype] * math.prod(shape)} bytes but data_offsets span "
                                   f"{offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    end = 0  # the format packs the tensors' bytes back to back: no overlap, no gap
    for start, stop, name in sorted(spans):
        if start != end:
            raise ShapeSourceError(f"{path}: tensor {name!r} starts at byte {start} of the data, expected {end} "
                                   "(overlapping or non-contiguous data_offsets)")
        end = stop
    return header


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
    header = read_safetensors_header(path)
    entries = sorted(((name, e) for name, e in header.items() if name != "__metadata__"),
                     key=lambda item: (item[1]["data_offsets"][0], item[0]))
    targets = [Target(name, tuple(e["shape"]), e["dtype"]) for name, e in entries]
    return _selected(targets, min_ndim, pattern)


def _shape_of(value: Any, where: str) -> tuple[int, ...]:
    if (not isinstance(value, (list, tuple)) or not value
            or any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in value)):
        raise ShapeSourceError(f"{where}: a shape is a non-empty list of positive integers, got {value!r:.80}")
    return tuple(value)


def shapes_from_json(source: str | os.PathLike[str] | Any, *, min_ndim: int = 1,
                     pattern: str | None = None) -> list[Target]:
    """Target shapes from a JSON file (or an already parsed JSON value).

    Accepted forms: a list of shapes ``[[768, 768], [768, 3072]]``; a list of objects
    ``[{"name": "q", "shape": [768, 768]}, …]`` (``"count"`` optionally repeats an entry); an
    object ``{"q": [768, 768], …}``; or an object with a ``"targets"`` key holding one of these.

    Examples
    --------
    >>> [t.shape for t in shapes_from_json([[2, 3], {"name": "v", "shape": [4, 4], "count": 2}])]
    [(2, 3), (4, 4), (4, 4)]
    """
    where = "JSON shapes"
    if isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
        with open(where, encoding="utf-8") as fh:  # FileNotFoundError for a missing file
            try:
                data = json.load(fh)
            except (ValueError, RecursionError) as exc:  # bad UTF-8 / JSON, huge integers, deep nesting
                raise ShapeSourceError(f"{where}: not valid JSON ({type(exc).__name__}: {str(exc)[:120]})") from None
    else:
        data = source
    if isinstance(data, Mapping) and "targets" in data:
        data = data["targets"]
    targets: list[Target] = []
    if isinstance(data, Mapping):
        targets = [Target(str(k), _shape_of(v, f"{where}[{k!r}]")) for k, v in data.items()]
    elif isinstance(data, list):
        for i, item in enumerate(data):
            if isinstance(item, Mapping):
                if "shape" not in item:
                    raise ShapeSourceError(f"{where}[{i}]: an object entry needs a 'shape', got keys {sorted(item)}")
                count = item.get("count", 1)
                if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                    raise ShapeSourceError(f"{where}[{i}]: 'count' must be a positive integer, got {count!r}")
                shape = _shape_of(item["shape"], f"{where}[{i}]")
                name = str(item.get("name", i))
                targets += [Target(name if count == 1 else f"{name}.{c}", shape) for c in range(count)]
            else:
                targets.append(Target(str(i), _shape_of(item, f"{where}[{i}]")))
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
    if os.path.isfile(text):
        raise ShapeSourceError(f"{text}: shape files must end in .json or .safetensors")
    targets: list[Target] = []
    items = [item.strip() for item in text.split(",")]
    for item in items:
        match = _ITEM.match(item)
        if match is None:
            raise ShapeSourceError(f"malformed shape {item!r} in {text!r}: use OxN (one weight), SxOxN "
                                   "(S weights of O×N), comma-separated, or a .json/.safetensors path")
        a, b, c = match.groups()
        if c is None:
            targets.append(Target(str(len(targets)), (int(a), int(b))))
        else:
            targets += [Target(str(len(targets) + s), (int(b), int(c))) for s in range(int(a))]
    return _selected(targets, 0, pattern)


def shapes_from_model(model: Any, targets: str | Sequence[str] | None = None, *,
                      min_ndim: int = 2) -> list[Target]:
    r"""Target weights of a torch model, in ``model.named_modules()`` order (spec Part I §1).

    Parameters
    ----------
    model : torch.nn.Module
    targets : str or sequence of str, optional
        Module selection: a sequence of names, each matching a module whose qualified name equals
        it or ends with ``"." + name`` (PEFT's ``target_modules`` rule, e.g. ``["query", "value"]``),
        or one string used as a regular expression (``re.fullmatch`` on the qualified name).
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
        If ``model`` is not a ``torch.nn.Module``.
    ShapeSourceError
        If no module matches.
    """
    import torch  # lazily: the core never imports torch at import time

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    regex = None
    names: tuple[str, ...] = ()
    if isinstance(targets, str):
        try:
            regex = re.compile(targets)
        except re.error as exc:
            raise ShapeSourceError(f"targets {targets!r} is not a valid regular expression: {exc}") from None
    elif targets is not None:
        names = tuple(str(t) for t in targets)
    out = []
    for qualified, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim < min_ndim:
            continue
        if regex is not None and not regex.fullmatch(qualified):
            continue
        if names and not any(qualified == n or qualified.endswith("." + n) for n in names):
            continue
        out.append(Target(f"{qualified}.weight" if qualified else "weight", tuple(weight.shape),
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
    and is given none is expanded over ``ranks`` (default :data:`DEFAULT_RANKS`).  ``lotr``'s
    ``num_weights`` defaults to ``len(shapes)``.

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
        kwargs[key] = _parse_value(value.strip())
    if name == "lotr" and "num_weights" not in kwargs:
        if shapes is None:
            raise ValueError("preset 'lotr' needs num_weights=S (or the target shapes)")
        kwargs["num_weights"] = len(shapes)
    sweep = ("rank" in params and "rank" not in kwargs)
    rank_list = list(ranks) if ranks is not None else list(DEFAULT_RANKS)
    variants = [{**kwargs, "rank": r} for r in rank_list] if sweep else [kwargs]
    out = []
    for kw in variants:
        shown = {k: v for k, v in kw.items() if not (name == "lotr" and k == "num_weights")}
        label = f"{name}({', '.join(f'{k}={v}' for k, v in shown.items())})"
        try:
            config = func(**kw)
        except TypeError as exc:
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
    for label, config in labelled:
        try:
            plan = SuperLoRA(config, plain, names)
        except ValueError as exc:
            rows.append(CountRow(label, None, None, None, config, str(exc).split("\n")[0]))
            continue
        rows.append(CountRow(label, plan.num_params, plan.num_params / total, len(plan.groups), config))
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


def _summary(shapes: Sequence[Any]) -> str:
    plain = _plain_shapes(shapes)
    total = sum(math.prod(s) for s in plain)
    counts: dict[tuple[int, ...], int] = {}
    for s in plain:
        counts[s] = counts.get(s, 0) + 1
    listed = ", ".join(f"{c}×{'x'.join(map(str, s))}" for s, c in list(counts.items())[:6])
    more = f", … ({len(counts)} distinct shapes)" if len(counts) > 6 else ""
    return f"{len(plain)} targets ({listed}{more}), N = {total:,} entries (dense fine-tuning)"


def format_count_table(shapes: Sequence[Any], rows: Sequence[CountRow]) -> str:
    """A text table of :func:`count_table` rows, headed by a summary of the shapes.

    Examples
    --------
    >>> shapes = [(4, 4)] * 2
    >>> print(format_count_table(shapes, count_table(shapes, ["lora"], ranks=[1])))
    2 targets (2×4x4), N = 32 entries (dense fine-tuning)
    configuration       params  % of N  groups
    lora(rank=1)            16  50.000       2
    """
    width = max([len("configuration"), *(len(r.label) for r in rows)])
    lines = [_summary(shapes), f"{'configuration':<{width}} {'params':>12} {'% of N':>7} {'groups':>7}"]
    for r in rows:
        if r.params is None:
            lines.append(f"{r.label:<{width}} {'n/a':>12} {'':>7} {'':>7}  ({r.note})")
        else:
            lines.append(f"{r.label:<{width}} {r.params:>12,} {100 * r.fraction:>7.3f} {r.groups:>7}")
    return "\n".join(lines)


def format_budget_sweep(shapes: Sequence[Any], entries: Sequence[BudgetEntry], max_params: int) -> str:
    """A text table of budget-sweep entries (ascending parameter count)."""
    total = sum(math.prod(s) for s in _plain_shapes(shapes))
    lines = [_summary(shapes), f"budget: at most {max_params:,} parameters; {len(entries)} configurations",
             f"{'family':<8} {'params':>12} {'% of N':>7}  configuration"]
    for e in entries:
        cfg = e.config
        desc = (f"rank={cfg.rank} M={cfg.order} K={cfg.splits} G={cfg.grouping} core={cfg.core}"
                + (f" f={cfg.dense_side}" if cfg.dense_side is not None else "")
                + (f" {cfg.projection} rho={cfg.ratio}" if cfg.projection != "none" else ""))
        lines.append(f"{e.family:<8} {e.params:>12,} {100 * e.params / total:>7.3f}  {desc}")
    return "\n".join(lines)
