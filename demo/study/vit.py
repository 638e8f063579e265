"""The study's classification task at the paper's L: a 12-block ViT, Fashion-MNIST → MNIST.

* The model is the demo's :class:`~tensoradapt.demo.model.TinyViT` at depth 12 (width 32, 4
  heads, 14×14 images cut into four 7×7 patches + a CLS token): its 12 ``query`` and 12 ``value``
  weights are the **L = 24** square (32×32) targets, the number ViT-Base's q/v give in the paper.
* It is **pretrained** on the full Fashion-MNIST training set (60,000 images, 10 classes;
  :func:`pretrain_vit`), then **transferred** to MNIST digits (the 5,000 images of
  :func:`~tensoradapt.demo.study.datasets.mnist_5k`): a new 10-class head plus the adapter, the
  backbone frozen (:func:`adapt_vit`).
* The target's fixed cuts (:func:`target_cuts`): ``test`` images (the reported score: one 0/1
  per test image), ``validation`` images (the score every choice is made on) and ``train`` images
  (what every run trains on), disjoint and class-balanced.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

import tensoradapt.torch as tat

from ..data import Split
from ..model import TARGETS, TinyViT
from ..train import fit, repeat_seeds
from . import datasets

__all__ = ["ViTSettings", "adapt_vit", "pretrain_vit", "source_data", "target_cuts"]

CLASSES = 10


@dataclass(frozen=True)
class ViTSettings:
    """Sizes, steps, learning rates and data cuts of the ViT task (defaults: the full study)."""

    width: int = 32
    depth: int = 12
    heads: int = 4
    side: int = 14
    patch: int = 7
    mlp_ratio: int = 2
    pretrain_steps: int = 1500
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 64
    transfer_steps: int = 150
    batch_size: int = 32
    head_lr: float = 1e-2
    target_train: int = 500
    target_validation: int = 500
    target_test: int = 1000
    source_train: int = 60000


def source_data(s: ViTSettings) -> Split:
    """Fashion-MNIST at ``s.side`` (the first ``s.source_train`` training images, all 10,000 test)."""
    x_tr, y_tr, x_te, y_te = datasets.fashion_mnist(s.side)
    n = min(s.source_train, x_tr.shape[0])
    return Split(torch.from_numpy(x_tr[:n]), torch.from_numpy(y_tr[:n]), torch.from_numpy(x_te),
                 torch.from_numpy(y_te))


def target_cuts(s: ViTSettings, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """MNIST-5k cut into ``train`` / ``validation`` / ``test`` (class-balanced, fixed by ``seed``)."""
    x, y = datasets.mnist_5k(s.side)
    test, val, train = datasets.stratified_cut(y, (s.target_test, s.target_validation, s.target_train), seed)
    return {name: (torch.from_numpy(x[i]), torch.from_numpy(y[i]))
            for name, i in (("train", train), ("validation", val), ("test", test))}


def _model(s: ViTSettings) -> TinyViT:
    return TinyViT(CLASSES, s.width, s.depth, s.heads, s.patch, s.mlp_ratio, s.side)


def build_backbone(s: ViTSettings) -> TinyViT:
    """An untrained model of the sizes in ``s`` (to load a cached state into)."""
    return _model(s)


@torch.no_grad()
def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2000) -> np.ndarray:
    """0/1 per image: whether the arg-max logit is the label (eval mode, batched)."""
    model.eval()
    hits = [(model(x[i:i + batch]).argmax(dim=1) == y[i:i + batch]) for i in range(0, x.shape[0], batch)]
    return torch.cat(hits).numpy().astype(np.int8)


def pretrain_vit(source: Split, s: ViTSettings, seed: int) -> tuple[TinyViT, float]:
    """Train the ViT from scratch on ``source``; returns it (eval mode) and its source test accuracy."""
    torch.manual_seed(seed)
    model = _model(s)
    fit(model, [{"params": list(model.parameters()), "lr": s.pretrain_lr}], source, s.pretrain_steps,
        s.pretrain_batch, seed)
    return model, float(correct(model, source.x_test, source.y_test).mean())


@dataclass
class ViTRun:
    """One transfer: 0/1 per validation and per test image, training time and parameter counts."""

    val_items: np.ndarray
    test_items: np.ndarray
    train_time_s: float
    adapter_params: int
    head_params: int


def adapt_vit(backbone: TinyViT, config: Any, lr: float, cuts: dict[str, tuple[torch.Tensor, torch.Tensor]],
              s: ViTSettings, seed: int) -> ViTRun:
    """Transfer a copy of ``backbone`` with a new head and ``config`` (``None``: head only) on every
    block's ``query``/``value``; seed index ``seed`` fixes the head, the adapter's init and the batches."""
    seeds = repeat_seeds(0, seed)
    model = copy.deepcopy(backbone)
    torch.manual_seed(seeds["head_init"])
    model.head = nn.Linear(model.head.in_features, CLASSES)
    adapter = None
    if config is None:
        for p in model.parameters():
            p.requires_grad_(False)
    else:
        adapter = tat.attach(model, config, list(TARGETS), seed=seeds["adapter_init"])
    head = list(model.head.parameters())
    for p in head:
        p.requires_grad_(True)
    groups: list[dict[str, Any]] = [{"params": head, "lr": s.head_lr}]
    if adapter is not None:
        groups.append({"params": adapter.trainable_parameters(), "lr": lr})
    adapter_params = 0 if adapter is None else int(adapter.num_params)
    head_params = sum(p.numel() for p in head)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable != adapter_params + head_params:  # pragma: no cover - a bug guard
        raise RuntimeError(f"{trainable} trainable parameters, expected {adapter_params} + {head_params}")
    x, y = cuts["train"]
    start = time.perf_counter()
    fit(model, groups, Split(x, y, x[:0], y[:0]), s.transfer_steps, s.batch_size, seeds["batches"])
    elapsed = time.perf_counter() - start
    return ViTRun(correct(model, *cuts["validation"]), correct(model, *cuts["test"]), elapsed, adapter_params,
                  head_params)
