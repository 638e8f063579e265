"""What a demo run in an output folder has finished, kept as it finishes, so that a stopped run resumes.

Everything lives under ``OUT/demo-progress/`` (:data:`PROGRESS_DIR`), each file written atomically
(:func:`tensoradapt.torch.files.write.write_bytes`: a temporary file, then ``os.replace``):

* ``run.json`` — the settings every result depends on (:func:`run_key`: the :class:`DemoSettings`,
  the seed, the torch thread count, the torch and tensoradapt versions, the buffer generator),
  the pretraining's accuracy and time, and the seconds spent so far;
* ``backbone.safetensors`` — the pretrained TinyViT;
* ``method-NAME.json`` and ``method-NAME.safetensors`` — one finished method: its configuration
  and learning rate, every run's accuracy, time and parameter counts, and every run's ``ΔW``
  (the geometry is recomputed from them at the end).  The JSON file is written last: a method
  counts as finished only once it exists.

A rerun with the same folder and settings loads what is there and runs only the rest; a method
whose configuration or learning rate changed since is run again.  Other settings are refused
(:class:`ResumeError`) unless the caller starts over (``fresh``).  Nothing is unpickled: tensors
are read with safetensors, JSON with the standard library.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import tensoradapt as ta
from tensoradapt.torch.files.write import write_bytes

from .model import TinyViT
from .report import MethodResult
from .train import DemoSettings, TransferRun, build_model

if TYPE_CHECKING:
    from .catalog import Method

__all__ = ["OUTPUT_FILES", "PROGRESS_DIR", "Progress", "ResumeError", "run_key"]

#: The folder under the output folder that holds a run's progress.
PROGRESS_DIR = "demo-progress"
#: The files a run writes into its output folder (removed with the progress when starting over).
OUTPUT_FILES = ("results.json", "results.md", "pareto.png")
_FORMAT = 1
_TOOL = "tensoradapt demo"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class ResumeError(ValueError):
    """The output folder holds a run that cannot be resumed with these settings (the message
    says what differs and what to do)."""


def run_key(settings: DemoSettings, seed: int, threads: int) -> dict[str, Any]:
    """Everything besides the method that a demo result depends on.

    Parameters
    ----------
    settings : DemoSettings
    seed : int
    threads : int
        The torch thread count of the run (results are deterministic for a seed and a thread count).

    Returns
    -------
    dict
        JSON-serialisable; two runs with equal keys give equal results for every method.
    """
    return {"settings": asdict(settings), "seed": seed, "threads": threads, "torch": torch.__version__,
            "tensoradapt": ta.__version__, "buffer_generator": ta.buffers.GENERATOR_ID}


def _differences(saved: Any, current: Any, where: str = "") -> list[str]:
    """``"name: A in the folder, B now"`` for every entry where the two keys differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        found = []
        for name in list(dict.fromkeys([*saved, *current])):
            path = f"{where}.{name}" if where else str(name)
            if name not in saved or name not in current:
                found.append(f"{path}: {'missing' if name not in saved else saved[name]!r} in the folder, "
                             f"{'missing' if name not in current else current[name]!r} now")
            else:
                found += _differences(saved[name], current[name], path)
        return found
    return [] if saved == current else [f"{where}: {saved!r} in the folder, {current!r} now"]


def _method_identity(method: Method) -> dict[str, Any]:
    return {"name": method.name, "config": None if method.config is None else method.config.to_dict(),
            "lr": method.lr}


