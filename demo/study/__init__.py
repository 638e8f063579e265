r"""``tensoradapt study``: the SuperLoRA paper's ablations, swept, with the parameter-efficiency gain measured.

Two tasks, both on scikit-learn's 8×8 digits (nothing is downloaded):

* ``digits`` — the demo's transfer: the TinyViT pretrained on digits 0–4, adapted to 5–9 with
  adapters on ``query``/``value`` of every block (:mod:`tensoradapt.demo.train`); score: test accuracy.
* ``flow`` — a class-conditional flow-matching model with Conv2d layers pretrained on 0–4 and
  adapted to 5–9 on its four inner convolutions (:mod:`tensoradapt.demo.study.flow`); score: the
  accuracy of a frozen digit classifier on class-conditional samples.

Every point of :func:`tensoradapt.demo.study.points.points` runs with ``repeats`` seeds (3; the
seeds of :func:`~tensoradapt.demo.train.repeat_seeds`).  Learning rates: one per learning-rate group
(a family), chosen from :attr:`StudySettings.lr_grid` on a validation split carved from the target
*training* images (25%, stratified): validation accuracy (digits) or validation flow-matching loss
(flow) of the group's representative point, trained on the other 75%.  The test images are never
used to choose anything.

Every finished run (and learning-rate trial) is stored as one JSON file under ``OUT/runs/`` with a
fingerprint of everything it depends on; a rerun with the same ``--out`` loads those and runs only
the rest (pretrained models are cached in ``OUT/cache/``).  Results are deterministic for a seed
and a thread count.  The gains are computed by :mod:`tensoradapt.demo.study.gain`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from tensoradapt.cli import OneLineParser, non_negative_int, positive_int

from ..cli import missing_packages, usable_folder
from ..runner import progress_bar
from .gain import bootstrap_gain, levels_from
from .points import FAMILIES, GAIN_FAMILIES, LR_REPRESENTATIVE, SUPERLORA_UNION, Point, points

__all__ = ["TASKS", "StudySettings", "main", "run_study", "summarise", "write_report"]

_PROG = "tensoradapt study"
TASKS: dict[str, str] = {
    "digits": "TinyViT digits 0-4 → 5-9, q/v adapters, test accuracy",
    "flow": "conditional flow-matching Conv2d model 0-4 → 5-9, judge accuracy on samples",
}
Log = Callable[[str], None]


@dataclass(frozen=True)
class StudySettings:
    """Everything a run depends on besides the point (defaults: the full study)."""

    repeats: int = 3
    lr_grid: tuple[float, ...] = (1e-2, 3e-2, 1e-1)
    validation_fraction: float = 0.25
    digits: dict[str, Any] = field(default_factory=lambda: {"transfer_steps": 300})
    flow: dict[str, Any] = field(default_factory=dict)
    bootstrap: int = 1000
    level_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    quick: bool = False

    @classmethod
    def quick_settings(cls) -> StudySettings:
        return cls(repeats=2, lr_grid=(3e-2,), bootstrap=200, quick=True,
                   digits={"width": 32, "depth": 2, "pretrain_steps": 150, "transfer_steps": 60, "repeats": 2},
                   flow={"channels": 16, "pretrain_steps": 300, "transfer_steps": 60, "classifier_steps": 150,
                         "samples_per_class": 16, "euler_steps": 8})


# ---------------------------------------------------------------------------------------------
# the run store
# ---------------------------------------------------------------------------------------------
def _fingerprint(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Store:
    """One JSON file per finished run under ``OUT/runs/TASK/``; a file is reused only when its
    fingerprint matches."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def path(self, task: str, key: str) -> Path:
        return self.out / "runs" / task / f"{key}.json"

    def get(self, task: str, key: str, fingerprint: str) -> dict[str, Any] | None:
        path = self.path(task, key)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return record if record.get("fingerprint") == fingerprint else None

    def put(self, task: str, key: str, record: dict[str, Any]) -> None:
        path = self.path(task, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# the tasks
# ---------------------------------------------------------------------------------------------
def _validation_split(split: Any, fraction: float, seed: int) -> Any:
    """A stratified cut of ``split``'s *training* images: a :class:`~tensoradapt.demo.data.Split`
    whose train part is the rest and whose "test" part is the validation images."""
    import torch
    from sklearn.model_selection import train_test_split

    from ..data import Split

    index = np.arange(split.y_train.shape[0])
    fit_i, val_i = train_test_split(index, test_size=fraction, random_state=seed, stratify=split.y_train.numpy())
    fit_i, val_i = torch.from_numpy(np.sort(fit_i)), torch.from_numpy(np.sort(val_i))
    x, y = split.x_train, split.y_train
    return Split(x[fit_i], y[fit_i], x[val_i], y[val_i])


class _Task:
    """A task: its reference data, a cached pretrained model, and how to run one point."""

    name: str
    higher_is_better_lr: bool = True

    def __init__(self, settings: StudySettings, seed: int, out: Path, emit: Log) -> None:
        self.settings, self.seed, self.out, self.emit = settings, seed, out, emit
        self.info: dict[str, Any] = {}

    def cache(self, stem: str) -> Path:
        return self.out / "cache" / f"{self.name}-{stem}-{_fingerprint(self.pretrain_payload())}.pt"

    def pretrain_payload(self) -> dict[str, Any]:
        raise NotImplementedError

    def run_payload(self) -> dict[str, Any]:
        return self.pretrain_payload()


class _Digits(_Task):
    name = "digits"

    def __init__(self, settings: StudySettings, seed: int, out: Path, emit: Log) -> None:
        from ..data import load_tasks
        from ..train import DemoSettings

        super().__init__(settings, seed, out, emit)
        self.demo = replace(DemoSettings(), **settings.digits)
        self.source, self.target = load_tasks(seed, self.demo.test_fraction)
        self.val_split = _validation_split(self.target, settings.validation_fraction, seed)
        self.backbone = self._backbone()

    def pretrain_payload(self) -> dict[str, Any]:
        return {"task": self.name, "demo": asdict(self.demo), "seed": self.seed}

    def _backbone(self) -> Any:
        import torch

        from ..train import build_model, pretrain

        path = self.cache("backbone")
        if path.is_file():
            model = build_model(self.demo)
            model.load_state_dict(torch.load(path, weights_only=True))
            model.eval()
            self.info = json.loads(path.with_suffix(".json").read_text())
            self.emit(f"[digits] pretrained TinyViT loaded from {path}")
            return model
        self.emit(f"[digits] pretraining the TinyViT on digits 0-4 ({self.demo.pretrain_steps} steps) ...")
        t0 = time.perf_counter()
        model, acc = pretrain(self.source, self.demo, self.seed)
        self.info = {"source_test_accuracy": acc, "pretrain_time_s": time.perf_counter() - t0,
                     "target_train": int(self.target.x_train.shape[0]), "target_test": int(self.target.x_test.shape[0]),
                     "validation": int(self.val_split.x_test.shape[0])}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
        path.with_suffix(".json").write_text(json.dumps(self.info))
        self.emit(f"[digits]   source test accuracy {100 * acc:.1f}% ({self.info['pretrain_time_s']:.1f} s)")
        return model

    def run(self, point: Point, lr: float, repeat: int, validation: bool) -> dict[str, Any]:
        from ..catalog import Method
        from ..train import transfer

        method = Method(point.name, point.family, point.name, point.config, lr)
        split = self.val_split if validation else self.target
        r = transfer(self.backbone, method, split, self.demo, self.seed, repeat)
        return {"score": r.accuracy, "train_time_s": r.train_time_s, "adapter_params": r.adapter_params,
                "head_params": r.head_params}


class _Flow(_Task):
    name = "flow"
    higher_is_better_lr = False  # validation flow-matching loss

    def __init__(self, settings: StudySettings, seed: int, out: Path, emit: Log) -> None:
        from ..data import load_tasks
        from .flow import FlowSettings

        super().__init__(settings, seed, out, emit)
        self.flow = replace(FlowSettings(), **settings.flow)
        self.source, self.target = load_tasks(seed)
        self.val_split = _validation_split(self.target, settings.validation_fraction, seed)
        self.backbone, self.judge = self._models()

    def pretrain_payload(self) -> dict[str, Any]:
        return {"task": self.name, "flow": asdict(self.flow), "seed": self.seed}

    def _models(self) -> tuple[Any, Any]:
        import torch

        from .flow import DigitCNN, FlowNet, pretrain_flow, sample_accuracy, train_classifier

        path = self.cache("models")
        if path.is_file():
            state = torch.load(path, weights_only=True)
            backbone, judge = FlowNet(5, self.flow.channels), DigitCNN()
            backbone.load_state_dict(state["backbone"])
            judge.load_state_dict(state["judge"])
            for m in (backbone, judge):
                m.eval()
            for p in judge.parameters():
                p.requires_grad_(False)
            self.info = json.loads(path.with_suffix(".json").read_text())
            self.emit(f"[flow] pretrained flow model and judge loaded from {path}")
            return backbone, judge
        s, t = self.source, self.target
        t0 = time.perf_counter()
        self.emit("[flow] training the judge (all ten digits, training images) ...")
        judge = train_classifier(torch.cat([s.x_train, t.x_train]), torch.cat([s.y_train, t.y_train + 5]),
                                 self.flow, self.seed)
        x_test, y_test = torch.cat([s.x_test, t.x_test]), torch.cat([s.y_test, t.y_test + 5])
        judge_acc = float((judge(x_test).argmax(dim=1) == y_test).float().mean())
        self.emit(f"[flow]   judge test accuracy {100 * judge_acc:.1f}%; pretraining the flow model on digits 0-4 "
                  f"({self.flow.pretrain_steps} steps) ...")
        backbone = pretrain_flow(s, self.flow, self.seed)
        source_acc = sample_accuracy(backbone, judge, self.flow, 0, self.seed + 17)
        self.info = {"judge_test_accuracy": judge_acc, "source_sample_accuracy": source_acc,
                     "pretrain_time_s": time.perf_counter() - t0, "target_train": int(t.x_train.shape[0]),
                     "validation": int(self.val_split.x_test.shape[0])}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"backbone": backbone.state_dict(), "judge": judge.state_dict()}, path)
        path.with_suffix(".json").write_text(json.dumps(self.info))
        self.emit(f"[flow]   source (0-4) sample accuracy {100 * source_acc:.1f}% "
                  f"({self.info['pretrain_time_s']:.1f} s)")
        return backbone, judge

    def run(self, point: Point, lr: float, repeat: int, validation: bool) -> dict[str, Any]:
        from ..train import repeat_seeds
        from .flow import adapt_flow

        seeds = repeat_seeds(self.seed, repeat)
        if validation:
            v = self.val_split
            r = adapt_flow(self.backbone, point.config, lr, v.x_train, v.y_train, self.flow, seeds,
                           validation=(v.x_test, v.y_test))
        else:
            r = adapt_flow(self.backbone, point.config, lr, self.target.x_train, self.target.y_train, self.flow,
                           seeds, judge=self.judge)
        return {"score": r.score, "train_time_s": r.train_time_s, "adapter_params": r.adapter_params,
                "head_params": r.head_params}


