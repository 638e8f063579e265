"""PEFT's LoKr both ways: ``ΔW = (α/r) w1 ⊗ w2`` with ``w1 (a, b)`` stored full (``lokr_w1``) or as
``lokr_w1_a (a, r)``, ``lokr_w1_b (r, b)``, and ``w2 (c, e)`` likewise (``lokr_w2`` of a
convolution is stored ``(c, channels/b, *kernel)``; the kohya codec stores blocks the same way).

PEFT lays a module out as LyCORIS does, except that its ``decompose_factor`` splits a dimension
as ``(factor, dim/factor)`` **unsorted** (:func:`peft_factorization`), that it factorises a
convolution's input channels apart from its kernel, and that it always scales by ``α/r``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tensoradapt import SuperLoRA, SuperLoRAConfig
from tensoradapt.superlora.factorize import factorization
from tensoradapt.superlora.forms import Block, ExactForm, low_rank_pair
from tensoradapt.superlora.plan import param_name

from ..files.layout import AdapterFileError
from .decoded import Decoded, plan_decoded
from .layout import base_config, check_layer, divisors, most_common, pattern_value, patterns, tensor_key
from .source import Source, Target

PEFT_TYPE = "LOKR"
#: Every tensor suffix of a LoKr module.
SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
#: The options import_peft reads, with PEFT's defaults.
OPTIONS = {"r": 8, "alpha": 8, "rank_pattern": {}, "alpha_pattern": {}, "decompose_both": False,
           "decompose_factor": -1}


# ---------------------------------------------------------------------------------- layout
def peft_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's (LyCORIS's) ``factorization``: ``(factor, dimension // factor)`` **unsorted** when
    ``factor > 0`` divides ``dimension``, else the sorted pair nearest ``√dimension`` that ``factor``
    allows (then equal to :func:`tensoradapt.superlora.factorize.factorization`)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    return factorization(dimension, factor)


def peft_layout(target: Target, r: int, decompose_both: bool, factor: int) -> tuple:
    """``((a, b), (c, e), kernel, use_w1, use_w2)`` PEFT's LoKr builds on ``target``: ``w1 (a, b)``,
    ``w2 (c, e)`` with ``e`` the flattened ``in_n · Π kernel``."""
    o = target.weight_shape[0]
    i = target.shape[1] if target.layer != "conv" else target.weight_shape[1]
    kernel = tuple(target.weight_shape[2:]) if target.layer == "conv" else ()
    out_l, out_k = peft_factorization(o, factor)
    in_m, in_n = peft_factorization(i, factor)
    use_w1 = not (decompose_both and r < max(out_l, in_m) / 2)
    use_w2 = not (r < max(out_k, in_n) / 2)
    return (out_l, in_m), (out_k, in_n * math.prod(kernel)), kernel, use_w1, use_w2


def conv_w2_shape(target: Target, b: int, second: Sequence[int]) -> tuple[int, ...] | None:
    """How a full ``w2`` of matrix shape ``second = (c, e)`` is stored beside a ``w1`` of ``b``
    columns: ``(c, channels/b, *kernel)`` on a convolution (None when ``w1`` splits the kernel),
    else ``(c, e)``."""
    if target.layer != "conv":
        return tuple(second)
    channels = target.weight_shape[1] // b if target.weight_shape[1] % b == 0 else 0
    if not channels or channels * math.prod(target.weight_shape[2:]) != second[1]:
        return None
    return (second[0], channels, *target.weight_shape[2:])


def block_tensors(blocks: Sequence[Block], params: dict[str, torch.Tensor], pairs: Sequence[Any],
                  w2_shape: tuple[int, ...], fold: float = 1.0) -> dict[str, torch.Tensor]:
    """``{suffix: tensor}`` of the two Kronecker blocks: a full block as ``lokr_w{k}`` (the first
    times ``fold``, the second in ``w2_shape``), a low-rank one as its pair ``lokr_w{k}_a/_b``."""
    out: dict[str, torch.Tensor] = {}
    for block, pair in zip(blocks, pairs, strict=True):
        k = block.number
        if pair is None:
            value = params[block.names["dense"]].detach()
            value = value * fold if k == 1 and fold != 1.0 else value
            out[f"lokr_w{k}"] = value.reshape(w2_shape if k == 2 else tuple(block.shape))
        else:
            out[f"lokr_w{k}_a"], out[f"lokr_w{k}_b"] = pair
    return out


# ---------------------------------------------------------------------------------- encode
def _choose(source: Source, ours: list[tuple], hint: str) -> tuple[int, bool, int]:
    """``(r, decompose_both, decompose_factor)`` of the PEFT LoKr laying every target out as ours."""
    cfg = source.plan.config
    low = {q for *_, q1, q2 in ours for q in (q1, q2) if q is not None}
    if len(low) > 1:
        raise ValueError(f"the LoKr blocks of {source.origin} have ranks {sorted(low)}; PEFT's LoKr has one r")
    ranks = [low.pop()] if low else sorted({cfg.ranks[0], max(math.ceil(max(s2) / 2) for _, s2, *_ in ours)})
    first = source.targets[0]
    factors = [cfg.dense_side if cfg.dense_side is not None else -1, -1]
    for d in divisors(first.weight_shape[0]) + divisors(first.weight_shape[1] if first.layer == "conv"
                                                         else first.shape[1]):
        if d not in factors:
            factors.append(d)
    for r in ranks:
        for db in (cfg.decompose_both, not cfg.decompose_both):
            for f in factors:
                if all(_fits(target, r, db, f, mine) for target, mine in zip(source.targets, ours, strict=True)):
                    return r, db, f
    t, (s1, s2, *_) = source.targets[0], ours[0]
    raise ValueError(f"no PEFT LoKr (one r, decompose_both, decompose_factor for all targets) has the Kronecker "
                     f"blocks of {source.origin} (e.g. {t.name!r}: {s1} x {s2}); PEFT factorises the input channels "
                     "of a convolution apart from its kernel and keeps (factor, dim/factor) unsorted; " + hint)


def _fits(target: Target, r: int, db: bool, f: int, mine: tuple) -> bool:
    s1, s2, d1, d2, _, _ = mine
    w1, w2, _, use_w1, use_w2 = peft_layout(target, r, db, f)
    return (w1, w2, use_w1, use_w2) == (tuple(s1), tuple(s2), d1, d2)


def encode(source: Source, forms: Sequence[ExactForm], hint: str) -> tuple:
    """The exact PEFT LoKr of targets that are each exactly a LoKr (``forms``)."""
    plan = source.plan
    assert plan is not None
    cfg = plan.config
    for target in source.targets:
        check_layer(target, "LoKr", hint, lora=False)
    ours = [(b1.shape, b2.shape, b1.dense, b2.dense, b1.split.ranks[0] if not b1.dense else None,
             b2.split.ranks[0] if not b2.dense else None) for b1, b2 in (f.blocks for f in forms)]
    r, db, f = _choose(source, ours, hint)
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for target, form in zip(source.targets, forms, strict=True):
        pairs = [None if b.dense else low_rank_pair(b, source.params) for b in form.blocks]
        first, second = form.blocks
        w2_shape = conv_w2_shape(target, first.shape[1], second.shape)
        blocks = block_tensors(form.blocks, source.params, pairs, w2_shape)
        out.update({tensor_key(target.name, k): v for k, v in blocks.items()})
        ranks[target.name] = r
        if cfg.alpha is not None and r == cfg.ranks[0] and form.scale == cfg.effective_scale:
            alphas[target.name] = float(cfg.alpha)  # PEFT's alpha / r is then our scale, bit for bit
        else:
            alphas[target.name] = form.scale * r  # LyCORIS's full second block: 1 · r
    alpha = most_common(list(alphas.values()))
    config = base_config(PEFT_TYPE, source)
    config.update({"r": r, "alpha": alpha, "rank_pattern": {}, "alpha_pattern": patterns(alphas, alpha),
                   "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False,
                   "decompose_both": db, "decompose_factor": f, "rank_dropout_scale": False, "init_weights": True})
    return PEFT_TYPE, config, out, ranks, dict.fromkeys(ranks, 0.0)


# ---------------------------------------------------------------------------------- decode
def _module_layout(module: str, m: nn.Module, got: dict[str, tuple[int, ...]], where: str) -> tuple:
    """``(w1 shape, w2 shape as (c, e), w1 full, w2 full)`` of one module's LoKr tensors."""
    if isinstance(m, nn.Embedding) or type(m).__name__ == "Conv1D" or (
            isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.weight.dim() not in (3, 4)):
        raise AdapterFileError(f"{where}: PEFT's LoKr does not adapt {type(m).__name__} {module!r}")
    dense1, dense2 = "lokr_w1" in got, "lokr_w2" in got
    expected = {"lokr_w1"} if dense1 else {"lokr_w1_a", "lokr_w1_b"}
    expected |= {"lokr_w2"} if dense2 else {"lokr_w2_a", "lokr_w2_b"}
    if set(got) != expected:
        raise AdapterFileError(f"{where}: module {module!r} has LoKr tensors {sorted(got)}")
    s1 = got["lokr_w1"] if dense1 else (got["lokr_w1_a"][0], got["lokr_w1_b"][-1])
    if dense2:
        w2 = got["lokr_w2"]
        s2 = (w2[0], math.prod(w2[1:]))
    else:
        s2 = (got["lokr_w2_a"][0], got["lokr_w2_b"][-1])
    return tuple(s1), tuple(s2), dense1, dense2


