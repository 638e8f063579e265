"""GLoRA (Chavan et al. 2023): configuration, the layer algebra and the evolutionary search.

See :mod:`tensoradapt.glora.algebra` for the mathematics (``docs/math.md``, GLoRA).
"""

from .algebra import (
    CHOICES,
    GLoRAConfig,
    LayerChoice,
    glora_init,
    glora_param_count,
    glora_stored_param_count,
    glora_vjp,
    glora_weight_bias,
    largest_choice,
    parameter_shapes,
    search_space,
)

__all__ = [
    "CHOICES",
    "GLoRAConfig",
    "LayerChoice",
    "glora_init",
    "glora_param_count",
    "glora_stored_param_count",
    "glora_vjp",
    "glora_weight_bias",
    "largest_choice",
    "parameter_shapes",
    "search_space",
]