_TASK_CLASSES: dict[str, type[_Task]] = {"digits": _Digits, "flow": _Flow}


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------
def _selected_points(task: str, families: Sequence[str] | None, quick: bool) -> list[Point]:
    wanted = None if families is None else set(families) | {"baseline", "lora"}
    return [p for p in points(task, quick) if wanted is None or p.family in wanted]


def _representative(by_name: dict[str, Point], group: str) -> Point:
    """The point whose validation score picks ``group``'s learning rate: :data:`LR_REPRESENTATIVE`
    when the task has it, else the group's first point."""
    name = LR_REPRESENTATIVE.get(group)
    if name in by_name:
        return by_name[name]
    return next(p for p in by_name.values() if p.lr_group == group)


def _run_task(task: _Task, selected: list[Point], store: _Store, threads: int, progress: bool,
              emit: Log) -> dict[str, Any]:
    """LR selection, then every point × repeat; returns the task's section of ``results.json``."""
    import torch

    from tensoradapt import buffers

    settings = task.settings
    by_name = {p.name: p for p in points(task.name, settings.quick)}
    groups = sorted({p.lr_group for p in selected if p.config is not None})
    trials = [(g, lr) for g in groups for lr in settings.lr_grid]
    total = (len(trials) if len(settings.lr_grid) > 1 else 0) + len(selected) * settings.repeats
    bar = progress_bar(total, task.name, progress, unit="run", leave=True)
    base = {**task.run_payload(), "threads": threads, "torch": torch.__version__,
            "buffer_generator": buffers.GENERATOR_ID}  # the projections' maps: another generator, another run

    def step(label: str) -> None:
        if bar is not None:
            bar.set_postfix_str(label, refresh=False)
            bar.update(1)

    lr_choice: dict[str, Any] = {}
    for group in groups:
        rep = _representative(by_name, group)
        scores = {}
        for lr in settings.lr_grid:
            if len(settings.lr_grid) == 1:
                break
            fp = _fingerprint({**base, "kind": "lr", "config": rep.config.to_dict(), "lr": lr,
                               "validation_fraction": settings.validation_fraction})
            key = f"lr__{group}__{lr:g}"
            record = store.get(task.name, key, fp)
            if record is None:
                record = {"fingerprint": fp, **task.run(rep, lr, 0, validation=True)}
                store.put(task.name, key, record)
            scores[f"{lr:g}"] = record["score"]
            step(key)
        if scores:
            pick = (max if task.higher_is_better_lr else min)(scores, key=lambda k: scores[k])
            chosen = float(pick)
        else:
            chosen = settings.lr_grid[0]
        lr_choice[group] = {"representative": rep.name, "validation_scores": scores, "lr": chosen}
        emit(f"[{task.name}] lr for {group:<13} {chosen:g}  (validation: "
             + ", ".join(f"{k}: {v:.4f}" for k, v in scores.items()) + ")")

    results = []
    for i, point in enumerate(selected, 1):
        lr = lr_choice[point.lr_group]["lr"] if point.config is not None else 0.0
        runs = []
        for repeat in range(settings.repeats):
            config = None if point.config is None else point.config.to_dict()
            fp = _fingerprint({**base, "kind": "run", "config": config, "lr": lr, "repeat": repeat})
            key = f"{point.name}__{repeat}"
            record = store.get(task.name, key, fp)
            if record is None:
                record = {"fingerprint": fp, "repeat": repeat, **task.run(point, lr, repeat, validation=False)}
                store.put(task.name, key, record)
            runs.append(record)
            step(key)
        scores = [r["score"] for r in runs]
        entry = {"name": point.name, "family": point.family, "settings": point.settings,
                 "config": None if point.config is None else point.config.to_dict(), "lr": lr,
                 "adapter_params": runs[0]["adapter_params"], "head_params": runs[0]["head_params"],
                 "scores": scores, "mean": float(np.mean(scores)),
                 "sd": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
                 "train_time_s": float(np.mean([r["train_time_s"] for r in runs])),
                 "repeat_seeds": [r["repeat"] for r in runs]}
        results.append(entry)
        emit(f"[{task.name}] [{i:>2}/{len(selected)}] {point.name:<22} {entry['adapter_params']:>7,} params  "
             f"{100 * entry['mean']:5.1f} ± {100 * entry['sd']:4.1f}%")
    if bar is not None:
        bar.close()
    return {"description": TASKS[task.name], "info": task.info, "settings": task.run_payload(),
            "learning_rates": lr_choice, "points": results}


