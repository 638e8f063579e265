r"""What every PEFT adapter folder shares, whatever its method: file names, tensor keys, the
``target_modules`` / ``rank_pattern`` / ``alpha_pattern`` rules (both ways) and the layers PEFT's
methods adapt.

A PEFT folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module>.<tensor>``.  ``target_modules`` is written as one anchored regular
expression and each pattern key as ``^<escaped module name>``, so PEFT selects exactly the
written modules; reading, a pattern applies to ``module`` when
``re.match(rf"(.*\.)?({key})$", module)`` (PEFT's rule), the first matching key winning.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .source import Source, Target

#: The config file of a PEFT adapter folder.
PEFT_CONFIG_FILE = "adapter_config.json"
#: Largest ``adapter_config.json`` :func:`~tensoradapt.torch.import_peft` reads (PEFT's are a few KiB).
MAX_CONFIG_BYTES = 1 << 20
#: The key prefix of every tensor of a PEFT folder.
PREFIX = "base_model.model."


def tensor_key(module: str, suffix: str) -> str:
    """The safetensors key of tensor ``suffix`` (e.g. ``"lora_A.weight"``) of ``module``."""
    return f"{PREFIX}{module}.{suffix}"


def modules_list(source: Source) -> str:
    """``target_modules``: the regular expression matching exactly the target names (PEFT
    ``re.fullmatch``-es a string; a list would select ``name`` and every ``*.name``, which from a
    file, without the model, cannot be ruled out)."""
    return "^(?:" + "|".join(re.escape(t.name) for t in source.targets) + ")$"


def pattern_key(name: str) -> str:
    """A ``rank_pattern`` / ``alpha_pattern`` key selecting exactly the module ``name`` (PEFT matches
    keys as ``re.match(rf"(.*\\.)?({key})$", module)``; the anchor rules out every longer name)."""
    return "^" + re.escape(name)


def patterns(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """The pattern (``{key: value}``) of the modules whose value differs from ``default``."""
    return {pattern_key(n): v for n, v in values.items() if v != default}


def pattern_value(table: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key ``k`` with
    ``re.match(rf"(.*\\.)?({k})$", module)``, else ``default``."""
    for key, value in table.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def most_common(values: Sequence[Any]) -> Any:
    """The most frequent of ``values`` (the earliest among equally frequent ones)."""
    counts: dict[Any, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda v: (counts[v], -values.index(v)))


def base_config(peft_type: str, source: Source) -> dict[str, Any]:
    """The options every PEFT config written here shares (the targets selected exactly)."""
    return {"peft_type": peft_type, "task_type": None, "inference_mode": True, "revision": None,
            "target_modules": modules_list(source), "exclude_modules": None, "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None}


def divisors(n: int) -> list[int]:
    """The divisors of ``n >= 1`` in increasing order."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def check_layer(target: Target, method: str, hint: str, *, lora: bool) -> None:
    """Refuse a target PEFT's ``method`` (``"LoRA"``, ``"LoKr"``, ``"LoHa"``) does not adapt, or
    adapts with other outputs than ours (padding modes; LoRA on grouped or dilated convolutions)."""
    module = target.module
    if target.layer == "conv1d" and method != "LoRA":
        raise ValueError(f"PEFT's {method} supports nn.Linear, nn.Conv1d and nn.Conv2d; target {target.name!r} is a "
                         f"transformers Conv1D; " + hint)
    if target.layer == "embedding" and method != "LoRA":
        raise ValueError(f"PEFT's {method} does not adapt embeddings (target {target.name!r}); " + hint)
    if target.layer != "conv":
        return
    if method != "LoRA" and len(target.weight_shape) not in (3, 4):
        raise ValueError(f"PEFT's {method} supports nn.Conv1d and nn.Conv2d; target {target.name!r} has weight shape "
                         f"{target.weight_shape}; " + hint)
    if module is None:
        return
    if module.padding_mode != "zeros":
        raise ValueError(f"target {target.name!r} pads with padding_mode={module.padding_mode!r}, but PEFT's {method} "
                         "computes its update with zero padding, so the outputs would differ")
    if lora and (module.groups != 1 or any(d != 1 for d in module.dilation)):
        raise ValueError(f"target {target.name!r} has groups={module.groups}, dilation={module.dilation}: PEFT's LoRA "
                         "conv layers run lora_A without the layer's groups and dilation, so no PEFT LoRA reproduces "
                         "its update; only groups=1, dilation=1 convolutions can be exported as LoRA")
