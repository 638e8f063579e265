"""Presets: the published adapters as SuperLoRA configurations (docs/math.md §5).

Each function returns a :class:`~tensoradapt.SuperLoRAConfig`; the docstrings give the source and
the exact mapping.  Projections can be added to any of them with :func:`with_projection`.
"""

from __future__ import annotations

from .._validate import brief, check_choice, check_float, check_int
from .config import SHUFFLE_SCOPES, SuperLoRAConfig

__all__ = ["dense", "krona", "loha", "lokr", "lonkr", "lora", "lorta", "lotr", "with_projection"]


def dense(groups: int | str = "weight") -> SuperLoRAConfig:
    """Dense fine-tuning: ``ΔW_i`` free (``M = 1``, dense core, docs/math.md §5.1); ``N`` parameters."""
    return SuperLoRAConfig(order=1, rank=1, core="dense", grouping=groups)


def lora(rank: int, alpha: float | None = None) -> SuperLoRAConfig:
    r"""LoRA (Hu et al. 2021): ``ΔW_i = (α/r) B_i A_i`` per weight (docs/math.md §5.2).

    Weight-wise, ``fold="matrix"`` (each weight's own ``(o, n)``), identity core, ``M = 2``:
    ``factor0 = B ∈ R^{o×r}`` (zero at init) and ``factor1 = Aᵀ ∈ R^{n×r}``.  ``alpha=None`` gives
    scale 1.  Parameters ``r Σ_i (o_i + n_i)``.
    """
    return SuperLoRAConfig(rank=rank, order=2, core="identity", fold="matrix", alpha=alpha)


def lokr(rank: int, factor: int = -1, decompose_both: bool = False,
         alpha: float | None = None) -> SuperLoRAConfig:
    r"""LyCORIS LoKr: ``ΔW = (α/r) · w1 ⊗ (w2a w2b)`` per weight (docs/math.md §5.3).

    ``(a, c) = factorization(o, factor)``, ``(b, e) = factorization(n, factor)``; split 1 is the
    dense ``w1 ∈ R^{a×b}`` (a rank-``r`` product when ``decompose_both`` and ``r < max(a, b)/2``),
    split 2 is ``w2a w2b`` with ``w2a ∈ R^{c×r}`` (``factor0``) and ``w2bᵀ ∈ R^{e×r}`` (``factor1``),
    or the full ``w2 ∈ R^{c×e}`` when ``r >= max(c, e)/2`` (then the scale is 1, LyCORIS's ``α := r``).
    The scale is applied exactly once.
    """
    return SuperLoRAConfig(rank=rank, order=2, splits=2, dense_side=factor, fold="matrix",
                           core="identity", decompose_both=decompose_both, alpha=alpha)


def krona(factor: int = -1, scale: float = 1.0) -> SuperLoRAConfig:
    """KronA (Edalati et al. 2022): ``ΔW = s · A ⊗ B``, both dense, per weight (docs/math.md §5.3).

    The factor shapes follow the LyCORIS factorisation of ``o`` and ``n`` with ``factor``.
    Parameters ``a b + c e``.
    """
    return SuperLoRAConfig(rank=1, order=2, splits=2, dense_side=factor, fold="matrix", core="dense",
                           scale=scale)


def loha(rank: int, alpha: float | None = None) -> SuperLoRAConfig:
    r"""LoHa (LyCORIS): ``ΔW = (α/r) (A_1 B_1ᵀ) ⊙ (A_2 B_2ᵀ)`` per weight (docs/math.md §5.4), native
    Hadamard unit; ``split2.factor0`` is zero at init.  Parameters ``2 r (o + n)`` per weight."""
    return SuperLoRAConfig(rank=rank, order=2, splits=2, fold="matrix", core="identity",
                           unit="hadamard", alpha=alpha)


