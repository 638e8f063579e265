"""The study's gain estimator (``demo/study/gain.py``) and claims table (``demo/study/claims.py``):
known answers on log-linear curves, the pairing of the bootstrap, selection on validation, the
identical-curve null, the claims' verdicts, determinism and input errors.  Pure NumPy."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensoradapt.demo.study import claims as study_claims
from tensoradapt.demo.study import gain as G
from tensoradapt.demo.study import null as N


# ---------------------------------------------------------------------------------------------
# synthetic run records
# ---------------------------------------------------------------------------------------------
def _score(p: float) -> float:
    """The log-linear truth: 0.5 at 100 parameters, + 0.1 per decade."""
    return 0.5 + 0.1 * math.log10(p / 100)


def _exact(family, pts, seeds=3, groups=None, task="t"):
    """Noise-free records without test items: every seed scores the truth on val and test."""
    return [{"task": task, "family": family, "point": name, "params": p, "groups": groups, "seed": s, "lr": 1e-3,
             "val": _score(p), "test": _score(p), "fid": None} for name, p in pts for s in range(seeds)]


def _noisy(rng, family, pts, seeds=4, n_items=300, task="t", groups=None, shift=1.0, noise=0.01):
    """Records with test items: each run's accuracy is the truth at ``shift * params`` plus seed noise."""
    out = []
    for name, p, *g in pts:
        for s in range(seeds):
            q = float(np.clip(_score(p * shift) + rng.normal(0, noise), 0.01, 0.99))
            items = (rng.random(n_items) < q).astype(int).tolist()
            out.append({"task": task, "family": family, "point": name, "params": int(p),
                        "groups": g[0] if g else groups, "seed": s, "lr": 1e-3, "val": q + rng.normal(0, 0.005),
                        "test": float(np.mean(items)), "test_items": items, "fid": None})
    return out


LORA = [(f"lora-r{r}", 100 * r) for r in (1, 2, 4, 8, 16)]


def _gain(section, family, key):
    return next(g for g in section["families"][family]["gains"] if g["key"] == key)


