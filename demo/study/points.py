"""The study's sweeps: every configuration (a :class:`Point`) of every family, per task.

The sweep follows the paper's (families: keys of :data:`FAMILIES`; ``baseline`` and ``lora`` are
always run, they are the references):

* ``baseline`` — no adapter (the new head alone on ``vit``; the frozen pretrained model on
  ``flow``) and dense ΔW;
* ``lora`` — LoRA r = 1, 2, 4, 8, 16 weight-wise: the reference curve;
* ``2d-reshape`` — SuperLoRA 2-D: ``ΔW_all`` cut into G groups, each reshaped square
  (``fold="cubic"``): G = 1, r ∈ {1, 2, 4}; G ∈ {4, 12} (``flow``: 4), r ∈ {1, 2};
* ``2d-stack`` — the same groups without reshape (``layout="stack"``): r = 1, G ∈ {1, 4, 12}
  (``flow``: G = 1, r ∈ {1, 2});
* ``lorta-tucker`` / ``lorta-cp`` — LoRTA M = 3, 4 (G = 1), down to ~50 parameters;
* ``lonkr`` — LoNKr K = 2, 3, 4 splits with a dense first split f = 2 or 8 (r = 4, G = 1);
* ``lokr`` — LyCORIS LoKr per weight, the baseline LoNKr generalises;
* ``proj-2d`` — the Fastfood projection, ρ ∈ {1, 0.5, 0.25, 0.1, 0.01} (``flow``: {1, 0.5, 0.1,
  0.01}), on 2-D reshape G = 1, r = 4 (ρ = 1: the full-size map).  The projection on dense ΔW
  is not swept: its Fastfood transform of all N entries made a run 4× slower than LoRA's.

Every rank-based configuration uses LoRA's α/r scaling with α = :data:`ALPHA` (scale 1 at r = 4),
so a rank change does not rescale the update; each point also gets its own learning rate
(:mod:`tensoradapt.demo.study.run`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tensoradapt import SuperLoRAConfig, presets

__all__ = ["ALPHA", "FAMILIES", "GAIN_FAMILIES", "LR_START", "SUPERLORA_UNION", "TASK_POINTS", "Point", "points"]

ALPHA = 4.0
"""LoRA's α: the scale of every rank-``r`` configuration is ``α / r``."""

FAMILIES: dict[str, str] = {
    "baseline": "no adapter (head only / frozen) and dense ΔW",
    "lora": "LoRA r = 1..16 (weight-wise, no reshape)",
    "2d-reshape": "SuperLoRA 2-D, G groups with reshape",
    "2d-stack": "SuperLoRA 2-D, G groups without reshape (stacked)",
    "lorta-tucker": "LoRTA, Tucker core, M = 3/4",
    "lorta-cp": "LoRTA, CP core, M = 3/4",
    "lonkr": "LoNKr, K = 2/3/4 splits, dense factor f = 2/8",
    "lokr": "LoKr (LyCORIS), per weight",
    "proj-2d": "Fastfood projection on 2-D reshape G = 1 (r = 4), ρ = 1..0.01",
}
"""Family key → description, in report order."""

GAIN_FAMILIES: tuple[str, ...] = tuple(f for f in FAMILIES if f not in ("baseline", "lora"))
"""Families whose gain over LoRA is measured."""

SUPERLORA_UNION: tuple[str, ...] = ("2d-reshape", "2d-stack", "lorta-tucker", "lorta-cp", "lonkr", "proj-2d")
"""The SuperLoRA families whose union envelope is ``superlora-all`` (LoKr is LyCORIS's, not SuperLoRA's)."""

LR_START: dict[str, float] = {"baseline": 1e-3, "lora": 1e-2, "2d-reshape": 1e-2, "2d-stack": 1e-2,
                              "lorta-tucker": 1e-2, "lorta-cp": 1e-2, "lonkr": 1e-2, "lokr": 1e-2,
                              "proj-2d": 1e-2}
"""The learning rate the search starts from at a family's first point (later points start at the
previous point's pick)."""

RHOS: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1, 0.01)
"""Fastfood ratios (ρ = 1: the full-size Fastfood map, as many parameters as the base)."""


@dataclass(frozen=True)
class Point:
    """One configuration: task, family, unique name, adapter config (``None``: no adapter), the
    number of groups ``groups`` (grouped 2-D families, else ``None``) and its swept settings."""

    task: str
    family: str
    name: str
    config: SuperLoRAConfig | None
    groups: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def _scaled(config: SuperLoRAConfig) -> SuperLoRAConfig:
    return config.replace(alpha=ALPHA)


