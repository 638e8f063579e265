"""Benchmark of the fast Walsh–Hadamard transform ``tensoradapt.ops.fwht`` on CPU.

For float32 inputs of shape ``(B, n)`` (transform along the last axis), on NumPy arrays and on
torch CPU tensors, every row of the output table is measured in one run on one input:

* the **copy floor**: one copy of the same array (``x.copy()`` / ``x.clone()``);
* **ours**: ``tensoradapt.ops.fwht(x)`` with its default block, and a sweep over
  ``block = 8, 16, 32, 64`` (to check the choice made by ``default_block``);
* a **textbook radix-2** butterfly written here: for each stage ``h`` the array is viewed as
  ``(B, n/2h, 2, h)`` and ``a + b`` / ``a − b`` are written into a second buffer;
* **one GEMM pass** ``x.reshape(-1, 16) @ H_16`` (not a transform: the cost of one of the
  ``⌈log2 n / 4⌉`` passes that ours makes with 16-blocks, as a lower bound for that formulation);
* a **dense** Hadamard matmul ``x @ scipy.linalg.hadamard(n)`` (only at n = 2^10 and 2^12: the
  matrix has n² entries);
* the PyPI packages ``pyfwht`` (NumPy) and ``hadamard-transform`` (torch), when importable; their
  normalisation is detected from the output and divided out before the correctness check.

Every result is checked against a float64 radix-2 reference (first rows only for B > 1) before it
is timed.  Timing: best of repeated calls after one warm-up (see ``_common.best_time``).

Usage::

    python benchmarks/bench_fwht.py            # default run, a few minutes on 2 cores
    python benchmarks/bench_fwht.py --quick    # n = 2^16..2^20, fewer repeats
    python benchmarks/bench_fwht.py --full     # also batch 64 at n = 2^22 (1 GiB arrays)

A markdown table goes to stdout and the raw numbers to ``benchmarks/results/fwht.json``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
from _common import (
    DISTURBED,
    RESULTS_DIR,
    ForeignLoad,
    add_timing_arguments,
    best_time,
    command_line,
    disturbance_line,
    disturbed,
    end_run,
    fmt_ms,
    fmt_ratio,
    machine_info,
    markdown_table,
    merge_round,
    timing_settings,
    write_json,
)

import tensoradapt
from tensoradapt.ops import fwht

default_block = importlib.import_module("tensoradapt.ops.fwht").default_block

BLOCKS = (8, 16, 32, 64)
DENSE_LOG_SIZES = (10, 12)
REL_TOL = 1e-5  # norm-wise relative error allowed for a float32 transform
CHECK_ROWS = 2  # rows compared with the float64 reference when B > 1
TIE = 0.05  # blocks within 5 % of the best are listed as ties in the sweep table


class Unavailable(Exception):
    """A baseline that cannot run here; the message goes into the table."""


# --------------------------------------------------------------------------------------------
# Baselines written for this benchmark


def radix2(x: Any, add: Callable, sub: Callable, empty_like: Callable) -> Any:
    """Textbook radix-2 FWHT of the rows of a 2-D array (unnormalised, natural order).

    Stage ``h = 1, 2, …, n/2``: view the source as ``(B, n/2h, 2, h)``; the destination gets
    ``a + b`` in slot 0 and ``a − b`` in slot 1.  Two buffers are used in turn (no in-place
    aliasing), so every stage reads and writes the whole array: ``log2 n`` passes.
    """
    rows, n = x.shape
    buffers = (empty_like(x), empty_like(x))
    src, h, stage = x, 1, 0
    if n == 1:
        dst = buffers[0]
        dst[...] = x
        return dst
    while h < n:
        dst = buffers[stage % 2]
        s = src.reshape(rows, n // (2 * h), 2, h)
        d = dst.reshape(rows, n // (2 * h), 2, h)
        add(s[:, :, 0], s[:, :, 1], out=d[:, :, 0])
        sub(s[:, :, 0], s[:, :, 1], out=d[:, :, 1])
        src, h, stage = dst, 2 * h, stage + 1
    return src


def radix2_numpy(x: np.ndarray) -> np.ndarray:
    return radix2(x, np.add, np.subtract, np.empty_like)


def radix2_torch(x: Any) -> Any:
    import torch

    return radix2(x, torch.add, torch.sub, torch.empty_like)


def reference(rows: np.ndarray) -> np.ndarray:
    """Float64 radix-2 transform of a few rows (the correctness oracle)."""
    return radix2_numpy(np.ascontiguousarray(rows, dtype=np.float64))


# --------------------------------------------------------------------------------------------
# Namespaces


class NumpyNS:
    name = "numpy"

    @staticmethod
    def wrap(a: np.ndarray) -> np.ndarray:
        return a.copy()

    @staticmethod
    def host(y: Any) -> np.ndarray:
        return np.asarray(y)

    @staticmethod
    def copy(x: np.ndarray) -> Callable[[], Any]:
        return x.copy


class TorchNS:
    name = "torch"

    @staticmethod
    def wrap(a: np.ndarray) -> Any:
        import torch

        return torch.from_numpy(a.copy())

    @staticmethod
    def host(y: Any) -> np.ndarray:
        return y.detach().cpu().numpy()

    @staticmethod
    def copy(x: Any) -> Callable[[], Any]:
        return x.clone


# --------------------------------------------------------------------------------------------
# Third-party packages


def package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe_packages() -> dict[str, dict[str, Any]]:
    """Import the optional packages and note what works (filled into the JSON header)."""
    info: dict[str, dict[str, Any]] = {}
    entry: dict[str, Any] = {"version": package_version("pyfwht")}
    try:
        import pyfwht

        entry["available"] = True
        entry["has_gpu_reported"] = bool(pyfwht.has_gpu())
        entry["has_openmp"] = bool(pyfwht.has_openmp())
        probe = np.ones(1 << 20, dtype=np.float32)
        try:
            pyfwht.fwht(probe)
            entry["default_backend_2^20"] = "ok"
        except Exception as exc:
            entry["default_backend_2^20"] = f"{type(exc).__name__}: {exc}"
        try:
            pyfwht.fwht(np.ones((2, 16), dtype=np.float32), backend="cpu")
            entry["fp32_2d_cpu"] = "ok"
        except Exception as exc:
            entry["fp32_2d_cpu"] = f"{type(exc).__name__}: {exc}"
    except Exception as exc:
        entry["available"] = False
        entry["error"] = f"{type(exc).__name__}: {exc}"
    info["pyfwht"] = entry
    entry = {"version": package_version("hadamard-transform")}
    try:
        importlib.import_module("hadamard_transform")
        entry["available"] = True
    except Exception as exc:
        entry["available"] = False
        entry["error"] = f"{type(exc).__name__}: {exc}"
    info["hadamard-transform"] = entry
    return info


def pyfwht_method(backend: str, x: np.ndarray) -> tuple[Callable[[], Any], str]:
    """``pyfwht.fwht`` with an explicit CPU backend on float32 input of shape ``(B, n)``."""
    try:
        import pyfwht
    except Exception as exc:
        raise Unavailable(f"not importable: {type(exc).__name__}: {exc}") from exc
    if x.shape[0] == 1:
        row = x[0]
        return (lambda: pyfwht.fwht(row, backend=backend)), "1-D float32 call"
    try:
        pyfwht.fwht(x[:2], backend=backend)
    except TypeError as exc:
        note = (
            f"float32 2-D input raises TypeError ({exc}); timed the float64 fallback: "
            "astype(float64) + fwht + astype(float32)"
        )
        return (
            lambda: pyfwht.fwht(x.astype(np.float64), backend=backend).astype(np.float32)
        ), note
    return (lambda: pyfwht.fwht(x, backend=backend)), "2-D float32 call"


def hadamard_transform_method(x: Any) -> tuple[Callable[[], Any], str]:
    try:
        from hadamard_transform import hadamard_transform
    except Exception as exc:
        raise Unavailable(f"not importable: {type(exc).__name__}: {exc}") from exc
    return (lambda: hadamard_transform(x)), "2-D (B, n) call"


# --------------------------------------------------------------------------------------------
# Measurement


NORMALISATIONS = {"unnormalised": lambda n: 1.0, "1/√n": lambda n: n**-0.5, "1/n": lambda n: 1 / n}


def check(y_rows: np.ndarray, ref: np.ndarray, detect: bool) -> tuple[float, str]:
    """Relative error against the reference, after dividing out a detected normalisation."""
    y_rows = np.asarray(y_rows, dtype=np.float64).reshape(ref.shape)
    n = ref.shape[-1]
    convention = "unnormalised"
    if detect:
        scale = float(np.vdot(y_rows, ref) / np.vdot(ref, ref))
        for name, fn in NORMALISATIONS.items():
            if abs(scale / fn(n) - 1) < 1e-3:
                convention = name
                break
        else:
            convention = f"unknown (fitted scale {scale:.4g})"
    factor = NORMALISATIONS.get(convention, lambda n: 1.0)(n)
    err = float(np.linalg.norm(y_rows / factor - ref) / np.linalg.norm(ref))
    return err, convention


def measure(
    label: str,
    build: Callable[[], tuple[Callable[[], Any], str]],
    ns: Any,
    ref: np.ndarray | None,
    settings: dict[str, float],
    detect: bool = False,
) -> dict[str, Any]:
    record: dict[str, Any] = {"method": label}
    try:
        fn, note = build()
        record["note"] = note
        if ref is not None:
            y = fn()
            rows = ns.host(y).reshape(-1, ref.shape[-1])[: ref.shape[0]]
            err, convention = check(rows, ref, detect)
            del y
            record["rel_err"] = err
            record["normalisation"] = convention
            if not err <= REL_TOL:
                record["status"] = f"MISMATCH (rel. error {err:.2e})"
        record.update(best_time(fn, **settings))
        record.setdefault("status", "ok")
    except Unavailable as exc:
        record["status"] = str(exc)
    except Exception as exc:
        record["status"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
    return record


def run_case(
    ns: Any,
    batch: int,
    n: int,
    dense: bool,
    settings: dict[str, float],
    rng: np.random.Generator,
    rounds: int,
) -> list[dict[str, Any]]:
    """All methods on one input of shape ``(batch, n)``."""
    host = rng.standard_normal((batch, n), dtype=np.float32)
    ref = reference(host[:CHECK_ROWS])
    x = ns.wrap(host)
    records = [measure("copy floor", lambda: (ns.copy(x), "one copy"), ns, None, settings)]
    blk = default_block(n, batch)
    variants: list[tuple[str, int | None]] = [("ours", None)]
    if not dense:
        variants += [(f"ours block={b}", b) for b in BLOCKS]
    # The ours variants are measured in `rounds` interleaved rounds, each on a fresh copy of the
    # input and for 1/rounds of the time budget (at least min_reps calls), best over rounds: the
    # time of one configuration depends on the state of the heap (addresses, page faults of the
    # intermediates) as much as on the block, and one bad state must not decide the sweep.
    ours_records: dict[str, dict[str, Any]] = {}
    round_settings = {**settings, "min_time": settings["min_time"] / rounds,
                      "max_time": settings["max_time"] / rounds}
    for i in range(rounds):
        xr = x if i == 0 else ns.wrap(host)
        for label, block in variants:
            rec = measure(
                label,
                lambda block=block, xr=xr: ((lambda: fwht(xr, block=block)),
                                            f"default block {blk}" if block is None else ""),
                ns, ref if i == 0 else None, round_settings,
            )
            rec["block"] = blk if block is None else block
            prev = ours_records.get(label)
            if prev is None or "best_s" not in prev:
                rec["rounds"] = 1
                ours_records[label] = rec
            elif "best_s" in rec:
                prev["rounds"] += 1
                merge_round(prev, rec)
    records += list(ours_records.values())
    if dense:
        def build_dense() -> tuple[Callable[[], Any], str]:
            h = ns.wrap(scipy.linalg.hadamard(n, dtype=np.float32))
            return (lambda: x @ h), "x @ hadamard(n), matrix built outside the timing"

        records.append(measure("dense", build_dense, ns, ref, settings))
    else:
        def build_pass() -> tuple[Callable[[], Any], str]:
            h16 = ns.wrap(scipy.linalg.hadamard(16, dtype=np.float32))
            return (lambda: x.reshape(-1, 16) @ h16), "x.reshape(-1, 16) @ H_16 (no check)"

        records.append(measure("one pass f=16", build_pass, ns, None, settings))
        r2 = radix2_numpy if ns.name == "numpy" else radix2_torch
        records.append(measure("radix-2", lambda: ((lambda: r2(x)), "textbook"), ns, ref, settings))
        if ns.name == "numpy":
            for backend in ("cpu", "openmp"):
                records.append(
                    measure(
                        f"pyfwht ({backend})",
                        lambda backend=backend: pyfwht_method(backend, x),
                        ns, ref, settings, detect=True,
                    )
                )
        else:
            records.append(
                measure(
                    "hadamard-transform",
                    lambda: hadamard_transform_method(x),
                    ns, ref, settings, detect=True,
                )
            )
    for r in records:
        r.update(namespace=ns.name, batch=batch, n=n, log2n=int(math.log2(n)))
    return records


# --------------------------------------------------------------------------------------------
# Report


def _get(records: list[dict[str, Any]], method: str) -> dict[str, Any] | None:
    return next((r for r in records if r["method"] == method), None)


def _cell(rec: dict[str, Any] | None, ours: float | None) -> str:
    if rec is None:
        return "–"
    if "best_s" not in rec:
        return rec["status"]
    text = f"{fmt_ms(rec['best_s'])} ({fmt_ratio(rec['best_s'] / ours)})" if ours else fmt_ms(
        rec["best_s"]
    )
    if rec["status"] != "ok":
        text += f" {rec['status']}"
    elif "fallback" in rec.get("note", ""):
        text += " †"
    return text + (" ‡" if disturbed(rec) else "")


def report(all_records: list[dict[str, Any]]) -> str:
    out = []
    groups = sorted({(r["namespace"], r["batch"]) for r in all_records}, key=lambda g: (
        g[0] != "numpy", g[1]))
    for ns_name, batch in groups:
        recs = [r for r in all_records if r["namespace"] == ns_name and r["batch"] == batch]
        sizes = sorted({r["n"] for r in recs})
        baselines = [m for m in ("radix-2", "dense", "pyfwht (cpu)", "pyfwht (openmp)",
                                 "hadamard-transform") if any(r["method"] == m for r in recs)]
        header = ["n", "copy floor", "ours (block)", "ours / floor",
                  "one f=16 GEMM pass (÷ floor)"] + [f"{m} (÷ ours)" for m in baselines]
        rows, sweep_rows = [], []
        for n in sizes:
            at = [r for r in recs if r["n"] == n]
            floor, ours = _get(at, "copy floor"), _get(at, "ours")
            t_floor = floor.get("best_s") if floor else None
            t_ours = ours.get("best_s") if ours else None
            flag = {True: " ‡", False: ""}
            row = [f"2^{int(math.log2(n))}",
                   fmt_ms(t_floor) + (flag[disturbed(floor)] if floor else ""),
                   f"{fmt_ms(t_ours)} ({ours['block']}){flag[disturbed(ours)]}" if ours else "–",
                   fmt_ratio(t_ours / t_floor) if t_ours and t_floor else "–",
                   _cell(_get(at, "one pass f=16"), t_floor)]
            row += [_cell(_get(at, m), t_ours) for m in baselines]
            rows.append(row)
            sweep = {b: _get(at, f"ours block={b}") for b in BLOCKS}
            if all(s is not None and "best_s" in s for s in sweep.values()):
                best = min(BLOCKS, key=lambda b: sweep[b]["best_s"])
                t_best = sweep[best]["best_s"]
                close = [str(b) for b in BLOCKS
                         if b != best and sweep[b]["best_s"] <= (1 + TIE) * t_best]
                sweep_rows.append(
                    [f"2^{int(math.log2(n))}", str(ours["block"])]
                    + [fmt_ms(sweep[b]["best_s"]) + (" ‡" if disturbed(sweep[b]) else "")
                       for b in BLOCKS]
                    + [str(best) + (f" (≈ {', '.join(close)})" if close else ""),
                       fmt_ratio(sweep[ours["block"]]["best_s"] / t_best)]
                )
        out.append(f"### {ns_name}, float32, batch {batch} (ms; in parentheses: time ÷ ours, "
                   "for the GEMM pass time ÷ floor)\n")
        out.append(markdown_table(header, rows) + "\n")
        if sweep_rows:
            out.append(f"Block sweep, {ns_name}, batch {batch} (ms; ≈ = within {TIE:.0%} of the "
                       "best):\n")
            out.append(markdown_table(
                ["n", "default block"] + [f"block {b}" for b in BLOCKS]
                + ["best block", "default / best"], sweep_rows) + "\n")
    notes = sorted({r["note"] for r in all_records if "fallback" in r.get("note", "")})
    for note in notes:
        out.append(f"† {note}\n")
    if any(disturbed(r) for r in all_records):
        out.append(f"‡ other processes used more than {DISTURBED:.0%} of a CPU during this "
                   "measurement (busy time in /proc/stat minus this process's own CPU time)\n")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="n = 2^16..2^20 only, fewer repeats (smoke run)")
    size.add_argument("--full", action="store_true",
                      help="also batch 64 at n = 2^22 (1 GiB arrays; slow baselines)")
    parser.add_argument("--namespaces", default="numpy,torch",
                        help="comma-separated subset of numpy,torch (default: both)")
    parser.add_argument("--no-dense", action="store_true",
                        help="skip the n = 2^10, 2^12 dense-matmul rows")
    add_timing_arguments(parser)
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "fwht.json",
                        help="output JSON path (default benchmarks/results/fwht.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = timing_settings(args)
    log_sizes = (16, 18, 20) if args.quick else (16, 18, 20, 22)
    batch_sizes = {1: log_sizes, 64: tuple(k for k in log_sizes if k <= 20 or args.full)}
    namespaces = []
    for name in args.namespaces.split(","):
        name = name.strip()
        if name == "numpy":
            namespaces.append(NumpyNS)
        elif name == "torch":
            importlib.import_module("torch")
            namespaces.append(TorchNS)
        else:
            raise SystemExit(f"unknown namespace {name!r} (use numpy and/or torch)")

    machine = machine_info()
    packages = probe_packages()
    print(f"# FWHT benchmark  ({machine['date']}, {machine['cpu_model']}, "
          f"{machine['usable_cpus']} CPUs, numpy {machine['numpy']}, torch {machine['torch']}, "
          f"tensoradapt {tensoradapt.__version__})", flush=True)
    git = machine["git"]
    print(f"tensoradapt checkout: commit {git.get('commit', '?')[:12]}"
          + (f", uncommitted library changes: {git['library_changes_not_committed']}"
             if git.get("library_changes_not_committed") else ""), flush=True)
    print(f"timing: {settings}", flush=True)
    rng = np.random.default_rng(args.seed)
    records: list[dict[str, Any]] = []
    start, load = time.perf_counter(), ForeignLoad()
    for ns in namespaces:
        for batch, logs in batch_sizes.items():
            cases = [] if args.no_dense else [(k, True) for k in DENSE_LOG_SIZES]
            cases += [(k, False) for k in logs]
            for k, dense in cases:
                t0 = time.perf_counter()
                recs = run_case(ns, batch, 1 << k, dense, settings, rng, args.rounds)
                records += recs
                bad = [r["method"] + ": " + r["status"] for r in recs if r["status"] != "ok"]
                bad += [r["method"] + ": disturbed" for r in recs if disturbed(r)]
                print(f"  {ns.name:5s} B={batch:<3d} n=2^{k:<2d} {time.perf_counter() - t0:6.1f} s"
                      + (f"  [{'; '.join(bad)}]" if bad else ""), file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - start
    end = end_run(load, machine)
    print()
    print(report(records))
    print(disturbance_line(elapsed, end, machine))
    write_json(args.json, {
        "benchmark": "fwht",
        "command": command_line(argv),
        "machine": machine,
        "settings": {**settings, "rel_tol": REL_TOL, "check_rows": CHECK_ROWS, "seed": args.seed,
                     "blocks": BLOCKS, "dtype": "float32", "rounds": args.rounds},
        "packages": packages,
        "elapsed_s": elapsed,
        **end,
        "results": records,
    })
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
