"""The identical-curve null: the "gain" the study's estimator reports when a family's true curve is
LoRA's own (the bias band of docs/study-method.md).

:func:`estimate_noise` measures, on a task's runs, the noise that pairing does not cancel;
:func:`null_band` draws families on LoRA's curve with that noise, runs them through the estimator
of :mod:`~tensoradapt.demo.study.gain` (folds, envelope, reading) and returns the median and 95th
percentile of the gains it reports.  Pure NumPy, deterministic for its seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tensoradapt._validate import check_int

from .gain import fold_envelope, need_at, seed_folds

__all__ = ["Noise", "estimate_noise", "null_band"]


@dataclass(frozen=True)
class Noise:
    """The noise that pairing does not cancel, per run and per point.

    ``run_val``, ``run_test``: standard deviations of one run's validation and test score about its
    point's mean; ``corr``: their correlation (a run lucky on one is lucky on the other);
    ``item``: the standard deviation of a point's test score from the draw of the test set
    (shared by the point's seeds).  A point's mean test score over S seeds has variance
    ``run_test**2 / S + item**2``.
    """

    run_val: float
    run_test: float
    corr: float
    item: float

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def _pair(a: int, b: int, val: np.ndarray, test: np.ndarray, present: np.ndarray,
          items: np.ndarray | None) -> tuple[float, float, float, float, int] | None:
    """Half the variances and covariance over seeds of the run differences of points a and b
    (val, test), half the test-item variance of their seed-mean difference, and the seeds."""
    k = present[a] & present[b]
    n = int(k.sum())
    if n == 0:
        return None
    dv, dt = val[a, k] - val[b, k], test[a, k] - test[b, k]
    var_v = float(dv.var(ddof=1)) if n >= 2 else 0.0
    var_t = float(dt.var(ddof=1)) if n >= 2 else 0.0
    cov = float(np.cov(dv, dt)[0, 1]) if n >= 2 else 0.0
    item = 0.0
    if items is not None:
        z = items[a, k].mean(axis=0) - items[b, k].mean(axis=0)
        item = float(z.var()) / items.shape[2]
    return var_v / 2, var_t / 2, cov / 2, item / 2, n


def estimate_noise(val: np.ndarray, test: np.ndarray, present: np.ndarray, items: np.ndarray | None,
                   pairs: Sequence[tuple[int, int]]) -> Noise:
    """The :class:`Noise` of a task, measured on the differences of ``pairs`` of points.

    For neighbouring points ``a, b`` of one family, over their common seeds: half the variance of
    the per-seed difference ``a - b`` is each point's run variance (validation and test), half
    their covariance the shared part; half the item variance of the seed-mean difference over
    ``N`` is each point's test-set variance.  What every point shares (a lucky seed, an easy test
    set) cancels in the difference, as it does in the paired comparison.  Medians over the pairs.
    Without two seeds in common anywhere, the run noise is taken equal to the item noise.

    Parameters
    ----------
    val, test, present : shape (P, S)
    items : shape (P, S, N) or None
    pairs : (a, b) point indices
    """
    got = [x for a, b in pairs if (x := _pair(a, b, val, test, present, items)) is not None]
    item = math.sqrt(float(np.median([x[3] for x in got]))) if got else 0.0
    seeded = [x for x in got if x[4] >= 2]
    if not seeded:
        return Noise(item, item, 0.0, item)
    run_val = math.sqrt(float(np.median([x[0] for x in seeded])))
    run_test = math.sqrt(float(np.median([x[1] for x in seeded])))
    corr = [x[2] / math.sqrt(x[0] * x[1]) if x[0] > 0 and x[1] > 0 else 0.0 for x in seeded]
    return Noise(run_val if run_val > 0 else run_test, run_test, float(np.clip(np.median(corr), -1.0, 1.0)), item)


def _true_curve(p_env: np.ndarray, s_env: np.ndarray, params: np.ndarray) -> np.ndarray:
    """LoRA's envelope as a function of parameters: linear in log parameters, extended past its
    ends with the end segments' slopes, clipped to [0, 1]."""
    x = np.log(np.asarray(params, dtype=float))
    lp = np.log(p_env)
    if len(lp) == 1:
        return np.clip(np.full(x.shape, s_env[0]), 0.0, 1.0)
    y = np.interp(x, lp, s_env)
    lo, hi = x < lp[0], x > lp[-1]
    y[lo] = s_env[0] + (x[lo] - lp[0]) * (s_env[1] - s_env[0]) / (lp[1] - lp[0])
    y[hi] = s_env[-1] + (x[hi] - lp[-1]) * (s_env[-1] - s_env[-2]) / (lp[-1] - lp[-2])
    return np.clip(y, 0.0, 1.0)


