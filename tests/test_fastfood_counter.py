"""Generator 2 (counter-based fixed random maps, docs/math.md D6) and the Fastfood operator built
on it: bijection, adjoint identity, norm preservation over seeds, bit-identical maps on every
backend, generator 2 the default and generator 1 unchanged, peak memory of the in-place pipeline, and
the generator-2 Shuffle (the Feistel permutation cycle-walked into ``[0, n)``)."""

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


def test_generator_2_is_the_default_and_generator_1_unchanged() -> None:
    V1 = buffers.GENERATOR_V1
    assert buffers.GENERATOR_ID == V2 and buffers.GENERATORS == (V1, V2)
    assert buffers.check_generator(None) == V2 and ops.Fastfood(5, 8, 0).generator == V2
    # the golden values of generator 1 (tests/test_buffers.py) through the operators, when asked for
    f = ops.Fastfood(5, 8, 0, generator=V1)
    assert f.generator == V1
    np.testing.assert_array_equal(f.buffers["signs"], buffers.rademacher(8, 0, 0, "fastfood.signs"))
    np.testing.assert_array_equal(f.buffers["permutation"], buffers.permutation(8, 0, 0, "fastfood.permutation"))
    np.testing.assert_array_equal(f.buffers["gaussian"].view(np.uint32),
                                  buffers.gaussian(8, 0, 0, "fastfood.gaussian").view(np.uint32))
    config = presets.with_projection(presets.lorta(3, 2, 1), "fastfood", 0.4)
    shapes = [(4, 5), (3, 4)]
    default, new = SuperLoRA(config, shapes), SuperLoRA(config, shapes, generator=V2)
    old = SuperLoRA(config, shapes, generator=V1)
    assert (default.generator_id, new.generator_id, old.generator_id) == (V2, V2, V1)
    params = default.init(0, dtype=np.float64, zero=False)
    for a, b, c in zip(default.delta(params), new.delta(params), old.delta(params), strict=True):
        np.testing.assert_array_equal(a, b)
        assert not np.allclose(a, c)  # the two generators are different maps
    with pytest.raises(ValueError, match="generator must be one of"):
        SuperLoRA(config, shapes, generator="other/3")
    with pytest.raises(TypeError, match=r"generator must be a generator id string.*got int 2"):
        SuperLoRA(config, shapes, generator=2)


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
    assert lazy.state_bytes < 200 < ops.Fastfood(700, 20000, 9, 1, generator=buffers.GENERATOR_V1).state_bytes


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


def _check_vjp_by_finite_differences(plan: SuperLoRA, params: dict, shapes: list) -> None:
    """⟨vjp(W̄), d⟩ equals the central difference of ⟨ΔW(θ + εd), W̄⟩ along a random direction d."""
    rng = np.random.default_rng(2)
    cots = [rng.standard_normal(s) for s in shapes]
    grads = plan.vjp(params, cots)
    direction = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    eps = 1e-6
    plus = plan.delta({k: v + eps * direction[k] for k, v in params.items()})
    minus = plan.delta({k: v - eps * direction[k] for k, v in params.items()})
    numeric = sum(np.sum((p - m) * c) for p, m, c in zip(plus, minus, cots, strict=True)) / (2 * eps)
    assert sum(np.sum(grads[k] * direction[k]) for k in params) == pytest.approx(numeric, rel=1e-6)


def test_plan_vjp_with_generator_2_is_the_adjoint_of_delta() -> None:
    shapes = [(6, 8), (5, 7), (9, 4)]
    config = presets.with_projection(presets.lorta(3, 2, 2), "fastfood", 0.3)
    plan = SuperLoRA(config, shapes, generator=V2)
    params = plan.init(0, dtype=np.float64, zero=False)
    _check_vjp_by_finite_differences(plan, params, shapes)