def _scale_fields(options: dict[str, Any], found: list, layout: list, r: int, where: str) -> dict[str, Any]:
    alpha = options["alpha"]
    alphas = [pattern_value(options["alpha_pattern"], module, alpha) for module, _ in found]
    if len(set(alphas)) == 1:
        return {"scale": alphas[0] / r}  # PEFT's alpha / r on every module
    if all(a == (r if lay[3] else alpha) for a, lay in zip(alphas, layout, strict=True)):
        return {"alpha": alpha}  # LyCORIS's rule (what export_peft writes): full w2 -> alpha = r, scale 1
    raise AdapterFileError(f"{where}: alpha_pattern gives the LoKr modules alphas {sorted(set(alphas))}; a "
                           "tensoradapt LoKr has one alpha/r (or LyCORIS's 1 on full second blocks)")


def _config(options: dict[str, Any], found: list, views: list, layout: list, r: int,
            scale_fields: dict[str, Any]) -> SuperLoRAConfig | None:
    """The tensoradapt LoKr whose plan lays every module out as the folder does, or None."""
    factors = [options["decompose_factor"], -1]
    for d in divisors(views[0].shape[0]) + divisors(views[0].shape[1]):
        if d not in factors:
            factors.append(d)
    for f in factors:
        try:
            cfg = SuperLoRAConfig(rank=r, order=2, splits=2, dense_side=f, fold="matrix", core="identity",
                                  decompose_both=options["decompose_both"], **scale_fields)
            plan = SuperLoRA(cfg, [v.shape for v in views], [n for n, _ in found])
        except (ValueError, TypeError):
            continue
        if all((tuple(g.splits[0].shape), tuple(g.splits[1].shape), g.splits[0].kind == "dense",
                g.splits[1].kind == "dense") == lay for g, lay in zip(plan.groups, layout, strict=True)):
            return cfg
    return None


