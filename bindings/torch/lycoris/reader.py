"""Reading a kohya file's modules before the model is touched: the safetensors header (the one
strict reader, :mod:`tensoradapt._safetensors`), every key (a kohya name the model has, a known
tensor of one algorithm per module), the modules it names, then the values (finite) of exactly
the tensors needed."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tensoradapt._safetensors import METADATA_KEY, SafetensorsHeaderError, read_header

from ..files.layout import AdapterFileError
from ..modules import forward_kind, plain_named_modules, weight_view
from .codecs import ALGORITHMS
from .entry import KIND_NAMES, Entry

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


def read_entries(path: Path, where: str, prefix: str | None) -> dict[str, dict[str, tuple[str, tuple[int, ...]]]]:
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


def _check_module(name: str, module: nn.Module, where: str) -> None:
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


def resolve(model: nn.Module, entries: dict, table: dict[str, str | None], where: str) -> list[Entry]:
    """The entries matched to the model's modules (in ``named_modules`` order), each of one algorithm."""
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
        _check_module(name, module, where)
        shapes = {s: shape for s, (_, shape) in entries[key].items()}
        item = Entry(key, name, module, shapes, view=weight_view(name, module))
        classify(item, where)
        out.append(item)
    return out


def classify(item: Entry, where: str) -> None:
    """Set ``item.algo`` from its tensors: one algorithm, complete, alpha a scalar."""
    got = set(item.shapes) - {"alpha"}
    algos = [a for a, suffixes in ALGORITHMS.items() if got & set(suffixes)]
    if not algos:
        raise AdapterFileError(f"{where}: module {item.key!r} has an alpha but no adapter tensors")
    if len(algos) > 1:
        raise AdapterFileError(f"{where}: module {item.key!r} mixes {' and '.join(KIND_NAMES[a] for a in algos)} "
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
        raise AdapterFileError(f"{where}: module {item.key!r} has the {KIND_NAMES[algo]} tensors {sorted(got)}; "
                               f"{KIND_NAMES[algo]} needs {needed}")
    if "alpha" in item.shapes and item.shapes["alpha"] not in ((), (1,)):
        raise AdapterFileError(f"{where}: the alpha of {item.key!r} has shape {list(item.shapes['alpha'])}, not a "
                               "scalar")
    item.algo = algo


def read_values(path: Path, items: list[Entry], where: str) -> None:
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
