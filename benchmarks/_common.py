"""Shared helpers of the benchmark scripts: timing, machine description, JSON output.

Not part of the library.  The scripts in this folder import it as a sibling module, so run them
as ``python benchmarks/<script>.py`` (their folder is then first on ``sys.path``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_steal_s() -> float:
    """Seconds of CPU time stolen by the hypervisor so far, all CPUs (``/proc/stat``)."""
    fields = _read("/proc/stat").split("\n", 1)[0].split()
    if len(fields) < 9 or fields[0] != "cpu":
        return float("nan")
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


def busy_cpu_s() -> float:
    """CPU seconds spent busy (user, nice, system, irq, softirq) by the whole machine so far."""
    fields = _read("/proc/stat").split("\n", 1)[0].split()
    if len(fields) < 8 or fields[0] != "cpu":
        return float("nan")
    return sum(int(fields[i]) for i in (1, 2, 3, 6, 7)) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds used by this process (all threads) and its waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class ForeignLoad:
    """CPU time used by *other* processes (machine busy time minus ours) and stolen by the
    hypervisor between :meth:`start` and :meth:`stop`: a measure of how disturbed a timing is."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self._busy, self._own, self._steal = busy_cpu_s(), own_cpu_s(), cpu_steal_s()

    def stop(self) -> dict[str, float]:
        foreign = (busy_cpu_s() - self._busy) - (own_cpu_s() - self._own)
        return {"foreign_cpu_s": max(0.0, foreign), "steal_s": cpu_steal_s() - self._steal}


def best_time(
    fn: Callable[[], Any], *, min_time: float, min_reps: int, max_time: float
) -> dict[str, float | int]:
    """Best wall time of ``fn()`` (seconds), after one untimed warm-up call.

    Calls are repeated until at least ``min_reps`` calls *and* at least ``min_time`` seconds of
    calls have been timed; a call so slow that ``min_reps`` of them would exceed ``max_time``
    stops once ``max_time`` seconds and two calls are reached.  Each call is timed on its own
    with :func:`time.perf_counter`; the minimum is reported (the median is kept as a noise
    indicator), with the minor page faults per call of the whole timed loop (``getrusage``), and
    the CPU time used meanwhile by other processes and stolen by the hypervisor
    (:class:`ForeignLoad`).
    """
    fn()
    times: list[float] = []
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    load = ForeignLoad()
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        times.append(t1 - t0)
        spent = t1 - start
        if spent >= min_time and len(times) >= min_reps:
            break
        if spent >= max_time and len(times) >= 2:
            break
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    return {
        "best_s": min(times),
        "median_s": statistics.median(times),
        "reps": len(times),
        "minor_faults_per_call": faults / len(times),
        "wall_s": time.perf_counter() - start,
        **load.stop(),
    }


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine_info() -> dict[str, Any]:
    """CPU model, core count, memory, caches and library versions of this machine."""
    import numpy as np

    cpuinfo = _read("/proc/cpuinfo")
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.M)
    simd = sorted(
        f for f in (flags.group(1).split() if flags else []) if f in {"avx2", "avx512f", "fma"}
    )
    meminfo = _read("/proc/meminfo")
    mem = re.search(r"^MemTotal:\s*(\d+)\s*kB", meminfo, re.M)
    caches = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        level, kind = _read(str(index / "level")).strip(), _read(str(index / "type")).strip()
        size = _read(str(index / "size")).strip()
        if level and size:
            suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
            caches[f"L{level}{suffix}"] = size
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "cpu_family_model": "/".join(
            m.group(1) for key in ("cpu family", "model", "stepping")
            if (m := re.search(rf"^{key}\s*:\s*(\S+)$", cpuinfo, re.M))
        ),
        "cpu_simd_flags": simd,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "caches_cpu0": caches,
        "mem_total_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["numpy_blas"] = f"{blas.get('name')} {blas.get('version')}"
    except Exception as exc:
        info["numpy_blas"] = f"unknown ({exc})"
    for name in ("scipy", "tensorly", "tensoradapt", "array_api_compat"):
        try:
            info[name] = __import__(name).__version__
        except Exception:
            info[name] = None
    try:
        import torch

        config = torch.__config__.show()
        blas_info = re.search(r"BLAS_INFO=(\w+)", config)
        info["torch"] = torch.__version__
        info["torch_blas"] = blas_info.group(1) if blas_info else None
        info["torch_threads"] = torch.get_num_threads()
    except Exception:
        info["torch"] = None
    info["git"] = git_state()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        if var in os.environ:
            info[var] = os.environ[var]
    return info


DISTURBED = 0.1  # foreign CPU time above this fraction of a measurement's wall time is flagged


def disturbed(rec: dict[str, Any]) -> bool:
    """Whether other processes used more than ``DISTURBED`` of a CPU during a measurement."""
    wall = rec.get("wall_s") or 0.0
    return wall > 0 and rec.get("foreign_cpu_s", 0.0) > DISTURBED * wall