def test_describe_prints_buffer_memory_per_group() -> None:
    config = presets.with_projection(presets.lorta(3, 8, 64), "fastfood", 0.01)
    shapes = [(4096, 4096)] * 64
    old = SuperLoRA(config, shapes, generator=buffers.GENERATOR_V1).describe().splitlines()
    new = SuperLoRA(config, shapes).describe().splitlines()
    assert "buffers = 21.0 GiB" in old[0] and old[1].rstrip().endswith("buffers")
    assert old[2].rstrip().endswith("336.0 MiB")  # L = 2^24 entries × 21 bytes
    assert "buffers = 6.0 KiB" in new[0] and new[2].rstrip().endswith("96 B")
    assert "(tensoradapt.buffers/1)" in old[0] and "(tensoradapt.buffers/2)" in new[0]
    shuffle = presets.with_projection(presets.lorta(3, 8, 2), "shuffle")
    old = SuperLoRA(shuffle, [(40, 40)] * 4, generator=buffers.GENERATOR_V1).describe().splitlines()
    assert old[2].rstrip().endswith("50.0 KiB")  # N_g = 3200 entries, π and π⁻¹ as int64
    new = SuperLoRA(shuffle, [(40, 40)] * 4).describe().splitlines()
    assert "buffers = 64 B" in new[0] and new[2].rstrip().endswith("32 B")  # one key per group
    glob = presets.with_projection(presets.lorta(3, 8, 2), "shuffle", scope="global")
    lines = SuperLoRA(glob, [(40, 40)] * 4).describe().splitlines()
    assert lines[2].rstrip().endswith("32 B") and lines[3].rstrip().endswith(" 0 B")


# ------------------------------------------------------------------ Shuffle on generator 2
def _walk_reference(n: int, key: buffers.CounterKey) -> list[int]:
    """Cycle-walking written out: follow the Feistel permutation of [0, 2^p) until inside [0, n)."""
    bits = (n - 1).bit_length()
    step = buffers.counter_permutation(NP, np.arange(1 << bits, dtype=np.int64), key, bits).tolist()
    out = []
    for i in range(n):
        j = step[i]
        while j >= n:
            j = step[j]
        out.append(j)
    return out


def test_golden_values_of_the_generator_2_shuffle() -> None:
    # Frozen outputs; a change here breaks every shuffle adapter saved with generator 2.
    s = ops.Shuffle(8, 0)
    assert s.generator == V2 and s.permutation.tolist() == [3, 6, 1, 4, 0, 5, 2, 7]
    assert ops.Shuffle(10, 0).permutation.tolist() == [5, 4, 1, 0, 2, 3, 7, 9, 8, 6]
    assert ops.Shuffle(5, 7, 3).permutation.tolist() == [1, 4, 2, 3, 0]
    # n = 2^p is the Feistel permutation itself; O(1) state either way
    key = buffers.CounterKey(0, 0, "shuffle")
    np.testing.assert_array_equal(s.permutation, buffers.counter_permutation(NP, np.arange(8), key, 3))
    assert s.state_bytes == 32 == ops.Shuffle.state_bytes_for(10**9)
    old = ops.Shuffle(10, 0, generator=buffers.GENERATOR_V1)
    assert old.state_bytes == 160 == ops.Shuffle.state_bytes_for(10, buffers.GENERATOR_V1)
    np.testing.assert_array_equal(old.permutation, buffers.permutation(10, 0, 0, "shuffle"))
    with pytest.raises(ValueError, match="generator must be one of"):
        ops.Shuffle(4, 0, generator="tensoradapt.buffers/3")
    with pytest.raises(ValueError, match="lengths up to 2\\*\\*32"):
        ops.Shuffle(2**32 + 1, 0)


@given(n=st.integers(1, 3000), seed=st.integers(0, 2**63), group=st.integers(0, 2000))
def test_walked_feistel_is_a_bijection_of_any_length_and_its_inverse(n: int, seed: int, group: int) -> None:
    key = buffers.CounterKey(seed, group, "shuffle")
    index = np.arange(n, dtype=np.int64)
    perm = buffers.counter_walk_permutation(NP, index, key, n)
    inverse = buffers.counter_walk_inverse_permutation(NP, index, key, n)
    np.testing.assert_array_equal(np.sort(perm), index)
    np.testing.assert_array_equal(perm[inverse], index)
    np.testing.assert_array_equal(inverse[perm], index)
    if n <= 300:
        assert perm.tolist() == _walk_reference(n, key)


