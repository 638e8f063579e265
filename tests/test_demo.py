"""``tensoradapt.demo``: the digits transfer study (its modules, a short run, the docs, and --quick)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from tensoradapt import demo  # noqa: E402
from tensoradapt.demo import catalog, cli, data, model, plot, report, runner, train  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def _rows(markdown: str) -> dict[str, list[str]]:
    """Method name → cells of the Markdown table rows (header and rule excluded)."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith(("| method", "|---")):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_tiny_vit_shapes_and_targets():
    torch.manual_seed(0)
    vit = demo.TinyViT(num_classes=5, width=32, depth=2, heads=4, patch=4)
    images = torch.randn(7, 8, 8)
    assert vit.patches(images).shape == (7, 4, 16)
    assert vit.features(images).shape == (7, 32)
    assert vit(images).shape == (7, 5)
    names = demo.target_names(vit)
    assert names == ["blocks.0.attn.query", "blocks.0.attn.value", "blocks.1.attn.query", "blocks.1.attn.value"]
    assert demo.target_names(vit, ("key", "out")) == [
        "blocks.0.attn.key", "blocks.0.attn.out", "blocks.1.attn.key", "blocks.1.attn.out"]
    # the patch order is row-major: patch 1 is the top-right 4x4 block
    image = torch.arange(64.0).reshape(1, 8, 8)
    assert vit.patches(image)[0, 1].tolist() == image[0, :4, 4:].reshape(-1).tolist()
    with pytest.raises(ValueError, match="divisible"):
        demo.TinyViT(width=30, heads=4)
    with pytest.raises(ValueError, match="multiple of patch"):
        demo.TinyViT(patch=3)


def test_tasks_are_disjoint_and_deterministic():
    source, target = demo.load_tasks(seed=0)
    again, _ = demo.load_tasks(seed=0)
    assert torch.equal(source.x_train, again.x_train) and torch.equal(source.y_test, again.y_test)
    for task in (source, target):
        assert set(task.y_train.tolist()) == set(range(5)) == set(task.y_test.tolist())
        assert task.x_train.shape[1:] == (8, 8)
        assert float(task.x_train.min()) >= -1 and float(task.x_train.max()) <= 1
    other, _ = demo.load_tasks(seed=1)
    assert not torch.equal(source.x_train, other.x_train)
    # any consecutive classes make a task, relabelled from 0
    images, labels = data.digits()
    middle = data.task(images, labels, [3, 4, 5], seed=0)
    assert set(middle.y_train.tolist()) == {0, 1, 2}
    assert middle.x_train.shape[0] + middle.x_test.shape[0] == int(((labels >= 3) & (labels <= 5)).sum())


def test_shift_moves_by_at_most_one_pixel():
    image = torch.full((1, 8, 8), -1.0)
    image[0, 3, 4] = 1.0
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        moved = data.shift(image, generator)
        row, col = (int(i) for i in (moved[0] == 1.0).nonzero()[0])
        assert abs(row - 3) <= 1 and abs(col - 4) <= 1 and int((moved == 1.0).sum()) == 1


def test_schedule_warms_up_then_decays_to_zero():
    factor = train.schedule_factor(100)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    values = [factor(s) for s in range(10, 100)]
    assert values == sorted(values, reverse=True) and values[-1] == pytest.approx(0.0, abs=1e-3)


def test_method_configs_count_like_the_adapter():
    import tensoradapt as ta

    shapes = [(64, 64)] * 6
    table = demo.methods()
    assert tuple(table) == demo.DEFAULT_METHODS
    assert set(demo.QUICK_METHODS) <= set(demo.DEFAULT_METHODS)
    counts = {name: ta.count_params(m.config, shapes) for name, m in table.items() if m.config is not None}
    assert counts["dense"] == 6 * 64 * 64
    assert counts["lora-r1"] == 6 * 128 and counts["lora-r8"] == 8 * counts["lora-r1"]
    for name in ("superlora-2d", "lorta-m3", "lorta-m4", "lonkr", "fastfood-0.1", "fastfood-0.01"):
        assert counts[name] < counts["lora-r4"], name
    assert counts["fastfood-0.01"] < counts["fastfood-0.1"]


