"""What a codec's decode hands :func:`~tensoradapt.torch.import_peft`: the tensoradapt config to
attach and how to fill the attached adapter from the folder's tensors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tensoradapt import SuperLoRA, SuperLoRAConfig

from ..files.layout import AdapterFileError
from ..lifecycle import BaseAdapter

#: ``{parameter name: (builder(tensors) -> value, shape)}``: each SuperLoRA parameter from the file.
Values = dict[str, tuple[Callable[[dict[str, torch.Tensor]], torch.Tensor], tuple[int, ...]]]


@dataclass(frozen=True)
class Decoded:
    """A checked PEFT adapter: ``config`` to attach, ``fill(adapter, tensors)`` to copy its values
    in (the caller detaches the adapter when it fails)."""

    config: Any
    fill: Callable[[BaseAdapter, dict[str, torch.Tensor]], None]


def plan_decoded(cfg: SuperLoRAConfig, values: Values, views: Sequence[Any], names: Sequence[str], where: str,
                 peft_type: str, r: int) -> Decoded:
    """The decoded SuperLoRA adapter of ``values``, after checking that the plan ``cfg`` makes on
    the modules has exactly those parameter shapes."""
    try:
        plan = SuperLoRA(cfg, [v.shape for v in views], list(names))
    except (TypeError, ValueError, OverflowError) as error:
        raise AdapterFileError(f"{where}: its {peft_type} config makes no tensoradapt plan ({error})") from None
    expected = plan.parameter_shapes()
    shapes = {k: tuple(v[1]) for k, v in values.items()}
    if shapes != {k: tuple(s) for k, s in expected.items()}:
        raise AdapterFileError(f"{where}: the {peft_type} tensors do not fit the tensoradapt plan of r={r}")

    def fill(adapter: BaseAdapter, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for pname, (build, _) in values.items():
                adapter.params[pname.replace(".", "__")].copy_(build(tensors))

    return Decoded(cfg, fill)


def need(entries: dict[str, dict[str, tuple[int, ...]]], module: str, suffixes: Sequence[str],
         where: str) -> dict[str, tuple[int, ...]]:
    """``module``'s ``{suffix: shape}``, refused unless it holds exactly ``suffixes``."""
    got = entries[module]
    if set(got) != set(suffixes):
        raise AdapterFileError(f"{where}: module {module!r} has tensors {sorted(got)}, expected {sorted(suffixes)}")
    return got


def padded_to(x: torch.Tensor, R: int, fold: float = 1.0) -> torch.Tensor:
    """``fold · x`` with zero columns appended up to ``R`` (a smaller rank inside a rank-``R`` plan;
    the zero columns stay zero in training: their gradients vanish)."""
    x = x * fold if fold != 1.0 else x
    return nn.functional.pad(x, (0, R - x.shape[1])) if x.shape[1] < R else x
