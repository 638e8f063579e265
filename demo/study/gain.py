"""The measured parameter-efficiency gain of a family over LoRA.

Two estimators live here.

**The study's estimator** (:func:`summarise_task`, docs/study-method.md) works on run records
(one per point and seed, with the validation score, the test score and the 0/1 correctness of
every test item):

* Each curve's envelope is *chosen on validation, read on test*, and on other seeds: in fold
  ``j`` (one per seed), for a budget of ``x`` parameters, the point with the best validation
  score over the seeds other than ``j`` among the points with at most ``x`` parameters is picked,
  and its test score of seed ``j`` is read (:func:`crossfit_envelope`).  The mean over the folds,
  made non-decreasing by isotonic regression (a pooled block is one point at its geometric-mean
  count), is the curve.  Picking on test would take the best of many noisy test scores, a gain
  identical curves would also show; picking on the same seeds' validation keeps the part of that
  luck that a seed brings to validation and test alike.
* The parameters a curve needs for a score level are interpolated linearly in
  ``(log parameters, score)`` (:func:`needed`); the gain is LoRA's need over the family's.
* Levels: 25/50/75 % of LoRA's range and ``lora_r1``, LoRA r = 1's mean test score (the
  paper's comparison point).  Every curve, LoRA's included, is read off its envelope at every
  level by the same rule.
* A paired bootstrap resamples seed indices *and* test items, the same draw for every point of
  every curve (:func:`paired_resamples`), and gives 95 % percentile intervals.
* The identical-curve null (:mod:`~tensoradapt.demo.study.null`): families on LoRA's own curve,
  with the measured noise, through the same estimator: the "gain" that selection alone produces.

**The plain estimator** (:func:`envelope`, :func:`params_at`, :func:`gain_at`,
:func:`bootstrap_gain`, :func:`levels_from`) works on curves of ``(parameters, [score of each
seed])`` with the envelope taken on the same scores it reports; it is kept for curves without
validation scores.

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

import bisect
import itertools
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tensoradapt._validate import check_int, is_int

__all__ = ["CEILING_FAMILIES", "LEVEL_FRACTIONS", "Gain", "bootstrap_gain", "crossfit_envelope", "envelope",
           "fold_envelope", "gain_at", "gain_text", "isotonic", "level_key", "levels_from", "need_at", "needed",
           "paired_resamples", "params_at", "seed_folds", "seed_means", "selected_envelope", "summarise_task"]

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


# ---------------------------------------------------------------------------------------------
# the study's estimator: envelopes chosen on validation and read on test, a paired bootstrap over
# seeds and test items, the identical-curve null
# ---------------------------------------------------------------------------------------------
LEVEL_FRACTIONS: tuple[float, ...] = (0.25, 0.5, 0.75)
"""Fractions of LoRA's range at which gains are read (beside ``lora_r1``)."""

CEILING_FAMILIES: tuple[str, ...] = ("2d-reshape",)
"""Families that reshape groups of square weights: their gains carry the ceiling ``sqrt(L / G)``."""

_CHUNK = 4_000_000  # floats per block of the bootstrap's item products


def level_key(fraction: float) -> str:
    """The name of the level at ``fraction`` of LoRA's range: ``level_key(0.25) == "25%"``."""
    return f"{100 * fraction:g}%"


def _blocks(y: list[float]) -> tuple[list[float], list[int]]:
    """Pool adjacent violators: the block means (non-decreasing) and sizes of the least-squares
    non-decreasing fit of ``y`` (equal weights)."""
    means: list[float] = []
    sizes: list[int] = []
    for v in y:
        means.append(v)
        sizes.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            n = sizes[-2] + sizes[-1]
            m = (means[-2] * sizes[-2] + means[-1] * sizes[-1]) / n
            means.pop()
            sizes.pop()
            means[-1], sizes[-1] = m, n
    return means, sizes


def isotonic(y: Sequence[float]) -> np.ndarray:
    """The least-squares non-decreasing fit of ``y`` (pool adjacent violators, equal weights).

    Shape ``(n,) -> (n,)``; each run of pooled entries takes the mean of its values.

    >>> isotonic([1.0, 3.0, 2.0, 4.0])
    array([1. , 2.5, 2.5, 4. ])
    """
    means, sizes = _blocks(np.asarray(y, dtype=float).ravel().tolist())
    return np.repeat(np.asarray(means, dtype=float), sizes)


def _pick(order: list[int], p: list[float], v: list[float], t: list[float]) -> list[int]:
    """The validation records along ``order`` (point indices by ascending count): each point whose
    ``v`` beats every smaller point's (of equal counts the best); NaN ``v`` or ``t``: absent."""
    picked: list[int] = []
    best = -math.inf
    for i in order:
        if not v[i] > best or t[i] != t[i]:
            continue
        best = v[i]
        if picked and p[picked[-1]] == p[i]:
            picked[-1] = i
        else:
            picked.append(i)
    return picked


