"""The study's report: ``results.json``, ``results.md`` (ending in the paper's claims) and Pareto plots.

``results.md`` renders, per task, the levels, every family's gain over LoRA at each level with its
95 % paired-bootstrap interval, the identical-curve null band and the √(L/G) ceiling (from
:func:`~tensoradapt.demo.study.gain.summarise_task`), each point's learning-rate search and mean
scores, and closes with :func:`~tensoradapt.demo.study.claims.claims_markdown`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["gain_table", "results_markdown", "write_report"]


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def _gain_cell(g: dict[str, Any]) -> str:
    if g["gain"] is None:
        return "not reached" if g["lora_params"] is not None else "—"
    text = f"{'≥ ' if g['bounded'] else ''}{g['gain']:.2f}×"
    if g["low"] is not None:
        text += f" [{g['low']:.2f}, {g['high']:.2f}]"
    null = g.get("null") or {}
    if null.get("p95") is not None:
        text += f" (null {null['median']:.2f}/{null['p95']:.2f})"
    return text


def gain_table(summary: dict[str, Any]) -> list[str]:
    """Markdown rows: one per family (and union; not the baselines), one column per level, plus the ceiling."""
    levels = summary.get("levels", [])
    if not levels or not summary.get("families"):
        return ["(no LoRA curve: no gains)"]
    head = ("| family | min params | " + " | ".join(f"gain at {lv['key']} ({100 * lv['value']:.1f}%)"
                                                      for lv in levels) + " | ceiling √(L/G) |")
    lines = [head, "|---|---:|" + "---:|" * len(levels) + "---:|"]
    for name, fam in summary["families"].items():
        if name == "baseline":  # head only / dense: references, not a family with a curve
            continue
        cells = " | ".join(_gain_cell(g) for g in fam["gains"])
        lines.append(f"| {name} | {fam['min_params']:,} | {cells} | {_x(fam.get('ceiling'))} |")
    return lines


def _points_table(summary: dict[str, Any], section: dict[str, Any]) -> list[str]:
    lrs = section.get("learning_rates", {})
    fid = any(p.get("fid") is not None for p in summary["points"])
    lines = ["| family | point | params | G | lr (validation per lr tried) | val % | test % [95%] |"
             + (" FID |" if fid else ""), "|---|---|---:|---:|---|---:|---:|" + ("---:|" if fid else "")]
    for p in summary["points"]:
        search = lrs.get(p["point"])
        if search is None:
            lr = "—"
        else:
            tried = ", ".join(f"{k}: {100 * v:.1f}" for k, v in search["validation"].items())
            lr = f"**{search['lr']:g}**{' (EDGE)' if search['edge'] else ''} ({tried})"
        ci = "" if p["test_low"] is None else f" [{100 * p['test_low']:.1f}, {100 * p['test_high']:.1f}]"
        row = (f"| {p['family']} | {p['point']} | {p['params']:,} | {p['groups'] or ''} | {lr} | "
               f"{100 * p['val']:.1f} | {100 * p['test']:.1f}{ci} |")
        lines.append(row + (f" {p['fid']:.1f} |" if fid and p.get("fid") is not None else (" |" if fid else "")))
    return lines


def _task_md(name: str, summary: dict[str, Any], section: dict[str, Any]) -> list[str]:
    info = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in section["info"].items())
    r1 = summary["lora_r1"]
    edges = [p for p, s in section["learning_rates"].items() if s["edge"]]
    lines = [f"## {name}: {section['description']}", "",
             f"L = {section['L']} adapted weights; {len(summary['seeds'])} seeds; "
             f"{summary['test_items']} test items; pretraining: {info}.", "",
             f"Task time {section.get('task_wall_s', 0):.0f} s wall, {section['cpu_s']:.0f} s CPU in the runs "
             f"({section['runs_done']} runs trained now, the rest loaded).", "",
             f"LoRA r = 1 ({r1['point']}, {r1['params']:,} params): test {100 * r1['test']:.1f}%.  "
             "Learning rates at the grid's edge: " + (", ".join(edges) if edges else "none") + ".", "",
             "Gain = LoRA's parameters / the family's at equal test score (envelopes chosen on validation), "
             "[95% paired bootstrap over seeds and test items], (null: median/95th percentile of the gain "
             "of a family on LoRA's own curve with this noise, the bias band); '≥': reached at the family's "
             "smallest point.", "", *gain_table(summary), ""]
    return [*lines, "Points (mean over seeds):", "", *_points_table(summary, section), ""]


def results_markdown(result: dict[str, Any]) -> str:
    """``results.md``: the run, per task the gains and every point, and the paper's claims."""
    from .claims import claims, claims_markdown

    v = result["versions"]
    lines = [f"# tensoradapt study{' (quick)' if result['quick'] else ''}", "",
             f"{result['date']}, seed {result['seed']}, {result['threads']} torch thread(s) per task"
             f"{', tasks in parallel processes' if result['parallel'] else ''}, "
             f"{result['study_settings']['seeds']} seeds per point; tensoradapt {v['tensoradapt']}, "
             f"torch {v['torch']}, numpy {v['numpy']}, Python {v['python']}, {v['platform']}, "
             f"{v['cpu_count']} CPUs; {result['elapsed_s']:.0f} s wall.", ""]
    for name, summary in result["tasks"].items():
        lines += _task_md(name, summary, result["runs"][name])
    lines += ["## The paper's claims", "", claims_markdown(claims(result)), ""]
    return "\n".join(lines)


def _draw(ax: Any, summary: dict[str, Any], family: str) -> None:
    from matplotlib.ticker import NullFormatter

    for fam, color, marker in (("lora", "tab:blue", "o"), (family, "tab:red", "s")):
        pts = [p for p in summary["points"] if p["family"] == fam and p["params"] > 0]
        if pts:
            ax.plot([p["params"] for p in pts], [100 * p["test"] for p in pts], marker, color=color,
                    markersize=4, label=fam)
        env = (summary["lora"] if fam == "lora" else summary["families"].get(fam, {})).get("envelope")
        if env and env["params"]:
            ax.step(env["params"], [100 * s for s in env["test"]], where="post", color=color, alpha=0.5)
    for p in summary["points"]:
        if p["family"] == "baseline":
            ax.axhline(100 * p["test"], color="0.5", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_title(family, fontsize=8)
    ax.tick_params(labelsize=6)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=5, loc="lower right")


def _plot(summary: dict[str, Any], families: Sequence[str], path: Path) -> None:
    from matplotlib.figure import Figure

    cols = min(4, len(families))
    rows = -(-len(families) // cols)
    fig = Figure(figsize=(3.3 * cols, 2.6 * rows), dpi=80)
    for i, family in enumerate(families):
        _draw(fig.add_subplot(rows, cols, i + 1), summary, family)
    fig.supxlabel("trainable adapter parameters (log)", fontsize=8)
    fig.supylabel("test score (%)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def write_report(result: dict[str, Any], out: str | os.PathLike[str], plot: bool = True) -> list[Path]:
    """Write ``results.json``, ``results.md`` and (with ``plot``) ``pareto-TASK.png`` (one panel per
    family against LoRA: mean test scores and the validation-chosen envelopes)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.md"]
    written[0].write_text(json.dumps(result, indent=1, default=str))
    written[1].write_text(results_markdown(result))
    if plot:
        for task, summary in result["tasks"].items():
            families = [f for f in dict.fromkeys(p["family"] for p in summary["points"])
                        if f not in ("baseline", "lora")]
            if families:
                path = out / f"pareto-{task}.png"
                _plot(summary, families, path)
                written.append(path)
    return written
