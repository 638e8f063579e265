"""Running the study: the settings, each point's learning-rate search, the seeds, both tasks side by side.

For every point of a task (:func:`~tensoradapt.demo.study.points.points`):

1. **Learning rate, per point, on validation.**  Seed 0 is trained at three neighbouring rates of
   :data:`LR_GRID` (a factor ~3 apart) around a start (the previous point of the family's pick,
   or :data:`~tensoradapt.demo.study.points.LR_START` for its first point); while the best
   validation score sits at the lowest or highest rate tried, the next rate beyond it is tried too.
   A pick at the end of :data:`LR_GRID` is flagged ``edge`` in ``results.json`` and the report.
   Ties go to the smaller rate.
2. **Seeds.** Seeds 1 … S−1 run at the picked rate; seed 0's run is the search's run at that rate.
   Seed index ``s`` fixes the new head, the adapter's initialisation and the batches, the same for
   every point (runs are paired by seed).

Every run trains on the target's ``train`` cut and is scored on its ``validation`` and ``test``
cuts; its record (the interface of :mod:`tensoradapt.demo.study.gain`) is stored by
:class:`~tensoradapt.demo.study.store.Store`.  :func:`run_study` runs the tasks in separate
processes side by side by default (one torch thread each), then summarises each task with
:func:`~tensoradapt.demo.study.gain.summarise_task`.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .points import FAMILIES, LR_START, Point, points
from .store import Store, fingerprint, run_key
from .tasks import TASKS, Task, make_task

__all__ = ["LR_GRID", "StudySettings", "run_study", "run_task"]

Log = Callable[[str], None]

LR_GRID: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
"""The learning rates a point's search can try (neighbours are a factor ~3 apart)."""

RECORD_KEYS = ("task", "family", "point", "params", "groups", "seed", "lr", "val", "test", "test_items", "fid")


@dataclass(frozen=True)
class StudySettings:
    """Everything the runs depend on besides the point (defaults: the full study)."""

    seeds: int = 5
    bootstrap: int = 1000
    vit: dict[str, Any] = field(default_factory=dict)
    flow: dict[str, Any] = field(default_factory=dict)
    quick: bool = False

    @classmethod
    def quick_settings(cls) -> StudySettings:
        """``--quick``: a 2-block ViT, short pretraining and transfer, few points, 2 seeds."""
        return cls(seeds=2, bootstrap=100, quick=True,
                   vit={"width": 16, "depth": 2, "heads": 2, "pretrain_steps": 150, "transfer_steps": 40,
                        "source_train": 6000, "target_train": 200, "target_validation": 200, "target_test": 300},
                   flow={"channels": 16, "pretrain_steps": 200, "transfer_steps": 40, "judge_steps": 150,
                         "val_per_class": 5, "test_per_class": 10, "euler_steps": 6})


def _grid_index(lr: float) -> int:
    return min(range(len(LR_GRID)), key=lambda i: abs(LR_GRID[i] - lr) / lr)


class _Runner:
    """Runs (or loads) the runs of one task."""

    def __init__(self, task: Task, store: Store, settings: StudySettings, threads: int, emit: Log) -> None:
        import torch

        from tensoradapt import buffers

        self.task, self.store, self.settings, self.emit = task, store, settings, emit
        self.base = {**task.payload(), "threads": threads, "torch": torch.__version__,
                     "buffer_generator": buffers.GENERATOR_ID}
        self.ran = 0

    def run(self, point: Point, lr: float, seed: int) -> dict[str, Any]:
        config = None if point.config is None else point.config.to_dict()
        fp = fingerprint({**self.base, "config": config, "lr": lr, "seed": seed})
        key = run_key(point.name, lr, seed)
        record = self.store.get(self.task.name, key, fp)
        if record is None:
            record = {"fingerprint": fp, "task": self.task.name, "family": point.family, "point": point.name,
                      "groups": point.groups, "seed": seed, "lr": lr, "settings": point.settings,
                      **self.task.run(point, lr, seed)}
            self.store.put(self.task.name, key, record)
            self.ran += 1
        return record

    def search(self, point: Point, start: float) -> dict[str, Any]:
        """The learning-rate search of ``point`` on seed 0's validation score (see the module doc)."""
        i = _grid_index(start)
        tried: dict[int, float] = {}
        window = [j for j in (i - 1, i, i + 1) if 0 <= j < len(LR_GRID)]
        while True:
            for j in window:
                if j not in tried:
                    tried[j] = self.run(point, LR_GRID[j], 0)["val"]
            best = max(sorted(tried), key=lambda j: tried[j])  # ties: the smaller rate (first in order)
            lo, hi = min(tried), max(tried)
            if best == lo and lo > 0:
                window = [lo - 1]
            elif best == hi and hi < len(LR_GRID) - 1:
                window = [hi + 1]
            else:
                break
        edge = best in (0, len(LR_GRID) - 1)
        return {"lr": LR_GRID[best], "edge": edge, "validation": {f"{LR_GRID[j]:g}": tried[j] for j in sorted(tried)}}


def _public(record: dict[str, Any]) -> dict[str, Any]:
    out = {k: record[k] for k in RECORD_KEYS}
    out["settings"] = record.get("settings", {})
    return out


