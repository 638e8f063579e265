"""The study's second task: a class-conditional flow-matching model with Conv2d layers on 8×8 digits.

The paper adapts a diffusion model from SVHN to MNIST; this is the same experiment in miniature,
on data that ship with scikit-learn:

* :class:`FlowNet` predicts the velocity ``v(x_t, t, y)`` of a rectified-flow (flow-matching)
  path ``x_t = (1 − t) x_0 + t x_1`` from Gaussian noise ``x_0`` to an image ``x_1``; it is a
  stack of 3×3 ``Conv2d`` layers (``inp``, ``conv1`` … ``conv4``, ``outp``) with GroupNorm and SiLU,
  conditioned on ``t`` and on the class ``y`` through a learned per-block shift (the class
  embedding ``label`` is the task-specific part, like a classifier's head).
* It is **pretrained** on digits 0–4 (:func:`pretrain_flow`), then **adapted** to digits 5–9
  (:func:`adapt_flow`): a new class embedding is trained together with the adapter on the four
  inner convolutions :data:`FLOW_TARGETS` (4 weights of 32×32×3×3, adapted as 32×288 matrices,
  N = 36,864); everything else is frozen.
* The score is the **accuracy of a frozen digit classifier** (:class:`DigitCNN`, trained on the
  training images of all ten digits) on class-conditional samples: 40 samples per new class from a
  fixed noise batch, integrated with 16 Euler steps; a sample of class ``c`` counts when the
  classifier says ``c``.  Learning rates are chosen on the flow-matching loss of a validation split
  of the target training images (:func:`validation_loss`), never on the score.

Nothing here depends on the study's list of configurations.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import tensoradapt.torch as tat

from ..data import NUM_CLASSES, Split, shift
from ..train import schedule_factor

__all__ = [
    "FLOW_TARGETS",
    "DigitCNN",
    "FlowNet",
    "FlowRun",
    "FlowSettings",
    "adapt_flow",
    "flow_loss",
    "pretrain_flow",
    "sample",
    "sample_accuracy",
    "train_classifier",
    "validation_loss",
]

FLOW_TARGETS: tuple[str, ...] = ("conv1", "conv2", "conv3", "conv4")
"""The convolutions the adapters sit on."""


@dataclass(frozen=True)
class FlowSettings:
    """Sizes, steps and learning rates of the flow task (defaults: the full study)."""

    channels: int = 32
    pretrain_steps: int = 1500
    pretrain_lr: float = 2e-3
    transfer_steps: int = 300
    label_lr: float = 3e-2
    batch_size: int = 64
    classifier_steps: int = 400
    samples_per_class: int = 40
    euler_steps: int = 16

    @classmethod
    def quick(cls) -> FlowSettings:
        return cls(channels=16, pretrain_steps=300, transfer_steps=60, classifier_steps=150,
                   samples_per_class=16, euler_steps=8)


def _time_features(t: torch.Tensor, dim: int = 16) -> torch.Tensor:
    freqs = torch.exp(torch.linspace(0.0, math.log(100.0), dim // 2))
    angles = t[:, None] * freqs[None, :] * math.pi
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class FlowNet(nn.Module):
    """A convolutional velocity field on ``side × side`` images, conditioned on time and class."""

    def __init__(self, num_classes: int = NUM_CLASSES, channels: int = 32) -> None:
        super().__init__()
        c = channels
        self.inp = nn.Conv2d(1, c, 3, padding=1)
        self.convs = nn.ModuleDict({name: nn.Conv2d(c, c, 3, padding=1) for name in FLOW_TARGETS})
        self.norms = nn.ModuleList([nn.GroupNorm(4, c) for _ in FLOW_TARGETS])
        self.outp = nn.Conv2d(c, 1, 3, padding=1)
        self.time = nn.Sequential(nn.Linear(16, 2 * c), nn.SiLU(), nn.Linear(2 * c, len(FLOW_TARGETS) * c))
        self.label = nn.Embedding(num_classes, len(FLOW_TARGETS) * c)
        self.channels = c

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Velocity ``(B, side, side)`` of images ``x (B, side, side)`` at times ``t (B,)``, classes ``y``."""
        cond = (self.time(_time_features(t)) + self.label(y)).chunk(len(FLOW_TARGETS), dim=1)
        h = self.inp(x[:, None])
        for shift_, norm, conv in zip(cond, self.norms, self.convs.values(), strict=True):
            h = h + conv(F.silu(norm(h) + shift_[:, :, None, None]))
        return self.outp(F.silu(h))[:, 0]


