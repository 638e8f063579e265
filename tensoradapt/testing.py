"""Public test helpers: Hypothesis strategies for configs, shapes and parameters, and a helper
that checks a configuration reduces to a reference formula.

Needs ``hypothesis`` (``pip install tensoradapt[test]``); the rest of the library does not.

Example
-------
>>> import numpy as np
>>> from tensoradapt import presets
>>> from tensoradapt.testing import assert_reduces_to
>>> plan = assert_reduces_to(
...     presets.lora(2), [(5, 3)],
...     lambda p: [p["g0.split1.factor0"] @ p["g0.split1.factor1"].T])
"""

from __future__ import annotations

import collections
import json
import os
import time
import tracemalloc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from ._backend import to_numpy
from .superlora.config import SuperLoRAConfig
from .superlora.generator import SuperLoRA

__all__ = ["Bounded", "FuzzLedger", "assert_reduces_to", "configs", "hostile_values", "params", "plans",
           "run_bounded", "shapes"]


def shapes(max_targets: int = 4, max_side: int = 8, *, equal: bool = False,
           min_ndim: int = 2, max_ndim: int = 2) -> st.SearchStrategy[list[tuple[int, ...]]]:
    """Lists of target weight shapes (``equal=True``: all the same shape)."""
    one = st.integers(min_ndim, max_ndim).flatmap(
        lambda nd: st.tuples(*[st.integers(1, max_side)] * nd))
    if equal:
        return st.tuples(one, st.integers(1, max_targets)).map(lambda t: [t[0]] * t[1])
    return st.lists(one, min_size=1, max_size=max_targets)


@st.composite
def configs(draw: Any, *, max_rank: int = 3, max_order: int = 4, max_splits: int = 3,
            max_groups: int = 4) -> SuperLoRAConfig:
    """Valid :class:`SuperLoRAConfig` values across folds, cores, splits, groupings and projections
    (the matrix-fold adapters with Fastfood too; shape-independent rules only; pair with
    :func:`plans` for configs valid on given shapes)."""
    kind = draw(st.sampled_from(["cubic", "cubic", "cubic", "matrix", "stack"]))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1.0, 0.5, 2.0]))
    if kind == "matrix":
        family = draw(st.sampled_from(["lora", "lokr", "loha"]))
        rank = draw(st.integers(1, max_rank))
        projection = draw(st.sampled_from(["none", "none", "shuffle", "fastfood"]))
        ratio = draw(st.sampled_from([1.0, 0.5, 0.3])) if projection == "fastfood" else 1.0
        common = {"projection": projection, "ratio": ratio, "fold": "matrix", "seed": seed, "scale": scale}
        if family == "lora":
            return SuperLoRAConfig(rank=rank, **common)
        if family == "loha":
            return SuperLoRAConfig(rank=rank, splits=2, unit="hadamard", **common)
        return SuperLoRAConfig(rank=rank, splits=2, dense_side=draw(st.sampled_from([-1, 2, 3])),
                               decompose_both=draw(st.booleans()), **common)
    grouping = draw(st.one_of(st.just("weight"), st.integers(1, max_groups)))
    if kind == "stack":
        return SuperLoRAConfig(rank=draw(st.integers(1, max_rank)), layout="stack", grouping=grouping,
                               seed=seed, scale=scale)
    order = draw(st.integers(1, max_order))
    core = draw(st.sampled_from(["tucker", "cp", "identity", "dense"]))
    splits = draw(st.integers(1, max_splits))
    if core == "tucker":
        rank: Any = tuple(draw(st.lists(st.integers(1, max_rank), min_size=order, max_size=order)))
    else:
        rank = draw(st.integers(1, max_rank))
    dense_side = draw(st.one_of(st.none(), st.integers(1, 3))) if splits > 1 else None
    projection = draw(st.sampled_from(["none", "shuffle", "fastfood"]))
    ratio = draw(st.sampled_from([1.0, 0.5, 0.3])) if projection == "fastfood" else 1.0
    scope = draw(st.sampled_from(["group", "global"])) if projection == "shuffle" else "group"
    return SuperLoRAConfig(rank=rank, order=order, splits=splits, dense_side=dense_side, core=core,
                           grouping=grouping, projection=projection, ratio=ratio, shuffle_scope=scope,
                           seed=seed, scale=scale)


@st.composite
def plans(draw: Any, config_strategy: st.SearchStrategy[SuperLoRAConfig] | None = None,
          shape_strategy: st.SearchStrategy[list[tuple[int, ...]]] | None = None) -> SuperLoRA:
    """:class:`SuperLoRA` plans: a config and target shapes that are valid together."""
    config = draw(config_strategy if config_strategy is not None else configs())
    if shape_strategy is None:
        equal_rows = config.layout == "stack"
        shape_strategy = shapes(equal=equal_rows)
    target_shapes = draw(shape_strategy)
    try:
        return SuperLoRA(config, target_shapes)
    except ValueError:
        assume(False)
        raise  # unreachable: assume(False) aborts the example


def params(plan: SuperLoRA, *, zero: bool = False, xp: Any = None,
           dtype: Any = np.float64) -> st.SearchStrategy[dict[str, Any]]:
    """Parameter dicts for ``plan`` (random non-zero start by default), one per drawn seed."""
    return st.integers(0, 2**31 - 1).map(lambda seed: plan.init(seed, xp=xp, dtype=dtype, zero=zero))


