"""The study's sweeps: every configuration (a :class:`Point`) of every family, per task.

Families (keys of :data:`FAMILIES`; ``lora`` and ``baseline`` are always run, they are the references):

* ``baseline`` — head only (new head / class embedding only) and dense ΔW;
* ``lora`` — LoRA r = 1, 2, 4, 8, 16 (weight-wise, no reshape): the reference curve;
* ``2d-reshape`` — SuperLoRA 2-D, ``ΔW_all`` cut into G groups, each reshaped to a square-ish
  matrix (``fold="cubic"``), G = 1, 2, 3, ranks 2, 4, 8;
* ``2d-stack`` — the same groups **without reshape**: each group's weights stacked side by side as
  one ``(o, Σn)`` matrix (``layout="stack"``);
* ``lorta-tucker`` / ``lorta-cp`` — LoRTA M = 3, 4, 5 with a Tucker or CP core (G = 1);
* ``lonkr`` — LoNKr K = 2, 3, 4 splits with a dense first split of side f = 2, 4, 8 (r = 4, G = 1);
* ``lokr`` — LyCORIS LoKr (per weight), the baseline LoNKr generalises;
* ``proj-dense`` / ``proj-2d`` — the fixed projection on dense ΔW and on 2-D reshape G = 1 (r = 4):
  shuffle (ρ = 1) and Fastfood ρ = 1, 0.5, 0.25, 0.1, 0.01 (ρ = 1 without projection is the
  ``dense`` baseline and the ``2d-reshape`` point G = 1, r = 4).

On the digits ViT (q/v of 3 blocks, six 64×64 weights) weight-wise grouping with reshape *is* LoRA
(a 64×64 weight reshapes to itself) and layer-wise grouping is G = 3 (three chunks of 8,192 = the
q/v pair of each block), so neither is run twice.  The flow task (four 32×288 convolutions) runs
a shorter list (:func:`points`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tensoradapt import SuperLoRAConfig, presets

__all__ = ["FAMILIES", "GAIN_FAMILIES", "LR_REPRESENTATIVE", "Point", "points"]

FAMILIES: dict[str, str] = {
    "baseline": "head only / dense",
    "lora": "LoRA (weight-wise, no reshape)",
    "2d-reshape": "SuperLoRA 2-D, G groups with reshape",
    "2d-stack": "SuperLoRA 2-D, G groups without reshape (stacked)",
    "lorta-tucker": "LoRTA, Tucker core, M = 3/4/5",
    "lorta-cp": "LoRTA, CP core, M = 3/4/5",
    "lonkr": "LoNKr, K = 2/3/4 splits, dense factor f = 2/4/8",
    "lokr": "LoKr (LyCORIS), per weight",
    "proj-dense": "projection on dense ΔW: shuffle, Fastfood ρ",
    "proj-2d": "projection on 2-D reshape G = 1 (r = 4): shuffle, Fastfood ρ",
}
"""Family key → description, in report order."""

GAIN_FAMILIES: tuple[str, ...] = ("2d-reshape", "2d-stack", "lorta-tucker", "lorta-cp", "lonkr", "lokr",
                                  "proj-dense", "proj-2d")
"""Families whose gain over LoRA is measured (plus ``superlora-all``, their SuperLoRA union)."""

SUPERLORA_UNION: tuple[str, ...] = ("2d-reshape", "2d-stack", "lorta-tucker", "lorta-cp", "lonkr", "proj-dense",
                                    "proj-2d")

RHOS: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1, 0.01)


@dataclass(frozen=True)
class Point:
    """One configuration: task, family, unique name, adapter config (``None``: head only), the
    learning-rate group it takes its rate from, and its swept settings (for the tables)."""

    task: str
    family: str
    name: str
    config: SuperLoRAConfig | None
    lr_group: str
    settings: dict[str, Any] = field(default_factory=dict)


def _two_d(rank: int, groups: int, reshape: bool) -> SuperLoRAConfig:
    if reshape:
        return SuperLoRAConfig(order=2, rank=rank, core="identity", grouping=groups, fold="cubic")
    return SuperLoRAConfig(order=2, rank=rank, core="identity", grouping=groups, layout="stack")


#: The point of each learning-rate group whose rate is chosen on the validation split.
LR_REPRESENTATIVE: dict[str, str] = {
    "dense": "dense", "lora": "lora-r4", "2d-reshape": "2d-reshape-G1-r4", "2d-stack": "2d-stack-G1-r4",
    "lorta-tucker": "lorta-tucker-M3-r4", "lorta-cp": "lorta-cp-M3-r4", "lonkr": "lonkr-K3-f4",
    "lokr": "lokr-r4", "proj-dense": "proj-dense-ff0.1", "proj-2d": "proj-2d-ff0.1",
}


def _baselines(task: str) -> list[Point]:
    return [Point(task, "baseline", "head-only", None, "none", {}),
            Point(task, "baseline", "dense", presets.dense(), "dense", {})]


def _lora(task: str, ranks: tuple[int, ...]) -> list[Point]:
    return [Point(task, "lora", f"lora-r{r}", presets.lora(r), "lora", {"rank": r}) for r in ranks]


def _grouped(task: str, groups: tuple[int, ...], ranks: tuple[int, ...]) -> list[Point]:
    out = []
    for reshape, fam in ((True, "2d-reshape"), (False, "2d-stack")):
        for g in groups:
            for r in ranks:
                out.append(Point(task, fam, f"{fam}-G{g}-r{r}", _two_d(r, g, reshape), fam,
                                 {"G": g, "rank": r, "reshape": reshape}))
    return out


def _lorta(task: str, spec: dict[str, tuple[tuple[int, int], ...]]) -> list[Point]:
    return [Point(task, f"lorta-{core}", f"lorta-{core}-M{m}-r{r}", presets.lorta(m, r, core=core), f"lorta-{core}",
                  {"M": m, "rank": r, "core": core})
            for core, pairs in spec.items() for m, r in pairs]


def _lonkr(task: str, pairs: tuple[tuple[int, int], ...], rank: int = 4) -> list[Point]:
    return [Point(task, "lonkr", f"lonkr-K{k}-f{f}", presets.lonkr(k, rank, f), "lonkr", {"K": k, "f": f, "rank": rank})
            for k, f in pairs]


def _lokr(task: str, pairs: tuple[tuple[int, int], ...]) -> list[Point]:
    return [Point(task, "lokr", f"lokr-r{r}" + ("" if f == -1 else f"-f{f}"), presets.lokr(r, f), "lokr",
                  {"rank": r, "factor": f}) for r, f in pairs]


def _projections(task: str, rhos: tuple[float, ...]) -> list[Point]:
    out = []
    for fam, base in (("proj-dense", presets.dense()), ("proj-2d", _two_d(4, 1, True))):
        out.append(Point(task, fam, f"{fam}-shuffle", presets.with_projection(base, "shuffle"), fam,
                         {"projection": "shuffle", "rho": 1.0}))
        for rho in rhos:
            out.append(Point(task, fam, f"{fam}-ff{rho:g}", presets.with_projection(base, "fastfood", rho), fam,
                             {"projection": "fastfood", "rho": rho}))
    return out


def points(task: str, quick: bool = False) -> list[Point]:
    """Every point of ``task`` (``"digits"`` or ``"flow"``), in report order."""
    if task not in ("digits", "flow"):
        raise ValueError(f"unknown task {task!r}")
    if quick:
        return (_baselines(task) + _lora(task, (1, 2, 4)) + _grouped(task, (1, 3), (4,))
                + _lorta(task, {"tucker": ((3, 4),), "cp": ((3, 4),)}) + _lonkr(task, ((3, 4),))
                + [Point(task, "lokr", "lokr-r4", presets.lokr(4), "lokr", {"rank": 4, "factor": -1})]
                + [p for p in _projections(task, (0.1,)) if "shuffle" not in p.name])
    if task == "digits":
        return (_baselines(task) + _lora(task, (1, 2, 4, 8, 16)) + _grouped(task, (1, 2, 3), (2, 4, 8))
                + _lorta(task, {"tucker": ((3, 2), (3, 4), (4, 2), (4, 4), (5, 2), (5, 4)),
                                "cp": ((3, 4), (3, 8), (4, 4), (4, 8), (5, 4), (5, 8))})
                + _lonkr(task, tuple((k, f) for k in (2, 3, 4) for f in (2, 4, 8)))
                + _lokr(task, ((1, 4), (4, -1), (8, 4))) + _projections(task, RHOS))
    # the flow task: four 32x288 convolutions; a shorter list (each run samples and scores)
    return (_baselines(task) + _lora(task, (1, 2, 4, 8)) + _grouped(task, (1, 2), (4, 8))
            + _lorta(task, {"tucker": ((3, 4), (4, 4)), "cp": ((3, 8), (4, 8))})
            + _lonkr(task, ((2, 4), (3, 4))) + _lokr(task, ((4, -1),))
            + [p for p in _projections(task, (0.5, 0.1, 0.01)) if p.family == "proj-2d"])
