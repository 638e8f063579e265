"""FWHT at n = 2^20, batch 1: ours against the copy floor (float32) and against pyfwht's CPU
backend (float64), side by side in one process.

Run with the machine's OpenBLAS pins removed for this command only, e.g.::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_fwht_floor.py

The OpenBLAS kernel that ran (``threadpoolctl``'s ``architecture``) and the environment are
recorded.  Timing: interleaved rounds, best call of each; the ratios compare numbers taken in the
same rounds.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np
from _common import RESULTS_DIR, machine_info, write_json

from tensoradapt import ops
from tensoradapt._backend import compat_namespace
from tensoradapt.ops.fwht import fwht_inplace, fwht_last


def _refill(work: np.ndarray, x: np.ndarray) -> np.ndarray:
    np.copyto(work, x)
    return work


def _best(fn: Any, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2n", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    n = 1 << args.log2n
    xp = compat_namespace(np)
    rng = np.random.default_rng(0)
    try:
        import threadpoolctl

        blas = [{k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"]
    except ImportError:
        blas = []
    try:
        import pyfwht
    except ImportError:
        pyfwht = None
    results: dict[str, dict[str, list[float]]] = {}
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal(n).astype(dtype)
        work = x.copy()
        ref = fwht_last(xp, x.astype(np.float64))
        check = ops.fwht(x)
        assert np.linalg.norm(check - ref) <= 1e-5 * np.linalg.norm(ref)
        cases: dict[str, Any] = {
            "copy floor": lambda x=x: x.copy(),
            "ours fwht(x)": lambda x=x: ops.fwht(x),
            "ours out-of-place passes": lambda x=x: fwht_last(xp, x),
        }
        # in-place cases refill their buffer first (repeated transforms would overflow): copy included
        for block in (8, 16, 32):
            cases[f"copy + ours in place, block {block}"] = (
                lambda work=work, x=x, block=block: fwht_inplace(xp, _refill(work, x), block))
        if pyfwht is not None and dtype == np.float64:
            got = x.copy()
            returned = pyfwht.transform(got, backend=pyfwht.Backend.CPU)  # in place (returns None)
            got = got if returned is None else returned
            assert np.allclose(got, ref, rtol=1e-9, atol=1e-6 * np.abs(ref).max())
            cases["copy + pyfwht CPU (in place)"] = (
                lambda work=work, x=x: pyfwht.transform(_refill(work, x), backend=pyfwht.Backend.CPU))
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, fn in cases.items():
                fn()
                times[name].append(_best(fn, args.reps))
        results[np.dtype(dtype).name] = times
        floor = min(times["copy floor"])
        print(f"{np.dtype(dtype).name}, n = 2^{args.log2n}, batch 1 (best of {args.rounds} rounds × {args.reps})")
        for name, values in times.items():
            print(f"  {name:32} {min(values) * 1e3:9.3f} ms  {min(values) / floor:7.2f}x floor")
    env = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS")}
    print("blas:", blas, "env:", env)
    write_json(RESULTS_DIR / "fwht_floor.json", {"benchmark": "fwht_floor", "machine": machine_info(),
                                                 "blas": blas, "env": env, "results": results})


if __name__ == "__main__":
    main()