def fold_envelope(order: list[int], p: list[float], vals: Sequence[list[float]], tests: Sequence[list[float]],
                  weights: Sequence[float]) -> tuple[list[float], list[float], list[int]]:
    """The envelope over folds (the estimator's core, on lists): fold ``j`` picks on ``vals[j]``
    and reads ``tests[j]``.

    At every count some fold picks, the curve is the ``weights``-weighted mean over the folds of
    the test score of each fold's pick at that budget; then isotonic regression, each pooled
    block one point at its geometric-mean count.

    Parameters
    ----------
    order : the curve's point indices, by ascending count (ties in a fixed order)
    p : every point's count (indexed by point)
    vals, tests : per fold, every point's selection score and test score (NaN: absent)
    weights : per fold

    Returns
    -------
    counts, scores, picked : the envelope (counts increasing, scores non-decreasing) and the
    points any fold picked, by count.
    """
    folds = [_pick(order, p, v, t) for v, t in zip(vals, tests, strict=True)]
    budgets = sorted({p[i] for f in folds for i in f})
    at = [0] * len(folds)
    current = [-1] * len(folds)
    score: list[float] = []
    for x in budgets:
        num = den = 0.0
        for j, f in enumerate(folds):
            while at[j] < len(f) and p[f[at[j]]] <= x:
                current[j] = f[at[j]]
                at[j] += 1
            if current[j] >= 0:
                num += weights[j] * tests[j][current[j]]
                den += weights[j]
        score.append(num / den)
    means, sizes = _blocks(score)
    centres: list[float] = []
    start = 0
    for n in sizes:
        block = budgets[start:start + n]
        centres.append(block[0] if n == 1 else math.exp(sum(math.log(x) for x in block) / n))
        start += n
    return centres, means, sorted({i for f in folds for i in f}, key=lambda i: (p[i], i))


def seed_folds(val: np.ndarray, test: np.ndarray, present: np.ndarray,
               counts: np.ndarray) -> tuple[list[list[float]], list[list[float]], list[float]]:
    """Leave-one-seed-out folds: for each seed ``j`` drawn (``counts[j] > 0``), the points' mean
    validation score over the *other* drawn seeds (weighted by ``counts``) and their test score of
    seed ``j``; fold weight ``counts[j]``.  With one distinct seed drawn, the one fold picks on
    that seed's own validation score.  ``val``, ``test``, ``present``: shape (P, S)."""
    drawn = np.flatnonzero(np.asarray(counts) > 0)
    tests = np.where(present[:, drawn], test[:, drawn], np.nan).T.tolist()
    weights = [float(counts[j]) for j in drawn]
    if len(drawn) == 1:
        return np.where(present[:, drawn], val[:, drawn], np.nan).T.tolist(), tests, weights
    w = np.tile(np.asarray(counts, dtype=float), (len(drawn), 1))  # fold x seed: the other drawn seeds' counts
    w[np.arange(len(drawn)), drawn] = 0.0
    den = present.astype(float) @ w.T  # (P, folds)
    with np.errstate(invalid="ignore", divide="ignore"):
        vals = np.where(den > 0, (np.where(present, val, 0.0) @ w.T) / den, np.nan)
    return vals.T.tolist(), tests, weights