def run_task(task: Task, selected: Sequence[Point], store: Store, settings: StudySettings, threads: int,
             emit: Log) -> dict[str, Any]:
    """Every point × seed of ``task`` (with each point's learning-rate search); returns the task's
    raw section: ``records`` (one per point and seed, the interface of ``gain.summarise_task``),
    ``learning_rates`` (each point's search), ``info``, ``settings``, ``L`` and timings."""
    runner = _Runner(task, store, settings, threads, emit)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    records: list[dict[str, Any]] = []
    searches: dict[str, Any] = {}
    start_lr: dict[str, float] = {}
    for n, point in enumerate(selected, 1):
        if point.config is None:
            lr = 0.0
        else:
            search = runner.search(point, start_lr.get(point.family, LR_START.get(point.family, 1e-2)))
            searches[point.name] = search
            lr = start_lr[point.family] = search["lr"]
        runs = [runner.run(point, lr, s) for s in range(settings.seeds)]
        records += [_public(r) for r in runs]
        mean = sum(r["test"] for r in runs) / len(runs)
        flag = " (lr at the grid's edge)" if searches.get(point.name, {}).get("edge") else ""
        emit(f"[{task.name}] [{n:>2}/{len(selected)}] {point.name:<22} {runs[0]['params']:>7,} params  lr {lr:<6g} "
             f"test {100 * mean:5.1f}%{flag}")
    return {"description": TASKS[task.name], "L": task.L,
            "weight_shape": list(task.weight_shape), "info": task.info, "settings": task.payload(),
            "learning_rates": searches, "records": records, "runs_done": runner.ran,
            "wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0}


def _selected(task: str, families: Sequence[str] | None, quick: bool) -> list[Point]:
    wanted = None if families is None else set(families) | {"baseline", "lora"}
    return [p for p in points(task, quick) if wanted is None or p.family in wanted]


def _task_section(name: str, families: Sequence[str] | None, settings: StudySettings, seed: int, out: str,
                  threads: int, quiet: bool) -> dict[str, Any]:
    """One task from start to end in this process (``threads`` torch threads)."""
    import torch

    torch.set_num_threads(threads)

    def emit(line: str) -> None:
        if not quiet:
            print(line, flush=True)

    t0 = time.perf_counter()
    task = make_task(name, getattr(settings, name), seed, Path(out), emit)
    section = run_task(task, _selected(name, families, settings.quick), Store(Path(out)), settings, threads, emit)
    section["task_wall_s"] = time.perf_counter() - t0
    return section


def _sections(tasks: Sequence[str], families: Sequence[str] | None, settings: StudySettings, seed: int, out: Path,
              threads: int, parallel: bool, quiet: bool) -> dict[str, dict[str, Any]]:
    args = [(name, families, settings, seed, str(out), threads, quiet) for name in tasks]
    if not parallel or len(tasks) < 2:
        return {a[0]: _task_section(*a) for a in args}
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=len(tasks), mp_context=mp.get_context("spawn")) as pool:
        futures = {a[0]: pool.submit(_task_section, *a) for a in args}
        return {name: f.result() for name, f in futures.items()}


def _versions() -> dict[str, Any]:
    import platform

    import numpy as np
    import torch

    from tensoradapt import __version__, buffers

    return {"tensoradapt": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "buffer_generator": buffers.GENERATOR_ID}


def run_study(out: str | os.PathLike[str], *, tasks: Sequence[str] = tuple(TASKS),
              families: Sequence[str] | None = None, settings: StudySettings | None = None, seed: int = 0,
              threads: int = 1, parallel: bool = True, log: Log | None = print) -> dict[str, Any]:
    """Run (or resume) the study into ``out``; returns the content of ``results.json``.

    ``parallel``: the tasks run in separate processes side by side (``threads`` torch threads
    each); results do not depend on it.  The summaries are :func:`summarise` of each task.
    """
    settings = settings or StudySettings()
    out = Path(out)
    start = time.perf_counter()
    quiet = log is None
    sections = _sections(tasks, families, settings, seed, out, threads, parallel, quiet)
    summaries = {name: summarise(section, settings) for name, section in sections.items()}
    return {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "seed": seed,
            "threads": threads, "parallel": parallel and len(tasks) > 1, "quick": settings.quick,
            "study_settings": asdict(settings), "lr_grid": list(LR_GRID),
            "families": list(families) if families is not None else list(FAMILIES), "versions": _versions(),
            "elapsed_s": time.perf_counter() - start, "tasks": summaries, "runs": sections}


def summarise(section: dict[str, Any], settings: StudySettings) -> dict[str, Any]:
    """The task's summary: :func:`~tensoradapt.demo.study.gain.summarise_task` of its records, with
    ``superlora-all`` (the union of :data:`~tensoradapt.demo.study.points.SUPERLORA_UNION`)."""
    from .gain import summarise_task
    from .points import SUPERLORA_UNION

    return summarise_task(section["records"], L=section["L"], weight_shape=section.get("weight_shape"),
                          union={"superlora-all": list(SUPERLORA_UNION)},
                          resamples=settings.bootstrap, seed=0)
