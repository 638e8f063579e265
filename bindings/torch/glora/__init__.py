"""GLoRA on PyTorch models: supernet training, evolutionary search, structural merge.

``adapter``
    :class:`GLoRALayer` (``y = x W'ᵀ + b'`` at each target) and :class:`GLoRAAdapter`.
``search``
    :func:`search`, the evolutionary search of per-layer configs on an attached adapter.
``method``
    :func:`attach_glora`, :func:`load_glora`, and GLoRA's entry in the method registry.

:func:`weight_bias` (GLoRA's ``(W', b')`` as an autograd Function) lives in
:mod:`tensoradapt.torch.functional` beside SuperLoRA's Functions.
"""

from tensoradapt.glora.search import SearchRecord, SearchResult

from ..functional import glora_weight_bias as weight_bias
from .adapter import GLoRAAdapter, GLoRALayer
from .method import METHOD, attach_glora, load_glora
from .search import search

__all__ = [
    "METHOD",
    "GLoRAAdapter",
    "GLoRALayer",
    "SearchRecord",
    "SearchResult",
    "attach_glora",
    "load_glora",
    "search",
    "weight_bias",
]