def selected_envelope(params: Sequence[float], val: Sequence[float],
                      test: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The envelope chosen on validation and read on test, from mean scores.

    For a budget of ``x`` parameters the point with the best validation score among the points
    with at most ``x`` parameters is picked: the picked points are the validation records in
    parameter order (of equal counts the best).  Their test scores are made non-decreasing by
    isotonic regression; each pooled block of points becomes one envelope point at the block's
    geometric-mean parameter count with the block's mean score, so that a block's mean is not
    credited to its smallest point.  Points whose ``val`` or ``test`` is NaN are absent.
    (:func:`crossfit_envelope` picks on other seeds than it reads.)

    Parameters
    ----------
    params, val, test : shape (n,)
        Parameter count (> 0), mean validation and mean test score of each point.

    Returns
    -------
    p_env, s_env : shape (m,)
        The envelope: parameter counts strictly increasing, scores non-decreasing (one entry per
        block); ``m = 0`` when no point is present.
    picked : shape (k,), k >= m
        Indices into the inputs of the picked points.

    >>> p, s, i = selected_envelope([10, 20, 40], [0.5, 0.7, 0.6], [0.52, 0.66, 0.9])
    >>> p.tolist(), s.tolist(), i.tolist()     # 40 is worse on validation: not picked
    ([10.0, 20.0], [0.52, 0.66], [0, 1])
    >>> p, s, _ = selected_envelope([10, 40], [0.5, 0.7], [0.7, 0.6])   # pooled: one point at 20
    >>> p.round(6).tolist(), s.round(6).tolist()
    ([20.0], [0.65])
    """
    v = np.asarray(val, dtype=float)
    t = np.asarray(test, dtype=float)
    p = _check_params(params, v.shape, t.shape)
    pe, se, picked = fold_envelope(np.argsort(p, kind="stable").tolist(), p.tolist(), [v.tolist()], [t.tolist()], [1.0])
    return np.asarray(pe, dtype=float), np.asarray(se, dtype=float), np.asarray(picked, dtype=int)


def crossfit_envelope(params: Sequence[float], val: np.ndarray, test: np.ndarray,
                      present: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The envelope chosen on validation of *other* seeds than the test scores it reads.

    Fold ``j`` (one per seed) picks, for each budget, the point with the best mean validation
    score over the seeds other than ``j`` and reads that point's test score of seed ``j``; the
    curve is the mean over the folds, made non-decreasing as in :func:`selected_envelope`.  A
    lucky seed, good on validation and test alike, thus cannot pick the point it reports.

    Parameters
    ----------
    params : shape (n,)
    val, test : shape (n, S)
        Per point and seed: validation and test score.
    present : shape (n, S) bool, optional
        Which runs exist (default: all).

    Returns
    -------
    p_env, s_env, picked : as :func:`selected_envelope` (``picked``: points any fold picked).

    >>> p, s, _ = crossfit_envelope([10, 20], [[0.5, 0.5], [0.6, 0.6]], [[0.5, 0.7], [0.6, 0.8]])
    >>> p.tolist(), s.round(6).tolist()
    ([10.0, 20.0], [0.6, 0.7])
    """
    v = np.asarray(val, dtype=float)
    t = np.asarray(test, dtype=float)
    if v.ndim != 2 or t.shape != v.shape:
        raise ValueError(f"val and test must be of one shape (n, S), got {v.shape} and {t.shape}")
    p = _check_params(params, v.shape[:1], t.shape[:1])
    m = np.ones(v.shape, dtype=bool) if present is None else np.asarray(present, dtype=bool)
    if m.shape != v.shape:
        raise ValueError(f"present must be of shape {v.shape}, got {m.shape}")
    folds = seed_folds(v, t, m, np.ones(v.shape[1]))
    pe, se, picked = fold_envelope(np.argsort(p, kind="stable").tolist(), p.tolist(), *folds)
    return np.asarray(pe, dtype=float), np.asarray(se, dtype=float), np.asarray(picked, dtype=int)


def _check_params(params: Sequence[float], *shapes: tuple[int, ...]) -> np.ndarray:
    p = np.asarray(params, dtype=float)
    if p.ndim != 1 or any(tuple(sh) != p.shape for sh in shapes):
        raise ValueError(f"params must be 1-D and match the scores' points, got shapes {p.shape} and {list(shapes)}")
    if np.any(~(p > 0)):
        raise ValueError(f"parameter counts must be positive, got {p[~(p > 0)][:3].tolist()}")
    return p


def need_at(pe: list[float], se: list[float], level: float) -> tuple[float, bool]:
    """:func:`needed` for one level on the envelope's lists ``pe`` (counts) and ``se`` (scores)."""
    if not pe or not level <= se[-1]:  # empty, above the best, or NaN
        return math.nan, False
    if level <= se[0]:
        return pe[0], True
    i = bisect.bisect_left(se, level)  # first envelope score >= level; i >= 1
    lo, hi = se[i - 1], se[i]
    a, b = math.log(pe[i - 1]), math.log(pe[i])
    return math.exp(a + (level - lo) / (hi - lo) * (b - a)), False


def needed(p_env: Sequence[float], s_env: Sequence[float],
           levels: float | Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Parameters an envelope needs for each score level, and whether that is its smallest point.

    Linear interpolation in ``(log parameters, score)`` between the last envelope point below the
    level and the first at or above it.  A level above the envelope's best (or NaN) needs NaN; a
    level at or below its first score needs the first count, flagged ``bounded`` (fewer
    parameters might do as well).

    Parameters
    ----------
    p_env, s_env : shape (m,)
        An envelope (:func:`selected_envelope`): counts increasing, scores non-decreasing.
    levels : float or shape (k,)

    Returns
    -------
    need, bounded : shape (k,)

    >>> needed(np.array([10.0, 1000.0]), np.array([0.5, 0.7]), [0.6, 0.4, 0.8])[0].round(6).tolist()
    [100.0, 10.0, nan]
    """
    pe = np.asarray(p_env, dtype=float).tolist()
    se = np.asarray(s_env, dtype=float).tolist()
    out = [need_at(pe, se, lv) for lv in np.atleast_1d(np.asarray(levels, dtype=float)).tolist()]
    return np.array([n for n, _ in out], dtype=float), np.array([b for _, b in out], dtype=bool)


def paired_resamples(test: np.ndarray, present: np.ndarray, items: np.ndarray | None, resamples: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The paired bootstrap's draws: seed counts, and every run's test score on the drawn items.

    Each resample draws ``S`` seed indices and ``N`` test items with replacement, *once*, for
    every point: the seeds as counts per seed index, the items applied to every run.  The drawn
    items are counted per distinct item column (items answered identically by every run share a
    column), so the cost grows with the number of distinct columns, not items.

    Parameters
    ----------
    test : shape (P, S)
        Per point and seed index: the run's test score (any value where absent).
    present : shape (P, S), bool
        Whether the run of that point and seed exists.
    items : shape (P, S, N) of 0/1, or None
        Per run, the correctness of each test item (same item order in every run); ``None``:
        resample seeds only, with the runs' ``test`` scores.
    resamples : int
    rng : numpy Generator

    Returns
    -------
    counts : shape (B, S)
        How often each seed index was drawn.
    runs : shape (P, S, B)
        Each run's test score on the drawn items (``test`` where ``items`` is None).
    """
    n_points, n_seeds = test.shape
    counts = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=resamples)
    if items is None:
        return counts, np.repeat(np.where(present, test, 0.0)[..., None], resamples, axis=2)
    n_items = items.shape[2]
    flat = np.where(present[..., None], items, 0).reshape(n_points * n_seeds, n_items).astype(np.uint8)
    cols, inverse = np.unique(flat, axis=1, return_inverse=True)
    n_cols = cols.shape[1]
    cols = cols.astype(float)
    inverse = inverse.ravel()
    runs = np.empty((n_points, n_seeds, resamples))
    step = max(1, _CHUNK // (n_cols + n_points * n_seeds + n_items))
    for start in range(0, resamples, step):
        stop = min(resamples, start + step)
        drawn = inverse[rng.integers(0, n_items, size=(stop - start, n_items))]  # (b, N): each drawn item's column
        drawn += n_cols * np.arange(stop - start)[:, None]
        draw = np.bincount(drawn.ravel(), minlength=(stop - start) * n_cols).reshape(stop - start, n_cols)
        runs[:, :, start:stop] = (cols @ draw.T.astype(float) / n_items).reshape(n_points, n_seeds, stop - start)
    return counts, runs


def seed_means(values: np.ndarray, present: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Each point's mean over the drawn seeds it has: ``values`` (P, S) or (P, S, B) with
    ``counts`` (S,) or (B, S); NaN where a point has none of the drawn seeds."""
    m = present.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        if values.ndim == 2:
            return (np.where(present, values, 0.0) @ counts) / (m @ counts)
        w = m[:, :, None] * counts.T[None]  # (P, S, B)
        return (values * w).sum(axis=1) / w.sum(axis=1)


# --- the records of a task --------------------------------------------------------------------
_RECORD_KEYS = ("task", "family", "point", "params", "groups", "seed", "val", "test")


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def _check_record(k: int, r: Any) -> np.ndarray | None:
    """Check one record's fields (not its consistency with the others); its test items or None."""
    if not isinstance(r, Mapping):
        raise ValueError(f"record {k} is a {type(r).__name__}, not a dict")
    missing = [key for key in _RECORD_KEYS if key not in r]
    if missing:
        raise ValueError(f"record {k} lacks {missing}")
    name, fam = r["point"], r["family"]
    if not isinstance(name, str) or not name or not isinstance(fam, str) or not fam:
        raise ValueError(f"record {k}: family and point must be non-empty strings")
    if not is_int(r["params"]) or r["params"] < 0:
        raise ValueError(f"record {k} ({name}): params must be an int >= 0, got {r['params']!r}")
    if r["groups"] is not None and (not is_int(r["groups"]) or r["groups"] < 1):
        raise ValueError(f"record {k} ({name}): groups must be None or an int >= 1, got {r['groups']!r}")
    if not is_int(r["seed"]) or r["seed"] < 0:
        raise ValueError(f"record {k} ({name}): seed must be an int >= 0, got {r['seed']!r}")
    for key in ("val", "test"):
        if not _is_real(r[key]):
            raise ValueError(f"record {k} ({name}): {key} must be a finite number, got {r[key]!r}")
    if r.get("fid") is not None and not _is_real(r["fid"]):
        raise ValueError(f"record {k} ({name}): fid must be None or a finite number, got {r['fid']!r}")
    if r.get("test_items") is None:
        return None
    items = np.asarray(r["test_items"])
    if items.ndim != 1 or not len(items) or not np.all((items == 0) | (items == 1)):
        raise ValueError(f"record {k} ({name}): test_items must be a non-empty list of 0/1")
    if abs(float(items.mean()) - float(r["test"])) > 1e-6:
        raise ValueError(f"record {k} ({name}): test = {r['test']!r} is not mean(test_items) = {float(items.mean())!r}")
    return items.astype(np.uint8)


@dataclass
class _Table:
    """A task's runs as arrays: P points (first-seen order) by S seed indices (ascending)."""

    task: str
    labels: list[str]
    families: list[str]
    params: np.ndarray            # (P,)
    groups: list[int | None]
    seeds: list[int]
    val: np.ndarray               # (P, S)
    test: np.ndarray              # (P, S)
    present: np.ndarray           # (P, S) bool
    items: np.ndarray | None      # (P, S, N) uint8
    fid: list[float | None]
    settings: list[dict[str, Any] | None]

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]]) -> _Table:
        if isinstance(records, (str, bytes)) or not isinstance(records, Sequence) or not records:
            raise ValueError("records must be a non-empty list of run records (dicts)")
        meta: dict[str, tuple[str, int, int | None]] = {}
        runs: dict[tuple[str, int], tuple[Mapping[str, Any], np.ndarray | None]] = {}
        for k, r in enumerate(records):
            items = _check_record(k, r)
            first, first_items = next(iter(runs.values()), (r, items))
            if r["task"] != first["task"]:
                raise ValueError(f"record {k} is of task {r['task']!r}, the others of {first['task']!r}: "
                                 "one task at a time")
            if (items is None) != (first_items is None):
                raise ValueError(f"record {k} ({r['point']}): test_items given in some records and not in others")
            if items is not None and len(items) != len(first_items):
                raise ValueError(f"record {k} ({r['point']}): {len(items)} test items, other runs have "
                                 f"{len(first_items)}")
            m = (r["family"], int(r["params"]), None if r["groups"] is None else int(r["groups"]))
            if meta.setdefault(r["point"], m) != m:
                raise ValueError(f"point {r['point']!r}: family/params/groups differ between its runs: "
                                 f"{meta[r['point']]} vs {m}")
            if (r["point"], int(r["seed"])) in runs:
                raise ValueError(f"point {r['point']!r} has two runs of seed {r['seed']}")
            runs[(r["point"], int(r["seed"]))] = (r, items)
        return cls._assemble(meta, runs)

    @classmethod
    def _assemble(cls, meta: dict[str, tuple[str, int, int | None]],
                  runs: dict[tuple[str, int], tuple[Mapping[str, Any], np.ndarray | None]]) -> _Table:
        order = list(meta)
        seeds = sorted({s for _, s in runs})
        row, col = {n: i for i, n in enumerate(order)}, {s: j for j, s in enumerate(seeds)}
        first, first_items = next(iter(runs.values()))
        shape = (len(order), len(seeds))
        val, test, present = np.zeros(shape), np.zeros(shape), np.zeros(shape, dtype=bool)
        items = None if first_items is None else np.zeros((*shape, len(first_items)), dtype=np.uint8)
        fids: dict[str, list[float]] = {}
        sett: dict[str, dict[str, Any]] = {}
        for (name, s), (r, its) in runs.items():
            i, j = row[name], col[s]
            val[i, j], test[i, j], present[i, j] = float(r["val"]), float(r["test"]), True
            if items is not None:
                items[i, j] = its
            if r.get("fid") is not None:
                fids.setdefault(name, []).append(float(r["fid"]))
            if isinstance(r.get("settings"), Mapping):
                sett[name] = dict(r["settings"])
        return cls(str(first["task"]), order, [meta[n][0] for n in order],
                   np.array([meta[n][1] for n in order], dtype=float), [meta[n][2] for n in order], seeds, val, test,
                   present, items, [float(np.mean(fids[n])) if n in fids else None for n in order],
                   [sett.get(n) for n in order])


