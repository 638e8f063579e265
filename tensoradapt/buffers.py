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
These functions are generator 1 (:data:`GENERATOR_V1`).  Adapter files record the generator id of
their fixed projections next to the seed, and every id of :data:`GENERATORS` is reproduced.

Generator 2 (:data:`GENERATOR_V2`, the default :data:`GENERATOR_ID`; docs/math.md D6) is
counter-based: entry ``i`` of a buffer is a
pure function of ``(key, i)``, where the key is eight 32-bit words of
``SeedSequence([seed, group, code(purpose)])``, so a buffer of any length has O(1) state and is
computed on the caller's device, in chunks, with int64 integer arithmetic kept below ``2**49``
(no overflow, no unsigned types: torch has few uint64 ops) and correctly rounded float64
operations; the results are bit-identical on NumPy, torch, CuPy and array_api_strict:

* ``hash32(i) = mix32((i mod 2^32) XOR k)``, with Chris Wellons' ``lowbias32`` finaliser as
  ``mix32`` (multiplications mod ``2^32`` done as two 16-bit halves);
* signs: ``b_i = 1 - 2·(hash32_k0(i) >> 31)``;
* permutations of ``[0, 2^p)``: a 4-round Feistel network on the ``p`` index bits (halves of
  ``⌊p/2⌋`` and ``⌈p/2⌉`` bits, round function ``hash32`` with keys ``k4..k7``), a bijection whose
  inverse runs the rounds backwards (no stored index arrays); permutations of ``[0, n)`` for any
  ``n`` (Shuffle) walk the cycles of the one of ``[0, 2^p)``, ``2^p >= n``: apply it until the
  value falls below ``n`` (cycle-walking; the inverse walks with the inverse rounds);
* Gaussians: Box–Muller ``sqrt(-2 ln u1)·cos(2π u2)`` from the two 24-bit uniforms
  ``u1 = (hash32_k2(i) >> 8 + 1)/2^24`` and ``u2 = (hash32_k3(i) >> 8)/2^24``, with ``ln`` and
  ``cos`` from 4096-entry host tables (made by the fixed polynomials below) plus a 4-term
  ``log1p`` series, then rounded to float32.
"""

from __future__ import annotations

import math

import numpy as np

from ._validate import check_int

__all__ = ["GENERATORS", "GENERATOR_ID", "GENERATOR_V1", "GENERATOR_V2", "CounterKey",
           "check_counter_length", "check_generator", "counter_gaussian", "counter_inverse_permutation",
           "counter_permutation", "counter_signs", "counter_walk_inverse_permutation", "counter_walk_permutation",
           "gaussian", "gaussian_tables", "permutation", "rademacher", "raw_bits"]

#: Generator 1: host buffers from ``PCG64`` streams (the functions ``rademacher``, ``permutation``,
#: ``gaussian`` of this module).
GENERATOR_V1 = "tensoradapt.buffers/1 (SeedSequence[seed,group,purpose] -> PCG64.random_raw)"
#: Generator 2: counter-based maps computed on the device (``counter_*``), O(1) state.
GENERATOR_V2 = "tensoradapt.buffers/2 (counter: SeedSequence key, lowbias32 hash, Feistel permutation)"
#: Every generator this library can reproduce.
GENERATORS = (GENERATOR_V1, GENERATOR_V2)
#: The default buffer-generation algorithm of the fixed projections (Fastfood, Shuffle): generator 2.
#: Adapter files store the id they were made with, and files, plans and operators made with
#: generator 1 (``generator=GENERATOR_V1``) keep reproducing their values bit for bit.
GENERATOR_ID = GENERATOR_V2

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


# ----------------------------------------------------------------------------- generator 2
_MASK32 = 0xFFFFFFFF


def check_generator(generator: str | None) -> str:
    """The generator id ``generator`` (``None``: :data:`GENERATOR_ID`), checked to be one of
    :data:`GENERATORS` (``TypeError`` for a non-string, ``ValueError`` for an unknown id)."""
    if generator is None:
        return GENERATOR_ID
    if not isinstance(generator, str):
        raise TypeError(f"generator must be a generator id string, one of {GENERATORS}, got "
                        f"{type(generator).__name__} {generator!r:.80}")
    if generator not in GENERATORS:
        raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r:.200}")
    return generator


class CounterKey:
    """The O(1) state of a generator-2 buffer: eight 32-bit words of
    ``SeedSequence([seed, group, code(purpose)])`` (Python ints)."""

    __slots__ = ("words",)

    def __init__(self, seed: int, group: int = 0, purpose: str = "raw") -> None:
        seed = check_int("seed", seed, minimum=0)
        group = check_int("group", group, minimum=0)
        sequence = np.random.SeedSequence([seed, group, _purpose_code(purpose)])
        self.words = tuple(int(w) for w in sequence.generate_state(8, np.uint32))

    def __repr__(self) -> str:
        return f"CounterKey({', '.join(hex(w) for w in self.words)})"


def _mul32(xp, x, c: int):
    """``x · c mod 2^32`` for int64 ``x ∈ [0, 2^32)`` without overflow (products < 2^49)."""
    low = x * (c & 0xFFFF)
    high = xp.bitwise_and(x * (c >> 16), 0xFFFF)
    return xp.bitwise_and(low + xp.bitwise_left_shift(high, 16), _MASK32)


def _mix32(xp, x):
    """Wellons' ``lowbias32`` finaliser: a bijection of ``[0, 2^32)`` with good avalanche."""
    x = xp.bitwise_xor(x, xp.bitwise_right_shift(x, 16))
    x = _mul32(xp, x, 0x7FEB352D)
    x = xp.bitwise_xor(x, xp.bitwise_right_shift(x, 15))
    x = _mul32(xp, x, 0x846CA68B)
    return xp.bitwise_xor(x, xp.bitwise_right_shift(x, 16))


