"""Fuzz: argument lists of any shape through :func:`tensoradapt.cli.main` (docs/reliability.md).

Property: ``main`` returns 0, or 2 with exactly one line on stderr and no traceback; it never
raises; each run stays within a time and a memory bound.  The arguments mix valid and hostile
tokens: shapes (huge numbers, 5000 digits, zeros), presets with absurd values, budgets, ranks,
files (valid and corrupt safetensors, JSON with a 10^9 count, a FIFO, /dev/zero, a folder) and
output paths (/proc, /dev/full, unknown plot formats).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensoradapt import cli
from tensoradapt.testing import FuzzLedger, run_bounded

SECONDS = 10.0  # per run (a typical run takes milliseconds; a noisy machine may be slower)
WALL_SECONDS = 120.0  # wall clock: only catches a hang (the CPU bound is the real one)
PEAK_BYTES = 256 * 2**20
EXAMPLES = 120
LEDGER = FuzzLedger()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("cli_fuzz")
    out = {}
    for name, array in {"a": np.ones((6, 5), np.float32), "b": np.eye(6, 5, dtype=np.float32),
                        "huge": np.full((4, 4), 3e38, np.float32), "nan": np.full((4, 4), np.nan, np.float32)}.items():
        path = root / f"{name}.safetensors"
        save_file({"layer.query.weight": array}, str(path))
        out[name] = str(path)
    text = json.dumps({"w": {"dtype": "F32", "shape": [20000, 20000], "data_offsets": [0, 1600000000]}}).encode()
    (root / "claims.safetensors").write_bytes(struct.pack("<Q", len(text)) + text)  # claims 1.6 GB, holds none
    out["claims"] = str(root / "claims.safetensors")
    (root / "garbage.safetensors").write_bytes(b"\xff" * 64)
    out["garbage"] = str(root / "garbage.safetensors")
    (root / "count.json").write_text(json.dumps([{"name": "a", "shape": [2, 2], "count": 10**9}]))
    out["count"] = str(root / "count.json")
    (root / "deep.json").write_text("[" * 5000 + "]" * 5000)
    out["deep"] = str(root / "deep.json")
    (root / "digits.json").write_text(json.dumps([[int("9" * 4000), 2]]))
    out["digits"] = str(root / "digits.json")
    fifo = root / "pipe.json"
    os.mkfifo(fifo)
    out["fifo"] = str(fifo)
    out["folder"] = str(root)
    out["out_png"] = str(root / "plot.png")
    out["out_json"] = str(root / "records.json")
    return out


_NUMBERS = ["0", "1", "4", "-1", "1.5", "9" * 30, "9" * 4300, "9" * 5000, "1e9", "nan", "", "40k", "1.5M", "0x10"]
_SHAPES = ["8x8", "24x768x768", "2x16x16,16x32", "0x768", "999999999x2x2", "9" * 5000 + "x2", "9" * 4300 + "x2",
           "18446744073709551616x2", "18446744073709551615x2", "x", "8x8x8x8", "/dev/zero", "/dev/null"]
_PRESETS = ["lora", "lorta:order=99", "lorta:order=100000", f"lorta:order={10**9}", "lokr:factor=0", "lotr",
            "lonkr:splits=64", "lonkr:splits=1000000", "lorta:order=3,groups=0", "krona:scale=1e308",
            "loha:rank=" + "9" * 40, "dense:groups=layer", "lora:rank=true", "lorta:order=nan", "lora:alpha=inf",
            "nope", ":", "lora:=", "lokr:decompose_both=no"]


def _tokens(files: dict) -> st.SearchStrategy[str]:
    paths = [files[k] for k in ("a", "b", "huge", "nan", "claims", "garbage", "count", "deep", "digits", "fifo",
                                "folder")] + ["/dev/zero", "/dev/full", "/proc/self/status", "missing.json"]
    outputs = ["/proc/x.png", "/proc/x.json", "/dev/full", "out.jpgx", files["a"], files["out_png"],
               files["out_json"], files["folder"], "/nonexistent/x.png"]
    flags = ["--preset", "--rank", "--budget", "--min-params", "--family", "--top", "--filter", "--min-ndim", "--json",
             "-k", "--paired", "--method", "--plot", "--no-plot", "--no-progress", "--help", "--version"]
    return st.one_of(st.sampled_from(_NUMBERS), st.sampled_from(_SHAPES), st.sampled_from(_PRESETS),
                     st.sampled_from(paths), st.sampled_from(outputs), st.sampled_from(flags),
                     st.sampled_from(["lora", "lorta", "fastfood", "full", "svds", "(", "a" * 300]),
                     st.text(max_size=8))


def _argv(files: dict) -> st.SearchStrategy[list[str]]:
    command = st.sampled_from(["count", "count", "count", "compare", "compare", "bogus", "--version"])
    return st.tuples(command, st.lists(_tokens(files), max_size=8)).map(lambda t: [t[0], *t[1]])


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def _case(argv: list[str]) -> None:
    outcome = run_bounded(lambda: _run(argv))
    LEDGER.record("cli.main", outcome)
    if outcome.error is not None:
        if isinstance(outcome.error, SystemExit):  # argparse's own --help / --version / usage
            code = outcome.error.code
            raise AssertionError(f"main({argv!r:.300}) raised SystemExit({code!r}) instead of returning")
        raise AssertionError(f"main({argv!r:.300}) raised {type(outcome.error).__name__}: "
                             f"{outcome.error}") from outcome.error
    code, _out, err = outcome.result
    LEDGER.counts["cli.exit"][str(code)] += 1
    assert code in (0, 2), (argv, code, err[-500:])
    assert "Traceback" not in err, err[-1000:]
    if code == 2:
        assert err.count("\n") == 1 and err.strip(), f"{argv!r:.300}: stderr is not one line: {err[:500]!r}"
    assert outcome.cpu_seconds < SECONDS, f"{argv!r:.300} took {outcome.cpu_seconds:.1f} s of CPU"
    assert outcome.seconds < WALL_SECONDS, f"{argv!r:.300} took {outcome.seconds:.1f} s"
    assert outcome.peak_bytes < PEAK_BYTES, f"{argv!r:.300} allocated {outcome.peak_bytes / 2**20:.0f} MiB"


_COMMON = {"deadline": None, "database": None, "print_blob": True,
           "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                     HealthCheck.data_too_large, HealthCheck.filter_too_much]}


@settings(max_examples=EXAMPLES, derandomize=True, **_COMMON)
@given(data=st.data())
def test_fuzz_cli(files, data, monkeypatch):
    monkeypatch.chdir(files["folder"])
    _case(data.draw(_argv(files)))


@pytest.mark.slow
@settings(max_examples=EXAMPLES * 10, derandomize=False, **_COMMON)
@given(data=st.data())
def test_fuzz_cli_slow(files, data, monkeypatch):
    monkeypatch.chdir(files["folder"])
    _case(data.draw(_argv(files)))


def teardown_module() -> None:
    LEDGER.write("cli")
