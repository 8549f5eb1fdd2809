"""Evolutionary search over branch choices, single-path-one-shot style (SPEC section 4).

A candidate is a tuple with one branch index per searchable layer. Structure and constants follow
the reference ``02kfold_evolution.py`` (itself the Single Path One-Shot searcher): a random initial
population; each epoch the top ``select_num`` by fold error are kept, children are bred from them
by mutation and by crossover, and random candidates fill the population up again.

Draw order, all from the one injected stream (search/draws.py, so a seed fixes the whole search):

* random candidate: ``below(num_branches)`` per gene, first layer first;
* mutation: ``below(len(top_k))`` for the parent, then per gene ``uniform()``, followed by
  ``below(num_branches)`` only when that draw is below ``m_prob``;
* crossover: ``below(len(top_k))`` twice (first and second parent), then per gene ``either``;
* an epoch draws all its mutation tries, then all crossover tries, then the random fill;
* each of those draws ``draws.batch`` candidates at a time and drops what is left of a batch when
  it has enough (the reference's ``stack_random_cand``: ten; the default stream: one).

After the last epoch's selection the reference still breeds and evaluates one more generation and
ranks it with the rest, so the winner can come from it: so does this search (SPEC 4).

The search's ``SearchState`` after each complete generation is everything a rerun needs to
continue it and end as the uninterrupted search would (``checkpoint`` is given it).

Difference from the reference: the random fill stops when every candidate of the space has been
evaluated (the reference loops forever there).
"""
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .draws import Draws, FoldDraws

Candidate = tuple[int, ...]
Ranked = list[tuple[Candidate, float]]


@runtime_checkable
class SupportsUpdate(Protocol):
    """A tqdm-like progress bar."""

    def update(self, n: int = 1) -> object: ...


Progress = Callable[[Candidate, float], object] | SupportsUpdate


@dataclass
class SearchResult:
    """The winner and, per epoch, the kept top-k as ``(candidate, fold accuracy)`` best first."""

    best: Candidate
    best_acc: float
    history: list[Ranked]
    num_evaluated: int


@dataclass
class SearchState:
    """Where a search stands once a generation is complete (the reference's checkpoint).

    ``generation``: the population's number (0: the initial one, ``e + 1``: bred in epoch ``e``);
    ``evaluated``: every candidate scored, in scoring order, with its fold accuracy (the
    reference's ``vis_dict``); ``top_k``: the kept top-k before this population is ranked;
    ``rankings``: each earlier epoch's top-k; ``draws``: the stream's state.
    """

    generation: int = 0
    evaluated: dict[Candidate, float] = field(default_factory=dict)
    top_k: list[Candidate] = field(default_factory=list)
    population: list[Candidate] = field(default_factory=list)
    rankings: list[Ranked] = field(default_factory=list)
    draws: Any = None

    def to_json(self) -> dict:
        return {"generation": self.generation,
                "evaluated": [[list(c), acc] for c, acc in self.evaluated.items()],
                "top_k": [list(c) for c in self.top_k], "population": [list(c) for c in self.population],
                "rankings": [[[list(c), acc] for c, acc in top] for top in self.rankings],
                "draws": self.draws}

    @classmethod
    def from_json(cls, data: dict) -> "SearchState":
        return cls(generation=data["generation"],
                   evaluated={tuple(c): acc for c, acc in data["evaluated"]},
                   top_k=[tuple(c) for c in data["top_k"]],
                   population=[tuple(c) for c in data["population"]],
                   rankings=[[(tuple(c), acc) for c, acc in top] for top in data["rankings"]],
                   draws=data["draws"])


