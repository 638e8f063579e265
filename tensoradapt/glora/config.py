r"""GLoRA's configuration: the forms of the support tensors, one layer's choice, the supernet config.

* :data:`CHOICES` — the forms each support tensor ``A … E`` may take; :data:`TENSORS` their order.
* :class:`LayerChoice` — the form of every support tensor of one layer, plus its LoRA rank ``r'``.
* :class:`GLoRAConfig` — the supernet: the stored rank ``r``, the offered ranks and forms, the seed.
* :func:`search_space` / :func:`largest_choice` — every choice a layer may take, and the biggest.
* :func:`normalise_form` / :func:`check_bias` — the rules shared with :mod:`tensoradapt.glora.algebra`.

The algebra behind the forms is documented in :mod:`tensoradapt.glora.algebra`.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .._validate import brief, check_int, config_fields

__all__ = [
    "CHOICES",
    "CONFIG_VERSION",
    "MAX_FORMS",
    "MAX_RANK",
    "MAX_RANKS",
    "MAX_SEED",
    "TENSORS",
    "GLoRAConfig",
    "LayerChoice",
    "check_bias",
    "largest_choice",
    "normalise_form",
    "search_space",
]

#: The forms each support tensor may take (docs/math.md §7.2).
CHOICES: dict[str, tuple[str, ...]] = {
    "A": ("lora", "vector", "scalar", "none"),
    "B": ("lora", "vector", "scalar", "none"),
    "C": ("lora", "vector", "none"),
    "D": ("vector", "scalar", "none"),
    "E": ("vector", "scalar", "none"),
}
#: The support tensors, in the order of :class:`LayerChoice`'s fields.
TENSORS = ("A", "B", "C", "D", "E")
#: The ``config_version`` of :meth:`GLoRAConfig.to_dict`.
CONFIG_VERSION = 1
_ALIASES = {"constant": "scalar", "const": "scalar", "LoRA": "lora", "vec": "vector"}
_SIZE_ORDER = {"lora": 3, "vector": 2, "scalar": 1, "none": 0}
# Documented caps (docs/reliability.md), checked before anything is iterated or allocated.
#: Largest supernet rank ``r`` (and LoRA rank ``r'``).
MAX_RANK = 2**24
#: Most entries of ``ranks`` (the offered ranks).
MAX_RANKS = 1024
#: Most entries of a support tensor's list of forms (duplicates included).
MAX_FORMS = 64
#: Largest seed (an unsigned 64-bit integer).
MAX_SEED = 2**64 - 1


def _bounded(name: str, value: Any, limit: int) -> list[Any]:
    """At most ``limit`` entries of the iterable ``value`` (one more is read to tell), else ``ValueError``."""
    items = list(itertools.islice(value, limit + 1))
    if len(items) > limit:
        raise ValueError(f"{name} has more than {limit} entries (the documented cap, docs/reliability.md)")
    return items


def _capped_int(name: str, value: Any, minimum: int, cap: int) -> int:
    as_int = check_int(name, value, minimum=minimum)
    if as_int > cap:
        raise ValueError(f"{name} must be at most {brief(cap)} (the documented cap, docs/reliability.md), "
                         f"got {brief(as_int)}")
    return as_int


def normalise_form(tensor: str, value: Any) -> str:
    """The canonical name of a form of support tensor ``tensor`` (``"constant"`` → ``"scalar"``, …).

    Raises ``TypeError`` for a non-string and ``ValueError`` for a form ``tensor`` cannot take.

    >>> normalise_form("A", "constant")
    'scalar'
    """
    if not isinstance(value, str):
        raise TypeError(f"{tensor} must be one of {CHOICES[tensor]} (a string), got {brief(value)}")
    form = _ALIASES.get(value, value)
    if form not in CHOICES[tensor]:
        raise ValueError(f"{tensor} must be one of {CHOICES[tensor]}, got {brief(value)}")
    return form


# ---------------------------------------------------------------------------------- LayerChoice
@dataclass(frozen=True)
class LayerChoice:
    r"""The form of each support tensor of one GLoRA layer, plus the LoRA rank ``r'``.

    Parameters
    ----------
    A, B : {"lora", "vector", "scalar", "none"}
        ``A`` scales ``W0`` elementwise (``W0 ⊙ A``); ``B`` is added to the weight.
    C : {"lora", "vector", "none"}
        An ``(n, 1)`` column; ``W0 · C`` is added to the bias.
    D, E : {"vector", "scalar", "none"}
        ``b0 ⊙ D`` and ``E`` are added to the bias.
    rank : int, optional
        The sampled LoRA rank ``r'`` shared by every ``"lora"`` tensor of the layer
        (``1 ≤ r' ≤ r``).  ``None`` means the supernet rank ``r``.  It is normalised to ``None``
        when no tensor is ``"lora"``, so equal layers compare equal.

    ``"constant"`` is accepted as an alias of ``"scalar"`` (the official code's name).

    Examples
    --------
    >>> LayerChoice(A="vector", B="lora", D="scalar", E="vector", rank=4)
    LayerChoice(A='vector', B='lora', C='none', D='scalar', E='vector', rank=4)
    >>> LayerChoice(A="vector").rank is None
    True
    """

    A: str = "none"
    B: str = "none"
    C: str = "none"
    D: str = "none"
    E: str = "none"
    rank: int | None = None

    def __post_init__(self) -> None:
        for t in TENSORS:
            object.__setattr__(self, t, normalise_form(t, getattr(self, t)))
        if self.rank is not None:
            rank = _capped_int("rank (the LoRA rank r')", self.rank, 1, MAX_RANK)
            object.__setattr__(self, "rank", rank if self.uses_lora else None)

    @property
    def uses_lora(self) -> bool:
        """Whether any of A, B, C has the LoRA form."""
        return "lora" in (self.A, self.B, self.C)

    def resolve(self, r: int) -> LayerChoice:
        """This choice with ``rank=None`` replaced by the supernet rank ``r`` (checks ``r' ≤ r``)."""
        r = check_int("r", r, minimum=1)
        if not self.uses_lora:
            return self
        if self.rank is None:
            return dataclasses.replace(self, rank=r)
        if self.rank > r:
            raise ValueError(f"LoRA rank r'={self.rank} exceeds the supernet rank r={r} (weight entanglement "
                             f"slices the first r' of r stored columns, so r' <= r)")
        return self

    def effective_rank(self, r: int) -> int:
        """The LoRA rank ``r'`` used by this choice on a supernet of rank ``r``."""
        return self.resolve(r).rank or 0

    def replace(self, **changes: Any) -> LayerChoice:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """``{"A": …, "B": …, "C": …, "D": …, "E": …, "rank": r' or None}`` (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: LayerChoice | Mapping[str, Any]) -> LayerChoice:
        """Inverse of :meth:`to_dict` (a :class:`LayerChoice` is returned as it is); unknown keys are refused."""
        if isinstance(data, LayerChoice):
            return data
        if not isinstance(data, Mapping):
            raise TypeError(f"a layer choice must be a LayerChoice or a mapping of A..E forms, "
                            f"got {type(data).__name__}")
        unknown = sorted(set(data) - {*TENSORS, "rank"}, key=repr)
        if unknown:
            raise ValueError(f"unknown LayerChoice keys {unknown}; known keys are {[*TENSORS, 'rank']}")
        return cls(**data)

    def __str__(self) -> str:
        parts = [f"{t}={getattr(self, t)}" for t in TENSORS]
        return " ".join(parts) + (f" r'={self.rank}" if self.rank is not None else "")


def check_bias(choice: LayerChoice, has_bias: bool) -> None:
    """Refuse (``ValueError``) a ``D`` other than ``"none"`` on a bias-free layer (``D`` scales ``b0``)."""
    if not has_bias and choice.D != "none":
        raise ValueError(f"D={choice.D!r} on a bias-free layer: D scales the base bias b0, which does not exist, "
                         "so it must be 'none' (C and E are allowed and add a bias)")


# ---------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class GLoRAConfig:
    r"""Hyper-parameters of a GLoRA supernet (docs/math.md §7).

    Parameters
    ----------
    rank : int
        Supernet rank ``r``: the stored LoRA factors have ``r`` columns/rows (official default 4).
    ranks : tuple of int, optional
        The LoRA ranks ``r' ≤ r`` that the search space offers (the paper's rank sets such as
        ``{8, 4}``); default ``(rank,)``.
    A, B : tuple of {"lora", "vector", "scalar", "none"}
        Per-layer search space of ``A`` and ``B`` (default: all four forms).
    C : tuple of {"lora", "vector", "none"}
    D, E : tuple of {"vector", "scalar", "none"}
    seed : int
        Seeds the xavier-uniform init of the ``*_u`` factors (through :mod:`tensoradapt.buffers`)
        and the supernet's per-forward sampling.

    Integer fields raise ``TypeError`` for a non-integer and ``ValueError`` out of range
    (:func:`tensoradapt._validate.check_int`).

    With the defaults every layer has ``4·4·3·3·3 = 432`` configurations (:func:`search_space`);
    with several ``ranks`` every configuration that uses LoRA appears once per rank.

    Examples
    --------
    >>> len(search_space(GLoRAConfig()))
    432
    >>> len(search_space(GLoRAConfig(rank=8, ranks=(4, 8))))
    702
    """

    rank: int = 4
    ranks: tuple[int, ...] | None = None
    A: tuple[str, ...] = CHOICES["A"]
    B: tuple[str, ...] = CHOICES["B"]
    C: tuple[str, ...] = CHOICES["C"]
    D: tuple[str, ...] = CHOICES["D"]
    E: tuple[str, ...] = CHOICES["E"]
    seed: int = 0

    def __post_init__(self) -> None:
        rank = _capped_int("rank (the supernet rank r)", self.rank, 1, MAX_RANK)
        object.__setattr__(self, "rank", rank)
        ranks = (rank,) if self.ranks is None else self.ranks
        if isinstance(ranks, (str, bytes, Mapping)) or not isinstance(ranks, Iterable):
            ranks = (ranks,)  # one rank (a string or mapping is refused by check_int below)
        ranks = tuple(check_int(f"ranks[{i}]", q, minimum=1)
                      for i, q in enumerate(_bounded("ranks", ranks, MAX_RANKS)))
        if not ranks or max(ranks) > rank:
            raise ValueError(f"ranks must be a non-empty sequence of integers in [1, rank={rank}] "
                             f"(weight entanglement uses the first r' of r stored columns), got {brief(self.ranks)}")
        object.__setattr__(self, "ranks", tuple(sorted(set(ranks), reverse=True)))
        for t in TENSORS:
            value = getattr(self, t)
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, Iterable) or isinstance(value, (bytes, Mapping)):
                raise TypeError(f"{t} must be a sequence of forms from {CHOICES[t]}, got {brief(value)}")
            forms: list[str] = []
            for v in _bounded(t, value, MAX_FORMS):
                form = normalise_form(t, v)
                if form not in forms:
                    forms.append(form)
            if not forms:
                raise ValueError(f"{t} must offer at least one form from {CHOICES[t]}, got an empty search space")
            object.__setattr__(self, t, tuple(forms))
        object.__setattr__(self, "seed", _capped_int("seed", self.seed, 0, MAX_SEED))

    def replace(self, **changes: Any) -> GLoRAConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists) with a ``config_version`` key."""
        out: dict[str, Any] = {"config_version": CONFIG_VERSION, "method": "glora"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GLoRAConfig:
        """Inverse of :meth:`to_dict`; unknown keys and other config versions are refused."""
        data = config_fields(cls, data, CONFIG_VERSION, extra=("method",))
        method = data.pop("method", "glora")
        if method != "glora":
            raise ValueError(f"method must be 'glora' for a GLoRAConfig, got {method!r}")
        return cls(**data)


def search_space(config: GLoRAConfig | None = None, *, has_bias: bool = True) -> tuple[LayerChoice, ...]:
    """Every :class:`LayerChoice` a layer may take under ``config``.

    Parameters
    ----------
    config : GLoRAConfig, optional
        Default ``GLoRAConfig()`` (432 configurations).
    has_bias : bool
        ``False`` for a bias-free layer: ``D`` is restricted to ``"none"``.

    Returns
    -------
    tuple of LayerChoice
        In the order ``A, B, C, D, E`` (outermost first) as listed in the config, then the ranks
        in decreasing order; choices without LoRA appear once (their ``rank`` is ``None``).
    """
    config = GLoRAConfig() if config is None else config
    if not isinstance(config, GLoRAConfig):
        raise TypeError(f"config must be a GLoRAConfig, got {type(config).__name__}")
    d_space = config.D if has_bias else ("none",)
    out: list[LayerChoice] = []
    for a, b, c, d, e in itertools.product(config.A, config.B, config.C, d_space, config.E):
        if "lora" in (a, b, c):
            out.extend(LayerChoice(a, b, c, d, e, q) for q in config.ranks)
        else:
            out.append(LayerChoice(a, b, c, d, e))
    return tuple(out)


def largest_choice(config: GLoRAConfig | None = None, *, has_bias: bool = True) -> LayerChoice:
    """The choice with the most active parameters in ``config``'s space (lora > vector > scalar > none,
    largest rank): the full supernet for the default space (A, B, C = LoRA at rank ``r``; D, E = vector)."""
    config = GLoRAConfig() if config is None else config
    if not isinstance(config, GLoRAConfig):
        raise TypeError(f"config must be a GLoRAConfig or None, got {type(config).__name__} {brief(config)}")
    forms = {t: max(getattr(config, t), key=_SIZE_ORDER.__getitem__) for t in TENSORS}
    if not has_bias:
        forms["D"] = "none"
    return LayerChoice(**forms, rank=config.ranks[0])
