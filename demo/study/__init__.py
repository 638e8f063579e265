r"""``tensoradapt study``: the SuperLoRA paper's claims tested at its scale of grouping, on real data.

Two tasks (:mod:`~tensoradapt.demo.study.tasks`): ``vit``, a 12-block ViT pretrained on
Fashion-MNIST and transferred to MNIST with adapters on its L = 24 query/value weights
(:mod:`~tensoradapt.demo.study.vit`), and ``flow``, a flow-matching generator pretrained on MNIST
and adapted to scikit-learn's digits (:mod:`~tensoradapt.demo.study.flow`).  The sweeps are in
:mod:`~tensoradapt.demo.study.points`, the data in :mod:`~tensoradapt.demo.study.datasets`, the run
store in :mod:`~tensoradapt.demo.study.store`, the runner (per-point learning-rate search, 5
paired seeds, the tasks side by side) in :mod:`~tensoradapt.demo.study.run`, the measurement in
:mod:`~tensoradapt.demo.study.gain` and :mod:`~tensoradapt.demo.study.claims`, the report in
:mod:`~tensoradapt.demo.study.report` and the command line in :mod:`~tensoradapt.demo.study.cli`
(docs/study.md, docs/study-method.md).  This module only re-exports.
"""

from __future__ import annotations

from .cli import main
from .points import FAMILIES, Point, points
from .report import results_markdown, write_report
from .run import LR_GRID, StudySettings, run_study
from .tasks import TASKS

__all__ = ["FAMILIES", "LR_GRID", "TASKS", "Point", "StudySettings", "main", "points", "results_markdown",
           "run_study", "write_report"]
