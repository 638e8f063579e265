"""PEFT's GLoRA both ways: per plain ``nn.Linear`` layer, paths ``glora_A``, ``glora_B`` (the
weight's ``W0 ⊙ A + B``), ``glora_C`` (``W0 C``, a bias term) and the vectors ``glora_D``,
``glora_E``; one form per family for the whole folder (``config_A_B``, ``config_C``,
``config_D_E``): ``lora`` (``Xd (rows, r)``, ``Xu (r, cols)``), ``vector`` (``X``), ``constant``
(``X (1,)``) or ``none`` (``zeros`` of the path's shape).  Our per-layer choices are written in
the folder's forms (a ``lora`` path of rank ``R = max`` over the layers, smaller ranks and
vectors / scalars as zero-padded low-rank paths); reading, PEFT's forms fix every layer's choice.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tensoradapt import GLoRAConfig
from tensoradapt.glora.config import LayerChoice

from ..files.layout import AdapterFileError
from ..lifecycle import BaseAdapter
from .decoded import Decoded
from .layout import base_config, tensor_key
from .source import Source

PEFT_TYPE = "GLORA"
#: Every tensor suffix of a GLoRA module.
SUFFIXES = tuple(f"glora_{t}.{p}" for t in "ABCDE" for p in ("Xd", "Xu", "X", "zeros"))
#: The options import_peft reads, with PEFT's defaults.
OPTIONS = {"r": 8, "config_A_B": "lora", "config_C": "lora", "config_D_E": "constant"}
#: Each option's allowed forms.
ALLOWED = {"config_A_B": ("lora", "vector", "constant", "none"), "config_C": ("lora", "vector", "none"),
           "config_D_E": ("vector", "constant", "none")}
#: Our layer-choice form of each PEFT form, and back.
_OURS = {"lora": "lora", "vector": "vector", "constant": "scalar", "none": "none"}
_PEFT = {"lora": "lora", "vector": "vector", "scalar": "constant", "none": "none"}


def check_options(options: dict[str, Any], where: str) -> None:
    """Refuse a form PEFT's GLoRA does not have."""
    for key, allowed in ALLOWED.items():
        if options[key] not in allowed:
            raise AdapterFileError(f"{where}: {key}={options[key]!r:.40} is not one of {allowed}")


# ---------------------------------------------------------------------------------- encode
def _check_targets(source: Source, choices: tuple[LayerChoice, ...]) -> None:
    for target, choice in zip(source.targets, choices, strict=True):
        if target.layer != "linear" or not target.plain_linear:
            raise ValueError(f"PEFT's GLoRA adapts plain nn.Linear layers only; target {target.name!r} is "
                             f"{'a transformers Conv1D' if target.layer == 'conv1d' else 'not an nn.Linear'}")
        if not target.has_bias and (choice.C != "none" or choice.E != "none"):
            raise ValueError(f"layer {target.name!r} has no bias and uses C={choice.C!r}, E={choice.E!r} (which "
                             "give it one); PEFT's GLoRA drops C, D and E on bias-free layers, so it cannot express "
                             "this")


def _rank_of(form: str, choice: LayerChoice) -> int:
    return {"lora": choice.rank or 0, "vector": 1, "scalar": 1}.get(form, 0)


def _forms(source: Source, choices: tuple[LayerChoice, ...], rank: int) -> tuple[str, str, str, int]:
    """``(config_A_B, config_C, config_D_E, R)``: the folder's forms holding every layer's choice."""
    ab = {(c.A, c.B, c.rank if "lora" in (c.A, c.B) else None) for c in choices}
    biased = [c for t, c in zip(source.targets, choices, strict=True) if t.has_bias]
    cs = {(c.C, c.rank if c.C == "lora" else None) for c in biased}
    de = {(c.D, c.E) for c in biased}
    one_ab, one_de = next(iter(ab)), next(iter(de), None)
    form_ab = _PEFT[one_ab[0]] if len(ab) == 1 and one_ab[0] == one_ab[1] else "lora"
    form_c = next(iter(cs))[0] if len(cs) == 1 else ("lora" if cs else "none")
    form_de = _PEFT[one_de[0]] if len(de) == 1 and one_de[0] == one_de[1] else ("vector" if de else "none")
    needed = [1]
    if form_ab == "lora":
        needed += [_rank_of(c.A, c) for c in choices] + [_rank_of(c.B, c) for c in choices]
    if form_c == "lora":
        needed += [_rank_of(c.C, c) for c in biased]
    R = max(needed) if (form_ab == "lora" or form_c == "lora") else rank
    return form_ab, form_c, form_de, R


def encode(source: Source) -> tuple:
    """The exact PEFT GLoRA of a GLoRA source (every layer's fixed choice)."""
    config, choices = source.glora, source.choices
    assert config is not None and choices is not None
    _check_targets(source, choices)
    form_ab, form_c, form_de, R = _forms(source, choices, config.rank)
    tensors: dict[str, torch.Tensor] = {}
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in source.params.items():
        layer, _, tensor = k.rpartition(".")
        by_layer.setdefault(layer, {})[tensor] = v
    for target, choice in zip(source.targets, choices, strict=True):
        key = tensor_key(target.name, "glora")
        p = by_layer[target.name]
        o, n = target.shape
        ref = p["A_d"]
        for name, form in (("A", choice.A), ("B", choice.B)):
            tensors.update(_path(f"{key}_{name}", form_ab, form, choice.rank, p[f"{name}_d"], p[f"{name}_u"], (o, n),
                                 R, ref))
        if target.has_bias:
            tensors.update(_path(f"{key}_C", form_c, choice.C, choice.rank, p["C_d"], p["C_u"], (n, 1), R, ref))
            for name, form in (("D", choice.D), ("E", choice.E)):
                tensors.update(_vector(f"{key}_{name}", form_de, form, p[name]))
        else:
            for name, shape in {"C": (n, 1), "D": (o,), "E": (o,)}.items():
                tensors[f"{key}_{name}.zeros"] = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
    peft_config = base_config(PEFT_TYPE, source)
    peft_config.update({"r": R, "config_A_B": form_ab, "config_C": form_c, "config_D_E": form_de, "bias": "none",
                        "init_weights": True})
    names = [t.name for t in source.targets]
    return PEFT_TYPE, peft_config, tensors, dict.fromkeys(names, R), dict.fromkeys(names, 0.0)


