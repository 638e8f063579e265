"""The methods the demo compares: a :class:`Method` (adapter configuration and learning rate) per name.

:func:`methods` is the table, in report order; :data:`DEFAULT_METHODS` and :data:`QUICK_METHODS`
are the names a full and a ``--quick`` run use.  (The module is not called ``methods`` so that it
is not shadowed by the function ``tensoradapt.demo.methods``.)
"""

from __future__ import annotations

from dataclasses import dataclass

from tensoradapt import SuperLoRAConfig, presets

__all__ = ["DEFAULT_METHODS", "QUICK_METHODS", "Method", "methods", "superlora_2d"]


@dataclass(frozen=True)
class Method:
    """One transfer method: its adapter configuration (``None``: head only) and learning rate.

    The learning rates of :func:`methods` were picked once per method from
    ``{3e-3, 1e-2, 3e-2, 1e-1, 3e-1}`` on a validation split of the target *training* images
    (seed 0, 400 steps, head learning rate 5e-2), never on the test images.
    """

    name: str
    family: str
    description: str
    config: SuperLoRAConfig | None
    lr: float


def superlora_2d(rank: int, groups: int) -> SuperLoRAConfig:
    """SuperLoRA 2-D grouped with reshape: ``G`` chunks of ``ΔW_all``, each a square-ish matrix."""
    return SuperLoRAConfig(order=2, rank=rank, core="identity", grouping=groups, fold="cubic")


def _baselines() -> list[Method]:
    return [
        Method("head-only", "none", "new head only, backbone frozen", None, 0.0),
        Method("dense", "dense", "dense ΔW of W_q, W_v", presets.dense(), 1e-2),
    ]


def _lora() -> list[Method]:
    return [Method(f"lora-r{r}", "LoRA", f"LoRA r={r}", presets.lora(r), 3e-2 if r == 1 else 1e-2)
            for r in (1, 2, 4, 8)]


def _superlora() -> list[Method]:
    return [
        Method("superlora-2d", "SuperLoRA 2D", "2-D, G=2 groups reshaped square, r=4", superlora_2d(4, 2), 1e-2),
        Method("lorta-m3", "LoRTA", "Tucker M=3, G=1, r=4", presets.lorta(3, 4), 1e-2),
        Method("lorta-m4", "LoRTA", "Tucker M=4, G=1, r=4", presets.lorta(4, 4), 1e-2),
        Method("lonkr", "LoNKr", "K=2 splits, r=4, G=1", presets.lonkr(2, 4), 1e-1),
        Method("fastfood-0.1", "Fastfood", "2-D r=4, G=1, Fastfood ρ=0.1",
               presets.with_projection(superlora_2d(4, 1), "fastfood", 0.1), 1e-1),
        Method("fastfood-0.01", "Fastfood", "2-D r=4, G=1, Fastfood ρ=0.01",
               presets.with_projection(superlora_2d(4, 1), "fastfood", 0.01), 1e-1),
    ]


def methods() -> dict[str, Method]:
    """Every method the demo knows, by name, in table order."""
    return {m.name: m for m in _baselines() + _lora() + _superlora()}


DEFAULT_METHODS: tuple[str, ...] = tuple(methods())
QUICK_METHODS: tuple[str, ...] = tuple(m for m in DEFAULT_METHODS if m not in ("lora-r2", "lora-r8"))
