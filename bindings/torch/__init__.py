"""PyTorch bindings of tensoradapt, installed as :mod:`tensoradapt.torch`.

The autograd Functions over the core's analytic VJPs and ``attach(model, config)`` are built in
the bindings issue; until then this subpackage only checks that PyTorch is importable, so that
``import tensoradapt.torch`` fails early with a clear message when it is not installed.
"""

from __future__ import annotations

try:
    import torch as _torch
except ImportError as error:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "tensoradapt.torch needs PyTorch; install it with `pip install tensoradapt[torch]`"
    ) from error

__all__: list[str] = []
TORCH_VERSION = _torch.__version__
