"""Training: the settings, the minibatch loop, pretraining, transfer with one method, and seeds.

Reusable outside the demo (``tensoradapt study`` builds on it): nothing here depends on the demo's
list of methods; :func:`transfer` takes any object with ``name``, ``config`` (a
:class:`tensoradapt.SuperLoRAConfig` or ``None`` for head only) and ``lr``, such as a
:class:`~tensoradapt.demo.catalog.Method`, and the target module names as an argument.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

import tensoradapt.torch as tat

from .data import NUM_CLASSES, Split, shift
from .model import TARGETS, TinyViT

if TYPE_CHECKING:
    from .catalog import Method

__all__ = [
    "DemoSettings",
    "TransferRun",
    "accuracy",
    "build_model",
    "fit",
    "pretrain",
    "repeat_seeds",
    "schedule_factor",
    "transfer",
]

Progress = Callable[[int], None]
"""Called with the step index after every optimiser step."""


@dataclass(frozen=True)
class DemoSettings:
    """Sizes, step counts and learning rates of one run (defaults: the full run)."""

    width: int = 64
    depth: int = 3
    heads: int = 4
    patch: int = 4
    mlp_ratio: int = 2
    batch_size: int = 64
    pretrain_steps: int = 600
    pretrain_lr: float = 3e-3
    transfer_steps: int = 400
    repeats: int = 3
    head_lr: float = 5e-2
    test_fraction: float = 0.3
    geometry_k: int = 5

    @classmethod
    def quick(cls) -> DemoSettings:
        """Fewer steps and one repeat for ``--quick``."""
        return cls(pretrain_steps=300, transfer_steps=120, repeats=1)


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def schedule_factor(steps: int) -> Callable[[int], float]:
    """The learning-rate factor of step ``s``: linear warm-up over 10% of ``steps``, then cosine to 0."""
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def fit(model: nn.Module, groups: list[dict[str, Any]], data: Split, steps: int, batch_size: int,
        seed: int, progress: Progress | None = None) -> None:
    """AdamW on ``groups`` for ``steps`` minibatches (with shift augmentation), cosine schedule
    after a 10% warm-up (:func:`schedule_factor`); the batch order depends only on ``seed``."""
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(steps))
    generator = torch.Generator().manual_seed(seed)
    n = data.x_train.shape[0]
    model.train()
    for step in range(steps):
        index = torch.randint(0, n, (min(batch_size, n),), generator=generator)
        loss = F.cross_entropy(model(shift(data.x_train[index], generator)), data.y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step)
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` whose arg-max logit is ``y`` (in eval mode)."""
    model.eval()
    return int((model(x).argmax(dim=1) == y).sum()) / int(y.shape[0])


# ---------------------------------------------------------------------------------------------
# pretraining
# ---------------------------------------------------------------------------------------------
def build_model(settings: DemoSettings, num_classes: int = NUM_CLASSES) -> TinyViT:
    """A freshly initialised :class:`TinyViT` of the sizes in ``settings`` (uses torch's global RNG)."""
    return TinyViT(num_classes, settings.width, settings.depth, settings.heads, settings.patch, settings.mlp_ratio)


def pretrain(source: Split, settings: DemoSettings, seed: int) -> tuple[TinyViT, float]:
    """Train a :class:`TinyViT` from scratch on the source task; returns it and its test accuracy."""
    torch.manual_seed(seed)
    model = build_model(settings)
    fit(model, [{"params": list(model.parameters()), "lr": settings.pretrain_lr}], source,
        settings.pretrain_steps, settings.batch_size, seed)
    return model, accuracy(model, source.x_test, source.y_test)


# ---------------------------------------------------------------------------------------------
# transfer
# ---------------------------------------------------------------------------------------------
def repeat_seeds(seed: int, repeat: int) -> dict[str, int]:
    """The seeds of transfer repeat ``repeat`` (0-based) of a run with ``seed``.

    Repeat 0 of every method shares them, so every method starts from the same new head and sees
    the same batches; other repeats use other streams.
    """
    base = seed + 1000 * (repeat + 1)
    return {"adapter_init": base, "head_init": base + 1, "batches": base + 2}


@dataclass
class TransferRun:
    """One transfer of one method (one repeat)."""

    accuracy: float
    train_time_s: float
    adapter_params: int
    head_params: int
    deltas: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


def _with_new_head(backbone: TinyViT, seed: int, num_classes: int = NUM_CLASSES) -> TinyViT:
    """A deep copy of ``backbone`` with a new linear head initialised under ``torch.manual_seed(seed)``."""
    model = copy.deepcopy(backbone)
    torch.manual_seed(seed)
    model.head = nn.Linear(model.head.in_features, num_classes)
    return model


def _attach(model: nn.Module, method: Method, targets: Sequence[str], seed: int) -> Any:
    """The method's adapter on ``targets`` (base frozen); for head only, no adapter and all frozen."""
    if method.config is None:
        for p in model.parameters():
            p.requires_grad_(False)
        return None
    return tat.attach(model, method.config, list(targets), seed=seed)


def _param_groups(model: TinyViT, adapter: Any, method: Method, head_lr: float) -> list[dict[str, Any]]:
    """Optimiser groups: the (unfrozen) head at ``head_lr``, then the adapter's tensors at ``method.lr``."""
    head = list(model.head.parameters())
    for p in head:
        p.requires_grad_(True)
    groups: list[dict[str, Any]] = [{"params": head, "lr": head_lr}]
    if adapter is not None:
        groups.append({"params": adapter.trainable_parameters(), "lr": method.lr})
    return groups


def _check_trainable(model: nn.Module, name: str, adapter_params: int, head_params: int) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable != adapter_params + head_params:  # pragma: no cover - a bug guard
        raise RuntimeError(f"{name}: {trainable} trainable parameters, expected {adapter_params} + {head_params}")


def transfer(backbone: TinyViT, method: Method, target: Split, settings: DemoSettings, seed: int,
             repeat: int = 0, progress: Progress | None = None, *, targets: Sequence[str] = TARGETS) -> TransferRun:
    """Fine-tune a copy of ``backbone`` on ``target`` with ``method``; returns accuracy, time and ``ΔW``.

    A new 5-class head (seeded by :func:`repeat_seeds`) is trained together with the method's
    tensors on the modules ``targets`` (name suffixes); the rest of the backbone is frozen.
    ``backbone`` is not modified.
    """
    seeds = repeat_seeds(seed, repeat)
    model = _with_new_head(backbone, seeds["head_init"])
    adapter = _attach(model, method, targets, seeds["adapter_init"])
    groups = _param_groups(model, adapter, method, settings.head_lr)
    adapter_params = 0 if adapter is None else adapter.num_params
    head_params = sum(p.numel() for p in groups[0]["params"])
    _check_trainable(model, method.name, adapter_params, head_params)
    start = time.perf_counter()
    fit(model, groups, target, settings.transfer_steps, settings.batch_size, seeds["batches"], progress)
    elapsed = time.perf_counter() - start
    test_accuracy = accuracy(model, target.x_test, target.y_test)
    deltas = {} if adapter is None else {name: d.detach().clone() for name, d in adapter.deltas().items()}
    return TransferRun(test_accuracy, elapsed, adapter_params, head_params, deltas)
