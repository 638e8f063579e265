"""Parameter accounting without materialising anything: ``count_params`` and ``budget``."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from .._validate import check_int
from . import presets
from .config import SuperLoRAConfig
from .generator import SuperLoRA

__all__ = ["FAMILIES", "BudgetEntry", "budget", "count_params"]

FAMILIES = ("lora", "lokr", "loha", "lotr", "lonkr", "lorta", "fastfood")
_RANKS = (1, 2, 4, 8, 16, 32, 64)
_SMALL_RANKS = (1, 2, 4, 8)


def count_params(config: SuperLoRAConfig, shapes: Sequence[Sequence[int]],
                 names: Sequence[str] | None = None) -> int:
    """Trainable parameters of ``config`` on the target ``shapes`` (buffers and fixed identity
    factors excluded), from shapes alone.

    Examples
    --------
    >>> from tensoradapt import presets
    >>> count_params(presets.lora(1), [(768, 768)] * 24)
    36864
    """
    return SuperLoRA(config, shapes, names).num_params


@dataclass(frozen=True)
class BudgetEntry:
    """One configuration that fits a budget."""

    family: str
    params: int
    config: SuperLoRAConfig

    def __str__(self) -> str:
        cfg = self.config
        return (f"{self.family:<8} {self.params:>12,}  rank={cfg.rank} M={cfg.order} K={cfg.splits} "
                f"G={cfg.grouping} core={cfg.core} rho={cfg.ratio}")


def _group_counts(count: int) -> list[int]:
    powers = [1 << p for p in range(count.bit_length()) if (1 << p) <= count]
    return sorted(set(powers) | {count})


def _candidates(family: str, count: int, equal_shapes: bool) -> Iterator[SuperLoRAConfig]:
    groups = _group_counts(count)
    if family == "lora":
        yield from (presets.lora(r) for r in _RANKS)
    elif family == "lokr":
        yield from (presets.lokr(r, f) for r in _RANKS for f in (-1, 4, 8, 16))
    elif family == "loha":
        yield from (presets.loha(r) for r in _RANKS)
    elif family == "lotr":
        if equal_shapes:
            yield from (presets.lotr(r, count) for r in _RANKS)
    elif family == "lonkr":
        yield from (presets.lonkr(k, r, f, g) for k in (2, 3, 4) for r in _SMALL_RANKS
                    for f in (None, 6, 8) for g in groups)
    elif family == "lorta":
        yield from (presets.lorta(m, r, g, core) for m in (3, 4, 5) for r in _SMALL_RANKS
                    for g in groups for core in ("tucker", "cp"))
    elif family == "fastfood":
        for rho in (0.1, 0.01, 0.001):
            yield presets.with_projection(presets.dense(1), "fastfood", rho)
            for m in (2, 3, 4, 5):
                for r in _SMALL_RANKS:
                    core = "identity" if m == 2 else "tucker"
                    yield presets.with_projection(presets.lorta(m, r, 1, core), "fastfood", rho)
    else:  # pragma: no cover - checked by the caller
        raise AssertionError(family)


def budget(shapes: Sequence[Sequence[int]], max_params: int, families: Iterable[str] = FAMILIES,
           *, min_params: int = 0) -> list[BudgetEntry]:
    """Configurations across families, ranks, ``G``, ``M``, ``K`` and ``ρ`` whose trainable
    parameter count lies in ``[min_params, max_params]``, sorted by count (ascending; the last
    entry is the largest that fits).

    Parameters
    ----------
    shapes : sequence of shapes
        Target weight shapes.
    max_params, min_params : int
        The budget.
    families : iterable of str
        Any of :data:`FAMILIES`.

    Notes
    -----
    Counting needs shapes only, so a 7B model's targets (e.g. 64 × 4096²) are answered in well
    under a second.  Configurations that are invalid for the shapes (e.g. LoTR over unequal
    shapes) are skipped.
    """
    max_params = check_int("max_params", max_params, minimum=0)
    min_params = check_int("min_params", min_params, minimum=0)
    families = tuple(families)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"families must be among {FAMILIES}, got unknown {unknown}")
    shapes = [tuple(int(d) for d in s) for s in shapes]
    equal = len({(s[0], math.prod(s[1:])) for s in shapes}) == 1
    entries: dict[SuperLoRAConfig, BudgetEntry] = {}
    for family in families:
        for config in _candidates(family, len(shapes), equal):
            if config in entries:
                continue
            try:
                params = count_params(config, shapes)
            except ValueError:
                continue
            if min_params <= params <= max_params:
                entries[config] = BudgetEntry(family, params, config)
    return sorted(entries.values(), key=lambda e: (e.params, e.family))