def _versions() -> dict[str, Any]:
    import platform

    import torch

    from tensoradapt import __version__, buffers

    return {"tensoradapt": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "buffer_generator": buffers.GENERATOR_ID}


def run_study(out: str | os.PathLike[str], *, tasks: Sequence[str] = tuple(TASKS),
              families: Sequence[str] | None = None,
              settings: StudySettings | None = None, seed: int = 0, threads: int | None = None,
              progress: bool = True, log: Log | None = print) -> dict[str, Any]:
    """Run (or resume) the study into ``out``; returns the content of ``results.json`` (written by
    :func:`write_report`)."""
    import torch

    settings = settings or StudySettings()
    out = Path(out)
    emit = log if log is not None else (lambda _line: None)
    store = _Store(out)
    threads = threads if threads is not None else 1
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        sections = {}
        for name in tasks:
            task = _TASK_CLASSES[name](settings, seed, out, emit)
            sections[name] = _run_task(task, _selected_points(name, families, settings.quick), store, threads,
                                       progress, emit)
            sections[name]["gains"] = summarise(sections[name], settings)
        versions = _versions()
    finally:
        torch.set_num_threads(previous)
    return {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "seed": seed,
            "threads": threads, "quick": settings.quick, "study_settings": asdict(settings),
            "families": list(families) if families is not None else list(FAMILIES), "versions": versions,
            "elapsed_s": time.perf_counter() - start, "tasks": sections}