# --- the curves compared with LoRA ------------------------------------------------------------
@dataclass
class _Entry:
    name: str
    kind: str                     # "lora", "family", "union" or "groups"
    members: list[str]
    groups: int | None
    ceiling: float | None
    idx: list[int]                # its points (params > 0), by ascending count


def _entries(t: _Table, lora_family: str, union: Mapping[str, Sequence[str]] | None, L: int,
             ceiling_families: Sequence[str]) -> list[_Entry]:
    """LoRA, then every other family, its per-G curves (two G or more), then the unions."""
    def pts(fams: Sequence[str], g: int | None = None) -> list[int]:
        idx = [i for i, f in enumerate(t.families) if f in fams and t.params[i] > 0 and (g is None or t.groups[i] == g)]
        return sorted(idx, key=lambda i: (t.params[i], i))

    lora = pts([lora_family])
    if not lora:
        raise ValueError(f"no run of the LoRA family {lora_family!r} with params > 0 (families: "
                         f"{sorted(set(t.families))})")
    out = [_Entry(lora_family, "lora", [lora_family], None, None, lora)]
    fams = list(dict.fromkeys(f for f in t.families if f != lora_family))
    for f in fams:
        idx = pts([f])
        if not idx:
            continue
        gs = sorted({t.groups[i] for i in idx if t.groups[i] is not None})
        reshape = f in ceiling_families
        out.append(_Entry(f, "family", [f], None, math.sqrt(L / gs[0]) if reshape and gs else None, idx))
        if len(gs) >= 2:
            out += [_Entry(f"{f} G={g}", "groups", [f], g, math.sqrt(L / g) if reshape else None, pts([f], g))
                    for g in gs]
    for name, members in (union or {}).items():
        present = [m for m in members if m in fams]
        if idx := pts(present):
            out.append(_Entry(name, "union", present, None, None, idx))
    return out


