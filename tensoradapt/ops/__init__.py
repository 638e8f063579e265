"""Backend-agnostic tensor operators of the SuperLoRA pipeline, each with its adjoint (VJP).

Every function infers the array namespace from its inputs (NumPy, CuPy, torch, any array-API
library) and returns arrays of that namespace, dtype and device.

=====================================  ==========================================================
forward                                adjoint / VJP
=====================================  ==========================================================
:func:`cut`                            :func:`pad` (= :func:`cut_vjp`)
:func:`tucker_to_tensor`               :func:`tucker_vjp`
:func:`cp_to_tensor`                   :func:`cp_vjp`
:func:`kron`                           :func:`kron_vjp`
:func:`concat_targets`                 :func:`split_targets`
:meth:`Grouping.to_targets`            :meth:`Grouping.from_targets`
:meth:`Shuffle.apply`                  :meth:`Shuffle.adjoint`
:meth:`Fastfood.apply`                 :meth:`Fastfood.adjoint`
:func:`fwht`                           :func:`fwht` (``H`` is symmetric)
=====================================  ==========================================================
"""

from .cp import cp_to_tensor, cp_vjp
from .fold import cubic_fold_shape, cut, cut_vjp, fold_shape, fold_side, pad
from .fwht import fwht
from .grouping import Grouping, concat_targets, split_targets
from .kron import kron, kron_shape, kron_vjp
from .projection import Fastfood, Shuffle
from .tucker import tucker_to_tensor, tucker_vjp

__all__ = [
    "Fastfood",
    "Grouping",
    "Shuffle",
    "concat_targets",
    "cp_to_tensor",
    "cp_vjp",
    "cubic_fold_shape",
    "cut",
    "cut_vjp",
    "fold_shape",
    "fold_side",
    "fwht",
    "kron",
    "kron_shape",
    "kron_vjp",
    "pad",
    "split_targets",
    "tucker_to_tensor",
    "tucker_vjp",
]
