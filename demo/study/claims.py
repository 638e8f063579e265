"""The SuperLoRA paper's claims, judged on the study's measurements.

:func:`claims` reads the per-task sections of :func:`~tensoradapt.demo.study.gain.summarise_task`
and returns one row per claim and task: the claim, the paper's number, ours, a verdict in
:data:`VERDICTS` and why.  The rules (docs/study-method.md, "The claims"):

* **at least x-fold** (grouped reshape 3–4×, "up to 10×"): *holds* when the gain is at least x and
  above the 95th percentile of the identical-curve null (the bias band); *refuted* when the
  95 % interval lies below x and x is measurable: the gain is not capped by the sweep (a ``≥``
  gain, or ``cap`` = LoRA's parameters at the level over the curve's smallest count below x) nor
  by the task's equal-rank ceiling ``sqrt(L / G)``; otherwise *not testable*, with the reason;
* **fewer groups better**: the gain of the fewest over the most groups of the grouped reshape
  (the same bootstrap, so paired): *holds* when its interval lies above 1 and no step to more
  groups gains; *refuted* when the interval lies below 1;
* **ρ 1 → 0.1 loses < 1 %**: the paired test-score difference of Fastfood ρ = 1 and ρ = 0.1,
  in percentage points: *holds* when the interval lies below 1, *refuted* when above;
* **LoNKr down to ~150 parameters beats LoKr**: the LoNKr point nearest 150 parameters (within
  75–300) against LoKr's smallest point, paired: *holds* when the interval of the difference lies
  above 0, *refuted* when below.

An interval that straddles the claim's threshold is *not testable* at this noise, said so in the
reason.  :func:`contrast_pairs` names the point pairs the last two claims compare;
``summarise_task`` measures them.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .gain import gain_text

__all__ = ["LONKR_TARGET", "VERDICTS", "claims", "claims_markdown", "contrast_pairs", "rho_of"]

VERDICTS: tuple[str, ...] = ("holds", "refuted", "not testable")

RESHAPE_FAMILY = "2d-reshape"
LONKR_FAMILY = "lonkr"
LOKR_FAMILY = "lokr"
NOT_SUPERLORA: frozenset[str] = frozenset({"lora", "lokr", "baseline"})
"""Families that are no SuperLoRA configuration (for "up to 10×" when a task has no union)."""

LONKR_TARGET: tuple[float, float, float] = (150.0, 75.0, 300.0)
"""The paper's "~150 parameters": the target and the range a LoNKr point must lie in."""

RHO_FROM, RHO_TO = 1.0, 0.1
_FF = re.compile(r"(?:^|-)ff([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)$")

_KEY_ORDER = ("lora_r1", "50%", "25%", "75%")  # the level a claim is read at, first defined wins


def rho_of(point: Mapping[str, Any]) -> float | None:
    """The Fastfood ρ of a point summary: ``settings["rho"]`` when its settings name a Fastfood
    projection, else the label's ``-ff<ρ>`` suffix (``proj-2d-ff0.1``); ``None`` otherwise."""
    s = point.get("settings")
    if isinstance(s, Mapping) and "rho" in s:
        if s.get("projection", "fastfood") != "fastfood":
            return None
        return float(s["rho"])
    m = _FF.search(str(point.get("point", "")))
    return float(m.group(1)) if m else None


