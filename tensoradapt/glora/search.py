r"""GLoRA's evolutionary search of per-layer configurations under a parameter budget (docs/math.md §7.3).

Framework-free: :func:`evolve` sees each layer's search space, the parameter count of every
choice in it and a callback that scores one configuration per layer; it never touches a model.
:func:`tensoradapt.torch.glora.search` is the wrapper for a live PyTorch adapter.

An *individual* is one choice per layer (stored as the tuple of indices into the layers' spaces,
its *genes*); its parameter count is the sum of its choices' counts, and it is *feasible* when
``min_params <= count <= max_params``.

1. :func:`_initial_population`: ``population`` distinct random feasible individuals (rejection
   sampling).
2. For ``iterations`` generations (:func:`_next_generation`): take the ``top_k`` best evaluated so
   far (:meth:`_Scores.ranked`); make ``mutations`` mutants (:func:`_mutate`: a random parent,
   each gene re-drawn with probability ``mutation_prob``) and ``crossovers`` children
   (:func:`_cross`: two random parents, each gene from either with probability 1/2), keeping only
   feasible ones never seen before; refill with random feasible individuals to ``population``.
3. Every new individual is scored once by ``evaluate`` (:meth:`_Scores.score`, cached); the best
   so far is recorded after each generation (:class:`SearchRecord`).  Infeasible individuals are
   never evaluated.

Every random draw comes from one NumPy generator seeded by ``seed``, so the same spaces, counts,
seed and a deterministic ``evaluate`` give the same result.  A progress bar uses tqdm when it is
installed (imported only when ``progress=True``).
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._validate import brief, check_float, check_int

__all__ = ["SearchRecord", "SearchResult", "evolve"]

#: SeedSequence entropy of the search generator after the seed: "glora" and the search's stream 1
#: (stream 0 is the torch supernet's per-forward sampler).
_STREAM = (0x676C6F7261, 1)

_Genes = tuple[int, ...]


# ---------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class SearchRecord:
    """One generation of :func:`evolve`: the best so far after it."""

    iteration: int  # 0 = the initial random population
    best_score: float
    best_params: int
    evaluations: int  # distinct individuals evaluated so far
    population: int  # individuals in this generation (evaluated now or cached)


@dataclass(frozen=True)
class SearchResult:
    """What :func:`evolve` (or :func:`tensoradapt.torch.glora.search`) found.

    Attributes
    ----------
    configs : tuple
        The best individual: one choice per layer (a :class:`~tensoradapt.glora.LayerChoice`
        for GLoRA spaces).
    score : float
        Its ``evaluate`` score (higher is better).
    num_params : int
        Its parameter count (the sum of its choices' counts).
    history : tuple of SearchRecord
        One record per generation.
    evaluations : int
        Number of distinct individuals evaluated.
    target_names : tuple of str
        The layers' names (``"0"``, ``"1"``, … unless given).
    """

    configs: tuple[Any, ...]
    score: float
    num_params: int
    history: tuple[SearchRecord, ...]
    evaluations: int
    target_names: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (choices through their ``to_dict()`` when they have one)."""
        configs = {name: c.to_dict() if hasattr(c, "to_dict") else c
                   for name, c in zip(self.target_names, self.configs, strict=True)}
        return {
            "configs": configs, "score": self.score, "num_params": self.num_params,
            "evaluations": self.evaluations, "history": [vars(r) for r in self.history],
        }


# ---------------------------------------------------------------------------------- progress
class _Progress:
    """tqdm when installed, else one stderr line per generation; silent when disabled."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.enabled = enabled
        self.total = total
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc="GLoRA search", unit="gen", file=sys.stderr)

    def update(self, record: SearchRecord) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(best=f"{record.best_score:.4g}", params=record.best_params,
                                 evals=record.evaluations, refresh=False)
            self.bar.update(1)
        else:
            print(f"GLoRA search {record.iteration + 1}/{self.total}: best {record.best_score:.4g} "
                  f"({record.best_params:,} params), {record.evaluations} evaluated", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------- the problem
class _Budget:
    """The per-layer count table and the budget: counts and feasibility of individuals."""

    def __init__(self, counts: Sequence[Sequence[int]], min_params: int, max_params: int) -> None:
        self.sizes = np.array([len(c) for c in counts], dtype=np.int64)
        self.layers = len(counts)
        self.table = np.zeros((self.layers, int(self.sizes.max())), dtype=np.int64)  # [l, i]: count of choice i
        for li, row in enumerate(counts):
            self.table[li, : len(row)] = row
        self.rows = np.arange(self.layers)
        self.min_params = min_params
        self.max_params = max_params

    def bounds(self) -> tuple[int, int]:
        """The fewest and the most parameters any individual has."""
        lowest = int(sum(self.table[li, : self.sizes[li]].min() for li in range(self.layers)))
        highest = int(sum(self.table[li, : self.sizes[li]].max() for li in range(self.layers)))
        return lowest, highest

    def count(self, genes: _Genes) -> int:
        return int(self.table[self.rows, np.asarray(genes)].sum())

    def feasible(self, genes: _Genes) -> bool:
        return self.min_params <= self.count(genes) <= self.max_params

    def random_feasible(self, rng: np.random.Generator, needed: int, taken: set[_Genes]) -> list[_Genes]:
        """Up to ``needed`` new random feasible individuals not in ``taken`` (which gains them),
        drawn in batches; gives up after ``max(100_000, 1000 * needed)`` draws."""
        out: list[_Genes] = []
        drawn = 0
        limit = _draw_limit(needed)
        while len(out) < needed and drawn < limit:
            batch = rng.integers(0, self.sizes, size=(max(256, 4 * needed), self.layers))
            drawn += len(batch)
            totals = self.table[self.rows, batch].sum(axis=1)
            for genes_row in batch[(totals >= self.min_params) & (totals <= self.max_params)]:
                genes = tuple(int(g) for g in genes_row)
                if genes not in taken:
                    taken.add(genes)
                    out.append(genes)
                    if len(out) == needed:
                        break
        return out


def _draw_limit(needed: int) -> int:
    """How many random individuals are drawn at most to find ``needed`` feasible ones."""
    return max(100_000, 1000 * needed)


class _Scores:
    """The cache of scores: every individual is evaluated once, in the order first met."""

    def __init__(self, spaces: Sequence[Sequence[Any]], evaluate: Callable[[tuple[Any, ...]], float],
                 budget: _Budget) -> None:
        self.spaces = spaces
        self.evaluate = evaluate
        self.budget = budget
        self.values: dict[_Genes, float] = {}
        self.order: dict[_Genes, int] = {}

    def configs(self, genes: _Genes) -> tuple[Any, ...]:
        return tuple(self.spaces[li][g] for li, g in enumerate(genes))

    def score(self, genes: _Genes) -> float:
        """The score of ``genes`` (evaluated now if new; NaN counts as ``-inf``)."""
        if genes not in self.values:
            if not self.budget.feasible(genes):  # pragma: no cover - guarded by construction
                raise AssertionError("an infeasible individual reached evaluation")
            score = self.evaluate(self.configs(genes))
            if isinstance(score, bool) or not isinstance(score, numbers.Real):
                raise TypeError(f"evaluate must return a number (higher is better), got {type(score).__name__} "
                                f"{brief(score)}")
            value = float(score)
            self.values[genes] = -math.inf if math.isnan(value) else value
            self.order[genes] = len(self.order)
        return self.values[genes]

    def ranked(self) -> list[_Genes]:
        """Every evaluated individual, best first (ties: the one evaluated first)."""
        return sorted(self.values, key=lambda g: (-self.values[g], self.order[g]))

    def record(self, iteration: int, size: int) -> SearchRecord:
        best = self.ranked()[0]
        return SearchRecord(iteration, self.values[best], self.budget.count(best), len(self.values), size)


# ---------------------------------------------------------------------------------- the steps
def _initial_population(rng: np.random.Generator, budget: _Budget, population: int) -> list[_Genes]:
    generation = budget.random_feasible(rng, population, set())
    if not generation:
        raise ValueError(f"no random configuration within the budget [{budget.min_params:,}, "
                         f"{budget.max_params:,}] was found in {_draw_limit(population):,} draws; widen the budget")
    return generation


def _mutate(rng: np.random.Generator, parents: list[_Genes], sizes: np.ndarray, mutation_prob: float) -> _Genes:
    """A random parent with each gene re-drawn with probability ``mutation_prob``."""
    parent = np.asarray(parents[int(rng.integers(len(parents)))])
    redraw = rng.random(len(sizes)) < mutation_prob
    fresh = rng.integers(0, sizes)
    return tuple(int(g) for g in np.where(redraw, fresh, parent))


def _cross(rng: np.random.Generator, parents: list[_Genes], layers: int) -> _Genes:
    """Two random parents; each gene from either with probability 1/2."""
    first = np.asarray(parents[int(rng.integers(len(parents)))])
    second = np.asarray(parents[int(rng.integers(len(parents)))])
    pick = rng.random(layers) < 0.5
    return tuple(int(g) for g in np.where(pick, first, second))


def _children(make: Callable[[], _Genes], wanted: int, accept: Callable[[_Genes], bool]) -> None:
    """Call ``make`` until ``wanted`` children are accepted or ``10 * wanted`` attempts are spent."""
    made, attempts = 0, 0
    while made < wanted and attempts < 10 * max(wanted, 1):
        attempts += 1
        made += accept(make())


def _next_generation(rng: np.random.Generator, budget: _Budget, scores: _Scores, *, population: int,
                     top_k: int, mutation_prob: float, mutations: int, crossovers: int) -> list[_Genes]:
    """Mutants and crossovers of the ``top_k`` best so far, refilled with random individuals; all
    feasible, distinct and never evaluated before (as the official ``is_legal``)."""
    parents = scores.ranked()[:top_k]
    children: list[_Genes] = []
    taken: set[_Genes] = set()

    def accept(genes: _Genes) -> bool:
        if genes in taken or genes in scores.values or not budget.feasible(genes):
            return False
        taken.add(genes)
        children.append(genes)
        return True

    _children(lambda: _mutate(rng, parents, budget.sizes, mutation_prob), mutations, accept)
    _children(lambda: _cross(rng, parents, budget.layers), crossovers, accept)
    if len(children) < population:
        children.extend(budget.random_feasible(rng, population - len(children), taken | set(scores.values)))
    return children


# ---------------------------------------------------------------------------------- checks
def _check_problem(spaces: Sequence[Sequence[Any]], counts: Sequence[Sequence[int]]) -> list[list[int]]:
    if isinstance(spaces, (str, bytes)) or not isinstance(spaces, Sequence) or not spaces:
        raise TypeError("spaces must be a non-empty sequence with one sequence of choices per layer")
    if isinstance(counts, (str, bytes)) or not isinstance(counts, Sequence) or len(counts) != len(spaces):
        raise ValueError(f"counts must give one sequence of parameter counts per layer ({len(spaces)})")
    table = []
    for li, (space, row) in enumerate(zip(spaces, counts, strict=True)):
        if not isinstance(space, Sequence) or not space:
            raise ValueError(f"spaces[{li}] must be a non-empty sequence of choices")
        if not isinstance(row, Sequence) or len(row) != len(space):
            raise ValueError(f"counts[{li}] must give one count per choice of spaces[{li}] ({len(space)})")
        table.append([check_int(f"counts[{li}][{i}]", c, minimum=0) for i, c in enumerate(row)])
    return table


def _check_probability(name: str, value: Any) -> float:
    return check_float(name, value, minimum=0.0, maximum=1.0, rule="a probability in [0, 1]")


@dataclass(frozen=True)
class _Settings:
    """The checked search settings of :func:`evolve`."""

    population: int
    top_k: int
    iterations: int
    mutations: int
    crossovers: int
    seed: int
    mutation_prob: float

    @classmethod
    def checked(cls, population: Any, top_k: Any, iterations: Any, mutations: Any, crossovers: Any, seed: Any,
                mutation_prob: Any) -> _Settings:
        """The settings checked in this order (the first bad one is reported); ``mutations`` and
        ``crossovers`` default to ``population // 2``."""
        population = check_int("population", population, minimum=1)
        top_k = check_int("top_k", top_k, minimum=1)
        iterations = check_int("iterations", iterations, minimum=0)
        mutations = population // 2 if mutations is None else check_int("mutations", mutations, minimum=0)
        crossovers = population // 2 if crossovers is None else check_int("crossovers", crossovers, minimum=0)
        seed = check_int("seed", seed, minimum=0)
        return cls(population, top_k, iterations, mutations, crossovers, seed,
                   _check_probability("mutation_prob", mutation_prob))


# ---------------------------------------------------------------------------------- the search
def evolve(spaces: Sequence[Sequence[Any]], counts: Sequence[Sequence[int]],
           evaluate: Callable[[tuple[Any, ...]], float], max_params: int, *, min_params: int = 0,
           population: int = 50, top_k: int = 10, mutation_prob: float = 0.2, iterations: int = 20,
           mutations: int | None = None, crossovers: int | None = None, seed: int = 0, progress: bool = True,
           target_names: Sequence[str] | None = None) -> SearchResult:
    """Evolutionary search of one choice per layer under a parameter budget (docs/math.md §7.3; module text).

    Parameters
    ----------
    spaces : sequence of sequences
        Each layer's choices (for GLoRA, :func:`tensoradapt.glora.search_space`).
    counts : sequence of sequences of int
        ``counts[l][i]``: the parameters choice ``spaces[l][i]`` costs (for GLoRA,
        :func:`tensoradapt.glora.count_params`); an individual costs the sum over its layers.
    evaluate : callable (configs) -> float
        Scores one individual, given as the tuple of its per-layer choices; **higher is better**
        (return ``-loss`` for a loss).  NaN counts as the worst score.  Called once per distinct
        feasible individual.
    max_params, min_params : int
        The budget: ``min_params <= count <= max_params``.
    population, top_k, mutation_prob, iterations
        Official settings: 50, 10, 0.2, 20 (5 for language models).
    mutations, crossovers : int, optional
        Children per generation; default ``population // 2`` each (25 and 25).
    seed : int
        Seeds every random draw of the search.
    progress : bool
        Show a tqdm progress bar (a stderr line per generation without tqdm).
    target_names : sequence of str, optional
        The layers' names in the result (default ``"0"``, ``"1"``, …).

    Returns
    -------
    SearchResult
        The best individual's choices, score and count, the history and the number evaluated.

    Raises
    ------
    TypeError
        A non-integer count or setting, or a non-callable ``evaluate``.
    ValueError
        A setting out of range, or a budget that no individual meets (``min_params > max_params``,
        outside the span of the counts, or no feasible individual found by random draws).

    Examples
    --------
    Two layers with choices ``"small"`` (1 parameter) and ``"big"`` (10); the score prefers big
    layers, the budget allows one:

    >>> spaces = [("small", "big"), ("small", "big")]
    >>> weights = (2.0, 1.0)
    >>> def evaluate(configs):
    ...     return sum(w for w, c in zip(weights, configs) if c == "big")
    >>> result = evolve(spaces, [(1, 10), (1, 10)], evaluate, max_params=11, population=3,
    ...                 iterations=1, progress=False)
    >>> result.configs, result.score, result.num_params
    (('big', 'small'), 2.0, 11)
    """
    if not callable(evaluate):
        raise TypeError(f"evaluate must be a callable returning a score, got {type(evaluate).__name__}")
    table = _check_problem(spaces, counts)
    max_params = check_int("max_params", max_params, minimum=0)
    min_params = check_int("min_params", min_params, minimum=0)
    settings = _Settings.checked(population, top_k, iterations, mutations, crossovers, seed, mutation_prob)
    if min_params > max_params:
        raise ValueError(f"min_params ({min_params:,}) must be <= max_params ({max_params:,})")
    names = tuple(str(i) for i in range(len(spaces))) if target_names is None else tuple(target_names)
    if len(names) != len(spaces):
        raise ValueError(f"target_names must name every layer ({len(spaces)}), got {len(names)}")
    budget = _Budget(table, min_params, max_params)
    lowest, highest = budget.bounds()
    if lowest > max_params or highest < min_params:
        raise ValueError(f"no configuration fits the budget [{min_params:,}, {max_params:,}]: the search space "
                         f"spans {lowest:,} to {highest:,} active parameters")
    scores = _Scores(spaces, evaluate, budget)
    history = _run(scores, budget, settings, progress)
    best = scores.ranked()[0]
    return SearchResult(configs=scores.configs(best), score=scores.values[best], num_params=budget.count(best),
                        history=history, evaluations=len(scores.values), target_names=names)


def _run(scores: _Scores, budget: _Budget, settings: _Settings, progress: bool) -> tuple[SearchRecord, ...]:
    """The generations of :func:`evolve` (module text), scoring each new individual once; the
    best so far after each generation."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([settings.seed, *_STREAM])))
    history: list[SearchRecord] = []
    bar = _Progress(settings.iterations + 1, progress)

    def record(iteration: int, generation: list[_Genes]) -> None:
        for genes in generation:
            scores.score(genes)
        history.append(scores.record(iteration, len(generation)))
        bar.update(history[-1])

    try:
        record(0, _initial_population(rng, budget, settings.population))
        for iteration in range(1, settings.iterations + 1):
            record(iteration, _next_generation(rng, budget, scores, population=settings.population,
                                               top_k=settings.top_k, mutation_prob=settings.mutation_prob,
                                               mutations=settings.mutations, crossovers=settings.crossovers))
    finally:
        bar.close()
    return tuple(history)