# ---------------------------------------------------------------------------------------------
# envelope and interpolation
# ---------------------------------------------------------------------------------------------
def test_isotonic_pools_adjacent_violators():
    assert G.isotonic([1.0, 3.0, 2.0, 4.0]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert G.isotonic([3.0, 2.0, 1.0]).tolist() == pytest.approx([2.0, 2.0, 2.0])
    assert G.isotonic([]).tolist() == []


def test_envelope_is_chosen_on_validation_and_read_on_test():
    # 200 is great on test but worse on validation than 100: a budget of 200 still picks 100
    p, s, picked = G.selected_envelope([100, 200, 400], [0.6, 0.55, 0.7], [0.6, 0.95, 0.7])
    assert p.tolist() == [100, 400] and s.tolist() == [0.6, 0.7] and picked.tolist() == [0, 2]
    # of equal counts the better on validation; test scores made non-decreasing, a pooled block
    # becoming one point at its geometric-mean count (its mean is not credited to its first point)
    p, s, picked = G.selected_envelope([100, 100, 400, 800], [0.6, 0.65, 0.7, 0.8], [0.7, 0.66, 0.6, 0.9])
    assert picked.tolist() == [1, 2, 3]
    assert p.tolist() == pytest.approx([200, 800]) and s.tolist() == pytest.approx([0.63, 0.9])
    with pytest.raises(ValueError, match="positive"):
        G.selected_envelope([0, 1], [0.1, 0.2], [0.1, 0.2])


def test_needed_interpolates_in_log_parameters_and_flags_bounds():
    need, bounded = G.needed(np.array([100.0, 10000.0]), np.array([0.5, 0.9]), [0.7, 0.4, 0.95, float("nan")])
    assert need[0] == pytest.approx(1000.0) and need[1] == 100.0
    assert np.isnan(need[2]) and np.isnan(need[3])
    assert bounded.tolist() == [False, True, False, False]


# ---------------------------------------------------------------------------------------------
# summarise_task: known answers
# ---------------------------------------------------------------------------------------------
def test_known_gain_on_log_linear_curves():
    fam = [(f"f{k}", p // 4) for k, (_, p) in enumerate(LORA)]  # the same scores, 4x fewer parameters
    # the family's points at p/4 score what LoRA scores at p
    recs = _exact("lora", LORA) + [dict(r, val=_score(4 * r["params"]), test=_score(4 * r["params"]))
                                   for r in _exact("f", fam)]
    sec = G.summarise_task(recs, L=24, resamples=50, null_draws=20)
    assert [lv["key"] for lv in sec["levels"]] == ["25%", "50%", "75%", "lora_r1"]
    assert sec["lora_r1"] == {"point": "lora-r1", "params": 100, "test": pytest.approx(0.5)}
    lo, hi = _score(100), _score(1600)
    assert [lv["value"] for lv in sec["levels"][:3]] == pytest.approx([lo + f * (hi - lo) for f in (0.25, 0.5, 0.75)])
    for key in ("25%", "50%", "75%"):
        g = _gain(sec, "f", key)
        assert g["gain"] == pytest.approx(4.0) and not g["bounded"]
        assert g["low"] == pytest.approx(4.0) and g["high"] == pytest.approx(4.0) and g["defined"] == 1.0
        assert g["lora_params"] == pytest.approx(100 * 10 ** ((g["level"] - 0.5) / 0.1))
    r1 = _gain(sec, "f", "lora_r1")  # the family's smallest point (25 params) already scores 0.5
    assert r1["gain"] == pytest.approx(4.0) and r1["bounded"] and r1["cap"] == pytest.approx(4.0)
    assert sec["families"]["f"]["ceiling"] is None and r1["ceiling"] is None
    json.dumps(sec, allow_nan=False)  # JSON-ready, no NaN


def test_gain_between_points_is_the_geometric_interpolation():
    lora = [("l1", 100), ("l2", 10000)]
    recs = [dict(r, val=v, test=v) for r, v in zip(_exact("lora", lora), [0.5] * 3 + [0.9] * 3, strict=True)]
    recs += [dict(r, val=v, test=v) for r, v in zip(_exact("f", [("a", 10), ("b", 1000)]), [0.5] * 3 + [0.9] * 3,
                                                   strict=True)]
    sec = G.summarise_task(recs, L=1, resamples=0, null_draws=0, fractions=(0.5,))
    g = _gain(sec, "f", "50%")
    assert g["lora_params"] == pytest.approx(1000) and g["family_params"] == pytest.approx(100)
    assert g["gain"] == pytest.approx(10.0) and g["low"] is None and g["null"] is None


def test_unreached_and_undefined_levels():
    recs = _exact("lora", LORA) + [dict(r, val=0.3, test=0.3) for r in _exact("weak", [("w", 50)])]
    sec = G.summarise_task(recs, L=1, resamples=20, null_draws=10)
    g = _gain(sec, "weak", "lora_r1")
    # never reaching the level is an outcome of every resample (a gain of 0), not an undefined draw
    assert g["gain"] is None and g["lora_params"] == 100 and g["defined"] == 1.0
    assert g["low"] == 0.0 and g["high"] == 0.0


def test_resamples_where_the_family_falls_short_pull_the_interval_down():
    """A draw where the family does not reach the level is ranked as a gain of 0 (not dropped):
    with a quarter of such draws the 2.5 % end of the interval is 0."""
    gains = np.array([0.0] * 25 + [2.0] * 75)
    low, high = G._percentiles(gains, 0.95, log=True)
    assert low == 0.0 and high == pytest.approx(2.0)
    assert G._percentiles(np.array([2.0] * 100), 0.95, log=True) == pytest.approx((2.0, 2.0))


def test_the_ceiling_of_non_square_weights():
    """LoRA on L weights m x n pays (m + n) / (2 sqrt(m n)) more than on square ones of the same size."""
    rng = np.random.default_rng(1)
    recs = _noisy(rng, "lora", LORA) + _noisy(rng, "2d-reshape", [("g1", 40, 1)], shift=2.0)
    sq = _gain(G.summarise_task(recs, L=4, resamples=0, null_draws=0), "2d-reshape", "lora_r1")
    rect = _gain(G.summarise_task(recs, L=4, resamples=0, null_draws=0, weight_shape=(32, 288)), "2d-reshape",
                 "lora_r1")
    assert sq["ceiling"] == pytest.approx(2.0) and rect["ceiling"] == pytest.approx(2.0 * 320 / (2 * 96))
    with pytest.raises(ValueError, match="weight_shape"):
        G.summarise_task(recs, L=4, resamples=0, null_draws=0, weight_shape=(32,))


def test_ceiling_beside_grouped_reshape_gains_and_group_sub_curves():
    rng = np.random.default_rng(1)
    recs = _noisy(rng, "lora", LORA)
    recs += _noisy(rng, "2d-reshape", [(f"g{g}-r{r}", int(100 * r / math.sqrt(24 / g)), g) for g in (1, 4)
                                        for r in (1, 4)], shift=2.0)
    recs += _noisy(rng, "2d-stack", [(f"s{g}", 80, g) for g in (1,)])
    sec = G.summarise_task(recs, L=24, resamples=40, null_draws=20)
    fams = sec["families"]
    assert fams["2d-reshape"]["ceiling"] == pytest.approx(math.sqrt(24))
    assert fams["2d-reshape G=4"]["ceiling"] == pytest.approx(math.sqrt(6))
    assert fams["2d-reshape G=4"]["kind"] == "groups" and fams["2d-reshape G=4"]["groups"] == 4
    assert all(g["ceiling"] == pytest.approx(math.sqrt(24)) for g in fams["2d-reshape"]["gains"])
    assert fams["2d-stack"]["ceiling"] is None and "2d-stack G=1" not in fams
    rows = sec["group_order"]["2d-reshape"]
    assert {(r["small"], r["large"]) for r in rows} == {(1, 4)} and len(rows) == 4


# ---------------------------------------------------------------------------------------------
# the paired bootstrap and selection on validation
# ---------------------------------------------------------------------------------------------
def test_bootstrap_is_paired_over_seeds_and_items():
    rng = np.random.default_rng(2)
    lora = _noisy(rng, "lora", LORA, noise=0.03)
    same = [dict(r, family="twin", point="twin-" + r["point"]) for r in lora]       # the very same runs
    half = [dict(r, family="half", point="half-" + r["point"], params=r["params"] // 2) for r in lora]
    sec = G.summarise_task(lora + same + half, L=1, resamples=200, null_draws=0)
    for key in ("25%", "50%", "75%", "lora_r1"):
        twin, halved = _gain(sec, "twin", key), _gain(sec, "half", key)
        assert twin["gain"] == pytest.approx(1.0) and (twin["low"], twin["high"]) == pytest.approx((1.0, 1.0))
        assert halved["gain"] == pytest.approx(2.0) and (halved["low"], halved["high"]) == pytest.approx((2.0, 2.0))
    # the points themselves do vary between resamples (items and seeds are resampled)
    p = sec["points"][0]
    assert p["test_low"] < p["test"] < p["test_high"]


def test_item_resampling_widens_a_points_interval():
    rng = np.random.default_rng(3)
    recs = _noisy(rng, "lora", LORA, seeds=3, noise=0.0)
    # identical runs across seeds: only the item draw moves a point's mean
    for r in recs:
        first = next(q for q in recs if q["point"] == r["point"] and q["seed"] == 0)
        r.update(test_items=first["test_items"], test=first["test"], val=first["val"])
    with_items = G.summarise_task(recs, L=1, resamples=100, null_draws=0)["points"][0]
    seeds_only = G.summarise_task([{k: v for k, v in r.items() if k != "test_items"} for r in recs], L=1,
                                  resamples=100, null_draws=0)["points"][0]
    assert seeds_only["test_low"] == seeds_only["test_high"]
    assert with_items["test_low"] < with_items["test_high"]


def test_a_point_good_on_test_but_bad_on_validation_is_not_picked():
    base = _exact("lora", LORA) + _exact("f", [("f1", 50), ("f2", 200), ("f3", 800)])
    lucky = [{"task": "t", "family": "f", "point": "lucky", "params": 60, "groups": None, "seed": s, "lr": 1e-3,
              "val": 0.2, "test": 0.99, "fid": None} for s in range(3)]
    a = G.summarise_task(base, L=1, resamples=0, null_draws=0)
    b = G.summarise_task(base + lucky, L=1, resamples=0, null_draws=0)
    assert "lucky" not in b["families"]["f"]["envelope"]["points"]
    for key in ("25%", "50%", "75%", "lora_r1"):
        assert _gain(b, "f", key)["gain"] == pytest.approx(_gain(a, "f", key)["gain"])
    # were it picked on test, "lucky" (60 params) would reach every level
    assert _gain(b, "f", "75%")["family_params"] > 60


# ---------------------------------------------------------------------------------------------
# the identical-curve null
# ---------------------------------------------------------------------------------------------
def test_a_lucky_seed_cannot_pick_the_point_it_reports():
    # point 200's seed 0 is lucky on validation and test alike; its other seeds score like point 100
    val = np.array([[0.5, 0.5, 0.5], [0.9, 0.5, 0.5], [0.8, 0.8, 0.8]])
    test = val.copy()
    p, s, _ = G.selected_envelope([100, 200, 400], val.mean(1), test.mean(1))
    assert p.tolist() == [100, 200, 400] and s[1] == pytest.approx(0.6333, abs=1e-4)  # the luck is read back
    p, s, _ = G.crossfit_envelope([100, 200, 400], val, test)
    # fold 0 picks on seeds 1, 2 (200 is no better than 100 there); folds 1, 2 read 200's ordinary seeds
    assert p.tolist() == [100, 200, 400] and s.tolist() == pytest.approx([0.5, 0.5, 0.8])
    with pytest.raises(ValueError, match="shape"):
        G.crossfit_envelope([100, 200], val, test)


def test_null_without_noise_is_exactly_one():
    curve = ([100.0, 10000.0], [_score(100), _score(10000)])
    bands = N.null_band([100, 200, 400, 800], [30, 70, 150, 300, 600, 1200, 2400], curve, [0.52, 0.55, 0.58],
                        noise=N.Noise(0.0, 0.0, 0.0, 0.0), seeds=3, draws=5)
    assert len(bands) == 4
    for b in bands:
        assert b["median"] == pytest.approx(1.0) and b["p95"] == pytest.approx(1.0) and b["defined"] == 1.0


def test_null_band_on_identical_curves_brackets_one():
    curve = ([100.0, 1600.0], [_score(100), _score(1600)])
    noise = N.Noise(0.01, 0.01, 0.7, 0.005)
    lora = [100, 200, 400, 800, 1600]
    few = N.null_band(lora, lora, curve, [0.56], noise=noise, seeds=4, draws=300, seed=1, r1=False)[0]
    many = N.null_band(lora, np.geomspace(60, 2000, 50), curve, [0.56], noise=noise, seeds=4, draws=300, seed=1,
                       r1=False)[0]
    for band in (few, many):
        assert 0.75 < band["median"] < 1.3 and band["p95"] > max(1.0, band["median"]) and band["defined"] > 0.9
    assert N.null_band(lora, lora, curve, [0.56], noise=noise, seeds=2, draws=20, seed=1) == \
        N.null_band(lora, lora, curve, [0.56], noise=noise, seeds=2, draws=20, seed=1)
    with pytest.raises(ValueError, match="draws"):
        N.null_band(lora, lora, curve, [0.56], noise=noise, seeds=2, draws=0)
    with pytest.raises(ValueError, match="seeds"):
        N.null_band(lora, lora, curve, [0.56], noise=noise, seeds=0)


def test_the_null_noise_leaves_out_what_pairing_cancels():
    rng = np.random.default_rng(8)
    own = rng.normal(0, 0.01, (8, 4))    # each run's own noise
    shared = rng.normal(0, 0.05, 4)      # a lucky seed lifts every point alike

    def recs(common):
        pts = [*LORA, ("f60", 60), ("f300", 300), ("f900", 900)]
        return [{"task": "t", "family": "lora" if name.startswith("lora") else "f", "point": name, "params": p,
                 "groups": None, "seed": s, "val": _score(p) + common * shared[s] + own[i, s],
                 "test": _score(p) + common * shared[s] + own[i, s]} for i, (name, p) in enumerate(pts)
                for s in range(4)]

    quiet = G.summarise_task(recs(0.0), L=1, resamples=0, null_draws=0)["noise"]
    loud = G.summarise_task(recs(1.0), L=1, resamples=0, null_draws=0)["noise"]
    assert loud == pytest.approx(quiet) and quiet["corr"] == pytest.approx(1.0) and quiet["item"] == 0.0
    assert 0.004 < quiet["run_test"] < 0.02  # one run's own noise: 0.01


def test_summarise_reports_the_null_band_beside_each_gain():
    rng = np.random.default_rng(4)
    recs = _noisy(rng, "lora", LORA) + _noisy(rng, "same", [(f"s{p}", p) for p in (60, 150, 300, 700, 1500)])
    sec = G.summarise_task(recs, L=1, resamples=50, null_draws=200)
    assert sec["noise"]["run_test"] > 0 and sec["noise"]["run_val"] > 0 and sec["noise"]["item"] > 0
    g = _gain(sec, "same", "50%")
    assert g["null"]["median"] < g["null"]["p95"] and 0.7 < g["null"]["median"] < 1.5
    assert g["beyond_null"] == (g["gain"] > g["null"]["p95"])


# ---------------------------------------------------------------------------------------------
# properties, determinism, errors
# ---------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(st.integers(2, 16), st.lists(st.integers(5, 2000), min_size=1, max_size=6, unique=True),
       st.sampled_from(["family", "lora"]))
def test_gain_scales_exactly_with_the_parameters(k, sizes, scaled_side):
    base = _exact("lora", LORA) + _exact("f", [(f"f{p}", p) for p in sizes])
    side = "lora" if scaled_side == "lora" else "f"
    scaled = [dict(r, params=r["params"] * k) if r["family"] == side else r for r in base]
    # the levels are scores: scaling parameters leaves them and every envelope's scores alone
    a = G.summarise_task(base, L=1, resamples=0, null_draws=0)
    b = G.summarise_task(scaled, L=1, resamples=0, null_draws=0)
    assert a["levels"] == b["levels"]
    expect = k if side == "lora" else 1 / k
    for ga, gb in zip(a["families"]["f"]["gains"], b["families"]["f"]["gains"], strict=True):
        assert (ga["gain"] is None) == (gb["gain"] is None) and ga["bounded"] == gb["bounded"]
        if ga["gain"] is not None:
            assert gb["gain"] == pytest.approx(ga["gain"] * expect, rel=1e-12)


def test_deterministic_for_its_seed():
    rng = np.random.default_rng(5)
    recs = _noisy(rng, "lora", LORA) + _noisy(rng, "f", [(f"f{p}", p) for p in (50, 150, 400)])
    a = G.summarise_task(recs, L=1, resamples=60, null_draws=30, seed=3)
    b = G.summarise_task(copy.deepcopy(recs), L=1, resamples=60, null_draws=30, seed=3)
    c = G.summarise_task(recs, L=1, resamples=60, null_draws=30, seed=4)
    assert a == b and a != c


def _one(**change):
    r = {"task": "t", "family": "lora", "point": "lora-r1", "params": 100, "groups": None, "seed": 0, "lr": 1e-3,
         "val": 0.5, "test": 0.5, "test_items": [0, 1], "fid": None}
    r.update(change)
    return r


@pytest.mark.parametrize(("records", "kwargs", "match"), [
    ([], {}, "non-empty"),
    ([{"task": "t"}], {}, "lacks"),
    ([_one(), _one(task="u", seed=1)], {}, "one task"),
    ([_one(), _one()], {}, "two runs of seed 0"),
    ([_one(params=-1)], {}, "params"),
    ([_one(params=True)], {}, "params"),
    ([_one(groups=0)], {}, "groups"),
    ([_one(seed=-2)], {}, "seed"),
    ([_one(val=float("nan"))], {}, "val"),
    ([_one(test=0.7)], {}, "mean\\(test_items\\)"),
    ([_one(test_items=[0, 2], test=1.0)], {}, "0/1"),
    ([_one(), _one(seed=1, test_items=[1, 0, 0], test=1 / 3)], {}, "test items"),
    ([_one(), _one(seed=1, test_items=None)], {}, "some records"),
    ([_one(), _one(seed=1, params=200)], {}, "differ"),
    ([_one(family="x")], {}, "no run of the LoRA family"),
    ([_one()], {"L": 0}, "L must"),
    ([_one()], {"resamples": -1}, "resamples"),
    ([_one()], {"union": {"lora": ["x"]}}, "also a family"),
    ([_one()], {"union": {"u": "lora"}}, "members"),
    ([_one()], {"fractions": (1.5,)}, "fractions"),
    ([_one()], {"confidence": 1.0}, "confidence"),
])
def test_input_errors_name_the_rule(records, kwargs, match):
    with pytest.raises(ValueError, match=match):
        G.summarise_task(records, **{"L": 1, **kwargs})


def test_a_point_missing_a_seed_is_averaged_over_the_seeds_it_has():
    rng = np.random.default_rng(7)
    recs = _noisy(rng, "lora", LORA, seeds=4) + _noisy(rng, "f", [(f"f{p}", p) for p in (50, 150, 400)], seeds=4)
    kept = [r for r in recs if not (r["point"] == "f150" and r["seed"] == 2)]
    sec = G.summarise_task(kept, L=1, resamples=80, null_draws=10)
    row = next(p for p in sec["points"] if p["point"] == "f150")
    runs = [r["test"] for r in kept if r["point"] == "f150"]
    assert row["seeds"] == 3 and row["test"] == pytest.approx(np.mean(runs)) and sec["seeds"] == [0, 1, 2, 3]
    assert all(math.isfinite(g["gain"]) for g in sec["families"]["f"]["gains"] if g["gain"] is not None)


def test_unions_take_every_member_point():
    recs = _exact("lora", LORA) + _exact("a", [("a1", 40)]) + _exact("b", [("b1", 400)])
    sec = G.summarise_task(recs, L=1, resamples=0, null_draws=0, union={"all": ["a", "b", "absent"],
                                                                       "none": ["absent"]})
    assert sec["families"]["all"]["kind"] == "union" and sec["families"]["all"]["members"] == ["a", "b"]
    assert sec["families"]["all"]["envelope"]["points"] == ["a1", "b1"] and "none" not in sec["families"]


# ---------------------------------------------------------------------------------------------
# the claims
# ---------------------------------------------------------------------------------------------
def _g(key="lora_r1", gain=3.5, low=3.1, high=4.0, bounded=False, cap=20.0, ceiling=4.9, p95=1.3):
    return {"key": key, "level": 0.9, "gain": gain, "lora_params": 768.0, "family_params": None if gain is None
            else 768 / gain, "bounded": bounded, "low": low, "high": high, "defined": 1.0, "bounded_share": 0.0,
            "cap": cap, "ceiling": ceiling, "null": {"median": 1.0, "p95": p95, "defined": 1.0},
            "beyond_null": None if gain is None else gain > p95}


def _section(reshape=None, union=None, order=None, contrasts=(), points=()):
    fams = {}
    if reshape is not None:
        fams["2d-reshape"] = {"kind": "family", "gains": [reshape]}
    if union is not None:
        fams["superlora-all"] = {"kind": "union", "gains": [union]}
    return {"families": fams, "group_order": {"2d-reshape": order} if order else {}, "contrasts": list(contrasts),
            "points": list(points)}


def _verdict(rows, claim_start, task="t"):
    return next(r for r in rows if r["claim"].startswith(claim_start) and r["task"] == task)["verdict"]


@pytest.mark.parametrize(("gain", "expected"), [
    (_g(), "holds"),
    (_g(gain=3.5, p95=3.8), "not testable"),                          # inside the bias band
    (_g(gain=2.0, low=1.5, high=2.5), "refuted"),
    (_g(gain=2.0, low=1.5, high=3.5), "not testable"),                # the interval reaches 3
    (_g(gain=2.0, low=2.0, high=2.0, bounded=True, cap=2.0), "not testable"),   # capped by the sweep
    (_g(gain=2.0, low=1.5, high=2.5, cap=2.6), "not testable"),       # cap below 3
    (_g(gain=2.0, low=1.5, high=2.5, ceiling=2.45), "not testable"),  # L = 6
    (_g(gain=None, low=None, high=None), "refuted"),                  # never reaches LoRA r = 1's score
])
def test_reshape_claim_verdicts(gain, expected):
    rows = study_claims.claims({"tasks": {"t": _section(reshape=gain)}})
    assert _verdict(rows, "grouped 2-D reshape") == expected
    assert all(r["verdict"] in study_claims.VERDICTS for r in rows)


def test_ten_fold_claim_verdicts():
    def ten(g):
        return _verdict(study_claims.claims({"tasks": {"t": _section(union=g)}}), "up to 10")

    assert ten(_g(gain=12.0, low=10.5, high=14.0, ceiling=None)) == "holds"
    assert ten(_g(gain=4.0, low=3.0, high=5.0, ceiling=None)) == "refuted"
    capped = study_claims.claims({"tasks": {"t": _section(union=_g(gain=5.0, low=4.0, high=6.0, cap=6.9,
                                                                    ceiling=None))}})
    row = next(r for r in capped if r["claim"].startswith("up to 10"))
    assert row["verdict"] == "not testable" and "caps the measurable gain at 6.90×" in row["why"]


def test_group_order_rho_and_lonkr_verdicts():
    def order(ratio, low, high, step=1.2):
        return [{"small": 1, "large": 4, "key": "lora_r1", "ratio": step, "low": None, "high": None, "defined": 1},
                {"small": 4, "large": 12, "key": "lora_r1", "ratio": ratio / step, "low": None, "high": None,
                 "defined": 1},
                {"small": 1, "large": 12, "key": "lora_r1", "ratio": ratio, "low": low, "high": high, "defined": 1}]

    def run(**kw):
        return study_claims.claims({"tasks": {"t": _section(**kw)}})

    assert _verdict(run(order=order(2.0, 1.4, 2.8)), "fewer groups") == "holds"
    assert _verdict(run(order=order(2.0, 1.4, 2.8, step=0.9)), "fewer groups") == "not testable"
    assert _verdict(run(order=order(0.5, 0.3, 0.8, step=0.7)), "fewer groups") == "refuted"
    assert _verdict(run(order=order(1.1, 0.8, 1.5)), "fewer groups") == "not testable"

    def rho(diff, low, high):
        return {"name": "rho:proj-2d", "a": "proj-2d-ff1", "b": "proj-2d-ff0.1", "diff": diff, "low": low,
                "high": high}

    assert _verdict(run(contrasts=[rho(0.002, -0.003, 0.007)]), "projection") == "holds"
    assert _verdict(run(contrasts=[rho(0.03, 0.02, 0.04)]), "projection") == "refuted"
    assert _verdict(run(contrasts=[rho(0.005, -0.01, 0.02)]), "projection") == "not testable"

    pts = [{"point": "lonkr-K4", "params": 160}, {"point": "lokr-r1", "params": 900}]

    def lonkr(diff, low, high, params=160):
        p = [dict(pts[0], params=params), pts[1]]
        return run(contrasts=[{"name": "lonkr-vs-lokr", "a": "lonkr-K4", "b": "lokr-r1", "diff": diff, "low": low,
                               "high": high}], points=p)

    assert _verdict(lonkr(0.02, 0.01, 0.03), "LoNKr") == "holds"
    assert _verdict(lonkr(-0.02, -0.03, -0.01), "LoNKr") == "refuted"
    assert _verdict(lonkr(0.0, -0.01, 0.01), "LoNKr") == "not testable"
    assert _verdict(lonkr(0.02, 0.01, 0.03, params=600), "LoNKr") == "not testable"


def test_claims_on_a_measured_section_and_the_markdown_table():
    rng = np.random.default_rng(6)
    recs = _noisy(rng, "lora", LORA)
    recs += _noisy(rng, "2d-reshape", [(f"g{g}-r{r}", int(100 * r / math.sqrt(24 / g)), g) for g in (1, 12)
                                        for r in (1, 4)], shift=3.0)
    recs += _noisy(rng, "proj-2d", [("proj-2d-ff1", 300), ("proj-2d-ff0.1", 300)])
    recs += _noisy(rng, "lonkr", [("lonkr-K4-f2", 150), ("lonkr-K2-f8", 600)])
    recs += _noisy(rng, "lokr", [("lokr-r1-f4", 400)])
    sec = G.summarise_task(recs, L=24, union={"superlora-all": ["2d-reshape", "lonkr", "proj-2d"]}, resamples=60,
                           null_draws=40)
    json.dumps(sec, allow_nan=False)  # JSON-ready, no NaN
    assert [c["name"] for c in sec["contrasts"]] == ["rho:proj-2d", "lonkr-vs-lokr"]
    assert sec["contrasts"][1]["a"] == "lonkr-K4-f2" and sec["contrasts"][1]["b"] == "lokr-r1-f4"
    rows = study_claims.claims({"tasks": {"digits": sec}})
    assert {r["claim"] for r in rows} == {study_claims._C_RESHAPE, study_claims._C_GROUPS, study_claims._C_RHO,
                                          study_claims._C_LONKR, study_claims._C_TEN}
    assert all(r["task"] == "digits" and r["verdict"] in study_claims.VERDICTS and r["why"] for r in rows)
    extra = {"claim": "a|b", "task": "t", "paper": "", "ours": "", "verdict": "holds", "why": "x"}
    md = study_claims.claims_markdown([*rows, extra])
    lines = md.splitlines()
    assert lines[0] == "| claim | task | paper | ours | verdict | why |" and len(lines) == len(rows) + 3
    assert "a\\|b" in lines[-1]
    missing = study_claims.claims({"tasks": {}})
    assert {r["verdict"] for r in missing} == {"not testable"} and len(missing) == 5
    with pytest.raises(ValueError, match="tasks"):
        study_claims.claims({})


def test_gain_text():
    assert G.gain_text(_g(gain=3.5, low=3.1, high=4.0, p95=1.3)) == "3.50× [3.10, 4.00], null p95 1.30×, ceiling 4.90×"
    bounded = dict(_g(gain=2.0, bounded=True, ceiling=None), null={"median": None, "p95": None, "defined": 0.0})
    assert G.gain_text(bounded) == "≥ 2.00× [3.10, 4.00], null p95 —"
    assert G.gain_text(_g(gain=None, low=None, high=None)) == "not reached"
    assert G.gain_text(dict(_g(gain=None), lora_params=None)) == "undefined"


def test_rho_is_read_from_settings_or_label():
    assert study_claims.rho_of({"point": "proj-dense-ff0.01"}) == 0.01
    assert study_claims.rho_of({"point": "proj-2d-shuffle"}) is None
    assert study_claims.rho_of({"point": "x", "settings": {"projection": "fastfood", "rho": 0.5}}) == 0.5
    assert study_claims.rho_of({"point": "x-ff1", "settings": {"projection": "shuffle", "rho": 1.0}}) is None


# ---------------------------------------------------------------------------------------------
# the curve functions kept public from the first study (envelope, params_at, gain_at, bootstrap_gain,
# levels_from): the known answers tests/test_study.py held before study v2
# ---------------------------------------------------------------------------------------------
def _loglinear(params, spread=0.0):
    """score = 0.5 + 0.2 log10(p / 100), three seeds ± spread."""
    return [(p, [0.5 + 0.2 * math.log10(p / 100) + d for d in (-spread, 0.0, spread)]) for p in params]


def test_gain_is_the_known_parameter_ratio():
    lora = _loglinear([100, 1000, 10000])
    family = [(p / 4, s) for p, s in lora]  # the same scores with 4x fewer parameters
    for level in (0.6, 0.75, 0.85):
        g = G.gain_at(lora, family, level)
        assert g.gain == pytest.approx(4.0) and not g.bounded
        assert g.lora_params == pytest.approx(100 * 10 ** ((level - 0.5) / 0.2))


def test_gain_interpolates_in_log_parameters_between_points():
    lora = [(100, [0.5]), (10000, [0.9])]
    family = [(10, [0.5]), (1000, [0.9])]
    g = G.gain_at(lora, family, 0.7)  # half-way: geometric means 1000 and 100
    assert g.lora_params == pytest.approx(1000) and g.family_params == pytest.approx(100)
    assert g.gain == pytest.approx(10.0)


def test_envelope_is_monotone_and_levels_outside_are_undefined_or_bounded():
    p, s = G.envelope([10, 20, 40, 20], [0.6, 0.5, 0.8, 0.55])
    assert list(p) == [10, 20, 40] and list(s) == [0.6, 0.6, 0.8]
    lora = [(100, [0.5]), (1000, [0.7])]
    assert G.gain_at(lora, [(10, [0.9])], 0.8).gain is None  # above LoRA's best
    assert G.gain_at(lora, [(10, [0.55])], 0.6).gain is None  # family never reaches it
    bounded = G.gain_at(lora, [(10, [0.65])], 0.6)  # reached at the family's smallest point
    assert bounded.bounded and bounded.gain == pytest.approx(math.sqrt(100 * 1000) / 10)
    with pytest.raises(ValueError):
        G.envelope([0, 1], [0.1, 0.2])


def test_bootstrap_interval_contains_the_truth_and_is_deterministic():
    lora = _loglinear([100, 1000, 10000], spread=0.01)
    family = [(p / 3, s) for p, s in _loglinear([100, 1000, 10000], spread=0.01)]
    a = G.bootstrap_gain(lora, family, 0.7, resamples=300, seed=5)
    b = G.bootstrap_gain(lora, family, 0.7, resamples=300, seed=5)
    assert a == b and a.gain == pytest.approx(3.0)
    assert a.low < 3.0 < a.high and a.defined_fraction == 1.0
    exact = G.bootstrap_gain(_loglinear([100, 1000]), [(p / 2, s) for p, s in _loglinear([100, 1000])],
                                      0.6, resamples=50)
    assert exact.low == pytest.approx(2.0) and exact.high == pytest.approx(2.0)  # no spread: no uncertainty


def test_levels_from_the_lora_range():
    assert G.levels_from([(1, [0.8, 0.8]), (2, [0.9]), (4, [1.0])]) == [0.85, 0.9, 0.95]
