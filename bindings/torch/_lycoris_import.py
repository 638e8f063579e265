"""Reading a LyCORIS / kohya ``.safetensors`` file into a tensoradapt adapter (:func:`import_lycoris`).

Every check runs before the model is touched: the safetensors header (the one strict reader,
:mod:`tensoradapt._safetensors`), every key (a kohya name the model has, a known tensor of one
algorithm per module), every shape against the module it adapts, the dtypes (floats), then the
values (finite) of exactly the tensors needed, and the tensoradapt plan they make.  Any failure is an
:class:`~tensoradapt.torch.AdapterFileError` naming the file, with the model bit-identical.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensoradapt import SuperLoRA, SuperLoRAConfig, presets
from tensoradapt._safetensors import METADATA_KEY, SafetensorsHeaderError, read_header
from tensoradapt.superlora.config import MAX_RANK
from tensoradapt.superlora.plan import param_name

from ._io import AdapterFileError
from ._shared import BaseAdapter, container_of, forward_kind, plain_named_modules

__all__ = ["import_lycoris"]

#: The tensors of each algorithm a kohya file may hold per module (besides ``alpha``).
ALGORITHMS = {
    "lora": ("lora_up.weight", "lora_down.weight"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
}
#: Tensors of LyCORIS features no tensoradapt adapter reproduces, and what they are.
UNSUPPORTED = {
    "lora_mid.weight": "LoCon's Tucker core (use_tucker)", "hada_t1": "LoHa's Tucker cores (use_tucker)",
    "hada_t2": "LoHa's Tucker cores (use_tucker)", "lokr_t1": "LoKr's Tucker core (use_tucker)",
    "lokr_t2": "LoKr's Tucker core (use_tucker)", "dora_scale": "DoRA (dora_wd)",
    "diff": "a full weight difference (algo 'full')", "diff_b": "a full bias difference (algo 'full')",
    "on_input": "(IA)^3", "weight": "(IA)^3 or a full layer", "w_norm": "a trained norm layer",
    "b_norm": "a trained norm layer", "oft_blocks": "OFT/BOFT", "oft_diag": "OFT/BOFT", "rescale": "OFT/BOFT",
    "a1.weight": "GLoRA (LyCORIS's)", "a2.weight": "GLoRA (LyCORIS's)", "b1.weight": "GLoRA (LyCORIS's)",
    "b2.weight": "GLoRA (LyCORIS's)", "bm.weight": "GLoRA (LyCORIS's)",
}
_FLOATS = ("F16", "BF16", "F32", "F64")
_KIND_NAMES = {"lora": "LoRA/LoCon", "lokr": "LoKr", "loha": "LoHa"}


@dataclass
class _Entry:
    """One adapted module as the file describes it."""

    key: str  # the kohya name
    name: str  # the module's name in the model
    module: nn.Module
    shapes: dict[str, tuple[int, ...]]  # suffix -> shape, alpha included when present
    algo: str = ""
    view: Any = None  # the module's WeightView
    ranks: tuple[int | None, ...] = ()  # per algorithm: lora (r,), loha (r1, r2), lokr (q1 or None, q2 or None)
    layout: tuple = ()  # lokr: ((a, b), (c, e)) of the (o, n) matrix
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    def scale(self) -> float:
        """LyCORIS's scale: ``α/r`` (LoHa: ``hada_w1_b``'s rows; LoKr: ``w1_a``'s rank, else
        ``w2_a``'s, and 1 for two full blocks); a missing ``alpha`` or ``α = 0`` means ``α = r``."""
        alpha = self.values.get("alpha")
        rank = self.ranks[0] if self.algo != "lokr" else next((q for q in self.ranks if q is not None), None)
        if alpha is None or rank is None:
            return 1.0
        value = float(alpha.reshape(()).item())
        return 1.0 if value == 0.0 else value / rank

    def alpha(self) -> float | None:
        """The file's ``alpha`` as LyCORIS reads it (None when missing or 0: then ``α = r``)."""
        alpha = self.values.get("alpha")
        value = None if alpha is None else float(alpha.reshape(()).item())
        return None if not value else value