@dataclass
class _Curves:
    """The curves of a task and the levels they are read at; :meth:`needs` is the estimator."""

    entries: list[_Entry]
    params: list[float]
    val: np.ndarray               # (P, S) the runs' validation scores
    present: np.ndarray           # (P, S)
    fixed: list[float]            # the levels at fractions of LoRA's range
    r1: int                       # LoRA r = 1: LoRA's smallest point

    def needs(self, runs: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[tuple[list, ...]]]:
        """For the runs' test scores ``runs`` (P, S) and the seed counts ``counts`` (S,):
        parameters needed (E, K), bounded (E, K) and the envelopes, every curve taken with the
        leave-one-seed-out folds; the levels are ``fixed`` and LoRA r = 1's mean test score."""
        folds = seed_folds(self.val, runs, self.present, counts)
        levels = [*self.fixed, float(seed_means(runs, self.present, counts)[self.r1])]
        need = np.full((len(self.entries), len(levels)), np.nan)
        bound = np.zeros(need.shape, dtype=bool)
        envs = []
        for e, ent in enumerate(self.entries):
            env = fold_envelope(ent.idx, self.params, *folds)
            envs.append(env)
            for k, level in enumerate(levels):
                need[e, k], bound[e, k] = need_at(env[0], env[1], level)
        return need, bound, envs


