"""Plots of the analysis results (matplotlib, imported only when a plot is drawn).

:func:`plot_similarity` draws what ``tensoradapt compare`` writes: dE, dL and dR of
:func:`~tensoradapt.analysis.compare` records against the layer index, one line per weight kind.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .geometry import SimilarityRecord

__all__ = ["plot_similarity"]


def plot_similarity(records: Sequence[SimilarityRecord], path: str | os.PathLike[str], title: str = "",
                    k: int = 5) -> None:
    """Write dE, dL and dR against the layer index (order within each kind) to an image at ``path``.

    Three panels, one line per weight kind; drawn with matplotlib's Agg canvas (no display
    needed).  ``k`` is the number of singular vectors of the records (for the panel titles).

    Raises
    ------
    ImportError
        Without matplotlib.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    kinds = list(dict.fromkeys(r.kind for r in records))
    for ax, field, label in zip(fig.subplots(1, 3), ("dE", "dL", "dR"),
                                ("dE = ‖P−Q‖/‖Q‖  (→ 0)", f"dL, left top-{k}  (→ 1)", f"dR, right top-{k}  (→ 1)"),
                                strict=True):
        for kind in kinds:
            values = [getattr(r, field) for r in records if r.kind == kind]
            ax.plot(range(len(values)), values, marker="o", markersize=3, label=kind)
        ax.set_title(label)
        ax.set_xlabel("layer (order within kind)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if field != "dE":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    fig.savefig(path, dpi=110)