# ---------------------------------------------------------------------------------- keys
def _read_entries(path: Path, where: str, prefix: str | None) -> dict[str, dict[str, tuple[str, tuple[int, ...]]]]:
    """``{kohya name: {suffix: (dtype, shape)}}`` from the checked header (no tensor read)."""
    try:
        header = read_header(path).header
    except SafetensorsHeaderError as error:
        raise AdapterFileError(f"{where} is corrupted or not a safetensors file: {error}") from None
    known = {s for suffixes in ALGORITHMS.values() for s in suffixes} | {"alpha"}
    out: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    for key, entry in header.items():
        if key == METADATA_KEY:
            continue
        kohya, dot, suffix = key.partition(".")
        if prefix is not None and not kohya.startswith(prefix + "_"):
            continue
        if suffix in UNSUPPORTED:
            raise AdapterFileError(f"{where}: tensor {key!r:.120} belongs to {UNSUPPORTED[suffix]}, which no "
                                   "tensoradapt adapter reproduces; import_lycoris reads LoRA/LoCon, LoKr and LoHa "
                                   "without Tucker cores or DoRA")
        if not dot or suffix not in known:
            raise AdapterFileError(f"{where}: tensor {key!r:.120} is not a LoRA/LoCon, LoKr or LoHa tensor (unknown "
                                   f"suffix {suffix!r:.40}; expected <kohya name>.<one of {sorted(known)}>)")
        if entry["dtype"] not in _FLOATS:
            raise AdapterFileError(f"{where}: tensor {key!r:.120} has dtype {entry['dtype']}, not a float "
                                   f"({', '.join(_FLOATS)})")
        out.setdefault(kohya, {})[suffix] = (entry["dtype"], tuple(entry["shape"]))
    if not out:
        raise AdapterFileError(f"{where} holds no adapter tensors" + (f" under prefix {prefix!r}" if prefix else ""))
    return out


def _name_table(model: nn.Module, prefix: str | None) -> dict[str, str | None]:
    """``{kohya name: module name}`` of every module, under every known prefix (or ``prefix``); a
    name two modules share maps to None (ambiguous)."""
    from .lycoris_io import KOHYA_PREFIXES, kohya_names

    names = [n for n, _ in plain_named_modules(model) if n]
    table: dict[str, str | None] = {}

    def add(key: str, name: str) -> None:
        table[key] = name if table.get(key, name) == name else None

    for name in names:
        for p in (prefix,) if prefix is not None else KOHYA_PREFIXES:
            add(f"{p}_{name.replace('.', '_')}", name)
    if prefix is None:  # a model of pipeline components: each names its modules by its own prefix
        for name in names:
            try:
                add(kohya_names(model, [name])[name], name)
            except ValueError:  # pragma: no cover - one name cannot collide with itself
                pass
    return table


def _resolve(model: nn.Module, entries: dict, table: dict[str, str | None], where: str) -> list[_Entry]:
    """The entries matched to the model's modules (in ``named_modules`` order), each of one algorithm."""
    from ._targets import weight_view

    missing = [k for k in entries if k not in table]
    if missing:
        raise AdapterFileError(f"{where} adapts modules the model does not have: {missing[:4]} (kohya names are "
                               "'<prefix>_<module path with . as _>'; pass prefix= to read only one component's "
                               "part of a file, e.g. prefix='lora_unet')")
    ambiguous = [k for k in entries if table[k] is None]
    if ambiguous:
        raise AdapterFileError(f"{where}: the kohya name {ambiguous[0]!r} fits several modules of the model ('.' "
                               "and '_' both become '_'); it cannot be read unambiguously")
    by_name = {table[k]: k for k in entries}
    out = []
    for name, module in plain_named_modules(model):
        if name not in by_name:
            continue
        key = by_name[name]
        try:
            kind = forward_kind(name, module)
        except TypeError as error:
            raise AdapterFileError(f"{where}: {error}") from None
        if kind not in ("linear", "quantized", "conv"):
            raise AdapterFileError(f"{where}: module {name!r} is a {type(module).__name__}; kohya files adapt "
                                   "nn.Linear and nn.Conv1d/2d/3d layers")
        if kind == "conv" and module.padding_mode != "zeros":
            raise AdapterFileError(f"{where}: LyCORIS runs the update of conv {name!r} with zero padding, not its "
                                   f"padding_mode={module.padding_mode!r}; no tensoradapt adapter reproduces it")
        shapes = {s: shape for s, (_, shape) in entries[key].items()}
        item = _Entry(key, name, module, shapes, view=weight_view(name, module))
        _classify(item, where)
        out.append(item)
    return out