def gain_text(g: Mapping[str, Any]) -> str:
    """One gain row of :func:`summarise_task` as text: ``"≥ 2.10× [1.60, 2.90], null p95 1.30×, ceiling
    4.90×"`` (``≥``: a bound; the 95 % interval; the bias band's 95th percentile; the ceiling
    sqrt(L/G)), or ``"not reached"`` / ``"undefined"`` (the level is above the family's / LoRA's
    curve)."""
    if g["gain"] is None:
        return "not reached" if g["lora_params"] is not None else "undefined"
    text = f"{'≥ ' if g['bounded'] else ''}{g['gain']:.2f}×"
    if g["low"] is not None:
        text += f" [{g['low']:.2f}, {g['high']:.2f}]"
    if g.get("null"):  # no p95: the family never reaches the level on LoRA's own curve
        text += f", null p95 {g['null']['p95']:.2f}×" if g["null"]["p95"] is not None else ", null p95 —"
    if g.get("ceiling") is not None:
        text += f", ceiling {g['ceiling']:.2f}×"
    return text


def _percentiles(x: np.ndarray, confidence: float, log: bool) -> tuple[float | None, float | None]:
    """Percentile interval of the defined resamples (NaN = undefined).  A ratio of 0 (the family
    never reaches the level) is an outcome: it is ranked, not dropped, and an end of the interval
    that falls on it is 0."""
    ok = x[~np.isnan(x)]
    if not len(ok):
        return None, None
    tail = 100 * (1 - confidence) / 2
    if log:
        ok = np.log(np.maximum(ok, 1e-300))  # a gain of 0 ranks lowest and comes back as 0
    lo, hi = np.percentile(ok, [tail, 100 - tail])
    if not log:
        return float(lo), float(hi)
    return (0.0 if lo < -690 else math.exp(lo)), (0.0 if hi < -690 else math.exp(hi))


def _gain_outcomes(lora_need: np.ndarray, family_need: np.ndarray) -> np.ndarray:
    """LoRA's need over the family's per resample, where a need of NaN is "never reaches the
    level": the family falling short of a level LoRA reaches is a gain of 0; the level undefined
    for LoRA stays NaN."""
    with np.errstate(invalid="ignore", divide="ignore"):
        gain = lora_need / family_need
    return np.where(np.isnan(family_need) & ~np.isnan(lora_need), 0.0, gain)


