"""The demo's run: pretrain once on digits 0–4, transfer to 5–9 with each method, compare ΔW.

:func:`run` returns a :class:`~tensoradapt.demo.report.DemoResult`.  Without ``out`` it writes
nothing; with ``out`` it keeps the run's progress there (:mod:`tensoradapt.demo.resume`), rewrites
``results.json`` and ``results.md`` as each method finishes, writes every file at the end, and a
rerun with the same ``out`` and settings resumes: it runs only the methods not finished yet.

Torch runs on one thread unless told otherwise (:func:`default_threads`): the demo's tensors are
small (64-wide), so a second thread gains little on a quiet machine, while on cores shared with
other processes every operation waits for the slowest thread (measured on a loaded 2-core
machine: a ``--quick`` transfer took 1.0-1.3 s on one thread and 4-28 s on two).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from tensoradapt.torch.progress import progress_bar

from .catalog import DEFAULT_METHODS, QUICK_METHODS, Method, methods
from .data import Split, load_tasks
from .model import TARGETS, TinyViT, target_names
from .report import DemoResult, MethodResult, geometry, machine_info, write_results
from .resume import Progress, ResumeError, run_key
from .train import DemoSettings, TransferRun, pretrain, transfer

__all__ = ["ResumeError", "available_cpus", "default_threads", "progress_bar", "run"]

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


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """The torch threads of a run without ``threads``: what ``OMP_NUM_THREADS`` gave torch when it
    is set, else 1 (see the module documentation)."""
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    return 1


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run(selected: Sequence[str] | None = None, *, quick: bool = False, seed: int = 0,
        settings: DemoSettings | None = None, progress: bool = True, log: Log | None = print,
        threads: int | None = None, out: str | os.PathLike[str] | None = None, fresh: bool = False,
        plot: bool = True) -> DemoResult:
    """Pretrain on digits 0–4, transfer to 5–9 with each method; returns the results.

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
        ``torch.set_num_threads`` during the run (restored after); default :func:`default_threads`
        (1, or what ``OMP_NUM_THREADS`` set).  Results are deterministic for a seed and a thread count.
    out : path, optional
        The output folder: the run's progress is kept there (``OUT/demo-progress/``),
        ``results.json`` and ``results.md`` are rewritten as each method finishes, and all files
        (with ``pareto.png`` when ``plot``) are written at the end.  A run already in ``out`` with
        the same settings is resumed: its finished methods are loaded, not trained again.
        Default: write nothing.
    fresh : bool
        Discard what an earlier run left in ``out`` and start over.
    plot : bool
        Write ``pareto.png`` into ``out`` (at the end, or when the run is interrupted).

    Raises
    ------
    ResumeError
        ``out`` holds a run with other settings (and not ``fresh``); nothing has been trained.
    ValueError
        An unknown method, no method, or fewer than one repeat.
    """
    names = _selection(selected, quick)
    if settings is None:
        settings = DemoSettings.quick() if quick else DemoSettings()
    if settings.repeats < 1:
        raise ValueError(f"settings.repeats must be >= 1, got {settings.repeats}")
    if threads is None:
        threads = default_threads()
    elif isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r:.40}")
    emit = log if log is not None else (lambda _line: None)
    store = None if out is None else Progress.open(out, run_key(settings, seed, threads), fresh=fresh)
    with _torch_threads(threads):
        return _Run(settings, seed, progress, emit, store, plot).execute([methods()[n] for n in names], quick)


class _Run:
    """The stages of one :func:`run` (settings, seed, progress, log and store shared by all of them)."""

    def __init__(self, settings: DemoSettings, seed: int, progress: bool, emit: Log, store: Progress | None = None,
                 plot: bool = True) -> None:
        self.settings, self.seed, self.progress, self.emit = settings, seed, progress, emit
        self.store, self.plot = store, plot
        self.start = time.perf_counter()
        self.spent_before = store.spent_s if store is not None else 0.0
        self.quick, self.date = False, ""

    @property
    def out(self) -> Path | None:
        return None if self.store is None else self.store.folder.parent

    def resume_hint(self) -> str:
        return f"the same command with --out {shlex.quote(str(self.out))} resumes the run"

    def elapsed(self) -> float:
        """Seconds of this run so far, earlier sessions of a resumed run included."""
        return self.spent_before + time.perf_counter() - self.start

    def execute(self, selected: list[Method], quick: bool) -> DemoResult:
        self.start = time.perf_counter()
        self.quick = quick
        self.date = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        source, target = load_tasks(self.seed, self.settings.test_fraction)
        finished = self.finished(selected)
        backbone, source_accuracy, pretrain_time = self.backbone(source)
        self.announce_transfer(target)
        names = target_names(backbone, TARGETS)
        results: list[MethodResult] = []
        try:
            for i, method in enumerate(selected, 1):
                result = finished.get(method.name)
                if result is None:
                    result = self.method(i, len(selected), method, backbone, target)
                    if self.store is not None:
                        self.store.save_method(method, result)
                else:
                    self.report_method(i, len(selected), result, earlier=True)
                results.append(result)
                if self.store is not None:  # the rows so far, as each method finishes
                    partial = self.result(results, selected, finished, names, source_accuracy, pretrain_time)
                    write_results(partial, self.store.folder.parent, plot=False)
                    self.store.set_spent(self.elapsed())
        except KeyboardInterrupt:
            if self.store is not None:
                partial = self.result(results, selected, finished, names, source_accuracy, pretrain_time)
                write_results(partial, self.store.folder.parent, plot=self.plot and bool(results))
                self.store.set_spent(self.elapsed())
                self.emit(f"stopped: {len(results)} of {len(selected)} methods finished, their results are in "
                          f"{self.out}; {self.resume_hint()}")
            raise
        final = self.result(results, selected, finished, names, source_accuracy, pretrain_time)
        if self.store is not None:
            write_results(final, self.store.folder.parent, plot=self.plot)
            self.store.set_spent(final.total_time_s)
        return final

    def result(self, results: list[MethodResult], selected: list[Method], finished: dict[str, MethodResult],
               names: list[str], source_accuracy: float, pretrain_time: float) -> DemoResult:
        """The :class:`DemoResult` of the methods finished so far (the geometry of those it can have)."""
        self.add_geometry(results, names)
        done = {r.name for r in results}
        return DemoResult(self.settings, self.seed, self.quick, source_accuracy, pretrain_time, list(results),
                          self.elapsed(), machine_info(), self.date, out=self.out,
                          pending=[m.name for m in selected if m.name not in done],
                          resumed=[r.name for r in results if r.name in finished])

    def finished(self, selected: list[Method]) -> dict[str, MethodResult]:
        """The selected methods an earlier session finished (none without a store), announced."""
        if self.store is None:
            return {}
        steps = self.settings.transfer_steps
        found = {m.name: r for m in selected if (r := self.store.finished(m, steps)) is not None}
        if found:
            self.emit(f"resuming the run in {self.out}: {len(found)} of {len(selected)} methods finished earlier "
                      f"({', '.join(found)}) and are not trained again (--fresh starts over)")
        else:
            self.emit(f"writing to {self.out} as each method finishes; if stopped, {self.resume_hint()}")
        return found

    def backbone(self, source: Split) -> tuple[TinyViT, float, float]:
        """The pretrained backbone (from the store when an earlier session stored it), its source
        test accuracy and the pretraining time (s)."""
        store = self.store
        stored = None if store is None else store.pretrained(self.settings)
        if store is not None and stored is not None:
            self.emit(f"pretrained TinyViT loaded from {store.folder} (source test accuracy "
                      f"{100 * stored[1]:.1f}%, pretrained in {stored[2]:.1f} s)")
            return stored
        backbone, source_accuracy, elapsed = self.pretrain(source)
        if store is not None:
            store.save_pretrained(backbone, source_accuracy, elapsed)
            store.set_spent(self.elapsed())
        return backbone, source_accuracy, elapsed

    def pretrain(self, source: Split) -> tuple[TinyViT, float, float]:
        """The pretrained backbone, its source test accuracy and the pretraining time (s)."""
        s = self.settings
        self.emit(f"pretraining a TinyViT (width {s.width}, {s.depth} blocks, {s.patch}x{s.patch} patches) on "
                  f"digits 0-4: {source.x_train.shape[0]} train / {source.x_test.shape[0]} test images, "
                  f"{s.pretrain_steps} steps, {torch.get_num_threads()} torch thread"
                  f"{'s' if torch.get_num_threads() > 1 else ''} ...")
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
        self.report_method(i, count, result)
        return result

    def report_method(self, i: int, count: int, result: MethodResult, *, earlier: bool = False) -> None:
        """The log line of a finished method (``earlier``: loaded from an earlier session)."""
        spread = f" ± {100 * result.accuracy_std:4.1f}" if self.settings.repeats > 1 else ""
        when = "(finished earlier)" if earlier else f"{result.train_time_s:5.1f} s"
        self.emit(f"  [{i:>2}/{count}] {result.name:<14} {result.adapter_params:>6,} params  "
                  f"acc {100 * result.accuracy:5.1f}%{spread}  {when}")

    def add_geometry(self, results: list[MethodResult], names: list[str]) -> None:
        """Set the geometry against the ``dense`` runs of each result that has none yet (nothing
        without ``dense``); deterministic, so computing it as methods finish changes nothing."""
        reference = next((r.runs for r in results if r.name == "dense"), None)
        if reference is None:
            return
        for result in results:
            if result.geometry is None:
                result.geometry = geometry(result.runs, reference, names, self.settings.geometry_k)