def _band(gains: np.ndarray, draws: int) -> dict[str, float | None]:
    ok = gains[np.isfinite(gains)]
    if len(ok) < draws / 2:  # a band from a handful of draws is no band (as the bootstrap's intervals)
        return {"median": None, "p95": None, "defined": len(ok) / draws if draws else 0.0}
    return {"median": float(np.median(ok)), "p95": float(np.percentile(ok, 95)), "defined": len(ok) / draws}


def null_band(lora_params: Sequence[float], family_params: Sequence[float],
              curve: tuple[Sequence[float], Sequence[float]], levels: Sequence[float], *, noise: Noise, seeds: int,
              draws: int = 1000, seed: int = 0, r1: bool = True) -> list[dict[str, float | None]]:
    """The gains the estimator reports when the family's true curve is LoRA's.

    In each of ``draws`` draws, every LoRA point and every family point (at their own parameter
    counts) gets ``seeds`` runs scoring ``f(params)`` plus noise: ``f`` is ``curve`` (LoRA's
    envelope, linear in log parameters, extended with its end slopes, clipped to [0, 1]); each
    run's validation and test noise is normal with standard deviations ``noise.run_val``,
    ``noise.run_test`` and correlation ``noise.corr``; each point's test score also moves by a
    normal test-set term of standard deviation ``noise.item``, the same for its seeds.  Both
    curves are taken with the study's folds (picked on the other seeds' validation, read on the
    seed's test) and read at the levels; the gain is LoRA's need over the family's.

    Parameters
    ----------
    lora_params, family_params : shape (n_lora,), (n_family,)
        Parameter counts (> 0) of the points.
    curve : (params, scores)
        The true curve's points, counts increasing, scores non-decreasing.
    levels : shape (k,)
        Fixed score levels.
    noise : Noise
    seeds : int
        Runs per point.
    draws, seed : int
    r1 : bool
        Also the ``lora_r1`` level (appended last): the drawn mean test score of LoRA's smallest
        point.

    Returns
    -------
    One dict per level: ``median`` and ``p95`` (95th percentile) of the defined null gains, and
    ``defined``, the share of draws in which the gain is defined.
    """
    lp = np.asarray(lora_params, dtype=float)
    fp = np.asarray(family_params, dtype=float)
    if not len(lp) or not len(fp) or np.any(~(lp > 0)) or np.any(~(fp > 0)):
        raise ValueError("lora_params and family_params must be non-empty and positive")
    check_int("draws", draws, minimum=1)
    check_int("seeds", seeds, minimum=1)
    cp, cs = (np.asarray(c, dtype=float) for c in curve)
    rng = np.random.default_rng(seed)
    n_l = len(lp)
    mu = _true_curve(cp, cs, np.r_[lp, fp])
    z = rng.standard_normal((draws, 3, len(mu), seeds))
    c = noise.corr
    val = mu[None, :, None] + noise.run_val * z[:, 0]
    test = (mu[None, :, None] + noise.run_test * (c * z[:, 0] + math.sqrt(max(0.0, 1.0 - c * c)) * z[:, 1])
            + noise.item * z[:, 2, :, :1])
    params = np.r_[lp, fp].tolist()
    order_l = np.argsort(lp, kind="stable").tolist()
    order_f = (n_l + np.argsort(fp, kind="stable")).tolist()
    smallest = order_l[0]
    present = np.ones((len(mu), seeds), dtype=bool)
    ones = np.ones(seeds)
    fixed = [float(x) for x in levels]
    gains = np.full((draws, len(fixed) + (1 if r1 else 0)), np.nan)
    for d in range(draws):
        folds = seed_folds(val[d], test[d], present, ones)
        le, fe = fold_envelope(order_l, params, *folds), fold_envelope(order_f, params, *folds)
        for j, level in enumerate([*fixed, float(test[d, smallest].mean())] if r1 else fixed):
            gains[d, j] = need_at(le[0], le[1], level)[0] / need_at(fe[0], fe[1], level)[0]
    return [_band(gains[:, j], draws) for j in range(gains.shape[1])]
