r"""Fit a SuperLoRA configuration to given weight updates, before any training.

:func:`fit` finds parameters ``θ`` of ``SuperLoRA(config, shapes)`` that minimise

.. math:: L(θ) = \tfrac12 \sum_i \|ΔW_i(θ) - T_i\|_F^2

for targets ``T_i`` (e.g. the ``ΔW`` of a dense fine-tune) and reports the relative error
``‖ΔW(θ) − T‖_F / ‖T‖_F`` over all targets, so that configurations can be ranked per parameter
budget without training (:func:`rank_configs`).

It runs in two stages:

1. **Initialisation from a decomposition** of each group's target.  The group's entries of
   ``T`` are mapped back through the fixed projection (the exact inverse of a Shuffle; the
   least-squares-scaled adjoint of a Fastfood), divided by the scale, zero-padded to the
   generator's fold and reshaped.  The fold is then split into the Kronecker factors by the
   Van Loan–Pitsianis nearest-Kronecker rearrangement (one rank-1 SVD per split), and each split
   is decomposed by its own structure: a truncated SVD (``M = 2``), a HOSVD/HOOI Tucker
   (fixed-identity modes kept), or a CP-ALS — with TensorLy when it is installed, else with
   NumPy/SciPy.  An exactly representable target is already (nearly) recovered here
   (:mod:`.fit_init`).
2. **L-BFGS** (``scipy.optimize.minimize``) on the flat parameter vector, with the gradient from
   :meth:`SuperLoRA.vjp`.  ``ΔW`` and the VJP run on the targets' backend and device (NumPy,
   CuPy, torch…); only the parameter vector and gradient, small by construction, travel to the
   host.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._backend import device_of, from_host, indexed, namespace, to_numpy
from .._validate import check_float, check_int
from ..superlora.config import SuperLoRAConfig
from ..superlora.generator import SuperLoRA
from .fit_init import decomposition_init, random_init

__all__ = ["FitResult", "fit", "rank_configs"]

_INITS = ("auto", "decomposition", "random")
_DECOMPOSERS = ("auto", "tensorly", "numpy")


@dataclass
class FitResult:
    """Result of :func:`fit`.

    Attributes
    ----------
    relative_error : float
        ``‖ΔW(θ) − T‖_F / ‖T‖_F`` over all targets at the returned parameters.
    params : dict of str -> array
        The fitted parameters (names as :meth:`SuperLoRA.parameter_shapes`), on the targets'
        backend and device, in the fit's dtype (float64 by default).
    history : list of float
        Relative error after the initialisation and after every optimiser iteration.
    init_error : float
        Relative error of the initialisation alone.
    num_params : int
        Trainable parameters of the configuration on these shapes.
    iterations : int
        Optimiser iterations run.
    seconds : float
        Wall-clock time of the whole fit.
    message : str
        The optimiser's stopping message.
    """

    relative_error: float
    params: dict[str, Any]
    history: list[float] = field(default_factory=list)
    init_error: float = math.nan
    num_params: int = 0
    iterations: int = 0
    seconds: float = 0.0
    message: str = ""


# ---------------------------------------------------------------------------------------------
# fit, step by step
# ---------------------------------------------------------------------------------------------
def _check_options(init: str, decomposer: str, steps: Any, seed: Any, decomposition_iterations: Any,
                   tol: Any) -> tuple[int, int, int]:
    """Validate the options of :func:`fit`; return ``steps``, ``seed`` and the iterations as ints."""
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    if decomposer not in _DECOMPOSERS:
        raise ValueError(f"decomposer must be one of {_DECOMPOSERS}, got {decomposer!r}")
    steps = check_int("steps", steps, minimum=0)
    seed = check_int("seed", seed, minimum=0)
    decomposition_iterations = check_int("decomposition_iterations", decomposition_iterations, minimum=0)
    tol = check_float("tol", tol, minimum=0.0)
    return steps, seed, decomposition_iterations


@dataclass
class _Problem:
    """The targets of one fit on their backend (``targets``, in the working dtype) and on the host
    (``host``, float64), with ``‖T‖_F²``."""

    plan: SuperLoRA
    xp: Any
    device: Any
    dtype: Any
    targets: list[Any]
    host: list[np.ndarray]
    norm2: float

    def to_backend(self, host_params: Mapping[str, np.ndarray]) -> dict[str, Any]:
        return {n: from_host(self.xp, v, dtype=self.dtype, device=self.device) for n, v in host_params.items()}


def _problem(plan: SuperLoRA, target_deltas: Sequence[Any], dtype: Any) -> _Problem:
    """Check the targets against the plan's shapes and cast them to the working dtype."""
    targets = list(target_deltas)
    if len(targets) != len(plan.shapes):
        raise ValueError(f"target_deltas must hold {len(plan.shapes)} arrays (one per shape), got {len(targets)}")
    for i, (t, shape) in enumerate(zip(targets, plan.shapes, strict=True)):
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"target_deltas[{i}] must have shape {tuple(shape)}, got {tuple(t.shape)}")
    xp = namespace(**indexed("target_deltas", targets))
    device = device_of(targets[0])
    dtype = xp.float64 if dtype is None else dtype
    targets = [xp.astype(t, dtype) if t.dtype != dtype else t for t in targets]
    host = [np.asarray(to_numpy(t), dtype=np.float64) for t in targets]
    norm2 = sum(float(np.vdot(t, t)) for t in host)
    if not math.isfinite(norm2):
        raise ValueError("target_deltas must be finite")
    return _Problem(plan, xp, device, dtype, targets, host, norm2)


