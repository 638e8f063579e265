"""SuperLoRA on PyTorch models: the adapter, its layer, its ``ΔW`` passes, its files and registration.

``layer``
    :class:`SuperLoRALayer`, the module put at each target (``W + ΔW`` through the module's own forward).
``passes``
    Where ``ΔW`` comes from in a step (slices, component passes, their caches).
``adapter``
    :class:`SuperLoRAAdapter`, which owns the trainable tensors.
``method``
    :func:`attach_superlora`, :func:`load_superlora`, and SuperLoRA's entry in the method registry.
"""

from .adapter import Adapter, SuperLoRAAdapter
from .layer import AdaptedLayer, SuperLoRALayer
from .method import METHOD, attach_superlora, load_superlora

__all__ = ["METHOD", "AdaptedLayer", "Adapter", "SuperLoRAAdapter", "SuperLoRALayer",
           "attach_superlora", "load_superlora"]
