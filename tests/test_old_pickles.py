"""Pickles made by an earlier version (commit 48104a3, before the torch bindings v3) still load.

The fixtures were written with that commit's code by ``tests/data/make_pickle_fixtures.py``:
operators (Fastfood and Shuffle with both generators, a used SuperLoRA plan with a Fastfood
projection) with ``pickle``, and whole tiny models with a SuperLoRA or GLoRA adapter with
``torch.save``.  Loaded today, each must compute what a freshly built object computes (operators)
or what the model computed when it was saved (models).  Pickles are test data here: the library
itself never reads or writes pickle files.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from tensoradapt import SuperLoRA, buffers, ops, presets

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def old_operators() -> dict:
    return pickle.loads((DATA / "operators_48104a3.pkl").read_bytes())


@pytest.mark.parametrize("number", [1, 2])
def test_old_fastfood_pickles_load_and_compute_as_fresh_ones(old_operators: dict, number: int) -> None:
    generator = buffers.GENERATORS[number - 1]
    old = old_operators[f"fastfood-{number}"]
    fresh = ops.Fastfood(7, 100, seed=4, group=1, generator=generator)
    assert isinstance(old, ops.Fastfood) and type(old) is type(fresh)
    x = np.random.default_rng(0).standard_normal((3, 7))
    y = np.random.default_rng(1).standard_normal((3, 100))
    np.testing.assert_array_equal(old.apply(x), fresh.apply(x))
    np.testing.assert_array_equal(old.adjoint(y), fresh.adjoint(y))


@pytest.mark.parametrize("number", [1, 2])
def test_old_shuffle_pickles_load_and_compute_as_fresh_ones(old_operators: dict, number: int) -> None:
    old = old_operators[f"shuffle-{number}"]
    fresh = ops.Shuffle(9, 3, group=2, generator=buffers.GENERATORS[number - 1])
    x = np.random.default_rng(2).standard_normal((2, 9))
    np.testing.assert_array_equal(old.apply(x), fresh.apply(x))
    np.testing.assert_array_equal(old.adjoint(x), fresh.adjoint(x))


def test_old_used_plan_pickle_loads_and_gives_the_same_delta(old_operators: dict) -> None:
    plan = old_operators["plan"]
    params = old_operators["plan-params"]
    fresh = SuperLoRA(presets.with_projection(presets.lora(2), "fastfood", ratio=0.5), [(8, 8), (8, 8)],
                      generator=buffers.GENERATOR_V1)
    for old_delta, delta, fresh_delta in zip(old_operators["plan-delta"], plan.delta(params), fresh.delta(params),
                                             strict=True):
        np.testing.assert_array_equal(delta, old_delta)
        np.testing.assert_array_equal(fresh_delta, old_delta)


@pytest.mark.parametrize("make", [
    lambda: ops.Fastfood(7, 100, seed=4, generator=buffers.GENERATOR_V1),
    lambda: ops.Fastfood(7, 100, seed=4, generator=buffers.GENERATOR_V2),
    lambda: ops.Shuffle(9, 3, generator=buffers.GENERATOR_V1),
    lambda: ops.Shuffle(9, 3, generator=buffers.GENERATOR_V2),
])
def test_a_pickle_holds_no_cache(make) -> None:
    """The per-device cache is rebuilt on unpickling, not pickled: a used operator pickles to the
    same bytes as an unused one, names no cache class, and computes the same after a round trip."""
    used, unused = make(), make()
    x = np.ones((2, used.n_in if isinstance(used, ops.Fastfood) else used.n))
    y = used.apply(x)
    data = pickle.dumps(used)
    assert data == pickle.dumps(unused)
    assert b"Cache" not in data
    again = pickle.loads(data)
    np.testing.assert_array_equal(again.apply(x), y)


@pytest.mark.parametrize("method", ["superlora", "glora"])
def test_old_whole_model_pickles_load_and_compute_what_they_did(method: str) -> None:
    torch = pytest.importorskip("torch")
    import tensoradapt.torch  # noqa: F401  (the package registers the old module paths)

    record = torch.load(DATA / f"model_{method}_48104a3.pt", weights_only=False)
    with torch.no_grad():
        out = record["model"](record["x"])
    torch.testing.assert_close(out, record["y"], rtol=0, atol=0)
    assert type(record["model"].tensoradapt).__module__.startswith("tensoradapt.torch.")


def test_every_name_old_model_pickles_refer_to_resolves() -> None:
    """The names a whole-model pickle of 48104a3 can refer to (its adapters' classes, hooks and
    state holders) resolve as pickle resolves them, to the objects that now hold them."""
    pytest.importorskip("torch")
    import io

    from tensoradapt.torch import container, hf, modules
    from tensoradapt.torch.superlora import adapter, layer, passes

    unpickler = pickle.Unpickler(io.BytesIO(b""))
    expected = {
        ("tensoradapt.torch._shared", "AdapterContainer"): container.AdapterContainer,
        ("tensoradapt.torch._shared", "accept_base_keys"): modules.accept_base_keys,
        ("tensoradapt.torch._shared", "report_base_keys"): modules.report_base_keys,
        ("tensoradapt.torch._shared", "ThreadState"): modules.ThreadState,
        ("tensoradapt.torch._targets", "WeightView"): modules.WeightView,
        ("tensoradapt.torch.adapter", "SuperLoRAAdapter"): adapter.SuperLoRAAdapter,
        ("tensoradapt.torch.adapter", "SuperLoRALayer"): layer.SuperLoRALayer,
        ("tensoradapt.torch.adapter", "_ForwardState"): passes.ForwardState,
    }
    for (module, name), obj in expected.items():
        assert unpickler.find_class(module, name) is obj, (module, name)
    hook = unpickler.find_class("tensoradapt.torch.adapter", "_report_original_weight")
    assert hook.__module__ == layer.__name__ and hook.__name__ == "_report_original_weight"
    save = unpickler.find_class("tensoradapt.torch.hf", "_SavePretrained")
    assert save.__module__ == container.__name__ and save.__name__ == "_SavePretrained"
    assert unpickler.find_class("tensoradapt.torch.hf", "use_adapter_checkpoints") is hf.use_adapter_checkpoints