def _fin(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _ratio_stats(point: float, boot: np.ndarray, confidence: float) -> dict[str, Any]:
    """A ratio's point value, its bootstrap interval (when defined in half the resamples or more)
    and the share of resamples defining it (a gain of 0 counts as a defined outcome)."""
    ok = ~np.isnan(boot)
    defined = float(ok.mean()) if len(boot) else 0.0
    low, high = _percentiles(boot, confidence, log=True) if len(boot) and defined >= 0.5 else (None, None)
    return {"value": _fin(point), "low": low, "high": high, "defined": defined}


def _check_args(L: int, resamples: int, seed: int, null_draws: int | None, fractions: Sequence[float],
                confidence: float, union: Mapping[str, Sequence[str]] | None) -> None:
    check_int("L", L, minimum=1)
    check_int("resamples", resamples, minimum=0)
    check_int("seed", seed)
    if null_draws is not None:
        check_int("null_draws", null_draws, minimum=0)
    if not all(_is_real(f) and 0 <= f <= 1 for f in fractions):
        raise ValueError(f"fractions must lie in [0, 1], got {list(fractions)!r}")
    if not (_is_real(confidence) and 0 < confidence < 1):
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    if union is not None and not isinstance(union, Mapping):
        raise ValueError(f"union must be a dict name -> families, got {type(union).__name__}")
    for name, members in (union or {}).items():
        if isinstance(members, str) or not all(isinstance(m, str) for m in members):
            raise ValueError(f"union {name!r}: members must be a list of family names, got {members!r}")


def _gains(curves: _Curves, e: int, keys: list[str], levels: list[float], est: tuple[np.ndarray, ...],
           boot: tuple[np.ndarray, ...], band: list[dict[str, Any]] | None, confidence: float) -> list[dict[str, Any]]:
    """The gain rows of entry ``e``: ``est`` = (need, bounded) of the point estimate, ``boot`` the
    same per resample (last axis)."""
    need0, bound0 = est
    need_b, bound_b = boot
    ent = curves.entries[e]
    min_p = min(curves.params[i] for i in ent.idx)
    rows = []
    for k, key in enumerate(keys):
        g0 = need0[0, k] / need0[e, k]
        gb = _gain_outcomes(need_b[0, k], need_b[e, k])
        stats = _ratio_stats(g0, gb, confidence)
        ok = np.isfinite(gb) & (gb > 0)
        null = band[k] if band is not None else None
        p95 = None if null is None else null["p95"]
        rows.append({"key": key, "level": levels[k], "gain": stats["value"], "lora_params": _fin(need0[0, k]),
                     "family_params": _fin(need0[e, k]), "bounded": bool(bound0[e, k] and math.isfinite(g0)),
                     "low": stats["low"], "high": stats["high"], "defined": stats["defined"],
                     "bounded_share": float(bound_b[e, k][ok].mean()) if ok.any() else 0.0,
                     "cap": _fin(need0[0, k] / min_p), "ceiling": ent.ceiling, "null": null,
                     "beyond_null": None if p95 is None or not math.isfinite(g0) else bool(g0 > p95)})
    return rows


def _group_order(entries: list[_Entry], keys: list[str], need0: np.ndarray, need_b: np.ndarray,
                 confidence: float, bound0: np.ndarray | None = None) -> dict[str, list[dict[str, Any]]]:
    """Per grouped family, for every pair G < G' of its per-G curves and every level: the gain of
    G over G' (``ratio`` = needed(G') / needed(G)).  A level where either curve's need is censored
    at its smallest point (``bound0``) measures the sweep, not the curves: its ratio is None
    (``censored``)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for parent in dict.fromkeys(ent.members[0] for ent in entries if ent.kind == "groups"):
        subs = sorted((ent.groups, e) for e, ent in enumerate(entries)
                      if ent.kind == "groups" and ent.members[0] == parent)
        rows = []
        for a, (ga, ea) in enumerate(subs):
            for gb, eb in subs[a + 1:]:
                for k, key in enumerate(keys):
                    censored = bound0 is not None and bool(bound0[ea, k] or bound0[eb, k])
                    with np.errstate(invalid="ignore", divide="ignore"):
                        point, boot = need0[eb, k] / need0[ea, k], need_b[eb, k] / need_b[ea, k]
                    stats = _ratio_stats(math.nan if censored else point, boot, confidence)
                    if censored:
                        stats.update(low=None, high=None)
                    rows.append({"small": ga, "large": gb, "key": key, "ratio": stats.pop("value"),
                                 "censored": censored, **stats})
        out[parent] = rows
    return out


def _point_rows(t: _Table, val_m: np.ndarray, test_m: np.ndarray, test_b: np.ndarray,
                confidence: float) -> list[dict[str, Any]]:
    rows = []
    for i, name in enumerate(t.labels):
        lo, hi = _percentiles(test_b[i], confidence, log=False) if test_b.shape[1] else (None, None)
        rows.append({"family": t.families[i], "point": name, "params": int(t.params[i]), "groups": t.groups[i],
                     "seeds": int(t.present[i].sum()), "val": float(val_m[i]), "test": float(test_m[i]),
                     "test_low": lo, "test_high": hi, "fid": t.fid[i], "settings": t.settings[i]})
    return rows


def _contrasts(points: list[dict[str, Any]], test_m: np.ndarray, test_b: np.ndarray,
               confidence: float) -> list[dict[str, Any]]:
    from .claims import contrast_pairs  # claims reads summaries, never this module: no cycle at import

    row = {p["point"]: i for i, p in enumerate(points)}
    out = []
    for c in contrast_pairs(points):
        a, b = row[c["a"]], row[c["b"]]
        low, high = _percentiles(test_b[a] - test_b[b], confidence, log=False) if test_b.shape[1] else (None, None)
        out.append({**c, "diff": float(test_m[a] - test_m[b]), "low": low, "high": high})
    return out


def _family(t: _Table, curves: _Curves, e: int, keys: list[str], levels: list[float], est: tuple[Any, ...],
            boot: tuple[np.ndarray, ...], noise: Any, draws: int, seed: int, confidence: float) -> dict[str, Any]:
    """The section of entry ``e``: its envelope, and its gains beside their null band."""
    from .null import null_band  # null builds on this module's estimator: imported when used

    ent = curves.entries[e]
    lora_env = est[2][0]
    band = None if not draws else null_band(
        t.params[curves.entries[0].idx], t.params[ent.idx], (lora_env[0], lora_env[1]), curves.fixed, noise=noise,
        seeds=len(t.seeds), draws=draws, seed=zlib.crc32(f"{seed}:{ent.name}".encode()))
    return {"kind": ent.kind, "members": ent.members, "groups": ent.groups, "ceiling": ent.ceiling,
            "min_params": int(min(curves.params[i] for i in ent.idx)), "envelope": _envelope(t, est[2][e]),
            "gains": _gains(curves, e, keys, levels, est[:2], boot, band, confidence)}


def _envelope(t: _Table, env: tuple[list, ...]) -> dict[str, Any]:
    return {"points": [t.labels[i] for i in env[2]], "params": env[0], "test": env[1]}


def _shape_factor(weight_shape: Sequence[int] | None) -> float:
    """``(m + n) / (2 sqrt(m n))``: how much more LoRA pays on an ``m x n`` weight than on a square
    one of the same size (1 for square weights)."""
    if weight_shape is None:
        return 1.0
    if len(weight_shape) != 2 or not all(isinstance(d, int) and d > 0 for d in weight_shape):
        raise ValueError(f"weight_shape must be two positive ints (m, n), got {weight_shape!r}")
    m, n = weight_shape
    return (m + n) / (2 * math.sqrt(m * n))


def summarise_task(records: Sequence[Mapping[str, Any]], *, L: int, lora_family: str = "lora",
                   union: Mapping[str, Sequence[str]] | None = None, resamples: int = 1000, seed: int = 0,
                   null_draws: int | None = None, fractions: Sequence[float] = LEVEL_FRACTIONS,
                   ceiling_families: Sequence[str] = CEILING_FAMILIES, confidence: float = 0.95,
                   weight_shape: Sequence[int] | None = None) -> dict[str, Any]:
    """The gains of every family of one task over LoRA, JSON-ready (docs/study-method.md).

    Parameters
    ----------
    records : list of run records
        One per point and seed: ``task, family, point, params, groups, seed, val, test`` and
        ``test_items`` (0/1 per test item, same order in every run; ``None`` or absent in every
        record: the bootstrap resamples seeds only), optionally ``fid`` and ``settings`` (a dict,
        passed through to the point's summary).  Points with ``params == 0`` (head only) are
        summarised but are on no curve.
    L : int
        The number of adapted square weights: the ceiling of a grouped reshape over ``G`` groups
        is ``sqrt(L / G)``.
    lora_family : str
        The reference family; its smallest point is "LoRA r = 1".
    union : dict name -> families, optional
        Extra curves made of all the points of several families (members absent from the records
        are left out; a union with none is skipped).
    resamples : int
        Paired bootstrap resamples (seed indices and test items drawn once per resample, the same
        draw for every point); 0: no intervals.
    seed : int
        Seeds the bootstrap and the null draws: the result is a function of the records and the
        arguments.
    null_draws : int, optional
        Draws of the identical-curve null per curve (default ``max(resamples, 200)``; 0: none).
    fractions : the levels' fractions of LoRA's range
    ceiling_families : families whose gains carry the ceiling ``sqrt(L / G)``
    confidence : the intervals' coverage
    weight_shape : (m, n), optional
        The shape of each adapted weight (default square).  At equal rank LoRA on ``L`` weights
        ``m x n`` has ``r L (m + n)`` parameters and a reshape of ``G`` square groups of ``L m n / G``
        entries ``2 r sqrt(G L m n)``, so the ceiling is ``(m + n) / (2 sqrt(m n)) * sqrt(L / G)``.

    Returns
    -------
    dict
        ``task``, ``L``, ``resamples``, ``null_draws``, ``confidence``, ``seeds`` (indices),
        ``test_items`` (N or None), ``noise`` (:class:`~tensoradapt.demo.study.null.Noise`), ``lora_r1`` (``point``,
        ``params``, ``test``), ``levels`` (``[{key, value}]``: ``"25%"``, ``"50%"``, ``"75%"``,
        ``"lora_r1"``), ``lora`` (LoRA's envelope), ``families`` (name -> curve: ``kind`` in
        family / groups / union, ``members``, ``groups``, ``ceiling``, ``min_params``,
        ``envelope`` (``points``: the picked points; ``params``, ``test``: the curve, one entry
        per pooled block), and ``gains``: one dict per level with ``key, level, gain, lora_params,
        family_params, bounded, low, high, defined, bounded_share, cap, ceiling, null,
        beyond_null``), ``group_order`` (family -> gains of fewer over more groups),
        ``contrasts`` (paired test-score differences of the point pairs of
        :func:`~tensoradapt.demo.study.claims.contrast_pairs`) and ``points`` (per point means
        and test intervals).
    """
    from .null import estimate_noise

    _check_args(L, resamples, seed, null_draws, fractions, confidence, union)
    t = _Table.from_records(records)
    for name in union or {}:
        if name in t.families or name == lora_family:
            raise ValueError(f"union name {name!r} is also a family name")
    entries = _entries(t, lora_family, union, L * _shape_factor(weight_shape) ** 2, ceiling_families)
    draws = max(resamples, 200) if null_draws is None else null_draws
    lora = entries[0].idx
    r1 = lora[0]
    params = t.params.tolist()
    ones = np.ones(len(t.seeds))
    val_m, test_m = seed_means(t.val, t.present, ones), seed_means(t.test, t.present, ones)
    lora_env = fold_envelope(lora, params, *seed_folds(t.val, t.test, t.present, ones))
    lo = float(test_m[lora].min())
    hi = max(lo, lora_env[1][-1])
    curves = _Curves(entries, params, t.val, t.present, [lo + f * (hi - lo) for f in fractions], r1)
    keys = [level_key(f) for f in fractions] + ["lora_r1"]
    levels = [*curves.fixed, float(test_m[r1])]

    need0, bound0, envs0 = curves.needs(t.test, ones)
    counts, runs = paired_resamples(t.test, t.present, t.items, resamples, np.random.default_rng(seed))
    boot = [curves.needs(runs[:, :, b], counts[b])[:2] for b in range(resamples)]
    need_b = np.stack([b[0] for b in boot], axis=-1) if boot else np.zeros((*need0.shape, 0))
    bound_b = np.stack([b[1] for b in boot], axis=-1) if boot else np.zeros((*need0.shape, 0), dtype=bool)
    test_b = seed_means(runs, t.present, counts)
    pairs = [(i, j) for ent in entries if ent.kind in ("lora", "family") for i, j in itertools.pairwise(ent.idx)]
    noise = estimate_noise(t.val, t.test, t.present, t.items, pairs)

    families = {ent.name: _family(t, curves, e, keys, levels, (need0, bound0, envs0), (need_b, bound_b), noise,
                                  draws, seed, confidence) for e, ent in enumerate(entries) if e}
    points = _point_rows(t, val_m, test_m, test_b, confidence)
    return {"task": t.task, "L": L, "resamples": resamples, "null_draws": draws, "confidence": confidence,
            "seeds": t.seeds, "test_items": None if t.items is None else t.items.shape[2], "noise": noise.to_dict(),
            "lora_r1": {"point": t.labels[r1], "params": int(params[r1]), "test": float(test_m[r1])},
            "levels": [{"key": k, "value": float(v)} for k, v in zip(keys, levels, strict=True)],
            "lora": {"envelope": _envelope(t, envs0[0])},
            "families": families, "group_order": _group_order(entries, keys, need0, need_b, confidence, bound0),
            "contrasts": _contrasts(points, test_m, test_b, confidence), "points": points}
