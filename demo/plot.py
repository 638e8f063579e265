"""The Pareto plot: test accuracy against trainable adapter parameters (``pareto.png``).

matplotlib is imported only when a plot is drawn, and no global matplotlib state is used
(a :class:`matplotlib.figure.Figure` with its own Agg canvas).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .report import DemoResult, MethodResult

__all__ = ["pareto_front", "place_labels", "plot_pareto"]

#: Offsets (points) and alignments tried in turn for a marker's label.
_LABEL_OFFSETS = [(6, 4, "left", "bottom"), (6, -4, "left", "top"), (-6, 4, "right", "bottom"),
                  (-6, -4, "right", "top"), (0, 9, "center", "bottom"), (0, -9, "center", "top"),
                  (8, 14, "left", "bottom"), (8, -14, "left", "top")]


def pareto_front(points: Sequence[MethodResult]) -> list[MethodResult]:
    """The results with a better accuracy than every result with at most as many parameters,
    by increasing parameter count."""
    front: list[MethodResult] = []
    for r in sorted(points, key=lambda r: (r.adapter_params, -r.accuracy)):
        if not front or r.accuracy > front[-1].accuracy:
            front.append(r)
    return front


def _draw_methods(ax: Any, points: Sequence[MethodResult]) -> None:
    """One marker per method with sd error bars; marker and colour by family."""
    from matplotlib import colormaps

    families = list(dict.fromkeys(r.family for r in points))
    markers = dict(zip(families, "osD^vP*Xh<>", strict=False))
    palette = colormaps["tab10"]
    colors = {f: palette(i % 10) for i, f in enumerate(families)}
    for r in points:
        ax.errorbar(r.adapter_params, 100 * r.accuracy, yerr=100 * r.accuracy_std if len(r.accuracies) > 1 else None,
                    marker=markers[r.family], markersize=7, color=colors[r.family], linestyle="none", capsize=3,
                    label=r.family, zorder=3)


def _draw_front_and_baselines(ax: Any, result: DemoResult, points: Sequence[MethodResult]) -> None:
    """The Pareto front as a step line, and each method without parameters as a dashed line."""
    front = pareto_front(points)
    if front:
        xs = [r.adapter_params for r in front]
        ys = [100 * r.accuracy for r in front]
        ax.step(xs, ys, where="post", color="0.35", linewidth=1.2, zorder=2, label="Pareto front")
    for r in result.results:
        if r.adapter_params == 0:
            ax.axhline(100 * r.accuracy, color="0.5", linestyle="--", linewidth=1, label=f"{r.name} (0 params)")


def _decorate(ax: Any, result: DemoResult, points: Sequence[MethodResult]) -> None:
    """Legend (one entry per label), log x-axis with margins, axis labels, title and grid."""
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(list(unique.values()), list(unique.keys()), fontsize=8, loc="lower right")
    if points:
        ax.set_xscale("log")
        low = min(r.adapter_params for r in points)
        high = max(r.adapter_params for r in points)
        ax.set_xlim(low / 1.6, high * 2.2)
    ax.set_xlabel("trainable adapter parameters (log scale; the new head is trained in every method)")
    ax.set_ylabel("test accuracy on digits 5-9 (%)")
    runs = result.settings.repeats
    ax.set_title(f"TinyViT, digits 0-4 → 5-9 (q/v adapters), seed {result.seed}, "
                 f"{runs} run{'s' if runs > 1 else ''} per method{' (quick)' if result.quick else ''}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)


def plot_pareto(result: DemoResult, path: str | os.PathLike[str]) -> Path:
    """Accuracy against trainable adapter parameters (log-x), one marker per method (error bars:
    sd over the runs), the Pareto front (best accuracy for at most that many parameters) as a
    step line, and the head-only accuracy as a dashed line.  Uses no global matplotlib state.

    The file is replaced atomically (a stopped run leaves the old plot or the new one); its
    format is that of the suffix (PNG without one)."""
    import io

    from matplotlib.figure import Figure

    from tensoradapt.torch.files.write import write_bytes

    path = Path(path)
    fig = Figure(figsize=(9, 5.5), dpi=120)
    ax = fig.add_subplot()
    points = [r for r in result.results if r.adapter_params > 0]
    _draw_methods(ax, points)
    _draw_front_and_baselines(ax, result, points)
    _decorate(ax, result, points)
    fig.tight_layout()
    place_labels(fig, ax, [(r.name, r.adapter_params, 100 * r.accuracy) for r in points])
    path.parent.mkdir(parents=True, exist_ok=True)
    image = io.BytesIO()
    fig.savefig(image, format=path.suffix[1:].lower() or "png")
    write_bytes(path, image.getvalue())
    return path


def _occupied(fig: Any, ax: Any, renderer: Any, labels: Sequence[tuple[str, float, float]]) -> list[Any]:
    """Display boxes labels must avoid: the legend and a little more than each marker."""
    from matplotlib.transforms import Bbox

    legend = ax.get_legend()
    taken = [legend.get_window_extent(renderer)] if legend is not None else []
    pad = 4.5 * fig.dpi / 72.0  # a little more than a marker radius (3.5 pt), in pixels
    for _, x, y in labels:
        px, py = ax.transData.transform((x, y))
        taken.append(Bbox.from_extents(px - pad, py - pad, px + pad, py + pad))
    return taken


def _annotate(ax: Any, text: str, x: float, y: float, offset: tuple[int, int, str, str]) -> Any:
    dx, dy, ha, va = offset
    return ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, va=va, fontsize=8)


def _first_free(ax: Any, renderer: Any, inside: Any, taken: Sequence[Any], text: str, x: float, y: float) -> Any:
    """The annotation at the first offset that stays inside the axes and overlaps nothing taken, or ``None``."""
    for offset in _LABEL_OFFSETS:
        note = _annotate(ax, text, x, y, offset)
        box = note.get_window_extent(renderer)
        fits = inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1)
        if fits and not any(box.overlaps(other) for other in taken):
            return note
        note.remove()
    return None


def place_labels(fig: Any, ax: Any, labels: Sequence[tuple[str, float, float]]) -> None:
    """Annotate each ``(text, x, y)`` at the first of a few offsets where the text overlaps no
    marker, no earlier label and not the legend, and stays inside the axes (else the first)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    inside = ax.get_window_extent(renderer)
    taken = _occupied(fig, ax, renderer, labels)
    for text, x, y in sorted(labels, key=lambda item: (item[1], -item[2])):
        note = _first_free(ax, renderer, inside, taken, text, x, y)
        if note is None:
            note = _annotate(ax, text, x, y, _LABEL_OFFSETS[0])
        taken.append(note.get_window_extent(renderer))
