"""fold_side, cubic_fold_shape, Cut and its adjoint Pad; the two former fold_shape names warn."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tensoradapt import SuperLoRAConfig, cubic_fold_shape, fold_side, ops
from tensoradapt.superlora import plan

from .conftest import inner, np_


@pytest.mark.parametrize(
    ("n", "order", "side"),
    [(10, 2, 4), (10, 3, 3), (27, 3, 3), (28, 3, 4), (1000, 3, 10), (3125, 5, 5), (3126, 5, 6),
     (14155776, 2, 3763), (14155776, 3, 242), (14155776, 4, 62), (14155776, 5, 27),
     (589824, 3, 84), (1, 7, 1), (5, 1, 5)],
)
def test_spec_vectors(n: int, order: int, side: int) -> None:
    assert fold_side(n, order) == side
    assert cubic_fold_shape(n, order) == (side,) * order


@given(n=st.integers(1, 10**30), order=st.integers(1, 12))
def test_fold_side_is_the_exact_ceiling_root(n: int, order: int) -> None:
    d = fold_side(n, order)
    assert d**order >= n
    assert d == 1 or (d - 1) ** order < n


def test_fold_side_errors() -> None:
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        fold_side(0, 2)
    with pytest.raises(ValueError, match="order must be >= 1, got 0"):
        fold_side(10, 0)
    with pytest.raises(TypeError, match="n must be an integer, got float"):
        fold_side(10.0, 2)


@given(n=st.integers(1, 60), order=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_cut_pad_identity_and_adjoint(n: int, order: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = cubic_fold_shape(n, order)
    v, x = rng.standard_normal(n), rng.standard_normal(shape)
    padded = ops.pad(v, shape)
    assert padded.shape == shape
    np.testing.assert_array_equal(ops.cut(padded, n), v)  # Cut ∘ Pad = I
    assert np.count_nonzero(np_(padded).reshape(-1)[n:]) == 0
    assert inner(ops.cut(x, n), v) == pytest.approx(inner(x, ops.pad(v, shape)), rel=1e-12)
    np.testing.assert_array_equal(ops.cut_vjp(v, shape), padded)


def test_cut_is_row_major_first_entries(backend) -> None:
    x = backend(np.arange(12.0).reshape(3, 4))
    np.testing.assert_array_equal(np_(ops.cut(x, 5)), [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(np_(ops.pad(backend(np.array([1.0, 2.0, 3.0])), (2, 2))),
                                  [[1, 2], [3, 0]])


def test_cut_pad_errors() -> None:
    with pytest.raises(ValueError, match=r"n must be <= the number of entries of x \(4"):
        ops.cut(np.ones((2, 2)), 5)
    with pytest.raises(ValueError, match=r"shape \(2, 2\) holds 4 entries, fewer than the 5"):
        ops.pad(np.ones(5), (2, 2))
    with pytest.raises(ValueError, match="v must be 1-D"):
        ops.pad(np.ones((2, 2)), (4,))
    with pytest.raises(ValueError, match=r"shape\[1\] must be >= 1, got 0"):
        ops.pad(np.ones(2), (2, 0))
    with pytest.raises(TypeError, match="real floating"):
        ops.cut(np.ones(3, dtype=np.int32), 2)


def test_the_former_fold_shape_names_warn_and_give_the_same_result() -> None:
    """``fold_shape`` named two functions: ``ops.fold.cubic_fold_shape(n, M)`` (the cube holding n
    entries) and ``plan.group_fold_shape(config, grouping, g, n)`` (the shape group g is generated
    in); the old names still work, with a DeprecationWarning naming the new one."""
    import tensoradapt

    for old in (tensoradapt.fold_shape, ops.fold_shape, ops.fold.fold_shape):
        with pytest.warns(DeprecationWarning, match=r"ops\.fold\.fold_shape is deprecated; use "
                                                    r"tensoradapt\.ops\.fold\.cubic_fold_shape"):
            assert old(10, 3) == cubic_fold_shape(10, 3) == (3, 3, 3)
    config, grouping = SuperLoRAConfig(rank=2, order=3), ops.Grouping([(8, 6)], "weight")
    with pytest.warns(DeprecationWarning, match=r"plan\.fold_shape is deprecated; use .*plan\.group_fold_shape"):
        assert plan.fold_shape(config, grouping, 0, 48) == plan.group_fold_shape(config, grouping, 0, 48) == (4, 4, 4)
    with pytest.raises(ValueError, match="order must be >= 1, got 0"), pytest.warns(DeprecationWarning):
        ops.fold_shape(10, 0)