class _FlatParams:
    """The plan's arrays as one flat float64 vector ``θ`` (the optimiser's variable) and back."""

    def __init__(self, problem: _Problem) -> None:
        self.problem = problem
        shapes = problem.plan.parameter_shapes()
        self.names = list(shapes)
        self.shapes = [shapes[n] for n in self.names]
        self.offsets = np.cumsum([0, *(math.prod(s) for s in self.shapes)])

    def pack(self, params: Mapping[str, Any]) -> np.ndarray:
        return np.concatenate([np.asarray(to_numpy(params[n]), dtype=np.float64).reshape(-1) for n in self.names])

    def unpack(self, theta: np.ndarray) -> dict[str, Any]:
        p, o = self.problem, self.offsets
        return {n: from_host(p.xp, np.ascontiguousarray(theta[o[i]:o[i + 1]]).reshape(self.shapes[i]),
                             dtype=p.dtype, device=p.device) for i, n in enumerate(self.names)}


def _objective(problem: _Problem, flat: _FlatParams) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
    """``θ ↦ (½ Σ_i ‖ΔW_i(θ) − T_i‖² / ‖T‖², its gradient)`` with the gradient from ``plan.vjp``."""
    plan, xp, norm2 = problem.plan, problem.xp, problem.norm2

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        params = flat.unpack(theta)
        residuals = [d - t for d, t in zip(plan.delta(params), problem.targets, strict=True)]
        loss = 0.5 * sum(float(xp.sum(r * r)) for r in residuals) / norm2
        grads = plan.vjp(params, [r / norm2 for r in residuals])
        return loss, flat.pack(grads)

    return objective


def _start(problem: _Problem, init: str, seed: int, decomposer: str, iterations: int) -> dict[str, np.ndarray]:
    """The initial parameters (host, float64): random or from the decompositions."""
    if init == "random":
        return random_init(problem.plan, problem.host, seed)
    return decomposition_init(problem.plan, problem.host, seed, decomposer, iterations)


@dataclass
class _Run:
    """What the optimiser found: the best ``(loss, θ)`` seen, the error history, the iterations
    and the stopping message."""

    best: tuple[float, np.ndarray]
    history: list[float]
    iterations: int = 0
    message: str = "initialisation only"


def _minimise(objective: Callable[[np.ndarray], tuple[float, np.ndarray]], theta0: np.ndarray, loss0: float,
              steps: int, tol: float, callback: Callable[[int, float], None] | None) -> _Run:
    """L-BFGS-B from ``theta0``, keeping the best iterate and stopping once the error is ``<= tol``."""
    run = _Run((loss0, theta0), [math.sqrt(2 * loss0)])
    if not (steps > 0 and run.history[0] > tol):  # (a NaN error stops here too)
        return run
    from scipy.optimize import minimize

    def track(intermediate_result: Any) -> None:
        error = math.sqrt(2 * max(float(intermediate_result.fun), 0.0))
        run.history.append(error)
        if intermediate_result.fun < run.best[0]:
            run.best = (float(intermediate_result.fun), np.array(intermediate_result.x, copy=True))
        if callback is not None:
            callback(len(run.history) - 1, error)
        if error <= tol:
            raise StopIteration

    result = minimize(objective, theta0, jac=True, method="L-BFGS-B", callback=track,
                      options={"maxiter": steps, "maxfun": 4 * steps + 20, "ftol": 1e-30, "gtol": 1e-30,
                               "maxcor": 30})
    run.iterations = int(result.nit)
    run.message = f"relative error <= tol ({tol:g})" if run.history[-1] <= tol else str(result.message)
    if result.fun < run.best[0]:
        run.best = (float(result.fun), np.asarray(result.x))
    return run