def contrast_pairs(points: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """The point pairs whose paired test-score difference (``a - b``) the claims need.

    * ``rho:<family>`` — Fastfood ρ = 1 against ρ = 0.1 in each family that has both (the loss);
    * ``lonkr-vs-lokr`` — the LoNKr point nearest 150 parameters (in log parameters) against
      LoKr's smallest point.

    ``points`` are the per-point summaries of ``summarise_task`` (``family``, ``point``,
    ``params``, optionally ``settings``).
    """
    out: list[dict[str, str]] = []
    by_family: dict[str, dict[float, str]] = {}
    for p in points:
        rho = rho_of(p)
        if rho is not None:
            by_family.setdefault(str(p["family"]), {}).setdefault(rho, str(p["point"]))
    for fam, rhos in by_family.items():
        if RHO_FROM in rhos and RHO_TO in rhos:
            out.append({"name": f"rho:{fam}", "a": rhos[RHO_FROM], "b": rhos[RHO_TO]})
    lonkr = [p for p in points if p["family"] == LONKR_FAMILY and p["params"] > 0]
    lokr = [p for p in points if p["family"] == LOKR_FAMILY and p["params"] > 0]
    if lonkr and lokr:
        near = min(lonkr, key=lambda p: (abs(math.log(p["params"] / LONKR_TARGET[0])), p["params"]))
        small = min(lokr, key=lambda p: p["params"])
        out.append({"name": "lonkr-vs-lokr", "a": str(near["point"]), "b": str(small["point"])})
    return out


# --- formatting -------------------------------------------------------------------------------
def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def _pick(gains: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    by_key = {g["key"]: g for g in gains}
    for k in _KEY_ORDER:
        if k in by_key and by_key[k]["gain"] is not None:
            return by_key[k]
    return by_key.get("lora_r1")


# --- verdicts ---------------------------------------------------------------------------------
def _at_least(g: Mapping[str, Any] | None, x: float) -> tuple[str, str]:
    """The verdict on "the gain is at least x" for one gain dict."""
    if g is None:
        return "not testable", "no gain measured"
    if g["gain"] is None:
        if g["lora_params"] is not None and g["key"] == "lora_r1":
            return "refuted", "the family never reaches LoRA r = 1's score"
        return "not testable", "the gain is undefined at this level"
    if g["gain"] >= x:
        null = g.get("null") or {}
        if g.get("beyond_null") is not True:
            return "not testable", (f"{g['gain']:.2f}× is not above the bias band of identical curves "
                                    f"(null p95 {_x(null.get('p95'))})")
        if g["low"] is None or g["low"] < x:
            return "not testable", (f"inconclusive: {g['gain']:.2f}× ≥ {x:g}× but the 95 % interval "
                                    f"[{_x(g['low'])}, {_x(g['high'])}] reaches below {x:g}×")
        return "holds", (f"the 95 % interval [{g['low']:.2f}, {g['high']:.2f}] lies at or above {x:g}× and the "
                         f"gain above the null band")
    if g["bounded"] or (g["cap"] is not None and g["cap"] < x):
        return "not testable", f"the sweep's smallest point caps the measurable gain at {_x(g['cap'])}"
    if g.get("ceiling") is not None and g["ceiling"] < x:
        return "not testable", (f"the task's equal-rank ceiling √(L/G) = {g['ceiling']:.2f} is below {x:g}× "
                                f"(the paper's L = 24 gives 4.90)")
    if g["high"] is not None and g["high"] < x:
        return "refuted", f"the 95 % interval [{g['low']:.2f}, {g['high']:.2f}] lies below {x:g}×"
    if g["high"] is None:
        return "not testable", "no interval (too few resamples define the gain)"
    return "not testable", f"inconclusive: the 95 % interval [{g['low']:.2f}, {g['high']:.2f}] reaches {x:g}×"


def _interval_vs(diff: float, low: float | None, high: float | None, x: float, scale: float,
                 below_holds: bool) -> tuple[str, str]:
    """Verdict on "the difference is below x" (``below_holds``) or "above x", from its interval."""
    if low is None or high is None:
        return "not testable", "no bootstrap interval (resamples = 0)"
    lo, hi = low * scale, high * scale
    if hi < x:
        return ("holds" if below_holds else "refuted"), f"the 95 % interval [{lo:.2f}, {hi:.2f}] lies below {x:g}"
    if lo > x:
        return ("refuted" if below_holds else "holds"), f"the 95 % interval [{lo:.2f}, {hi:.2f}] lies above {x:g}"
    return "not testable", f"inconclusive at this noise: the 95 % interval [{lo:.2f}, {hi:.2f}] contains {x:g}"


def _row(claim: str, task: str, paper: str, ours: str, verdict: str, why: str) -> dict[str, str]:
    return {"claim": claim, "task": task, "paper": paper, "ours": ours, "verdict": verdict, "why": why}


_C_RESHAPE = "grouped 2-D reshape needs 3–4× fewer parameters than LoRA"
_C_GROUPS = "fewer groups are better"
_C_RHO = "projection ρ 1 → 0.1 loses < 1 % accuracy"
_C_LONKR = "LoNKr down to ~150 parameters beats LoKr"
_C_TEN = "up to 10× fewer parameters than LoRA"


def _reshape(task: str, sec: Mapping[str, Any]) -> dict[str, str] | None:
    fam = sec["families"].get(RESHAPE_FAMILY)
    if fam is None:
        return None
    g = _pick(fam["gains"])
    verdict, why = _at_least(g, 3.0)
    ours = f"{gain_text(g)} at {g['key']}" if g else "—"
    return _row(_C_RESHAPE, task, "3–4× (at LoRA r = 1's accuracy, ViT-Base q/v, L = 24)", ours, verdict, why)


def _groups(task: str, sec: Mapping[str, Any]) -> dict[str, str] | None:
    rows = sec.get("group_order", {}).get(RESHAPE_FAMILY)
    if not rows:
        return None
    gs = sorted({r["small"] for r in rows} | {r["large"] for r in rows})
    by = {(r["small"], r["large"], r["key"]): r for r in rows}
    key = next((k for k in _KEY_ORDER if (by.get((gs[0], gs[-1], k)) or {}).get("ratio") is not None), None)
    paper = "G = 1 best, gain falls with G"
    if key is None:
        return _row(_C_GROUPS, task, paper, "—", "not testable",
                    f"the gain of G = {gs[0]} over G = {gs[-1]} is undefined at every level")
    ext = by[(gs[0], gs[-1], key)]
    steps = [by[(a, b, key)] for a, b in itertools.pairwise(gs)]
    ours = (f"G = {gs[0]} over G = {gs[-1]} at {key}: {_x(ext['ratio'])}"
            + (f" [{ext['low']:.2f}, {ext['high']:.2f}]" if ext["low"] is not None else "")
            + "; steps " + ", ".join(f"G {s['small']}→{s['large']}: {_x(s['ratio'])}" for s in steps))
    if ext["low"] is None:
        return _row(_C_GROUPS, task, paper, ours, "not testable", "no interval for the ratio")
    if ext["low"] > 1 and all(s["ratio"] is None or s["ratio"] >= 1 for s in steps):
        return _row(_C_GROUPS, task, paper, ours, "holds", "fewer groups need fewer parameters at every step, "
                    "the 95 % interval of the extreme ratio lies above 1")
    if ext["high"] < 1:
        return _row(_C_GROUPS, task, paper, ours, "refuted", "the 95 % interval lies below 1: more groups are better")
    why = ("a step to more groups gains, though the extreme ratio is above 1" if ext["low"] > 1
           else f"inconclusive: the 95 % interval [{ext['low']:.2f}, {ext['high']:.2f}] contains 1")
    return _row(_C_GROUPS, task, paper, ours, "not testable", why)


def _rho(task: str, sec: Mapping[str, Any]) -> list[dict[str, str]]:
    out = []
    for c in sec.get("contrasts", []):
        if not c["name"].startswith("rho:"):
            continue
        fam = c["name"][4:]
        ours = f"{fam}: {100 * c['diff']:.2f} points"
        if c["low"] is not None:
            ours += f" [{100 * c['low']:.2f}, {100 * c['high']:.2f}]"
        verdict, why = _interval_vs(c["diff"], c["low"], c["high"], 1.0, 100.0, below_holds=True)
        out.append(_row(_C_RHO, task, "< 1 point", ours + f" ({c['a']} − {c['b']})", verdict, why))
    return out


def _lonkr(task: str, sec: Mapping[str, Any]) -> dict[str, str] | None:
    c = next((c for c in sec.get("contrasts", []) if c["name"] == "lonkr-vs-lokr"), None)
    if c is None:
        return None
    params = {p["point"]: p["params"] for p in sec["points"]}
    pa, pb = params[c["a"]], params[c["b"]]
    ours = f"{c['a']} ({pa} params) − {c['b']} ({pb} params): {100 * c['diff']:+.2f} points"
    if c["low"] is not None:
        ours += f" [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}]"
    paper = "LoNKr at ~150 params scores above LoKr"
    _, lo, hi = LONKR_TARGET
    if not lo <= pa <= hi:
        return _row(_C_LONKR, task, paper, ours, "not testable",
                    f"the LoNKr point nearest 150 params has {pa} (outside {lo:g}–{hi:g})")
    verdict, why = _interval_vs(c["diff"], c["low"], c["high"], 0.0, 100.0, below_holds=False)
    return _row(_C_LONKR, task, paper, ours, verdict, why)


def _ten(task: str, sec: Mapping[str, Any]) -> dict[str, str]:
    fams = sec["families"]
    names = [n for n, f in fams.items() if f["kind"] == "union"] or [
        n for n, f in fams.items() if f["kind"] == "family" and n not in NOT_SUPERLORA]
    paper = "up to 10×"
    cands = [(n, g) for n in names for g in fams[n]["gains"] if g["gain"] is not None and g["defined"] >= 0.5]
    if not cands:
        return _row(_C_TEN, task, paper, "—", "not testable", "no SuperLoRA gain is defined")
    name, best = max(cands, key=lambda c: c[1]["gain"])
    ours = f"best: {name} at {best['key']}: {gain_text(best)}"
    verdicts = [(n, g, _at_least(g, 10.0)) for n, g in cands]
    held = [v for v in verdicts if v[2][0] == "holds"]
    if held:
        n, g, (_, why) = max(held, key=lambda v: v[1]["gain"])
        return _row(_C_TEN, task, paper, f"{n} at {g['key']}: {gain_text(g)}", "holds", why)
    if all(v[2][0] == "refuted" for v in verdicts):
        return _row(_C_TEN, task, paper, ours, "refuted", "every 95 % interval lies below 10× and no gain is capped "
                    "by the sweep")
    open_ = [(n, g, v[1]) for n, g, v in verdicts if v[0] == "not testable"]
    caps = [g["cap"] for _, g, why in open_ if why.startswith("the sweep's smallest point") and g["cap"] is not None]
    if caps:
        return _row(_C_TEN, task, paper, ours, "not testable",
                    f"the sweep's smallest point caps the measurable gain at {max(caps):.2f}×")
    n, g, why = max(open_, key=lambda o: o[1]["gain"])  # quote the undecided gain the reason is about
    if g is not best:
        ours = f"{ours}; undecided: {n} at {g['key']}: {gain_text(g)}"
    return _row(_C_TEN, task, paper, ours, "not testable", why)


def claims(result: Mapping[str, Any]) -> list[dict[str, str]]:
    """One row per claim and task: ``claim, task, paper, ours, verdict, why``.

    ``result`` is ``{"tasks": {name: summarise_task(...) output}, ...}``.  A claim about a family
    that no task swept gets one row, *not testable*.
    """
    tasks = result.get("tasks") if isinstance(result, Mapping) else None
    if not isinstance(tasks, Mapping):
        raise ValueError("result must be a dict with a 'tasks' dict of summarise_task sections")
    groups: dict[str, list[dict[str, str]]] = {c: [] for c in (_C_RESHAPE, _C_GROUPS, _C_RHO, _C_LONKR, _C_TEN)}
    for task, sec in tasks.items():
        if not isinstance(sec, Mapping) or "families" not in sec:
            raise ValueError(f"task {task!r}: not a summarise_task section (no 'families')")
        for row in (_reshape(task, sec), _groups(task, sec), *_rho(task, sec), _lonkr(task, sec), _ten(task, sec)):
            if row is not None:
                groups[row["claim"]].append(row)
    missing = {_C_RESHAPE: f"no task swept {RESHAPE_FAMILY}", _C_GROUPS: f"no task swept {RESHAPE_FAMILY} at two G",
               _C_RHO: f"no task swept Fastfood ρ = {RHO_FROM:g} and {RHO_TO:g}",
               _C_LONKR: f"no task swept {LONKR_FAMILY} and {LOKR_FAMILY}", _C_TEN: "no task"}
    rows: list[dict[str, str]] = []
    for claim, found in groups.items():
        rows += found or [_row(claim, "—", "", "—", "not testable", missing[claim])]
    return rows


def claims_markdown(rows: Sequence[Mapping[str, str]]) -> str:
    """The claims as a Markdown table (``|`` in a cell is escaped)."""
    cols = ("claim", "task", "paper", "ours", "verdict", "why")

    def cell(v: object) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
