"""Writes the generator-1 adapter fixtures of tests/test_generator_files.py.

The committed files were written by tensoradapt before generator 2 became the default (commit
4cad27c, ``python tests/data/make_v1_fixtures.py``), when ``attach`` had no ``generator=`` option
and every file was made with generator 1.  The test rebuilds the same adapters with
``generator=GENERATOR_V1`` and checks that they equal these files, and that loading the files
reproduces the stored ``ΔW`` bit for bit.  Rerunning this script today passes ``generator=`` explicitly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


class Tiny(nn.Module):
    """Two linear layers: targets ``up`` ``(8, 6)`` and ``down`` ``(5, 8)``."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 8)
        self.down = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def configs():
    from tensoradapt import presets

    base = presets.lorta(3, 2, 2)
    return {"fastfood": presets.with_projection(base, "fastfood", 0.5),
            "shuffle": presets.with_projection(base, "shuffle")}


def build(kind: str, model: nn.Module | None = None, **options):
    """The fixture adapter ``kind`` on ``model`` (default a fresh :class:`Tiny`), with exact,
    non-zero parameters."""
    import tensoradapt.torch as tat

    adapter = tat.attach(Tiny() if model is None else model, configs()[kind], ["up", "down"], **options)
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(adapter.params.items())):
            values = (torch.arange(p.numel(), dtype=torch.float64) * 7 + 3 * i) % 11 - 5
            p.copy_((values / 8).reshape(p.shape))
    return adapter


def main(folder: Path = HERE) -> None:
    import safetensors.torch

    from tensoradapt import buffers

    options = {"generator": buffers.GENERATOR_V1} if buffers.GENERATOR_ID != buffers.GENERATOR_V1 else {}
    for kind in configs():
        adapter = build(kind, **options)
        adapter.save(folder / f"{kind}_v1.safetensors")
        deltas = {name: d.contiguous() for name, d in adapter.deltas().items()}
        safetensors.torch.save_file(deltas, str(folder / f"{kind}_v1_delta.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