# ---------------------------------------------------------------------------------------------
# gains
# ---------------------------------------------------------------------------------------------
def _curve(entries: Sequence[dict[str, Any]]) -> list[tuple[float, list[float]]]:
    return [(float(e["adapter_params"]), list(e["scores"])) for e in entries if e["adapter_params"] > 0]


def summarise(section: dict[str, Any], settings: StudySettings) -> dict[str, Any]:
    """Gains over LoRA per family (and the SuperLoRA union) at the levels of :func:`levels_from`."""
    pts = section["points"]
    lora = _curve([p for p in pts if p["family"] == "lora"])
    if len(lora) < 2:
        return {"levels": [], "families": {}}
    levels = levels_from(lora, settings.level_fractions)
    present = [f for f in GAIN_FAMILIES if any(p["family"] == f for p in pts)]
    fams: dict[str, list[dict[str, Any]]] = {f: [p for p in pts if p["family"] == f] for f in present}
    union = [p for p in pts if p["family"] in SUPERLORA_UNION]
    if union:
        fams["superlora-all"] = union
    out: dict[str, Any] = {"levels": levels, "families": {}}
    for fam, entries in fams.items():
        curve = _curve(entries)
        out["families"][fam] = [bootstrap_gain(lora, curve, a, resamples=settings.bootstrap, seed=k).to_dict()
                                for k, a in enumerate(levels)]
    return out


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def _fmt_gain(g: dict[str, Any]) -> str:
    if g["gain"] is None:
        return "not reached" if g["lora_params"] is not None else "—"
    text = f"{'≥ ' if g['bounded'] else ''}{g['gain']:.2f}×"
    if g["low"] is not None:
        text += f" [{g['low']:.2f}, {g['high']:.2f}]"
    return text + ("" if g["defined_fraction"] >= 0.999 else f" ({100 * g['defined_fraction']:.0f}%)")


