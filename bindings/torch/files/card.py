"""The ``README.md`` model card of an adapter folder (Hugging Face front matter, then the facts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["base_model_record", "is_our_card", "model_card"]

_CARD_MARK = "library_name: tensoradapt"  # the front-matter line that marks a README.md as ours


def base_model_record(model: nn.Module) -> dict[str, str]:
    """``{"name_or_path": …, "commit": …}`` of a transformers model's config (the keys it records,
    non-empty strings only; ``{}`` for a model built from a config or a plain module)."""
    config = getattr(model, "config", None)
    record = {}
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    if isinstance(name, str) and name:
        record["name_or_path"] = name
    commit = getattr(config, "_commit_hash", None)
    if isinstance(commit, str) and commit:
        record["commit"] = commit
    return record


def is_our_card(path: Path) -> bool:
    """Whether the ``README.md`` at ``path`` is a card this library wrote (its front matter says so)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    return head.startswith("---\n") and _CARD_MARK in head.split("\n---", 1)[0]


def model_card(metadata: dict[str, Any]) -> str:
    """The ``README.md`` of an adapter folder: Hugging Face front matter (``library_name``, tags,
    ``base_model`` when known), the method, the trainable parameters, the targets and how to load."""
    def count(shape: list[int]) -> int:
        total = 1
        for d in shape:
            total *= d
        return total

    method = metadata["method"]
    base = (metadata.get("base_model") or {}).get("name_or_path")
    trainable = sum(count(s) for s in metadata["parameters"].values())
    saved = metadata.get("modules_to_save") or []
    saved_count = sum(count(s) for r in saved for s in r["parameters"].values())
    targets = metadata["targets"]
    lines = ["---", _CARD_MARK, "tags:", "- tensoradapt", f"- {method}"]
    if base:
        lines.append(f"base_model: {json.dumps(base)}")
    lines += ["---", "", f"# {method} adapter (tensoradapt {metadata['library_version']})", ""]
    lines.append(f"- method: `{method}`, config: `{json.dumps(metadata['config'], sort_keys=True)}`")
    lines.append(f"- trainable parameters: {trainable:,} in {len(metadata['parameters'])} tensors"
                 + (f", plus {saved_count:,} in modules_to_save {[r['name'] for r in saved]}" if saved else ""))
    if base:
        lines.append(f"- base model: `{base}`" + (f" (commit `{metadata['base_model']['commit']}`)"
                                                   if "commit" in metadata["base_model"] else ""))
    lines.append(f"- targets ({len(targets)}, the adapted (o, n) matrices):")
    for record in targets[:20]:
        lines.append(f"  - `{record['name']}`: {record['kind']} {record['shape'][0]}×{record['shape'][1]}")
    if len(targets) > 20:
        lines.append(f"  - … and {len(targets) - 20} more (adapter_config.json lists them all)")
    lines += [
        "",
        "Files: `adapter_model.safetensors` (the tensors; its header's metadata is authoritative) and",
        "`adapter_config.json` (the same metadata, readable). No pickle.",
        "",
        "## Load",
        "",
        "```text",
        "import tensoradapt.torch as tat",
        "adapter = tat.load(base_model, \"path/to/this/folder\")   # the same architecture and base weights",
        "```",
        "",
    ]
    return "\n".join(lines)