def lotr(rank: int, num_weights: int | None = None, sigma: float | None = None) -> SuperLoRAConfig:
    r"""LoTR (Bershatsky et al. 2024): ``ΔW_s = (σ/r) U G_s Vᵀ`` with ``U, V`` shared (docs/math.md §5.5).

    One group of the ``S`` equal-shape targets, fold ``(S, o, n)``, Tucker ranks ``(S, r, r)``
    with the layer-mode factor fixed to ``I_S``: the core slices are ``G_s``,
    ``factor1 = U ∈ R^{o×r}``, ``factor2 = V ∈ R^{n×r}``.  Parameters ``S r² + (o + n) r``.
    ``sigma=None`` gives scale 1.

    ``num_weights=None`` (default): ``S`` is the number of targets, taken from the shapes when the
    plan is built (``rank=r``; the fixed layer mode's rank is its fold size); the targets must
    then all have one shape.  An explicit ``num_weights`` gives ``rank=(S, r, r)``, and a plan
    with another number of targets is refused.

    >>> from tensoradapt import count_params
    >>> count_params(lotr(2), [(768, 768)] * 24), count_params(lotr(2, 24), [(768, 768)] * 24)
    (3168, 3168)
    """
    rank = check_int("rank", rank, minimum=1)
    scale = 1.0 if sigma is None else check_float("sigma", sigma) / rank
    ranks = rank if num_weights is None else (check_int("num_weights", num_weights, minimum=1), rank, rank)
    return SuperLoRAConfig(rank=ranks, order=3, core="tucker", grouping=1, fold="layers",
                           fixed_identity_modes=(0,), scale=scale)


def lonkr(splits: int, rank: int, dense_side: int | None = None,
          groups: int | str = 1) -> SuperLoRAConfig:
    """LoNKr (SuperLoRA §3.2): a Kronecker product of ``K = splits`` identity-core LoRA units of
    the hyper-cubic 2-D fold, with an optional dense first split of side ``f = dense_side``
    (sizing rule docs/math.md §3.6); ``groups`` as in :class:`~tensoradapt.SuperLoRAConfig`."""
    return SuperLoRAConfig(rank=rank, order=2, splits=splits, dense_side=dense_side, grouping=groups,
                           core="identity")


def lorta(order: int, rank: int, groups: int | str = 1, core: str = "tucker") -> SuperLoRAConfig:
    """SuperLoRA's LoRTA: a Tucker (or CP / identity) tensor of the hyper-cubic ``M``-way fold of
    each group (docs/math.md §5.6).  Not Hounie et al.'s LoRTA, a different method."""
    return SuperLoRAConfig(rank=rank, order=order, core=core, grouping=groups)


def with_projection(config: SuperLoRAConfig, projection: str = "fastfood",
                    ratio: float = 1.0, *, scope: str = "group") -> SuperLoRAConfig:
    """``config`` with the fixed map ``F`` set: ``"fastfood"`` with ratio ρ, ``"shuffle"`` (ρ = 1,
    per group or ``scope="global"``) or ``"none"``.

    Works on every preset.  With ``"fastfood"`` and ``ρ < 1`` each group generates
    ``n_g = max(1, ⌈ρ N_g⌉)`` entries that Fastfood maps to its ``N_g``: a cubic fold is sized for
    ``n_g``, and the weight-shaped folds of ``lora``, ``lokr``, ``krona``, ``loha`` (``(o, n)``)
    and ``lotr`` (``(S, o, n)``) become ``(d, d)`` with ``d = fold_side(n_g, 2)`` and
    ``(S, d, d)`` with ``d = fold_side(⌈n_g / S⌉, 2)``, their split rules applied to that matrix.

    >>> from tensoradapt import count_params
    >>> count_params(with_projection(lora(2), "fastfood", 0.5), [(16, 16)])  # d = 12: 2 · 12 · 2
    48
    """
    if not isinstance(config, SuperLoRAConfig):
        raise TypeError(f"config must be a SuperLoRAConfig (e.g. presets.lora(2)), got {type(config).__name__} "
                        f"{brief(config)}")
    scope = check_choice("scope", scope, SHUFFLE_SCOPES)
    if scope != "group" and projection != "shuffle":
        raise ValueError(f"scope={scope!r} applies to projection='shuffle' only, got projection={projection!r}")
    return config.replace(projection=projection, ratio=ratio, shuffle_scope=scope)