def fit(config: SuperLoRAConfig, shapes: Sequence[Sequence[int]], target_deltas: Sequence[Any], *,
        names: Sequence[str] | None = None, steps: int = 300, seed: int = 0, init: str = "auto",
        decomposer: str = "auto", decomposition_iterations: int = 50, tol: float = 1e-10,
        dtype: Any = None, callback: Callable[[int, float], None] | None = None) -> FitResult:
    r"""Best approximation of ``target_deltas`` by a SuperLoRA configuration.

    Minimises ``½ Σ_i ‖ΔW_i(θ) − T_i‖_F² / ‖T‖_F²`` over the trainable parameters ``θ``.

    Parameters
    ----------
    config : SuperLoRAConfig
    shapes : sequence of shapes
        Target weight shapes ``(o_i, n_i, …)``.
    target_deltas : sequence of arrays
        ``T_i`` with ``T_i.shape == shapes[i]``; NumPy, CuPy, torch or any array-API library.
    names : sequence of str, optional
        Target names (needed by ``grouping="layer"``).
    steps : int
        Maximum L-BFGS iterations (``0``: the initialisation only).
    seed : int
        Seed of the random blocks (random init, CP initial columns, LoHa's second split).
    init : {"auto", "decomposition", "random"}
        ``"decomposition"`` (= ``"auto"``): from HOSVD/Tucker/CP/SVD of each group's target (see
        the module docstring); ``"random"``: every block random, scaled to the targets' norm
        (never the training init, which zeroes one block and would start at a saddle).
    decomposer : {"auto", "tensorly", "numpy"}
        TensorLy (HOOI Tucker, CP-ALS ``parafac``) when installed, else NumPy/SciPy (HOSVD,
        CP-ALS).
    decomposition_iterations : int
        HOOI / CP-ALS iterations of the initialisation.
    tol : float
        Stop once the relative error is at most ``tol``.
    dtype : dtype, optional
        Working dtype of ``ΔW`` and the parameters on the targets' backend (default float64).
    callback : callable, optional
        ``callback(iteration, relative_error)`` after every iteration.

    Returns
    -------
    FitResult

    Examples
    --------
    >>> import numpy as np
    >>> from tensoradapt import presets
    >>> rng = np.random.default_rng(0)
    >>> T = [rng.standard_normal((6, 2)) @ rng.standard_normal((2, 5))]
    >>> result = fit(presets.lora(2), [(6, 5)], T)
    >>> result.relative_error < 1e-10, result.num_params
    (True, 22)
    """
    started = time.perf_counter()
    steps, seed, decomposition_iterations = _check_options(init, decomposer, steps, seed,
                                                           decomposition_iterations, tol)
    plan = SuperLoRA(config, shapes, names)
    problem = _problem(plan, target_deltas, dtype)
    if problem.norm2 == 0:  # the training init (one zero block per product) is exact
        params = problem.to_backend(plan.init(seed, np, np.float64, zero=True))
        return FitResult(0.0, params, [0.0], 0.0, plan.num_params, 0, time.perf_counter() - started, "zero targets")
    flat = _FlatParams(problem)
    objective = _objective(problem, flat)
    theta0 = flat.pack(_start(problem, init, seed, decomposer, decomposition_iterations))
    loss0, _ = objective(theta0)
    run = _minimise(objective, theta0, loss0, steps, tol, callback)
    final_loss, theta = run.best
    return FitResult(math.sqrt(2 * max(final_loss, 0.0)), flat.unpack(theta), run.history, run.history[0],
                     plan.num_params, run.iterations, time.perf_counter() - started, run.message)


def rank_configs(configs: Mapping[str, SuperLoRAConfig] | Iterable[tuple[str, SuperLoRAConfig]],
                 shapes: Sequence[Sequence[int]], target_deltas: Sequence[Any], *,
                 progress: Callable[[Any], Any] | None = None, **fit_kwargs: Any) -> list[tuple[str, int, float]]:
    """Fit every configuration and return ``(label, params, relative error)``, ascending in
    parameters then error — the error achievable per parameter budget before any training.

    Configurations that cannot be built on the shapes are skipped.

    Examples
    --------
    >>> import numpy as np
    >>> from tensoradapt import presets
    >>> T = [np.outer(np.arange(1.0, 5.0), np.ones(4))]
    >>> [(label, params, err < 1e-8) for label, params, err in
    ...  rank_configs({"lora1": presets.lora(1), "dense": presets.dense()}, [(4, 4)], T)]
    [('lora1', 8, True), ('dense', 16, True)]
    """
    items = list(configs.items()) if isinstance(configs, Mapping) else list(configs)
    if progress is not None:
        items = progress(items)
    out = []
    for label, config in items:
        try:
            SuperLoRA(config, shapes, fit_kwargs.get("names"))
        except ValueError:
            continue
        result = fit(config, shapes, target_deltas, **fit_kwargs)
        out.append((label, result.num_params, result.relative_error))
    return sorted(out, key=lambda row: (row[1], row[2]))
