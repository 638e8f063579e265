"""Parameter accounting without materialising anything: ``count_params`` and ``budget``."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .._validate import check_int, check_shape, is_int
from . import presets
from .config import SuperLoRAConfig
from .generator import SuperLoRA
from .plan import MAX_TARGETS

__all__ = ["FAMILIES", "BudgetEntry", "budget", "count_many", "count_params"]

FAMILIES = ("lora", "lokr", "loha", "lotr", "lonkr", "lorta", "fastfood")
_RANKS = (1, 2, 4, 8, 16, 32, 64)
_SMALL_RANKS = (1, 2, 4, 8)


def shapes_and_names(shapes: Any, names: Sequence[str] | None) -> tuple[Any, Sequence[str] | None]:
    """Split a list of target records (objects with ``.shape`` and ``.name``, e.g.
    :class:`~tensoradapt.analysis.Target`) into shapes and names; plain shapes pass through."""
    if isinstance(shapes, Sequence) and shapes and all(hasattr(t, "shape") and hasattr(t, "name") for t in shapes):
        return [t.shape for t in shapes], (names if names is not None else [t.name for t in shapes])
    return shapes, names


def count_params(config: SuperLoRAConfig, shapes: Sequence[Sequence[int]],
                 names: Sequence[str] | None = None) -> int:
    """Trainable parameters of ``config`` on the target ``shapes`` (buffers and fixed identity
    factors excluded), from shapes alone.

    Examples
    --------
    >>> from tensoradapt import presets
    >>> count_params(presets.lora(1), [(768, 768)] * 24)
    36864

    ``shapes`` may also be the :class:`~tensoradapt.analysis.Target` list of
    :func:`~tensoradapt.analysis.shapes_from_model` or :func:`~tensoradapt.analysis.parse_shapes`
    (entries with ``.name`` and ``.shape``); their names are then the target names, so
    ``count_params(config, shapes_from_model(model, targets))`` counts what
    ``tensoradapt.torch.attach(model, config, targets)`` trains.
    """
    shapes, names = shapes_and_names(shapes, names)
    fast = _fast_count(config, shapes)
    return fast if fast is not None else SuperLoRA(config, shapes, names).num_params


def count_many(configs: Iterable[SuperLoRAConfig], shapes: Sequence[Sequence[int]],
               names: Sequence[str] | None = None) -> list[int | ValueError]:
    """:func:`count_params` of each configuration on the same ``shapes`` (the shapes are checked
    once, not once per configuration); a configuration that cannot be built on the shapes gives
    its ``ValueError`` in place of a count."""
    shapes, names = shapes_and_names(shapes, names)
    summary = _summary(shapes) if isinstance(shapes, Sequence) and len(shapes) <= MAX_TARGETS else None
    out: list[int | ValueError] = []
    for config in configs:
        try:
            fast = _fast_count(config, shapes, summary) if summary is not None else None
            out.append(fast if fast is not None else SuperLoRA(config, shapes, names).num_params)
        except ValueError as exc:
            out.append(exc)
    return out


def _summary(shapes: Sequence[Sequence[int]]) -> tuple[Counter[tuple[int, ...]], int] | None:
    """The distinct (checked) shapes with their multiplicities, and ``N``; ``None`` for bad shapes."""
    try:
        checked = [check_shape(f"shapes[{i}]", s) for i, s in enumerate(shapes)]
    except (TypeError, ValueError):
        return None
    return Counter(checked), sum(math.prod(s) for s in checked)


def _fast_count(config: SuperLoRAConfig, shapes: Sequence[Sequence[int]],
                summary: tuple[Counter[tuple[int, ...]], int] | None = None) -> int | None:
    """The count from a smaller plan where the configuration allows it (``None`` otherwise):

    * one group per weight: a weight's count depends on its shape alone, so each distinct shape
      is planned once;
    * ``G`` equal chunks of the fold layout with a cubic or explicit fold: the groups depend on
      ``N`` alone, so one ``(N,)`` target stands for all.

    Any error is left to the full plan, which names the target or group.
    """
    if (not isinstance(config, SuperLoRAConfig) or not isinstance(shapes, Sequence)
            or isinstance(shapes, (str, bytes)) or not 1 < len(shapes) <= MAX_TARGETS):
        return None
    weight_wise = config.grouping == "weight"
    chunked = (is_int(config.grouping) and config.layout == "fold" and config.fold not in ("matrix", "layers"))
    if not (weight_wise or chunked):
        return None
    summary = _summary(shapes) if summary is None else summary
    if summary is None:
        return None
    by_shape, total = summary
    try:
        if chunked:  # array_split sizes: `extra` groups of base + 1 entries, the rest of base
            parts = config.grouping
            if parts > total:
                return None
            base, extra = divmod(total, parts)
            one = config.replace(grouping=1)
            counts = {size: SuperLoRA(one, [(size,)]).num_params for size in {base, base + 1} if size >= 1}
            return extra * counts.get(base + 1, 0) + (parts - extra) * counts.get(base, 0)
        return sum(count * SuperLoRA(config, [shape]).num_params for shape, count in by_shape.items())
    except (TypeError, ValueError):
        return None


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
            yield from (presets.lotr(r) for r in _RANKS)
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
    families = (families,) if isinstance(families, str) else tuple(families)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"families must be among {FAMILIES}, got unknown {unknown}")
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, Sequence) or not shapes:
        raise ValueError(f"shapes must be a non-empty sequence of weight shapes, got {type(shapes).__name__}")
    if len(shapes) > MAX_TARGETS:
        raise ValueError(f"shapes has {len(shapes):,} targets; at most {MAX_TARGETS:,} are allowed")
    shapes = [check_shape(f"shapes[{i}]", s) for i, s in enumerate(shapes)]
    summary = _summary(shapes)
    equal = len({(s[0], math.prod(s[1:])) for s in shapes}) == 1
    entries: dict[SuperLoRAConfig, BudgetEntry] = {}
    for family in families:
        for config in _candidates(family, len(shapes), equal):
            if config in entries:
                continue
            try:
                params = _fast_count(config, shapes, summary)
                if params is None:
                    params = count_params(config, shapes)
            except ValueError:
                continue
            if min_params <= params <= max_params:
                entries[config] = BudgetEntry(family, params, config)
    return sorted(entries.values(), key=lambda e: (e.params, e.family))
