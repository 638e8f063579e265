"""Reading a PEFT ``adapter_config.json``: strict JSON, the PEFT type, every option either read
(and type-checked), harmless for the adapted model's eval outputs, or refused with its name."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from tensoradapt.superlora.config import MAX_RANK

from ..files.layout import AdapterFileError
from ..files.read import read_json_file
from .codecs import CODECS
from .layout import MAX_CONFIG_BYTES, PEFT_CONFIG_FILE

#: Options that do not change the adapted model's outputs in eval mode (or that the tensors decide).
_HARMLESS = {"peft_type", "base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version",
             "auto_mapping", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
             "init_lora_weights", "init_weights", "lora_dropout", "rank_dropout", "module_dropout",
             "rank_dropout_scale", "megatron_core", "qalora_group_size", "fan_in_fan_out", "ensure_weight_tying",
             "use_effective_conv2d", "bias"}


def _number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _peft_data(folder: Path) -> tuple[dict[str, Any], str]:
    """The config object of ``folder`` and its PEFT type (one tensoradapt imports)."""
    path = folder / PEFT_CONFIG_FILE
    where = repr(str(path))
    if not path.exists():
        raise FileNotFoundError(f"no PEFT adapter config at {str(path)!r}")
    data = read_json_file(path, max_bytes=MAX_CONFIG_BYTES)  # the limits of our own metadata (tensoradapt._json)
    if not isinstance(data, dict):
        raise AdapterFileError(f"{where} is corrupted: the config is {type(data).__name__}, not an object")
    if data.get("library") == "tensoradapt" or "peft_type" not in data:
        raise AdapterFileError(f"{where} is not a PEFT adapter config (no peft_type); a tensoradapt folder loads "
                               "with tensoradapt.torch.load")
    peft_type = data["peft_type"]
    if not isinstance(peft_type, str) or peft_type not in CODECS:
        raise AdapterFileError(f"{where}: peft_type {peft_type!r:.40} is not one tensoradapt imports "
                               f"({', '.join(CODECS)})")
    return data, peft_type


def _check_unread(data: dict[str, Any], read: Any, where: str) -> None:
    """Refuse every option set to something that changes the outputs and that is not read."""
    for key, value in data.items():
        if key in read or value in (None, False, [], {}, ""):
            continue
        if key in ("init_lora_weights", "init_weights") and value not in (True, "gaussian", "lycoris"):
            raise AdapterFileError(f"{where}: {key}={value!r:.40} initialises the adapter from the base weights (and "
                                   "may change them); import_peft reads adapters trained on the unchanged base only")
        if key == "bias" and value != "none":
            raise AdapterFileError(f"{where}: bias={value!r:.40} trains the base layers' biases; tensoradapt imports "
                                   "bias='none' adapters only")
        if key not in _HARMLESS:
            raise AdapterFileError(f"{where}: the PEFT option {key}={value!r:.60} is not supported by import_peft "
                                   "(no tensoradapt adapter reproduces it exactly)")


def _check_value(key: str, value: Any, where: str) -> None:
    """Refuse a read option of the wrong type or range."""
    if key == "r" and (type(value) is not int or value < 1):
        raise AdapterFileError(f"{where}: r is {value!r:.40}, not a positive integer")
    if key == "r" and value > MAX_RANK:
        raise AdapterFileError(f"{where}: r is {value:.3g}, above the largest tensoradapt rank {MAX_RANK}")
    if key in ("lora_alpha", "alpha") and not _number(value):
        raise AdapterFileError(f"{where}: {key} is {value!r:.40}, not a finite number")
    if key in ("use_rslora", "decompose_both") and type(value) is not bool:
        raise AdapterFileError(f"{where}: {key} is {value!r:.40}, not true or false")
    if key == "decompose_factor" and (type(value) is not int or (value < 1 and value != -1)):
        raise AdapterFileError(f"{where}: decompose_factor is {value!r:.40}, not -1 or a positive integer")
    if key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(value, dict) or not all(isinstance(k, str) and _number(v) for k, v in value.items()):
            raise AdapterFileError(f"{where}: {key} is {value!r:.60}, not an object of numbers")
        if key == "rank_pattern" and not all(type(v) is int and 1 <= v <= MAX_RANK for v in value.values()):
            raise AdapterFileError(f"{where}: rank_pattern is {value!r:.60}, not an object of integers in "
                                   f"[1, {MAX_RANK}]")
        # judged per adapted module in import_peft (the codecs' decode): only the values applied matter
    if key.startswith("config_") and not isinstance(value, str):
        raise AdapterFileError(f"{where}: {key} is {value!r:.40}, not a string")


def read_config(folder: Path) -> dict[str, Any]:
    """The options of ``folder``'s PEFT config its codec reads (PEFT's defaults filled in), checked,
    plus ``"peft_type"``; an :class:`AdapterFileError` for anything else that matters."""
    data, peft_type = _peft_data(folder)
    where = repr(str(folder / PEFT_CONFIG_FILE))
    codec = CODECS[peft_type]
    _check_unread(data, codec.OPTIONS, where)
    out = {k: data.get(k, default) for k, default in codec.OPTIONS.items()}
    for key, value in out.items():
        _check_value(key, value, where)
    check = getattr(codec, "check_options", None)
    if check is not None:
        check(out, where)
    for value in (out.get("rank_pattern", {}), out.get("alpha_pattern", {})):
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as error:
                raise AdapterFileError(f"{where}: pattern {pattern!r:.60} is not a regular expression "
                                       f"({error})") from None
    out["peft_type"] = peft_type
    return out
