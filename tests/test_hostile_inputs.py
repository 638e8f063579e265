"""Hostile input, case by case (issue 12; the error contract is docs/reliability.md).

Configs end in one ``ValueError`` / ``TypeError`` naming the field, before anything is allocated;
planning and counting are linear in the number of targets; the command line ends every bad input
with exit status 2 and one line on stderr, fast and with bounded memory.
"""

from __future__ import annotations

import contextlib
import gc
import io
import itertools
import json
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from tensoradapt import SuperLoRAConfig, budget, cli, count_params, presets
from tensoradapt.glora.config import MAX_RANK as GLORA_MAX_RANK
from tensoradapt.glora.config import GLoRAConfig, LayerChoice
from tensoradapt.superlora.config import MAX_ORDER, MAX_RANK, MAX_SPLITS
from tensoradapt.superlora.generator import SuperLoRA
from tensoradapt.testing import run_bounded

WALL_SECONDS = 120.0  # wall clock: only catches a hang (the CPU bound is the real one)


def _fast(call, seconds: float = 2.0, peak_mib: float = 64):
    """``call()`` raised; return the exception after checking the time and memory it took."""
    outcome = run_bounded(call)
    assert outcome.error is not None, "expected an error"
    assert outcome.cpu_seconds < seconds, f"took {outcome.cpu_seconds:.1f} s of CPU"
    assert outcome.seconds < WALL_SECONDS, f"took {outcome.seconds:.1f} s"
    assert outcome.peak_bytes < peak_mib * 2**20, f"allocated {outcome.peak_bytes / 2**20:.0f} MiB"
    return outcome.error


# ------------------------------------------------------------------------------ configs
@pytest.mark.parametrize(("kwargs", "field"), [
    ({"order": 10**30}, "order"), ({"order": 10**9}, "order"), ({"order": MAX_ORDER + 1}, "order"),
    ({"splits": 10**6}, "splits"), ({"splits": 10**30}, "splits"), ({"splits": MAX_SPLITS + 1}, "splits"),
    ({"rank": 10**30}, "rank"), ({"rank": MAX_RANK + 1}, "rank"), ({"rank": (10**30, 1), "core": "tucker"}, "rank[0]"),
    ({"rank": [1] * 10**6}, "rank"), ({"fold": [2] * 10**6}, "fold"), ({"fixed_identity_modes": [0] * 10**6}, "fixed"),
    ({"seed": 10**5000}, "seed"), ({"seed": 2**64}, "seed"), ({"grouping": 10**30}, "grouping"),
    ({"grouping": [[0]] * (2**24 + 1)}, "grouping"), ({"dense_side": 10**30, "splits": 2}, "dense_side"),
    ({"fold": (10**30, 2)}, "fold[0]"), ({"ratio": 10**400}, "ratio"), ({"scale": -(10**400)}, "scale"),
])
def test_size_like_fields_are_refused_fast_with_a_value_error(kwargs, field):
    error = _fast(lambda: SuperLoRAConfig(**kwargs))
    assert isinstance(error, ValueError) and not isinstance(error, OverflowError), repr(error)
    assert field in str(error) and len(str(error)) < 300


@pytest.mark.parametrize("value", [(), "no", "yes", 0, 1, None, [], np.int64(1)])
def test_bools_are_bools(value):
    with pytest.raises(TypeError, match="decompose_both must be True or False"):
        SuperLoRAConfig(decompose_both=value, fold="matrix", splits=2, dense_side=-1)


def test_numpy_bool_is_a_bool_and_round_trips():
    config = presets.lokr(2, decompose_both=np.bool_(True))
    assert config.decompose_both is True
    assert SuperLoRAConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("version", [True, 1.0, "1", None, [1]])
def test_config_version_is_an_integer(version):
    data = presets.lora(2).to_dict() | {"config_version": version}
    with pytest.raises(ValueError, match="config_version"):
        SuperLoRAConfig.from_dict(data)
    with pytest.raises(ValueError, match="config_version"):
        GLoRAConfig.from_dict(GLoRAConfig().to_dict() | {"config_version": version})


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"rank": 10**30}, ValueError), ({"rank": GLORA_MAX_RANK + 1}, ValueError), ({"rank": True}, TypeError),
    ({"seed": 10**30}, ValueError), ({"ranks": iter(range(1, 10**12))}, ValueError),
    ({"A": itertools.repeat("none")}, ValueError), ({"A": {"lora": 1}}, TypeError), ({"ranks": "4"}, TypeError),
])
def test_glora_fields_are_bounded(kwargs, error):
    assert isinstance(_fast(lambda: GLoRAConfig(**kwargs)), error)


def test_layer_choice_rank_is_bounded():
    assert isinstance(_fast(lambda: LayerChoice(B="lora", rank=10**30)), ValueError)
    assert isinstance(_fast(lambda: LayerChoice.from_dict({1: 2, "a": 3})), ValueError)