def _classify(item: _Entry, where: str) -> None:
    """Set ``item.algo`` from its tensors: one algorithm, complete, alpha a scalar."""
    got = set(item.shapes) - {"alpha"}
    algos = [a for a, suffixes in ALGORITHMS.items() if got & set(suffixes)]
    if not algos:
        raise AdapterFileError(f"{where}: module {item.key!r} has an alpha but no adapter tensors")
    if len(algos) > 1:
        raise AdapterFileError(f"{where}: module {item.key!r} mixes {' and '.join(_KIND_NAMES[a] for a in algos)} "
                               f"tensors ({sorted(got)}); one module holds one algorithm")
    algo = algos[0]
    if algo == "lokr":
        ok = all((f"lokr_w{k}" in got) != bool(got & {f"lokr_w{k}_a", f"lokr_w{k}_b"}) and
                 (f"lokr_w{k}" in got or {f"lokr_w{k}_a", f"lokr_w{k}_b"} <= got) for k in (1, 2))
        needed = "lokr_w1 or lokr_w1_a + lokr_w1_b, and lokr_w2 or lokr_w2_a + lokr_w2_b"
    else:
        ok = got == set(ALGORITHMS[algo])
        needed = ", ".join(ALGORITHMS[algo])
    if not ok:
        raise AdapterFileError(f"{where}: module {item.key!r} has the {_KIND_NAMES[algo]} tensors {sorted(got)}; "
                               f"{_KIND_NAMES[algo]} needs {needed}")
    if "alpha" in item.shapes and item.shapes["alpha"] not in ((), (1,)):
        raise AdapterFileError(f"{where}: the alpha of {item.key!r} has shape {list(item.shapes['alpha'])}, not a "
                               "scalar")
    item.algo = algo


# ---------------------------------------------------------------------------------- shapes
def _rank(value: int, item: _Entry, where: str) -> int:
    if not 1 <= value <= MAX_RANK:
        raise AdapterFileError(f"{where}: module {item.key!r} has rank {value}, outside [1, {MAX_RANK}]")
    return value


def _check_shapes(item: _Entry, where: str) -> None:
    """Check ``item``'s tensor shapes against its module and set its ranks (and LoKr layout)."""
    o, n = item.view.shape
    weight = tuple(item.view.weight_shape)
    conv = len(weight) > 2 and item.view.kind != "linear"
    s = item.shapes

    def bad(what: str) -> AdapterFileError:
        shown = {k: list(v) for k, v in s.items() if k != "alpha"}
        return AdapterFileError(f"{where}: the {_KIND_NAMES[item.algo]} tensors of {item.key!r} {shown} do not fit "
                                f"{type(item.module).__name__} {item.name!r} of weight shape {list(weight)}: {what}")

    if item.algo == "lora":
        down, up = s["lora_down.weight"], s["lora_up.weight"]
        r = _rank(down[0], item, where) if down else 0
        if down != ((r, *weight[1:]) if conv else (r, n)):
            raise bad(f"lora_down.weight must be {[r, *weight[1:]] if conv else [r, n]}")
        if up != ((o, r, *(1,) * (len(weight) - 2)) if conv else (o, r)):
            raise bad(f"lora_up.weight must be {[o, r, *(1,) * (len(weight) - 2)] if conv else [o, r]}")
        item.ranks = (r,)
    elif item.algo == "loha":
        ranks = []
        for k in (1, 2):
            a, b = s[f"hada_w{k}_a"], s[f"hada_w{k}_b"]
            if len(a) != 2 or len(b) != 2 or a[0] != o or b[1] != n or a[1] != b[0]:
                raise bad(f"hada_w{k}_a must be [{o}, r] and hada_w{k}_b [r, {n}]")
            ranks.append(_rank(a[1], item, where))
        item.ranks = tuple(ranks)
    else:
        _check_lokr(item, where, o, n, weight, conv, bad)


