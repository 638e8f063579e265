r"""``tensoradapt demo``: a small, real SuperLoRA transfer-learning study on scikit-learn's digits.

What it does (nothing is downloaded; ``sklearn.datasets.load_digits`` ships with scikit-learn):

1. **Data.**  The 1,797 8×8 digit images, split by class into a *source* task (digits 0–4) and a
   *target* task (digits 5–9, relabelled 0–4); each task gets a stratified 70/30 train/test split
   fixed by the seed.
2. **Pretraining.**  A tiny ViT (:class:`TinyViT`: 4×4 patches → 4 tokens plus a CLS token,
   learned positions, pre-LN blocks with separate ``query``/``key``/``value``/``out`` linears and a
   GELU MLP) is trained from scratch on the source task.
3. **Transfer.**  For every method, the pretrained backbone is copied, a new 5-class head is put
   on it and everything else is frozen except the method's trainable tensors on the ``query`` and
   ``value`` weights of every block; AdamW with a cosine schedule, a fixed number of steps and a
   learning rate per method (chosen on a validation split of the target training images, see
   :class:`Method`).  Each method runs ``repeats`` times (3; ``--quick``: 1) with different seeds
   for the head, the adapter initialisation and the batches — the same seeds for every method:

   * ``head-only`` — no adapter (linear probe; the reference for "no adaptation");
   * ``dense`` — dense fine-tuning of ``W_q``, ``W_v`` (``presets.dense()``: a free ``ΔW`` per weight);
   * ``lora-r{1,2,4,8}`` — LoRA (``presets.lora(r)``);
   * ``superlora-2d`` — SuperLoRA 2-D, grouped with reshape: ``ΔW_all`` cut into ``G = 2`` groups,
     each reshaped to a square-ish matrix and modelled by a rank-``r`` product;
   * ``lorta-m3`` / ``lorta-m4`` — SuperLoRA LoRTA: one group, Tucker core of the 3-/4-way fold;
   * ``lonkr`` — LoNKr: Kronecker product of ``K = 2`` identity-core LoRA splits of the 2-D fold;
   * ``fastfood-0.1`` / ``fastfood-0.01`` — SuperLoRA 2-D (one group) generating only
     ``ρ·N`` entries, mapped to all ``N`` by a fixed Fastfood projection.

   The head (``width·5 + 5`` parameters) is trained in every method and counted separately.
4. **Report.**  Test accuracy on the target task (mean ± sd over the repeats), trainable adapter
   parameters, training time per run, and the geometry of each adapter's ``ΔW`` against the dense
   fine-tune's ``ΔW`` of the same repeat (:func:`tensoradapt.analysis.compare`: ``dE``, ``dL``,
   ``dR`` with ``k = 5``; means over the weights and repeats, overall and per kind ``query``/``value``).

Outputs, in the folder the command prints: ``results.json``, ``results.md`` (the table) and
``pareto.png`` (accuracy against trainable parameters, log-x, with the Pareto front).

Run ``python -m tensoradapt.torch.demo --help`` (or ``tensoradapt demo --help``).  The default run
takes about three minutes on two CPU cores, ``--quick`` well under one minute.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import tensoradapt as ta
from tensoradapt import SuperLoRAConfig, presets
from tensoradapt.analysis import aggregate_by_kind, compare
from tensoradapt.cli import OneLineParser, non_negative_int, positive_int
from tensoradapt.torch.adapter import attach_superlora

__all__ = [
    "DEFAULT_METHODS",
    "QUICK_METHODS",
    "DemoResult",
    "DemoSettings",
    "Method",
    "MethodResult",
    "TinyViT",
    "TransferRun",
    "format_kind_table",
    "format_table",
    "geometry",
    "load_tasks",
    "main",
    "methods",
    "plot_pareto",
    "pretrain",
    "repeat_seeds",
    "run",
    "transfer",
    "write_results",
]

TARGETS = ("query", "value")
"""Module-name suffixes the adapters are attached to (every block's query and value)."""


# ---------------------------------------------------------------------------------------------
# settings and methods
# ---------------------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class Method:
    """One transfer method: its adapter configuration (``None``: head only) and learning rate.

    The learning rates of :func:`methods` were picked once per method from
    ``{3e-3, 1e-2, 3e-2, 1e-1, 3e-1}`` on a validation split of the target *training* images
    (seed 0, 400 steps, head learning rate 5e-2), never on the test images.
    """

    name: str
    family: str
    description: str
    config: SuperLoRAConfig | None
    lr: float


def _superlora_2d(rank: int, groups: int) -> SuperLoRAConfig:
    """SuperLoRA 2-D grouped with reshape: ``G`` chunks of ``ΔW_all``, each a square-ish matrix."""
    return SuperLoRAConfig(order=2, rank=rank, core="identity", grouping=groups, fold="cubic")


def methods() -> dict[str, Method]:
    """Every method the demo knows, by name, in table order."""
    out: list[Method] = [
        Method("head-only", "none", "new head only, backbone frozen", None, 0.0),
        Method("dense", "dense", "dense ΔW of W_q, W_v", presets.dense(), 1e-2),
    ]
    for r in (1, 2, 4, 8):
        out.append(Method(f"lora-r{r}", "LoRA", f"LoRA r={r}", presets.lora(r), 3e-2 if r == 1 else 1e-2))
    out += [
        Method("superlora-2d", "SuperLoRA 2D", "2-D, G=2 groups reshaped square, r=4", _superlora_2d(4, 2), 1e-2),
        Method("lorta-m3", "LoRTA", "Tucker M=3, G=1, r=4", presets.lorta(3, 4), 1e-2),
        Method("lorta-m4", "LoRTA", "Tucker M=4, G=1, r=4", presets.lorta(4, 4), 1e-2),
        Method("lonkr", "LoNKr", "K=2 splits, r=4, G=1", presets.lonkr(2, 4), 1e-1),
        Method("fastfood-0.1", "Fastfood", "2-D r=4, G=1, Fastfood ρ=0.1",
               presets.with_projection(_superlora_2d(4, 1), "fastfood", 0.1), 1e-1),
        Method("fastfood-0.01", "Fastfood", "2-D r=4, G=1, Fastfood ρ=0.01",
               presets.with_projection(_superlora_2d(4, 1), "fastfood", 0.01), 1e-1),
    ]
    return {m.name: m for m in out}


DEFAULT_METHODS: tuple[str, ...] = tuple(methods())
QUICK_METHODS: tuple[str, ...] = tuple(m for m in DEFAULT_METHODS if m not in ("lora-r2", "lora-r8"))


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with separate ``query``, ``key``, ``value`` and ``out`` linears."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """A pre-LN transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A ViT for ``side × side`` single-channel images.

    Non-overlapping ``patch × patch`` patches are embedded by a linear map, a CLS token is
    prepended, learned positions are added, ``depth`` pre-LN blocks follow, and the final
    LayerNorm of the CLS token feeds the linear ``head``.

    Parameters
    ----------
    num_classes, width, depth, heads, patch, mlp_ratio : int
    side : int
        Image side (8 for the digits); must be a multiple of ``patch``.
    """

    def __init__(self, num_classes: int = 5, width: int = 64, depth: int = 3, heads: int = 4, patch: int = 4,
                 mlp_ratio: int = 2, side: int = 8) -> None:
        super().__init__()
        if side % patch:
            raise ValueError(f"the image side ({side}) must be a multiple of patch ({patch})")
        self.side, self.patch = side, patch
        tokens = (side // patch) ** 2
        self.embed = nn.Linear(patch * patch, width)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens + 1, width))
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, side, side)`` → ``(B, tokens, patch²)`` in row-major patch order."""
        b, p, n = images.shape[0], self.patch, self.side // self.patch
        return images.reshape(b, n, p, n, p).permute(0, 1, 3, 2, 4).reshape(b, n * n, p * p)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The normalised CLS token, ``(B, width)``."""
        x = self.embed(self.patches(images))
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of ``(B, side, side)`` images."""
        return self.head(self.features(images))


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    """Train and test tensors of one task (images ``(B, 8, 8)`` in ``[-1, 1]``, labels ``0..4``)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_tasks(seed: int = 0, test_fraction: float = 0.3) -> tuple[Split, Split]:
    """The source (digits 0–4) and target (digits 5–9, relabelled 0–4) tasks.

    Each is a stratified train/test split of ``sklearn.datasets.load_digits`` fixed by ``seed``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    images = (images.astype(np.float32) / 16.0) * 2.0 - 1.0

    def task(mask: np.ndarray, offset: int) -> Split:
        x_tr, x_te, y_tr, y_te = train_test_split(images[mask], labels[mask] - offset, test_size=test_fraction,
                                                  random_state=seed, stratify=labels[mask])

        def as_images(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).reshape(-1, 8, 8)

        return Split(as_images(x_tr), torch.from_numpy(y_tr).long(), as_images(x_te), torch.from_numpy(y_te).long())

    return task(labels < 5, 0), task(labels >= 5, 5)


def _shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translation of each image by up to one pixel (background ``-1`` fills the border)."""
    b, side = images.shape[0], images.shape[-1]
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    offsets = torch.randint(0, 3, (b, 2), generator=generator)
    rows = (offsets[:, 0, None] + torch.arange(side))[:, :, None]  # (b, side, 1)
    cols = (offsets[:, 1, None] + torch.arange(side))[:, None, :]  # (b, 1, side)
    return padded[torch.arange(b)[:, None, None], rows, cols]


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def _train(model: nn.Module, groups: list[dict[str, Any]], data: Split, steps: int, batch_size: int,
           seed: int, progress: Callable[[int], None] | None = None) -> None:
    """AdamW on ``groups`` for ``steps`` minibatches (with shift augmentation), cosine schedule
    after a 10% warm-up; the batch order depends only on ``seed``."""
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(seed)
    n = data.x_train.shape[0]
    model.train()
    for step in range(steps):
        index = torch.randint(0, n, (min(batch_size, n),), generator=generator)
        images = _shift(data.x_train[index], generator)
        loss = F.cross_entropy(model(images), data.y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step)
    model.eval()


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return int((model(x).argmax(dim=1) == y).sum()) / int(y.shape[0])


def pretrain(source: Split, settings: DemoSettings, seed: int) -> tuple[TinyViT, float]:
    """Train a :class:`TinyViT` from scratch on the source task; returns it and its test accuracy."""
    torch.manual_seed(seed)
    model = TinyViT(5, settings.width, settings.depth, settings.heads, settings.patch, settings.mlp_ratio)
    _train(model, [{"params": list(model.parameters()), "lr": settings.pretrain_lr}], source,
           settings.pretrain_steps, settings.batch_size, seed)
    return model, _accuracy(model, source.x_test, source.y_test)


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


def transfer(backbone: TinyViT, method: Method, target: Split, settings: DemoSettings, seed: int,
             repeat: int = 0, progress: Callable[[int], None] | None = None) -> TransferRun:
    """Fine-tune a copy of ``backbone`` on ``target`` with ``method``; returns accuracy, time and ``ΔW``.

    A new 5-class head (seeded by :func:`repeat_seeds`) is trained together with the method's
    tensors; the rest of the backbone is frozen.  ``backbone`` is not modified.
    """
    seeds = repeat_seeds(seed, repeat)
    model = copy.deepcopy(backbone)
    torch.manual_seed(seeds["head_init"])
    model.head = nn.Linear(model.head.in_features, 5)
    adapter = None
    if method.config is not None:
        adapter = attach_superlora(model, method.config, list(TARGETS), seed=seeds["adapter_init"])
        adapter_params = adapter.num_params
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        adapter_params = 0
    head = list(model.head.parameters())
    for p in head:
        p.requires_grad_(True)
    groups: list[dict[str, Any]] = [{"params": head, "lr": settings.head_lr}]
    if adapter is not None:
        groups.append({"params": adapter.trainable_parameters(), "lr": method.lr})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head_params = sum(p.numel() for p in head)
    if trainable != adapter_params + head_params:  # pragma: no cover - a bug guard
        raise RuntimeError(f"{method.name}: {trainable} trainable parameters, expected "
                           f"{adapter_params} + {head_params}")
    start = time.perf_counter()
    _train(model, groups, target, settings.transfer_steps, settings.batch_size, seeds["batches"], progress)
    elapsed = time.perf_counter() - start
    accuracy = _accuracy(model, target.x_test, target.y_test)
    deltas = {name: d.detach().clone() for name, d in adapter.deltas().items()} if adapter is not None else {}
    return TransferRun(accuracy, elapsed, adapter_params, head_params, deltas)


def _target_names(model: TinyViT) -> list[str]:
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS]


def _nan_to_none(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def _mean(values: Sequence[float]) -> float | None:
    finite = [float(v) for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else None


def geometry(runs: Sequence[TransferRun], references: Sequence[TransferRun], names: Sequence[str],
             k: int = 5) -> dict[str, Any]:
    """dE/dL/dR of each run's ``ΔW`` against the reference run's of the same repeat (dense
    fine-tuning), per weight, then averaged over weights and repeats (overall and per kind).

    A method without ``ΔW`` (head only) has ``ΔW = 0``: ``dE = 1`` and no dL/dR.
    """
    records: list[dict[str, Any]] = []
    by_kind: dict[str, dict[str, list[float]]] = {}
    for repeat, (run_, ref) in enumerate(zip(runs, references, strict=True)):
        # float32 as trained: in float64 the float32 rounding noise would count as rank, and
        # k_eff = min(k, rank P, rank Q) would always be k
        Q = [ref.deltas[n].float().numpy() for n in names]
        P = [run_.deltas[n].float().numpy() if n in run_.deltas else np.zeros_like(q)
             for n, q in zip(names, Q, strict=True)]
        found = compare(P, Q, names=list(names), k=k)
        for kind, summary in aggregate_by_kind(found).items():
            entry = by_kind.setdefault(kind, {"dE": [], "dL": [], "dR": []})
            for key in entry:
                entry[key].append(getattr(summary, key))
        records += [{"repeat": repeat, **{key: _nan_to_none(v) for key, v in r.as_dict().items()}} for r in found]
    return {
        "reference": "dense",
        "k": k,
        "mean": {key: _mean([r[key] for r in records]) for key in ("dE", "dL", "dR")},
        "by_kind": {kind: {key: _mean(values) for key, values in entry.items()} for kind, entry in by_kind.items()},
        "per_weight": records,
    }


@dataclass
class MethodResult:
    """One method over all repeats: accuracy mean/std, time, parameters and ΔW geometry."""

    name: str
    family: str
    description: str
    config: dict[str, Any] | None
    lr: float
    steps: int
    adapter_params: int
    head_params: int
    accuracies: list[float]
    train_times_s: list[float]
    geometry: dict[str, Any] | None = None
    runs: list[TransferRun] = field(default_factory=list, repr=False)

    @property
    def accuracy(self) -> float:
        """Mean test accuracy over the repeats."""
        return float(np.mean(self.accuracies))

    @property
    def accuracy_std(self) -> float:
        """Standard deviation of the test accuracy over the repeats (0 for one repeat)."""
        return float(np.std(self.accuracies, ddof=1)) if len(self.accuracies) > 1 else 0.0

    @property
    def train_time_s(self) -> float:
        """Mean training time of one repeat (seconds)."""
        return float(np.mean(self.train_times_s))

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable (without the ``ΔW`` tensors)."""
        out = asdict(self)
        out.pop("runs")
        out.update(accuracy=self.accuracy, accuracy_std=self.accuracy_std, train_time_s=self.train_time_s)
        return out


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
@dataclass
class DemoResult:
    """Everything a run produced (``results.json`` is :meth:`as_dict`)."""

    settings: DemoSettings
    seed: int
    quick: bool
    source_accuracy: float
    pretrain_time_s: float
    results: list[MethodResult]
    total_time_s: float = 0.0
    machine: dict[str, Any] = field(default_factory=dict)
    date: str = ""
    out: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        """The contents of ``results.json``."""
        return {
            "tool": "tensoradapt demo",
            "library_version": ta.__version__,
            "date": self.date,
            "machine": self.machine,
            "seed": self.seed,
            "seeds": {"data_split": self.seed, "pretrain": self.seed,
                      "transfer_repeats": [repeat_seeds(self.seed, r) for r in range(self.settings.repeats)]},
            "quick": self.quick,
            "settings": asdict(self.settings),
            "source_task": "digits 0-4", "target_task": "digits 5-9 (relabelled 0-4)",
            "targets": "query and value of every block",
            "trainable_params_note": "adapter_params excludes the new 5-class head (head_params), "
                                     "which is trained in every method",
            "pretrain": {"test_accuracy": self.source_accuracy, "time_s": self.pretrain_time_s},
            "total_time_s": self.total_time_s,
            "methods": [r.as_dict() for r in self.results],
        }


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


def _progress_bar(total: int, label: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return None
    return tqdm(total=total, desc=label, leave=False, unit="step", disable=not sys.stderr.isatty())


def run(selected: Sequence[str] | None = None, *, quick: bool = False, seed: int = 0,
        settings: DemoSettings | None = None, progress: bool = True, log: Callable[[str], None] | None = print,
        threads: int | None = None) -> DemoResult:
    """Pretrain on digits 0–4, transfer to 5–9 with each method; returns the results (writes nothing).

    Parameters
    ----------
    selected : sequence of str, optional
        Method names (see :func:`methods`), reported in this order; default
        :data:`DEFAULT_METHODS` (:data:`QUICK_METHODS` with ``quick``).  The geometry needs
        ``dense`` (the reference); without it, dE/dL/dR are left out.
    quick : bool
        Use :meth:`DemoSettings.quick` (unless ``settings`` is given) and the quick method list.
    seed : int
        Seeds the split, pretraining, and (with :func:`repeat_seeds`) each repeat's new head,
        adapter initialisation and batches.
    settings : DemoSettings, optional
    progress : bool
        A tqdm bar per method (when stderr is a terminal).
    log : callable, optional
        Receives one line per stage and method (default ``print``; ``None``: silent).
    threads : int, optional
        ``torch.set_num_threads`` during the run (restored after); default ``min(2, os.cpu_count())``.
    """
    known = methods()
    if selected is None:
        selected = QUICK_METHODS if quick else DEFAULT_METHODS
    selected = list(dict.fromkeys(selected))
    unknown = [m for m in selected if m not in known]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(known)}")
    if not selected:
        raise ValueError("no methods selected")
    if settings is None:
        settings = DemoSettings.quick() if quick else DemoSettings()
    if settings.repeats < 1:
        raise ValueError(f"settings.repeats must be >= 1, got {settings.repeats}")
    emit = log if log is not None else (lambda _line: None)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads if threads is not None else min(2, os.cpu_count() or 1))
    try:
        return _run(known, selected, quick, seed, settings, progress, emit)
    finally:
        torch.set_num_threads(previous_threads)


