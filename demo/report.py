"""Results: the per-method and per-run dataclasses, the ΔW geometry, the Markdown tables and the files.

:func:`geometry` aggregates :func:`tensoradapt.analysis.compare` over weights and repeats;
:func:`write_results` writes ``results.json`` (:meth:`DemoResult.as_dict`), ``results.md``
(:func:`results_markdown`) and ``pareto.png`` (:func:`tensoradapt.demo.plot.plot_pareto`).
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import tensoradapt as ta
from tensoradapt.analysis import aggregate_by_kind, compare

from .plot import plot_pareto
from .train import DemoSettings, TransferRun, repeat_seeds

if TYPE_CHECKING:
    from .catalog import Method

__all__ = [
    "DemoResult",
    "MethodResult",
    "format_kind_table",
    "format_table",
    "geometry",
    "machine_info",
    "results_markdown",
    "write_results",
]

_KEYS = ("dE", "dL", "dR")


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------
def _nan_to_none(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def _mean(values: Sequence[float | None]) -> float | None:
    finite = [float(v) for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else None


def _compare_run(run: TransferRun, reference: TransferRun, names: Sequence[str], k: int) -> list[Any]:
    """``compare`` of one run's ``ΔW`` (zero where it has none) against the reference run's, per weight."""
    # float32 as trained: in float64 the float32 rounding noise would count as rank, and
    # k_eff = min(k, rank P, rank Q) would always be k
    Q = [reference.deltas[n].float().numpy() for n in names]
    P = [run.deltas[n].float().numpy() if n in run.deltas else np.zeros_like(q) for n, q in zip(names, Q, strict=True)]
    return compare(P, Q, names=list(names), k=k)


def geometry(runs: Sequence[TransferRun], references: Sequence[TransferRun], names: Sequence[str],
             k: int = 5) -> dict[str, Any]:
    """dE/dL/dR of each run's ``ΔW`` against the reference run's of the same repeat (dense
    fine-tuning), per weight, then averaged over weights and repeats (overall and per kind).

    A method without ``ΔW`` (head only) has ``ΔW = 0``: ``dE = 1`` and no dL/dR.
    """
    records: list[dict[str, Any]] = []
    by_kind: dict[str, dict[str, list[float]]] = {}
    for repeat, (run, reference) in enumerate(zip(runs, references, strict=True)):
        found = _compare_run(run, reference, names, k)
        for kind, summary in aggregate_by_kind(found).items():
            entry = by_kind.setdefault(kind, {key: [] for key in _KEYS})
            for key in entry:
                entry[key].append(getattr(summary, key))
        records += [{"repeat": repeat, **{key: _nan_to_none(v) for key, v in r.as_dict().items()}} for r in found]
    return {
        "reference": "dense",
        "k": k,
        "mean": {key: _mean([r[key] for r in records]) for key in _KEYS},
        "by_kind": {kind: {key: _mean(values) for key, values in entry.items()} for kind, entry in by_kind.items()},
        "per_weight": records,
    }


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
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

    @classmethod
    def from_runs(cls, method: Method, steps: int, runs: list[TransferRun]) -> MethodResult:
        """The result of ``method`` from its repeats (``steps`` transfer steps each)."""
        config = None if method.config is None else method.config.to_dict()
        return cls(method.name, method.family, method.description, config, method.lr, steps,
                   runs[0].adapter_params, runs[0].head_params, [r.accuracy for r in runs],
                   [r.train_time_s for r in runs], runs=runs)

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


@dataclass
class DemoResult:
    """Everything a run produced (``results.json`` is :meth:`as_dict`).

    ``pending`` names the selected methods not finished yet (a run in progress or stopped) and
    ``resumed`` those loaded from an earlier session of the run (``tensoradapt demo --out``).
    """

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
    pending: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Whether every selected method has finished (the files written while a run goes on are not)."""
        return not self.pending

    def seeds(self) -> dict[str, Any]:
        """Every seed of the run (see :func:`tensoradapt.demo.train.repeat_seeds`)."""
        return {"data_split": self.seed, "pretrain": self.seed,
                "transfer_repeats": [repeat_seeds(self.seed, r) for r in range(self.settings.repeats)]}

    def as_dict(self) -> dict[str, Any]:
        """The contents of ``results.json``."""
        return {
            "tool": "tensoradapt demo",
            "library_version": ta.__version__,
            "date": self.date,
            "machine": self.machine,
            "seed": self.seed,
            "seeds": self.seeds(),
            "quick": self.quick,
            "settings": asdict(self.settings),
            "source_task": "digits 0-4", "target_task": "digits 5-9 (relabelled 0-4)",
            "targets": "query and value of every block",
            "trainable_params_note": "adapter_params excludes the new 5-class head (head_params), "
                                     "which is trained in every method",
            "pretrain": {"test_accuracy": self.source_accuracy, "time_s": self.pretrain_time_s},
            "total_time_s": self.total_time_s,
            "complete": self.complete,
            "pending_methods": list(self.pending),
            "resumed_methods": list(self.resumed),
            "methods": [r.as_dict() for r in self.results],
        }


