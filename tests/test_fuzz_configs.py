"""Fuzz: SuperLoRAConfig / GLoRAConfig fields of any type and magnitude, times random shapes,
through plan, init, delta, vjp, count_params and budget (docs/reliability.md).

Property: every call ends in a result or in a documented exception (``ValueError`` or
``TypeError``; nothing else), within a time bound and a memory bound (``tracemalloc`` peak).
The default run executes a bounded profile; ``-m slow`` runs ten times more examples, randomly.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensoradapt import SuperLoRAConfig, budget, count_params
from tensoradapt.glora import algebra
from tensoradapt.glora.config import GLoRAConfig, LayerChoice, largest_choice, search_space
from tensoradapt.superlora.generator import SuperLoRA
from tensoradapt.testing import FuzzLedger, hostile_values, run_bounded

DOCUMENTED = (ValueError, TypeError)
SECONDS = 5.0  # per call: generous for a shared, noisy machine (a typical call takes milliseconds)
WALL_SECONDS = 120.0  # wall clock: only catches a hang (the CPU bound is the real one)
PEAK_BYTES = 96 * 2**20  # per call, traced (shapes are at most 8 per side: ΔW itself is a few kB)
EXAMPLES = 250

LEDGER = FuzzLedger()

_SL_VALID = {
    "rank": [1, 2, 3, (2, 2), (1, 2, 3)], "order": [1, 2, 3, 4], "splits": [1, 2, 3],
    "dense_side": [None, 2, -1], "grouping": ["weight", "layer", 1, 2, ((0,),)],
    "layout": ["fold", "stack"], "fold": ["cubic", "matrix", "layers", (4, 4)],
    "core": ["tucker", "cp", "identity", "dense"], "unit": ["kron", "hadamard"],
    "decompose_both": [False, True], "fixed_identity_modes": [(), (0,)],
    "projection": ["none", "shuffle", "fastfood"], "ratio": [1.0, 0.5],
    "shuffle_scope": ["group", "global"], "fastfood_order": ["li", "paper"], "seed": [0, 7],
    "scale": [1.0, 0.5], "alpha": [None, 2.0],
}
_GL_VALID = {
    "rank": [1, 2, 4], "ranks": [None, (1,), (2, 1)], "A": [("lora", "none"), "vector"],
    "B": [("scalar",), ("lora",)], "C": [("none",), ("lora", "vector")], "D": [("vector",)],
    "E": [("scalar", "none")], "seed": [0, 3],
}


def _kwargs(valid: dict[str, list]) -> st.SearchStrategy[dict]:
    """Some fields set: mostly to valid values, often to hostile ones of any type or magnitude."""
    fields = {name: st.one_of(st.sampled_from(values), hostile_values(small=values))
              for name, values in valid.items()}
    return st.fixed_dictionaries({}, optional=fields)


def _shapes() -> st.SearchStrategy[list[tuple[int, ...]]]:
    one = st.lists(st.integers(1, 8), min_size=1, max_size=3).map(tuple)
    return st.lists(one, min_size=1, max_size=4)


def _check(surface: str, call) -> object:
    with np.errstate(all="ignore"):  # a valid scale of 1e308 may overflow ΔW to inf: numerics, not an input error
        outcome = run_bounded(call)
    LEDGER.record(surface, outcome)
    error = outcome.error
    if error is not None and not isinstance(error, DOCUMENTED):
        raise AssertionError(f"{surface}: undocumented {type(error).__name__}: {error}") from error
    if error is not None:
        assert str(error).strip(), f"{surface}: {type(error).__name__} without a message"
        assert len(str(error)) < 2000, f"{surface}: a message of {len(str(error))} characters"
    assert outcome.cpu_seconds < SECONDS, f"{surface} took {outcome.cpu_seconds:.1f} s of CPU"
    assert outcome.seconds < WALL_SECONDS, f"{surface} took {outcome.seconds:.1f} s"
    assert outcome.peak_bytes < PEAK_BYTES, f"{surface} allocated {outcome.peak_bytes / 2**20:.0f} MiB"
    return None if error is not None else outcome.result


def _superlora_case(kwargs: dict, shapes: list[tuple[int, ...]], max_params: object) -> None:
    config = _check("SuperLoRAConfig()", lambda: SuperLoRAConfig(**kwargs))
    if config is None:
        return
    _check("SuperLoRAConfig.from_dict", lambda: SuperLoRAConfig.from_dict(config.to_dict()))
    round_trip = SuperLoRAConfig.from_dict(config.to_dict())
    assert round_trip == config, "to_dict / from_dict must round-trip"
    names = [f"layer{i // 2}.w{i % 2}" for i in range(len(shapes))]
    plan = _check("SuperLoRA()", lambda: SuperLoRA(config, shapes, names))
    counted = _check("count_params", lambda: count_params(config, shapes, names))
    if plan is None:
        return
    assert counted == plan.num_params, "count_params must equal the plan's count"
    params = _check("init", lambda: plan.init(1, dtype=np.float64, zero=False))
    if params is None:
        return
    deltas = _check("delta", lambda: plan.delta(params))
    assert deltas is not None and [tuple(d.shape) for d in deltas] == list(plan.shapes)
    cotangents = [np.ones(s) for s in plan.shapes]
    grads = _check("vjp", lambda: plan.vjp(params, cotangents))
    assert grads is not None and set(grads) == set(params)
    _check("budget", lambda: budget(shapes, max_params, ["lora", "lorta"]))


def _glora_case(kwargs: dict, shape: tuple[int, int], has_bias: bool) -> None:
    config = _check("GLoRAConfig()", lambda: GLoRAConfig(**kwargs))
    if config is None:
        return
    _check("GLoRAConfig.from_dict", lambda: GLoRAConfig.from_dict(config.to_dict()))
    assert GLoRAConfig.from_dict(config.to_dict()) == config
    o, n = shape
    space = _check("search_space", lambda: search_space(config, has_bias=has_bias))
    assert space
    choice = largest_choice(config, has_bias=has_bias)
    _check("glora.count_params", lambda: algebra.count_params(o, n, choice, has_bias=has_bias, r=config.rank))
    if config.rank > 64:  # the stored factors are (o, r) and (r, n): keep the allocation small
        return
    params = _check("glora.init", lambda: algebra.init(o, n, config.rank, has_bias=has_bias, seed=config.seed))
    if params is None:
        return
    rng = np.random.default_rng(0)
    W0 = rng.standard_normal((o, n)).astype(np.float32)
    b0 = rng.standard_normal(o).astype(np.float32) if has_bias else None
    out = _check("glora.weight_bias", lambda: algebra.weight_bias(W0, b0, params, choice))
    if out is not None:
        _check("glora.vjp", lambda: algebra.vjp(W0, b0, params, choice, np.ones_like(W0),
                                                np.ones(o, np.float32)))


_MAX_PARAMS = st.one_of(st.integers(0, 10**6), hostile_values())
_COMMON = {"deadline": None, "database": None, "print_blob": True,
           "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]}


@settings(max_examples=EXAMPLES, derandomize=True, **_COMMON)
@given(kwargs=_kwargs(_SL_VALID), shapes=_shapes(), max_params=_MAX_PARAMS)
def test_fuzz_superlora_config(kwargs, shapes, max_params):
    _superlora_case(kwargs, shapes, max_params)


@settings(max_examples=EXAMPLES // 2, derandomize=True, **_COMMON)
@given(kwargs=_kwargs(_GL_VALID), shape=st.tuples(st.integers(1, 8), st.integers(1, 8)), has_bias=st.booleans())
def test_fuzz_glora_config(kwargs, shape, has_bias):
    _glora_case(kwargs, shape, has_bias)


@settings(max_examples=EXAMPLES // 2, derandomize=True, **_COMMON)
@given(data=st.dictionaries(st.sampled_from(["A", "B", "C", "D", "E", "rank", "x"]), hostile_values(
    small=["lora", "vector", "scalar", "none", "constant", 1, 2]), max_size=6))
def test_fuzz_layer_choice(data):
    _check("LayerChoice.from_dict", lambda: LayerChoice.from_dict(data))


@pytest.mark.slow
@settings(max_examples=EXAMPLES * 10, derandomize=False, **_COMMON)
@given(kwargs=_kwargs(_SL_VALID), shapes=_shapes(), max_params=_MAX_PARAMS)
def test_fuzz_superlora_config_slow(kwargs, shapes, max_params):
    _superlora_case(kwargs, shapes, max_params)


@pytest.mark.slow
@settings(max_examples=EXAMPLES * 5, derandomize=False, **_COMMON)
@given(kwargs=_kwargs(_GL_VALID), shape=st.tuples(st.integers(1, 8), st.integers(1, 8)), has_bias=st.booleans())
def test_fuzz_glora_config_slow(kwargs, shape, has_bias):
    _glora_case(kwargs, shape, has_bias)


def teardown_module() -> None:
    LEDGER.write("configs")