def _path(key: str, peft_form: str, form: str, rank: int | None, d: torch.Tensor, u: torch.Tensor,
          shape: tuple[int, int], R: int, ref: torch.Tensor) -> dict[str, torch.Tensor]:
    """PEFT's tensors of one matrix path (A, B or C) holding our ``form`` in PEFT's ``peft_form``."""
    rows, cols = shape
    if peft_form == "none":
        return {f"{key}.zeros": torch.zeros(shape, dtype=ref.dtype, device=ref.device)}
    if peft_form == "vector":
        return {f"{key}.X": d[:, 0:1].clone()}
    if peft_form == "constant":
        return {f"{key}.X": d[0, 0:1].clone()}
    Xd = torch.zeros(rows, R, dtype=d.dtype, device=d.device)
    Xu = torch.zeros(R, cols, dtype=d.dtype, device=d.device)
    if form == "lora":
        Xd[:, :rank] = d[:, :rank]
        Xu[:rank] = u[:rank]
    elif form in ("vector", "scalar"):
        Xd[:, 0] = d[:, 0] if form == "vector" else d[0, 0]
        Xu[0] = 1
    return {f"{key}.Xd": Xd, f"{key}.Xu": Xu}


def _vector(key: str, peft_form: str, form: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    if peft_form == "none":
        return {f"{key}.zeros": torch.zeros_like(value)}
    if peft_form == "constant":
        return {f"{key}.X": value[0:1].clone()}
    if form == "vector":
        return {f"{key}.X": value.clone()}
    return {f"{key}.X": torch.full_like(value, float(value[0])) if form == "scalar" else torch.zeros_like(value)}


# ---------------------------------------------------------------------------------- decode
def _expected(c: dict[str, str], o: int, n: int, r: int) -> dict[str, tuple[int, ...]]:
    """``{suffix: shape}`` of a layer of choice ``c`` in PEFT's GLoRA."""
    shapes = {"A": (o, n), "B": (o, n), "C": (n, 1), "D": (o,), "E": (o,)}
    expected: dict[str, tuple[int, ...]] = {}
    for t in "ABCDE":
        f = c[t]
        if f == "lora":
            expected[f"glora_{t}.Xd"] = (shapes[t][0], r)
            expected[f"glora_{t}.Xu"] = (r, shapes[t][1])
        elif f == "vector":
            expected[f"glora_{t}.X"] = (shapes[t][0], 1) if t in "ABC" else (o,)
        elif f == "scalar":
            expected[f"glora_{t}.X"] = (1,)
        else:
            expected[f"glora_{t}.zeros"] = shapes[t]
    return expected


def _fill_layer(layer: Any, key: str, c: dict[str, str], r: int, tensors: dict[str, torch.Tensor]) -> None:
    for p in layer.values():
        p.zero_()
    for t in "ABC":
        path = f"{key}_{t}"
        if c[t] == "lora":
            layer[f"{t}_d"][:, :r].copy_(tensors[f"{path}.Xd"])
            layer[f"{t}_u"][:r].copy_(tensors[f"{path}.Xu"])
        elif c[t] == "vector":
            layer[f"{t}_d"][:, 0].copy_(tensors[f"{path}.X"][:, 0])
        elif c[t] == "scalar":
            layer[f"{t}_d"][0, 0].copy_(tensors[f"{path}.X"][0])
    for t in "DE":
        path = f"{key}_{t}"
        if c[t] == "vector":
            layer[t].copy_(tensors[f"{path}.X"])
        elif c[t] == "scalar":
            layer[t][0].copy_(tensors[f"{path}.X"][0])


def decode(options: dict[str, Any], entries: dict, found: list, views: list, where: str) -> Decoded:
    """A :class:`~tensoradapt.GLoRAConfig` of rank ``r`` with PEFT's forms fixed on every layer."""
    r = options["r"]
    form = {"A": options["config_A_B"], "C": options["config_C"], "D": options["config_D_E"]}
    choices, plans = [], []
    for module, m in found:
        if type(m) is not nn.Linear:
            raise AdapterFileError(f"{where}: PEFT's GLoRA adapts plain nn.Linear layers; {module!r} is a "
                                   f"{type(m).__name__}")
        o, n = m.weight.shape
        c = {t: _OURS[form["A" if t in "AB" else "C" if t == "C" else "D"]] for t in "ABCDE"}
        if m.bias is None:
            c.update(C="none", D="none", E="none")
        expected = _expected(c, o, n, r)
        if entries[module] != expected:
            raise AdapterFileError(f"{where}: module {module!r} has GLoRA tensors {entries[module]}, "
                                   f"expected {expected}")
        choices.append(LayerChoice(**c, rank=r))
        plans.append((module, c))

    def fill(adapter: BaseAdapter, tensors: dict[str, torch.Tensor]) -> None:
        adapter.set_configs(choices)
        with torch.no_grad():
            for (module, c), layer in zip(plans, adapter.layers, strict=True):
                _fill_layer(layer, tensor_key(module, "glora"), c, r, tensors)

    return Decoded(GLoRAConfig(rank=r), fill)