def _check_lokr(item: _Entry, where: str, o: int, n: int, weight: tuple[int, ...], conv: bool,
                bad: Callable[[str], AdapterFileError]) -> None:
    s = item.shapes
    blocks: list[tuple[int, int]] = []
    ranks: list[int | None] = []
    for k in (1, 2):
        dense = s.get(f"lokr_w{k}")
        if dense is not None:
            if k == 2 and conv:
                if len(dense) != len(weight) or tuple(dense[2:]) != weight[2:]:
                    kernel = ", ".join(map(str, weight[2:]))
                    raise bad(f"a full lokr_w2 of a convolution is [c, in_channels/b, {kernel}]")
                dense = (dense[0], math.prod(dense[1:]))
            elif len(dense) != 2:
                raise bad(f"lokr_w{k} must be 2-D")
            blocks.append((dense[0], dense[1]))
            ranks.append(None)
            continue
        a, b = s[f"lokr_w{k}_a"], s[f"lokr_w{k}_b"]
        if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
            raise bad(f"lokr_w{k}_a must be [rows, r] and lokr_w{k}_b [r, columns]")
        blocks.append((a[0], b[1]))
        ranks.append(_rank(a[1], item, where))
    (a, b), (c, e) = blocks
    if a * c != o or b * e != n or 0 in (a, b, c, e):
        raise bad(f"w1 {list(blocks[0])} ⊗ w2 {list(blocks[1])} is not ({o}, {n})")
    if conv and s.get("lokr_w2") is not None and weight[1] % b:
        raise bad(f"w1's {b} columns do not divide the {weight[1]} input channels")
    if None not in ranks and ranks[0] != ranks[1]:
        raise bad(f"LyCORIS's LoKr has one rank, not {ranks[0]} and {ranks[1]}")
    item.ranks, item.layout = tuple(ranks), tuple(blocks)


