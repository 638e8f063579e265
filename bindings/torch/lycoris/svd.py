"""Targets with no native LyCORIS form, written as a LoRA/LoCon of their truncated SVD (the PEFT
SVD export's, :mod:`tensoradapt.torch.peft.svd`), scale 1 (``α = r``)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from ..lifecycle import BaseAdapter
from ..peft import svd as peft_svd
from ..peft.source import Source, Target
from . import lora


def entry(target: Target, delta: torch.Tensor, rank: int | str, dtype: torch.dtype,
          bias: torch.Tensor | None = None) -> tuple[str, dict[str, torch.Tensor], int, float]:
    """A LoRA/LoCon (scale 1: ``α = r``) of ``delta``'s truncated SVD and its relative error (with
    ``bias``, a bias update the file cannot hold, counted as error)."""
    B, A, q, error = peft_svd.truncated(target, delta, rank, dtype)
    if bias is not None:
        dw = float(torch.linalg.matrix_norm(delta.to(torch.float64)))
        db = float(torch.linalg.vector_norm(bias.to(torch.float64)))
        total = math.hypot(dw, db)
        error = math.hypot(error * dw, db) / total if total else 0.0
    return lora.algorithm(target), lora.tensors(target, B, A, torch.tensor(float(q), dtype=torch.float32)), q, error


def plan_entries(source: Source, todo: list[int], rank: int | str) -> dict[int, tuple]:
    """SVD entries of the SuperLoRA targets ``todo``: ``ΔW`` in float64, one component at a time."""
    out_dtype = peft_svd.factor_dtype(source)
    return {t: entry(source.targets[t], delta, rank, out_dtype) for t, delta in peft_svd.deltas(source, todo)}


def layer_entries(adapter: Any, source: Source, rank: int | str) -> dict[int, tuple]:
    """SVD entries of every GLoRA target: ``ΔW = W' − W0`` of its inference config (the bias update
    ``b' − b0`` is reported as error, with a warning)."""
    if not isinstance(adapter, BaseAdapter) or not adapter.attached:
        raise ValueError("a GLoRA adapter's update W0 ⊙ A + B depends on the base weights: export the adapter "
                         "while it is attached to its model (not a GLoRA file, not a detached adapter)")
    merged = adapter.merged_weight_bias()
    wrappers = {w.index: w for w in adapter.wrappers}
    out_dtype = peft_svd.factor_dtype(source)
    out: dict[int, tuple] = {}
    lost = []
    for i, target in enumerate(source.targets):
        W, b = merged[target.name]
        W0, b0 = wrappers[i].base_weight_bias()
        delta = W.to(torch.float64) - W0.to(torch.float64)
        bias = None
        if b is not None:
            bias = b.to(torch.float64) - (b0.to(torch.float64) if b0 is not None else 0.0)
            if bool((bias != 0).any()):
                lost.append(target.name)
        out[i] = entry(target, delta, rank, out_dtype, bias)
    if lost:
        warnings.warn(f"GLoRA changes the biases of {len(lost)} layers (e.g. {lost[0]!r}); a kohya file holds weight "
                      "updates only, so those bias updates are dropped (counted in the reported errors)",
                      UserWarning, stacklevel=4)
    return out
