"""The demo's run: pretrain once on digits 0–4, transfer to 5–9 with each method, compare ΔW.

:func:`run` returns a :class:`~tensoradapt.demo.report.DemoResult` and writes nothing; the
command line (:mod:`tensoradapt.demo.cli`) writes it with :func:`~tensoradapt.demo.report.write_results`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .catalog import DEFAULT_METHODS, QUICK_METHODS, Method, methods
from .data import Split, load_tasks
from .model import TARGETS, TinyViT, target_names
from .report import DemoResult, MethodResult, geometry, machine_info
from .train import DemoSettings, TransferRun, pretrain, transfer

__all__ = ["run"]

Log = Callable[[str], None]


def _selection(selected: Sequence[str] | None, quick: bool) -> list[str]:
    """The method names to run, without duplicates, checked against :func:`methods`."""
    known = methods()
    if selected is None:
        selected = QUICK_METHODS if quick else DEFAULT_METHODS
    names = list(dict.fromkeys(selected))
    unknown = [m for m in names if m not in known]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(known)}")
    if not names:
        raise ValueError("no methods selected")
    return names


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads`` (default ``min(2, os.cpu_count())``) inside the block, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads if threads is not None else min(2, os.cpu_count() or 1))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def progress_bar(total: int, label: str, enabled: bool, *, unit: str = "step", leave: bool = False) -> Any:
    """A tqdm bar on a terminal (None when disabled or without tqdm); the demo's and the study's."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return None
    return tqdm(total=total, desc=label, leave=leave, unit=unit, disable=not sys.stderr.isatty())


def run(selected: Sequence[str] | None = None, *, quick: bool = False, seed: int = 0,
        settings: DemoSettings | None = None, progress: bool = True, log: Log | None = print,
        threads: int | None = None) -> DemoResult:
    """Pretrain on digits 0–4, transfer to 5–9 with each method; returns the results (writes nothing).

    Parameters
    ----------
    selected : sequence of str, optional
        Method names (see :func:`~tensoradapt.demo.catalog.methods`), reported in this order;
        default :data:`DEFAULT_METHODS` (:data:`QUICK_METHODS` with ``quick``).  The geometry needs
        ``dense`` (the reference); without it, dE/dL/dR are left out.
    quick : bool
        Use :meth:`DemoSettings.quick` (unless ``settings`` is given) and the quick method list.
    seed : int
        Seeds the split, pretraining, and (with :func:`~tensoradapt.demo.train.repeat_seeds`) each
        repeat's new head, adapter initialisation and batches.
    settings : DemoSettings, optional
    progress : bool
        A tqdm bar per method (when stderr is a terminal).
    log : callable, optional
        Receives one line per stage and method (default ``print``; ``None``: silent).
    threads : int, optional
        ``torch.set_num_threads`` during the run (restored after); default ``min(2, os.cpu_count())``.
    """
    names = _selection(selected, quick)
    if settings is None:
        settings = DemoSettings.quick() if quick else DemoSettings()
    if settings.repeats < 1:
        raise ValueError(f"settings.repeats must be >= 1, got {settings.repeats}")
    emit = log if log is not None else (lambda _line: None)
    with _torch_threads(threads):
        return _Run(settings, seed, progress, emit).execute([methods()[n] for n in names], quick)


class _Run:
    """The stages of one :func:`run` (settings, seed, progress and log shared by all of them)."""

    def __init__(self, settings: DemoSettings, seed: int, progress: bool, emit: Log) -> None:
        self.settings, self.seed, self.progress, self.emit = settings, seed, progress, emit

    def execute(self, selected: list[Method], quick: bool) -> DemoResult:
        start = time.perf_counter()
        date = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        source, target = load_tasks(self.seed, self.settings.test_fraction)
        backbone, source_accuracy, pretrain_time = self.pretrain(source)
        self.announce_transfer(target)
        results = [self.method(i, len(selected), method, backbone, target) for i, method in enumerate(selected, 1)]
        self.add_geometry(results, backbone)
        return DemoResult(self.settings, self.seed, quick, source_accuracy, pretrain_time, results,
                          time.perf_counter() - start, machine_info(), date)

    def pretrain(self, source: Split) -> tuple[TinyViT, float, float]:
        """The pretrained backbone, its source test accuracy and the pretraining time (s)."""
        s = self.settings
        self.emit(f"pretraining a TinyViT (width {s.width}, {s.depth} blocks, {s.patch}x{s.patch} patches) on "
                  f"digits 0-4: {source.x_train.shape[0]} train / {source.x_test.shape[0]} test images, "
                  f"{s.pretrain_steps} steps ...")
        t0 = time.perf_counter()
        backbone, source_accuracy = pretrain(source, s, self.seed)
        elapsed = time.perf_counter() - t0
        self.emit(f"  source test accuracy {100 * source_accuracy:.1f}% in {elapsed:.1f} s")
        return backbone, source_accuracy, elapsed

    def announce_transfer(self, target: Split) -> None:
        s, repeats = self.settings, self.settings.repeats
        self.emit(f"transfer to digits 5-9 ({target.x_train.shape[0]} train / {target.x_test.shape[0]} test images): "
                  f"{s.transfer_steps} steps x {repeats} repeat{'s' if repeats > 1 else ''} per method, "
                  f"adapters on {'/'.join(TARGETS)} of every block")

    def repeat(self, method: Method, backbone: TinyViT, target: Split, repeat: int) -> TransferRun:
        """One transfer of ``method``, with a progress bar when enabled."""
        repeats = self.settings.repeats
        label = method.name if repeats == 1 else f"{method.name} ({repeat + 1}/{repeats})"
        bar = progress_bar(self.settings.transfer_steps, label, self.progress)
        step = None if bar is None else (lambda _step: bar.update(1))
        try:
            return transfer(backbone, method, target, self.settings, self.seed, repeat, step)
        finally:
            if bar is not None:
                bar.close()

    def method(self, i: int, count: int, method: Method, backbone: TinyViT, target: Split) -> MethodResult:
        """All repeats of ``method`` (the ``i``-th of ``count``), logged in one line."""
        runs = [self.repeat(method, backbone, target, r) for r in range(self.settings.repeats)]
        result = MethodResult.from_runs(method, self.settings.transfer_steps, runs)
        spread = f" ± {100 * result.accuracy_std:4.1f}" if self.settings.repeats > 1 else ""
        self.emit(f"  [{i:>2}/{count}] {method.name:<14} {result.adapter_params:>6,} params  "
                  f"acc {100 * result.accuracy:5.1f}%{spread}  {result.train_time_s:5.1f} s")
        return result

    def add_geometry(self, results: list[MethodResult], backbone: TinyViT) -> None:
        """Set each result's geometry against the ``dense`` runs (nothing without ``dense``)."""
        reference = next((r.runs for r in results if r.name == "dense"), None)
        if reference is None:
            return
        names = target_names(backbone, TARGETS)
        for result in results:
            result.geometry = geometry(result.runs, reference, names, self.settings.geometry_k)