def _run(known: dict[str, Method], selected: list[str], quick: bool, seed: int, settings: DemoSettings,
         progress: bool, emit: Callable[[str], None]) -> DemoResult:
    start = time.perf_counter()
    date = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    source, target = load_tasks(seed, settings.test_fraction)
    emit(f"pretraining a TinyViT (width {settings.width}, {settings.depth} blocks, {settings.patch}x{settings.patch} "
         f"patches) on digits 0-4: {source.x_train.shape[0]} train / {source.x_test.shape[0]} test images, "
         f"{settings.pretrain_steps} steps ...")
    t0 = time.perf_counter()
    backbone, source_accuracy = pretrain(source, settings, seed)
    pretrain_time = time.perf_counter() - t0
    emit(f"  source test accuracy {100 * source_accuracy:.1f}% in {pretrain_time:.1f} s")
    repeats = settings.repeats
    emit(f"transfer to digits 5-9 ({target.x_train.shape[0]} train / {target.x_test.shape[0]} test images): "
         f"{settings.transfer_steps} steps x {repeats} repeat{'s' if repeats > 1 else ''} per method, "
         f"adapters on {'/'.join(TARGETS)} of every block")
    results: dict[str, MethodResult] = {}
    for i, name in enumerate(selected, start=1):
        method = known[name]
        runs = []
        for repeat in range(repeats):
            label = name if repeats == 1 else f"{name} ({repeat + 1}/{repeats})"
            bar = _progress_bar(settings.transfer_steps, label, progress)
            runs.append(transfer(backbone, method, target, settings, seed, repeat,
                                 None if bar is None else (lambda _step, bar=bar: bar.update(1))))
            if bar is not None:
                bar.close()
        result = MethodResult(method.name, method.family, method.description,
                              None if method.config is None else method.config.to_dict(), method.lr,
                              settings.transfer_steps, runs[0].adapter_params, runs[0].head_params,
                              [r.accuracy for r in runs], [r.train_time_s for r in runs], runs=runs)
        results[name] = result
        spread = f" ± {100 * result.accuracy_std:4.1f}" if repeats > 1 else ""
        emit(f"  [{i:>2}/{len(selected)}] {name:<14} {result.adapter_params:>6,} params  "
             f"acc {100 * result.accuracy:5.1f}%{spread}  {result.train_time_s:5.1f} s")
    if "dense" in results:
        names = _target_names(backbone)
        reference = results["dense"].runs
        for result in results.values():
            result.geometry = geometry(result.runs, reference, names, settings.geometry_k)
    return DemoResult(settings, seed, quick, source_accuracy, pretrain_time, list(results.values()),
                      time.perf_counter() - start, _machine(), date)


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_table(result: DemoResult) -> str:
    """The results as a Markdown table (``dE/dL/dR``: means over the q/v weights vs dense)."""
    repeats = result.settings.repeats
    accuracy = "accuracy (%)" if repeats == 1 else f"accuracy (%, mean ± sd of {repeats})"
    lines = [
        f"| method | config | trainable params | {accuracy} | time (s) | dE | dL | dR |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result.results:
        g = (r.geometry or {}).get("mean", {})
        acc = f"{100 * r.accuracy:.1f}" + (f" ± {100 * r.accuracy_std:.1f}" if repeats > 1 else "")
        lines.append(f"| {r.name} | {r.description} | {r.adapter_params:,} | {acc} | "
                     f"{r.train_time_s:.1f} | {_fmt(g.get('dE'))} | {_fmt(g.get('dL'))} | {_fmt(g.get('dR'))} |")
    return "\n".join(lines)


def format_kind_table(result: DemoResult) -> str:
    """dE/dL/dR per weight kind (``query``, ``value``) as a Markdown table (needs ``dense``)."""
    kinds = list(dict.fromkeys(kind for r in result.results for kind in ((r.geometry or {}).get("by_kind") or {})))
    if not kinds:
        return ""
    header = " | ".join(f"{key} {kind}" for kind in kinds for key in ("dE", "dL", "dR"))
    lines = [f"| method | {header} |", "|---|" + "---:|" * (3 * len(kinds))]
    for r in result.results:
        by_kind = (r.geometry or {}).get("by_kind") or {}
        cells = " | ".join(_fmt((by_kind.get(kind) or {}).get(key)) for kind in kinds for key in ("dE", "dL", "dR"))
        lines.append(f"| {r.name} | {cells} |")
    return "\n".join(lines)


def _report(result: DemoResult) -> str:
    """The contents of ``results.md``."""
    head = result.results[0].head_params if result.results else 0
    m, settings = result.machine, result.settings
    repeats = settings.repeats
    lines = [
        f"# tensoradapt demo: digits 0-4 → 5-9 transfer{' (--quick)' if result.quick else ''}",
        "",
        f"- date: {result.date}; machine: {m.get('platform')}, {m.get('processor')}, {m.get('cpu_count')} CPUs, "
        f"torch {m.get('torch')} with {m.get('torch_threads')} threads",
        f"- seed {result.seed}; TinyViT width {settings.width}, {settings.depth} blocks, {settings.patch}x"
        f"{settings.patch} patches; pretraining on digits 0-4: {settings.pretrain_steps} steps, test accuracy "
        f"{100 * result.source_accuracy:.1f}% ({result.pretrain_time_s:.1f} s)",
        f"- transfer to digits 5-9: {settings.transfer_steps} steps (batch {settings.batch_size}) per run, "
        f"{repeats} run{'s' if repeats > 1 else ''} per method (seeds of head, adapter initialisation and "
        f"batches vary); time = training seconds per run; total {result.total_time_s:.1f} s",
        f"- trainable params: the adapter's, on query and value of every block; the new 5-class head ({head} "
        "params) is trained in every method and not included",
        f"- dE, dL, dR: the method's ΔW against the dense fine-tune's ΔW of the same run (k = {settings.geometry_k}), "
        "mean over the weights and runs; dE = 1 and no dL/dR when ΔW = 0 (head only)",
        "",
        format_table(result),
        "",
    ]
    kinds = format_kind_table(result)
    if kinds:
        lines += ["Per weight kind:", "", kinds, ""]
    return "\n".join(lines)


def plot_pareto(result: DemoResult, path: str | os.PathLike[str]) -> Path:
    """Accuracy against trainable adapter parameters (log-x), one marker per method (error bars:
    sd over the runs), the Pareto front (best accuracy for at most that many parameters) as a
    step line, and the head-only accuracy as a dashed line.  Uses no global matplotlib state."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(9, 5.5), dpi=120)
    ax = fig.add_subplot()
    points = [r for r in result.results if r.adapter_params > 0]
    families = list(dict.fromkeys(r.family for r in points))
    markers = dict(zip(families, "osD^vP*Xh<>", strict=False))
    palette = colormaps["tab10"]
    colors = {f: palette(i % 10) for i, f in enumerate(families)}
    for r in points:
        ax.errorbar(r.adapter_params, 100 * r.accuracy, yerr=100 * r.accuracy_std if len(r.accuracies) > 1 else None,
                    marker=markers[r.family], markersize=7, color=colors[r.family], linestyle="none", capsize=3,
                    label=r.family, zorder=3)
    front: list[MethodResult] = []
    for r in sorted(points, key=lambda r: (r.adapter_params, -r.accuracy)):
        if not front or r.accuracy > front[-1].accuracy:
            front.append(r)
    if front:
        xs = [r.adapter_params for r in front]
        ys = [100 * r.accuracy for r in front]
        ax.step(xs, ys, where="post", color="0.35", linewidth=1.2, zorder=2, label="Pareto front")
    for r in result.results:
        if r.adapter_params == 0:
            ax.axhline(100 * r.accuracy, color="0.5", linestyle="--", linewidth=1, label=f"{r.name} (0 params)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(list(unique.values()), list(unique.keys()), fontsize=8, loc="lower right")
    if points:
        ax.set_xscale("log")
        low = min(r.adapter_params for r in points)
        high = max(r.adapter_params for r in points)
        ax.set_xlim(low / 1.6, high * 2.2)
    ax.set_xlabel("trainable adapter parameters (log scale; the new head is trained in every method)")
    ax.set_ylabel("test accuracy on digits 5-9 (%)")
    runs = result.settings.repeats
    ax.set_title(f"TinyViT, digits 0-4 → 5-9 (q/v adapters), seed {result.seed}, "
                 f"{runs} run{'s' if runs > 1 else ''} per method{' (quick)' if result.quick else ''}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    _place_labels(fig, ax, [(r.name, r.adapter_params, 100 * r.accuracy) for r in points])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _place_labels(fig: Any, ax: Any, labels: Sequence[tuple[str, float, float]]) -> None:
    """Annotate each ``(text, x, y)`` at the first of a few offsets where the text overlaps no
    marker, no earlier label and not the legend, and stays inside the axes (else the first)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox

    renderer = FigureCanvasAgg(fig).get_renderer()
    inside = ax.get_window_extent(renderer)
    legend = ax.get_legend()
    taken = [legend.get_window_extent(renderer)] if legend is not None else []
    pad = 4.5 * fig.dpi / 72.0  # a little more than a marker radius (3.5 pt), in pixels
    for _, x, y in labels:
        px, py = ax.transData.transform((x, y))
        taken.append(Bbox.from_extents(px - pad, py - pad, px + pad, py + pad))
    offsets = [(6, 4, "left", "bottom"), (6, -4, "left", "top"), (-6, 4, "right", "bottom"),
               (-6, -4, "right", "top"), (0, 9, "center", "bottom"), (0, -9, "center", "top"),
               (8, 14, "left", "bottom"), (8, -14, "left", "top")]
    for text, x, y in sorted(labels, key=lambda item: (item[1], -item[2])):
        chosen = None
        for dx, dy, ha, va in offsets:
            note = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, va=va, fontsize=8)
            box = note.get_window_extent(renderer)
            fits = inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1)
            if fits and not any(box.overlaps(other) for other in taken):
                chosen = note
                break
            note.remove()
        if chosen is None:
            dx, dy, ha, va = offsets[0]
            chosen = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, va=va, fontsize=8)
        taken.append(chosen.get_window_extent(renderer))


