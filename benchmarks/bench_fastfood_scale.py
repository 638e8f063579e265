"""Fastfood ΔW generation at scale with generator 2 (counter-based maps, O(1) state): time and peak.

For each configuration (NumPy, float32) runs one forward ``SuperLoRA.delta`` and one
``SuperLoRA.vjp`` (a random cotangent), after one warm-up forward of the same plan, and records:

* wall time of each call;
* peak extra memory from ``tracemalloc`` relative to the generated ΔW (``N × 4`` bytes); the
  forward figure includes the returned ΔW (1.00 = nothing but the output), the VJP figure counts
  everything beyond the parameters and the given cotangents;
* the process's peak RSS (``ru_maxrss``) and the RSS before the call.

Materialised device buffers are off (``device_buffer_budget(0)``): the operators hold three keys
each.  ``--vit`` runs ViT-Base q/v (24 × 768²), ``--7b`` runs 64 × 4096² (4.3 GB of ΔW; about
13 GB of memory in all), ``--generator 1`` the old host buffers for comparison (ViT only).
"""

from __future__ import annotations

import argparse
import gc
import resource
import time
import tracemalloc
from typing import Any

import numpy as np
from _common import RESULTS_DIR, machine_info, write_json

from tensoradapt import SuperLoRA, buffers, presets
from tensoradapt.ops.projection import device_buffer_budget


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20


def _measure(fn: Any) -> tuple[float, int, Any]:
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return elapsed, peak, result


def run(label: str, shapes: list[tuple[int, int]], configs: list[tuple[str, Any]], generator: str,
        warm: bool) -> list[dict[str, Any]]:
    rows = []
    for name, config in configs:
        plan = SuperLoRA(config, shapes, generator=generator)
        params = plan.init(0, zero=False)
        total_bytes = plan.grouping.total * 4
        if warm:
            deltas = plan.delta(params)
            del deltas
        rss0 = _rss_mib()
        fwd_s, fwd_peak, deltas = _measure(lambda plan=plan, params=params: plan.delta(params))
        del deltas
        rng = np.random.default_rng(0)
        cots = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
        rss1 = _rss_mib()
        bwd_s, bwd_peak, grads = _measure(lambda plan=plan, params=params, cots=cots: plan.vjp(params, cots))
        del grads, cots
        row = {"shapes": label, "config": name, "generator": generator, "params": plan.num_params,
               "N": plan.grouping.total, "groups": len(plan.groups),
               "L": [plan.group_projection(g).length for g in range(min(len(plan.groups), 1))],
               "state_bytes_per_group": plan.group_projection(0).state_bytes,
               "forward_s": fwd_s, "vjp_s": bwd_s,
               "forward_peak_ratio": fwd_peak / total_bytes, "vjp_peak_ratio": bwd_peak / total_bytes,
               "rss_before_forward_mib": rss0, "rss_before_vjp_mib": rss1,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        rows.append(row)
        print(f"{label:6} {name:48} fwd {fwd_s:8.2f} s  vjp {bwd_s:8.2f} s  peak fwd "
              f"{row['forward_peak_ratio']:.2f}x vjp {row['vjp_peak_ratio']:.2f}x  ΔW {total_bytes / 2**30:.2f} GiB  "
              f"peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)
        del params, plan
        gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vit", action="store_true")
    parser.add_argument("--7b", dest="seven_b", action="store_true")
    parser.add_argument("--generator", choices=("1", "2"), default="2")
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    generator = buffers.GENERATOR_V2 if args.generator == "2" else buffers.GENERATOR_V1
    device_buffer_budget(0)
    rows = []
    if args.vit:
        ff = presets.with_projection
        configs = [("fastfood rho=0.01 lorta M=3 r=4 G=1", ff(presets.lorta(3, 4, 1), "fastfood", 0.01)),
                   ("fastfood rho=0.1 lorta M=3 r=4 G=1", ff(presets.lorta(3, 4, 1), "fastfood", 0.1)),
                   ("fastfood rho=0.01 lorta M=3 r=8 G=24", ff(presets.lorta(3, 8, 24), "fastfood", 0.01))]
        rows += run("ViT-B", [(768, 768)] * 24, [c for c in configs if args.only in c[0]], generator, True)
    if args.seven_b:
        ff = presets.with_projection
        configs = [("fastfood rho=0.01 lorta M=3 r=8 G=64", ff(presets.lorta(3, 8, 64), "fastfood", 0.01)),
                   ("fastfood rho=0.01 lorta M=3 r=8 G=1", ff(presets.lorta(3, 8, 1), "fastfood", 0.01))]
        rows += run("7B", [(4096, 4096)] * 64, [c for c in configs if args.only in c[0]], generator, False)
    write_json(RESULTS_DIR / f"fastfood_scale_g{args.generator}.json",
               {"benchmark": "fastfood_scale", "machine": machine_info(), "results": rows})


if __name__ == "__main__":
    main()
