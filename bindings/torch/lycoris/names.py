"""Kohya names both ways: a module path as ``<prefix>_<path with . → _>`` (:func:`kohya_names`),
and every name a model's modules may have in a file (:func:`name_table`)."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from ..modules import plain_named_modules
from ..targets import is_diffusers_model

#: The key prefixes kohya-style files use: the denoiser (``lora_unet``; ``lora_transformer`` for
#: diffusers-named DiT weights, OneTrainer's and ComfyUI's name), the text encoders (``lora_te``;
#: ``lora_te1``/``lora_te2``/``lora_te3`` with several) and LyCORIS's own wrapper (``lycoris``).
KOHYA_PREFIXES = ("lora_unet", "lora_transformer", "lora_te", "lora_te1", "lora_te2", "lora_te3", "lycoris")
#: The kohya prefix of each diffusers pipeline component, for a model holding them as children.
_COMPONENTS = {"unet": "lora_unet", "transformer": "lora_transformer", "text_encoder": "lora_te",
               "text_encoder_2": "lora_te2", "text_encoder_3": "lora_te3"}
_PREFIX_RULE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def kohya_prefix(model: nn.Module) -> str:
    """The key prefix a kohya file uses for a whole ``model``: ``"lora_transformer"`` for a diffusers
    transformer (SD3, Flux, PixArt, …), ``"lora_unet"`` for any other diffusers model, ``"lora_te"``
    for a transformers model (a text encoder), else ``"lora_unet"``."""
    if is_diffusers_model(model):
        return "lora_transformer" if "Transformer" in type(model).__name__ else "lora_unet"
    if any(cls.__name__ == "PreTrainedModel" for cls in type(model).__mro__):
        return "lora_te"
    return "lora_unet"


def check_prefix(prefix: Any) -> str | None:
    """``prefix`` checked: None, or letters, digits and underscores starting with a letter."""
    if prefix is None:
        return None
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a string or None, got {type(prefix).__name__}")
    if not _PREFIX_RULE.fullmatch(prefix):
        raise ValueError(f"prefix={prefix!r:.60} must be letters, digits and underscores (e.g. 'lora_unet', "
                         f"'lora_te1'); known prefixes: {', '.join(KOHYA_PREFIXES)}")
    return prefix


def kohya_names(model: nn.Module | None, names: list[str], prefix: str | None = None) -> dict[str, str]:
    """``{module name: kohya name}`` for the modules ``names`` of ``model``.

    ``prefix`` (e.g. ``"lora_te1"``) applies to every module; without it a model whose children are
    diffusers pipeline components (``unet``, ``transformer``, ``text_encoder``, ``text_encoder_2``,
    ``text_encoder_3``) names each module by its component (``text_encoder`` is ``lora_te1`` beside a
    ``text_encoder_2``) relative to that component, and any other model by :func:`kohya_prefix`.
    ``ValueError`` when two modules would get one name (``a_b.c`` and ``a.b_c``)."""
    out: dict[str, str] = {}
    children = dict(model.named_children()) if model is not None else {}
    components = {k: v for k, v in _COMPONENTS.items() if k in children} if prefix is None else {}
    if "text_encoder" in components and "text_encoder_2" in components:
        components["text_encoder"] = "lora_te1"
    whole = prefix or (kohya_prefix(model) if model is not None else "lora_unet")
    for name in names:
        head, _, rest = name.partition(".")
        if head in components and rest:
            out[name] = f"{components[head]}_{rest.replace('.', '_')}"
        else:
            out[name] = f"{whole}_{name.replace('.', '_')}"
    seen: dict[str, str] = {}
    for name, key in out.items():
        if key in seen:
            raise ValueError(f"modules {seen[key]!r} and {name!r} both have the kohya name {key!r} ('.' becomes "
                             "'_'); a kohya file cannot tell them apart: adapt only one of them")
        seen[key] = name
    return out


def name_table(model: nn.Module, prefix: str | None) -> dict[str, str | None]:
    """``{kohya name: module name}`` of every module, under every known prefix (or ``prefix``); a
    name two modules share maps to None (ambiguous)."""
    names = [n for n, _ in plain_named_modules(model) if n]
    table: dict[str, str | None] = {}

    def add(key: str, name: str) -> None:
        table[key] = name if table.get(key, name) == name else None

    for name in names:
        for p in (prefix,) if prefix is not None else KOHYA_PREFIXES:
            add(f"{p}_{name.replace('.', '_')}", name)
    if prefix is None:  # a model of pipeline components: each names its modules by its own prefix
        for name in names:
            try:
                add(kohya_names(model, [name])[name], name)
            except ValueError:  # pragma: no cover - one name cannot collide with itself
                pass
    return table