def write_results(result: DemoResult, out: str | os.PathLike[str], *, plot: bool = True) -> Path:
    """Write ``results.json``, ``results.md`` and (``plot``) ``pareto.png`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result.as_dict(), indent=2, ensure_ascii=False) + "\n",
                                      encoding="utf-8")
    (out / "results.md").write_text(_report(result), encoding="utf-8")
    if plot:
        plot_pareto(result, out / "pareto.png")
    result.out = out
    return out


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def _method_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    known = methods()
    unknown = [n for n in names if n not in known]
    if not names:
        raise argparse.ArgumentTypeError("give at least one method")
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def _default_out() -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(f"tensoradapt-demo-{stamp}")
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path(f"tensoradapt-demo-{stamp}-{suffix}")
    return path


def _parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {m.name:<14} {m.description}" for m in methods().values())
    parser = OneLineParser(
        prog="tensoradapt demo",
        description="Pretrain a tiny ViT on scikit-learn's digits 0-4, transfer it to digits 5-9 with dense "
                    "fine-tuning, LoRA and SuperLoRA variants (adapters on query/value), and report accuracy, "
                    "trainable parameters, time and the dE/dL/dR geometry of each ΔW against the dense one.",
        epilog=f"methods:\n{listing}\n\nWrites results.json, results.md and pareto.png into the output folder "
               "and prints its path.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps and methods (under a minute on two cores)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: ./tensoradapt-demo-YYYYmmdd-HHMMSS)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of everything (default 0)")
    parser.add_argument("--methods", type=_method_list, metavar="M[,M...]",
                        help="comma-separated subset of the methods below (default: all; --quick: "
                             f"all but {', '.join(m for m in DEFAULT_METHODS if m not in QUICK_METHODS)})")
    parser.add_argument("--steps", type=positive_int, metavar="N", help="transfer steps per method")
    parser.add_argument("--pretrain-steps", type=positive_int, metavar="N", help="pretraining steps")
    parser.add_argument("--repeats", type=positive_int, metavar="R",
                        help="transfer runs per method with different seeds (default 3; --quick: 1)")
    parser.add_argument("--threads", type=positive_int, metavar="T",
                        help="torch threads (default min(2, number of CPUs))")
    parser.add_argument("--no-plot", action="store_true", help="do not write pareto.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the demo from the command line; returns the exit status (2 for bad arguments)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    if args.steps is not None:
        settings = replace(settings, transfer_steps=args.steps)
    if args.pretrain_steps is not None:
        settings = replace(settings, pretrain_steps=args.pretrain_steps)
    if args.repeats is not None:
        settings = replace(settings, repeats=args.repeats)
    needed = {"sklearn": "scikit-learn"} | ({} if args.no_plot else {"matplotlib": "matplotlib"})
    missing = [package for module, package in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        print(f"tensoradapt demo: error: the demo needs {' and '.join(missing)} "
              "(pip install 'tensoradapt[demo]')", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else _default_out()
    try:  # before any training, so a bad folder cannot lose a finished run
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".tensoradapt-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        print(f"tensoradapt demo: error: --out {str(out)!r} cannot be used as the results folder "
              f"({exc.strerror or type(exc).__name__})", file=sys.stderr)
        return 2
    result = run(args.methods, quick=args.quick, seed=args.seed, settings=settings,
                 progress=not args.no_progress, threads=args.threads)
    write_results(result, out, plot=not args.no_plot)
    print()
    print(format_table(result))
    print()
    print(f"total {result.total_time_s:.1f} s; results written to {out.resolve()}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