def merge_round(prev: dict[str, Any], rec: dict[str, Any]) -> None:
    """Fold the timing ``rec`` of a later round into ``prev`` (best over rounds)."""
    prev.setdefault("round_best_s", [prev["best_s"]]).append(rec["best_s"])
    prev["reps"] += rec["reps"]
    for key in ("wall_s", "foreign_cpu_s", "steal_s"):
        prev[key] = prev.get(key, 0.0) + rec.get(key, 0.0)
    prev["minor_faults_per_call"] = max(prev["minor_faults_per_call"],
                                        rec["minor_faults_per_call"])
    if rec["best_s"] < prev["best_s"]:
        prev["best_s"], prev["median_s"] = rec["best_s"], rec["median_s"]


def git_state() -> dict[str, Any]:
    """Commit of the checkout being measured, and whether the library sources differ from it."""
    import subprocess

    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "HEAD"),
            "commit_date": git("show", "-s", "--format=%cI", "HEAD"),
            "library_changes_not_committed": git("status", "--porcelain", "--", "tensoradapt",
                                                 "bindings").splitlines(),
        }
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def rss_mib() -> float:
    """This process's resident memory now, MiB (``/proc/self/statm``)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def lm_train_step(model: Any, ids: Any, params: list[Any]) -> Callable[[], float]:
    """One AdamW step (lr 1e-4) of a causal language model on ``ids`` (labels = inputs) over
    ``params``, as a callable returning the loss; the model is put in train mode."""
    import torch

    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)

    return step


def timed_steps(step: Callable[[], float], steps: int, warmup: int) -> dict[str, Any]:
    """Run ``warmup`` untimed then ``steps`` timed calls of ``step`` (one train step returning its
    loss): the median and every time, the losses, RSS before the first call and the process's peak
    RSS after the last (``ru_maxrss``, MiB)."""
    rss_before = rss_mib()
    times, losses = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        losses.append(step())
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"median_s": statistics.median(times), "times_s": times, "losses": losses,
            "rss_before_mib": rss_before, "peak_rss_mib": peak}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")


def fmt_ms(seconds: float | None) -> str:
    """Milliseconds with three significant digits (``–`` for a missing value)."""
    if seconds is None:
        return "–"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3g}"


def fmt_ratio(value: float | None) -> str:
    """A ratio as ``1.23×`` (``–`` for a missing value)."""
    if value is None:
        return "–"
    return f"{value:.2f}×" if value < 10 else f"{value:.1f}×" if value < 100 else f"{value:.0f}×"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def add_timing_arguments(parser: Any) -> None:
    """The timing flags shared by the benchmark scripts (``--min-time``, ``--min-reps``,
    ``--max-time``, ``--rounds``, ``--seed``); defaults depend on ``--quick``, see
    :func:`timing_settings`."""
    parser.add_argument("--min-time", type=float, default=None,
                        help="seconds of timed calls per measurement (default 0.5; quick 0.2)")
    parser.add_argument("--min-reps", type=int, default=None,
                        help="minimum timed calls per measurement (default 5; quick 3)")
    parser.add_argument("--max-time", type=float, default=None,
                        help="stop slow measurements after this many seconds, >= 2 calls "
                             "(default 3; quick 1)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds per measurement, best over rounds "
                             "(default 3; quick 1)")
    parser.add_argument("--seed", type=int, default=0)


def timing_settings(args: Any) -> dict[str, float | int]:
    """``best_time`` keyword arguments from the flags of :func:`add_timing_arguments`; also fills
    ``args.rounds`` in place when it was not given."""
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    return {
        "min_time": args.min_time if args.min_time is not None else (0.2 if args.quick else 0.5),
        "min_reps": args.min_reps if args.min_reps is not None else (3 if args.quick else 5),
        "max_time": args.max_time if args.max_time is not None else (1.0 if args.quick else 3.0),
    }


def end_run(load: ForeignLoad, machine: dict[str, Any]) -> dict[str, Any]:
    """Stop ``load`` and check the checkout did not change during the run (warns if it did).

    Returns the disturbance record of ``load.stop()`` plus ``git_at_end``, ready to be merged
    into the JSON payload.
    """
    disturbance = load.stop()
    git_end = git_state()
    if git_end != machine["git"]:
        print(f"WARNING: the checkout changed during the run: {machine['git']} -> {git_end}")
    return {**disturbance, "git_at_end": git_end}


def disturbance_line(elapsed: float, end: dict[str, Any], machine: dict[str, Any]) -> str:
    """One line: how much CPU other processes and the hypervisor took during the run."""
    cpus = machine["usable_cpus"] or 1
    return (f"total benchmark time {elapsed:.0f} s; meanwhile other processes used "
            f"{end['foreign_cpu_s']:.1f} CPU-s and the hypervisor stole "
            f"{end['steal_s']:.1f} CPU-s (of {cpus * elapsed:.0f} CPU-s on {cpus} CPUs)")


def command_line(argv: list[str] | None) -> str:
    """The script name and its arguments, as recorded in the JSON output."""
    return " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
