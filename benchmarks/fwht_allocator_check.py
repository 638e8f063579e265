"""Diagnostic: how much of an FWHT call is page faults of freshly allocated intermediates.

Each configuration runs in a **fresh Python process** that calls ``tensoradapt.ops.fwht`` (and,
for comparison, one copy of the same array) repeatedly on one input of shape ``(1, n)``, and
reports the best and median time per call and the minor page faults per call (``getrusage``).
Every configuration is run twice: with the default glibc ``malloc`` settings, and with
``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_THRESHOLD_`` raised to 1 GB, so that freed
intermediates stay mapped and are reused instead of being returned to the kernel and faulted in
again on the next allocation.

Usage::

    python benchmarks/fwht_allocator_check.py              # n = 2^18, 2^20, 2^22
    python benchmarks/fwht_allocator_check.py --log2n 20   # one size

Results go to stdout (markdown) and ``benchmarks/results/fwht_allocator.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from _common import RESULTS_DIR, fmt_ms, machine_info, markdown_table, write_json

NO_TRIM = {"MALLOC_TRIM_THRESHOLD_": "1000000000", "MALLOC_MMAP_THRESHOLD_": "1000000000"}


def child(namespace: str, log2n: int, calls: int) -> dict[str, Any]:
    """Runs inside the fresh process: time ours and a copy, count page faults."""
    import resource
    import statistics
    import time

    import numpy as np

    from tensoradapt.ops import fwht

    x = np.random.default_rng(0).standard_normal((1, 1 << log2n), dtype=np.float32)
    if namespace == "torch":
        import torch

        x = torch.from_numpy(x)
        copy = x.clone
    else:
        copy = x.copy
    out = {}
    for label, fn in (("ours", lambda: fwht(x)), ("copy", copy)):
        fn()
        times = []
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        out[label] = {"best_s": min(times), "median_s": statistics.median(times),
                      "minor_faults_per_call": faults / calls, "calls": calls}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log2n", type=int, nargs="*", default=[18, 20, 22],
                        help="sizes as log2 n (default 18 20 22)")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per process")
    parser.add_argument("--namespaces", default="numpy,torch")
    parser.add_argument("--child", nargs=2, metavar=("NAMESPACE", "LOG2N"), help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "fwht_allocator.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.calls)))
        return 0
    rows, records = [], []
    for ns in args.namespaces.split(","):
        for k in args.log2n:
            for setting, extra in (("default malloc", {}), ("no trim/mmap", NO_TRIM)):
                env = {**os.environ, **extra}
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", ns, str(k), "--calls", str(args.calls)],
                    env=env, capture_output=True, text=True, check=True,
                )
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                records.append({"namespace": ns, "log2n": k, "malloc": setting, **res})
                ours, copy = res["ours"], res["copy"]
                rows.append([ns, f"2^{k}", setting, fmt_ms(ours["best_s"]),
                             fmt_ms(ours["median_s"]), f"{ours['minor_faults_per_call']:.0f}",
                             fmt_ms(copy["best_s"]), f"{copy['minor_faults_per_call']:.0f}"])
                print(f"  {ns} 2^{k} {setting}: ours {fmt_ms(ours['best_s'])} ms", file=sys.stderr,
                      flush=True)
    print(markdown_table(["namespace", "n", "malloc", "ours best (ms)", "ours median (ms)",
                          "ours faults/call", "copy best (ms)", "copy faults/call"], rows))
    write_json(args.json, {"benchmark": "fwht_allocator", "machine": machine_info(),
                           "no_trim_env": NO_TRIM, "calls": args.calls, "results": records})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
