"""Text tables of the analysis results (the maths lives in :mod:`.shapes` and :mod:`.geometry`).

* :func:`format_count_table` — rows of :func:`~tensoradapt.analysis.count_table`;
* :func:`format_budget_sweep` — entries of :func:`~tensoradapt.analysis.budget_sweep`;
* :func:`format_similarity_table` — records of :func:`~tensoradapt.analysis.compare` and their
  means per kind (the table ``tensoradapt compare`` prints).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ..superlora.budget import BudgetEntry
    from .counts import CountRow
    from .geometry import KindSummary, SimilarityRecord

__all__ = ["format_budget_sweep", "format_count_table", "format_similarity_table", "shapes_summary"]


def _shapes(shapes: Sequence[Any]) -> list[tuple[int, ...]]:
    """Plain shape tuples of shapes or :class:`~tensoradapt.analysis.Target` s (anything with ``.shape``)."""
    return [tuple(int(d) for d in getattr(s, "shape", s)) for s in shapes]


def shapes_summary(shapes: Sequence[Any]) -> str:
    """One line: the number of targets, their distinct shapes and ``N`` (entries of all targets).

    Examples
    --------
    >>> shapes_summary([(4, 4), (4, 4), (8, 2)])
    '3 targets (2×4x4, 1×8x2), N = 48 entries (dense fine-tuning)'
    """
    plain = _shapes(shapes)
    total = sum(math.prod(s) for s in plain)
    counts: dict[tuple[int, ...], int] = {}
    for s in plain:
        counts[s] = counts.get(s, 0) + 1
    listed = ", ".join(f"{c}×{'x'.join(map(str, s))}" for s, c in list(counts.items())[:6])
    more = f", … ({len(counts)} distinct shapes)" if len(counts) > 6 else ""
    return f"{len(plain)} targets ({listed}{more}), N = {total:,} entries (dense fine-tuning)"


def format_count_table(shapes: Sequence[Any], rows: Sequence[CountRow]) -> str:
    """A text table of :func:`~tensoradapt.analysis.count_table` rows, headed by a summary of the shapes.

    Examples
    --------
    >>> from tensoradapt.analysis import count_table
    >>> shapes = [(4, 4)] * 2
    >>> print(format_count_table(shapes, count_table(shapes, ["lora"], ranks=[1])))
    2 targets (2×4x4), N = 32 entries (dense fine-tuning)
    configuration       params  % of N  groups
    lora(rank=1)            16  50.000       2
    """
    width = max([len("configuration"), *(len(r.label) for r in rows)])
    lines = [shapes_summary(shapes), f"{'configuration':<{width}} {'params':>12} {'% of N':>7} {'groups':>7}"]
    for r in rows:
        if r.params is None:
            lines.append(f"{r.label:<{width}} {'n/a':>12} {'':>7} {'':>7}  ({r.note})")
        else:
            line = f"{r.label:<{width}} {r.params:>12,} {100 * r.fraction:>7.3f} {r.groups:>7}"
            lines.append(f"{line}  ({r.note})" if r.note else line)
    return "\n".join(lines)


def format_budget_sweep(shapes: Sequence[Any], entries: Sequence[BudgetEntry], max_params: int) -> str:
    """A text table of budget-sweep entries (ascending parameter count).

    Examples
    --------
    >>> from tensoradapt.analysis import budget_sweep
    >>> shapes = [(768, 768)] * 24
    >>> print(format_budget_sweep(shapes, budget_sweep(shapes, 40_000, ["lora"]), 40_000))
    24 targets (24×768x768), N = 14,155,776 entries (dense fine-tuning)
    budget: at most 40,000 parameters; 1 configurations
    family         params  % of N  configuration
    lora           36,864   0.260  rank=1 M=2 K=1 G=weight core=identity
    """
    total = sum(math.prod(s) for s in _shapes(shapes))
    lines = [shapes_summary(shapes), f"budget: at most {max_params:,} parameters; {len(entries)} configurations",
             f"{'family':<8} {'params':>12} {'% of N':>7}  configuration"]
    for e in entries:
        cfg = e.config
        desc = (f"rank={cfg.rank} M={cfg.order} K={cfg.splits} G={cfg.grouping} core={cfg.core}"
                + (f" f={cfg.dense_side}" if cfg.dense_side is not None else "")
                + (f" {cfg.projection} rho={cfg.ratio}" if cfg.projection != "none" else ""))
        lines.append(f"{e.family:<8} {e.params:>12,} {100 * e.params / total:>7.3f}  {desc}")
    return "\n".join(lines)


def format_similarity_table(records: Sequence[SimilarityRecord], summary: Mapping[str, KindSummary] | None = None,
                            k: int = 5, paired: bool = False) -> str:
    """A text table of dE/dL/dR records (one line per weight), then the means per kind.

    ``summary`` defaults to :func:`~tensoradapt.analysis.aggregate_by_kind` of the records; ``k``
    and ``paired`` are the settings of :func:`~tensoradapt.analysis.compare` (for the heading).

    Examples
    --------
    >>> import numpy as np
    >>> from tensoradapt.analysis import compare
    >>> print(format_similarity_table(compare([np.eye(3)], [np.eye(3)], names=["l0.query"], k=2), k=2))
    dE = |P-Q|_F/|Q|_F, dL/dR = top-2 subspace overlap of left/right singular vectors (P = first file, Q = second)
    weight   kind         shape        dE     |P-Q|_F      dL      dR  k
    l0.query query          3x3         0           0  1.0000  1.0000  2
    mean per kind:
      query n=1    dE=0  dL=1.0000  dR=1.0000
    """
    if summary is None:
        from .geometry import aggregate_by_kind

        summary = aggregate_by_kind(records)
    width = max([len("weight"), *(len(r.name) for r in records)])
    kind_w = max([len("kind"), *(len(r.kind) for r in records)])
    measure = "paired cosine" if paired else "subspace overlap"
    lines = [f"dE = |P-Q|_F/|Q|_F, dL/dR = top-{k} {measure} of left/right singular vectors "
             f"(P = first file, Q = second)",
             f"{'weight':<{width}} {'kind':<{kind_w}} {'shape':>12} {'dE':>9} {'|P-Q|_F':>11} {'dL':>7} "
             f"{'dR':>7} {'k':>2}"]
    for r in records:
        shape = "x".join(map(str, r.shape))
        lines.append(f"{r.name:<{width}} {r.kind:<{kind_w}} {shape:>12} {r.dE:>9.4g} {r.dE_abs:>11.4g} "
                     f"{r.dL:>7.4f} {r.dR:>7.4f} {r.k_eff:>2}")
    lines.append("mean per kind:")
    for s in summary.values():
        lines.append(f"  {s.kind:<{kind_w}} n={s.count:<4} dE={s.dE:.4g}  dL={s.dL:.4f}  dR={s.dR:.4f}")
    return "\n".join(lines)