def test_modules_and_reexports():
    """One responsibility per module; ``tensoradapt.demo`` re-exports what the docs and tests use."""
    assert demo.TinyViT is model.TinyViT and demo.load_tasks is data.load_tasks
    assert demo.methods is catalog.methods and demo.Method is catalog.Method
    assert demo.DemoSettings is train.DemoSettings and demo.transfer is train.transfer
    assert demo.MethodResult is report.MethodResult and demo.plot_pareto is plot.plot_pareto
    assert demo.run is runner.run and demo.main is cli.main
    assert all(hasattr(demo, name) for name in demo.__all__)


@pytest.mark.parametrize("name", ["model", "data", "train"])
def test_shared_modules_do_not_need_the_method_list(name):
    """model, data and train (shared with ``tensoradapt study``) import no demo module but these
    three at run time (``catalog`` only for type annotations)."""
    tree = ast.parse((ROOT / "demo" / f"{name}.py").read_text(encoding="utf-8"))
    imported = [node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.level == 1]
    assert set(imported) <= {"model", "data"}, imported


def test_transfer_with_any_method_and_targets():
    """train.transfer with a method that is not in the table, on other target modules."""
    import tensoradapt as ta

    source, target = demo.load_tasks(seed=0)
    settings = demo.DemoSettings(width=32, depth=2, pretrain_steps=2, transfer_steps=2)
    backbone, _ = demo.pretrain(source, settings, seed=0)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    method = demo.Method("lokr-out", "LoKr", "LoKr on out", ta.presets.lokr(2, 2), 1e-2)
    result = demo.transfer(backbone, method, target, settings, seed=0, targets=("out",))
    assert list(result.deltas) == ["blocks.0.attn.out", "blocks.1.attn.out"]
    assert result.adapter_params == ta.count_params(method.config, [(32, 32)] * 2)
    assert result.head_params == 32 * 5 + 5 and 0.0 <= result.accuracy <= 1.0
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in before.items())  # the backbone is untouched


def test_pareto_front():
    def point(name, params, acc):
        return demo.MethodResult(name, "f", "", None, 0.0, 1, params, 5, [acc], [0.0])

    points = [point("a", 100, 0.8), point("b", 50, 0.85), point("c", 200, 0.84), point("d", 400, 0.9),
              point("e", 50, 0.7)]
    assert [r.name for r in demo.pareto_front(points)] == ["b", "d"]
    assert demo.pareto_front([]) == []