def _points_table(section: dict[str, Any]) -> list[str]:
    lines = ["| family | point | settings | params | score (%, mean ± sd) | seeds | lr |",
             "|---|---|---|---:|---:|---|---:|"]
    for p in section["points"]:
        settings = ", ".join(f"{k}={v}" for k, v in p["settings"].items())
        seeds = ", ".join(f"{100 * s:.1f}" for s in p["scores"])
        lines.append(f"| {p['family']} | {p['name']} | {settings} | {p['adapter_params']:,} | "
                     f"{100 * p['mean']:.1f} ± {100 * p['sd']:.1f} | {seeds} | {p['lr']:g} |")
    return lines


def _gain_table(section: dict[str, Any]) -> list[str]:
    gains = section.get("gains", {})
    levels = gains.get("levels", [])
    if not levels:
        return ["(no LoRA curve: no gains)"]
    head = "| family | " + " | ".join(f"gain at {100 * a:.1f}%" for a in levels) + " |"
    lines = [head, "|---|" + "---:|" * len(levels)]
    for fam, row in gains["families"].items():
        lines.append(f"| {fam} | " + " | ".join(_fmt_gain(g) for g in row) + " |")
    return lines


def results_markdown(result: dict[str, Any]) -> str:
    """``results.md``: per task the gains, the learning rates and every point."""
    v = result["versions"]
    lines = [f"# tensoradapt study{' (quick)' if result['quick'] else ''}", "",
             f"{result['date']}, seed {result['seed']}, {result['threads']} torch threads, "
             f"{result['study_settings']['repeats']} seeds per point; tensoradapt {v['tensoradapt']}, "
             f"torch {v['torch']}, numpy {v['numpy']}, Python {v['python']}, {v['platform']}; "
             f"{result['elapsed_s']:.0f} s.", ""]
    for name, section in result["tasks"].items():
        lines += [f"## {name}: {section['description']}", "", "Pretraining: " +
                  ", ".join(f"{k} {val:.3f}" if isinstance(val, float) else f"{k} {val}"
                            for k, val in section["info"].items()), "",
                  "Gain = LoRA's parameters / the family's at equal score (log-parameter interpolation on "
                  "monotone envelopes), [95% bootstrap interval over seeds]; '≥': the family's smallest point "
                  "already reaches the level; (x%): share of resamples where defined.", ""]
        lines += [*_gain_table(section), "", "Learning rates (chosen on the validation split):", ""]
        lines += [f"* {g}: {c['lr']:g} (at {c['representative']}; "
                  + ", ".join(f"{k}: {val:.4f}" for k, val in c["validation_scores"].items()) + ")"
                  for g, c in section["learning_rates"].items()]
        lines += ["", *_points_table(section), ""]
    return "\n".join(lines) + "\n"


