"""Backend dispatch: the one place that knows about array libraries.

Every public entry point of the core calls :func:`namespace` on its array arguments and then
uses only the returned array-API namespace ``xp``.  There is no global backend state: the
namespace is inferred from the inputs on every call, so NumPy, CuPy, torch tensors and
``array_api_strict`` arrays all work with the same code.

Host-side constants (random buffers, small Hadamard blocks) are built with NumPy and moved to
the caller's backend, dtype and device with :func:`from_host`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import array_api_compat
import array_api_compat.numpy as _compat_numpy
import numpy as np

# NumPy >= 2.1 implements the array-API standard in its main namespace; calling it directly skips
# a layer of Python wrappers that costs more than the arithmetic on small tensors.
_NUMPY_NAMESPACE = np if tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 1) else _compat_numpy

__all__ = [
    "check_floating",
    "compute_dtype",
    "device_of",
    "from_host",
    "indexed",
    "namespace",
    "to_numpy",
]


def _backend_name(x: Any) -> str:
    """A short human-readable name of the library an array comes from."""
    module = type(x).__module__.split(".")[0]
    return f"{module}.{type(x).__name__}"


def indexed(name: str, values: Iterable[Any]) -> dict[str, Any]:
    """``{"name[0]": a, "name[1]": b, …}`` for passing a sequence of arrays to :func:`namespace`."""
    return {f"{name}[{i}]": value for i, value in enumerate(values)}


def namespace(**arrays: Any) -> Any:
    """Return the array-API namespace shared by the named array arguments.

    Parameters
    ----------
    **arrays
        The arrays of one public call, by argument name (use :func:`indexed` for a sequence of
        arrays); ``None`` values are ignored.

    Returns
    -------
    xp
        An array-API compatible namespace (``array_api_compat.numpy`` for NumPy arrays,
        ``array_api_compat.torch`` for torch tensors, the library itself for ``array_api_strict``).

    Raises
    ------
    TypeError
        If an argument is not an array, or if the arguments come from different array libraries
        (the message names the arguments and their libraries).
    ValueError
        If the arrays live on different devices.
    """
    named = [(name, value) for name, value in arrays.items() if value is not None]
    if not named:
        raise TypeError("expected at least one array argument, got none")
    if all(type(value) is np.ndarray for _, value in named):
        return _NUMPY_NAMESPACE  # fast path: NumPy arrays all live on the host
    for name, value in named:
        if not array_api_compat.is_array_api_obj(value):
            raise TypeError(
                f"{name} must be an array (NumPy, CuPy, torch or any array-API library), "
                f"got {type(value).__name__}"
            )
    try:
        xp = array_api_compat.array_namespace(*(v for _, v in named))
    except TypeError:
        detail = ", ".join(f"{n}: {_backend_name(v)}" for n, v in named)
        raise TypeError(
            f"all arrays of one call must come from the same array library; got {detail}"
        ) from None
    devices = [(n, array_api_compat.device(v)) for n, v in named]
    first_name, first_device = devices[0]
    for name, dev in devices[1:]:
        if dev != first_device:
            raise ValueError(
                f"all arrays of one call must be on the same device; {first_name} is on "
                f"{first_device!r} but {name} is on {dev!r}"
            )
    return xp


def compat_namespace(xp: Any = None) -> Any:
    """The array-API namespace of a library given as a module (``numpy``, ``torch``, ``cupy``, an
    array-API namespace) or ``None`` (NumPy): ``array_api_compat.numpy`` for ``numpy`` and so on."""
    if xp is None or xp is np:
        return _NUMPY_NAMESPACE
    return array_api_compat.array_namespace(xp.zeros(1))


def device_of(x: Any) -> Any:
    """The device an array lives on (``array_api_compat.device``)."""
    return array_api_compat.device(x)


def check_floating(xp: Any, arrays: Iterable[tuple[str, Any]], *, same_dtype: bool = True) -> Any:
    """Check that arrays have a real floating dtype, all the same; return that dtype.

    Raises
    ------
    TypeError
        Naming the first argument whose dtype is not real floating, or the first pair whose
        dtypes differ (the core never promotes silently).
    """
    dtype = None
    first = None
    for name, x in arrays:
        if x is None:
            continue
        kind = getattr(x.dtype, "kind", None)  # NumPy/CuPy dtypes: a cheap check
        floating = kind == "f" if isinstance(x.dtype, np.dtype) else xp.isdtype(x.dtype, "real floating")
        if not floating:
            raise TypeError(f"{name} must have a real floating dtype, got {x.dtype}")
        if dtype is None:
            dtype, first = x.dtype, name
        elif same_dtype and x.dtype != dtype:
            raise TypeError(
                f"all arrays of one call must share a dtype; {first} is {dtype} but {name} is "
                f"{x.dtype} (cast explicitly; the core never promotes silently)"
            )
    return dtype


def compute_dtype(xp: Any, dtype: Any) -> Any:
    """The dtype used for internal computation: float32 for 16-bit floats, else ``dtype``."""
    if xp.finfo(dtype).bits < 32:
        return xp.float32
    return dtype


def from_host(xp: Any, host: np.ndarray, *, dtype: Any = None, device: Any = None) -> Any:
    """Move a NumPy host array to namespace ``xp`` with the given dtype and device.

    The values are converted exactly when ``dtype`` can represent them (all buffers of this
    library are built so that they can: ±1 signs, int64 indices, float32 Gaussians).  The result
    never aliases a writable ``host``, and on other backends never aliases ``host`` at all (a
    zero-copy import of a read-only NumPy array would give the caller a writable view of this
    library's cached buffers); on NumPy a read-only ``host`` is returned as is.
    """
    if xp is _NUMPY_NAMESPACE or xp is _compat_numpy:
        # NumPy needs no transfer; a read-only host array is shared (writes raise), others copied
        shared = not host.flags.writeable
        arr = host if shared else host.copy()
        if dtype is not None and arr.dtype != dtype:
            arr = arr.astype(dtype)
            if shared:
                arr.setflags(write=False)
        return arr
    arr = xp.asarray(np.ascontiguousarray(host), device=device, copy=True)
    if dtype is not None and arr.dtype != dtype:
        arr = xp.astype(arr, dtype)
    return arr


def to_numpy(x: Any) -> np.ndarray:
    """Copy any supported array to a NumPy array on the host (for tests and reporting)."""
    if isinstance(x, np.ndarray):
        return x
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    if array_api_compat.is_cupy_array(x):
        return x.get()
    try:
        return np.asarray(x)
    except Exception:  # array_api_strict and other DLPack producers
        return np.from_dlpack(x)
