"""The CPU-side logic of the one-GPU check (benchmarks/gpu_check.py and gpu_check.sh, issue 20).

The check itself needs a CUDA GPU; here its smoke mode runs on the CPU (tiny sizes) and the JSON it
writes, the error recording, the time budget and the shell script's step bookkeeping are checked.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)
    spec.loader.exec_module(module)
    return module


check = _load()

REQUIRED_KEYS = {"schema", "command", "date", "device", "smoke", "card", "machine", "torch", "versions", "git",
                 "budget_s", "steps", "items", "summary", "counts", "elapsed_s"}
CONFIGS = {"peft lora r=8", "ours lora r=8", "ours lorta M=3 r=32 G=1", "ours lokr r=8",
           "ours fastfood rho=0.1 lorta M=3 r=32 G=1"}
FAILED_ROUND = "train/gpt2/ours lokr r=8/round1"
FAILED_CHECK = "fwht/b=8,n=2^8/check/ours functional.fwht (torch)"


def _strict_json(path: Path) -> dict[str, Any]:
    def reject(token: str) -> None:
        raise ValueError(f"non-strict JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=reject)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any]]:
    """One full smoke run on the CPU, in this process, with two injected failures."""
    import torch

    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    threads = torch.get_num_threads()
    try:
        rc = check.main(["--device", "cpu", "--smoke", "--isolate", "none", "--budget", "600", "--out", str(out),
                            "--fail", FAILED_ROUND, "--fail", FAILED_CHECK])
    finally:
        torch.set_num_threads(threads)  # the smoke run uses one thread; give the session its own back
        gc.unfreeze()
    return rc, _strict_json(out)


def test_smoke_json_has_the_schema(smoke: tuple[int, dict[str, Any]]) -> None:
    rc, payload = smoke
    assert rc == 1  # the injected failures make the run report failure, the JSON is complete anyway
    assert REQUIRED_KEYS <= set(payload)
    assert payload["schema"] == check.SCHEMA and payload["device"] == "cpu" and payload["smoke"] is True
    assert payload["card"] is None and payload["torch"]["version"]
    for name, rec in payload["items"].items():
        assert rec["status"] in check.STATUSES, name
        assert rec["seconds"] >= 0, name
    assert payload["counts"] == {"ok": len(payload["items"]) - 2, "error": 2, "timeout": 0, "skipped": 0}


def test_smoke_figures_are_positive(smoke: tuple[int, dict[str, Any]]) -> None:
    summary = smoke[1]["summary"]
    assert set(summary["train"]) == {"gpt2", "llama"}
    for kind, rows in summary["train"].items():
        assert set(rows) == CONFIGS, kind
        assert rows["peft lora r=8"]["step_vs_peft"] == 1.0
        for config, row in rows.items():
            assert row["step_vs_peft"] > 0 and row["step_s_best_median"] > 0, (kind, config)
            assert row["trainable"] > 0
            assert row["peak_extra_vs_peft"] is None  # CUDA memory only; nothing is measured on the CPU
    assert summary["train"]["gpt2"]["ours lokr r=8"]["rounds"] == 1  # round 1 failed (injected)
    assert summary["train"]["gpt2"]["ours lora r=8"]["rounds"] == 2
    assert len(summary["fwht"]) == 2
    for size, methods in summary["fwht"].items():
        assert methods["copy"]["vs_copy"] == 1.0
        assert {"ours ops.fwht (torch)", "dense x @ H"} <= set(methods), size
        for name, row in methods.items():
            assert row["median_s"] > 0 and row["vs_copy"] > 0, (size, name)
            assert name == "copy" or row["rel_err"] < 1e-4
    assert "ours functional.fwht (torch)" not in summary["fwht"]["b=8,n=2^8"]  # its check failed (injected)
    assert len(summary["deltas"]) == 6
    for name, row in summary["deltas"].items():
        assert row["output_bytes"] > 0 and row["median_s"] > 0, name


def test_injected_failures_are_recorded_and_the_run_goes_on(smoke: tuple[int, dict[str, Any]]) -> None:
    items = smoke[1]["items"]
    for name in (FAILED_ROUND, FAILED_CHECK):
        assert items[name]["status"] == "error"
        assert "InjectedFailure" in items[name]["error"] and "traceback" in items[name]
    assert items["train/gpt2/ours lokr r=8/round0"]["status"] == "ok"
    assert items["train/llama/ours lokr r=8/round1"]["status"] == "ok"  # later sections ran
    assert items["deltas/llama/ours lokr r=8"]["status"] == "ok"


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_time_budget_skips_items_with_the_reason() -> None:
    clock = FakeClock()
    runner = check.Runner(check.Budget(10.0, clock=clock))

    def slow() -> int:
        clock.now += 9.5
        return 1

    assert runner.run("first", slow) == 1
    assert runner.run("second", lambda: 2) is None  # 0.5 s left, an item needs MIN_ITEM_S plus its estimate
    assert runner.run("third", lambda: 3, need=5.0) is None
    assert runner.items["first"]["status"] == "ok" and runner.items["first"]["result"] == 1
    for name in ("second", "third"):
        rec = runner.items[name]
        assert rec["status"] == "skipped" and "time budget" in rec["reason"] and "0.5 s left" in rec["reason"]
    clock.now += 5
    assert runner.run("fourth", lambda: 4) is None
    assert "0.0 s left" in runner.items["fourth"]["reason"]


def test_second_item_fits_or_not_by_its_estimate() -> None:
    clock = FakeClock()
    runner = check.Runner(check.Budget(10.0, clock=clock))
    assert runner.run("fits", lambda: "a", need=8.0) == "a"
    assert runner.run("does not fit", lambda: "b", need=9.5) is None
    assert runner.items["does not fit"]["status"] == "skipped"


def test_errors_and_soft_timeouts_are_recorded() -> None:
    runner = check.Runner(check.Budget(60.0))

    def boom() -> None:
        raise ValueError("bad value")

    assert runner.run("boom", boom) is None
    assert runner.items["boom"]["status"] == "error" and runner.items["boom"]["error"] == "ValueError: bad value"
    start = time.perf_counter()
    assert runner.run("hangs", lambda: time.sleep(5), timeout=0.2) is None
    assert time.perf_counter() - start < 3
    assert runner.items["hangs"]["status"] == "timeout"
    assert runner.run("after", lambda: 7) == 7  # the runner goes on

    def outer() -> None:  # an inner item with a long timeout is cut by the enclosing one
        runner.run("inner", lambda: time.sleep(5), timeout=30)
        time.sleep(5)

    start = time.perf_counter()
    runner.run("outer", outer, timeout=0.3)
    assert time.perf_counter() - start < 3
    assert runner.items["inner"]["status"] == "timeout"
    assert runner.items["outer"]["status"] == "timeout"


def test_zero_budget_skips_every_section_with_the_reason(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    assert check.main(["--device", "cpu", "--smoke", "--budget", "0", "--out", str(out)]) == 0
    payload = _strict_json(out)
    assert REQUIRED_KEYS <= set(payload)
    assert set(payload["items"]) == {f"{s}/section" for s in check.SECTIONS}
    for rec in payload["items"].values():
        assert rec["status"] == "skipped" and rec["reason"].startswith("time budget")


def test_section_in_its_own_process(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    rc = check.main(["--device", "cpu", "--smoke", "--isolate", "process", "--sections", "fwht", "--out", str(out),
                        "--fail", "fwht/b=1,n=2^10"])
    payload = _strict_json(out)
    assert rc == 1
    assert payload["items"]["fwht/b=1,n=2^10"]["status"] == "error"
    assert payload["items"]["fwht/b=8,n=2^8"]["status"] == "ok"  # merged from the section's process
    assert list(payload["summary"]["fwht"]) == ["b=8,n=2^8"]
    assert not list(tmp_path.glob(".gpu_check_*"))  # the section's partial file is gone


def test_parse_junit(tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    path.write_text('<?xml version="1.0"?><testsuites><testsuite tests="4" failures="1" errors="1" skipped="1">'
                    '<testcase classname="tests.test_a" name="test_ok"/>'
                    '<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>'
                    '<testcase classname="tests.test_b" name="test_err"><error message="y"/></testcase>'
                    '<testcase classname="tests.test_b" name="test_skip"><skipped/></testcase>'
                    "</testsuite></testsuites>")
    got = check.parse_junit(path)
    assert got == {"tests": 4, "failures": 1, "errors": 1, "skipped": 1, "passed": 1,
                   "failed": ["tests.test_a::test_bad", "tests.test_b::test_err"]}


def test_record_and_merge_steps(tmp_path: Path) -> None:
    steps, out, tail = tmp_path / "steps.jsonl", tmp_path / "gpu_check.json", tmp_path / "tail.txt"
    tail.write_text("x" * 5000 + "END")
    assert check.main(["record-step", str(steps), "info", "ok", "0", "1.5", "--tail-file", str(tail)]) == 0
    assert check.main(["record-step", str(steps), "pytest-gpu", "skipped", "0", "0", "time budget: 3 s"]) == 0
    with open(steps, "a") as handle:
        handle.write("not json\n")
    assert check.main(["merge-steps", "--json", str(out), "--steps", str(steps), "--reason", "bench: skipped"]) == 0
    payload = _strict_json(out)
    assert [s["name"] for s in payload["steps"]] == ["info", "pytest-gpu", "unparsed"]
    assert payload["steps"][0]["tail"].endswith("END") and len(payload["steps"][0]["tail"]) == 3000
    assert payload["steps"][1]["detail"] == "time budget: 3 s"
    assert payload["steps"][2]["status"] == "error"
    assert payload["items"]["benchmarks"]["status"] == "error" and "bench: skipped" in payload["items"][
        "benchmarks"]["error"]


@pytest.mark.parametrize(("cuda", "package"), [("12.4", "cupy-cuda12x"), ("13.0", "cupy-cuda13x"),
                                               ("11.8", "cupy-cuda11x"), ("10.2", None), (None, None), ("", None)])
def test_cupy_package(cuda: str | None, package: str | None) -> None:
    assert check.cupy_package(cuda) == package


def test_install_commands_fail_fast_offline(tmp_path: Path) -> None:
    only_index = check.install_commands("tensorly", str(tmp_path / "missing"), "/tmp/site", 5)
    assert len(only_index) == 1
    assert {"--timeout", "5", "--retries", "0", "--no-deps", "--target", "/tmp/site"} <= set(only_index[0])
    (tmp_path / "wheels").mkdir()
    both = check.install_commands("tensorly", str(tmp_path / "wheels"), None, 5)
    assert both[0][-4:] == ["--no-index", "--find-links", str(tmp_path / "wheels"), "tensorly"]
    assert "--target" not in both[1]


def test_shell_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _script(out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_SMOKE": "1",
            "GPU_CHECK_SITE": str(out / "site"), **env}
    return subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env=full, timeout=240,
                          check=False)


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_shell_script_with_no_budget_records_every_step_as_skipped(tmp_path: Path) -> None:
    run = _script(tmp_path, GPU_CHECK_BUDGET_S="0")
    assert run.returncode == 0, run.stdout + run.stderr
    payload = _strict_json(tmp_path / "gpu_check.json")
    names = ["info", "deps", "pytest-gpu", "pytest-torch-cuda", "bench"]
    assert [s["name"] for s in payload["steps"]] == names
    for step in payload["steps"]:
        assert step["status"] == "skipped" and step["detail"].startswith("time budget"), step
    assert payload["items"]["benchmarks"]["status"] == "error"  # bench wrote nothing: said so
    assert "bench step: skipped" in payload["items"]["benchmarks"]["error"]
    assert (tmp_path / "gpu_check.log").read_text().count("skipped (time budget)") == 5


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_shell_script_runs_the_bench_on_cpu(tmp_path: Path) -> None:
    run = _script(tmp_path, GPU_CHECK_SKIP="info,deps,pytest-gpu,pytest-torch-cuda", GPU_CHECK_SECTIONS="fwht")
    assert run.returncode == 0, run.stdout + run.stderr
    payload = _strict_json(tmp_path / "gpu_check.json")
    steps = {s["name"]: s for s in payload["steps"]}
    assert steps["pytest-gpu"]["status"] == "skipped" and steps["pytest-gpu"]["detail"] == "GPU_CHECK_SKIP names it"
    assert steps["bench"]["status"] == "ok" and steps["bench"]["rc"] == 0
    assert payload["sections"] == ["fwht"] and payload["counts"]["error"] == 0
    assert set(payload["summary"]["fwht"]) == {"b=1,n=2^10", "b=8,n=2^8"}
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "gpu_check.json", "gpu_check.log", "gpu_check_steps.jsonl"]
