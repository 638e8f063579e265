"""Shared fixtures: the array backends every operator is tested on, and the Hypothesis profiles."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from tensoradapt._backend import to_numpy

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=200, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@dataclass(frozen=True)
class Backend:
    """How to put a NumPy array on one array library (and read it back)."""

    name: str
    asarray: Callable[[np.ndarray], Any]

    def __call__(self, value: Any) -> Any:
        return self.asarray(np.asarray(value))

    def many(self, values: Sequence[Any]) -> list[Any]:
        return [self(v) for v in values]

    def __repr__(self) -> str:
        return self.name


def _cuda_available() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def _torch_cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _make_backends() -> list[Any]:
    import array_api_strict
    import torch

    backends = [
        pytest.param(Backend("numpy", np.array), id="numpy"),
        pytest.param(Backend("array_api_strict", array_api_strict.asarray), id="array_api_strict"),
        pytest.param(Backend("torch", lambda a: torch.from_numpy(np.array(a))), id="torch"),
    ]
    if _torch_cuda_available():  # only where a GPU exists: CPU runs collect the same tests
        backends.append(pytest.param(Backend("torch_cuda", lambda a: torch.from_numpy(np.array(a)).cuda()),
                                     id="torch_cuda", marks=pytest.mark.gpu))
    if _cuda_available():
        import cupy

        backends.append(pytest.param(Backend("cupy", cupy.asarray), id="cupy", marks=pytest.mark.gpu))
    else:
        backends.append(pytest.param(
            Backend("cupy", np.array), id="cupy",
            marks=[pytest.mark.gpu, pytest.mark.skip(reason="CuPy with a CUDA device is not available")],
        ))
    return backends


BACKENDS = _make_backends()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each supported array library in turn (CuPy only where a GPU exists)."""
    return request.param


def np_(x: Any) -> np.ndarray:
    """Any backend array as a NumPy array."""
    return np.asarray(to_numpy(x))


def inner(a: Any, b: Any) -> float:
    """``<a, b>`` of two arrays of any backend (or lists of arrays), in float64."""
    if isinstance(a, (list, tuple)):
        return sum(inner(x, y) for x, y in zip(a, b, strict=True))
    return float(np.sum(np_(a).astype(np.float64) * np_(b).astype(np.float64)))


def check_vjp_by_finite_differences(
    backend: Backend,
    forward: Callable[[list[Any]], Any],
    inputs: Sequence[np.ndarray],
    cotangent: np.ndarray,
    grads: Sequence[Any],
    *,
    seed: int = 0,
    eps: float = 1e-6,
    rtol: float = 1e-6,
) -> None:
    """Central differences of ``<forward(inputs), cotangent>`` along random directions, one input
    at a time, against ``<grads[i], direction>`` (float64)."""
    rng = np.random.default_rng(seed)
    for i, x in enumerate(inputs):
        direction = rng.standard_normal(x.shape)
        plus = [backend(v + eps * direction if j == i else v) for j, v in enumerate(inputs)]
        minus = [backend(v - eps * direction if j == i else v) for j, v in enumerate(inputs)]
        numeric = (inner(forward(plus), cotangent) - inner(forward(minus), cotangent)) / (2 * eps)
        analytic = inner(grads[i], direction)
        scale = max(1.0, abs(numeric), abs(analytic))
        assert abs(numeric - analytic) <= rtol * scale, (i, numeric, analytic)


@pytest.fixture(autouse=True)
def _layers_regenerate_delta(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test models are small enough that an adapter would keep its model-wide ΔW from the forward for
    the backward (``SuperLoRAAdapter.keep_delta_bytes``); the suite runs the path every larger model
    takes instead (ΔW regenerated per layer).  Tests of the kept path raise the limit themselves."""
    module = sys.modules.get("tensoradapt.torch.superlora.adapter")
    if module is not None:
        monkeypatch.setattr(module, "KEEP_DELTA_BYTES", 0)
