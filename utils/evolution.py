"""Evolutionary search over branch choices, single-path-one-shot style (SPEC section 4).

A candidate is a tuple with one branch index per searchable layer. Structure and constants follow
the reference ``search.py`` (itself the Single Path One-Shot searcher): a random initial
population; each epoch the top ``select_num`` by fold error are kept, children are bred from them
by mutation and by crossover, and random candidates fill the population up again.

Draw order, all from the one injected ``random.Random`` (so a seed fixes the whole search):

* random candidate: ``randrange(num_branches)`` per gene, first layer first;
* mutation: ``choice(top_k)`` for the parent, then per gene ``random()``, followed by
  ``randrange(num_branches)`` only when that draw is below ``m_prob``;
* crossover: ``choice(top_k)`` twice (first and second parent), then per gene ``random()``;
  below 0.5 takes the first parent's gene, otherwise the second's;
* an epoch draws all its mutation tries, then all crossover tries, then the random fill.

After the last epoch's selection the reference still breeds and evaluates one more generation and
ranks it with the rest, so the winner can come from it: so does this search (SPEC 4).

Differences from the reference that do not change which candidate wins: candidates are drawn one
at a time (the reference pre-draws batches of 10). The random fill stops when every candidate of
the space has been evaluated (the reference loops forever there).
"""
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

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


class EvolutionSearch:
    """One search over ``num_branches ** num_layers`` candidates, scored by ``score_fn``.

    ``score_fn(candidate)`` returns the fold accuracy in percent (higher is better); it is called
    at most once per distinct candidate, the result kept in ``memo`` (the reference's
    ``vis_dict``). ``progress`` is told about each evaluation: a callable gets
    ``(candidate, accuracy)``, a tqdm-like object gets ``update(1)``. One instance runs one search.
    """

    def __init__(self, num_layers: int, num_branches: int, score_fn: Callable[[Candidate], float],
                 population_num: int = 45, select_num: int = 10, mutation_num: int = 15,
                 crossover_num: int = 15, m_prob: float = 0.1, max_epochs: int = 20,
                 rng: random.Random | None = None, progress: Progress | None = None) -> None:
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
        self.rng = rng if rng is not None else random.Random()
        self.progress = progress
        self.memo: dict[Candidate, float] = {}
        self.top_k: list[Candidate] = []

    # -- single candidates ------------------------------------------------------------------

    def random_candidate(self) -> Candidate:
        """Each gene uniform over the branches."""
        return tuple(self.rng.randrange(self.num_branches) for _ in range(self.num_layers))

    def mutate(self, parents: list[Candidate]) -> Candidate:
        """A random parent with each gene resampled (possibly to the same value) w.p. ``m_prob``."""
        child = list(self.rng.choice(parents))
        for i in range(self.num_layers):
            if self.rng.random() < self.m_prob:
                child[i] = self.rng.randrange(self.num_branches)
        return tuple(child)

    def crossover(self, parents: list[Candidate]) -> Candidate:
        """Each gene from one of two random parents (possibly the same one), even odds."""
        first = self.rng.choice(parents)
        second = self.rng.choice(parents)
        return tuple(a if self.rng.random() < 0.5 else b for a, b in zip(first, second, strict=True))

    # -- evaluation and selection -----------------------------------------------------------

    def try_evaluate(self, cand: Candidate) -> bool:
        """Score ``cand`` unless seen before; ``True`` when it is new (the reference's ``is_legal``)."""
        if cand in self.memo:
            return False
        acc = float(self.score_fn(cand))
        self.memo[cand] = acc
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
        merged = self.top_k + candidates
        merged.sort(key=lambda c: 100.0 - self.memo[c])
        self.top_k = merged[:self.select_num]

    # -- populations ------------------------------------------------------------------------

    def _breed(self, make_child: Callable[[list[Candidate]], Candidate], num: int) -> list[Candidate]:
        """Up to ``num`` new children; gives up after ``10 * num`` tries, seen children included."""
        children: list[Candidate] = []
        tries = 0
        while len(children) < num and tries < 10 * num:
            tries += 1
            cand = make_child(self.top_k)
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
        while len(population) < self.population_num and len(self.memo) < space:
            cand = self.random_candidate()
            if self.try_evaluate(cand):
                population.append(cand)
        return population

    # -- the search -------------------------------------------------------------------------

    def run(self) -> SearchResult:
        """Run ``max_epochs`` epochs of selection and breeding; return the best fold accuracy.

        As the reference, every epoch ends by breeding and evaluating the next generation, the
        last epoch too, and that last generation is ranked with the rest: ``population_num x
        (max_epochs + 1)`` candidates when breeding never runs out (945 at the defaults).
        ``history`` holds the top-k after each epoch's selection, then the final ranking.
        """
        history: list[Ranked] = []
        population = self.fill_random([])
        for epoch in range(self.max_epochs):
            self.update_top_k(population)
            history.append([(c, self.memo[c]) for c in self.top_k])
            if hasattr(self.progress, "set_postfix"):  # a tqdm bar shows the epoch and the best so far
                self.progress.set_postfix(epoch=f"{epoch + 1}/{self.max_epochs}",
                                          best=f"{self.memo[self.top_k[0]]:.2f}")
            population = self.fill_random(self.get_mutation() + self.get_crossover())
        self.update_top_k(population)
        history.append([(c, self.memo[c]) for c in self.top_k])
        best = self.top_k[0]
        return SearchResult(best=best, best_acc=self.memo[best], history=history,
                            num_evaluated=len(self.memo))


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
