"""PEFT's LoHa both ways: ``ΔW = (α/r) (w1a w1b) ⊙ (w2a w2b)`` as ``hada_w1_a (o, r)``,
``hada_w1_b (r, n)``, ``hada_w2_a``, ``hada_w2_b`` (LyCORIS's layout too: the kohya codec,
:mod:`tensoradapt.torch.lycoris.loha`, writes and reads the same tensors).  Ranks and alphas per
module follow LoRA's rule (:func:`tensoradapt.torch.peft.lora.module_scales`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tensoradapt import presets
from tensoradapt.superlora.forms import ExactForm, low_rank_pair
from tensoradapt.superlora.plan import param_name

from ..files.layout import AdapterFileError
from .decoded import Decoded, need, padded_to, plan_decoded
from .layout import base_config, check_layer, most_common, patterns, tensor_key
from .lora import module_scales
from .source import Source

PEFT_TYPE = "LOHA"
#: Every tensor suffix of a LoHa module.
SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
#: The options import_peft reads, with PEFT's defaults.
OPTIONS = {"r": 8, "alpha": 8, "rank_pattern": {}, "alpha_pattern": {}}


def tensors(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{suffix: tensor}`` of the two Hadamard factors ``(L_k (o, q), R_k (q, n))``."""
    out = {}
    for k, (L, R) in enumerate(pairs, start=1):
        out[f"hada_w{k}_a"], out[f"hada_w{k}_b"] = L, R
    return out


def encode(source: Source, forms: Sequence[ExactForm], hint: str) -> tuple:
    """The exact PEFT LoHa of targets that are each exactly a LoHa (``forms``)."""
    plan = source.plan
    assert plan is not None
    cfg = plan.config
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for target, form in zip(source.targets, forms, strict=True):
        check_layer(target, "LoHa", hint, lora=False)
        pairs = [low_rank_pair(block, source.params) for block in form.blocks]
        q = pairs[0][0].shape[1]
        out.update({tensor_key(target.name, k): v for k, v in tensors(pairs).items()})
        ranks[target.name] = q
        alphas[target.name] = float(cfg.alpha) if cfg.alpha is not None else form.scale * q
    r = most_common(list(ranks.values()))
    alpha = most_common([alphas[n] for n in ranks if ranks[n] == r])
    config = base_config(PEFT_TYPE, source)
    config.update({"r": r, "alpha": alpha, "rank_pattern": patterns(ranks, r),
                   "alpha_pattern": patterns(alphas, alpha),
                   "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False, "init_weights": True})
    return PEFT_TYPE, config, out, ranks, dict.fromkeys(ranks, 0.0)


def decode(options: dict[str, Any], entries: dict, found: list, views: list, where: str) -> Decoded:
    """The tensoradapt LoHa (``presets.loha(r, alpha)``) of a PEFT LoHa folder."""
    cfg, R, ranks, scales, common = module_scales(options, found, presets.loha, "alpha", False)
    values: dict[str, Any] = {}
    for g, ((module, _), view, q, sc) in enumerate(zip(found, views, ranks, scales, strict=True)):
        o, n = view.shape
        got = need(entries, module, SUFFIXES, where)
        for k in (1, 2):
            if got[f"hada_w{k}_a"] != (o, q) or got[f"hada_w{k}_b"] != (q, n):
                raise AdapterFileError(f"{where}: LoHa tensors of {module!r} have shapes {got}, not rank {q} of "
                                       f"({o}, {n})")
            a, b = tensor_key(module, f"hada_w{k}_a"), tensor_key(module, f"hada_w{k}_b")
            fold = sc / common if k == 1 else 1.0
            values[param_name(g, k, "factor0")] = (lambda t, a=a, fold=fold: padded_to(t[a], R, fold), (o, R))
            values[param_name(g, k, "factor1")] = (lambda t, b=b: padded_to(t[b].t(), R), (n, R))
    return plan_decoded(cfg, values, views, [n for n, _ in found], where, PEFT_TYPE, options["r"])
