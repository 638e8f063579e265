"""GLoRA (Chavan et al. 2023), framework-free: configuration, the layer algebra and the evolutionary search.

Modules
-------
config
    :data:`CHOICES`, :class:`LayerChoice` (one layer's forms and LoRA rank), :class:`GLoRAConfig`
    (the supernet), :func:`search_space`, :func:`largest_choice`.
algebra
    The stored tensors (:func:`parameter_shapes`, :func:`init`), the merged weight and bias
    (:func:`weight_bias`) and its VJP (:func:`vjp`), parameter counts (:func:`count_params` for
    the active parameters of a choice, :func:`count_stored_params` for the supernet's storage).
search
    :func:`evolve`, the evolutionary search of one choice per layer under a parameter budget,
    driven by an ``evaluate(configs) -> float`` callback; it returns a :class:`SearchResult`.

The PyTorch adapter (supernet training, the search on a live model, merging) is
:mod:`tensoradapt.torch.glora`.  The mathematics is in ``docs/math.md`` (GLoRA).
"""

from . import algebra, config, search
from .algebra import count_params, count_stored_params, init, parameter_shapes, vjp, weight_bias
from .config import CHOICES, TENSORS, GLoRAConfig, LayerChoice, largest_choice, search_space
from .search import SearchRecord, SearchResult, evolve

__all__ = [
    "CHOICES",
    "TENSORS",
    "GLoRAConfig",
    "LayerChoice",
    "SearchRecord",
    "SearchResult",
    "algebra",
    "config",
    "count_params",
    "count_stored_params",
    "evolve",
    "init",
    "largest_choice",
    "parameter_shapes",
    "search",
    "search_space",
    "vjp",
    "weight_bias",
]