def test_short_run_subset(tmp_path, capsys):
    """A few steps of a subset: the whole pipeline (files, table, geometry) in seconds."""
    out = tmp_path / "run"
    code = demo.main(["--methods", "lora-r2,dense,head-only", "--steps", "3", "--pretrain-steps", "3",
                      "--repeats", "2", "--out", str(out), "--no-plot", "--no-progress", "--threads", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert str(out.resolve()) in printed and "| lora-r2 |" in printed
    assert not (out / "pareto.png").exists()
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    by_name = {m["name"]: m for m in data["methods"]}
    assert list(by_name) == ["lora-r2", "dense", "head-only"]  # the order asked for
    assert by_name["lora-r2"]["adapter_params"] == 2 * 6 * 128
    assert by_name["head-only"]["adapter_params"] == 0
    assert all(m["head_params"] == 64 * 5 + 5 for m in data["methods"])
    dense = by_name["dense"]["geometry"]
    assert dense["mean"]["dE"] == 0.0 and dense["mean"]["dL"] == pytest.approx(1.0)
    assert set(by_name["lora-r2"]["geometry"]["by_kind"]) == {"query", "value"}
    assert by_name["head-only"]["geometry"]["mean"]["dE"] == pytest.approx(1.0)
    assert by_name["head-only"]["geometry"]["mean"]["dL"] is None
    assert data["settings"]["transfer_steps"] == 3 and data["seed"] == 0
    assert len(by_name["dense"]["accuracies"]) == 2 == len(data["seeds"]["transfer_repeats"])
    assert len(by_name["lora-r2"]["geometry"]["per_weight"]) == 2 * 6  # 2 repeats x 6 weights
    assert set(_rows((out / "results.md").read_text(encoding="utf-8"))) == {"lora-r2", "dense", "head-only"}


def test_same_seed_same_accuracy():
    settings = demo.DemoSettings(pretrain_steps=4, transfer_steps=4, width=32, depth=1, repeats=1)
    runs = [demo.run(["lonkr", "dense"], seed=3, settings=settings, progress=False, log=None, threads=1)
            for _ in range(2)]
    for a, b in zip(runs[0].results, runs[1].results, strict=True):
        assert a.accuracies == b.accuracies
        for name, delta in a.runs[0].deltas.items():
            assert torch.equal(delta, b.runs[0].deltas[name])
    lonkr = runs[0].results[0]
    assert lonkr.geometry is not None and len(lonkr.geometry["per_weight"]) == 2  # query and value of 1 block


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert demo.main(["--methods", "lora-r3"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert demo.main(["--steps", "0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1  # one line, not the usage block
    assert demo.main(["--seed", "-1"]) == 2
    assert demo.main(["--frobnicate"]) == 2
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert demo.main(["--out", str(blocker), "--steps", "1"]) == 2
    assert "cannot be used as the results folder" in capsys.readouterr().err
    assert demo.main(["--out", str(blocker / "sub"), "--steps", "1"]) == 2  # checked before any training
    assert demo.main(["--help"]) == 0
    assert "fastfood-0.01" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown methods"):
        demo.run(["nope"], log=None)


def test_python_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "tensoradapt.demo", "--help"], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0 and "fastfood-0.01" in done.stdout


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.S | re.M)


@pytest.mark.parametrize("index", range(len(_python_blocks(ROOT / "docs" / "demo.md"))))
def test_docs_python_blocks_run(index):
    """Every ```python block of docs/demo.md runs as written (each on its own)."""
    code = _python_blocks(ROOT / "docs" / "demo.md")[index]
    exec(compile(code, f"docs/demo.md block {index}", "exec"), {"__name__": "__docs__"})


def test_docs_have_python_blocks():
    assert len(_python_blocks(ROOT / "docs" / "demo.md")) >= 2


def test_missing_optional_package_exits_2(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert demo.main(["--steps", "1"]) == 2
    assert "needs matplotlib" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_demo(tmp_path):
    out = tmp_path / "quick"
    assert demo.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    rows = _rows((out / "results.md").read_text(encoding="utf-8"))
    assert set(rows) == set(demo.QUICK_METHODS)
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [m["name"] for m in data["methods"]] == list(demo.QUICK_METHODS)
    assert data["quick"] is True and data["machine"]["cpu_count"] >= 1
    for m in data["methods"]:
        assert 0.0 <= m["accuracy"] <= 1.0 and m["train_time_s"] >= 0.0
        assert set(m["geometry"]["mean"]) == {"dE", "dL", "dR"}
    assert data["pretrain"]["test_accuracy"] > 0.9
    png = (out / "pareto.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000


# ---------------------------------------------------------------------------------------------
# results written as each method finishes; a stopped run resumes; torch threads
# ---------------------------------------------------------------------------------------------
_SHORT = ["--methods", "lora-r2,dense,head-only", "--steps", "3", "--pretrain-steps", "3", "--repeats", "2",
          "--no-plot", "--no-progress", "--threads", "1"]


def _watch(monkeypatch, *, stop_after: int | None = None, error: type[BaseException] = KeyboardInterrupt,
           on_method=None) -> tuple[list[str], list[int]]:
    """Count the transfers (by method name) and pretrainings of the runs that follow; with
    ``stop_after=k``, raise ``error`` when the (k+1)-th method starts; ``on_method(name)`` is
    called as each method starts."""
    transfers: list[str] = []
    pretrainings: list[int] = []
    real_transfer, real_pretrain = runner.transfer, runner.pretrain

    def transfer(backbone, method, *args, **kwargs):
        if method.name not in transfers:
            if stop_after is not None and len(set(transfers)) == stop_after:
                raise error("stopped by the test")
            if on_method is not None:
                on_method(method.name)
        transfers.append(method.name)
        return real_transfer(backbone, method, *args, **kwargs)

    def pretrain(*args, **kwargs):
        pretrainings.append(1)
        return real_pretrain(*args, **kwargs)

    monkeypatch.setattr(runner, "transfer", transfer)
    monkeypatch.setattr(runner, "pretrain", pretrain)
    return transfers, pretrainings


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def _without_time(rows: dict[str, list[str]]) -> dict[str, list[str]]:
    """The table rows without the time column (the only one that differs between equal runs)."""
    return {name: cells[:4] + cells[5:] for name, cells in rows.items()}


def test_a_stopped_run_resumes_without_retraining_and_matches_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert demo.main([*_SHORT, "--out", str(whole)]) == 0
    capsys.readouterr()
    # stopped (Ctrl-C) when the second method starts: exit 130, the first method's results on disk
    transfers, _ = _watch(monkeypatch, stop_after=1)
    assert demo.main([*_SHORT, "--out", str(stopped)]) == 130
    printed = capsys.readouterr().out
    assert "stopped: 1 of 3 methods finished" in printed and f"--out {stopped}" in printed
    assert transfers == ["lora-r2", "lora-r2"]
    partial = _results(stopped)
    assert partial["complete"] is False and partial["pending_methods"] == ["dense", "head-only"]
    assert [m["name"] for m in partial["methods"]] == ["lora-r2"]
    markdown = (stopped / "results.md").read_text(encoding="utf-8")
    assert set(_rows(markdown)) == {"lora-r2"} and "**incomplete**: 1 of 3 methods finished" in markdown
    # rerun: only the rest is trained, the pretrained backbone is loaded, and it says so
    monkeypatch.undo()
    transfers, pretrainings = _watch(monkeypatch)
    assert demo.main([*_SHORT, "--out", str(stopped)]) == 0
    printed = capsys.readouterr().out
    assert transfers == ["dense", "dense", "head-only", "head-only"] and pretrainings == []
    assert "1 of 3 methods finished earlier (lora-r2) and are not trained again" in printed
    assert re.search(r"\[ 1/3\] lora-r2 .*\(finished earlier\)", printed), printed
    assert "pretrained TinyViT loaded from" in printed
    # the same results as the uninterrupted run
    resumed, reference = _results(stopped), _results(whole)
    assert resumed["complete"] is True and resumed["pending_methods"] == []
    assert resumed["resumed_methods"] == ["lora-r2"] and reference["resumed_methods"] == []
    for a, b in zip(resumed["methods"], reference["methods"], strict=True):
        assert (a["name"], a["accuracies"], a["adapter_params"], a["geometry"]) == (
            b["name"], b["accuracies"], b["adapter_params"], b["geometry"])
    assert resumed["pretrain"]["test_accuracy"] == reference["pretrain"]["test_accuracy"]
    tables = [_without_time(_rows((out / "results.md").read_text(encoding="utf-8"))) for out in (stopped, whole)]
    assert tables[0] == tables[1] and len(tables[0]) == 3
    # a third run has nothing left to train
    monkeypatch.undo()
    transfers, pretrainings = _watch(monkeypatch)
    assert demo.main([*_SHORT, "--out", str(stopped)]) == 0
    assert transfers == [] and pretrainings == []
    assert "3 of 3 methods finished earlier" in capsys.readouterr().out


def test_results_are_written_atomically_as_each_method_finishes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    seen: dict[str, list[str] | None] = {}

    def look(name: str) -> None:  # what results.json holds when each method starts
        path = out / "results.json"
        seen[name] = [m["name"] for m in _results(out)["methods"]] if path.exists() else None

    settings = demo.DemoSettings(width=32, depth=1, pretrain_steps=3, transfer_steps=3, repeats=1)
    _watch(monkeypatch, stop_after=2, error=RuntimeError, on_method=look)
    with pytest.raises(RuntimeError, match="stopped by the test"):  # a crash, not Ctrl-C: no handler runs
        demo.run(["dense", "lora-r2", "head-only"], settings=settings, progress=False, log=None, threads=1,
                 out=out, plot=False)
    assert seen == {"dense": None, "lora-r2": ["dense"]}
    partial = _results(out)
    assert [m["name"] for m in partial["methods"]] == ["dense", "lora-r2"] and partial["complete"] is False
    # both finished methods have their geometry (dense finished first) as soon as they are written
    assert all(m["geometry"] is not None for m in partial["methods"])
    progress = out / "demo-progress"
    assert sorted(p.name for p in progress.iterdir()) == [
        "backbone.safetensors", "method-dense.json", "method-dense.safetensors", "method-lora-r2.json",
        "method-lora-r2.safetensors", "run.json"]
    monkeypatch.undo()
    transfers, _ = _watch(monkeypatch, on_method=look)
    result = demo.run(["dense", "lora-r2", "head-only"], settings=settings, progress=False, log=None, threads=1,
                      out=out, plot=True)
    assert transfers == ["head-only"] and seen["head-only"] == ["dense", "lora-r2"]
    assert result.complete and result.resumed == ["dense", "lora-r2"] and _results(out)["complete"] is True
    assert (out / "pareto.png").read_bytes().startswith(PNG_SIGNATURE)
    leftovers = [p.name for p in (*out.iterdir(), *progress.iterdir()) if p.name.endswith(".tmp")]
    assert leftovers == []  # every file was written through a temporary file and os.replace


def test_other_settings_are_refused_until_fresh(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert demo.main([*_SHORT, "--out", str(out)]) == 0
    capsys.readouterr()
    transfers, pretrainings = _watch(monkeypatch)
    other = [*_SHORT, "--out", str(out)]
    other[other.index("--steps") + 1] = "4"
    assert demo.main(other) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a demo run with other settings" in err
    assert "settings.transfer_steps: 3 in the folder, 4 now" in err and "--fresh" in err
    assert transfers == [] and pretrainings == []  # refused before any training
    (out / "pareto.png").write_bytes(b"the discarded run's plot")
    assert demo.main([*other, "--fresh"]) == 0
    assert not (out / "pareto.png").exists()  # --fresh removed the old run's files (--no-plot draws none)
    assert sorted(set(transfers)) == ["dense", "head-only", "lora-r2"] and pretrainings == [1]
    assert _results(out)["settings"]["transfer_steps"] == 4 and _results(out)["resumed_methods"] == []
    # a method whose learning rate changed since is trained again; the others are loaded
    table = demo.methods()
    table["lora-r2"] = catalog.Method("lora-r2", "LoRA", "LoRA r=2", table["lora-r2"].config, 2e-2)
    monkeypatch.setattr(runner, "methods", lambda: table)
    transfers.clear()
    assert demo.main(other) == 0
    assert transfers == ["lora-r2", "lora-r2"]
    assert _results(out)["resumed_methods"] == ["dense", "head-only"]


def test_progress_folder_that_is_not_ours_is_left_alone(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "demo-progress").mkdir(parents=True)
    (out / "demo-progress" / "notes.txt").write_text("mine")
    assert demo.main([*_SHORT, "--out", str(out), "--fresh"]) == 2
    assert "not a demo progress folder" in capsys.readouterr().err
    assert (out / "demo-progress" / "notes.txt").read_text() == "mine"
    (out / "demo-progress" / "run.json").write_text("{broken")
    assert demo.main([*_SHORT, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "run.json' cannot be read" in err and "pass --fresh to start over" in err


def test_torch_threads_default_to_one_unless_omp_num_threads_is_set(monkeypatch):
    seen: list[int] = []
    real = runner.transfer

    def transfer(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "transfer", transfer)
    settings = demo.DemoSettings(width=32, depth=1, pretrain_steps=2, transfer_steps=2, repeats=1)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        result = demo.run(["head-only"], settings=settings, progress=False, log=None)
        assert seen == [1] and result.machine["torch_threads"] == 1 and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's setting (torch read it at start-up): kept
        assert runner.default_threads() == 2
        demo.run(["head-only"], settings=settings, progress=False, log=None)
        demo.run(["head-only"], settings=settings, progress=False, log=None, threads=3)
        assert seen == [1, 2, 3] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    assert 1 <= runner.available_cpus() <= (os.cpu_count() or 1)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads must be a positive integer"):
            demo.run(["head-only"], settings=settings, progress=False, log=None, threads=bad)