@dataclass
class Progress:
    """The progress of one run in ``out`` (see the module documentation).

    Open it with :meth:`open`; :meth:`pretrained` / :meth:`save_pretrained` and :meth:`finished` /
    :meth:`save_method` read and write what is done.
    """

    folder: Path
    key: dict[str, Any]
    spent_s: float = 0.0
    pretrain: dict[str, float] | None = None

    @classmethod
    def open(cls, out: str | Path, key: dict[str, Any], *, fresh: bool = False) -> Progress:
        """The progress in ``out`` for a run with ``key`` (:func:`run_key`).

        Parameters
        ----------
        out : path
            The output folder (created if needed).
        key : dict
            The run's :func:`run_key`.
        fresh : bool
            Discard any progress in ``out`` (and the files of that run, :data:`OUTPUT_FILES`) and
            start over.

        Raises
        ------
        ResumeError
            ``out`` holds a run with another key (unless ``fresh``), or a progress folder that is
            not a demo's or cannot be read.
        """
        folder = Path(out) / PROGRESS_DIR
        state = folder / "run.json"
        if folder.exists() and not folder.is_dir():
            raise ResumeError(f"{str(folder)!r} is a file, not the demo's progress folder: remove it or choose "
                              "another --out")
        if folder.is_dir() and fresh:
            if any(folder.iterdir()) and not state.is_file():
                raise ResumeError(f"{str(folder)!r} is not a demo progress folder (no run.json): not deleting it; "
                                  "choose another --out")
            shutil.rmtree(folder)
            for name in OUTPUT_FILES:  # the discarded run's files (this folder held a demo run)
                (Path(out) / name).unlink(missing_ok=True)
        if not fresh and state.is_file():
            saved = cls._read_state(state)
            if saved.get("key") != key:
                changes = _differences(saved.get("key"), key)
                shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
                raise ResumeError(f"--out {str(Path(out))!r} holds a demo run with other settings ({shown}): rerun "
                                  "with its settings to resume it, pass --fresh to discard it, or choose another "
                                  "--out")
            pretrain = saved.get("pretrain")
            return cls(folder, key, float(saved.get("spent_s", 0.0)), pretrain if isinstance(pretrain, dict) else None)
        folder.mkdir(parents=True, exist_ok=True)
        progress = cls(folder, key)
        progress._write_state()
        return progress

    @staticmethod
    def _read_state(path: Path) -> dict[str, Any]:
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise ResumeError(f"{str(path)!r} cannot be read ({error}); pass --fresh to start over") from None
        if not isinstance(state, dict) or state.get("tool") != _TOOL or state.get("format") != _FORMAT:
            raise ResumeError(f"{str(path)!r} is not a progress file of this version of {_TOOL}; pass --fresh to "
                              "start over")
        return state

    def _write_state(self) -> None:
        state = {"tool": _TOOL, "format": _FORMAT, "key": self.key, "pretrain": self.pretrain,
                 "spent_s": self.spent_s}
        write_bytes(self.folder / "run.json", (json.dumps(state, indent=1) + "\n").encode("utf-8"))

    def set_spent(self, seconds: float) -> None:
        """Record the run's time so far, earlier sessions included (its ``total_time_s``)."""
        self.spent_s = float(seconds)
        self._write_state()

    # -------------------------------------------------------------------------------- pretraining
    def pretrained(self, settings: DemoSettings) -> tuple[TinyViT, float, float] | None:
        """The stored backbone, its source accuracy and pretraining time, or ``None``."""
        path = self.folder / "backbone.safetensors"
        if self.pretrain is None or not path.is_file():
            return None
        from safetensors.torch import load

        model = build_model(settings)
        model.load_state_dict(load(path.read_bytes()), strict=True)
        model.eval()
        return model, float(self.pretrain["accuracy"]), float(self.pretrain["time_s"])

    def save_pretrained(self, model: TinyViT, accuracy: float, time_s: float) -> None:
        """Store the pretrained backbone (before anything that needs it)."""
        from safetensors.torch import save

        state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
        write_bytes(self.folder / "backbone.safetensors", save(state))
        self.pretrain = {"accuracy": accuracy, "time_s": time_s}
        self._write_state()

    # -------------------------------------------------------------------------------- methods
    def _paths(self, name: str) -> tuple[Path, Path]:
        if not _SAFE_NAME.fullmatch(name):
            raise ValueError(f"method name {name!r} cannot name a file (letters, digits, '.', '_', '-' only)")
        return self.folder / f"method-{name}.json", self.folder / f"method-{name}.safetensors"

    def finished(self, method: Method, steps: int) -> MethodResult | None:
        """``method``'s result if an earlier session finished it with the same configuration,
        learning rate and steps, else ``None``."""
        record_path, tensor_path = self._paths(method.name)
        if not record_path.is_file():
            return None
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            if record.get("method") != _method_identity(method) or record.get("steps") != steps:
                return None
            deltas: dict[str, torch.Tensor] = {}
            if any(run["deltas"] for run in record["runs"]):
                from safetensors.torch import load

                deltas = load(tensor_path.read_bytes())
            runs = [TransferRun(float(run["accuracy"]), float(run["train_time_s"]), int(run["adapter_params"]),
                                int(run["head_params"]), {n: deltas[f"{r}/{n}"] for n in run["deltas"]})
                    for r, run in enumerate(record["runs"])]
        except (OSError, ValueError, KeyError, TypeError):  # a damaged record: run the method again
            return None
        return MethodResult.from_runs(method, steps, runs)

    def save_method(self, method: Method, result: MethodResult) -> None:
        """Store a finished method (its tensors first, then the record that marks it finished)."""
        from safetensors.torch import save

        record_path, tensor_path = self._paths(method.name)
        tensors = {f"{r}/{n}": d.detach().contiguous() for r, run in enumerate(result.runs)
                   for n, d in run.deltas.items()}
        if tensors:
            write_bytes(tensor_path, save(tensors))
        runs = [{"accuracy": run.accuracy, "train_time_s": run.train_time_s, "adapter_params": run.adapter_params,
                 "head_params": run.head_params, "deltas": list(run.deltas)} for run in result.runs]
        record = {"method": _method_identity(method), "steps": result.steps, "runs": runs}
        write_bytes(record_path, (json.dumps(record, indent=1) + "\n").encode("utf-8"))
