"""Analysis tools: geometric similarity of weight updates, parameter tables and fitting.

Submodules
----------
geometry
    ``dE``, ``dL``, ``dR`` per weight (docs/math.md D15) and the LoRA paper's ``φ(i, j)`` grid,
    aggregated per weight kind (query vs value…).
shapes
    Target shapes from text, JSON, safetensors headers (never the data) and torch models (the
    ``(o, n)`` matrices :func:`tensoradapt.torch.attach` adapts); parameter-count tables and
    budget sweeps.
report
    Text tables: parameter counts, budget sweeps, dE/dL/dR records.
plot
    The dE/dL/dR plot of ``tensoradapt compare`` (matplotlib, imported when drawing).
fit
    :func:`fit`: the best approximation of given ``ΔW`` (e.g. a dense fine-tune) by a SuperLoRA
    configuration, with its relative error — rank configurations per budget before training.
fit_init
    The first stage of :func:`fit`: initial parameters from decompositions of each group's target.

Everything here runs on NumPy (linear algebra from NumPy/SciPy); ``ΔW`` generation in
:func:`fit` and the SVDs of :func:`compare` run on the arrays' own backend where it has one.
TensorLy is optional (initialisation of :func:`fit`); torch is imported only by
:func:`shapes_from_model`, matplotlib only by :func:`plot_similarity`.
"""

from .fit import FitResult, fit, rank_configs
from .geometry import (
    KindSummary,
    SimilarityRecord,
    aggregate_by_kind,
    amplification,
    compare,
    compare_pair,
    infer_kind,
    phi_grid,
    subspace_similarity,
    top_singular,
)
from .plot import plot_similarity
from .report import format_budget_sweep, format_count_table, format_similarity_table
from .shapes import (
    CountRow,
    ShapeSourceError,
    Target,
    budget_sweep,
    count_table,
    parse_preset,
    parse_shapes,
    read_safetensors_header,
    shapes_from_json,
    shapes_from_model,
    shapes_from_safetensors,
)

__all__ = [
    "CountRow",
    "FitResult",
    "KindSummary",
    "ShapeSourceError",
    "SimilarityRecord",
    "Target",
    "aggregate_by_kind",
    "amplification",
    "budget_sweep",
    "compare",
    "compare_pair",
    "count_table",
    "fit",
    "format_budget_sweep",
    "format_count_table",
    "format_similarity_table",
    "infer_kind",
    "parse_preset",
    "parse_shapes",
    "phi_grid",
    "plot_similarity",
    "rank_configs",
    "read_safetensors_header",
    "shapes_from_json",
    "shapes_from_model",
    "shapes_from_safetensors",
    "subspace_similarity",
    "top_singular",
]