def decode(options: dict[str, Any], entries: dict, found: list, views: list, where: str) -> Decoded:
    """The tensoradapt LoKr (``presets.lokr``-style: PEFT's factorisation and ``α/r``) of a folder."""
    ranks = {module: pattern_value(options["rank_pattern"], module, options["r"]) for module, _ in found}
    if len(set(ranks.values())) > 1:  # each rank shapes PEFT's LoKr layout (which blocks are low-rank)
        raise AdapterFileError(f"{where}: rank_pattern gives the LoKr modules ranks {sorted(set(ranks.values()))}; a "
                               "tensoradapt LoKr has one rank")
    r = next(iter(ranks.values()))
    layout = [_module_layout(module, m, entries[module], where) for module, m in found]
    chosen = _config(options, found, views, layout, r, _scale_fields(options, found, layout, r, where))
    if chosen is None:
        module = found[0][0]
        raise AdapterFileError(f"{where}: the LoKr blocks of {module!r} ({layout[0][0]} x {layout[0][1]}) are not a "
                               "tensoradapt LoKr factorisation (tensoradapt keeps the smaller factor first, so PEFT's "
                               "unsorted (factor, dim/factor) with factor > dim/factor, and conv kernels split apart "
                               "from the channels, have no tensoradapt equivalent)")
    values: dict[str, Any] = {}
    for g, ((module, _), lay) in enumerate(zip(found, layout, strict=True)):
        s1, s2, dense1, dense2 = lay
        for k, (shape, dense) in enumerate(((s1, dense1), (s2, dense2)), start=1):
            if dense:
                name = tensor_key(module, f"lokr_w{k}")
                values[param_name(g, k, "dense")] = (lambda t, name=name, shape=shape: t[name].reshape(shape), shape)
            else:
                a, b = tensor_key(module, f"lokr_w{k}_a"), tensor_key(module, f"lokr_w{k}_b")
                values[param_name(g, k, "factor0")] = (lambda t, a=a: t[a], (shape[0], r))
                values[param_name(g, k, "factor1")] = (lambda t, b=b: t[b].t(), (shape[1], r))
    return plan_decoded(chosen, values, views, [n for n, _ in found], where, PEFT_TYPE, options["r"])
