"""The demo's model: :class:`TinyViT`, a ViT small enough to train on 8×8 digits on a CPU.

Its attention has separate ``query``, ``key``, ``value`` and ``out`` linears, so adapters can be put
on any of them by name (:data:`TARGETS`, :func:`target_names`).  Nothing here depends on the demo's
list of methods; ``tensoradapt study`` builds on the same model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TARGETS", "Attention", "Block", "TinyViT", "target_names"]

TARGETS: tuple[str, ...] = ("query", "value")
"""Module-name suffixes the demo attaches its adapters to (every block's query and value)."""


class Attention(nn.Module):
    """Multi-head self-attention with separate ``query``, ``key``, ``value`` and ``out`` linears."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def _split(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)`` → ``(B, heads, T, D / heads)``."""
        b, t, d = y.shape
        return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        y = F.scaled_dot_product_attention(self._split(self.query(x)), self._split(self.key(x)),
                                           self._split(self.value(x)))
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """A pre-LN transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A ViT for ``side × side`` single-channel images.

    Non-overlapping ``patch × patch`` patches are embedded by a linear map, a CLS token is
    prepended, learned positions are added, ``depth`` pre-LN blocks follow, and the final
    LayerNorm of the CLS token feeds the linear ``head``.

    Parameters
    ----------
    num_classes, width, depth, heads, patch, mlp_ratio : int
    side : int
        Image side (8 for the digits); must be a multiple of ``patch``.
    """

    def __init__(self, num_classes: int = 5, width: int = 64, depth: int = 3, heads: int = 4, patch: int = 4,
                 mlp_ratio: int = 2, side: int = 8) -> None:
        super().__init__()
        if side % patch:
            raise ValueError(f"the image side ({side}) must be a multiple of patch ({patch})")
        self.side, self.patch = side, patch
        tokens = (side // patch) ** 2
        self.embed = nn.Linear(patch * patch, width)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens + 1, width))
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, side, side)`` → ``(B, tokens, patch²)`` in row-major patch order."""
        b, p, n = images.shape[0], self.patch, self.side // self.patch
        return images.reshape(b, n, p, n, p).permute(0, 1, 3, 2, 4).reshape(b, n * n, p * p)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The normalised CLS token, ``(B, width)``."""
        x = self.embed(self.patches(images))
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of ``(B, side, side)`` images."""
        return self.head(self.features(images))


def target_names(model: nn.Module, targets: Sequence[str] = TARGETS) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` whose last name part is in ``targets``,
    in ``named_modules()`` order (the order of an adapter's targets)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
