"""LyCORIS's scale rule both ways, and one module of a kohya file as the import reads it.

A module's update is ``(α/r) ·`` its product, ``r`` the LoRA rank (LoHa: ``hada_w1_b``'s rows;
LoKr: the rank of ``w1_a``, else ``w2_a``); a missing ``alpha`` or ``α = 0`` means ``α = r``
(scale 1); a LoKr whose two blocks are both full has scale 1 whatever ``alpha`` says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tensoradapt.superlora.config import MAX_RANK
from tensoradapt.superlora.forms import ExactForm

from ..files.layout import AdapterFileError

#: The name of each algorithm in messages.
KIND_NAMES = {"lora": "LoRA/LoCon", "lokr": "LoKr", "loha": "LoHa"}


def encode_alpha(config: Any, form: ExactForm, q: int, plain: bool) -> torch.Tensor:
    """The ``alpha`` (float32 scalar) whose ``α/q`` is the form's scale: the config's own ``alpha``
    when that is exactly it (``plain`` blocks of the config's rank), so the file's scale is ours bit
    for bit."""
    if plain and config.alpha is not None and q == config.ranks[0] and form.scale == config.effective_scale:
        return torch.tensor(float(config.alpha), dtype=torch.float32)
    return torch.tensor(form.scale * q, dtype=torch.float32)


@dataclass
class Entry:
    """One adapted module as the file describes it."""

    key: str  # the kohya name
    name: str  # the module's name in the model
    module: nn.Module
    shapes: dict[str, tuple[int, ...]]  # suffix -> shape, alpha included when present
    algo: str = ""
    view: Any = None  # the module's WeightView
    ranks: tuple[int | None, ...] = ()  # per algorithm: lora (r,), loha (r1, r2), lokr (q1 or None, q2 or None)
    layout: tuple = ()  # lokr: ((a, b), (c, e)) of the (o, n) matrix
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    def scale(self) -> float:
        """LyCORIS's scale: ``α/r`` (LoHa: ``hada_w1_b``'s rows; LoKr: ``w1_a``'s rank, else
        ``w2_a``'s, and 1 for two full blocks); a missing ``alpha`` or ``α = 0`` means ``α = r``."""
        alpha = self.values.get("alpha")
        rank = self.ranks[0] if self.algo != "lokr" else next((q for q in self.ranks if q is not None), None)
        if alpha is None or rank is None:
            return 1.0
        value = float(alpha.reshape(()).item())
        return 1.0 if value == 0.0 else value / rank

    def alpha(self) -> float | None:
        """The file's ``alpha`` as LyCORIS reads it (None when missing or 0: then ``α = r``)."""
        alpha = self.values.get("alpha")
        value = None if alpha is None else float(alpha.reshape(()).item())
        return None if not value else value

    def rank(self, value: int, where: str) -> int:
        """``value`` as one of this module's ranks, refused outside ``[1, MAX_RANK]``."""
        if not 1 <= value <= MAX_RANK:
            raise AdapterFileError(f"{where}: module {self.key!r} has rank {value}, outside [1, {MAX_RANK}]")
        return value

    def mismatch(self, what: str, where: str) -> AdapterFileError:
        """The error of tensors that do not fit the module: ``what`` says the rule broken."""
        shown = {k: list(v) for k, v in self.shapes.items() if k != "alpha"}
        return AdapterFileError(f"{where}: the {KIND_NAMES[self.algo]} tensors of {self.key!r} {shown} do not fit "
                                f"{type(self.module).__name__} {self.name!r} of weight shape "
                                f"{list(self.view.weight_shape)}: {what}")
