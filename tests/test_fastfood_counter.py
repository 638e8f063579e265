"""Generator 2 (counter-based fixed random maps, docs/math.md D6) and the Fastfood operator built
on it: bijection, adjoint identity, norm preservation over seeds, bit-identical maps on every
backend, the old generator unchanged, and peak memory of the in-place pipeline."""

from __future__ import annotations

import gc
import tracemalloc

import array_api_strict
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from tensoradapt import SuperLoRA, buffers, ops, presets
from tensoradapt._backend import compat_namespace, to_numpy
from tensoradapt.ops import projection
from tensoradapt.ops.fwht import fwht_inplace, fwht_last

V2 = buffers.GENERATOR_V2
NP = compat_namespace(np)
NAMESPACES = {
    "numpy": (NP, lambda a: np.asarray(a)),
    "torch": (compat_namespace(torch), lambda a: torch.from_numpy(np.array(a))),
    "array_api_strict": (array_api_strict, lambda a: array_api_strict.asarray(np.array(a))),
}


def _maps(xp, wrap, length: int, seed: int, group: int):
    index = wrap(np.arange(length, dtype=np.int64))
    bits = length.bit_length() - 1
    tables = tuple(wrap(t) for t in buffers.gaussian_tables())
    key = {p: buffers.CounterKey(seed, group, "fastfood." + p) for p in ("signs", "permutation", "gaussian")}
    return (to_numpy(buffers.counter_signs(xp, index, key["signs"], xp.int8)),
            to_numpy(buffers.counter_permutation(xp, index, key["permutation"], bits)),
            to_numpy(buffers.counter_inverse_permutation(xp, index, key["permutation"], bits)),
            np.asarray(to_numpy(buffers.counter_gaussian(xp, index, key["gaussian"], tables, xp.float32))))


def test_golden_values_of_generator_2() -> None:
    # Frozen outputs of generator 2; a change here breaks every adapter saved with it.
    signs, perm, _, gauss = _maps(NP, np.asarray, 8, 0, 0)
    assert signs.tolist() == [1, -1, -1, -1, -1, -1, 1, -1]
    assert perm.tolist() == [6, 0, 3, 5, 1, 7, 4, 2]
    assert gauss[:4].view(np.uint32).tolist() == [3182054848, 1054455413, 3206807877, 3208903282]


@given(bits=st.integers(0, 13), seed=st.integers(0, 2**63), group=st.integers(0, 2000))
def test_feistel_is_a_bijection_and_its_inverse(bits: int, seed: int, group: int) -> None:
    key = buffers.CounterKey(seed, group, "fastfood.permutation")
    index = np.arange(1 << bits, dtype=np.int64)
    perm = buffers.counter_permutation(NP, index, key, bits)
    np.testing.assert_array_equal(np.sort(perm), index)
    np.testing.assert_array_equal(buffers.counter_inverse_permutation(NP, perm, key, bits), index)
    np.testing.assert_array_equal(perm[buffers.counter_inverse_permutation(NP, index, key, bits)], index)


