"""The measured parameter-efficiency gain of a family over LoRA, with a bootstrap interval over seeds.

A *curve* is a list of points ``(parameters, [score of each seed])``.  The parameters a curve needs
to reach a score level ``a`` are read off its **monotone envelope**: the points sorted by parameter
count, each score replaced by the best score of the curve at at most that many parameters; the
envelope is interpolated linearly in ``(log parameters, score)`` (:func:`params_at`).  The gain of
a family at level ``a`` is ``params_at(LoRA, a) / params_at(family, a)`` (:func:`gain_at`): how many
times more parameters LoRA needs for the same score.

* A level above the LoRA envelope's best is *undefined* (``None``).
* A level above the family envelope's best is *not reached* (``None``).
* A level at or below the family's smallest point is reached with the family's smallest count;
  the gain is then a lower bound (``bounded=True``), since fewer parameters might do as well.

:func:`bootstrap_gain` resamples the seeds of every point (with replacement, independently per
point), recomputes the means and the gain, and returns the percentile interval of the defined gains
with the fraction of resamples in which it was defined.  Pure NumPy, deterministic for its seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Gain", "bootstrap_gain", "envelope", "gain_at", "levels_from", "params_at"]

Curve = Sequence[tuple[float, Sequence[float]]]
"""``(parameters, seed scores)`` per point."""


def envelope(params: Sequence[float], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The monotone envelope: unique parameter counts ascending, with the running best score.

    >>> envelope([4, 1, 2], [0.5, 0.7, 0.6])
    (array([1., 2., 4.]), array([0.7, 0.7, 0.7]))
    """
    if len(params) != len(scores) or not len(params):
        raise ValueError("params and scores must be non-empty and of equal length")
    p = np.asarray(params, dtype=float)
    s = np.asarray(scores, dtype=float)
    if np.any(p <= 0):
        raise ValueError("parameter counts must be positive")
    order = np.lexsort((-s, p))
    p, s = p[order], s[order]
    keep = np.r_[True, p[1:] != p[:-1]]  # the best score of each count (sorted first)
    p, s = p[keep], np.maximum.accumulate(s[keep])
    return p, s


def params_at(params: Sequence[float], scores: Sequence[float], level: float) -> tuple[float | None, bool]:
    """Parameters the envelope of ``(params, scores)`` needs to reach ``level``, and whether that is
    the smallest point (reached already there: a bound).  ``(None, False)`` if never reached.

    >>> p, bound = params_at([10, 100], [0.5, 0.7], 0.6)   # half-way in score: the geometric mean
    >>> round(p, 2), bound
    (31.62, False)
    """
    p, s = envelope(params, scores)
    if level > s[-1]:
        return None, False
    if level <= s[0]:
        return float(p[0]), True
    i = int(np.argmax(s >= level))  # first envelope point at or above the level; i >= 1
    lo, hi = s[i - 1], s[i]
    frac = (level - lo) / (hi - lo)
    return float(math.exp(math.log(p[i - 1]) + frac * (math.log(p[i]) - math.log(p[i - 1])))), False


def _means(curve: Curve) -> tuple[list[float], list[float]]:
    return [float(p) for p, _ in curve], [float(np.mean(v)) for _, v in curve]


@dataclass(frozen=True)
class Gain:
    """The gain at one level: point estimate, bootstrap interval and how often it was defined."""

    level: float
    gain: float | None
    lora_params: float | None
    family_params: float | None
    bounded: bool
    low: float | None = None
    high: float | None = None
    defined_fraction: float = 0.0
    resamples: int = 0

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def gain_at(lora: Curve, family: Curve, level: float) -> Gain:
    """``params_at(LoRA) / params_at(family)`` on the seed means (no interval)."""
    lp, _ = params_at(*_means(lora), level)
    fp, bounded = params_at(*_means(family), level)
    gain = None if lp is None or fp is None else lp / fp
    return Gain(level, gain, lp, fp, bounded and gain is not None)


def _resample(curve: Curve, rng: np.random.Generator) -> list[tuple[float, list[float]]]:
    out = []
    for p, values in curve:
        v = np.asarray(values, dtype=float)
        out.append((p, list(v[rng.integers(0, len(v), len(v))])))
    return out


def bootstrap_gain(lora: Curve, family: Curve, level: float, *, resamples: int = 1000, seed: int = 0,
                   confidence: float = 0.95) -> Gain:
    """:func:`gain_at` with a percentile interval over ``resamples`` seed resamples.

    ``low``/``high`` are ``None`` when fewer than half of the resamples define the gain.
    """
    point = gain_at(lora, family, level)
    rng = np.random.default_rng(seed)
    gains = []
    for _ in range(resamples):
        g = gain_at(_resample(lora, rng), _resample(family, rng), level).gain
        if g is not None:
            gains.append(g)
    defined = len(gains) / resamples if resamples else 0.0
    low = high = None
    if gains and defined >= 0.5:
        tail = 100 * (1 - confidence) / 2
        low, high = (float(x) for x in np.percentile(np.log(gains), [tail, 100 - tail]))
        low, high = math.exp(low), math.exp(high)
    return Gain(level, point.gain, point.lora_params, point.family_params, point.bounded, low, high,
                defined, resamples)


def levels_from(lora: Curve, fractions: Sequence[float] = (0.25, 0.5, 0.75), digits: int = 3) -> list[float]:
    """Score levels at ``fractions`` of the way from the LoRA curve's worst mean to its best
    envelope value (rounded), the levels at which gains are reported.

    >>> levels_from([(1, [0.8]), (2, [0.9]), (4, [1.0])], (0.5,))
    [0.9]
    """
    _, means = _means(lora)
    lo, hi = min(means), max(means)
    return [round(lo + f * (hi - lo), digits) for f in fractions]
