"""tensoradapt: SuperLoRA-family parameter-efficient fine-tuning on tensor decompositions.

The core (this package) is framework-free: it imports NumPy, SciPy and array-api-compat only,
and every operator runs on NumPy, CuPy, torch tensors or any array-API namespace, dispatching on
its inputs.  The PyTorch bindings are the subpackage :mod:`tensoradapt.torch` (imported only on
request).

Submodules
----------
ops
    Tensor operators and their adjoints (fold/cut, Tucker, CP, Kronecker, grouping, Shuffle,
    Fastfood, FWHT).
buffers
    Reproducible fixed random buffers (signs, permutations, Gaussians).
presets
    LoRA, LoKr, KronA, LoHa, LoTR, LoNKr, LoRTA, dense, and projections on any of them.
analysis
    Geometry of ΔW (dE, dL, dR, φ grids), parameter tables from shapes / safetensors headers,
    and ``fit`` (the best approximation of given ΔW by a configuration).
glora
    GLoRA: configuration, the layer algebra (merged weight and bias, VJPs, parameter counts) and
    the evolutionary search.
testing
    Hypothesis strategies and a reduction checker (needs ``hypothesis``; imported on request).

The SuperLoRA generator is :class:`SuperLoRA` (configured by :class:`SuperLoRAConfig`);
:func:`count_params` and :func:`budget` count parameters from shapes alone.
"""

from . import (
    analysis,
    buffers,
    glora,
    ops,
    superlora,
)
from ._version import __version__
from .glora import GLoRAConfig, LayerChoice
from .ops.fold import cubic_fold_shape, fold_shape, fold_side
from .superlora import BudgetEntry, SuperLoRA, SuperLoRAConfig, budget, count_params, factorization, presets

__all__ = [
    "BudgetEntry",
    "GLoRAConfig",
    "LayerChoice",
    "SuperLoRA",
    "SuperLoRAConfig",
    "__version__",
    "analysis",
    "budget",
    "buffers",
    "count_params",
    "cubic_fold_shape",
    "factorization",
    "fold_shape",
    "fold_side",
    "glora",
    "ops",
    "presets",
    "superlora",
]