def _hash32(xp, index, word: int):
    return _mix32(xp, xp.bitwise_xor(index, word))


def check_counter_length(length: int) -> None:
    """Refuse a generator-2 buffer longer than ``2**32`` (the index range of ``hash32``)."""
    if length > 1 << 32:
        raise ValueError(f"generator 2 supports lengths up to 2**32, got {length}")


def counter_signs(xp, index, key: CounterKey, dtype):
    """Rademacher signs ``b_i ∈ {±1}`` at the int64 indices ``index`` (in ``dtype``)."""
    top = xp.bitwise_right_shift(_hash32(xp, index, key.words[0]), 31)
    return xp.astype(1 - 2 * top, dtype)


def _feistel_halves(xp, index, bits: int):
    """``index`` split into its high ``bits // 2`` and low ``bits - bits // 2`` bits, with those
    widths: the state both directions of the Feistel network start from."""
    right_bits = bits - bits // 2
    left = xp.bitwise_right_shift(index, right_bits)
    right = xp.bitwise_and(index, (1 << right_bits) - 1)
    return left, right, [bits // 2, right_bits]


def _feistel_join(xp, left, right, bits: int):
    """The inverse of :func:`_feistel_halves` (after an even number of rounds the widths are back)."""
    return xp.bitwise_or(xp.bitwise_left_shift(left, bits - bits // 2), right)


def counter_permutation(xp, index, key: CounterKey, bits: int):
    """``π(i)`` for int64 ``index`` in ``[0, 2^bits)``: a 4-round Feistel bijection."""
    if bits == 0:
        return index
    left, right, widths = _feistel_halves(xp, index, bits)
    for r in range(4):
        mask = (1 << widths[0]) - 1
        left, right = right, xp.bitwise_xor(left, xp.bitwise_and(_hash32(xp, right, key.words[4 + r]), mask))
        widths.reverse()
    return _feistel_join(xp, left, right, bits)


def counter_inverse_permutation(xp, index, key: CounterKey, bits: int):
    """``π⁻¹(i)``: the Feistel rounds of :func:`counter_permutation` run backwards."""
    if bits == 0:
        return index
    left, right, widths = _feistel_halves(xp, index, bits)  # widths of (left, right) after round r
    for r in reversed(range(4)):
        # after round r: left = old right, right = old left ^ F(old right); old left has width widths[1]
        mask = (1 << widths[1]) - 1
        left, right = xp.bitwise_xor(right, xp.bitwise_and(_hash32(xp, left, key.words[4 + r]), mask)), left
        widths.reverse()
    return _feistel_join(xp, left, right, bits)


def _cycle_walk(xp, index, key: CounterKey, n: int, step):
    """``step`` (a Feistel direction on ``[0, 2^p)``, ``p = ⌈log2 n⌉``) applied to each entry of
    the 1-D ``index`` until it falls in ``[0, n)``: the induced permutation of ``[0, n)``.

    Each round steps only the entries still outside (boolean indexing), so the work is about two
    Feistel evaluations per entry; the finished ``(position, value)`` pairs are put back in order
    by one ``argsort`` of the (distinct) positions."""
    bits = (n - 1).bit_length()
    out = step(xp, index, key, bits)
    if n == 1 << bits:
        return out
    inside = out < n
    if bool(xp.all(inside)):
        return out
    position = xp.arange(out.shape[0], dtype=xp.int64, device=out.device)
    positions, values = [position[inside]], [out[inside]]
    pending, value = position[~inside], out[~inside]
    while pending.shape[0]:
        value = step(xp, value, key, bits)
        inside = value < n
        positions.append(pending[inside])
        values.append(value[inside])
        pending, value = pending[~inside], value[~inside]
    return xp.take(xp.concat(values), xp.argsort(xp.concat(positions)))


def counter_walk_permutation(xp, index, key: CounterKey, n: int):
    """``π(i)`` for int64 ``index`` in ``[0, n)``, any ``n >= 1``: the Feistel permutation of
    ``[0, 2^p)`` (``2^p >= n`` the least power of two) cycle-walked into ``[0, n)``, a bijection.

    For ``i < n``, ``π(i) = σ^k(i)`` with ``σ`` :func:`counter_permutation` and ``k >= 1`` the
    least power with ``σ^k(i) < n``; since ``2^p < 2n`` a walk takes under two steps on average.
    For ``n = 2^p`` it is :func:`counter_permutation` itself."""
    return _cycle_walk(xp, index, key, n, counter_permutation)


def counter_walk_inverse_permutation(xp, index, key: CounterKey, n: int):
    """``π⁻¹(i)`` of :func:`counter_walk_permutation`: the same walk with the inverse rounds
    (the states the forward walk skipped lie outside ``[0, n)``, so the backward walk skips them too)."""
    return _cycle_walk(xp, index, key, n, counter_inverse_permutation)


_TABLE_BITS = 12


def gaussian_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Host tables (float64, read-only): ``ln(j/4096)``, ``cos/sin(2π j/4096)``, ``cos/sin(2π j/2^24)``."""
    global _TABLES
    if _TABLES is None:
        size = 1 << _TABLE_BITS
        j = np.arange(size, dtype=np.float64)
        log_table = np.zeros(size)
        log_table[1:] = _log_unit(j[1:] / size)
        cos_hi, sin_hi = _cos_sin_turns(j / size)
        cos_lo, sin_lo = _cos_sin_turns(j / (1 << 24))
        tables = (log_table, cos_hi, sin_hi, cos_lo, sin_lo)
        for t in tables:
            t.setflags(write=False)
        _TABLES = tables
    return _TABLES


_TABLES = None


def counter_gaussian(xp, index, key: CounterKey, tables, dtype):
    r"""Standard normal values at the int64 indices ``index``, rounded to ``dtype``.

    ``tables`` are the five host tables of ``gaussian_tables()`` moved to the device as float64
    (``ln(j/4096)``, ``cos/sin`` of ``j/4096`` and ``j/2^24`` turns).  With
    ``k = hash32_k2(i) >> 8 + 1 ∈ [1, 2^24]`` and ``e = ⌊log2 k⌋``, ``s = max(e − 11, 0)``,
    ``k = (j + x)·2^s`` with ``j = k >> s ∈ [1, 4096)``: ``ln u1 = ln(j/4096) + (s − 12) ln 2 +
    log1p(x/j)``.  ``u2 = m/2^24``, ``m = 4096·hi + lo``: ``cos 2πu2 = C_hi C_lo − S_hi S_lo``.
    """
    log_table, cos_hi, sin_hi, cos_lo, sin_lo = tables
    k = xp.bitwise_right_shift(_hash32(xp, index, key.words[2]), 8) + 1
    # e = floor(log2 k) by a branchless binary search (k < 2^25)
    e = xp.zeros_like(k)
    for step in (16, 8, 4, 2, 1):
        e = e + step * xp.astype(xp.bitwise_right_shift(k, e + step) > 0, k.dtype)
    s = xp.maximum(e - (_TABLE_BITS - 1), xp.zeros_like(e))
    j = xp.bitwise_right_shift(k, s)
    rest = xp.astype(k - xp.bitwise_left_shift(j, s), xp.float64)
    x = rest / xp.astype(xp.bitwise_left_shift(j, s), xp.float64)  # < 2^-11
    log1p = x * (1.0 - x * (0.5 - x * (1.0 / 3.0 - x * 0.25)))
    log_u1 = xp.take(log_table, j) + (xp.astype(s, xp.float64) - 12.0) * _LN2 + log1p
    radius = xp.sqrt(-2.0 * log_u1)
    m = xp.bitwise_right_shift(_hash32(xp, index, key.words[3]), 8)
    hi = xp.bitwise_right_shift(m, _TABLE_BITS)
    lo = xp.bitwise_and(m, (1 << _TABLE_BITS) - 1)
    cos_t = xp.take(cos_hi, hi) * xp.take(cos_lo, lo) - xp.take(sin_hi, hi) * xp.take(sin_lo, lo)
    return xp.astype(radius * cos_t, dtype)