@pytest.mark.parametrize("name", ["torch", "array_api_strict"])
def test_maps_are_bit_identical_on_every_backend(name: str) -> None:
    xp, wrap = NAMESPACES[name]
    for length, seed, group in [(1, 0, 0), (2**10, 7, 3), (2**15, 2**40 + 1, 11)]:
        ref = _maps(NP, np.asarray, length, seed, group)
        got = _maps(xp, wrap, length, seed, group)
        for a, b in zip(ref, got, strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def test_map_statistics() -> None:
    signs, _perm, _, gauss = _maps(NP, np.asarray, 2**18, 3, 0)
    g = gauss.astype(np.float64)
    assert abs(g.mean()) < 0.01 and abs(g.std() - 1.0) < 0.01
    assert stats.kstest(g, "norm").pvalue > 1e-3
    assert np.isfinite(g).all() and np.abs(g).max() < 6.5
    assert abs(signs.astype(np.float64).mean()) < 0.01
    perms = np.stack([_maps(NP, np.asarray, 16, s, 0)[1] for s in range(2000)])
    assert np.allclose(perms.mean(axis=0), 7.5, atol=0.4)
    # groups and purposes are independent streams
    assert not np.array_equal(_maps(NP, np.asarray, 64, 3, 1)[3], gauss[:64])


def test_old_generator_is_the_default_and_unchanged() -> None:
    assert buffers.GENERATOR_ID == buffers.GENERATOR_V1 and buffers.GENERATORS == (buffers.GENERATOR_V1, V2)
    # the golden values of generator 1 (tests/test_buffers.py) through the operators
    f = ops.Fastfood(5, 8, 0)
    assert f.generator == buffers.GENERATOR_V1
    np.testing.assert_array_equal(f.buffers["signs"], buffers.rademacher(8, 0, 0, "fastfood.signs"))
    np.testing.assert_array_equal(f.buffers["permutation"], buffers.permutation(8, 0, 0, "fastfood.permutation"))
    np.testing.assert_array_equal(f.buffers["gaussian"].view(np.uint32),
                                  buffers.gaussian(8, 0, 0, "fastfood.gaussian").view(np.uint32))
    config = presets.with_projection(presets.lorta(3, 2, 1), "fastfood", 0.4)
    shapes = [(4, 5), (3, 4)]
    default, old = SuperLoRA(config, shapes), SuperLoRA(config, shapes, generator=buffers.GENERATOR_V1)
    params = default.init(0, dtype=np.float64, zero=False)
    for a, b in zip(default.delta(params), old.delta(params), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="generator must be one of"):
        SuperLoRA(config, shapes, generator="other/3")


@pytest.mark.parametrize("order", ["li", "paper"])
@pytest.mark.parametrize(("n", "big"), [(1, 1), (3, 5), (5, 12), (40, 64), (300, 9000)])
def test_generator_2_operator_is_the_definition_with_its_own_buffers(order: str, n: int, big: int) -> None:
    f = ops.Fastfood(n, big, 5, 2, order=order, generator=V2)
    host = f.buffers
    ref = ops.Fastfood.from_buffers(n, big, host["signs"], host["permutation"], host["gaussian"], order=order)
    # generator 2 normalises by the expectation: c = 1/sqrt(N L) instead of 1/sqrt(N Σg²)
    ratio = np.sqrt(np.sum(host["gaussian"].astype(np.float64) ** 2) / f.length)
    assert f.scale == pytest.approx(1 / np.sqrt(big * f.length), rel=1e-15)
    rng = np.random.default_rng(n)
    x, y = rng.standard_normal((2, n)), rng.standard_normal((2, big))
    np.testing.assert_allclose(f.apply(x), ref.apply(x) * ratio, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(f.adjoint(y), ref.adjoint(y) * ratio, rtol=1e-10, atol=1e-13)
    # adjoint identity <F z, y> = <z, Fᵀ y>, also with the zero-padded, overwritten cotangent
    lhs = np.sum(f.apply(x) * y)
    assert lhs == pytest.approx(np.sum(x * f.adjoint(y)), rel=1e-10, abs=1e-12)
    padded = np.zeros((2, f.length))
    padded[:, :big] = y
    np.testing.assert_allclose(f.adjoint(padded.copy()), f.adjoint(y), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(f.adjoint(padded, overwrite=True), f.adjoint(y), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["torch", "array_api_strict"])
@pytest.mark.parametrize("order", ["li", "paper"])
def test_generator_2_operator_on_other_backends(name: str, order: str) -> None:
    _xp, wrap = NAMESPACES[name]
    f = ops.Fastfood(37, 300, 1, 4, order=order, generator=V2)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((3, 37)).astype(np.float32), rng.standard_normal((3, 300)).astype(np.float32)
    np.testing.assert_allclose(to_numpy(f.apply(wrap(x))), f.apply(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(f.adjoint(wrap(y))), f.adjoint(y), rtol=1e-5, atol=1e-6)


def test_norm_is_preserved_in_expectation_over_seeds() -> None:
    rng = np.random.default_rng(0)
    z = rng.standard_normal(50)
    ratios = [np.sum(ops.Fastfood(50, 200, seed, 0, generator=V2).apply(z) ** 2) / np.sum(z**2)
              for seed in range(400)]
    assert np.mean(ratios) == pytest.approx(1.0, abs=0.05)
    # and for a fixed seed over groups, paper order too
    ratios = [np.sum(ops.Fastfood(50, 200, 3, g, order="paper", generator=V2).apply(z) ** 2) / np.sum(z**2)
              for g in range(400)]
    assert np.mean(ratios) == pytest.approx(1.0, abs=0.05)


def test_materialised_and_on_the_fly_maps_give_the_same_bits() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal(700).astype(np.float32), rng.standard_normal(20000).astype(np.float32)
    saved = projection.device_buffer_budget()["limit"]
    try:
        projection.device_buffer_budget(0)
        lazy = ops.Fastfood(700, 20000, 9, 1, generator=V2)
        a, b = lazy.apply(x), lazy.adjoint(y)
        projection.device_buffer_budget(1 << 30)
        eager = ops.Fastfood(700, 20000, 9, 1, generator=V2)
        np.testing.assert_array_equal(eager.apply(x), a)
        np.testing.assert_array_equal(eager.adjoint(y), b)
        assert projection.device_buffer_budget()["used"] >= 2 * eager.length * 8
    finally:
        projection.device_buffer_budget(saved)
    assert lazy.state_bytes < 200 < ops.Fastfood(700, 20000, 9, 1).state_bytes


def test_fwht_inplace_matches_and_needs_no_second_buffer() -> None:
    rng = np.random.default_rng(0)
    for n, rows, chunk in [(1, 1, 4), (8, 3, 4), (2**10, 2, 64), (2**13, 1, 256), (2**12, 1, 1 << 16)]:
        x = rng.standard_normal((rows, n))
        np.testing.assert_allclose(fwht_inplace(NP, x.copy(), chunk=chunk), fwht_last(NP, x), rtol=1e-12, atol=1e-9)
        t = torch.from_numpy(x.copy())
        assert fwht_inplace(compat_namespace(torch), t, chunk=chunk) is t
        np.testing.assert_allclose(t.numpy(), fwht_last(NP, x), rtol=1e-12, atol=1e-9)
    x = rng.standard_normal(2**20).astype(np.float32)
    gc.collect()
    tracemalloc.start()
    fwht_inplace(NP, x)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.2 * x.nbytes


def _peak(fn) -> int:
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    result = fn()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del result
    return peak


@pytest.mark.parametrize(("order", "count"), [("li", 15), ("paper", 15), ("li", 16)])
def test_fastfood_forward_and_vjp_peak_at_most_one_and_a_half_outputs(order: str, count: int) -> None:
    shapes = [(256, 256)] * count  # N = 983040, L = 2^20 = 1.07 N; or N = L (no padding)
    config = presets.with_projection(presets.lorta(3, 4, 1), "fastfood", 0.01)
    config = type(config).from_dict({**config.to_dict(), "fastfood_order": order})
    saved = projection.device_buffer_budget()["limit"]
    try:
        projection.device_buffer_budget(0)
        plan = SuperLoRA(config, shapes, generator=V2)
        params = plan.init(0, zero=False)
        out_bytes = plan.grouping.total * 4
        cots = [np.ones(s, dtype=np.float32) for s in shapes]
        plan.delta(params)
        assert _peak(lambda: plan.delta(params)) <= 1.5 * out_bytes
        assert _peak(lambda: plan.vjp(params, cots)) <= 1.5 * out_bytes
    finally:
        projection.device_buffer_budget(saved)


def test_plan_vjp_with_generator_2_is_the_adjoint_of_delta() -> None:
    shapes = [(6, 8), (5, 7), (9, 4)]
    config = presets.with_projection(presets.lorta(3, 2, 2), "fastfood", 0.3)
    plan = SuperLoRA(config, shapes, generator=V2)
    params = plan.init(0, dtype=np.float64, zero=False)
    rng = np.random.default_rng(2)
    cots = [rng.standard_normal(s) for s in shapes]
    grads = plan.vjp(params, cots)
    direction = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    eps = 1e-6
    plus = plan.delta({k: v + eps * direction[k] for k, v in params.items()})
    minus = plan.delta({k: v - eps * direction[k] for k, v in params.items()})
    numeric = sum(np.sum((p - m) * c) for p, m, c in zip(plus, minus, cots, strict=True)) / (2 * eps)
    analytic = sum(np.sum(grads[k] * direction[k]) for k in params)
    assert analytic == pytest.approx(numeric, rel=1e-6)


def test_describe_prints_buffer_memory_per_group() -> None:
    config = presets.with_projection(presets.lorta(3, 8, 64), "fastfood", 0.01)
    shapes = [(4096, 4096)] * 64
    old = SuperLoRA(config, shapes).describe().splitlines()
    new = SuperLoRA(config, shapes, generator=V2).describe().splitlines()
    assert "buffers = 21.0 GiB" in old[0] and old[1].rstrip().endswith("buffers")
    assert old[2].rstrip().endswith("336.0 MiB")  # L = 2^24 entries × 21 bytes
    assert "buffers = 6.0 KiB" in new[0] and new[2].rstrip().endswith("96 B")
    shuffle = SuperLoRA(presets.with_projection(presets.lorta(3, 8, 2), "shuffle"), [(40, 40)] * 4)
    assert shuffle.describe().splitlines()[2].rstrip().endswith("50.0 KiB")
