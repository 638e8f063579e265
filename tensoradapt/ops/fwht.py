r"""Fast Walsh–Hadamard transform (unnormalised, natural order), Kronecker-GEMM formulation.

``fwht(x)`` computes ``y = H_n x`` along one axis, with ``H_n[i, j] = (-1)^{popcount(i & j)}``
(the Sylvester matrix, ``scipy.linalg.hadamard(n)``), so ``H_n = H_nᵀ`` and ``H_n H_n = n·I``.

``H_n = H_{f_1} ⊗ … ⊗ H_{f_q}`` for any split of the ``log2 n`` index bits into digits of
``f_i = 2^{p_i}`` values.  Each pass applies one small dense block to one digit with a single
(batched) GEMM on a free reshape of the row-major array, ``Y_{(a, f, c)} = H_f · X_{(a, f, c)}``.
A transform is ``q = ⌈log2 n / log2 block⌉`` GEMM calls and no transposed copies, using only
array-API-standard functions (numerics.md §2, §6).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from .._backend import check_floating, compute_dtype, device_of, from_host, namespace
from .._validate import check_int

__all__ = ["default_block", "fwht", "fwht_inplace", "hadamard_block"]


@functools.lru_cache(maxsize=16)
def _hadamard_host(f: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.float64)
    while h.shape[0] < f:
        h = np.block([[h, h], [h, -h]])
    h.setflags(write=False)
    return h


def hadamard_block(xp: Any, f: int, dtype: Any, device: Any = None) -> Any:
    """The ``f × f`` Sylvester–Hadamard matrix on namespace ``xp`` (``f`` a power of two)."""
    return from_host(xp, _hadamard_host(f), dtype=dtype, device=device)


def default_block(n: int, rows: int = 1) -> int:
    """The tuned block size (largest dense Hadamard factor) for ``rows`` transforms of length ``n``.

    Chosen from ``benchmarks/bench_fwht.py`` sweeps on the 2-core CI machine (docs/benchmarks.md):
    small blocks keep the GEMMs cheap in flops, large ones save passes over memory, which pays
    once the batch no longer fits in cache.
    """
    if rows >= 16 and n >= 1 << 18:
        return 64
    if rows < 16 and (1 << 19) <= n <= (1 << 21):
        return 16
    return 32


def _digit_sizes(n: int, block: int) -> list[int]:
    """Split ``log2 n`` bits into the fewest digits of at most ``log2 block`` bits, balanced."""
    bits, max_bits = n.bit_length() - 1, block.bit_length() - 1
    if bits == 0:
        return []
    count = -(-bits // max_bits)
    base, extra = divmod(bits, count)
    return [1 << (base + (i < extra)) for i in range(count)]


def fwht_last(xp: Any, x: Any, block: int | None = None) -> Any:
    """Unvalidated FWHT along the last axis (the internal fast path, also used by Fastfood).

    Digit ``i`` (``f`` values, ``a`` values before it and ``c`` after it, the batch included in
    ``a``) is one GEMM on a free reshape: ``X_{(a, f)} · H_f`` when it is the last digit,
    ``H_f · X_{(f, c)}`` when nothing precedes it, else the batched ``H_f · X_{(a, f, c)}``.
    ``x`` is rebound after every pass, so when the caller passes a temporary only two buffers
    are alive at any time.
    """
    n = x.shape[-1]
    batch = tuple(x.shape[:-1])
    rows = math.prod(batch)
    digits = _digit_sizes(n, block or default_block(n, rows))
    if rows == 0 or not digits:
        return xp.asarray(x, copy=True)
    device = device_of(x)
    blocks = {f: hadamard_block(xp, f, x.dtype, device) for f in set(digits)}
    before = rows
    for f in digits:
        after = (rows * n) // (before * f)
        h = blocks[f]
        if after == 1:
            x = xp.reshape(x, (before, f)) @ h
        elif before == 1:
            x = h @ xp.reshape(x, (f, after))
        else:
            x = h @ xp.reshape(x, (before, f, after))
        before *= f
    return xp.reshape(x, (*batch, n))


#: Elements per chunk of an in-place pass (256 KiB of float32: the GEMM operands stay in L2).
CHUNK = 1 << 16


def writes_in_place(xp: Any, x: Any) -> bool:
    """Whether ``x`` can be updated through slice assignment of reshaped views (NumPy, CuPy and
    torch arrays; not ``array_api_strict``, whose standard gives views no aliasing guarantee)."""
    if isinstance(x, np.ndarray):
        return x.flags.writeable and x.flags.c_contiguous
    module = type(x).__module__.split(".")[0]
    if module == "torch":
        return bool(x.is_contiguous()) and not x.requires_grad
    return module == "cupy" and bool(x.flags.c_contiguous)


def fwht_inplace(xp: Any, x: Any, block: int | None = None, chunk: int = CHUNK) -> Any:
    """Unvalidated FWHT along the last axis of ``x``, overwriting ``x`` (returned).

    The same Kronecker-GEMM digits as :func:`fwht_last`, applied in place: the trailing digits
    that fit in ``chunk`` elements are done together on contiguous pieces of ``chunk`` elements
    (one out-of-place :func:`fwht_last` on a piece, assigned back), and every remaining digit is
    one chunked GEMM pass, ``X[piece] = H_f · X[piece]`` on a free reshape.  Extra memory is
    O(chunk), never a second length-``n`` buffer.  Where the namespace has no aliasing views
    (:func:`writes_in_place` is false) this is ``fwht_last`` (two length-``n`` buffers).
    """
    n = x.shape[-1]
    if not writes_in_place(xp, x):
        return fwht_last(xp, x, block)
    total = math.prod(x.shape)
    if total == 0 or n == 1:
        return x
    rows = total // n
    digits = _digit_sizes(n, block or default_block(n, rows))
    flat = xp.reshape(x, (total,))
    # inner: the trailing digits whose product fits in a chunk
    inner, k = 1, len(digits)
    while k > 0 and inner * digits[k - 1] <= chunk:
        k -= 1
        inner *= digits[k]
    if inner > 1:
        pieces = xp.reshape(flat, (total // inner, inner))
        step = max(1, chunk // inner)
        inner_block = max(digits[k:])
        for i in range(0, total // inner, step):
            pieces[i:i + step] = fwht_last(xp, pieces[i:i + step], inner_block)
    device = device_of(x)
    after = inner
    for f in reversed(digits[:k]):
        before = total // (f * after)
        h = hadamard_block(xp, f, x.dtype, device)
        view = xp.reshape(flat, (before, f, after))
        if f * after <= chunk:
            step = max(1, chunk // (f * after))
            for i in range(0, before, step):
                view[i:i + step] = h @ view[i:i + step]
        else:
            width = max(1, chunk // f)
            for i in range(before):
                for c in range(0, after, width):
                    view[i, :, c:c + width] = h @ view[i, :, c:c + width]
        after *= f
    return x


def fwht(x: Any, axis: int = -1, *, block: int | None = None) -> Any:
    r"""Unnormalised fast Walsh–Hadamard transform ``y = H_n x`` along ``axis``.

    Parameters
    ----------
    x : array, shape ``(..., n, ...)``
        Real floating input; ``n = x.shape[axis]`` must be a power of two.  16-bit floats are
        computed in float32 and returned in their own dtype.
    axis : int
        The axis to transform (default: the last one).
    block : int, optional
        Largest dense Hadamard block used per GEMM pass (a power of two ``>= 2``); ``None`` uses
        the tuned default of :func:`default_block`.

    Returns
    -------
    array, same shape and dtype as ``x``
        ``y = H_n x``; applying ``fwht`` twice gives ``n·x``.

    Raises
    ------
    ValueError
        If ``n`` is not a power of two, ``axis`` is out of range or ``block`` is invalid.
    TypeError
        If ``x`` is not a real floating array.

    Examples
    --------
    >>> import numpy as np
    >>> fwht(np.array([1., 0., 0., 0.])).tolist(), fwht(np.array([1., 2., 3., 4.])).tolist()
    ([1.0, 1.0, 1.0, 1.0], [10.0, -2.0, -4.0, 0.0])
    """
    xp = namespace(x=x)
    dtype = check_floating(xp, [("x", x)])
    axis = check_int("axis", axis)
    if x.ndim == 0 or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for an array of shape {tuple(x.shape)}")
    n = x.shape[axis]
    if n < 1 or n & (n - 1):
        raise ValueError(f"the transformed length must be a power of two, got x.shape[{axis}] = {n}")
    if block is not None:
        block = check_int("block", block, minimum=2)
        if block & (block - 1):
            raise ValueError(f"block must be a power of two >= 2, got {block}")
    work = compute_dtype(xp, dtype)
    y = x if work == dtype else xp.astype(x, work)
    last = axis in (-1, x.ndim - 1)
    if not last:
        y = xp.moveaxis(y, axis, -1)
    y = fwht_last(xp, y, block)
    if not last:
        y = xp.moveaxis(y, -1, axis)
    return y if work == dtype else xp.astype(y, dtype)
