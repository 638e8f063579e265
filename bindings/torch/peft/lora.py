"""PEFT's LoRA both ways: ``ΔW = (α/r) B A`` as ``lora_A`` / ``lora_B`` (``lora_embedding_A`` /
``lora_embedding_B`` on an embedding), and the per-module rank / alpha rule LoRA and LoHa share.

Layout on a target of ``(o, n)`` matrix view and weight shape ``(o, c, *kernel)``: ``lora_A.weight
(r, n)`` (a convolution: ``(r, c, *kernel)``), ``lora_B.weight (o, r)`` (a convolution: ``(o, r,
1, …)``); an embedding stores ``lora_embedding_A = Bᵀ (r, o)`` and ``lora_embedding_B = Aᵀ (n, r)``.
The convolution layout is also kohya's LoCon layout (:mod:`tensoradapt.torch.lycoris.lora`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tensoradapt import presets
from tensoradapt.superlora.forms import ExactForm, low_rank_pair
from tensoradapt.superlora.plan import param_name

from ..files.layout import AdapterFileError
from .decoded import Decoded, need, padded_to, plan_decoded
from .layout import base_config, check_layer, most_common, pattern_value, patterns, tensor_key
from .source import Source, Target

PEFT_TYPE = "LORA"
A_KEY, B_KEY = "lora_A.weight", "lora_B.weight"
EMBEDDING_A, EMBEDDING_B = "lora_embedding_A", "lora_embedding_B"
#: Every tensor suffix of a PEFT LoRA module.
SUFFIXES = (A_KEY, B_KEY, EMBEDDING_A, EMBEDDING_B)
#: The options import_peft reads, with PEFT's defaults.
OPTIONS = {"r": 8, "lora_alpha": 8, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False}


# ---------------------------------------------------------------------------------- layout
def factor_shapes(o: int, n: int, r: int, weight_shape: tuple[int, ...],
                  conv: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The stored shapes ``(B, A)`` of rank ``r`` on a layer of ``(o, n)`` matrix view: ``(o, r)``
    and ``(r, n)``, or on a convolution ``(o, r, 1, …)`` and ``(r, c, *kernel)``."""
    if not conv:
        return (o, r), (r, n)
    return (o, r, *(1,) * (len(weight_shape) - 2)), (r, *weight_shape[1:])