# ------------------------------------------------------------------------------ what the shapes allow
@pytest.mark.parametrize("config", [
    SuperLoRAConfig(order=64, rank=1), SuperLoRAConfig(order=40, rank=2, core="tucker"),
    SuperLoRAConfig(order=2, splits=64, rank=1), SuperLoRAConfig(order=3, rank=(4096, 4096, 4096), core="tucker"),
    SuperLoRAConfig(fold=(2**40, 2**40)), presets.lora(10**6), presets.lorta(20, 4),
])
def test_plans_beyond_what_the_shapes_allow_are_refused_before_allocating(config):
    shapes = [(8, 8), (4, 16)]
    for call in (lambda: SuperLoRA(config, shapes), lambda: count_params(config, shapes)):
        error = _fast(call)
        assert isinstance(error, ValueError) and "at most" in str(error), repr(error)


def test_huge_dimensions_are_refused_or_counted_fast():
    assert isinstance(_fast(lambda: count_params(presets.lokr(2), [(2**61 + 1, 3)])), ValueError)
    assert isinstance(_fast(lambda: count_params(presets.lora(2), [(2**64, 2)])), ValueError)  # > 2**64 - 1
    outcome = run_bounded(lambda: count_params(presets.lora(2), [(2**63, 2)]))
    assert outcome.error is None and outcome.result == 2 * (2**63 + 2) and outcome.cpu_seconds < 2


def test_a_plan_over_more_than_the_target_cap_is_refused():
    from tensoradapt.superlora.plan import MAX_TARGETS

    with pytest.raises(ValueError, match="at most"):
        SuperLoRA(presets.lora(1), [(2, 2)] * (MAX_TARGETS + 1))


# ------------------------------------------------------------------------------ linear planning and counting
@pytest.mark.parametrize("config", [
    presets.lora(2), presets.lorta(3, 2, "weight"), presets.lokr(4), presets.lotr(2), presets.lonkr(2, 2, None, 7),
    presets.lorta(3, 2, 1), SuperLoRAConfig(grouping=1000)])
def test_counting_1e5_targets_takes_under_2_seconds(config):
    shapes = [(8, 8)] * 100_000
    start = time.process_time()  # CPU time: robust on a shared machine
    count = count_params(config, shapes)
    assert time.process_time() - start < 2.0
    assert count == SuperLoRA(config, shapes[:1000]).num_params * 100 or config.grouping != "weight"