def _plot_family(section: dict[str, Any], task: str, family: str, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=90)
    _draw_family(fig.add_subplot(), section, task, family)
    fig.tight_layout()
    fig.savefig(path)


def _plot_grid(section: dict[str, Any], task: str, families: Sequence[str], path: Path) -> None:
    """All families of a task against LoRA, one panel each (``pareto-TASK.png``)."""
    from matplotlib.figure import Figure

    cols = min(4, len(families))
    rows = -(-len(families) // cols)
    fig = Figure(figsize=(3.3 * cols, 2.7 * rows), dpi=80)
    for i, family in enumerate(families):
        ax = fig.add_subplot(rows, cols, i + 1)
        _draw_family(ax, section, task, family, small=True)
    fig.tight_layout()
    fig.savefig(path)


def _draw_family(ax: Any, section: dict[str, Any], task: str, family: str, small: bool = False) -> None:
    from matplotlib.ticker import NullFormatter

    from .gain import envelope

    for fam, color, marker in (("lora", "tab:blue", "o"), (family, "tab:red", "s")):
        entries = [p for p in section["points"] if p["family"] == fam and p["adapter_params"] > 0]
        if not entries:
            continue
        xs = [p["adapter_params"] for p in entries]
        ys = [100 * p["mean"] for p in entries]
        ax.errorbar(xs, ys, yerr=[100 * p["sd"] for p in entries], fmt=marker, color=color, capsize=2,
                    markersize=5, label=fam)
        ex, ey = envelope(xs, ys)
        ax.plot(ex, ey, color=color, alpha=0.5, linewidth=1)  # the envelope the gains interpolate
    for p in section["points"]:
        if p["family"] == "baseline":
            ax.axhline(100 * p["mean"], color="0.5", linestyle="--" if p["name"] == "head-only" else ":",
                       linewidth=1, label=f"{p['name']} ({p['adapter_params']:,})")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("adapter parameters (log)" if small else "trainable adapter parameters (log)", fontsize=8)
    ax.set_ylabel("score (%)", fontsize=8)
    ax.set_title(family if small else f"{task}: {family} vs LoRA", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=5 if small else 7, loc="lower right")


def write_report(result: dict[str, Any], out: str | os.PathLike[str], plot: bool = True) -> list[Path]:
    """Write ``results.json``, ``results.md`` and (with ``plot``) ``pareto-TASK-FAMILY.png`` per family and
    ``pareto-TASK.png`` (all families of a task, one panel each)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.md"]
    written[0].write_text(json.dumps(result, indent=1, default=str))
    written[1].write_text(results_markdown(result))
    if plot:
        for task, section in result["tasks"].items():
            families = [f for f in dict.fromkeys(p["family"] for p in section["points"])
                        if f not in ("baseline", "lora")]
            for family in families:
                path = out / f"pareto-{task}-{family}.png"
                _plot_family(section, task, family, path)
                written.append(path)
            if families:
                _plot_grid(section, task, families, out / f"pareto-{task}.png")
                written.append(out / f"pareto-{task}.png")
    return written


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------
def _choices(known: Sequence[str], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
        if not names:
            raise argparse.ArgumentTypeError(f"give at least one {what}")
        unknown = [n for n in names if n not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what}(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return names

    return parse


def _parser() -> OneLineParser:
    listing = "\n".join(f"  {k:<13} {v}" for k, v in FAMILIES.items())
    tasks = "\n".join(f"  {k:<13} {v}" for k, v in TASKS.items())
    parser = OneLineParser(
        prog=_PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sweep the SuperLoRA families (grouping and reshape, LoRTA, LoNKr, projections) against LoRA "
                    "on two digits tasks, several seeds per point, and measure each family's parameter-efficiency "
                    "gain over LoRA with bootstrap intervals. Resumable: finished runs in --out are not rerun.",
        epilog=f"families (baseline and lora are always run):\n{listing}\n\ntasks:\n{tasks}\n\n"
               "Writes results.json, results.md and pareto-TASK-FAMILY.png into the output folder.")
    parser.add_argument("--quick", action="store_true", help="small models, few points, 2 seeds (under 2 minutes)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default ./tensoradapt-study[-quick])")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of everything (default 0)")
    parser.add_argument("--families", type=_choices(list(FAMILIES), "family"), metavar="F[,F...]",
                        help="families to run (default all)")
    parser.add_argument("--tasks", type=_choices(list(TASKS), "task"), metavar="T[,T...]",
                        help="tasks to run (default digits,flow)")
    parser.add_argument("--repeats", type=positive_int, metavar="R", help="seeds per point (default 3; --quick 2)")
    parser.add_argument("--threads", type=positive_int, metavar="T",
                        help="torch threads (default 1: the models are tiny and one thread is the fastest on a "
                             "shared machine; results depend on it)")
    parser.add_argument("--no-plot", action="store_true", help="no Pareto plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _error(message: str) -> int:
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """``tensoradapt study``; returns the exit status (2 for bad arguments, one line on stderr)."""
    args = _parser().parse_or_status(argv)
    if isinstance(args, int):  # --help, --version or a usage error
        return args
    missing = missing_packages(plot=not args.no_plot)
    if missing:
        return _error(f"the study needs {' and '.join(missing)} (pip install 'tensoradapt[demo]')")
    out = Path(args.out) if args.out else Path("tensoradapt-study-quick" if args.quick else "tensoradapt-study")
    problem = usable_folder(out)
    if problem is not None:
        return _error(f"--out {str(out)!r} cannot be used as the results folder ({problem})")
    settings = StudySettings.quick_settings() if args.quick else StudySettings()
    if args.repeats is not None:
        settings = replace(settings, repeats=args.repeats)
    result = run_study(out, tasks=args.tasks or tuple(TASKS), families=args.families, settings=settings,
                       seed=args.seed, threads=args.threads, progress=not args.no_progress)
    write_report(result, out, plot=not args.no_plot)
    for name, section in result["tasks"].items():
        print(f"\n{name}: gains over LoRA")
        print("\n".join(_gain_table(section)))
    print(f"\ntotal {result['elapsed_s']:.1f} s; results written to {out.resolve()}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

