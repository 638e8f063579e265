"""PyTorch bindings of tensoradapt, installed as :mod:`tensoradapt.torch`.

:mod:`tensoradapt.torch.functional` has autograd Functions over the core operators and over a
whole SuperLoRA generator.  ``attach(model, config)`` (module injection, merge, save/load) is not
built yet.
"""

from __future__ import annotations

try:
    import torch as _torch
except ImportError as error:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "tensoradapt.torch needs PyTorch; install it with `pip install tensoradapt[torch]`"
    ) from error

from . import functional

__all__ = ["TORCH_VERSION", "functional"]
TORCH_VERSION = _torch.__version__
