"""Kohya's LoHa both ways: PEFT's LoHa tensors (:mod:`tensoradapt.torch.peft.loha`) and a scalar
``alpha``, ``ΔW = (α/r) (w1a w1b) ⊙ (w2a w2b)``, ``r`` the rows of ``hada_w1_b``; both factors
written at one rank (the smaller zero-padded)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tensoradapt.superlora.forms import ExactForm

from ..peft import loha as peft_loha
from ..peft.source import Source, Target
from .entry import Entry, encode_alpha

#: The tensors of a LoHa module (besides ``alpha``).
SUFFIXES = peft_loha.SUFFIXES


def encode(source: Source, target: Target, form: ExactForm, pairs: Sequence[Any]) -> tuple[str, dict, int]:
    """``("loha", tensors, rank)`` of a target that is exactly a LoHa."""
    q = max(L.shape[1] for L, _ in pairs)
    padded = []
    for L, R in pairs:
        pad = q - L.shape[1]
        padded.append((torch.nn.functional.pad(L, (0, pad)) if pad else L,
                       torch.nn.functional.pad(R, (0, 0, 0, pad)) if pad else R))
    out = peft_loha.tensors(padded)
    plain = all(b.split.kind == "identity" for b in form.blocks) and not any(L.shape[1] != q for L, _ in pairs)
    out["alpha"] = encode_alpha(source.plan.config, form, q, plain)
    return "loha", out, q


def check(item: Entry, where: str) -> None:
    """Check the module's Hadamard factors against its ``(o, n)`` and set its two ranks."""
    o, n = item.view.shape
    ranks = []
    for k in (1, 2):
        a, b = item.shapes[f"hada_w{k}_a"], item.shapes[f"hada_w{k}_b"]
        if len(a) != 2 or len(b) != 2 or a[0] != o or b[1] != n or a[1] != b[0]:
            raise item.mismatch(f"hada_w{k}_a must be [{o}, r] and hada_w{k}_b [r, {n}]", where)
        ranks.append(item.rank(a[1], where))
    item.ranks = tuple(ranks)


def pairs(item: Entry) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(L_k (o, r), R_kᵀ (n, r))]`` of the module's two Hadamard factors."""
    return [(item.values[f"hada_w{k}_a"], item.values[f"hada_w{k}_b"].t()) for k in (1, 2)]