def _read_values(path: Path, items: list[_Entry], where: str) -> None:
    """Read exactly the tensors ``items`` need, checked finite."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for item in items:
                for suffix in item.shapes:
                    item.values[suffix] = handle.get_tensor(f"{item.key}.{suffix}")
    except Exception as error:  # safetensors raises its own error type for every corruption
        raise AdapterFileError(f"{where} is corrupted: {error}") from None
    for item in items:
        for suffix, value in item.values.items():
            if not bool(torch.isfinite(value).all()):
                raise AdapterFileError(f"{where}: tensor {item.key}.{suffix} has NaN or infinite entries")


# ---------------------------------------------------------------------------------- plans
def _common(values: list[Any]) -> Any:
    counts: dict[Any, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda v: (counts[v], -values.index(v)))


def _lora_like(items: list[_Entry]) -> SuperLoRAConfig:
    """LoRA/LoHa: rank ``R = max r_i``; the file's ``alpha`` when every module shares rank and alpha
    (``α/R`` bit for bit), else the most common scale (the others folded into the first factor)."""
    make = presets.lora if items[0].algo == "lora" else presets.loha
    R = max(max(i.ranks) for i in items)
    alphas = {i.alpha() for i in items}
    if len(alphas) == 1 and None not in alphas and all(set(i.ranks) == {R} for i in items):
        return make(R, alphas.pop())
    return make(R).replace(scale=_common([i.scale() for i in items]))


def _lokr(items: list[_Entry], where: str) -> SuperLoRAConfig:
    """The tensoradapt LoKr (rank, ``dense_side``, ``decompose_both``) whose plan lays every module
    out as the file does."""
    qs = {q for i in items for q in i.ranks if q is not None}
    if len(qs) > 1:
        raise AdapterFileError(f"{where}: the LoKr modules have ranks {sorted(qs)}; a tensoradapt LoKr has one rank")
    rank = qs.pop() if qs else max(math.ceil(max(i.layout[1]) / 2) for i in items)
    both = any(i.ranks[0] is not None for i in items)
    alphas = {i.alpha() for i in items}
    scale: dict[str, Any] = {"alpha": alphas.pop()} if len(alphas) == 1 and None not in alphas else {"scale": 1.0}
    factors = [-1, *sorted({d for i in items for block in i.layout for d in block if d > 1})]
    shapes = [i.view.shape for i in items]
    for f in factors:
        try:
            cfg = SuperLoRAConfig(rank=rank, order=2, splits=2, dense_side=f, fold="matrix", core="identity",
                                  decompose_both=both, **scale)
            plan = SuperLoRA(cfg, shapes, [i.name for i in items])
        except (TypeError, ValueError):
            continue
        if all((tuple(g.splits[0].shape), tuple(g.splits[1].shape)) == i.layout and
               tuple(s.kind == "dense" for s in g.splits) == tuple(q is None for q in i.ranks)
               for g, i in zip(plan.groups, items, strict=True)):
            return cfg
    i = items[0]
    raise AdapterFileError(f"{where}: no tensoradapt LoKr (one rank, one factor for every module) lays out the "
                           f"blocks of the file (e.g. {i.key!r}: {list(i.layout[0])} x {list(i.layout[1])}); "
                           "tensoradapt factorises a convolution's input channels together with its kernel, so "
                           "LyCORIS's conv LoKr fits only when one factor suits every module (train it with a "
                           "factor= or on linear layers only)")


def _values(items: list[_Entry], plan: SuperLoRA) -> dict[str, torch.Tensor]:
    """``{parameter name: value}`` of the plan: each module's tensors in tensoradapt's layout, padded
    to the plan's rank, the file's scale over the plan's folded into the first factor."""
    out: dict[str, torch.Tensor] = {}
    for g, (item, group) in enumerate(zip(items, plan.groups, strict=True)):
        fold = item.scale() / float(group.scale)
        v = item.values
        o, n = item.view.shape
        if item.algo == "lora":
            pairs = [(v["lora_up.weight"].reshape(o, -1), v["lora_down.weight"].reshape(-1, n).t())]
        elif item.algo == "loha":
            pairs = [(v[f"hada_w{k}_a"], v[f"hada_w{k}_b"].t()) for k in (1, 2)]
        else:
            for k, split in enumerate(group.splits, start=1):
                if split.kind == "dense":
                    dense = v[f"lokr_w{k}"].reshape(split.shape).to(torch.float64)
                    out[param_name(g, k, "dense")] = dense * fold if k == 1 else dense
                else:
                    first = v[f"lokr_w{k}_a"].to(torch.float64)
                    out[param_name(g, k, "factor0")] = first * fold if k == 1 else first
                    out[param_name(g, k, "factor1")] = v[f"lokr_w{k}_b"].t()
            continue
        rank = group.splits[0].ranks[0]
        for k, (left, right) in enumerate(pairs, start=1):
            left = left.to(torch.float64) * (fold if k == 1 else 1.0)
            pad = rank - left.shape[1]
            out[param_name(g, k, "factor0")] = nn.functional.pad(left, (0, pad)) if pad else left
            out[param_name(g, k, "factor1")] = nn.functional.pad(right, (0, pad)) if pad else right
    return out


# ---------------------------------------------------------------------------------- import
def _prepare(model: nn.Module, file: Path, where: str,
             prefix: str | None) -> list[tuple[str, SuperLoRAConfig, list[_Entry], dict[str, torch.Tensor]]]:
    """Every check, then per algorithm ``(algorithm, config, modules, {parameter name: value})``,
    the algorithm of most modules first; the model is only read."""
    entries = _read_entries(file, where, prefix)
    items = _resolve(model, entries, _name_table(model, prefix), where)
    for item in items:
        _check_shapes(item, where)
    _read_values(file, items, where)
    counts = {a: sum(i.algo == a for i in items) for a in ALGORITHMS}
    groups = []
    for algo in sorted((a for a in ALGORITHMS if counts[a]), key=lambda a: -counts[a]):
        members = [i for i in items if i.algo == algo]
        cfg = _lokr(members, where) if algo == "lokr" else _lora_like(members)
        try:
            plan = SuperLoRA(cfg, [i.view.shape for i in members], [i.name for i in members])
        except (TypeError, ValueError, OverflowError) as error:
            raise AdapterFileError(f"{where}: its {_KIND_NAMES[algo]} modules make no tensoradapt plan "
                                   f"({error})") from None
        values = _values(members, plan)
        expected = {k: tuple(s) for k, s in plan.parameter_shapes().items()}
        if {k: tuple(v.shape) for k, v in values.items()} != expected:  # pragma: no cover - ruled out above
            raise AdapterFileError(f"{where}: the tensors do not fit the tensoradapt plan they make")
        groups.append((algo, cfg, members, values))
    return groups