def assert_reduces_to(
    config: SuperLoRAConfig,
    target_shapes: Sequence[Sequence[int]],
    reference: Callable[[Mapping[str, np.ndarray]], Sequence[Any]],
    *,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    rtol: float = 1e-10,
    atol: float = 1e-12,
) -> SuperLoRA:
    """Check that ``config`` generates, on ``target_shapes``, the ΔW that ``reference`` computes.

    ``reference`` receives the parameters (NumPy float64 arrays, by name) and returns the
    expected ``[ΔW_1, …, ΔW_S]``; it should be written independently of the library.  The
    parameters default to ``plan.init(seed, zero=False)`` in float64.  Returns the plan.

    Raises
    ------
    AssertionError
        Naming the first target whose ΔW differs.
    """
    plan = SuperLoRA(config, target_shapes)
    if params is None:
        params = plan.init(seed, dtype=np.float64, zero=False)
    host = {name: np.asarray(to_numpy(v), dtype=np.float64) for name, v in params.items()}
    got = [np.asarray(to_numpy(d)) for d in plan.delta(params)]
    expected = [np.asarray(e, dtype=np.float64) for e in reference(host)]
    if len(expected) != len(got):
        raise AssertionError(f"reference returned {len(expected)} arrays for {len(got)} targets")
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        if g.shape != e.shape:
            raise AssertionError(f"target {i}: shape {g.shape} differs from the reference's {e.shape}")
        if not np.allclose(g, e, rtol=rtol, atol=atol):
            worst = float(np.max(np.abs(g - e)))
            raise AssertionError(f"target {i}: ΔW differs from the reference (max abs error {worst:.3g})")
    return plan


# ---------------------------------------------------------------------------------------------
# hostile input: values of any type and magnitude, and a call under a time and memory bound
# ---------------------------------------------------------------------------------------------
_HUGE = [10**9, 10**18, 2**63, 2**64, 10**30, 10**300, -(10**30)]


def hostile_values(*, small: Sequence[Any] = ()) -> st.SearchStrategy[Any]:
    """Values of any type and magnitude a config field may be given by mistake or on purpose:
    ints small and huge (``10**300``), bools, floats (NaN, inf, 1e308, -0.0), strings, bytes,
    ``None``, empty and nested tuples and lists, dicts, and NumPy scalars; ``small`` adds values
    of the field's own kind so that some draws are valid."""
    scalars = st.one_of(
        st.integers(-3, 70), st.sampled_from(_HUGE), st.booleans(), st.none(),
        st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 1.0, 1e-300, 1e308, -0.0]),
        st.text(max_size=6), st.sampled_from(["no", "weight", "layer", "cubic", "matrix", "tucker", "lora", ""]),
        st.binary(max_size=4), st.integers(-3, 70).map(np.int64), st.sampled_from([np.float32(0.5), np.bool_(True)]),
    )
    if small:
        scalars = st.one_of(st.sampled_from(list(small)), scalars)
    nested = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.lists(inner, max_size=4).map(tuple),
                                                          st.dictionaries(st.text(max_size=3), inner, max_size=2)),
                          max_leaves=8)
    return nested


@dataclass(frozen=True)
class Bounded:
    """What :func:`run_bounded` saw: the result or the exception, the wall-clock and CPU seconds
    (the CPU time of this process, robust on a shared machine) and the peak bytes."""

    result: Any
    error: BaseException | None
    seconds: float
    peak_bytes: int
    cpu_seconds: float = 0.0


def run_bounded(call: Callable[[], Any], *, trace_memory: bool = True) -> Bounded:
    """Run ``call()``, catching any exception, timing it (wall clock and CPU) and (with
    ``trace_memory``) measuring the peak of the memory allocated meanwhile (``tracemalloc``:
    Python objects and NumPy arrays)."""
    started_tracing = trace_memory and not tracemalloc.is_tracing()
    if started_tracing:
        tracemalloc.start()
    if trace_memory:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    result, error = None, None
    try:
        result = call()
    except BaseException as exc:  # the caller judges the exception
        if isinstance(exc, KeyboardInterrupt):
            raise
        error = exc
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = 0
    if trace_memory:
        peak = max(0, tracemalloc.get_traced_memory()[1] - base)
        if started_tracing:
            tracemalloc.stop()
    return Bounded(result, error, seconds, peak, cpu_seconds)


class FuzzLedger:
    """Counts of fuzz cases by surface and outcome (``"ok"`` or the exception type), written as
    JSON to ``$TENSORADAPT_FUZZ_REPORT`` (when set) so that docs/reliability.md can quote a run."""

    def __init__(self) -> None:
        self.counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.worst_seconds: dict[str, float] = collections.defaultdict(float)
        self.worst_bytes: dict[str, int] = collections.defaultdict(int)

    def record(self, surface: str, outcome: Bounded) -> None:
        kind = "ok" if outcome.error is None else type(outcome.error).__name__
        self.counts[surface][kind] += 1
        self.worst_seconds[surface] = max(self.worst_seconds[surface], outcome.cpu_seconds)
        self.worst_bytes[surface] = max(self.worst_bytes[surface], outcome.peak_bytes)

    def as_dict(self) -> dict[str, Any]:
        return {surface: {"cases": sum(c.values()), "outcomes": dict(sorted(c.items())),
                          "worst_cpu_seconds": round(self.worst_seconds[surface], 3),
                          "worst_peak_mib": round(self.worst_bytes[surface] / 2**20, 2)}
                for surface, c in sorted(self.counts.items())}

    def write(self, name: str) -> None:
        """Merge this ledger into the JSON report file under ``name`` (no-op without the variable)."""
        path = os.environ.get("TENSORADAPT_FUZZ_REPORT")
        if not path:
            return
        data: dict[str, Any] = {}
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        data[name] = self.as_dict()
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