def shaped(target: Target, B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` of ``ΔW = B A`` (``B (o, r)``, ``A (r, n)``) in the layer's layout
    (:func:`factor_shapes`)."""
    if target.layer != "conv":
        return B, A
    b, a = factor_shapes(B.shape[0], A.shape[1], B.shape[1], tuple(target.weight_shape), True)
    return B.reshape(b), A.reshape(a)


def b_matrix(B: torch.Tensor, o: int) -> torch.Tensor:
    """The inverse of :func:`shaped` on a stored (checked) ``B``: ``B (o, r)``."""
    return B.reshape(o, -1)


def a_matrix(A: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of :func:`shaped` on a stored (checked) ``A``, transposed: ``Aᵀ (n, r)``."""
    return A.reshape(-1, n).t()


def tensors(target: Target, B: torch.Tensor, A: torch.Tensor) -> dict[str, torch.Tensor]:
    """PEFT LoRA tensors of ``ΔW = B A`` (``B (o, r)``, ``A (r, n)``) on ``target``."""
    if target.layer == "embedding":
        return {tensor_key(target.name, EMBEDDING_A): B.t(), tensor_key(target.name, EMBEDDING_B): A.t()}
    B, A = shaped(target, B, A)
    return {tensor_key(target.name, A_KEY): A, tensor_key(target.name, B_KEY): B}


def zero_padding_row(target: Target, B: torch.Tensor) -> torch.Tensor:
    """``B`` with an embedding's padding row zeroed (tensoradapt never updates it; PEFT would)."""
    if target.layer != "embedding" or target.padding_idx is None:
        return B
    B = B.clone()
    B[target.padding_idx] = 0
    return B


def config(source: Source, ranks: dict[str, int], alphas: dict[str, float]) -> dict[str, Any]:
    """The ``adapter_config.json`` of a LoRA of per-target ``ranks`` and ``alphas``."""
    names = list(ranks)
    r = most_common([ranks[n] for n in names])
    alpha = most_common([alphas[n] for n in names if ranks[n] == r])
    out = base_config(PEFT_TYPE, source)
    out.update({
        "r": r, "lora_alpha": alpha, "rank_pattern": patterns(ranks, r), "alpha_pattern": patterns(alphas, alpha),
        "fan_in_fan_out": any(t.layer == "conv1d" for t in source.targets), "bias": "none", "use_rslora": False,
        "use_dora": False, "lora_bias": False, "lora_dropout": 0.0, "init_lora_weights": True,
        "target_parameters": None, "layer_replication": None,
    })
    return out


# ---------------------------------------------------------------------------------- encode
def encode(source: Source, forms: Sequence[ExactForm]) -> tuple:
    """The exact PEFT LoRA of targets that are each exactly a LoRA (``forms``)."""
    plan = source.plan
    assert plan is not None
    cfg = plan.config
    hint = "pass a rank (rank=r, or 'exact'; --rank on the command line) to export a truncated SVD instead"
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for target, form in zip(source.targets, forms, strict=True):
        check_layer(target, "LoRA", hint, lora=True)
        block = form.blocks[0]
        with torch.no_grad():
            L, R = low_rank_pair(block, source.params)
        q = L.shape[1]
        if cfg.alpha is not None and block.split.kind == "identity" and q == cfg.ranks[0]:
            alphas[target.name] = float(cfg.alpha)  # PEFT's alpha / r is then our scale, bit for bit
        else:
            alphas[target.name] = form.scale * q
        ranks[target.name] = q
        out.update(tensors(target, zero_padding_row(target, L), R))
    return PEFT_TYPE, config(source, ranks, alphas), out, ranks, dict.fromkeys(ranks, 0.0)


# ---------------------------------------------------------------------------------- decode
def module_scales(options: dict[str, Any], found: Sequence[tuple[str, nn.Module]], make: Any,
                  alpha_key: str, rslora: bool) -> tuple[Any, int, list[int], list[float], float]:
    """``(config, R, ranks, scales, common scale)`` of a LoRA-like folder: the rank and alpha PEFT
    applies to each module (``rank_pattern`` / ``alpha_pattern`` resolved), as one tensoradapt
    ``make(R)`` of rank ``R = max r_i`` and the most common scale (the file's ``alpha`` itself when
    every module shares rank and alpha, so ``α/r`` is PEFT's bit for bit)."""
    r, alpha = options["r"], options[alpha_key]
    ranks = [pattern_value(options["rank_pattern"], module, r) for module, _ in found]
    alphas = [pattern_value(options["alpha_pattern"], module, alpha) for module, _ in found]
    scales = [a / math.sqrt(q) if rslora else a / q for a, q in zip(alphas, ranks, strict=True)]
    R = max(ranks)
    if set(ranks) == {R} and len(set(alphas)) == 1 and not rslora:
        return make(R, alphas[0]), R, ranks, scales, scales[0]
    # one rank R = max r_i (smaller ranks padded with zero columns) and the most common scale; another
    # module's scale is folded into its first factor
    common = most_common(scales)
    return make(R).replace(scale=common), R, ranks, scales, common


def _padding_checked(U: torch.Tensor, pad: int | None, module: str, where: str) -> torch.Tensor:
    if pad is not None and bool((U[pad] != 0).any()):
        raise AdapterFileError(f"{where}: the LoRA of embedding {module!r} updates its padding row {pad}, which "
                               "tensoradapt (like PyTorch) keeps fixed; no tensoradapt adapter reproduces it")
    return U


def _embedding_values(g: int, module: str, m: nn.Module, got: dict, o: int, n: int, q: int, R: int, fold: float,
                      where: str) -> dict[str, Any]:
    if got[EMBEDDING_A] != (q, o) or got[EMBEDDING_B] != (n, q):
        raise AdapterFileError(f"{where}: LoRA tensors of embedding {module!r} have shapes {got}, not rank {q} of "
                               f"({o}, {n})")
    a, b = tensor_key(module, EMBEDDING_A), tensor_key(module, EMBEDDING_B)
    pad = m.padding_idx
    return {param_name(g, 1, "factor0"): (lambda t: padded_to(_padding_checked(t[a].t(), pad, module, where), R,
                                                              fold), (o, R)),
            param_name(g, 1, "factor1"): (lambda t: padded_to(t[b], R), (n, R))}


def decode(options: dict[str, Any], entries: dict, found: list, views: list, where: str) -> Decoded:
    """The tensoradapt LoRA (``presets.lora``; ``use_rslora``: scale ``α/√r``) of a PEFT LoRA folder."""
    cfg, R, ranks, scales, common = module_scales(options, found, presets.lora, "lora_alpha", options["use_rslora"])
    values: dict[str, Any] = {}
    for g, ((module, m), view, q, sc) in enumerate(zip(found, views, ranks, scales, strict=True)):
        o, n = view.shape
        fold = sc / common
        if isinstance(m, nn.Embedding):
            got = need(entries, module, (EMBEDDING_A, EMBEDDING_B), where)
            values.update(_embedding_values(g, module, m, got, o, n, q, R, fold, where))
            continue
        got = need(entries, module, (A_KEY, B_KEY), where)
        A, B = got[A_KEY], got[B_KEY]
        if math.prod(A) != q * n or A[0] != q or tuple(B[:2]) != (o, q) or math.prod(B) != o * q:
            raise AdapterFileError(f"{where}: LoRA tensors of {module!r} have shapes {got}, not rank {q} of "
                                   f"({o}, {n})")
        a, b = tensor_key(module, A_KEY), tensor_key(module, B_KEY)
        values[param_name(g, 1, "factor0")] = (lambda t, b=b, o=o, fold=fold: padded_to(b_matrix(t[b], o), R, fold),
                                               (o, R))
        values[param_name(g, 1, "factor1")] = (lambda t, a=a, n=n: padded_to(a_matrix(t[a], n), R), (n, R))
    return plan_decoded(cfg, values, views, [n for n, _ in found], where, PEFT_TYPE, options["r"])
