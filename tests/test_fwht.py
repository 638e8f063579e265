"""The fast Walsh–Hadamard transform against scipy.linalg.hadamard."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.linalg import hadamard

from tensoradapt import ops
from tensoradapt.ops.fwht import _digit_sizes, default_block

from .conftest import np_


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32, 64, 256, 1024, 4096])
@pytest.mark.parametrize("block", [None, 2, 4, 16, 64])
def test_matches_dense_hadamard(backend, n: int, block) -> None:
    rng = np.random.default_rng(n)
    x = rng.standard_normal((3, n))
    out = ops.fwht(backend(x), block=block)
    np.testing.assert_allclose(np_(out), x @ hadamard(n), rtol=1e-12, atol=1e-10 * np.sqrt(n))


def test_any_axis_and_batch_shapes(backend) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 3, 1))
    out = np_(ops.fwht(backend(x), axis=1))
    np.testing.assert_allclose(out, np.einsum("ij,ajbc->aibc", hadamard(8), x), rtol=1e-12, atol=1e-12)
    out = np_(ops.fwht(backend(x[..., 0]), axis=-2))
    np.testing.assert_allclose(out, np.einsum("ij,ajb->aib", hadamard(8), x[..., 0]), rtol=1e-12)
    empty = ops.fwht(backend(np.zeros((0, 4))))
    assert tuple(empty.shape) == (0, 4)


@given(p=st.integers(0, 11), rows=st.integers(1, 3), seed=st.integers(0, 2**32 - 1),
       block=st.sampled_from([None, 2, 8, 32, 128]))
def test_involution_and_linearity(p: int, rows: int, seed: int, block) -> None:
    n = 1 << p
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((rows, n)), rng.standard_normal((rows, n))
    twice = ops.fwht(ops.fwht(x, block=block), block=block)
    np.testing.assert_allclose(twice, n * x, rtol=1e-10, atol=1e-10 * n)  # H H = n I
    np.testing.assert_allclose(ops.fwht(2.0 * x - y, block=block),
                               2.0 * ops.fwht(x, block=block) - ops.fwht(y, block=block),
                               rtol=1e-10, atol=1e-9 * n)
    # symmetric: <Hx, y> = <x, Hy>
    assert np.sum(ops.fwht(x) * y) == pytest.approx(np.sum(x * ops.fwht(y)), rel=1e-9, abs=1e-9 * n)


def test_digit_sizes_cover_all_bits_and_respect_block() -> None:
    for bits in range(0, 25):
        for block in (2, 4, 8, 16, 32, 64):
            digits = _digit_sizes(1 << bits, block)
            assert int(np.prod(digits)) == 1 << bits
            assert all(d <= block for d in digits)
    assert default_block(1 << 20) in (16, 32)


def test_half_precision_is_computed_in_float32() -> None:
    x = torch.randn(4, 64, dtype=torch.float64)
    out = ops.fwht(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    ref = ops.fwht(x.to(torch.bfloat16).to(torch.float32))
    torch.testing.assert_close(out, ref.to(torch.bfloat16))
    assert ops.fwht(x.to(torch.float16)).dtype == torch.float16


def test_float32_accuracy() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal(1 << 14)
    out = ops.fwht(x.astype(np.float32)).astype(np.float64)
    ref = ops.fwht(x)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-6


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"power of two, got x.shape\[-1\] = 6"):
        ops.fwht(np.ones(6))
    with pytest.raises(ValueError, match=r"power of two, got x.shape\[0\] = 3"):
        ops.fwht(np.ones((3, 4)), axis=0)
    with pytest.raises(ValueError, match="axis 2 is out of range for an array of shape"):
        ops.fwht(np.ones((2, 4)), axis=2)
    with pytest.raises(ValueError, match="block must be a power of two >= 2, got 12"):
        ops.fwht(np.ones(8), block=12)
    with pytest.raises(ValueError, match="block must be >= 2, got 1"):
        ops.fwht(np.ones(8), block=1)
    with pytest.raises(TypeError, match="real floating dtype"):
        ops.fwht(np.ones(8, dtype=np.complex128))
    with pytest.raises(ValueError, match="out of range"):
        ops.fwht(np.float64(1.0) * np.ones(()))
