"""Shuffle and Fastfood: the test vectors of docs/math.md §3.7–3.8, adjoints, dense references and statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tensoradapt import buffers, ops

from .conftest import inner, np_

SPEC_B = [1, -1, 1, 1, -1, 1, -1, -1]
SPEC_PI = [3, 0, 7, 5, 1, 6, 2, 4]
SPEC_G = [0.5, -1, 2, 0.25, 1, -0.5, 1.5, -2]


def _dense(apply, n_in: int) -> np.ndarray:
    """The matrix of a linear map, built column by column."""
    return np.stack([apply(np.eye(n_in)[j]) for j in range(n_in)], axis=1)


# ---------------------------------------------------------------- Shuffle
def test_shuffle_spec_vector(backend) -> None:
    s = ops.Shuffle.from_permutation(np.array([2, 0, 3, 1]))
    y = s.apply(backend([10.0, 20.0, 30.0, 40.0]))
    np.testing.assert_array_equal(np_(y), [30, 10, 40, 20])
    np.testing.assert_array_equal(np_(s.adjoint(y)), [10, 20, 30, 40])


@given(n=st.integers(1, 200), seed=st.integers(0, 2**32), group=st.integers(0, 50),
       rows=st.integers(1, 3))
def test_shuffle_inverse_and_adjoint(n: int, seed: int, group: int, rows: int) -> None:
    rng = np.random.default_rng(seed % 2**32)
    z, y = rng.standard_normal((rows, n)), rng.standard_normal((rows, n))
    for generator in buffers.GENERATORS:
        s = ops.Shuffle(n, seed, group, generator=generator)
        np.testing.assert_array_equal(s.adjoint(s.apply(z)), z)
        np.testing.assert_array_equal(s.apply(s.adjoint(z)), z)
        assert inner(s.apply(z), y) == pytest.approx(inner(z, s.adjoint(y)), rel=1e-12)
    # generator 1's frozen host permutation (files made with it reproduce); generator 2: test_fastfood_counter.py
    s = ops.Shuffle(n, seed, group, generator=buffers.GENERATOR_V1)
    np.testing.assert_array_equal(s.permutation, buffers.permutation(n, seed, group, "shuffle"))


def test_shuffle_identity_permutation_is_identity(backend) -> None:
    s = ops.Shuffle.from_permutation(np.arange(5))
    x = np.arange(10.0).reshape(2, 5)
    np.testing.assert_array_equal(np_(s.apply(backend(x))), x)


def test_shuffle_is_immutable_and_errors() -> None:
    s = ops.Shuffle(4, 0)
    with pytest.raises(AttributeError, match="immutable"):
        s.n = 5
    with pytest.raises(ValueError, match=r"x must have length 4 along its last axis, got shape \(5,\)"):
        s.apply(np.ones(5))
    with pytest.raises(ValueError, match=r"each of 0\.\.2 exactly once"):
        ops.Shuffle.from_permutation([0, 0, 2])
    with pytest.raises(ValueError, match="non-empty 1-D integer array"):
        ops.Shuffle.from_permutation([0.0, 1.0])
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        ops.Shuffle(0, 1)


# ---------------------------------------------------------------- Fastfood
def test_fastfood_spec_vector(backend) -> None:
    f = ops.Fastfood.from_buffers(3, 5, SPEC_B, SPEC_PI, SPEC_G)
    assert f.length == 8 and f.scale == pytest.approx(0.12493900951088485, rel=1e-15)
    y = np_(f.apply(backend([1.0, 2.0, 3.0])))
    np.testing.assert_allclose(
        y, [-0.3123475238, 0.3123475238, 1.8116156379, 1.1869205904, 0.1874085143], rtol=1e-9
    )
    z_bar = np_(f.adjoint(backend([1.0, 0.0, -1.0, 2.0, 0.5])))
    np.testing.assert_allclose(z_bar, [-0.0156173762, 1.2337727189, -0.7027819285], rtol=1e-9)
    assert inner(y, [1.0, 0.0, -1.0, 2.0, 0.5]) == pytest.approx(0.3435822762, rel=1e-9)


@pytest.mark.parametrize("generator", buffers.GENERATORS)
@pytest.mark.parametrize("order", ["li", "paper"])
def test_fastfood_matches_its_dense_definition(order: str, generator: str) -> None:
    n, big = 5, 12
    f = ops.Fastfood(n, big, seed=3, group=2, order=order, generator=generator)
    L = f.length
    assert L == 16
    from scipy.linalg import hadamard

    H = hadamard(L)
    b = f.buffers["signs"].astype(np.float64)
    perm = f.buffers["permutation"]
    g = f.buffers["gaussian"].astype(np.float64)
    P = np.eye(L)[perm]  # (P v) = v[perm]
    pad, trunc = np.eye(L)[:, :n], np.eye(L)[:big]
    if order == "li":
        ref = f.scale * trunc @ H @ np.diag(g) @ P @ H @ np.diag(b) @ pad
    else:
        ref = f.scale * np.diag(b[:big]) @ trunc @ H @ P.T @ np.diag(g) @ H @ pad
    np.testing.assert_allclose(_dense(f.apply, n), ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(_dense(f.adjoint, big), ref.T, rtol=1e-12, atol=1e-13)
    # generator 1 normalises by the draw, generator 2 by its expectation (docs/math.md §3.8)
    total = np.sum(g**2) if generator == buffers.GENERATOR_V1 else L
    np.testing.assert_allclose(f.scale, 1 / np.sqrt(big * total), rtol=1e-15)


@pytest.mark.parametrize("order", ["li", "paper"])
def test_fastfood_adjoint_identity_on_every_backend(backend, order: str) -> None:
    rng = np.random.default_rng(0)
    f = ops.Fastfood(300, 5000, seed=1, order=order)
    z, y = rng.standard_normal((2, 300)), rng.standard_normal((2, 5000))
    fz, fty = f.apply(backend(z)), f.adjoint(backend(y))
    assert tuple(fz.shape) == (2, 5000) and tuple(fty.shape) == (2, 300)
    assert inner(fz, y) == pytest.approx(inner(z, fty), rel=1e-11)
    np.testing.assert_allclose(np_(fz), f.apply(z), rtol=1e-11, atol=1e-13)  # same operator everywhere


@given(n_in=st.integers(1, 40), extra=st.integers(0, 70), seed=st.integers(0, 2**32),
       order=st.sampled_from(["li", "paper"]))
def test_fastfood_linearity_and_adjoint_property(n_in: int, extra: int, seed: int, order: str) -> None:
    f = ops.Fastfood(n_in, n_in + extra, seed, order=order)
    rng = np.random.default_rng(seed % 2**32)
    x, z, y = rng.standard_normal(n_in), rng.standard_normal(n_in), rng.standard_normal(n_in + extra)
    np.testing.assert_allclose(f.apply(2.5 * x - z), 2.5 * f.apply(x) - f.apply(z), rtol=1e-10, atol=1e-12)
    assert inner(f.apply(z), y) == pytest.approx(inner(z, f.adjoint(y)), rel=1e-10, abs=1e-12)


def test_fastfood_preserves_norm_in_expectation() -> None:
    rng = np.random.default_rng(7)
    ratios = []
    for seed in range(200):
        f = ops.Fastfood(64, 1000, seed=seed)
        z = rng.standard_normal(64)
        ratios.append(np.sum(f.apply(z) ** 2) / np.sum(z**2))
    assert np.mean(ratios) == pytest.approx(1.0, abs=0.05)
    # columns have unit norm on average
    col_norms = np.sum(_dense(ops.Fastfood(32, 512, seed=0).apply, 32) ** 2, axis=0)
    assert np.mean(col_norms) == pytest.approx(1.0, abs=0.1)


def test_fastfood_same_seed_same_operator_and_groups_differ() -> None:
    z = np.random.default_rng(0).standard_normal(10)
    a, b = ops.Fastfood(10, 40, seed=5, group=1), ops.Fastfood(10, 40, seed=5, group=1)
    np.testing.assert_array_equal(a.apply(z), b.apply(z))
    assert not np.allclose(a.apply(z), ops.Fastfood(10, 40, seed=5, group=2).apply(z))


def test_fastfood_power_of_two_sizes_need_no_extra_padding() -> None:
    assert ops.Fastfood(1, 1, 0).length == 1
    assert ops.Fastfood(3, 1 << 10, 0).length == 1 << 10
    assert ops.Fastfood(3, (1 << 10) + 1, 0).length == 1 << 11


def test_fastfood_half_precision_and_float32() -> None:
    f = ops.Fastfood(50, 300, seed=0)
    z = torch.randn(3, 50, dtype=torch.float64)
    ref = f.apply(z)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)):
        out = f.apply(z.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out.to(torch.float64), ref, rtol=tol, atol=tol)
        assert f.adjoint(out).dtype == dtype


def test_fastfood_errors() -> None:
    with pytest.raises(ValueError, match=r"n_in \(10\) must be <= n_out \(5\).*rho = n_in / n_out = 2"):
        ops.Fastfood(10, 5, 0)
    assert ops.Fastfood(10, 5, 0, allow_shrink=True).apply(np.ones(10)).shape == (5,)
    with pytest.raises(ValueError, match="order must be one of"):
        ops.Fastfood(2, 5, 0, order="eq3")
    with pytest.raises(ValueError, match=r"x must have length 2 along its last axis, got shape \(3,\)"):
        ops.Fastfood(2, 5, 0).apply(np.ones(3))
    with pytest.raises(ValueError, match=r"y must have length 5 along its last axis"):
        ops.Fastfood(2, 5, 0).adjoint(np.ones(3))
    with pytest.raises(ValueError, match=r"signs must have shape \(L,\) = \(8,\)"):
        ops.Fastfood.from_buffers(3, 5, [1, -1], SPEC_PI, SPEC_G)
    with pytest.raises(ValueError, match="signs must contain only -1 and \\+1"):
        ops.Fastfood.from_buffers(3, 5, [2] * 8, SPEC_PI, SPEC_G)
    with pytest.raises(ValueError, match=r"each of 0\.\.7 exactly once"):
        ops.Fastfood.from_buffers(3, 5, SPEC_B, [0] * 8, SPEC_G)
    with pytest.raises(ValueError, match="must not be all zeros"):
        ops.Fastfood.from_buffers(3, 5, SPEC_B, SPEC_PI, [0.0] * 8)
    with pytest.raises(TypeError, match="real floating"):
        ops.Fastfood(2, 5, 0).apply(np.ones(2, dtype=np.int64))
    with pytest.raises(ValueError, match="seed must be >= 0"):
        ops.Fastfood(2, 5, -1)


@pytest.mark.parametrize("generator", buffers.GENERATORS)
def test_fastfood_is_one_constructor_over_two_implementations(generator: str) -> None:
    """``Fastfood(...)`` returns the implementation of its generator id (generator 1: stored
    host buffers, generator 2: counter maps); a copy or pickle keeps its class and its bits."""
    import pickle

    from tensoradapt.ops.projection import CounterFastfood, StoredFastfood

    expected = StoredFastfood if generator == buffers.GENERATOR_V1 else CounterFastfood
    f = ops.Fastfood(7, 100, seed=4, group=1, order="paper", generator=generator)
    assert type(f) is expected and isinstance(f, ops.Fastfood) and f.generator == generator
    assert ops.Fastfood.implementation(generator) is expected
    assert f.state_bytes == ops.Fastfood.state_bytes_for(7, 100, generator)
    z = np.random.default_rng(0).standard_normal((2, 7))
    y = np.random.default_rng(1).standard_normal((2, 100))
    direct = expected(7, 100, seed=4, group=1, order="paper", generator=generator)
    for other in (direct, pickle.loads(pickle.dumps(f))):
        assert type(other) is expected and repr(other) == repr(f)
        np.testing.assert_array_equal(other.apply(z), f.apply(z))
        np.testing.assert_array_equal(other.adjoint(y), f.adjoint(y))
    wrong = next(g for g in buffers.GENERATORS if g != generator)
    with pytest.raises(ValueError, match=f"{expected.__name__} implements generator"):
        expected(7, 100, seed=4, generator=wrong)
    assert type(ops.Fastfood.from_buffers(3, 5, SPEC_B, SPEC_PI, SPEC_G)) is StoredFastfood


def test_a_fastfood_unpickled_under_the_public_class_takes_its_generators_class() -> None:
    """Pickles made when Fastfood was one class name ``Fastfood``: restoring one picks the
    implementation its recorded generator id names."""
    for generator in buffers.GENERATORS:
        f = ops.Fastfood(5, 12, seed=2, generator=generator)
        state = f.__reduce_ex__(2)[2]
        restored = ops.Fastfood.__new__(ops.Fastfood)
        restored.__setstate__(state)
        assert type(restored) is type(f)
        np.testing.assert_array_equal(restored.apply(np.ones(5)), f.apply(np.ones(5)))
    with pytest.raises(TypeError, match="generator must be a generator id string"):
        ops.Fastfood(2, 5, 0, generator=3)
    with pytest.raises(ValueError, match="generator must be one of"):
        ops.Fastfood(2, 5, 0, generator="tensoradapt.buffers/9")


def test_fastfood_signature_is_the_documented_one() -> None:
    """``inspect.signature(Fastfood)`` (help, IDEs, autodoc) shows the constructor's parameters as
    before the factory split, in the docstring's order, not ``__new__``'s ``(*args, **kwargs)``."""
    import inspect
    import re

    signature = inspect.signature(ops.Fastfood)
    assert str(signature) == ("(n_in: 'int', n_out: 'int', seed: 'int', group: 'int' = 0, *, order: 'str' = 'li', "
                              "allow_shrink: 'bool' = False, generator: 'str | None' = None) -> 'None'")
    doc = ops.Fastfood.__doc__.split("Parameters\n    ----------\n")[1].split("\n\n    Notes")[0]
    documented = [name for line in re.findall(r"^    (\w[\w, ]*) :", doc, re.MULTILINE) for name in line.split(", ")]
    assert list(signature.parameters) == documented
    for implementation in (ops.Fastfood.implementation(g) for g in buffers.GENERATORS):
        assert inspect.signature(implementation) == signature