def test_planning_is_linear_in_the_targets():
    def cpu(n: int) -> float:
        shapes = [(8, 8), (8, 16)] * (n // 2)
        gc.collect()
        gc.disable()  # the collector's full passes grow with the heap: time the planning only
        try:
            start = time.process_time()
            SuperLoRA(presets.lora(2), shapes)
            return time.process_time() - start
        finally:
            gc.enable()

    small, large = min(cpu(10_000) for _ in range(3)), cpu(100_000)
    assert large < 40 * max(small, 0.005)  # linear would be 10x, quadratic 100x


def test_counting_1e5_targets_takes_under_two_cpu_seconds():
    shapes = [(8, 8), (8, 16)] * 50_000
    start = time.process_time()
    assert count_params(presets.lora(2), shapes) == 50_000 * 2 * (16 + 24)
    assert time.process_time() - start < 2.0


def test_fast_counts_equal_the_full_plan():
    rng = np.random.default_rng(0)
    shapes = [tuple(int(d) for d in rng.integers(1, 40, size=2)) for _ in range(300)]
    for config in [presets.lora(3), presets.lokr(2, 4), presets.loha(2), presets.lonkr(3, 2, 4, 17),
                   presets.lorta(4, 2, 5, "cp"), presets.with_projection(presets.lorta(3, 2, 9), "fastfood", 0.1),
                   SuperLoRAConfig(grouping=299, order=3, rank=(1, 2, 2), core="tucker")]:
        assert count_params(config, shapes) == SuperLoRA(config, shapes).num_params, config


def test_budget_on_20000_targets_is_fast():
    start = time.process_time()
    entries = budget([(768, 768)] * 20_000, 10**6)
    assert time.process_time() - start < 5.0 and entries


# ------------------------------------------------------------------------------ the command line
def _main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("hostile_cli")
    save_file({"w": np.ones((6, 5), np.float32)}, str(root / "a.safetensors"))
    save_file({"w": np.eye(6, 5, dtype=np.float32)}, str(root / "b.safetensors"))
    save_file({"w": np.full((6, 5), 3e38, np.float32)}, str(root / "big1.safetensors"))
    save_file({"w": np.full((6, 5), -3e38, np.float32)}, str(root / "big2.safetensors"))
    text = json.dumps({"w": {"dtype": "F32", "shape": [20000, 20000], "data_offsets": [0, 1_600_000_000]}}).encode()
    with open(root / "claims.safetensors", "wb") as fh:  # a sparse 1.6 GB file
        fh.write(struct.pack("<Q", len(text)) + text)
        fh.truncate(8 + len(text) + 1_600_000_000)
    (root / "count.json").write_text(json.dumps([{"name": "a", "shape": [2, 2], "count": 10**9}]))
    (root / "digits.json").write_text("[[" + "9" * 5000 + ", 2]]")
    os.mkfifo(root / "pipe.json")
    os.mkfifo(root / "pipe")
    return root


HOSTILE_CLI = {
    "5000-digit shape": (["count", "9" * 5000 + "x2"], "more than 20 digits"),
    "4300-digit shape": (["count", "9" * 4300 + "x2"], "more than 20 digits"),
    "dimension over 2**64": (["count", "18446744073709551616x2"], "exceeds 2**64 - 1"),
    "huge budget": (["count", "8x8", "--budget", "9" * 5000], "too large a parameter count"),
    "order=100000": (["count", "8x8", "--preset", "lorta:order=100000"], "order must be at most 64"),
    "order=10**9": (["count", "8x8", "--preset", f"lorta:order={10**9}"], "order must be at most 64"),
    "order=99": (["count", "768x768", "--preset", "lorta:order=99", "--rank", "4"], "order must be at most 64"),
    "/dev/zero": (["count", "/dev/zero"], "shape files must end in .json"),
    "10^9-count JSON": (["count", "{count.json}"], "more than 1,000,000 targets"),
    "5000-digit JSON": (["count", "{digits.json}"], "not valid JSON"),
    "999999999x2x2": (["count", "999999999x2x2"], "more than 1,000,000 targets"),
    "FIFO": (["count", "{pipe}"], "shape files must end in .json"),
    "FIFO json": (["count", "{pipe.json}"], "not a regular file"),
    "huge rank": (["count", "8x8", "--rank", "9" * 5000], "positive integers"),
    "huge top": (["count", "8x8", "--top", "9" * 5000], "integer >= 0"),
    "newline argument": (["count", "8x8", "\n"], "unrecognized arguments"),
    "plot .jpgx": (["compare", "{a.safetensors}", "{b.safetensors}", "--plot", "out.jpgx"], "not a plot format"),
    "plot .safetensors": (["compare", "{a.safetensors}", "{b.safetensors}", "--plot", "{a.safetensors}"],
                          "not a plot format"),
    "plot /proc": (["compare", "{a.safetensors}", "{b.safetensors}", "--plot", "/proc/x.png"], "cannot write"),
    "json /proc": (["compare", "{a.safetensors}", "{b.safetensors}", "--no-plot", "--json", "/proc/x.json"],
                   "cannot write"),
    "json /dev/full": (["compare", "{a.safetensors}", "{b.safetensors}", "--no-plot", "--json", "/dev/full"],
                       "not a regular file"),
    "all-3e38 tensors": (["compare", "{big1.safetensors}", "{big2.safetensors}", "--no-plot"], "cannot compare"),
    "20000x20000 tensor": (["compare", "{claims.safetensors}", "{claims.safetensors}", "--no-plot"],
                           "more than the 67,108,864"),
    "compare FIFO": (["compare", "{pipe}", "{a.safetensors}", "--no-plot"], "not a regular file"),
}


@pytest.mark.parametrize("case", list(HOSTILE_CLI))
def test_hostile_command_lines_exit_2_with_one_line_fast(case, files, monkeypatch):
    monkeypatch.chdir(files)
    named = {"{" + p.name + "}": str(p) for p in files.iterdir()}
    argv = [named.get(a, a) for a in HOSTILE_CLI[case][0]]
    outcome = run_bounded(lambda: _main(*argv))
    assert outcome.error is None, repr(outcome.error)
    code, out, err = outcome.result
    assert code == 2, (out[-500:], err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert HOSTILE_CLI[case][1] in err, err
    assert outcome.cpu_seconds < 5.0 and outcome.seconds < WALL_SECONDS and outcome.peak_bytes < 256 * 2**20


def test_count_marks_over_parameterised_rows_and_refuses_absurd_ones():
    code, out, err = _main("count", "768x768", "--preset", "lora", "--rank", "1000,100000")
    assert code == 0, err
    over, absurd = out.splitlines()[2:4]
    assert "more parameters than dense fine-tuning" in over and "1,536,000" in over
    assert "n/a" in absurd and "at most 64x its entries" in absurd
    code, out, _ = _main("count", "768x768", "--preset", "lorta:order=40", "--rank", "4", "--json")
    (row,) = json.loads(out)
    assert row["params"] is None and "at most" in row["note"]


def test_count_on_20000_targets_is_fast():
    start = time.process_time()
    code, _, err = _main("count", "20000x768x768")
    assert code == 0, err
    assert time.process_time() - start < 5.0


def test_fifo_does_not_block_a_real_process(files):
    for argv in (["count", str(files / "pipe.json")], ["compare", str(files / "pipe"), str(files / "pipe")]):
        done = subprocess.run([sys.executable, "-m", "tensoradapt", *argv], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
