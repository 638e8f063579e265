"""The study's two tasks: data, the cached pretrained models, and one run of one point.

* ``vit`` — classification at the paper's L = 24: a 12-block ViT pretrained on Fashion-MNIST,
  transferred to MNIST with adapters on its 24 ``query``/``value`` weights
  (:mod:`tensoradapt.demo.study.vit`); score: accuracy per test image.
* ``flow`` — generation across a domain shift: a class-conditional flow-matching model pretrained
  on MNIST (8×8), adapted to scikit-learn's digits on its four inner convolutions, class embedding
  frozen (:mod:`tensoradapt.demo.study.flow`); score: the target-domain judge's verdict per
  generated sample, and a Fréchet distance in the judge's features.

A task's pretrained model (and the flow task's judge) is cached in ``OUT/cache/`` under a
fingerprint of its settings and seed; :meth:`Task.run` returns one run's scores.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from .points import Point
from .store import fingerprint

__all__ = ["TASKS", "FlowTask", "Task", "ViTTask", "make_task"]

TASKS: dict[str, str] = {
    "vit": "12-block ViT, Fashion-MNIST → MNIST-5k, 24 q/v weights adapted, test accuracy",
    "flow": "flow-matching Conv2d generator, MNIST-5k → sklearn digits (8×8), judge accuracy of samples",
}
Log = Callable[[str], None]


class Task:
    """A task: its settings, data cuts, cached pretrained model(s), and how to run one point."""

    name: str = ""
    L: int = 0  # adapted weights
    weight_shape: tuple[int, int] = (0, 0)  # (out, in) of each adapted weight, as the adapter sees it

    def __init__(self, settings: Any, seed: int, out: Path, emit: Log) -> None:
        self.settings, self.seed, self.out, self.emit = settings, seed, Path(out), emit
        self.info: dict[str, Any] = {}

    def payload(self) -> dict[str, Any]:
        """Everything the pretrained model and every run depend on besides the point."""
        return {"task": self.name, "settings": asdict(self.settings), "seed": self.seed}

    def cache_path(self) -> Path:
        return self.out / "cache" / f"{self.name}-{fingerprint(self.payload())}.pt"

    def _cached(self) -> dict[str, Any] | None:
        import torch

        path = self.cache_path()
        if not path.is_file():
            return None
        self.info = json.loads(path.with_suffix(".json").read_text())
        self.emit(f"[{self.name}] pretrained model loaded from {path}")
        return torch.load(path, weights_only=True)

    def _save(self, state: dict[str, Any]) -> None:
        import torch

        path = self.cache_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
        path.with_suffix(".json").write_text(json.dumps(self.info))

    def run(self, point: Point, lr: float, seed: int) -> dict[str, Any]:
        raise NotImplementedError


class ViTTask(Task):
    name = "vit"
    L = 24

    def __init__(self, settings: Any, seed: int, out: Path, emit: Log) -> None:
        from . import vit

        super().__init__(settings, seed, out, emit)
        self.L = 2 * settings.depth  # q and v of every block (24 at the default depth 12; 4 with --quick)
        self.weight_shape = (settings.width, settings.width)
        self.cuts = vit.target_cuts(settings, seed)
        self.backbone = self._backbone()

    def _backbone(self) -> Any:
        from . import vit

        state = self._cached()
        if state is not None:
            model = vit.build_backbone(self.settings)
            model.load_state_dict(state)
            return model.eval()
        s = self.settings
        self.emit(f"[vit] pretraining the {s.depth}-block ViT on Fashion-MNIST ({s.pretrain_steps} steps) ...")
        t0 = time.perf_counter()
        model, acc = vit.pretrain_vit(vit.source_data(s), s, self.seed)
        self.info = {"source_test_accuracy": acc, "pretrain_time_s": time.perf_counter() - t0,
                     **{f"target_{k}": int(v[0].shape[0]) for k, v in self.cuts.items()}}
        self._save(model.state_dict())
        self.emit(f"[vit]   Fashion-MNIST test accuracy {100 * acc:.1f}% ({self.info['pretrain_time_s']:.0f} s)")
        return model

    def run(self, point: Point, lr: float, seed: int) -> dict[str, Any]:
        from . import vit

        r = vit.adapt_vit(self.backbone, point.config, lr, self.cuts, self.settings, seed)
        return {"val": float(r.val_items.mean()), "test": float(r.test_items.mean()),
                "test_items": r.test_items.tolist(), "fid": None, "params": r.adapter_params,
                "head_params": r.head_params, "train_time_s": r.train_time_s}


class FlowTask(Task):
    name = "flow"
    L = 4

    def __init__(self, settings: Any, seed: int, out: Path, emit: Log) -> None:
        from . import flow

        super().__init__(settings, seed, out, emit)
        self.weight_shape = (settings.channels, 9 * settings.channels)  # a 3x3 Conv2d as (out, in * 3 * 3)
        self.cuts = flow.target_cuts(settings, seed)
        self.backbone, self.judge = self._models()

    def _models(self) -> tuple[Any, Any]:
        import torch

        from . import flow

        state = self._cached()
        backbone, judge = flow.FlowNet(flow.CLASSES, self.settings.channels), flow.DigitCNN()
        if state is not None:
            backbone.load_state_dict(state["backbone"])
            judge.load_state_dict(state["judge"])
            for p in judge.parameters():
                p.requires_grad_(False)
            return backbone.eval(), judge.eval()
        s, cuts, t0 = self.settings, self.cuts, time.perf_counter()
        self.emit("[flow] training the judge on the target domain (sklearn digits) ...")
        judge = flow.train_judge(torch.cat([cuts["train"][0], cuts["validation"][0]]),
                                 torch.cat([cuts["train"][1], cuts["validation"][1]]), s, self.seed)
        x, y = cuts["test"]
        judge_acc = float((judge(x).argmax(dim=1) == y).float().mean())
        self.emit(f"[flow]   judge test accuracy {100 * judge_acc:.1f}%; pretraining the generator on MNIST-5k "
                  f"({s.pretrain_steps} steps) ...")
        backbone = flow.pretrain_flow(*flow.source_data(s), s, self.seed).eval()
        self.info = {"judge_test_accuracy": judge_acc, "pretrain_time_s": time.perf_counter() - t0,
                     **{f"target_{k}": int(v[0].shape[0]) for k, v in cuts.items()}}
        self._save({"backbone": backbone.state_dict(), "judge": judge.state_dict()})
        self.emit(f"[flow]   done ({self.info['pretrain_time_s']:.0f} s)")
        return backbone, judge

    def run(self, point: Point, lr: float, seed: int) -> dict[str, Any]:
        from . import flow

        r = flow.adapt_flow(self.backbone, point.config, lr, self.cuts, self.judge, self.settings, seed)
        return {"val": float(r.val_items.mean()), "test": float(r.test_items.mean()),
                "test_items": r.test_items.tolist(), "fid": r.fid, "params": r.adapter_params,
                "head_params": r.head_params, "train_time_s": r.train_time_s}


def task_settings(name: str, overrides: dict[str, Any] | None = None) -> Any:
    """The settings dataclass of task ``name`` with ``overrides`` applied."""
    if name == "vit":
        from .vit import ViTSettings as cls
    elif name == "flow":
        from .flow import FlowSettings as cls
    else:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return replace(cls(), **(overrides or {}))


def make_task(name: str, overrides: dict[str, Any] | None, seed: int, out: Path, emit: Log) -> Task:
    """Task ``name`` (data loaded, pretrained model trained or loaded from the cache)."""
    cls = {"vit": ViTTask, "flow": FlowTask}[name]
    return cls(task_settings(name, overrides), seed, out, emit)
