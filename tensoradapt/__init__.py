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
"""

from . import buffers, ops
from ._version import __version__
from .ops.fold import fold_shape, fold_side

__all__ = ["__version__", "buffers", "fold_shape", "fold_side", "ops"]
