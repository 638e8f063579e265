"""ΔW generation (forward ``delta`` + ``vjp``) of SuperLoRA configurations: time and peak memory.

For each configuration on the target shapes, measures (NumPy, float32):

* forward time (``SuperLoRA.delta``) and VJP time (``SuperLoRA.vjp`` with a random cotangent);
* peak extra memory during each, from ``tracemalloc`` (NumPy reports its allocations to it),
  relative to the size of the generated ΔW (``N`` entries × 4 bytes).  The forward figure
  includes the returned ΔW itself, so 1.0 means "nothing but the output"; the VJP figure counts
  everything allocated beyond the parameters and the given cotangents.

Run ``python benchmarks/bench_superlora.py`` (ViT-Base q/v: 24 × 768²) and add ``--7b`` for 7B
q/v shapes (64 × 4096², about 4.3 GB per ΔW in float32; needs ~16 GB of memory).
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc
from typing import Any

import numpy as np
from _common import RESULTS_DIR, best_time, fmt_ms, machine_info, markdown_table, write_json

from tensoradapt import SuperLoRA, presets


def _configs(count: int) -> list[tuple[str, Any]]:
    return [
        ("lora r=8 (weight-wise)", presets.lora(8)),
        ("lorta M=3 r=4 G=1", presets.lorta(3, 4, 1)),
        ("lorta M=4 r=4 G=1", presets.lorta(4, 4, 1)),
        ("lorta M=5 r=4 G=1", presets.lorta(5, 4, 1)),
        ("lonkr K=3 f=6 r=4 G=1", presets.lonkr(3, 4, 6, 1)),
        ("fastfood rho=0.01 lorta M=3 r=4 G=1" if count <= 24 else "fastfood rho=0.01 lorta M=3 r=4 G=weight",
         presets.with_projection(presets.lorta(3, 4, 1 if count <= 24 else "weight"), "fastfood", 0.01)),
    ]


def _peak_extra(fn: Any) -> int:
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    result = fn()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del result
    return peak


def run(label: str, shapes: list[tuple[int, int]], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for name, config in _configs(len(shapes)):
        if args.only and args.only not in name:
            continue
        plan = SuperLoRA(config, shapes)
        params = plan.init(0, zero=False)
        total_bytes = plan.grouping.total * 4
        start = time.perf_counter()
        deltas = plan.delta(params)  # builds the cached projection operators once
        first_call = time.perf_counter() - start
        del deltas
        rng = np.random.default_rng(0)
        cots = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
        timing = {"min_time": args.min_time, "min_reps": 2, "max_time": args.max_time}
        fwd = best_time(lambda plan=plan, params=params: plan.delta(params), **timing)
        bwd = best_time(lambda plan=plan, params=params, cots=cots: plan.vjp(params, cots), **timing)
        fwd_peak = _peak_extra(lambda plan=plan, params=params: plan.delta(params))
        bwd_peak = _peak_extra(lambda plan=plan, params=params, cots=cots: plan.vjp(params, cots))
        row = {"shapes": label, "config": name, "params": plan.num_params, "N": plan.grouping.total,
               "first_call_s": first_call, "forward": fwd, "vjp": bwd,
               "forward_peak_ratio": fwd_peak / total_bytes, "vjp_peak_ratio": bwd_peak / total_bytes}
        rows.append(row)
        print(f"{label:8} {name:42} params {plan.num_params:>10,}  fwd {fmt_ms(fwd['best_s']):>10} ms  "
              f"vjp {fmt_ms(bwd['best_s']):>10} ms  peak fwd {row['forward_peak_ratio']:.2f}x  "
              f"vjp {row['vjp_peak_ratio']:.2f}x", flush=True)
        del cots, params, plan
        gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--7b", dest="seven_b", action="store_true", help="also run 64 x 4096^2 (7B q/v)")
    parser.add_argument("--only", default="", help="run only the configurations whose name contains this")
    parser.add_argument("--min-time", type=float, default=0.5)
    parser.add_argument("--max-time", type=float, default=5.0)
    args = parser.parse_args()
    rows = run("ViT-B", [(768, 768)] * 24, args)
    if args.seven_b:
        rows += run("7B", [(4096, 4096)] * 64, args)
    header = ["shapes", "config", "params", "forward ms", "VJP ms", "peak fwd / |ΔW|", "peak VJP / |ΔW|"]
    table = [[r["shapes"], r["config"], f"{r['params']:,}", fmt_ms(r["forward"]["best_s"]),
              fmt_ms(r["vjp"]["best_s"]), f"{r['forward_peak_ratio']:.2f}", f"{r['vjp_peak_ratio']:.2f}"]
             for r in rows]
    print()
    print(markdown_table(header, table))
    write_json(RESULTS_DIR / "superlora.json", {"benchmark": "superlora", "machine": machine_info(),
                                                "results": rows})


if __name__ == "__main__":
    main()
