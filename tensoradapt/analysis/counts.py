"""Parameter-count tables and budget sweeps of presets or configurations on target shapes.

:func:`parse_preset` reads ``name[:key=value,…]``; :func:`count_table` counts presets per rank on
shapes (:class:`CountRow`); :func:`budget_sweep` lists the configurations of each family within a
parameter budget (through :mod:`tensoradapt.budget`).  The shapes come from :mod:`.shapes`; the text
tables are :mod:`.report`'s.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._validate import is_int
from ..superlora import presets as _presets
from ..superlora.budget import FAMILIES, BudgetEntry, budget, count_many
from ..superlora.config import SuperLoRAConfig
from ..superlora.generator import SuperLoRA
from .shapes import Target

__all__ = ["DEFAULT_PRESETS", "DEFAULT_RANKS", "OVER_DENSE_NOTE", "PRESETS", "CountRow", "budget_sweep", "count_table",
           "parse_preset"]

#: Preset names usable in :func:`parse_preset` (the functions of :mod:`tensoradapt.presets`).
PRESETS = ("dense", "lora", "lokr", "krona", "loha", "lotr", "lonkr", "lorta")
#: Presets of the default count table.
DEFAULT_PRESETS = ("dense", "lora", "lokr", "loha", "lotr", "lonkr:splits=3", "lorta:order=3", "lorta:order=4")
#: Ranks swept for presets given without an explicit rank.
DEFAULT_RANKS = (1, 2, 4, 8, 16)

#: The note of a count-table row with more trainable parameters than dense fine-tuning (``> N``).
OVER_DENSE_NOTE = "more parameters than dense fine-tuning: over-parameterised, not an adapter"


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_preset(spec: str, shapes: Sequence[Sequence[int]] | None = None,
                 ranks: Sequence[int] | None = None) -> list[tuple[str, SuperLoRAConfig]]:
    """Configurations from a preset specification ``name[:key=value,…]``.

    ``name`` is one of :data:`PRESETS`; the keys are the preset function's arguments (e.g.
    ``lorta:order=3,groups=1``, ``lokr:factor=8``, ``lora:rank=8``).  A preset that takes a rank
    and is given none is expanded over ``ranks`` (default :data:`DEFAULT_RANKS`).  ``lotr`` stacks
    all the targets (``S`` is taken from the shapes when the plan is built), so ``shapes`` is no
    longer needed here; it is accepted for existing callers and ignored.

    Returns
    -------
    list of (label, SuperLoRAConfig)

    Examples
    --------
    >>> [label for label, _ in parse_preset("lorta:order=3", ranks=[2, 4])]
    ['lorta(order=3, rank=2)', 'lorta(order=3, rank=4)']

    Raises
    ------
    ValueError
        Unknown preset name or argument, malformed ``key=value``, or an invalid configuration.
    """
    name, _, rest = str(spec).strip().partition(":")
    name = name.strip().lower()
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets are {', '.join(PRESETS)}")
    func = getattr(_presets, name)
    params = inspect.signature(func).parameters
    kwargs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"preset argument {item!r} in {spec!r} must look like key=value")
        if key not in params:
            raise ValueError(f"preset {name!r} has no argument {key!r}; its arguments are {', '.join(params)}")
        if key in kwargs:
            raise ValueError(f"preset {spec!r} gives {key!r} twice")
        kwargs[key] = _parse_value(value.strip())
    sweep = ("rank" in params and "rank" not in kwargs)
    missing = [p.name for p in params.values() if p.default is inspect.Parameter.empty
               and p.name not in kwargs and not (sweep and p.name == "rank")]
    if missing:
        raise ValueError(f"preset {name!r} needs {', '.join(f'{m}=…' for m in missing)} "
                         f"(e.g. {name}:{missing[0]}=3); its arguments are {', '.join(params)}")
    rank_list = list(ranks) if ranks is not None else list(DEFAULT_RANKS)
    variants = [{**kwargs, "rank": r} for r in rank_list] if sweep else [kwargs]
    out = []
    for kw in variants:
        label = f"{name}({', '.join(f'{k}={v}' for k, v in kw.items())})"
        try:
            config = func(**kw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"preset {spec!r}: {exc}") from None
        out.append((label, config))
    return out


@dataclass(frozen=True)
class CountRow:
    """One row of a parameter table.

    Attributes
    ----------
    label : str
    params : int or None
        Trainable parameters (``None`` when the configuration does not apply to the shapes).
    fraction : float or None
        ``params / N`` with ``N`` the number of entries of all targets (dense fine-tuning).
    groups : int or None
    config : SuperLoRAConfig
    note : str
        Why the configuration does not apply (empty otherwise).
    """

    label: str
    params: int | None
    fraction: float | None
    groups: int | None
    config: SuperLoRAConfig
    note: str = ""


def _plain_shapes(shapes: Sequence[Any]) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in (s.shape if isinstance(s, Target) else s)) for s in shapes]


def count_table(shapes: Sequence[Any], configs: Iterable[str] | Mapping[str, SuperLoRAConfig] | None = None,
                *, ranks: Sequence[int] | None = None, names: Sequence[str] | None = None) -> list[CountRow]:
    """Trainable parameters of presets or configurations on the target ``shapes``.

    Parameters
    ----------
    shapes : sequence of shapes or Target
    configs : iterable of preset specifications, or mapping label -> SuperLoRAConfig, optional
        Default :data:`DEFAULT_PRESETS` (specifications as in :func:`parse_preset`).
    ranks : sequence of int, optional
        Ranks for presets given without one.
    names : sequence of str, optional
        Target names (needed by ``grouping="layer"``).

    Returns
    -------
    list of CountRow
        Configurations that cannot be built on the shapes (e.g. LoTR over unequal shapes) get
        ``params=None`` and a note.

    Examples
    --------
    >>> rows = count_table([(768, 768)] * 24, ["lora"], ranks=[1, 8])
    >>> [(r.label, r.params) for r in rows]
    [('lora(rank=1)', 36864), ('lora(rank=8)', 294912)]
    """
    plain = _plain_shapes(shapes)
    if not plain:
        raise ValueError("shapes must hold at least one target shape")
    if names is None and shapes and all(isinstance(s, Target) for s in shapes):
        names = [s.name for s in shapes]
    total = sum(math.prod(s) for s in plain)
    if configs is None:
        configs = DEFAULT_PRESETS
    if isinstance(configs, Mapping):
        labelled = list(configs.items())
    else:
        labelled = [item for spec in configs for item in parse_preset(spec, plain, ranks)]
    rows = []
    simple = [config.grouping == "weight" or is_int(config.grouping) for _, config in labelled]
    # weight-wise and G-chunk configurations are counted without the full plan, the shapes checked once
    counts = iter(count_many([config for (_, config), easy in zip(labelled, simple, strict=True) if easy],
                             plain, names))
    for (label, config), easy in zip(labelled, simple, strict=True):
        try:
            if easy:
                params = next(counts)
                if isinstance(params, ValueError):
                    raise params
                groups = len(plain) if config.grouping == "weight" else config.grouping
            else:
                plan = SuperLoRA(config, plain, names)
                params, groups = plan.num_params, len(plan.groups)
        except ValueError as exc:
            rows.append(CountRow(label, None, None, None, config, str(exc).split("\n")[0]))
            continue
        note = OVER_DENSE_NOTE if params > total else ""
        rows.append(CountRow(label, params, params / total, groups, config, note))
    return rows


def budget_sweep(shapes: Sequence[Any], max_params: int, families: Iterable[str] = FAMILIES, *,
                 min_params: int = 0, top: int | None = None) -> list[BudgetEntry]:
    """:func:`tensoradapt.budget` on the shapes, keeping the ``top`` largest entries (all if None).

    Examples
    --------
    >>> [e.params for e in budget_sweep([(768, 768)] * 24, 40_000, ["lora"])]
    [36864]
    """
    entries = budget(_plain_shapes(shapes), max_params, families, min_params=min_params)
    if top is not None:
        entries = entries[-top:] if top > 0 else []
    return entries