class EvolutionSearch:
    """One search over ``num_branches ** num_layers`` candidates, scored by ``score_fn``.

    ``score_fn(candidate)`` returns the fold accuracy in percent (higher is better); it is called
    at most once per distinct candidate, the result kept in ``state.evaluated``. ``progress`` is
    told about each evaluation: a callable gets ``(candidate, accuracy)``, a tqdm-like object gets
    ``update(1)``. ``ranked(epoch, top_k)`` is called after each epoch's selection and after the
    final ranking (``epoch == max_epochs``); ``checkpoint(state)`` once each generation is
    complete. A search given the ``state`` of an earlier one continues it. One instance runs one
    search.
    """

    def __init__(self, num_layers: int, num_branches: int, score_fn: Callable[[Candidate], float],
                 population_num: int = 45, select_num: int = 10, mutation_num: int = 15,
                 crossover_num: int = 15, m_prob: float = 0.1, max_epochs: int = 20,
                 draws: Draws | None = None, progress: Progress | None = None,
                 state: SearchState | None = None,
                 ranked: Callable[[int, Ranked], object] | None = None,
                 checkpoint: Callable[[SearchState], object] | None = None) -> None:
        for name, value in [("num_layers", num_layers), ("num_branches", num_branches),
                            ("population_num", population_num), ("select_num", select_num),
                            ("max_epochs", max_epochs)]:
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if mutation_num < 0 or crossover_num < 0:
            raise ValueError(f"mutation_num and crossover_num must be >= 0, "
                             f"got {mutation_num} and {crossover_num}")
        if not 0.0 <= m_prob <= 1.0:
            raise ValueError(f"m_prob must lie in [0, 1], got {m_prob}")
        self.num_layers = num_layers
        self.num_branches = num_branches
        self.score_fn = score_fn
        self.population_num = population_num
        self.select_num = select_num
        self.mutation_num = mutation_num
        self.crossover_num = crossover_num
        self.m_prob = m_prob
        self.max_epochs = max_epochs
        self.draws = draws if draws is not None else FoldDraws(0)
        self.progress = progress
        self.ranked = ranked
        self.checkpoint = checkpoint
        self.resumed = state is not None
        self.state = state if state is not None else SearchState()
        if self.resumed:
            self.draws.state = self.state.draws

    # -- single candidates ------------------------------------------------------------------

    def random_candidate(self) -> Candidate:
        """Each gene uniform over the branches."""
        return tuple(self.draws.below(self.num_branches) for _ in range(self.num_layers))

    def mutate(self, parents: list[Candidate]) -> Candidate:
        """A random parent with each gene resampled (possibly to the same value) w.p. ``m_prob``."""
        child = list(parents[self.draws.below(len(parents))])
        for i in range(self.num_layers):
            if self.draws.uniform() < self.m_prob:
                child[i] = self.draws.below(self.num_branches)
        return tuple(child)

    def crossover(self, parents: list[Candidate]) -> Candidate:
        """Each gene from one of two random parents (possibly the same one), even odds."""
        first = parents[self.draws.below(len(parents))]
        second = parents[self.draws.below(len(parents))]
        return tuple(self.draws.either(a, b) for a, b in zip(first, second, strict=True))

    def drawn(self, make: Callable[[], Candidate]):
        """Candidates from ``make``, ``draws.batch`` drawn at a time (the reference's
        ``stack_random_cand``); a caller that stops early drops the rest of the batch."""
        while True:
            yield from [make() for _ in range(self.draws.batch)]

    # -- evaluation and selection -----------------------------------------------------------

    def try_evaluate(self, cand: Candidate) -> bool:
        """Score ``cand`` unless seen before; ``True`` when it is new (the reference's ``is_legal``)."""
        if cand in self.state.evaluated:
            return False
        acc = float(self.score_fn(cand))
        self.state.evaluated[cand] = acc
        self._report(cand, acc)
        return True

    def _report(self, cand: Candidate, acc: float) -> None:
        if isinstance(self.progress, SupportsUpdate):
            self.progress.update(1)
        elif self.progress is not None:
            self.progress(cand, acc)

    def update_top_k(self, candidates: list[Candidate]) -> None:
        """Merge new candidates into the kept top-k, sorted by fold error ascending.

        The sort is stable, so on equal error the candidates kept earlier stay ahead.
        """
        merged = self.state.top_k + candidates
        merged.sort(key=lambda c: 100.0 - self.state.evaluated[c])
        self.state.top_k = merged[:self.select_num]

    # -- populations ------------------------------------------------------------------------

    def _breed(self, make_child: Callable[[list[Candidate]], Candidate], num: int) -> list[Candidate]:
        """Up to ``num`` new children; gives up after ``10 * num`` tries, seen children included."""
        children: list[Candidate] = []
        tries = 0
        parents = self.state.top_k
        drawn = self.drawn(lambda: make_child(parents))
        while len(children) < num and tries < 10 * num:
            tries += 1
            cand = next(drawn)
            if self.try_evaluate(cand):
                children.append(cand)
        return children

    def get_mutation(self) -> list[Candidate]:
        """Up to ``mutation_num`` new children by mutation of the top-k."""
        return self._breed(self.mutate, self.mutation_num)

    def get_crossover(self) -> list[Candidate]:
        """Up to ``crossover_num`` new children by crossover of the top-k."""
        return self._breed(self.crossover, self.crossover_num)

    def fill_random(self, population: list[Candidate]) -> list[Candidate]:
        """``population`` topped up to ``population_num`` with new random candidates.

        Stops early once the whole space has been evaluated, where no new candidate exists.
        """
        population = list(population)
        space = self.num_branches ** self.num_layers
        drawn = self.drawn(self.random_candidate)
        while len(population) < self.population_num and len(self.state.evaluated) < space:
            cand = next(drawn)
            if self.try_evaluate(cand):
                population.append(cand)
        return population

    # -- the search -------------------------------------------------------------------------

    def _generation_done(self, population: list[Candidate]) -> None:
        self.state.population = population
        self.state.draws = self.draws.state
        if self.checkpoint is not None:
            self.checkpoint(self.state)

    def _rank(self, epoch: int) -> None:
        self.update_top_k(self.state.population)
        top = [(c, self.state.evaluated[c]) for c in self.state.top_k]
        self.state.rankings.append(top)
        if self.ranked is not None:
            self.ranked(epoch, top)

    def run(self) -> SearchResult:
        """Run ``max_epochs`` epochs of selection and breeding; return the best fold accuracy.

        As the reference, every epoch ends by breeding and evaluating the next generation, the
        last epoch too, and that last generation is ranked with the rest: ``population_num x
        (max_epochs + 1)`` candidates when breeding never runs out (945 at the defaults).
        ``history`` holds the top-k after each epoch's selection, then the final ranking.
        """
        state = self.state
        if not self.resumed:
            self._generation_done(self.fill_random([]))
        while state.generation < self.max_epochs:
            self._rank(state.generation)
            if hasattr(self.progress, "set_postfix"):  # a tqdm bar shows the epoch and the best so far
                self.progress.set_postfix(epoch=f"{state.generation + 1}/{self.max_epochs}",
                                          best=f"{state.evaluated[state.top_k[0]]:.2f}")
            children = self.fill_random(self.get_mutation() + self.get_crossover())
            state.generation += 1
            self._generation_done(children)
        self._rank(self.max_epochs)
        best = state.top_k[0]
        return SearchResult(best=best, best_acc=state.evaluated[best], history=state.rankings,
                            num_evaluated=len(state.evaluated))


def uniform_search(num_layers: int, num_branches: int, score_fn: Callable[[Candidate], float],
                   progress: SupportsUpdate | None = None) -> SearchResult:
    """BASQ without search (an ablation): the best of the selections that take the same branch,
    so the same L2 decay, in every layer. Ties go to the lower branch index.
    """
    ranked: Ranked = []
    for branch in range(num_branches):
        cand = (branch,) * num_layers
        ranked.append((cand, float(score_fn(cand))))
        if progress is not None:
            progress.update(1)
    ranked.sort(key=lambda item: -item[1])  # stable: equal accuracies keep branch order
    best, best_acc = ranked[0]
    return SearchResult(best=best, best_acc=best_acc, history=[ranked], num_evaluated=len(ranked))
