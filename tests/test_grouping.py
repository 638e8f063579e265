"""Concatenation of targets, grouping maps (fold and stack layouts) and their adjoints."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tensoradapt import ops

from .conftest import inner, np_


def _random_outputs(rng, grouping):
    return [rng.standard_normal(grouping.group_shape(g)) for g in range(grouping.num_groups)]


def test_array_split_sizes_and_offsets() -> None:
    g = ops.Grouping([(2, 5)], grouping=3)  # N = 10, G = 3
    assert g.sizes == (4, 3, 3) and g.bounds == (0, 4, 7, 10)


def test_vit_qv_sizes() -> None:
    shapes = [(768, 768)] * 24
    for parts in (1, 2, 3, 4, 6, 8, 12, 24):
        g = ops.Grouping(shapes, grouping=parts)
        assert set(g.sizes) == {14_155_776 // parts}
    assert ops.Grouping(shapes).sizes == (589_824,) * 24


def test_concat_split_targets_are_inverse_and_adjoint(backend) -> None:
    rng = np.random.default_rng(0)
    shapes = [(2, 3), (4,), (1, 2, 2)]
    ws = [rng.standard_normal(s) for s in shapes]
    delta = ops.concat_targets(backend.many(ws))
    np.testing.assert_array_equal(np_(delta), np.concatenate([w.reshape(-1) for w in ws]))
    back = ops.split_targets(delta, shapes)
    for w, b in zip(ws, back, strict=True):
        np.testing.assert_array_equal(np_(b), w)
    d = rng.standard_normal(delta.shape[0])
    assert inner(delta, d) == pytest.approx(inner(ws, ops.split_targets(backend(d), shapes)), rel=1e-13)


def test_fold_layout_matches_a_dense_reference(backend) -> None:
    rng = np.random.default_rng(1)
    shapes = [(3, 4), (3, 2), (5, 2)]
    for spec in ("weight", 1, 2, 3, 7, [[2], [0, 1]], [[1, 0, 2]]):
        g = ops.Grouping(shapes, spec)
        outs = _random_outputs(rng, g)
        targets = g.to_targets(backend.many(outs))
        # reference: concatenate group outputs, then hand out entries in concatenation order
        delta = np.concatenate(outs)
        offset, expected = 0, {}
        for i in g.order:
            size = int(np.prod(shapes[i]))
            expected[i] = delta[offset : offset + size].reshape(shapes[i])
            offset += size
        for i, t in enumerate(targets):
            np.testing.assert_array_equal(np_(t), expected[i])


def test_explicit_lists_define_concatenation_order() -> None:
    g = ops.Grouping([(1, 2), (1, 3), (1, 1)], [[2, 0], [1]])
    assert g.order == (2, 0, 1) and g.sizes == (3, 3) and g.members == ((2, 0), (1,))
    out = g.to_targets([np.array([9.0, 1.0, 2.0]), np.array([3.0, 4.0, 5.0])])
    assert [o.tolist() for o in out] == [[[1.0, 2.0]], [[3.0, 4.0, 5.0]], [[9.0]]]


def test_stack_layout_is_horizontal_concatenation(backend) -> None:
    shapes = [(3, 4), (3, 2), (5, 2), (5, 1)]
    g = ops.Grouping(shapes, 2, layout="stack")
    assert g.members == ((0, 1), (2, 3))
    assert g.group_shape(0) == (3, 6) and g.group_shape(1) == (5, 3)
    rng = np.random.default_rng(2)
    ws = [rng.standard_normal(s) for s in shapes]
    outs = [np.concatenate(ws[:2], axis=1), np.concatenate(ws[2:], axis=1)]
    for w, t in zip(ws, g.to_targets(backend.many(outs)), strict=True):
        np.testing.assert_array_equal(np_(t), w)
    for o, back in zip(outs, g.from_targets(backend.many(ws)), strict=True):
        np.testing.assert_array_equal(np_(back), o)


def test_stack_vit_qv_parameter_shapes() -> None:
    g = ops.Grouping([(768, 768)] * 24, 1, layout="stack")
    assert g.group_shape(0) == (768, 24 * 768)


@given(
    shapes=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=5),
    parts=st.integers(1, 12),
    layout=st.sampled_from(["fold", "stack"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_to_targets_and_from_targets_are_adjoint_inverse(shapes, parts, layout, seed) -> None:
    if layout == "stack":
        shapes = [(shapes[0][0], s[1]) for s in shapes]  # equal rows
        parts = min(parts, len(shapes))
    parts = min(parts, sum(a * b for a, b in shapes))
    g = ops.Grouping(shapes, parts, layout=layout)
    rng = np.random.default_rng(seed)
    outs = _random_outputs(rng, g)
    cots = [rng.standard_normal(s) for s in shapes]
    targets = g.to_targets(outs)
    assert inner(targets, cots) == pytest.approx(inner(outs, g.from_targets(cots)), rel=1e-12, abs=1e-12)
    for a, b in zip(g.from_targets(targets), outs, strict=True):  # a re-indexing: adjoint = inverse
        np.testing.assert_array_equal(a, b)
    if layout == "fold":
        delta = np.concatenate(outs)
        for a, b in zip(g.split(g.merge(outs)), g.split(delta), strict=True):
            np.testing.assert_array_equal(a, b)


def test_partial_targets_need_only_their_groups() -> None:
    shapes = [(2, 2), (2, 3), (3, 3)]
    g = ops.Grouping(shapes, 4)  # N = 19 → sizes (5, 5, 5, 4); target 1 spans groups 0 and 1
    assert g.groups_for([1]) == (0, 1)
    rng = np.random.default_rng(3)
    outs = _random_outputs(rng, g)
    full = g.to_targets(outs)
    (one,) = g.to_targets({0: outs[0], 1: outs[1]}, targets=[1])
    np.testing.assert_array_equal(one, full[1])
    with pytest.raises(ValueError, match=r"outputs lacks groups \[1\]"):
        g.to_targets({0: outs[0]}, targets=[1])


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (([],), {}, "shapes must be a non-empty sequence"),
        (([(2, 0)],), {}, r"shapes\[0\]\[1\] must be >= 1, got 0"),
        (([(2, 2)], "layer"), {}, "grouping must be 'weight', an integer G or membership lists"),
        (([(2, 2)], 5), {}, r"grouping \(G = 5\) must be <= N = 4"),
        (([(2, 2)], 0), {}, "grouping must be >= 1, got 0"),
        (([(2, 2), (2, 2)], [[0]]), {}, "must partition the 2 targets"),
        (([(2, 2), (2, 2)], [[0, 0, 1]]), {}, "must partition the 2 targets"),
        (([(2, 2), (2, 2)], [[0], []]), {}, r"grouping\[1\] must be a non-empty list"),
        (([(2, 2)],), {"layout": "rows"}, "layout must be one of"),
        (([(2, 2), (3, 2)], 1), {"layout": "stack"}, "same row count; group 0 has target 0: 2, target 1: 3"),
        (([(2, 2), (2, 2)], 3), {"layout": "stack"}, r"G = 3\) must be <= the 2 targets for the stack"),
        (([(4,)],), {"layout": "stack"}, "stack layout needs weights with at least 2 modes"),
    ],
)
def test_grouping_errors(args, kwargs, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        ops.Grouping(*args, **kwargs)


def test_map_errors() -> None:
    g = ops.Grouping([(2, 2), (1, 3)])
    with pytest.raises(ValueError, match="expected a list of 2 group arrays"):
        g.to_targets([np.ones(4)])
    with pytest.raises(ValueError, match=r"group 1 must have shape \(3,\), got \(4,\)"):
        g.to_targets([np.ones(4), np.ones(4)])
    with pytest.raises(ValueError, match=r"cotangents\[0\] must have the target shape \(2, 2\)"):
        g.from_targets([np.ones(4), np.ones((1, 3))])
    with pytest.raises(ValueError, match="delta must be 1-D with N = 7 entries"):
        g.split(np.ones(6))
    with pytest.raises(ValueError, match=r"targets must be < the number of targets \(2\)"):
        g.groups_for([2])
    with pytest.raises(ValueError, match=r"delta must be 1-D with N = 7"):
        ops.split_targets(np.ones(6), [(2, 2), (1, 3)])
    with pytest.raises(ValueError, match=r"g must be < the number of groups \(2\)"):
        g.group_shape(2)


def test_group_cotangents_are_views_when_a_group_is_one_weight() -> None:
    shapes = [(2, 3), (4, 1)]
    g = ops.Grouping(shapes)
    cots = [np.arange(6.0).reshape(2, 3), np.arange(4.0).reshape(4, 1)]
    first, second = g.from_targets(cots)
    assert np.shares_memory(first, cots[0]) and np.shares_memory(second, cots[1])
    (only,) = g.from_targets(cots, groups=[1])
    np.testing.assert_array_equal(only, [0, 1, 2, 3])
    padded = g.group_cotangent(np, cots, 0, pad_to=8)
    np.testing.assert_array_equal(padded, [0, 1, 2, 3, 4, 5, 0, 0])