def machine_info() -> dict[str, Any]:
    """Platform, CPU count, torch threads and library versions (the ``machine`` of ``results.json``)."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "buffer_generator": ta.buffers.GENERATOR_ID,  # the Fastfood / Shuffle maps (docs/math.md D6)
    }


# ---------------------------------------------------------------------------------------------
# tables and files
# ---------------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _table_row(r: MethodResult, repeats: int) -> str:
    g = (r.geometry or {}).get("mean", {})
    acc = f"{100 * r.accuracy:.1f}" + (f" ± {100 * r.accuracy_std:.1f}" if repeats > 1 else "")
    return (f"| {r.name} | {r.description} | {r.adapter_params:,} | {acc} | "
            f"{r.train_time_s:.1f} | {_fmt(g.get('dE'))} | {_fmt(g.get('dL'))} | {_fmt(g.get('dR'))} |")


def format_table(result: DemoResult) -> str:
    """The results as a Markdown table (``dE/dL/dR``: means over the q/v weights vs dense)."""
    repeats = result.settings.repeats
    accuracy = "accuracy (%)" if repeats == 1 else f"accuracy (%, mean ± sd of {repeats})"
    lines = [
        f"| method | config | trainable params | {accuracy} | time (s) | dE | dL | dR |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [_table_row(r, repeats) for r in result.results]
    return "\n".join(lines)


def format_kind_table(result: DemoResult) -> str:
    """dE/dL/dR per weight kind (``query``, ``value``) as a Markdown table (needs ``dense``)."""
    kinds = list(dict.fromkeys(kind for r in result.results for kind in ((r.geometry or {}).get("by_kind") or {})))
    if not kinds:
        return ""
    header = " | ".join(f"{key} {kind}" for kind in kinds for key in _KEYS)
    lines = [f"| method | {header} |", "|---|" + "---:|" * (3 * len(kinds))]
    for r in result.results:
        by_kind = (r.geometry or {}).get("by_kind") or {}
        cells = " | ".join(_fmt((by_kind.get(kind) or {}).get(key)) for kind in kinds for key in _KEYS)
        lines.append(f"| {r.name} | {cells} |")
    return "\n".join(lines)


def _summary_lines(result: DemoResult) -> list[str]:
    """The bullet list at the top of ``results.md``: date, machine, settings, what is counted."""
    head = result.results[0].head_params if result.results else 0
    m, settings = result.machine, result.settings
    repeats = settings.repeats
    return [
        f"- date: {result.date}; machine: {m.get('platform')}, {m.get('processor')}, {m.get('cpu_count')} CPUs, "
        f"torch {m.get('torch')} with {m.get('torch_threads')} thread{'' if m.get('torch_threads') == 1 else 's'}",
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
    ]


def _status_lines(result: DemoResult) -> list[str]:
    """Whether the run is complete, and which methods came from an earlier session."""
    lines = []
    if result.pending:
        done = len(result.results)
        lines.append(f"- **incomplete**: {done} of {done + len(result.pending)} methods finished (still to run: "
                     f"{', '.join(result.pending)}); rerunning the same command with `--out` on this folder "
                     "resumes the run")
    if result.resumed:
        lines.append(f"- resumed: {', '.join(result.resumed)} finished in an earlier session of this run")
    return lines


def results_markdown(result: DemoResult) -> str:
    """The contents of ``results.md``."""
    lines = [f"# tensoradapt demo: digits 0-4 → 5-9 transfer{' (--quick)' if result.quick else ''}", ""]
    lines += [*_summary_lines(result), *_status_lines(result), "", format_table(result), ""]
    kinds = format_kind_table(result)
    if kinds:
        lines += ["Per weight kind:", "", kinds, ""]
    return "\n".join(lines)


def write_results(result: DemoResult, out: str | os.PathLike[str], *, plot: bool = True) -> Path:
    """Write ``results.json``, ``results.md`` and (``plot``) ``pareto.png`` into ``out``.

    Each file is replaced atomically (a temporary file, then ``os.replace``): a run stopped while
    writing leaves the previous version of each file, never a torn one.
    """
    from tensoradapt.torch.files.write import write_bytes

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(out / "results.json",
                (json.dumps(result.as_dict(), indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    write_bytes(out / "results.md", results_markdown(result).encode("utf-8"))
    if plot:
        plot_pareto(result, out / "pareto.png")
    result.out = out
    return out
