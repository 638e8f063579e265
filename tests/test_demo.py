"""``tensoradapt.demo``: the digits transfer study (its modules, a short run, the docs, and --quick)."""

from __future__ import annotations

import ast
import json
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
