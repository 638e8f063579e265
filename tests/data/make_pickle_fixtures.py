"""Writes the pickle fixtures of tests/test_old_pickles.py with the code of commit 48104a3.

The committed files were made by tensoradapt at commit 48104a3, before the torch bindings v3
(issue 23) moved private classes and modules, by running this script with that commit's package
first on the path (``PYTHONPATH=<unpacked 48104a3> python tests/data/make_pickle_fixtures.py``):

* ``operators_48104a3.pkl``: ``pickle`` of a dict of operators, each holding its map cache:
  Fastfood and Shuffle with generator 1 (used: caches filled) and generator 2 (unused), and a
  generator-1 SuperLoRA plan with a Fastfood projection whose ΔW has been computed;
* ``model_superlora_48104a3.pt`` / ``model_glora_48104a3.pt``: ``torch.save`` of a dict with a
  whole tiny ``nn.Sequential`` carrying a SuperLoRA (LoRA preset) or GLoRA adapter, an input ``x``
  and the output ``y`` the model gave at save time (in eval mode: a training GLoRA
  samples its layer choice per forward).

These files are test data: the library never reads or writes pickles itself.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def operators() -> dict:
    from tensoradapt import SuperLoRA, buffers, ops, presets

    ones = np.ones(7)
    found = {}
    for number, generator in enumerate(buffers.GENERATORS, start=1):
        fastfood = ops.Fastfood(7, 100, seed=4, group=1, generator=generator)
        shuffle = ops.Shuffle(9, 3, group=2, generator=generator)
        if generator == buffers.GENERATOR_V1:  # used: caches filled (generator 2's tables are 160 kB)
            fastfood.apply(ones)
            fastfood.adjoint(np.ones(100))
            shuffle.apply(np.arange(9.0))
            shuffle.adjoint(np.arange(9.0))
        found[f"fastfood-{number}"] = fastfood
        found[f"shuffle-{number}"] = shuffle
    plan = SuperLoRA(presets.with_projection(presets.lora(2), "fastfood", ratio=0.5), [(8, 8), (8, 8)],
                     generator=buffers.GENERATOR_V1)
    params = plan.init(0, np, zero=False)
    found["plan"] = plan
    found["plan-params"] = params
    found["plan-delta"] = plan.delta(params)
    return found


def models() -> dict[str, dict]:
    import torch
    from torch import nn

    import tensoradapt.torch as tat
    from tensoradapt import GLoRAConfig, presets

    found = {}
    # a small GLoRA search space: the pickle holds every layer's space
    glora = GLoRAConfig(rank=2, A=("lora", "vector"), B=("lora",), C=("none",), D=("vector", "scalar"), E=("scalar",))
    for name, config in (("superlora", presets.lora(2)), ("glora", glora)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
        adapter = tat.attach(model, config, ["0", "2"])
        with torch.no_grad():  # a trained-looking adapter: ΔW is not zero
            for parameter in adapter.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
        model.eval()  # GLoRA samples a layer choice per forward while training
        x = torch.randn(2, 4)
        with torch.no_grad():
            found[name] = {"model": model, "x": x, "y": model(x)}
    return found


def main() -> None:
    (HERE / "operators_48104a3.pkl").write_bytes(pickle.dumps(operators(), protocol=4))
    import torch

    for name, record in models().items():
        torch.save(record, HERE / f"model_{name}_48104a3.pt", pickle_protocol=4)


if __name__ == "__main__":
    sys.exit(main())
