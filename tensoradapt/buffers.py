r"""Reproducible fixed random buffers (docs/math.md D6).

Every fixed random buffer of the library (Rademacher signs, permutations, Gaussians) is a pure
function of ``(seed, group, purpose)``:

1. ``numpy.random.SeedSequence([seed, group, code(purpose)])`` (``code`` is the UTF-8 bytes of
   the purpose read as a big-endian integer) seeds a ``PCG64`` bit generator;
2. the generator's raw 64-bit outputs (``random_raw``), whose stream NumPy keeps stable across
   versions, are turned into values by this module's own transforms, which use only integer
   operations and correctly rounded IEEE-754 float64 arithmetic (``+ - * /``, ``sqrt``,
   ``frexp``, ``rint``):

   * signs: the top bit of each word, ``b = 1 - 2·(w >> 63)``;
   * permutations: a stable ``argsort`` of the words;
   * Gaussians: Box–Muller on pairs of words, with ``log``, ``cos`` and ``sin`` evaluated by
     fixed polynomials in this module (not by the platform's libm or SIMD kernels, whose last
     bits differ between machines), then rounded to float32.

The buffers are generated on the host and then moved, exactly, to the target backend and
device, so the same seed gives bit-identical buffers on NumPy, CuPy and torch on any machine.
Adapter files record :data:`GENERATOR_ID` next to the seed.
"""

from __future__ import annotations

import math

import numpy as np

from ._validate import check_int

__all__ = ["GENERATOR_ID", "gaussian", "permutation", "rademacher", "raw_bits"]

#: Identifies the buffer-generation algorithm; stored in adapter files next to the seed.
GENERATOR_ID = "tensoradapt.buffers/1 (SeedSequence[seed,group,purpose] -> PCG64.random_raw)"

_LN2 = 0.6931471805599453
_TWO_PI = 6.283185307179586
_SQRT_HALF = 0.7071067811865476
_LOG_TERMS = tuple(1.0 / (2 * k + 1) for k in range(13))  # atanh series, |s| <= 0.1716
_SIN_TERMS = tuple((-1.0) ** k / math.factorial(2 * k + 1) for k in range(11))  # |x| <= pi/4
_COS_TERMS = tuple((-1.0) ** k / math.factorial(2 * k) for k in range(11))


def _purpose_code(purpose: str) -> int:
    if not isinstance(purpose, str) or not purpose:
        raise ValueError(f"purpose must be a non-empty string, got {purpose!r}")
    return int.from_bytes(purpose.encode("utf-8"), "big")


def raw_bits(n: int, seed: int, group: int = 0, purpose: str = "raw") -> np.ndarray:
    """``n`` raw 64-bit words of the stream for ``(seed, group, purpose)``.

    Parameters
    ----------
    n : int
        Number of words (``>= 0``).
    seed, group : int
        Non-negative integers.
    purpose : str
        What the buffer is for (e.g. ``"fastfood.signs"``); different purposes give independent
        streams.

    Returns
    -------
    numpy.ndarray
        ``(n,)`` array of ``uint64``.
    """
    n = check_int("n", n, minimum=0)
    seed = check_int("seed", seed, minimum=0)
    group = check_int("group", group, minimum=0)
    sequence = np.random.SeedSequence([seed, group, _purpose_code(purpose)])
    return np.asarray(np.random.PCG64(sequence).random_raw(n), dtype=np.uint64).reshape(n)


def rademacher(n: int, seed: int, group: int = 0, purpose: str = "signs") -> np.ndarray:
    """Rademacher signs ``b ∈ {-1, +1}^n`` (int8), from the top bit of each raw word."""
    words = raw_bits(n, seed, group, purpose)
    return (1 - 2 * (words >> np.uint64(63)).astype(np.int8)).astype(np.int8)


def permutation(n: int, seed: int, group: int = 0, purpose: str = "permutation") -> np.ndarray:
    """A uniformly random permutation of ``[0, n)`` (int64): stable argsort of raw words."""
    words = raw_bits(n, seed, group, purpose)
    return np.argsort(words, kind="stable").astype(np.int64)


def _log_unit(u: np.ndarray) -> np.ndarray:
    """Natural log of ``u ∈ (0, 1]`` (float64) with a fixed atanh series (≈ 1 ulp)."""
    mantissa, exponent = np.frexp(u)  # u = m · 2^e, m ∈ [0.5, 1)
    low = mantissa < _SQRT_HALF
    mantissa = np.where(low, mantissa * 2.0, mantissa)  # exact; m ∈ [1/√2, √2)
    exponent = exponent - low.astype(exponent.dtype)
    s = (mantissa - 1.0) / (mantissa + 1.0)
    s2 = s * s
    series = np.full_like(s, _LOG_TERMS[-1])
    for coefficient in reversed(_LOG_TERMS[:-1]):
        series = series * s2 + coefficient
    return exponent.astype(np.float64) * _LN2 + 2.0 * s * series


def _cos_sin_turns(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``cos(2πt), sin(2πt)`` for ``t ∈ [0, 1)`` (float64, dyadic) with fixed Taylor series."""
    quadrant = np.rint(4.0 * t)  # 0..4, exact
    x = _TWO_PI * (t - 0.25 * quadrant)  # the subtraction is exact; |x| <= π/4
    x2 = x * x
    sin_x = np.full_like(x, _SIN_TERMS[-1])
    cos_x = np.full_like(x, _COS_TERMS[-1])
    for s_coef, c_coef in zip(reversed(_SIN_TERMS[:-1]), reversed(_COS_TERMS[:-1]), strict=True):
        sin_x = sin_x * x2 + s_coef
        cos_x = cos_x * x2 + c_coef
    sin_x = sin_x * x
    q = quadrant.astype(np.int64) % 4
    cos_t = np.choose(q, [cos_x, -sin_x, -cos_x, sin_x])
    sin_t = np.choose(q, [sin_x, cos_x, -sin_x, -cos_x])
    return cos_t, sin_t


def gaussian(n: int, seed: int, group: int = 0, purpose: str = "gaussian") -> np.ndarray:
    r"""Standard normal samples (float32) by Box–Muller on pairs of raw words.

    With ``u1 = (w_{2i} >> 11 + 1)·2^-53 ∈ (0, 1]`` and ``u2 = (w_{2i+1} >> 11)·2^-53 ∈ [0, 1)``:
    ``z_{2i} = sqrt(-2 ln u1)·cos(2π u2)``, ``z_{2i+1} = sqrt(-2 ln u1)·sin(2π u2)``; the first
    ``n`` values are kept and rounded to float32.
    """
    n = check_int("n", n, minimum=0)
    pairs = (n + 1) // 2
    words = raw_bits(2 * pairs, seed, group, purpose)
    scale = 2.0**-53
    u1 = ((words[0::2] >> np.uint64(11)) + np.uint64(1)).astype(np.float64) * scale
    u2 = (words[1::2] >> np.uint64(11)).astype(np.float64) * scale
    radius = np.sqrt(-2.0 * _log_unit(u1))
    cos_t, sin_t = _cos_sin_turns(u2)
    out = np.empty(2 * pairs, dtype=np.float64)
    out[0::2] = radius * cos_t
    out[1::2] = radius * sin_t
    return out[:n].astype(np.float32)
