"""``tensoradapt.torch.demo``: the digits transfer study (the tiny ViT, a short run, and --quick)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from tensoradapt import demo  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
    model = demo.TinyViT(num_classes=5, width=32, depth=2, heads=4, patch=4)
    images = torch.randn(7, 8, 8)
    assert model.patches(images).shape == (7, 4, 16)
    assert model.features(images).shape == (7, 32)
    assert model(images).shape == (7, 5)
    names = demo._target_names(model)
    assert names == ["blocks.0.attn.query", "blocks.0.attn.value", "blocks.1.attn.query", "blocks.1.attn.value"]
    # the patch order is row-major: patch 1 is the top-right 4x4 block
    image = torch.arange(64.0).reshape(1, 8, 8)
    assert model.patches(image)[0, 1].tolist() == image[0, :4, 4:].reshape(-1).tolist()
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