@pytest.mark.parametrize("n", [1, 3, 64, 1000])
def test_generator_2_shuffle_adjoint_identity(n: int) -> None:
    s = ops.Shuffle(n, 11, 2)
    rng = np.random.default_rng(n)
    z, y = rng.standard_normal((3, n)), rng.standard_normal((3, n))
    np.testing.assert_array_equal(s.apply(z), z[:, s.permutation])
    np.testing.assert_array_equal(s.adjoint(s.apply(z)), z)
    assert np.sum(s.apply(z) * y) == pytest.approx(np.sum(z * s.adjoint(y)), rel=1e-13)


@pytest.mark.parametrize("name", ["torch", "array_api_strict"])
def test_generator_2_shuffle_is_bit_identical_on_every_backend(name: str, monkeypatch) -> None:
    xp, wrap = NAMESPACES[name]
    monkeypatch.setattr(projection, "WALK_CHUNK", 1024)  # several chunks, the last one partial
    saved = projection.device_buffer_budget()["limit"]
    rng = np.random.default_rng(0)
    try:
        for limit in (0, 1 << 30):  # computed in chunks per call, then materialised on the device
            projection.device_buffer_budget(limit)
            for n, seed, group in [(1, 0, 0), (777, 5, 3), (10_000, 2**40 + 1, 11)]:  # 10,000 > WALK_CHUNK
                x = rng.standard_normal((2, n)).astype(np.float32)
                ref, other = ops.Shuffle(n, seed, group), ops.Shuffle(n, seed, group)
                index = np.arange(n, dtype=np.int64)
                for walk in (buffers.counter_walk_permutation, buffers.counter_walk_inverse_permutation):
                    key = buffers.CounterKey(seed, group, "shuffle")
                    got = to_numpy(walk(xp, wrap(index), key, n))
                    np.testing.assert_array_equal(got, walk(NP, index, key, n))
                for method in ("apply", "adjoint"):
                    a = getattr(ref, method)(x)
                    b = np.asarray(to_numpy(getattr(other, method)(wrap(x))))
                    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
        assert projection.device_buffer_budget()["used"] >= 2 * 10_000 * 4
    finally:
        projection.device_buffer_budget(saved)


def test_generator_2_shuffle_statistics() -> None:
    # every position is uniform over the 10 values on average over seeds (n is not a power of two)
    perms = np.stack([ops.Shuffle(10, s).permutation for s in range(2000)])
    assert np.allclose(perms.mean(axis=0), 4.5, atol=0.3)
    assert not np.array_equal(ops.Shuffle(100, 3, 1).permutation, ops.Shuffle(100, 3, 2).permutation)


@pytest.mark.parametrize("scope", ["group", "global"])
def test_plans_shuffle_with_their_generator(scope: str) -> None:
    shapes = [(6, 8), (5, 7), (9, 4)]
    config = presets.with_projection(presets.lorta(3, 2, 2), "shuffle", scope=scope)
    plan, old = SuperLoRA(config, shapes), SuperLoRA(config, shapes, generator=buffers.GENERATOR_V1)
    ops_ = [plan.projection(None)] if scope == "global" else [plan.projection(g) for g in range(2)]
    assert all(op.generator == V2 for op in ops_)
    params = plan.init(0, dtype=np.float64, zero=False)
    new_delta, old_delta = plan.delta(params), old.delta(params)
    flat = [np.concatenate([d.reshape(-1) for d in ds]) for ds in (new_delta, old_delta)]
    np.testing.assert_array_equal(np.sort(flat[0]), np.sort(flat[1]))  # the same entries, other places
    assert not np.array_equal(flat[0], flat[1])
    # the VJP is the adjoint of ΔW (group 0 feeds two targets: the gathered-cotangent path)
    _check_vjp_by_finite_differences(plan, params, shapes)
