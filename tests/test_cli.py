"""The ``tensoradapt`` command line.

Every case calls :func:`tensoradapt.cli.main` in-process (``main(argv) -> int``, output captured with
``capfd``); two smoke tests start real processes: ``python -m tensoradapt`` and the installed
``tensoradapt`` console script.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import struct
import subprocess
import sys
import sysconfig
import types
from dataclasses import dataclass

import numpy as np
import pytest

from tensoradapt import cli


@dataclass(frozen=True)
class Result:
    """What a process would report: the exit status and the text written to stdout and stderr."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run(capfd, monkeypatch):
    """``run(*args, cwd=None)``: ``cli.main(args)`` in-process, with its stdout/stderr captured."""

    def call(*args, cwd=None) -> Result:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capfd.readouterr()  # drop anything printed before the call
        code = cli.main([str(a) for a in args])
        out, err = capfd.readouterr()
        assert isinstance(code, int), f"main() returned {code!r}, not an exit status"
        return Result(code, out, err)

    return call


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two small 'ΔW' files with query/value weights of 3 layers, plus mismatching files."""
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    dense, adapter = {}, {}
    for layer in range(3):
        for kind in ("query", "value"):
            key = f"encoder.layer.{layer}.attention.self.{kind}.weight"
            dense[key] = rng.standard_normal((12, 10)).astype(np.float32)
            adapter[key] = (dense[key] + 0.2 * rng.standard_normal((12, 10))).astype(np.float32)
        dense[f"encoder.layer.{layer}.bias"] = adapter[f"encoder.layer.{layer}.bias"] = np.zeros(4, np.float32)
    paths = {name: folder / f"{name}.safetensors" for name in ("adapter", "dense", "other", "reshaped")}
    save_file(adapter, str(paths["adapter"]))
    save_file(dense, str(paths["dense"]))
    save_file({"unrelated.weight": np.ones((2, 2), np.float32)}, str(paths["other"]))
    save_file({"encoder.layer.0.attention.self.query.weight": np.ones((10, 12), np.float32)}, str(paths["reshaped"]))
    # a BF16 copy of the dense file, written by hand (NumPy has no bfloat16): the top 16 bits of float32
    header, blobs, offset = {}, [], 0
    for key, value in dense.items():
        raw = (value.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[key] = {"dtype": "BF16", "shape": list(value.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    paths["bf16"] = folder / "bf16.safetensors"
    paths["bf16"].write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    paths["garbage"] = folder / "garbage.safetensors"
    paths["garbage"].write_bytes(b"definitely not a safetensors file")
    paths["shapes"] = folder / "shapes.json"
    paths["shapes"].write_text(json.dumps([{"name": "q", "shape": [768, 768], "count": 12},
                                           {"name": "v", "shape": [768, 768], "count": 12}]))
    nan = {k: v.copy() for k, v in adapter.items()}
    nan["encoder.layer.1.attention.self.value.weight"][0, 0] = np.nan
    paths["nan"] = folder / "nan.safetensors"
    save_file(nan, str(paths["nan"]))
    # two tensors whose data_offsets overlap (the header check must refuse what safetensors would)
    header = {"a.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
              "b.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}
    text = json.dumps(header).encode()
    paths["overlap"] = folder / "overlap.safetensors"
    paths["overlap"].write_bytes(struct.pack("<Q", len(text)) + text + bytes(24))
    paths["deep"] = folder / "deep.json"
    paths["deep"].write_text("[" * 100_000)
    paths["folder"] = folder
    return paths


# ------------------------------------------------------------------------------ count
def test_count_presets(run):
    out = run("count", "24x768x768", "--preset", "lora", "--preset", "lotr:rank=2", "--rank", "1,8")
    assert out.returncode == 0, out.stderr
    assert "N = 14,155,776" in out.stdout
    assert "36,864" in out.stdout and "294,912" in out.stdout and "3,168" in out.stdout


def test_count_default_table_from_json(files, run):
    out = run("count", files["shapes"])
    assert out.returncode == 0, out.stderr
    for family in ("dense", "lora", "lokr", "loha", "lotr", "lonkr", "lorta"):
        assert family in out.stdout
    assert "24 targets" in out.stdout


def test_count_budget_sweep_json(run):
    out = run("count", "768x768,768x768", "--budget", "10k", "--family", "lora", "--family", "lorta", "--json")
    assert out.returncode == 0, out.stderr
    entries = json.loads(out.stdout)
    assert entries and all(e["params"] <= 10_000 for e in entries)
    assert {e["family"] for e in entries} <= {"lora", "lorta"}
    assert 3_072 in [e["params"] for e in entries if e["family"] == "lora"]  # LoRA r=1 on two 768x768


def test_count_safetensors_header(files, run):
    out = run("count", files["dense"], "--preset", "lora:rank=2", "--filter", "query")
    assert out.returncode == 0, out.stderr
    assert "3 targets (3×12x10)" in out.stdout and "132" in out.stdout  # 3 · 2 · (12 + 10)


# ------------------------------------------------------------------------------ compare
def test_compare_writes_table_plot_and_json(files, tmp_path, run):
    plot, records = tmp_path / "geometry.png", tmp_path / "records.json"
    out = run("compare", files["adapter"], files["dense"], "--plot", plot, "--json", records, "-k", "3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert sum(".weight" in line for line in lines) == 6
    assert any(line.strip().startswith("query n=3") for line in lines)
    assert "3 common tensors with fewer than 2 dimensions skipped" in out.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(records.read_text())
    assert len(data["records"]) == 6 and set(data["by_kind"]) == {"query", "value"}
    assert all(0 < r["dE"] < 1 and 0 < r["dL"] <= 1 and r["k_eff"] == 3 for r in data["records"])


def test_compare_bf16_with_default_plot_path(files, run):
    out = run("compare", files["bf16"], files["dense"], "--paired", "--filter", "value")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if ".weight" in line]
    assert len(rows) == 3 and all(row[1] == "value" for row in rows)
    for row in rows:  # BF16 keeps ~3 digits: dE ≈ 0.002, singular vectors nearly equal
        assert float(row[3]) < 0.01 and float(row[5]) > 0.99 and float(row[6]) > 0.99
    assert (files["folder"] / "bf16_vs_dense_geometry.png").is_file()


# ------------------------------------------------------------------------------ demo and help
def test_demo_is_an_entry_point():
    entries = {ep.name: ep for ep in importlib.metadata.entry_points(group="tensoradapt.commands")}
    assert entries["demo"].value == "tensoradapt.demo:main"


def test_plugin_dispatch(monkeypatch, tmp_path, run):
    """Everything after a plugin command's name goes to its function, --help included.  The plugin is
    a real entry point: a ``*.dist-info`` folder on ``sys.path`` declaring ``tensoradapt.commands``."""
    seen = []
    fake = types.ModuleType("fake_tensoradapt_plugin")
    fake.main = lambda args: seen.append(args) or 7
    monkeypatch.setitem(sys.modules, "fake_tensoradapt_plugin", fake)
    info = tmp_path / "fake_tensoradapt_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-tensoradapt-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[tensoradapt.commands]\nfake = fake_tensoradapt_plugin:main\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = run("fake", "--help", "x")
    assert out.returncode == 7 and seen == [["--help", "x"]]


HELP = [["--help"], ["count", "--help"], ["compare", "--help"], ["demo", "--help"], ["--version"]]


@pytest.mark.parametrize("args", HELP, ids=" ".join)
def test_help(args, run):
    out = run(*args)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


# ------------------------------------------------------------------------------ real processes (smoke tests)
def test_python_dash_m_tensoradapt():
    out = subprocess.run([sys.executable, "-m", "tensoradapt", "count", "2x4x4", "--preset", "lora:rank=1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "16" in out.stdout


def test_console_script():
    script = shutil.which("tensoradapt", path=sysconfig.get_path("scripts"))
    if script is None:
        pytest.skip("the tensoradapt console script is not installed next to this interpreter")
    out = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: tensoradapt")
    assert all(command in out.stdout for command in ("count", "compare", "demo"))


# ------------------------------------------------------------------------------ bad input: exit 2, one line
BAD = {
    "malformed shapes": (["count", "24x76a8"], "malformed shape"),
    "zero dimension": (["count", "0x768"], "malformed shape"),
    "unknown preset": (["count", "24x768x768", "--preset", "loraa"], "unknown preset 'loraa'"),
    "unknown preset argument": (["count", "8x8", "--preset", "lora:depth=2"], "no argument 'depth'"),
    "invalid preset value": (["count", "8x8", "--preset", "lorta:order=0,rank=2"], "order"),
    "missing json": (["count", "missing.json"], "missing.json: no such file"),
    "missing safetensors": (["count", "missing.safetensors"], "no such file"),
    "garbage safetensors": (["count", "{garbage}"], "header length"),
    "bad budget": (["count", "8x8", "--budget", "lots"], "not a parameter count"),
    "bad rank": (["count", "8x8", "--rank", "0,2"], "positive integers"),
    "unknown family": (["count", "8x8", "--budget", "100", "--family", "nope"], "unknown family 'nope'"),
    "no targets": (["count", "{dense}", "--filter", "nomatch"], "no target"),
    "compare missing": (["compare", "{adapter}", "missing.safetensors"], "missing.safetensors: no such file"),
    "compare garbage": (["compare", "{garbage}", "{dense}"], "header length"),
    "no common keys": (["compare", "{adapter}", "{other}"], "no common tensor names"),
    "shape mismatch": (["compare", "{adapter}", "{reshaped}"], "has shape [12, 10]"),
    "plot folder": (["compare", "{adapter}", "{dense}", "--plot", "/nonexistent/x.png"], "does not exist"),
    "bad k": (["compare", "{adapter}", "{dense}", "-k", "0"], "positive integer"),
    "NaN entries": (["compare", "{nan}", "{dense}", "--no-plot"], "has NaN or infinite entries"),
    "overlapping offsets": (["compare", "{overlap}", "{overlap}"], "overlapping or non-contiguous"),
    "deeply nested json": (["count", "{deep}"], "nests deeper than 16 levels"),
    "json folder": (["compare", "{adapter}", "{dense}", "--no-plot", "--json", "/nonexistent/x.json"],
                    "does not exist"),
    "unknown command": (["train"], "invalid choice"),
    "missing argument": (["compare", "{adapter}"], "required"),
}


def _bad_args(case: str, files) -> list[str]:
    return [a.format(**{k: str(v) for k, v in files.items()}) for a in BAD[case][0]]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line(case, files, run, tmp_path):
    out = run(*_bad_args(case, files), cwd=tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr.count("\n") == 1, out.stderr
    assert BAD[case][1] in out.stderr and "Traceback" not in out.stderr
    assert out.stdout == ""


def test_no_command_prints_usage(run):
    out = run()
    assert out.returncode == 2 and "usage" in out.stderr


def test_compare_json_is_valid_json_with_non_finite_values(files, tmp_path, run):
    from safetensors.numpy import save_file

    zeros = tmp_path / "zeros.safetensors"
    save_file({"layer.query.weight": np.zeros((6, 5), np.float32)}, str(zeros))
    dense = tmp_path / "d.safetensors"
    save_file({"layer.query.weight": np.ones((6, 5), np.float32)}, str(dense))
    out = run("compare", zeros, dense, "--no-plot", "--json", tmp_path / "z.json")
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "z.json").read_text())  # strict JSON: no bare NaN
    assert data["records"][0]["dL"] == "nan"


def test_plot_without_extension_gets_png(files, tmp_path, run):
    out = run("compare", files["adapter"], files["dense"], "--plot", tmp_path / "geometry", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "geometry.png").is_file() and str(tmp_path / "geometry.png") in out.stdout