def import_lycoris(model: nn.Module, path: str | os.PathLike[str], *, prefix: str | None = None,
                   name: str = "default", freeze_base: bool = True) -> BaseAdapter:
    """Attach the LoRA/LoCon, LoKr or LoHa adapter of a LyCORIS / kohya ``.safetensors`` file to
    ``model`` as the equivalent tensoradapt adapter (trainable, savable with ``adapter.save``).

    The outputs equal LyCORIS's own (``lycoris.kohya.create_network_from_weights`` applied to the
    model) up to float rounding: LoRA/LoCon becomes ``presets.lora``, LoHa ``presets.loha``, LoKr
    the ``presets.lokr``-style config of the file's block layout, each with LyCORIS's scale ``α/r``
    (a missing ``alpha`` or ``α = 0`` is ``α = r``; two full LoKr blocks scale 1).  Modules of
    different ranks become one adapter of the largest rank (zero-padded) and different scales are
    folded into the first factor.  A file of several algorithms (e.g. LoKr blocks beside the exact
    LoCon :func:`export_lycoris` writes for convolutions LyCORIS lays out otherwise) attaches one
    adapter per algorithm on disjoint modules, all active: ``name`` for the algorithm of most
    modules, ``f"{name}_{algo}"`` (``algo`` one of ``lora``, ``lokr``, ``loha``) for each other.

    Parameters
    ----------
    model : nn.Module
        The base model; a kohya name is ``<prefix>_<module path with . → _>`` for any prefix of
        :data:`tensoradapt.torch.lycoris_io.KOHYA_PREFIXES` (or per pipeline component for a model
        holding ``unet`` / ``transformer`` / ``text_encoder…`` children).
    path : path
        The ``.safetensors`` file.
    prefix : str, optional
        Read only the keys under this prefix (``"lora_unet"``: the UNet part of a file that also
        adapts text encoders); default: every key, each of which must name a module of ``model``.
    name : str
        The adapter's name on the model.
    freeze_base : bool
        As in :func:`tensoradapt.torch.attach`.

    Returns
    -------
    SuperLoRAAdapter
        The adapter ``name`` (``model.tensoradapt.names`` lists the others of a mixed file).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    RuntimeError
        An adapter name the import needs is taken on the model.
    AdapterFileError
        A corrupted file; a key of no module, an unknown or unsupported tensor (Tucker cores, DoRA,
        full/IA3/OFT/GLoRA modules), an incomplete module, one module of two algorithms, a non-float
        dtype, a shape that does not fit its module, a NaN or
        infinite value, or a LoKr layout no tensoradapt LoKr has.  The model is not changed.
    """
    from .lycoris_io import check_prefix

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a path, got {type(path).__name__}")
    prefix = check_prefix(prefix)
    file = Path(path)
    where = repr(str(file))
    if not file.exists():
        raise FileNotFoundError(f"no LyCORIS file at {str(file)!r}")
    groups = _prepare(model, file, where, prefix)
    names = [name] + [f"{name}_{algo}" for algo, *_ in groups[1:]]
    container = container_of(model)
    taken = [n for n in names if container is not None and n in container]
    if taken:
        raise RuntimeError(f"the model already has an adapter named {taken[0]!r} (this file needs the names "
                           f"{names}); import under another name= or detach it first")
    return _attach(model, groups, names, where, freeze_base)


def _attach(model: nn.Module, groups: list[tuple], names: list[str], where: str, freeze_base: bool) -> BaseAdapter:
    """Attach one adapter per group and copy its values in; on any failure detach them all."""
    from . import attach

    attached: list[BaseAdapter] = []
    try:
        for adapter_name, (_, cfg, items, values) in zip(names, groups, strict=True):
            wanted = {i.name for i in items}
            try:
                adapter = attach(model, cfg, lambda n, m, wanted=wanted: n in wanted, name=adapter_name,
                                 freeze_base=freeze_base)
            except (TypeError, ValueError) as error:  # e.g. a tied weight: refused before anything is installed
                raise AdapterFileError(f"{where}: {error}") from None
            attached.append(adapter)
            with torch.no_grad():
                for pname, value in values.items():
                    adapter.params[pname.replace(".", "__")].copy_(value)
    except BaseException:
        for adapter in reversed(attached):
            adapter.detach()
        raise
    return attached[0]
