"""Backend dispatch: namespace inference and the errors for mixed or invalid inputs."""

import array_api_strict
import numpy as np
import pytest
import torch

from tensoradapt import ops
from tensoradapt._backend import check_floating, compute_dtype, namespace


def test_namespace_follows_the_inputs() -> None:
    assert "numpy" in namespace(x=np.ones(2)).__name__
    assert "torch" in namespace(x=torch.ones(2)).__name__
    assert namespace(x=array_api_strict.ones(2)) is array_api_strict


def test_mixed_libraries_are_named_in_the_error() -> None:
    with pytest.raises(TypeError, match=r"same array library.*core.*factors\[0\]"):
        ops.tucker_to_tensor(np.ones((2, 2)), [torch.ones(3, 2, dtype=torch.float64), np.ones((3, 2))])


def test_non_array_argument() -> None:
    with pytest.raises(TypeError, match=r"x must be an array .* got list"):
        ops.fwht([1.0, 2.0])


def test_no_array_at_all() -> None:
    with pytest.raises(TypeError, match="at least one array"):
        namespace(x=None)


def test_mixed_devices() -> None:
    a = array_api_strict.ones((2, 2), device=array_api_strict.Device("device1"))
    b = array_api_strict.ones((3, 2), device=array_api_strict.Device("device2"))
    c = array_api_strict.ones((3, 2), device=array_api_strict.Device("device1"))
    with pytest.raises(ValueError, match="same device"):
        ops.tucker_to_tensor(a, [b, c])


def test_device_is_preserved() -> None:
    dev = array_api_strict.Device("device1")
    x = array_api_strict.ones((2, 8), device=dev)
    assert ops.fwht(x).device == dev
    assert ops.Fastfood(8, 16, seed=0).apply(x).device == dev
    assert ops.Shuffle(8, seed=0).adjoint(x).device == dev


def test_non_floating_dtype() -> None:
    with pytest.raises(TypeError, match=r"x must have a real floating dtype, got int64"):
        ops.fwht(np.arange(8))


def test_mixed_dtypes_are_refused() -> None:
    with pytest.raises(TypeError, match=r"share a dtype; core is float64 but factors\[0\] is float32"):
        ops.tucker_to_tensor(np.ones((2,)), [np.ones((3, 2), dtype=np.float32)])


def test_check_floating_returns_dtype_and_compute_dtype_upcasts_half() -> None:
    xp = namespace(x=torch.ones(2))
    assert check_floating(xp, [("x", torch.ones(2, dtype=torch.float16))]) == torch.float16
    assert compute_dtype(xp, torch.float16) == torch.float32
    assert compute_dtype(xp, torch.bfloat16) == torch.float32
    assert compute_dtype(xp, torch.float64) == torch.float64


def test_from_host_shares_read_only_numpy_buffers_and_copies_the_rest() -> None:
    from tensoradapt._backend import from_host

    xp = namespace(x=np.ones(1))
    frozen = np.arange(4.0)
    frozen.setflags(write=False)
    assert from_host(xp, frozen) is frozen
    writable = np.arange(4.0)
    out = from_host(xp, writable, dtype=np.float32)
    assert out.flags.writeable and not np.shares_memory(out, writable)
    shared_cast = from_host(xp, frozen, dtype=np.float32)
    assert not shared_cast.flags.writeable
    tensor = from_host(namespace(x=torch.ones(1)), frozen)
    tensor += 1  # a torch copy: the cached host buffer is untouched
    np.testing.assert_array_equal(frozen, [0, 1, 2, 3])
