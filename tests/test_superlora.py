"""The SuperLoRA plan: config validation, init, delta, VJP, delta_for, budget, backends."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tensoradapt import SuperLoRA, SuperLoRAConfig, budget, count_params, presets
from tensoradapt._validate import check_choice, check_float, check_int, is_int
from tensoradapt.superlora.plan import Plan, param_name, param_prefix, parse_param_name
from tensoradapt.testing import configs, plans

from .conftest import inner, np_


def _random_cotangents(plan, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in plan.shapes]


# ---------------------------------------------------------------- config
@given(configs())
def test_config_json_round_trip(config) -> None:
    text = json.dumps(config.to_dict())
    assert SuperLoRAConfig.from_dict(json.loads(text)) == config


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"order": 0}, "order must be an integer >= 1, got 0"),
        ({"splits": 0}, "splits must be an integer >= 1"),
        ({"core": "tt"}, "core must be one of"),
        ({"projection": "gauss"}, "projection must be one of"),
        ({"layout": "rows"}, "layout must be one of"),
        ({"unit": "sum"}, "unit must be one of"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"rank": (2, 2), "order": 3, "core": "tucker"}, r"rank \(2, 2\) has 2 entries but order is 3"),
        ({"rank": (2, 3), "core": "cp"}, "core='cp' needs equal ranks"),
        ({"dense_side": 4}, "dense_side=4 needs splits >= 2"),
        ({"dense_side": 0, "splits": 2}, "dense_side must be a positive integer"),
        ({"dense_side": -1, "splits": 2}, "dense_side=-1 .* only applies with fold='matrix'"),
        ({"fold": (2, 3, 4)}, r"fold shape \(2, 3, 4\) has 3 modes but order is 2"),
        ({"fold": "hyper"}, "fold must be one of"),
        ({"fold": "matrix", "order": 3}, "fold='matrix' .* order must be 2"),
        ({"fold": "layers"}, "fold='layers' .* order must be 3"),
        ({"fold": "matrix", "splits": 3}, "supports at most 2 Kronecker splits"),
        ({"fold": "layers", "order": 3, "splits": 2, "core": "tucker", "rank": 2}, "fold='layers' .* needs splits=1"),
        ({"layout": "stack", "order": 3}, "layout='stack' .* needs order=2 and splits=1"),
        ({"layout": "stack", "projection": "shuffle"}, "projection must be 'none'"),
        ({"layout": "stack", "fold": "matrix"}, "layout='stack' ignores fold"),
        ({"ratio": 1.5, "projection": "fastfood"}, r"ratio \(rho\) must be in \(0, 1\]"),
        ({"ratio": 0.0, "projection": "fastfood"}, r"ratio \(rho\) must be in \(0, 1\]"),
        ({"ratio": float("nan"), "projection": "fastfood"}, "ratio must be a finite number"),
        ({"ratio": 0.5}, "projection='none' needs ratio=1"),
        ({"ratio": 0.5, "projection": "shuffle"}, "projection='shuffle' needs ratio=1"),
        ({"shuffle_scope": "global"}, "shuffle_scope='global' needs projection='shuffle'"),
        ({"unit": "hadamard"}, "unit='hadamard' .* needs splits=2"),
        ({"decompose_both": True}, "decompose_both needs fold='matrix'"),
        ({"fixed_identity_modes": (0,)}, "fixed_identity_modes needs core='tucker'"),
        ({"fixed_identity_modes": (2,), "core": "tucker"}, r"fixed_identity_modes must be modes in \[0, 2\)"),
        ({"fixed_identity_modes": (0, 1), "core": "tucker"}, "cannot fix every mode"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"scale": float("inf")}, "scale must be a finite number"),
        ({"grouping": "block"}, "grouping must be 'weight', 'layer'"),
        ({"grouping": 0}, r"grouping \(G\) must be >= 1"),
        ({"grouping": ((0,), ())}, "grouping lists must be non-empty"),
    ],
)
def test_invalid_configs(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        SuperLoRAConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"order": 1.5}, "order must be an integer >= 1, got float 1.5"),
        ({"splits": True}, "splits must be an integer >= 1, got bool True"),
        ({"rank": 2.0}, "rank must be a positive integer or a tuple of them, got float"),
        ({"rank": (2, "3"), "core": "tucker"}, r"rank\[1\] must be a positive integer, got str"),
        ({"dense_side": 2.5, "splits": 2}, "dense_side must be a positive integer"),
        ({"fold": (4, 2.0)}, r"fold\[1\] must be a positive integer, got float"),
        ({"ratio": "0.5", "projection": "fastfood"}, "ratio must be a finite number, got str"),
        ({"seed": 1.0}, "seed must be a non-negative integer, got float"),
        ({"scale": None}, "scale must be a finite number, got NoneType"),
        ({"alpha": "8"}, "alpha must be a finite number, got str"),
    ],
)
def test_configs_of_the_wrong_kind_raise_type_errors(kwargs, match) -> None:
    with pytest.raises(TypeError, match=match):
        SuperLoRAConfig(**kwargs)


def test_numpy_integers_are_stored_as_python_ints() -> None:
    config = SuperLoRAConfig(rank=(np.int64(2), np.int32(3)), order=np.int64(2), core="tucker",
                             grouping=((np.int64(0),),), seed=np.uint8(3))
    assert config == SuperLoRAConfig(rank=(2, 3), order=2, core="tucker", grouping=((0,),), seed=3)
    assert all(type(v) is int for v in (*config.rank, config.order, config.seed, *config.grouping[0]))
    json.dumps(config.to_dict())


def test_validate_helpers() -> None:
    assert is_int(3) and is_int(np.int64(3)) and not is_int(True) and not is_int(3.0)
    assert check_int("n", np.int64(4), minimum=1, maximum=4) == 4
    with pytest.raises(TypeError, match="n must be an integer, got bool True"):
        check_int("n", True)
    with pytest.raises(ValueError, match="n must be <= 4, got 5"):
        check_int("n", 5, maximum=4)
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        check_int("n", 0, minimum=1, rule="an integer >= 1")
    assert check_float("x", np.float32(0.5), minimum=0, open_minimum=True) == 0.5
    with pytest.raises(ValueError, match="x must be > 0 and <= 1, got 0"):
        check_float("x", 0, minimum=0, maximum=1, open_minimum=True)
    with pytest.raises(ValueError, match="x must be a finite number, got nan"):
        check_float("x", float("nan"))
    with pytest.raises(TypeError, match="x must be a finite number, got bool"):
        check_float("x", False)
    assert check_choice("kind", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match=r"kind must be one of \('a', 'b'\), got \['a'\]"):
        check_choice("kind", ["a"], ("a", "b"))


def test_parameter_names_round_trip() -> None:
    assert param_name(3, 2, "factor1") == "g3.split2.factor1"
    assert parse_param_name("g3.split2.factor1") == (3, 2, "factor1")
    assert param_prefix(3) == "g3." and param_prefix(3, 2) == "g3.split2."
    plan = SuperLoRA(presets.lonkr(3, 2, 2, groups=2), [(6, 8), (5, 7)])
    assert isinstance(plan, Plan)
    for name in plan.parameter_shapes():
        assert param_name(*parse_param_name(name)) == name
    for bad in ("g0.split1", "g0.split1.", "x0.split1.core", "g0.split1.core.extra", "g-1.split1.core"):
        with pytest.raises(ValueError, match="is not a SuperLoRA parameter name"):
            parse_param_name(bad)


def test_from_dict_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown SuperLoRAConfig fields \['rnak'\]"):
        SuperLoRAConfig.from_dict({"rnak": 2})
    with pytest.raises(ValueError, match="config_version 99 is not supported"):
        SuperLoRAConfig.from_dict({"config_version": 99})


def test_scale_and_alpha() -> None:
    assert SuperLoRAConfig(rank=4, alpha=8.0).effective_scale == 2.0
    assert SuperLoRAConfig(rank=4, scale=0.5).effective_scale == 0.5
    assert SuperLoRAConfig(projection="fastfood", ratio=0.1).projected_size(14_155_776) == 1_415_578
    assert SuperLoRAConfig(projection="fastfood", ratio=0.001).projected_size(10) == 1


# ---------------------------------------------------------------- plan errors
def test_plan_errors() -> None:
    with pytest.raises(TypeError, match="config must be a SuperLoRAConfig"):
        SuperLoRA({"rank": 2}, [(2, 2)])
    with pytest.raises(ValueError, match="grouping='layer' needs the target names"):
        SuperLoRA(SuperLoRAConfig(grouping="layer"), [(2, 2)])
    with pytest.raises(ValueError, match="names has 1 entries but shapes has 2"):
        SuperLoRA(SuperLoRAConfig(), [(2, 2), (2, 2)], names=["a"])
    with pytest.raises(ValueError, match="fold='matrix' needs one weight per group"):
        SuperLoRA(presets.lora(2).replace(grouping=1), [(2, 2), (2, 2)])
    with pytest.raises(ValueError, match="fold='matrix' needs whole-weight groups"):
        SuperLoRA(presets.lora(2).replace(grouping=3), [(2, 2), (2, 2)])
    with pytest.raises(ValueError, match="fold='layers' stacks weights of one shape"):
        SuperLoRA(presets.lotr(2, 2), [(2, 2), (2, 3)])
    with pytest.raises(ValueError, match=r"fixed identity mode 0 needs rank\[0\] = the fold size 3"):
        SuperLoRA(presets.lotr(2, 2), [(2, 2)] * 3)
    with pytest.raises(ValueError, match=r"fold shape \(2, 2\) holds 4 entries, fewer than the n_g = 6"):
        SuperLoRA(SuperLoRAConfig(fold=(2, 2)), [(2, 3)])


def test_lotr_takes_the_number_of_weights_from_the_shapes() -> None:
    shapes = [(6, 5)] * 4
    implicit, explicit = SuperLoRA(presets.lotr(2), shapes), SuperLoRA(presets.lotr(2, 4), shapes)
    assert implicit.groups == explicit.groups
    assert implicit.parameter_shapes() == explicit.parameter_shapes()
    params = implicit.init(1, dtype=np.float64, zero=False)
    for a, b in zip(implicit.delta(params), explicit.delta(params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert count_params(presets.lotr(2), [(768, 768)] * 24) == 3_168
    with pytest.raises(ValueError, match=r"fold='layers' stacks weights of one shape; group 0 has shapes "
                                         r"\[\(6, 5\), \(6, 4\)\] \(LoTR needs equal-shape targets"):
        SuperLoRA(presets.lotr(2), [(6, 5), (6, 4)])


def test_layer_grouping_uses_parent_module_names() -> None:
    names = ["l0.attn.q", "l0.attn.v", "l1.attn.q", "l1.attn.v", "head"]
    plan = SuperLoRA(SuperLoRAConfig(grouping="layer"), [(4, 4)] * 5, names=names)
    assert plan.grouping.members == ((0, 1), (2, 3), (4,))


# ---------------------------------------------------------------- properties over random plans
@given(plan=plans(), seed=st.integers(0, 2**31 - 1))
def test_count_params_equals_init_entries(plan, seed) -> None:
    params = plan.init(seed, dtype=np.float64)
    assert plan.num_params == sum(v.size for v in params.values())
    assert count_params(plan.config, plan.shapes) == plan.num_params
    assert {k: v.shape for k, v in params.items()} == plan.parameter_shapes()


@given(plan=plans(), seed=st.integers(0, 2**31 - 1))
def test_vjp_matches_finite_differences_of_delta(plan, seed) -> None:
    params = plan.init(seed, dtype=np.float64, zero=False)
    cots = _random_cotangents(plan, seed)
    grads = plan.vjp(params, cots)
    assert set(grads) == set(params)
    rng = np.random.default_rng(seed)
    eps = 1e-6
    for name, value in params.items():
        direction = rng.standard_normal(value.shape)
        plus = inner(plan.delta({**params, name: value + eps * direction}), cots)
        minus = inner(plan.delta({**params, name: value - eps * direction}), cots)
        numeric = (plus - minus) / (2 * eps)
        analytic = inner(grads[name], direction)
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(numeric)), name


@given(plan=plans(), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_delta_for_equals_the_matching_slices_of_delta(plan, seed, data) -> None:
    params = plan.init(seed, dtype=np.float64, zero=False)
    full = plan.delta(params)
    indices = data.draw(st.lists(st.integers(0, len(plan.shapes) - 1), min_size=1, max_size=3))
    for i, d in zip(indices, plan.delta_for(params, indices), strict=True):
        np.testing.assert_array_equal(d, full[i])


@given(plan=plans(), seed=st.integers(0, 2**31 - 1))
def test_init_is_a_no_op_with_a_live_gradient(plan, seed) -> None:
    params = plan.init(seed, dtype=np.float64)
    for d in plan.delta(params):
        assert np.count_nonzero(d) == 0
    cots = _random_cotangents(plan, seed)
    grads = plan.vjp(params, cots)
    # the zero block of every group receives a gradient at step 0 ...
    for group in plan.groups:
        k = len(group.splits)
        name = param_name(group.index, k, group.splits[-1].zero_block)
        assert np.any(grads[name] != 0), name
    # ... and after one SGD step every trainable array does (no dead blocks)
    stepped = {k: v - 0.1 * grads[k] for k, v in params.items()}
    after = plan.vjp(stepped, cots)
    dead = [k for k, v in after.items() if not np.any(v != 0)]
    assert not dead


def test_same_seed_same_parameters_on_every_backend(backend) -> None:
    plan = SuperLoRA(presets.lorta(3, 2, 2), [(5, 4), (3, 3)])
    xp_module = {"numpy": np, "array_api_strict": __import__("array_api_strict")}.get(backend.name)
    if xp_module is None:
        import torch as xp_module
    params = plan.init(7, xp=xp_module, dtype=xp_module.float64, zero=False)
    reference = plan.init(7, dtype=np.float64, zero=False)
    for name in reference:
        np.testing.assert_array_equal(np_(params[name]), reference[name])
    cots = [backend(c) for c in _random_cotangents(plan)]
    grads = plan.vjp(params, cots)
    ref_grads = plan.vjp(reference, _random_cotangents(plan))
    for name in ref_grads:
        np.testing.assert_allclose(np_(grads[name]), ref_grads[name], rtol=1e-12, atol=1e-12)
    for got, want in zip(plan.delta(params), plan.delta(reference), strict=True):
        np.testing.assert_allclose(np_(got), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", [presets.lora(2), presets.lokr(2), presets.loha(2), presets.lotr(2, 2),
                                    presets.lonkr(3, 2, 2), presets.lorta(4, 2, 2),
                                    presets.with_projection(presets.lorta(3, 2), "fastfood", 0.3)],
                         ids=["lora", "lokr", "loha", "lotr", "lonkr", "lorta", "fastfood"])
def test_torch_float32_matches_numpy(config) -> None:
    import torch

    plan = SuperLoRA(config, [(8, 6), (8, 6)])
    params = plan.init(1, xp=torch, zero=False)
    ref = plan.init(1, dtype=np.float64, zero=False)
    for got, want in zip(plan.delta(params), plan.delta(ref), strict=True):
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)


def test_param_errors() -> None:
    plan = SuperLoRA(presets.lora(2), [(3, 4)])
    params = plan.init()
    with pytest.raises(ValueError, match=r"missing \['g0.split1.factor1'\]"):
        plan.delta({"g0.split1.factor0": params["g0.split1.factor0"]})
    with pytest.raises(ValueError, match=r"params\['g0.split1.factor0'\] must have shape \(3, 2\)"):
        plan.delta({**params, "g0.split1.factor0": np.zeros((2, 2), np.float32)})
    with pytest.raises(TypeError, match="params must be a mapping"):
        plan.delta([params])
    with pytest.raises(ValueError, match="cotangents must be a list of 1 arrays"):
        plan.vjp(params, [])
    with pytest.raises(TypeError, match="share a dtype"):
        plan.delta({**params, "g0.split1.factor0": np.zeros((3, 2))})


def test_describe_lists_every_group() -> None:
    plan = SuperLoRA(presets.lorta(3, 4, 4), [(768, 768)] * 24)
    text = plan.describe()
    assert "trainable = 11,436" in text or f"trainable = {plan.num_params:,}" in text
    assert len(text.splitlines()) == 2 + 4
    assert "tucker[" in text


# ---------------------------------------------------------------- budget
def test_budget_for_7b_shapes_is_fast_and_sorted() -> None:
    shapes = [(4096, 4096)] * 64
    start = time.perf_counter()
    entries = budget(shapes, 1_000_000)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0  # generous bound for a loaded CI machine; measured ≈ 0.3 s
    assert entries and all(e.params <= 1_000_000 for e in entries)
    assert [e.params for e in entries] == sorted(e.params for e in entries)
    assert {e.family for e in entries} >= {"lorta", "lonkr", "fastfood", "lotr"}
    for entry in entries[:: max(1, len(entries) // 10)]:
        assert count_params(entry.config, shapes) == entry.params


def test_budget_errors_and_families() -> None:
    with pytest.raises(ValueError, match="families must be among"):
        budget([(4, 4)], 100, families=["vera"])
    assert all(e.family == "lora" for e in budget([(8, 8)], 10**6, families=["lora"]))
    assert budget([(8, 8), (8, 4)], 10**6, families=["lotr"]) == []  # LoTR needs equal shapes


# ---------------------------------------------------------------- components (what the torch bindings use)
def _params_of(plan, params, groups):
    keep = set(plan.parameter_shapes(groups))
    return {k: v for k, v in params.items() if k in keep}


@given(plan=plans(), seed=st.integers(0, 2**31 - 1))
def test_components_partition_targets_and_groups_and_match_delta_and_vjp(plan, seed) -> None:
    components = plan.components()
    targets = [t for ts, _ in components for t in ts]
    groups = [g for _, gs in components for g in gs]
    assert sorted(targets) == list(range(len(plan.shapes)))
    assert sorted(groups) == list(range(len(plan.groups)))
    params = plan.init(seed, dtype=np.float64, zero=False)
    full_delta = plan.delta(params)
    cots = _random_cotangents(plan, seed)
    full_grads = plan.vjp(params, cots)
    seen: set[str] = set()
    for ts, gs in components:
        local = _params_of(plan, params, gs)
        seen |= set(local)
        for t, d in zip(ts, plan.delta_for(local, ts), strict=True):
            np.testing.assert_array_equal(d, full_delta[t])
        grads = plan.vjp_for(local, ts, [cots[t] for t in ts])
        assert set(grads) == set(local)
        for name, value in grads.items():
            np.testing.assert_allclose(value, full_grads[name], rtol=1e-12, atol=1e-12)
    assert seen == set(params)


def test_components_of_common_groupings() -> None:
    shapes = [(6, 8), (6, 8), (4, 5), (7, 3)]
    assert SuperLoRA(presets.lora(2), shapes).components() == tuple(((i,), (i,)) for i in range(4))
    assert SuperLoRA(presets.lorta(3, 2, groups=1), shapes).components() == (((0, 1, 2, 3), (0,)),)
    # an integer G cuts through weights: groups 0..2 over targets 0..3 chain them into one component
    assert SuperLoRA(SuperLoRAConfig(rank=2, order=3, grouping=3), shapes).components() == (((0, 1, 2, 3), (0, 1, 2)),)
    explicit = SuperLoRA(SuperLoRAConfig(rank=2, order=3, grouping=((0, 2), (1,), (3,))), shapes)
    assert explicit.components() == (((0, 2), (0,)), ((1,), (1,)), ((3,), (2,)))
    glob = presets.with_projection(presets.lorta(3, 2, groups=2), "shuffle", scope="global")
    assert SuperLoRA(glob, shapes).components() == (((0, 1, 2, 3), (0, 1)),)


def test_vjp_for_errors() -> None:
    plan = SuperLoRA(SuperLoRAConfig(rank=2, order=3, grouping=((0, 2), (1,), (3,))), [(6, 8), (6, 8), (4, 5), (7, 3)])
    params = plan.init(0, zero=False)
    cots = _random_cotangents(plan)
    with pytest.raises(ValueError, match=r"not closed under their groups \[0\].*feed targets \[2\]"):
        plan.vjp_for(params, [0], [cots[0]])
    with pytest.raises(ValueError, match="must not repeat"):
        plan.vjp_for(params, [1, 1], [cots[1], cots[1]])
    with pytest.raises(ValueError, match="cotangents must be a list of 1"):
        plan.vjp_for(params, [1], [cots[1], cots[3]])
    with pytest.raises(ValueError, match=r"cotangent of target 1 must have shape \(6, 8\)"):
        plan.vjp_for(params, [1], [cots[0][:, :3]])
    with pytest.raises(ValueError, match="missing"):  # params of group 1 only, but target 3 needs group 2
        plan.delta_for(_params_of(plan, params, [1]), [3])
