"""Offline analysis without training: parameter tables, fitting configurations to a given update,
and the geometry (dE, dL, dR) of each fit against that update.

The "given update" here is synthetic: for 8 query/value weights of 96×96 it is a shared low-rank
structure across layers plus a little noise, the situation where sharing parameters across weights
(SuperLoRA's grouping) should pay off.  With a real model, load dense-fine-tune updates from a
safetensors file instead (``safetensors.numpy.load_file``).

    python examples/offline_analysis.py
"""

from __future__ import annotations

import time

import numpy as np

from tensoradapt import SuperLoRA, analysis, presets

NAMES = [f"layers.{i}.attention.{kind}" for i in range(4) for kind in ("query", "value")]
SHAPES = [(96, 96)] * len(NAMES)


def synthetic_update(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    left, right = rng.standard_normal((96, 3)), rng.standard_normal((3, 96))
    out = []
    for _ in NAMES:
        mix = rng.standard_normal((3, 3))
        out.append(left @ mix @ right / 10 + 0.01 * rng.standard_normal((96, 96)))
    return out


def main() -> None:
    targets = synthetic_update()
    configs = {
        "lora r=1": presets.lora(1),
        "lora r=4": presets.lora(4),
        "lotr r=4": presets.lotr(4, num_weights=len(SHAPES)),
        "lorta M=3 r=8 G=1": presets.lorta(3, 8, 1),
        "lonkr K=2 r=4 G=1": presets.lonkr(2, 4, None, 1),
        "fastfood rho=0.1 lorta M=3 r=8": presets.with_projection(presets.lorta(3, 8, 1), "fastfood", 0.1),
    }
    print(analysis.format_count_table(SHAPES, analysis.count_table(SHAPES, configs)))
    print()
    print(f"{'configuration':<32} {'params':>7} {'rel. error':>10} {'dE':>6} {'dL':>6} {'dR':>6} {'time':>6}")
    for name, config in configs.items():
        start = time.perf_counter()
        result = analysis.fit(config, SHAPES, targets, names=NAMES, steps=150)
        fitted = SuperLoRA(config, SHAPES, NAMES).delta(result.params)
        records = analysis.compare(fitted, targets, names=NAMES, k=3)
        mean = {key: float(np.mean([getattr(r, key) for r in records])) for key in ("dE", "dL", "dR")}
        print(f"{name:<32} {result.num_params:>7,} {result.relative_error:>10.4f} {mean['dE']:>6.3f} "
              f"{mean['dL']:>6.3f} {mean['dR']:>6.3f} {time.perf_counter() - start:>5.1f}s")
    print(f"\nper kind ({name}):")
    for kind, summary in analysis.aggregate_by_kind(records).items():
        print(f"  {kind:<6} {summary.count} weights  dE {summary.dE:.3f}  dL {summary.dL:.3f}  dR {summary.dR:.3f}")


if __name__ == "__main__":
    main()
