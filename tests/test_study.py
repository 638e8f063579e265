"""``tensoradapt study``: the gain estimator on curves with a known answer, resumability,
determinism, argument errors, and (slow) ``--quick`` end to end."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from tensoradapt.demo import study
from tensoradapt.demo.study import gain as study_gain
from tensoradapt.demo.study.points import FAMILIES, LR_REPRESENTATIVE, points


# ---------------------------------------------------------------------------------------------
# the gain estimator
# ---------------------------------------------------------------------------------------------
def _loglinear(params, spread=0.0):
    """score = 0.5 + 0.2 log10(p / 100), three seeds ± spread."""
    return [(p, [0.5 + 0.2 * math.log10(p / 100) + d for d in (-spread, 0.0, spread)]) for p in params]


def test_gain_is_the_known_parameter_ratio():
    lora = _loglinear([100, 1000, 10000])
    family = [(p / 4, s) for p, s in lora]  # the same scores with 4x fewer parameters
    for level in (0.6, 0.75, 0.85):
        g = study_gain.gain_at(lora, family, level)
        assert g.gain == pytest.approx(4.0) and not g.bounded
        assert g.lora_params == pytest.approx(100 * 10 ** ((level - 0.5) / 0.2))


def test_gain_interpolates_in_log_parameters_between_points():
    lora = [(100, [0.5]), (10000, [0.9])]
    family = [(10, [0.5]), (1000, [0.9])]
    g = study_gain.gain_at(lora, family, 0.7)  # half-way: geometric means 1000 and 100
    assert g.lora_params == pytest.approx(1000) and g.family_params == pytest.approx(100)
    assert g.gain == pytest.approx(10.0)


def test_envelope_is_monotone_and_levels_outside_are_undefined_or_bounded():
    p, s = study_gain.envelope([10, 20, 40, 20], [0.6, 0.5, 0.8, 0.55])
    assert list(p) == [10, 20, 40] and list(s) == [0.6, 0.6, 0.8]
    lora = [(100, [0.5]), (1000, [0.7])]
    assert study_gain.gain_at(lora, [(10, [0.9])], 0.8).gain is None  # above LoRA's best
    assert study_gain.gain_at(lora, [(10, [0.55])], 0.6).gain is None  # family never reaches it
    bounded = study_gain.gain_at(lora, [(10, [0.65])], 0.6)  # reached at the family's smallest point
    assert bounded.bounded and bounded.gain == pytest.approx(math.sqrt(100 * 1000) / 10)
    with pytest.raises(ValueError):
        study_gain.envelope([0, 1], [0.1, 0.2])


def test_bootstrap_interval_contains_the_truth_and_is_deterministic():
    lora = _loglinear([100, 1000, 10000], spread=0.01)
    family = [(p / 3, s) for p, s in _loglinear([100, 1000, 10000], spread=0.01)]
    a = study_gain.bootstrap_gain(lora, family, 0.7, resamples=300, seed=5)
    b = study_gain.bootstrap_gain(lora, family, 0.7, resamples=300, seed=5)
    assert a == b and a.gain == pytest.approx(3.0)
    assert a.low < 3.0 < a.high and a.defined_fraction == 1.0
    exact = study_gain.bootstrap_gain(_loglinear([100, 1000]), [(p / 2, s) for p, s in _loglinear([100, 1000])],
                                      0.6, resamples=50)
    assert exact.low == pytest.approx(2.0) and exact.high == pytest.approx(2.0)  # no spread: no uncertainty


def test_levels_from_the_lora_range():
    assert study_gain.levels_from([(1, [0.8, 0.8]), (2, [0.9]), (4, [1.0])]) == [0.85, 0.9, 0.95]


def test_every_family_has_points_and_a_learning_rate_representative():
    for task in ("digits", "flow"):
        names = {p.name for p in points(task)}
        assert len(names) == len(points(task))
        assert {p.family for p in points(task)} <= set(FAMILIES)
        groups = {p.lr_group for p in points(task) if p.config is not None}
        assert groups <= set(LR_REPRESENTATIVE)
        for group in groups:  # the representative, or the group's first point where the task lacks it
            rep = study._representative({p.name: p for p in points(task)}, group)
            assert rep.lr_group == group and (rep.name == LR_REPRESENTATIVE[group] or task == "flow")
    full = points("digits")
    assert {p.settings["G"] for p in full if p.family == "2d-reshape"} == {1, 2, 3}
    assert {p.settings["M"] for p in full if p.family.startswith("lorta")} == {3, 4, 5}
    assert {(p.settings["K"], p.settings["f"]) for p in full if p.family == "lonkr"} == {
        (k, f) for k in (2, 3, 4) for f in (2, 4, 8)}
    assert {p.settings["rho"] for p in full if p.family == "proj-2d"} == {1.0, 0.5, 0.25, 0.1, 0.01}


# ---------------------------------------------------------------------------------------------
# running: resumable, deterministic
# ---------------------------------------------------------------------------------------------
def _tiny() -> study.StudySettings:
    return study.StudySettings(
        repeats=2, lr_grid=(1e-2, 3e-2), bootstrap=20, quick=True,
        digits={"width": 16, "depth": 1, "heads": 2, "pretrain_steps": 10, "transfer_steps": 4},
        flow={"channels": 8, "pretrain_steps": 5, "transfer_steps": 3, "classifier_steps": 5,
              "samples_per_class": 2, "euler_steps": 2})


def _scores(result):
    return {t: [(p["name"], p["adapter_params"], p["scores"], p["lr"]) for p in s["points"]]
            for t, s in result["tasks"].items()}


def test_resumable_finished_runs_are_not_rerun(tmp_path, monkeypatch):
    first = study.run_study(tmp_path, tasks=("digits",), families=["lokr"], settings=_tiny(), progress=False,
                            log=None)
    assert [p["name"] for p in first["tasks"]["digits"]["points"]] == [
        "head-only", "dense", "lora-r1", "lora-r2", "lora-r4", "lokr-r4"]
    stored = sorted((tmp_path / "runs" / "digits").glob("*.json"))
    assert len(stored) == 6 * 2 + 3 * 2  # runs, and the learning-rate trials of dense, lora, lokr

    def refuse(*_args, **_kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(study._Digits, "run", refuse)
    monkeypatch.setattr("tensoradapt.demo.train.pretrain", refuse)
    again = study.run_study(tmp_path, tasks=("digits",), families=["lokr"], settings=_tiny(), progress=False,
                            log=None)
    assert _scores(again) == _scores(first)
    files = study.write_report(again, tmp_path, plot=False)
    data = json.loads(files[0].read_text())
    assert data["versions"]["torch"] and data["tasks"]["digits"]["gains"]["levels"]
    assert "lokr" in files[1].read_text()


def test_deterministic_for_a_seed(tmp_path):
    runs = [study.run_study(tmp_path / name, tasks=("digits", "flow"), families=["lonkr"], settings=_tiny(),
                            progress=False, log=None) for name in ("a", "b")]
    assert _scores(runs[0]) == _scores(runs[1])
    assert runs[0]["tasks"]["flow"]["gains"] == runs[1]["tasks"]["flow"]["gains"]


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--families", "nope"], "unknown family(s) nope"),
    (["--tasks", "mnist"], "unknown task(s) mnist"),
    (["--repeats", "0"], "--repeats"),
    (["--seed", "-1"], "--seed"),
    (["--bogus"], "unrecognized arguments"),
])
def test_argument_errors_exit_2_with_one_line(argv, message, capsys):
    assert study.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("tensoradapt study: error:")


def test_unusable_out_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert study.main(["--out", str(blocker / "sub"), "--quick"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_help_lists_families(capsys):
    assert study.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f in out for f in FAMILIES)


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path):
    from tensoradapt import cli

    out = tmp_path / "quick"
    assert cli.main(["study", "--quick", "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["quick"] and set(data["tasks"]) == {"digits", "flow"}
    for section in data["tasks"].values():
        assert all(len(p["scores"]) == 2 for p in section["points"])
        assert "superlora-all" in section["gains"]["families"]
    assert (out / "results.md").is_file() and (out / "pareto-digits-2d-reshape.png").is_file()