class DigitCNN(nn.Module):
    """The frozen judge: a small CNN classifying all ten digits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.2), nn.Linear(64 * 16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x[:, None])


def train_classifier(x: torch.Tensor, y: torch.Tensor, settings: FlowSettings, seed: int) -> DigitCNN:
    """:class:`DigitCNN` trained on ``x`` (``(B, 8, 8)``), labels ``0..9``, with shift augmentation; frozen."""
    torch.manual_seed(seed)
    model = DigitCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 7)
    model.train()
    for _ in range(settings.classifier_steps):
        index = torch.randint(0, x.shape[0], (64,), generator=generator)
        loss = F.cross_entropy(model(shift(x[index], generator)), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def flow_loss(model: FlowNet, x1: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The flow-matching loss ``‖v(x_t, t, y) − (x_1 − x_0)‖²`` with ``x_0`` Gaussian, ``t`` uniform."""
    x0 = torch.randn(x1.shape, generator=generator)
    t = torch.rand(x1.shape[0], generator=generator)
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1
    return F.mse_loss(model(xt, t, y), x1 - x0)


def _fit(model: FlowNet, groups: list[dict[str, Any]], x: torch.Tensor, y: torch.Tensor, steps: int,
         batch_size: int, seed: int) -> None:
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(steps))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, x.shape[0], (min(batch_size, x.shape[0]),), generator=generator)
        loss = flow_loss(model, x[index], y[index], generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


@torch.no_grad()
def validation_loss(model: FlowNet, x: torch.Tensor, y: torch.Tensor, seed: int = 12345, draws: int = 4) -> float:
    """Mean flow-matching loss on ``(x, y)`` over ``draws`` fixed noise/time draws (the LR criterion)."""
    generator = torch.Generator().manual_seed(seed)
    return float(sum(flow_loss(model, x, y, generator) for _ in range(draws)) / draws)


@torch.no_grad()
def sample(model: FlowNet, classes: Sequence[int], per_class: int, steps: int, seed: int) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """``per_class`` samples of each class (Euler integration of the velocity from fixed noise)."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.tensor([c for c in classes for _ in range(per_class)])
    x = torch.randn((y.shape[0], 8, 8), generator=generator)
    for i in range(steps):
        t = torch.full((y.shape[0],), i / steps)
        x = x + model(x, t, y) / steps
    return x.clamp(-1, 1), y


def sample_accuracy(model: FlowNet, judge: DigitCNN, settings: FlowSettings, offset: int, seed: int) -> float:
    """Fraction of class-conditional samples the judge assigns to their class (labels ``+ offset``)."""
    x, y = sample(model, range(NUM_CLASSES), settings.samples_per_class, settings.euler_steps, seed)
    return float((judge(x).argmax(dim=1) == y + offset).float().mean())


def pretrain_flow(source: Split, settings: FlowSettings, seed: int) -> FlowNet:
    """A :class:`FlowNet` trained from scratch on the source task's training images."""
    torch.manual_seed(seed)
    model = FlowNet(NUM_CLASSES, settings.channels)
    _fit(model, [{"params": list(model.parameters()), "lr": settings.pretrain_lr}], source.x_train, source.y_train,
         settings.pretrain_steps, settings.batch_size, seed)
    return model


@dataclass
class FlowRun:
    """One adaptation: the score (sample accuracy, or validation loss in LR selection), time, counts."""

    score: float
    train_time_s: float
    adapter_params: int
    head_params: int


def adapt_flow(backbone: FlowNet, config: Any, lr: float, x: torch.Tensor, y: torch.Tensor,
               settings: FlowSettings, seeds: dict[str, int], *, judge: DigitCNN | None = None,
               validation: tuple[torch.Tensor, torch.Tensor] | None = None) -> FlowRun:
    """Adapt a copy of ``backbone`` to ``(x, y)`` with a new class embedding and ``config`` (``None``:
    the embedding only) on :data:`FLOW_TARGETS`; scored by ``judge`` on samples, or by the
    flow-matching loss on ``validation``."""
    model = copy.deepcopy(backbone)
    torch.manual_seed(seeds["head_init"])
    model.label = nn.Embedding(NUM_CLASSES, model.label.embedding_dim)
    if config is None:
        for p in model.parameters():
            p.requires_grad_(False)
        adapter = None
    else:
        adapter = tat.attach(model, config, list(FLOW_TARGETS), seed=seeds["adapter_init"])
    head = list(model.label.parameters())
    for p in head:
        p.requires_grad_(True)
    groups: list[dict[str, Any]] = [{"params": head, "lr": settings.label_lr}]
    if adapter is not None:
        groups.append({"params": adapter.trainable_parameters(), "lr": lr})
    adapter_params = 0 if adapter is None else int(adapter.num_params)
    head_params = sum(p.numel() for p in head)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable != adapter_params + head_params:  # pragma: no cover - a bug guard
        raise RuntimeError(f"{trainable} trainable parameters, expected {adapter_params} + {head_params}")
    start = time.perf_counter()
    _fit(model, groups, x, y, settings.transfer_steps, settings.batch_size, seeds["batches"])
    elapsed = time.perf_counter() - start
    if validation is not None:
        score = validation_loss(model, *validation)
    elif judge is not None:
        score = sample_accuracy(model, judge, settings, NUM_CLASSES, seeds["batches"] + 17)
    else:
        raise ValueError("give judge or validation")
    return FlowRun(score, elapsed, adapter_params, head_params)
