"""Kohya's LoKr both ways: PEFT's LoKr tensors (:mod:`tensoradapt.torch.peft.lokr`: each block full
or a low-rank pair, a full ``w2`` of a convolution ``(c, channels/b, *kernel)``) and a scalar
``alpha``, in LyCORIS's block layout: sorted factorisations, a convolution's kernel kept whole in
``w2``, scale ``α/r`` (1 for two full blocks).  LyCORIS's loader infers the factor from the block
shapes and lays the module out again, so only blocks of its own layout are written natively."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from tensoradapt import SuperLoRA, SuperLoRAConfig
from tensoradapt.superlora.factorize import factorization
from tensoradapt.superlora.forms import ExactForm
from tensoradapt.superlora.plan import param_name

from ..files.layout import AdapterFileError
from ..peft import lokr as peft_lokr
from ..peft.source import Source, Target
from .entry import Entry, encode_alpha

#: The tensors of a LoKr module (besides ``alpha``).
SUFFIXES = peft_lokr.SUFFIXES


# ---------------------------------------------------------------------------------- layout
def _factorization(dim: int, factor: int) -> tuple[int, int]:
    """LyCORIS's ``factorization`` (sorted ``(m, n)``, ``m·n = dim``): tensoradapt's rule."""
    return factorization(dim, factor if factor > 0 else -1)


def lycoris_reads(target: Target, w1: tuple[int, int], q1: int | None, w2: tuple[int, ...], q2: int | None) -> bool:
    """Whether LyCORIS's loader, given LoKr blocks ``w1`` (rank ``q1``, None when full) and ``w2``
    (as stored: ``(c, in_n, *kernel)`` full on a convolution, else ``(c, e)``; rank ``q2``), rebuilds
    exactly these blocks on ``target``: it infers ``factor`` from the shapes and lays the module out
    again (``lycoris.modules.lokr``), so only blocks of its own layout survive the round trip."""
    o = target.weight_shape[0]
    conv = target.layer == "conv"
    channels = target.weight_shape[1] if conv else target.shape[1]
    kernel = tuple(target.weight_shape[2:]) if conv else ()
    a, b = w1
    c, e_file = w2[0], w2[1]
    out_total, in_total = a * c, b * e_file
    if (a, b) == (_factorization(out_total, -1)[0], _factorization(in_total, -1)[0]):
        factor = -1
    else:
        f1, f2 = max(w1), max(w2)
        factor = min(f1, f2)
        for f in (f1, f2):
            if out_total % f == 0 and in_total % f == 0 and f in (a, c) and f in (b, e_file):
                factor = f
                break
    full = q1 is None and q2 is None
    dim = q1 if q1 is not None else q2 if q2 is not None else 1
    out_l, out_k = _factorization(o, factor)
    in_m, in_n = _factorization(channels, factor)
    low1 = q1 is not None and q2 is not None and dim < max(out_l, in_m) / 2
    low2 = not full and dim < max(out_k, in_n) / 2
    want2 = (out_k, in_n * math.prod(kernel)) if low2 or not conv else (out_k, in_n, *kernel)
    return ((out_l, in_m), low1, want2, low2) == (w1, q1 is not None, tuple(w2), q2 is not None)


# ---------------------------------------------------------------------------------- encode
def encode(source: Source, target: Target, form: ExactForm,
           pairs: Sequence[Any]) -> tuple[str, dict[str, torch.Tensor], int] | None:
    """``("lokr", tensors, rank)`` of a target that is exactly a LoKr, None when LyCORIS would lay
    its blocks out otherwise (it is then written as an SVD LoRA)."""
    first, second = form.blocks
    q1 = None if pairs[0] is None else pairs[0][0].shape[1]
    q2 = None if pairs[1] is None else pairs[1][0].shape[1]
    w2_shape: tuple[int, ...] | None = tuple(second.shape)
    if q2 is None and target.layer == "conv":
        w2_shape = peft_lokr.conv_w2_shape(target, first.shape[1], second.shape)
        if w2_shape is None:
            return None  # the Kronecker blocks split the kernel: LyCORIS keeps it whole in w2
    if (q1 is not None and q2 is not None and q1 != q2) or \
            not lycoris_reads(target, tuple(first.shape), q1, w2_shape, q2):
        return None
    dim = q1 if q1 is not None else q2
    fold = form.scale if dim is None and form.scale != 1.0 else 1.0  # two full blocks: LyCORIS's scale is 1
    out = peft_lokr.block_tensors(form.blocks, source.params, pairs, w2_shape, fold)
    plain = all(b.split.kind in ("identity", "dense") for b in form.blocks)
    out["alpha"] = torch.tensor(1.0, dtype=torch.float32) if dim is None else encode_alpha(
        source.plan.config, form, dim, plain)
    return "lokr", out, dim or 0


# ---------------------------------------------------------------------------------- decode
def check(item: Entry, where: str) -> None:
    """Check the module's blocks against its ``(o, n)`` and set its ranks and layout."""
    o, n = item.view.shape
    weight = tuple(item.view.weight_shape)
    conv = len(weight) > 2 and item.view.kind != "linear"
    s = item.shapes
    blocks: list[tuple[int, int]] = []
    ranks: list[int | None] = []
    for k in (1, 2):
        dense = s.get(f"lokr_w{k}")
        if dense is not None:
            if k == 2 and conv:
                if len(dense) != len(weight) or tuple(dense[2:]) != weight[2:]:
                    kernel = ", ".join(map(str, weight[2:]))
                    raise item.mismatch(f"a full lokr_w2 of a convolution is [c, in_channels/b, {kernel}]", where)
                dense = (dense[0], math.prod(dense[1:]))
            elif len(dense) != 2:
                raise item.mismatch(f"lokr_w{k} must be 2-D", where)
            blocks.append((dense[0], dense[1]))
            ranks.append(None)
            continue
        a, b = s[f"lokr_w{k}_a"], s[f"lokr_w{k}_b"]
        if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
            raise item.mismatch(f"lokr_w{k}_a must be [rows, r] and lokr_w{k}_b [r, columns]", where)
        blocks.append((a[0], b[1]))
        ranks.append(item.rank(a[1], where))
    (a, b), (c, e) = blocks
    if a * c != o or b * e != n or 0 in (a, b, c, e):
        raise item.mismatch(f"w1 {list(blocks[0])} ⊗ w2 {list(blocks[1])} is not ({o}, {n})", where)
    if conv and s.get("lokr_w2") is not None and weight[1] % b:
        raise item.mismatch(f"w1's {b} columns do not divide the {weight[1]} input channels", where)
    if None not in ranks and ranks[0] != ranks[1]:
        raise item.mismatch(f"LyCORIS's LoKr has one rank, not {ranks[0]} and {ranks[1]}", where)
    item.ranks, item.layout = tuple(ranks), tuple(blocks)


def config(items: list[Entry], where: str) -> SuperLoRAConfig:
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


def values(item: Entry, g: int, group: Any, fold: float) -> dict[str, torch.Tensor]:
    """``{parameter name: value}`` of group ``g``'s two blocks from the module's tensors, the file's
    scale over the plan's (``fold``) folded into the first."""
    out: dict[str, torch.Tensor] = {}
    v = item.values
    for k, split in enumerate(group.splits, start=1):
        if split.kind == "dense":
            dense = v[f"lokr_w{k}"].reshape(split.shape).to(torch.float64)
            out[param_name(g, k, "dense")] = dense * fold if k == 1 else dense
        else:
            first = v[f"lokr_w{k}_a"].to(torch.float64)
            out[param_name(g, k, "factor0")] = first * fold if k == 1 else first
            out[param_name(g, k, "factor1")] = v[f"lokr_w{k}_b"].t()
    return out
