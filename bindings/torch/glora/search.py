"""GLoRA's evolutionary search on a live adapter (the algorithm is the core's :func:`tensoradapt.glora.evolve`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from tensoradapt.glora import algebra
from tensoradapt.glora.config import LayerChoice
from tensoradapt.glora.search import SearchResult, evolve

from .adapter import GLoRAAdapter

__all__ = ["search"]


def search(adapter: GLoRAAdapter, evaluate: Callable[[], float], max_params: int, *, min_params: int = 0,
           population: int = 50, top_k: int = 10, mutation_prob: float = 0.2, iterations: int = 20,
           mutations: int | None = None, crossovers: int | None = None, seed: int = 0,
           progress: bool = True) -> SearchResult:
    """Evolutionary search of per-layer GLoRA configurations of ``adapter`` under a parameter budget.

    The search itself is the core's :func:`tensoradapt.glora.evolve` (docs/math.md §7.3: the algorithm,
    the official settings, the seeding) over :meth:`GLoRAAdapter.search_spaces` with the docs/math.md §7.2
    counts; this wrapper fixes every new individual on the adapter
    (:meth:`GLoRAAdapter.set_configs`) before calling ``evaluate()``.  An individual is *feasible*
    when ``min_params <= adapter.active_params(individual) <= max_params``; infeasible individuals
    are never evaluated, and no individual is evaluated twice.

    Parameters
    ----------
    adapter : GLoRAAdapter
        A trained supernet (not merged).
    evaluate : callable () -> float
        The user's validation: runs the model (in eval mode, usually under ``torch.no_grad()``)
        with the currently fixed configs and returns a score, **higher is better** (return
        ``-loss`` for a loss).  NaN counts as the worst score.
    max_params, min_params : int
        The budget on active parameters.
    population, top_k, mutation_prob, iterations
        Official settings: 50, 10, 0.2, 20 (5 for language models).
    mutations, crossovers : int, optional
        Children per generation; default ``population // 2`` each (25 and 25).
    seed : int
        Seeds every random draw of the search: the same seed, adapter and (deterministic)
        ``evaluate`` give the same result.
    progress : bool
        Show a tqdm progress bar (a stderr line per generation without tqdm).

    Returns
    -------
    SearchResult
        The best configs (left fixed on the adapter, ranks resolved), score, parameter count and
        history, with the adapter's ``target_names``.  If ``evaluate`` raises, the adapter's
        previous configs are restored and the error propagates.

    Raises
    ------
    TypeError
        ``adapter`` is not a :class:`GLoRAAdapter`, ``evaluate`` is not callable, or a count or
        setting is not an integer.
    ValueError
        A setting out of range, or a budget no configuration meets.
    RuntimeError
        The adapter is detached or merged.
    """
    if not isinstance(adapter, GLoRAAdapter):
        raise TypeError(f"adapter must be a GLoRAAdapter, got {type(adapter).__name__}")
    if not callable(evaluate):
        raise TypeError(f"evaluate must be a callable returning a score, got {type(evaluate).__name__}")
    if not adapter.attached:
        raise RuntimeError("this GLoRAAdapter was detached from its model")
    if adapter.merged:
        raise RuntimeError("the adapter is merged; call unmerge() before searching")
    rank = adapter.config.rank
    spaces = adapter.search_spaces()
    counts = [[algebra.count_params(o, n, c, has_bias=bias, r=rank) for c in space]
              for space, (o, n), bias in zip(spaces, adapter.shapes, adapter.has_bias, strict=True)]

    def score(configs: tuple[LayerChoice, ...]) -> float:
        adapter.set_configs(configs)
        return evaluate()

    previous = adapter.configs
    try:
        result = evolve(spaces, counts, score, max_params, min_params=min_params, population=population,
                        top_k=top_k, mutation_prob=mutation_prob, iterations=iterations, mutations=mutations,
                        crossovers=crossovers, seed=seed, progress=progress, target_names=adapter.target_names)
    except BaseException:
        adapter.set_configs(previous)  # leave the adapter as it was when evaluate() fails
        raise
    configs = tuple(c.resolve(rank) for c in result.configs)
    adapter.set_configs(configs)
    return dataclasses.replace(result, configs=configs)
