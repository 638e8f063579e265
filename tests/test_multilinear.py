"""Tucker, CP and Kronecker reconstruction and their VJPs on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import tensorly as tl
from hypothesis import given
from hypothesis import strategies as st
from tensorly.tenalg import kronecker as tl_kronecker

from tensoradapt import ops

from .conftest import check_vjp_by_finite_differences, inner, np_


def _tucker_inputs(rng, dims, ranks):
    core = rng.standard_normal(ranks)
    factors = [rng.standard_normal((d, r)) for d, r in zip(dims, ranks, strict=True)]
    return core, factors


# ---------------------------------------------------------------- Tucker
def test_tucker_spec_vector(backend) -> None:
    core = backend([[1.0, 2.0], [3.0, 4.0]])
    factors = backend.many([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [[1.0, 2.0], [0.0, 1.0]]])
    np.testing.assert_array_equal(np_(ops.tucker_to_tensor(core, factors)), [[5, 2], [11, 4], [16, 6]])


@pytest.mark.parametrize(("dims", "ranks"), [((5,), (3,)), ((4, 6), (2, 3)), ((3, 4, 5), (2, 1, 3)),
                                             ((2, 3, 2, 3), (2, 2, 1, 3)), ((6, 2, 3), (1, 4, 5))])
def test_tucker_matches_tensorly_and_finite_differences(backend, dims, ranks) -> None:
    rng = np.random.default_rng(len(dims))
    core, factors = _tucker_inputs(rng, dims, ranks)
    out = ops.tucker_to_tensor(backend(core), backend.many(factors))
    np.testing.assert_allclose(np_(out), tl.tucker_to_tensor((core, factors)), rtol=1e-12, atol=1e-12)
    cot = rng.standard_normal(dims)
    core_grad, factor_grads = ops.tucker_vjp(backend(core), backend.many(factors), backend(cot))
    assert core_grad.shape == tuple(ranks)
    assert [tuple(g.shape) for g in factor_grads] == [f.shape for f in factors]
    check_vjp_by_finite_differences(
        backend, lambda xs: ops.tucker_to_tensor(xs[0], xs[1:]), [core, *factors], cot,
        [core_grad, *factor_grads],
    )


def test_tucker_vjp_equals_tensorly_projections() -> None:
    rng = np.random.default_rng(3)
    core, factors = _tucker_inputs(rng, (4, 5, 6), (2, 3, 2))
    cot = rng.standard_normal((4, 5, 6))
    core_grad, factor_grads = ops.tucker_vjp(core, factors, cot)
    ref_core = tl.tenalg.multi_mode_dot(cot, factors, transpose=True)
    np.testing.assert_allclose(core_grad, ref_core, rtol=1e-12)
    for m in range(3):
        partial = tl.tenalg.multi_mode_dot(cot, factors, skip=m, transpose=True)
        ref = tl.unfold(partial, m) @ tl.unfold(core, m).T
        np.testing.assert_allclose(factor_grads[m], ref, rtol=1e-12)


@given(data=st.data(), order=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_tucker_adjoint_identity_property(data, order: int, seed: int) -> None:
    dims = data.draw(st.lists(st.integers(1, 4), min_size=order, max_size=order))
    ranks = data.draw(st.lists(st.integers(1, 3), min_size=order, max_size=order))
    rng = np.random.default_rng(seed)
    core, factors = _tucker_inputs(rng, dims, ranks)
    cot = rng.standard_normal(dims)
    core_grad, factor_grads = ops.tucker_vjp(core, factors, cot)
    # The map C -> Tucker(C, A) is linear: <T(C), Y> = <C, T^T(Y)>.
    assert inner(ops.tucker_to_tensor(core, factors), cot) == pytest.approx(inner(core, core_grad), rel=1e-9,
                                                                            abs=1e-9)
    # Multilinear in each factor as well: <T(.., A_m, ..), Y> = <A_m, Ā_m>.
    for m in range(order):
        assert inner(factors[m], factor_grads[m]) == pytest.approx(inner(core, core_grad), rel=1e-9, abs=1e-9)


def test_tucker_errors() -> None:
    core = np.ones((2, 3))
    with pytest.raises(ValueError, match=r"one matrix per core mode: core has 2 modes .* but 1 factors"):
        ops.tucker_to_tensor(core, [np.ones((4, 2))])
    with pytest.raises(ValueError, match=r"factors\[1\] has 2 columns but core mode 1 has size 3"):
        ops.tucker_to_tensor(core, [np.ones((4, 2)), np.ones((5, 2))])
    with pytest.raises(ValueError, match=r"factors\[0\] must be 2-D"):
        ops.tucker_to_tensor(core, [np.ones(2), np.ones((5, 3))])
    with pytest.raises(TypeError, match="factors must be a list or tuple"):
        ops.tucker_to_tensor(core, np.ones((2, 2)))
    with pytest.raises(ValueError, match="core must have at least one mode"):
        ops.tucker_to_tensor(np.float64(1.0) * np.ones(()), [])
    with pytest.raises(ValueError, match=r"cotangent must have the output shape \(4, 5\)"):
        ops.tucker_vjp(core, [np.ones((4, 2)), np.ones((5, 3))], np.ones((5, 4)))
    with pytest.raises(TypeError, match="real floating"):
        ops.tucker_to_tensor(np.ones((2,), dtype=np.int64), [np.ones((3, 2), dtype=np.int64)])


# ---------------------------------------------------------------- CP
@pytest.mark.parametrize("dims", [(5,), (4, 6), (3, 4, 5), (2, 3, 2, 3), (3, 2, 2, 2, 3)])
@pytest.mark.parametrize("weighted", [True, False])
def test_cp_matches_tensorly_and_finite_differences(backend, dims, weighted) -> None:
    rng = np.random.default_rng(len(dims))
    rank = 3
    weights = rng.standard_normal(rank)
    factors = [rng.standard_normal((d, rank)) for d in dims]
    w_arg = backend(weights) if weighted else None
    out = ops.cp_to_tensor(w_arg, backend.many(factors))
    ref = tl.cp_to_tensor((weights if weighted else np.ones(rank), factors))
    np.testing.assert_allclose(np_(out), ref, rtol=1e-12, atol=1e-12)
    cot = rng.standard_normal(dims)
    w_grad, factor_grads = ops.cp_vjp(w_arg, backend.many(factors), backend(cot))
    if weighted:
        check_vjp_by_finite_differences(
            backend, lambda xs: ops.cp_to_tensor(xs[0], xs[1:]), [weights, *factors], cot,
            [w_grad, *factor_grads],
        )
    else:
        assert w_grad is None
        check_vjp_by_finite_differences(
            backend, lambda xs: ops.cp_to_tensor(None, xs), factors, cot, factor_grads,
        )


def test_cp_vjp_matches_tensorly_mttkrp() -> None:
    rng = np.random.default_rng(1)
    weights = rng.standard_normal(4)
    factors = [rng.standard_normal((d, 4)) for d in (3, 5, 2, 4)]
    cot = rng.standard_normal((3, 5, 2, 4))
    _, grads = ops.cp_vjp(weights, factors, cot)
    for m in range(4):
        ref = tl.tenalg.unfolding_dot_khatri_rao(cot, (weights, factors), m)
        np.testing.assert_allclose(grads[m], ref, rtol=1e-12)


def test_cp_identity_core_is_lora_and_cp_with_unit_weights() -> None:
    rng = np.random.default_rng(2)
    b, a = rng.standard_normal((6, 2)), rng.standard_normal((5, 2))
    np.testing.assert_allclose(ops.cp_to_tensor(None, [b, a]), b @ a.T, rtol=1e-13)
    np.testing.assert_allclose(ops.cp_to_tensor(np.ones(2), [b, a]), b @ a.T, rtol=1e-13)
    core = np.zeros((2, 2, 2))
    core[0, 0, 0] = core[1, 1, 1] = 1.0
    factors = [rng.standard_normal((d, 2)) for d in (3, 4, 5)]
    np.testing.assert_allclose(ops.cp_to_tensor(None, factors), ops.tucker_to_tensor(core, factors), rtol=1e-13)


@given(data=st.data(), order=st.integers(1, 5), rank=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_cp_adjoint_identity_property(data, order: int, rank: int, seed: int) -> None:
    dims = data.draw(st.lists(st.integers(1, 4), min_size=order, max_size=order))
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal(rank)
    factors = [rng.standard_normal((d, rank)) for d in dims]
    cot = rng.standard_normal(dims)
    w_grad, grads = ops.cp_vjp(weights, factors, cot)
    value = inner(ops.cp_to_tensor(weights, factors), cot)
    assert inner(weights, w_grad) == pytest.approx(value, rel=1e-9, abs=1e-9)
    for m in range(order):
        assert inner(factors[m], grads[m]) == pytest.approx(value, rel=1e-9, abs=1e-9)


def test_cp_errors() -> None:
    with pytest.raises(ValueError, match=r"same number of columns .* factors\[0\] has 2 but factors\[1\] has 3"):
        ops.cp_to_tensor(None, [np.ones((4, 2)), np.ones((5, 3))])
    with pytest.raises(ValueError, match=r"weights must have shape \(r,\) = \(2,\)"):
        ops.cp_to_tensor(np.ones(3), [np.ones((4, 2)), np.ones((5, 2))])
    with pytest.raises(TypeError, match="non-empty list or tuple"):
        ops.cp_to_tensor(None, [])
    with pytest.raises(ValueError, match=r"factors\[1\] must be 2-D"):
        ops.cp_to_tensor(None, [np.ones((4, 2)), np.ones(2)])
    with pytest.raises(ValueError, match=r"cotangent must have the output shape \(4, 5\)"):
        ops.cp_vjp(None, [np.ones((4, 2)), np.ones((5, 2))], np.ones(20))


# ---------------------------------------------------------------- Kronecker
def test_kron_spec_vector(backend) -> None:
    out = ops.kron(backend.many([[[1.0, 2.0]], [[0.0, 1.0], [1.0, 0.0]]]))
    np.testing.assert_array_equal(np_(out), [[0, 1, 0, 2], [1, 0, 2, 0]])


@pytest.mark.parametrize("shapes", [[(2, 3)], [(2, 3), (4, 1)], [(1, 2), (3, 2), (2, 2)],
                                    [(2, 1, 2), (1, 3, 2), (2, 2, 1)], [(2, 2), (2, 2), (2, 2), (2, 2)],
                                    [(3,), (2,)]])
def test_kron_matches_numpy_tensorly_and_finite_differences(backend, shapes) -> None:
    rng = np.random.default_rng(len(shapes))
    tensors = [rng.standard_normal(s) for s in shapes]
    ref = tensors[0]
    for t in tensors[1:]:
        ref = np.kron(ref, t)
    out = ops.kron(backend.many(tensors))
    np.testing.assert_allclose(np_(out), ref, rtol=1e-13, atol=1e-13)
    if all(len(s) == 2 for s in shapes):
        np.testing.assert_allclose(np_(out), tl_kronecker(tensors), rtol=1e-13, atol=1e-13)
    cot = rng.standard_normal(ref.shape)
    grads = ops.kron_vjp(backend.many(tensors), backend(cot))
    assert [tuple(g.shape) for g in grads] == [tuple(s) for s in shapes]
    check_vjp_by_finite_differences(backend, ops.kron, tensors, cot, grads)


def test_kron_promotes_lower_order_splits() -> None:
    a, b = np.arange(1.0, 7.0).reshape(2, 3), np.array([1.0, -1.0])
    out = ops.kron([a, b])  # b promoted to (2, 1)
    np.testing.assert_array_equal(out, np.kron(a, b[:, None]))
    grads = ops.kron_vjp([a, b], np.ones(out.shape))
    assert grads[1].shape == (2,)


@given(data=st.data(), splits=st.integers(1, 4), order=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_kron_adjoint_identity_property(data, splits: int, order: int, seed: int) -> None:
    shapes = [tuple(data.draw(st.lists(st.integers(1, 3), min_size=order, max_size=order)))
              for _ in range(splits)]
    rng = np.random.default_rng(seed)
    tensors = [rng.standard_normal(s) for s in shapes]
    out = ops.kron(tensors)
    assert out.shape == ops.kron_shape(shapes)
    cot = rng.standard_normal(out.shape)
    grads = ops.kron_vjp(tensors, cot)
    value = inner(out, cot)
    for k in range(splits):  # multilinear: <X_k, X̄_k> = <kron(X), X̄> for every k
        assert inner(tensors[k], grads[k]) == pytest.approx(value, rel=1e-9, abs=1e-9)


def test_kron_errors() -> None:
    with pytest.raises(TypeError, match="non-empty list or tuple"):
        ops.kron([])
    with pytest.raises(ValueError, match=r"tensors\[1\] must have at least one mode"):
        ops.kron([np.ones(2), np.ones(())])
    with pytest.raises(ValueError, match=r"Kronecker output shape \(4, 9\)"):
        ops.kron_vjp([np.ones((2, 3)), np.ones((2, 3))], np.ones((9, 4)))
    with pytest.raises(TypeError, match=r"share a dtype"):
        ops.kron([np.ones(2), np.ones(2, dtype=np.float32)])