def _two_d(rank: int, groups: int, reshape: bool) -> SuperLoRAConfig:
    layout = {"fold": "cubic"} if reshape else {"layout": "stack"}
    return _scaled(SuperLoRAConfig(order=2, rank=rank, core="identity", grouping=groups, **layout))


def _baselines(task: str) -> list[Point]:
    return [Point(task, "baseline", "head-only" if task == "vit" else "frozen", None),
            Point(task, "baseline", "dense", presets.dense())]


def _lora(task: str, ranks: tuple[int, ...]) -> list[Point]:
    return [Point(task, "lora", f"lora-r{r}", presets.lora(r, alpha=ALPHA), None, {"rank": r}) for r in ranks]


def _grouped(task: str, family: str, groups: tuple[int, ...], ranks: tuple[int, ...]) -> list[Point]:
    reshape = family == "2d-reshape"
    return [Point(task, family, f"{family}-G{g}-r{r}", _two_d(r, g, reshape), g, {"G": g, "rank": r})
            for g in groups for r in ranks]


def _lorta(task: str, core: str, pairs: tuple[tuple[int, int], ...]) -> list[Point]:
    return [Point(task, f"lorta-{core}", f"lorta-{core}-M{m}-r{r}", _scaled(presets.lorta(m, r, core=core)), None,
                  {"M": m, "rank": r}) for m, r in pairs]


def _lonkr(task: str, pairs: tuple[tuple[int, int], ...], rank: int = 4) -> list[Point]:
    return [Point(task, "lonkr", f"lonkr-K{k}-f{f}", _scaled(presets.lonkr(k, rank, f)), None,
                  {"K": k, "f": f, "rank": rank}) for k, f in pairs]


def _lokr(task: str, pairs: tuple[tuple[int, int], ...]) -> list[Point]:
    return [Point(task, "lokr", f"lokr-r{r}-f{f}", presets.lokr(r, f, alpha=ALPHA), None, {"rank": r, "factor": f})
            for r, f in pairs]


def _projections(task: str, family: str, rhos: tuple[float, ...]) -> list[Point]:
    base = _two_d(4, 1, True)
    return [Point(task, family, f"{family}-ff{rho:g}", presets.with_projection(base, "fastfood", rho), None,
                  {"projection": "fastfood", "rho": rho}) for rho in rhos]


def _vit() -> list[Point]:
    t = "vit"
    return (_baselines(t) + _lora(t, (1, 2, 4, 8, 16))
            + _grouped(t, "2d-reshape", (1,), (1, 2, 4)) + _grouped(t, "2d-reshape", (4, 12), (1, 2))
            + _grouped(t, "2d-stack", (1, 4, 12), (1,))
            + _lorta(t, "tucker", ((3, 2), (4, 1), (4, 2))) + _lorta(t, "cp", ((4, 4), (4, 8), (4, 16)))
            + _lonkr(t, ((2, 8), (3, 2), (4, 8))) + _lokr(t, ((1, 4), (4, -1)))
            + _projections(t, "proj-2d", RHOS))


def _flow() -> list[Point]:
    t = "flow"
    return (_baselines(t) + _lora(t, (1, 2, 4, 8))
            + _grouped(t, "2d-reshape", (1,), (1, 2, 4)) + _grouped(t, "2d-reshape", (4,), (1, 2))
            + _grouped(t, "2d-stack", (1,), (1, 2))
            + _lorta(t, "tucker", ((3, 2), (4, 2))) + _lorta(t, "cp", ((4, 8),))
            + _lonkr(t, ((3, 2), (4, 8))) + _lokr(t, ((1, 4),))
            + _projections(t, "proj-2d", (1.0, 0.5, 0.1, 0.01)))


def _quick(task: str) -> list[Point]:
    return (_baselines(task) + _lora(task, (1, 2, 4)) + _grouped(task, "2d-reshape", (1, 2), (1,))
            + _grouped(task, "2d-stack", (1,), (1,)) + _lorta(task, "tucker", ((3, 2),))
            + _lorta(task, "cp", ((3, 4),)) + _lonkr(task, ((3, 2),)) + _lokr(task, ((1, 4),))
            + _projections(task, "proj-2d", (1.0, 0.1)))


TASK_POINTS = {"vit": _vit, "flow": _flow}


def points(task: str, quick: bool = False) -> list[Point]:
    """Every point of ``task`` (``"vit"`` or ``"flow"``), in report order (``quick``: a short list)."""
    if task not in TASK_POINTS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASK_POINTS)}")
    return _quick(task) if quick else TASK_POINTS[task]()
