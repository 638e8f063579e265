"""One target's ΔW and VJP from slabs of its groups (docs/math.md §3.2.3): equal to the whole-group
path on every preset, fold and grouping, on every backend, and proportional to the target."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tensoradapt import SuperLoRA, SuperLoRAConfig, ops, presets
from tensoradapt.superlora import generator, slices

from .conftest import inner, np_

RTOL, ATOL = 1e-10, 1e-12


# ---------------------------------------------------------------- strategies
def _shapes(draw, count=(1, 3), side=(1, 9), equal=False, rows=None):
    n = draw(st.integers(*count))
    one = st.tuples(st.integers(*side) if rows is None else st.just(rows), st.integers(*side))
    if equal:
        return [draw(one)] * n
    return [draw(one) for _ in range(n)]


def _lists(draw, n):
    """Membership lists: a random partition of the targets, in a random order."""
    order = draw(st.permutations(range(n)))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, n - 1)), max_size=n - 1))) if n > 1 else []
    bounds = [0, *cuts, n]
    return tuple(tuple(order[a:b]) for a, b in itertools.pairwise(bounds) if a < b)


def _grouping(draw, n, total):
    kind = draw(st.sampled_from(["int", "weight", "int", "lists"]))  # integers G cut through weights
    if kind == "weight":
        return "weight"
    if kind == "int":
        return draw(st.integers(1, min(3, total)))
    return _lists(draw, n)


FAMILIES = ("lora", "lokr", "krona", "loha", "lotr", "layers", "lonkr", "lorta", "dense", "explicit", "stack")


@st.composite
def sliceable_plans(draw, family):
    """Plans of one preset family or fold, with groupings that cut through weights, no projection."""
    scale = draw(st.sampled_from([1.0, 0.5, 2.0]))
    rank = draw(st.integers(1, 3))
    if family in ("lora", "lokr", "krona", "loha"):
        shapes = _shapes(draw, side=(1, 12))
        single = draw(st.sampled_from(["weight", "lists"]))
        grouping = "weight" if single == "weight" else tuple((i,) for i in draw(st.permutations(range(len(shapes)))))
        config = {"lora": lambda: presets.lora(rank),
                  "lokr": lambda: presets.lokr(rank, draw(st.sampled_from([-1, 2, 3])), draw(st.booleans())),
                  "krona": lambda: presets.krona(draw(st.sampled_from([-1, 2, 3]))),
                  "loha": lambda: presets.loha(rank)}[family]()
        config = config.replace(grouping=grouping)
    elif family in ("lotr", "layers"):
        shapes = _shapes(draw, count=(1, 4), equal=True)
        config = presets.lotr(rank) if family == "lotr" else SuperLoRAConfig(
            rank=rank, order=3, core=draw(st.sampled_from(["cp", "identity", "tucker"])), fold="layers", grouping=1)
    elif family == "stack":
        shapes = _shapes(draw, rows=draw(st.integers(1, 8)))
        grouping = draw(st.one_of(st.just("weight"), st.integers(1, len(shapes))))
        config = SuperLoRAConfig(rank=rank, layout="stack", grouping=grouping)
    else:
        shapes = _shapes(draw)
        grouping = _grouping(draw, len(shapes), sum(math.prod(s) for s in shapes))
        if family == "lonkr":
            config = presets.lonkr(draw(st.integers(2, 3)), rank, draw(st.sampled_from([None, 1, 2, 3])), grouping)
        elif family == "lorta":
            config = presets.lorta(draw(st.integers(2, 4)), rank, grouping,
                                   draw(st.sampled_from(["tucker", "cp", "identity"])))
        elif family == "dense":
            config = presets.dense(grouping)
        else:
            config = _explicit_fold(draw, shapes, grouping, rank)
    if config.alpha is None:
        config = config.replace(scale=scale)
    try:
        return SuperLoRA(config, shapes)
    except ValueError:  # e.g. a split rule the shapes do not allow
        assume(False)
        raise


def _explicit_fold(draw, shapes, grouping, rank):
    """An explicit fold shape large enough for the largest group (the last side completes it)."""
    largest = max(ops.Grouping(shapes, grouping).sizes)
    lead = draw(st.lists(st.integers(1, 5), min_size=1, max_size=2))
    fold = (*lead, -(-largest // math.prod(lead)))
    splits = draw(st.integers(1, 2))
    return SuperLoRAConfig(rank=rank, order=len(fold), fold=fold, splits=splits,
                           core=draw(st.sampled_from(["tucker", "cp", "identity", "dense"])), grouping=grouping)


# ---------------------------------------------------------------- helpers
def _subset(plan, params, index):
    keep = set(plan.parameter_shapes(plan.groups_for([index])))
    return {k: v for k, v in params.items() if k in keep}


def _reference_vjp(plan, params, index, cot):
    """The whole plan's VJP with ``cot`` for target ``index`` and zeros elsewhere, restricted to
    the arrays of the groups that feed ``index``."""
    full = [np.zeros(s) for s in plan.shapes]
    full[index] = cot
    grads = plan.vjp(params, full)
    return {k: grads[k] for k in plan.parameter_shapes(plan.groups_for([index]))}


def _close(got, want):
    np.testing.assert_allclose(np_(got), want, rtol=RTOL, atol=ATOL * max(1.0, float(np.max(np.abs(want), initial=0))))


# ---------------------------------------------------------------- equality with the whole-group path
@pytest.mark.parametrize("family", FAMILIES)
@given(seed=st.integers(0, 2**31 - 1), data=st.data())
def test_delta_target_and_vjp_target_equal_the_whole_group_path(family, seed, data) -> None:
    plan = data.draw(sliceable_plans(family), label="plan")
    params = plan.init(seed, dtype=np.float64, zero=False)
    rng = np.random.default_rng(seed)
    for i in range(len(plan.shapes)):
        assert plan.sliceable(i)
        given_params = _subset(plan, params, i) if data.draw(st.booleans()) else params
        got = plan.delta_target(given_params, i)
        assert got.shape == plan.shapes[i]
        _close(got, plan.delta_for(params, [i])[0])
        cot = rng.standard_normal(plan.shapes[i])
        grads = plan.vjp_target(given_params, i, cot)
        want = _reference_vjp(plan, params, i, cot)
        assert set(grads) == set(want)
        for name, value in want.items():
            assert grads[name].shape == value.shape, name
            _close(grads[name], value)


@pytest.mark.parametrize(("config", "shapes"), [
    (presets.lonkr(3, 2, 2, groups=2), [(5, 6), (3, 4)]),
    (presets.loha(2).replace(scale=0.5), [(6, 5)]),
    (presets.lorta(3, 2, groups=3, core="cp").replace(scale=2.0), [(5, 6), (4, 3)]),
], ids=["lonkr-dense-G2", "loha", "lorta-cp-G3"])
def test_vjp_target_matches_finite_differences(config, shapes) -> None:
    plan = SuperLoRA(config, shapes)
    params = plan.init(5, dtype=np.float64, zero=False)
    rng = np.random.default_rng(5)
    eps = 1e-6
    for i in range(len(shapes)):
        cot = rng.standard_normal(shapes[i])
        grads = plan.vjp_target(params, i, cot)
        for name, analytic in grads.items():
            direction = rng.standard_normal(params[name].shape)
            plus = inner(plan.delta_target({**params, name: params[name] + eps * direction}, i), cot)
            minus = inner(plan.delta_target({**params, name: params[name] - eps * direction}, i), cot)
            numeric = (plus - minus) / (2 * eps)
            assert abs(numeric - inner(analytic, direction)) <= 1e-6 * max(1.0, abs(numeric)), (i, name)


@pytest.mark.parametrize(("config", "shapes"), [
    (presets.lonkr(3, 2, 2, groups=2), [(5, 6), (3, 4)]),
    (presets.lotr(2), [(4, 5)] * 3),
    (presets.lokr(1, decompose_both=True), [(12, 18)]),
    (SuperLoRAConfig(rank=2, layout="stack", grouping=1, scale=0.5), [(4, 3), (4, 5)]),
], ids=["lonkr", "lotr", "lokr-both", "stack"])
def test_every_backend_gives_the_numpy_result(backend, config, shapes) -> None:
    plan = SuperLoRA(config, shapes)
    params = plan.init(2, dtype=np.float64, zero=False)
    on_backend = {k: backend(v) for k, v in params.items()}
    rng = np.random.default_rng(2)
    for i in range(len(shapes)):
        got = plan.delta_target(on_backend, i)
        np.testing.assert_allclose(np_(got), plan.delta_for(params, [i])[0], rtol=1e-12, atol=1e-12)
        cot = rng.standard_normal(shapes[i])
        grads = plan.vjp_target(on_backend, i, backend(cot))
        for name, value in _reference_vjp(plan, params, i, cot).items():
            np.testing.assert_allclose(np_(grads[name]), value, rtol=1e-10, atol=1e-12)


def test_float32_torch_is_close_to_float64() -> None:
    torch = pytest.importorskip("torch")
    plan = SuperLoRA(presets.lorta(3, 3, groups=2), [(9, 7), (6, 8), (5, 5)])
    params = plan.init(4, xp=torch, zero=False)
    for i in range(3):
        got = plan.delta_target(params, i)
        want = plan.delta_for(params, [i])[0]
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- cost: a slab, never the group
def _recording(monkeypatch, module, name, arguments=False):
    """Wrap ``module.name`` to record the entries of every array it returns (or, with
    ``arguments``, of every array it is given)."""
    sizes: list[int] = []
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        for x in args if arguments else (out if isinstance(out, (list, tuple)) else [out]):
            if hasattr(x, "shape"):
                sizes.append(math.prod(x.shape))
        return out

    monkeypatch.setattr(module, name, wrapped)
    return sizes


def test_delta_target_generates_a_slab_not_the_group(monkeypatch) -> None:
    plan = SuperLoRA(presets.lorta(3, 4, groups=1), [(64, 64)] * 8)
    (group,) = plan.groups
    rows = math.prod(group.shape[1:])
    params = plan.init(0, zero=False)
    whole = _recording(monkeypatch, generator, "tucker_to_tensor")
    plan.delta_for(params, [3])
    assert max(whole) == math.prod(group.shape)  # the probe sees a whole-group generation
    seen = _recording(monkeypatch, slices, "tucker_to_tensor")
    target = 64 * 64
    for i in (0, 3, 7):
        seen.clear()
        plan.delta_target(params, i)
        assert seen and max(seen) <= target + 2 * rows < math.prod(group.shape) // 2
    given_to_vjp = _recording(monkeypatch, slices, "tucker_vjp", arguments=True)
    plan.vjp_target(params, 5, np.ones((64, 64), np.float32))
    assert given_to_vjp and max(given_to_vjp) <= target + 2 * rows  # the slab's cotangent, not the group's


def test_kronecker_slab_is_proportional_to_the_target(monkeypatch) -> None:
    plan = SuperLoRA(presets.lonkr(2, 2, 4, groups=1), [(64, 64)] * 8)
    (group,) = plan.groups
    rows = math.prod(group.shape[1:])
    params = plan.init(0, zero=False)
    products = _recording(monkeypatch, slices, "kron_rows")
    parts = _recording(monkeypatch, slices, "split_slab")
    plan.delta_target(params, 6)
    assert products and max(products) <= 64 * 64 + 2 * rows
    assert max(parts) <= max(math.prod(s.shape) for s in group.splits)


# ---------------------------------------------------------------- what cannot be sliced
@pytest.mark.parametrize("config", [
    presets.with_projection(presets.lorta(3, 2, groups=2), "fastfood", 0.5),
    presets.with_projection(presets.lorta(3, 2, groups=2), "shuffle"),
    presets.with_projection(presets.lorta(3, 2, groups=2), "shuffle", scope="global"),
    presets.with_projection(presets.lora(2), "fastfood", 1.0),
], ids=["fastfood", "shuffle", "global-shuffle", "lora-fastfood"])
def test_projections_are_not_sliceable(config) -> None:
    plan = SuperLoRA(config, [(6, 5), (4, 4)])
    params = plan.init(0, dtype=np.float64, zero=False)
    assert not plan.sliceable(0) and not plan.sliceable(1)
    with pytest.raises(ValueError, match="not sliceable: a target is generated on its own only without a projection"):
        plan.delta_target(params, 0)
    with pytest.raises(ValueError, match=f"projection={config.projection!r}"):
        plan.vjp_target(params, 1, np.zeros((4, 4)))


def test_errors() -> None:
    plan = SuperLoRA(SuperLoRAConfig(rank=2, order=3, grouping=((0, 2), (1,))), [(6, 8), (4, 4), (3, 5)])
    params = plan.init(0, dtype=np.float64, zero=False)
    with pytest.raises(ValueError, match="targets must be < the number of targets"):
        plan.sliceable(3)
    with pytest.raises(ValueError, match="missing"):  # target 0 needs group 0, not group 1
        plan.delta_target(_subset(plan, params, 1), 0)
    with pytest.raises(ValueError, match=r"cotangent of target 1 must have shape \(4, 4\)"):
        plan.vjp_target(params, 1, np.zeros((4, 3)))
    with pytest.raises(TypeError, match="share a dtype"):
        plan.vjp_target(params, 1, np.zeros((4, 4), np.float32))


# ---------------------------------------------------------------- Grouping.target_pieces / target_columns
@given(shapes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=4), data=st.data())
def test_target_pieces_rebuild_to_targets(shapes, data) -> None:
    total = sum(math.prod(s) for s in shapes)
    grouping = ops.Grouping(shapes, _grouping(data.draw, len(shapes), total))
    outs = [np.random.default_rng(g).standard_normal(n) for g, n in enumerate(grouping.sizes)]
    for i, want in enumerate(grouping.to_targets(outs)):
        pieces = grouping.target_pieces(i)
        assert [g for g, _, _ in pieces] == list(grouping.groups_for([i]))
        assert sum(b - a for _, a, b in pieces) == math.prod(shapes[i])
        np.testing.assert_array_equal(np.concatenate([outs[g][a:b] for g, a, b in pieces]).reshape(shapes[i]), want)


def test_target_pieces_and_columns_refuse_the_other_layout() -> None:
    fold, stack = ops.Grouping([(2, 3), (2, 4)], 1), ops.Grouping([(2, 3), (2, 4)], 1, layout="stack")
    assert fold.target_pieces(1) == ((0, 6, 14),) and stack.target_columns(1) == (0, 3, 7)
    with pytest.raises(ValueError, match="applies to the fold layout"):
        stack.target_pieces(0)
    with pytest.raises(ValueError, match="applies to the stack layout"):
        fold.target_columns(0)
    with pytest.raises(ValueError, match="target must be < the number of targets"):
        fold.target_pieces(2)
