"""The evolutionary search of stage 2, on toy scores (no model)."""
import random
from collections import Counter

import pytest

from search.draws import FoldDraws, ReferenceDraws
from search.evolution import EvolutionSearch, SearchResult, uniform_search
from search.files import FoldHistory, read_state, state_path, write_state

TARGET = (2, 0, 1, 1, 0, 2, 2, 1)


def matches(cand: tuple[int, ...]) -> float:
    """Percent of genes equal to the hidden target: a fold accuracy with one optimum."""
    return 100.0 * sum(a == b for a, b in zip(cand, TARGET, strict=False)) / len(TARGET)


def make(seed: int = 0, score_fn=matches, **kwargs) -> EvolutionSearch:
    kwargs = {"num_layers": len(TARGET), "num_branches": 3, **kwargs}
    return EvolutionSearch(score_fn=score_fn, draws=FoldDraws(seed), **kwargs)


# -- single candidates, replayed with a second generator of the same seed --------------------

def test_random_candidate_draws_one_gene_per_layer_in_order():
    s, replay = make(seed=3), random.Random(3)
    for _ in range(5):
        assert s.random_candidate() == tuple(replay.randrange(3) for _ in range(len(TARGET)))


def test_mutation_resamples_exactly_the_genes_whose_draw_is_below_m_prob():
    parents = [(0,) * 8, (1,) * 8, (2,) * 8]
    s, replay = make(seed=5, m_prob=0.3), random.Random(5)
    for _ in range(20):
        expected = list(replay.choice(parents))
        for i in range(8):
            if replay.random() < 0.3:
                expected[i] = replay.randrange(3)
        assert s.mutate(parents) == tuple(expected)


def test_mutation_with_m_prob_zero_copies_a_parent():
    parents = [(0, 1, 2, 0, 1, 2, 0, 1), (1, 2, 0, 1, 2, 0, 1, 2)]
    s, replay = make(seed=1, m_prob=0.0), random.Random(1)
    for _ in range(10):
        expected = replay.choice(parents)
        for _ in range(8):  # the per-gene draws are still consumed
            replay.random()
        assert s.mutate(parents) == expected


def test_mutation_with_m_prob_one_resamples_every_gene():
    s, replay = make(seed=2, m_prob=1.0, num_branches=50), random.Random(2)
    parents = [(99,) * 8]  # a value no resample can give: every gene must change
    for _ in range(10):
        replay.choice(parents)
        expected = []
        for _ in range(8):
            replay.random()
            expected.append(replay.randrange(50))
        child = s.mutate(parents)
        assert child == tuple(expected)
        assert 99 not in child


def test_crossover_takes_each_gene_from_the_first_parent_below_one_half():
    parents = [(0,) * 8, (1,) * 8, (2,) * 8]  # a gene's value tells which parent gave it
    s, replay = make(seed=7), random.Random(7)
    mixed = 0
    for _ in range(30):
        first, second = replay.choice(parents), replay.choice(parents)
        expected = tuple(first[i] if replay.random() < 0.5 else second[i] for i in range(8))
        child = s.crossover(parents)
        assert child == expected
        assert set(child) <= {first[0], second[0]}
        mixed += len(set(child)) == 2
    assert mixed > 0


# -- memo, selection, breeding limits ---------------------------------------------------------

def test_score_fn_is_called_once_per_distinct_candidate():
    calls = Counter()

    def counted(cand):
        calls[cand] += 1
        return matches(cand)

    s = make(score_fn=counted, population_num=20, select_num=5, mutation_num=8, crossover_num=8,
             max_epochs=10, num_branches=2)  # a small space (256): many repeats are drawn
    result = s.run()
    assert max(calls.values()) == 1
    assert set(calls) == set(s.state.evaluated)
    assert result.num_evaluated == len(calls) == len(s.state.evaluated)
    assert all(s.state.evaluated[c] == matches(c) for c in s.state.evaluated)


def test_update_top_k_merges_sorts_by_error_and_keeps_earlier_on_ties():
    scores = {(0,): 50.0, (1,): 70.0, (2,): 50.0, (3,): 90.0, (4,): 10.0}
    s = EvolutionSearch(1, 5, scores.__getitem__, select_num=3, draws=FoldDraws(0))
    for c in [(0,), (4,), (1,)]:
        s.try_evaluate(c)
    s.update_top_k([(0,), (4,), (1,)])
    assert s.state.top_k == [(1,), (0,), (4,)]
    for c in [(2,), (3,)]:
        s.try_evaluate(c)
    s.update_top_k([(2,), (3,)])
    assert s.state.top_k == [(3,), (1,), (0,)]  # (0,) was kept before (2,) ties with it


def test_breeding_gives_up_after_ten_tries_per_child_in_an_exhausted_space():
    s = make(num_layers=2, num_branches=2, score_fn=lambda c: float(sum(c)), mutation_num=3,
             crossover_num=4)
    assert sorted(s.fill_random([])) == [(0, 0), (0, 1), (1, 0), (1, 1)]  # population 45 > 4
    s.update_top_k(list(s.state.evaluated))
    tries = Counter()
    s.mutate = lambda parents: tries.update(["m"]) or parents[0]
    s.crossover = lambda parents: tries.update(["c"]) or parents[0]
    assert s.get_mutation() == [] and s.get_crossover() == []
    assert tries == {"m": 30, "c": 40}


def test_tiny_space_search_ends_with_every_candidate_scored_once():
    calls = Counter()

    def score(cand):
        calls[cand] += 1
        return 100.0 * (cand == (1, 0))

    result = make(num_layers=2, num_branches=2, score_fn=score).run()  # population 45 > 4
    assert result.best == (1, 0) and result.best_acc == 100.0
    assert calls == {(0, 0): 1, (0, 1): 1, (1, 0): 1, (1, 1): 1}
    assert len(result.history) == 21


def test_one_epoch_scores_the_initial_population_and_one_bred_generation():
    result = make(max_epochs=1, population_num=12, mutation_num=4, crossover_num=4).run()
    assert result.num_evaluated == 24
    assert len(result.history) == 2 and all(len(top) == 10 for top in result.history)


def test_the_generation_bred_after_the_last_epoch_can_win():
    """The reference ranks the last generation with the rest: its best can be the winner."""
    scores: dict = {}

    def score(cand):  # every new candidate scores higher than all before it
        scores.setdefault(cand, float(len(scores)))
        return scores[cand]

    s = make(max_epochs=2, population_num=6, select_num=3, mutation_num=2, crossover_num=2,
             score_fn=score)
    result = s.run()
    last_generation = list(scores)[-6:]
    assert result.num_evaluated == 18 and result.best in last_generation
    assert result.best_acc == max(scores.values())


# -- whole searches ---------------------------------------------------------------------------

def test_search_finds_the_hidden_target_and_never_gets_worse():
    result = make(seed=0).run()
    assert isinstance(result, SearchResult)
    assert result.best == TARGET and result.best_acc == 100.0
    assert len(result.history) == 21
    for before, after in zip(result.history, result.history[1:], strict=False):
        assert all(a >= b for (_, a), (_, b) in zip(after, before, strict=False))
    for top in result.history:
        accs = [acc for _, acc in top]
        assert accs == sorted(accs, reverse=True) and len(top) == 10
        assert all(acc == matches(c) for c, acc in top)
    assert result.history[-1][0] == (result.best, result.best_acc)


def test_same_seed_same_search_other_seed_other_path():
    a, b, c = make(seed=11), make(seed=11), make(seed=12)
    ra, rb, rc = a.run(), b.run(), c.run()
    assert ra == rb and list(a.state.evaluated.items()) == list(b.state.evaluated.items())
    assert list(a.state.evaluated) != list(c.state.evaluated)
    assert rc.best == TARGET


def test_search_respects_the_population_and_breeding_sizes():
    evaluated = []
    s = make(seed=4, num_layers=20, num_branches=4, score_fn=lambda c: float(sum(c)),
             max_epochs=3, progress=lambda cand, acc: evaluated.append(cand))
    result = s.run()
    # 4**20 candidates: breeding never runs out, so every generation has exactly 45 new ones: the
    # initial population and one bred after each epoch, the last included (945 at 20 epochs)
    assert result.num_evaluated == len(evaluated) == (3 + 1) * 45


def test_progress_accepts_a_tqdm_like_bar():
    class Bar:
        n = 0

        def update(self, n=1):
            self.n += n

    bar = Bar()
    result = make(progress=bar, max_epochs=3).run()
    assert bar.n == result.num_evaluated


@pytest.mark.parametrize("kwargs, message", [
    ({"num_layers": 0}, "num_layers"), ({"num_branches": 0}, "num_branches"),
    ({"population_num": 0}, "population_num"), ({"select_num": 0}, "select_num"),
    ({"max_epochs": 0}, "max_epochs"), ({"mutation_num": -1}, "mutation_num"),
    ({"m_prob": 1.5}, "m_prob"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


# -- the uniform ablation ---------------------------------------------------------------------

def test_uniform_search_scores_each_uniform_candidate_once_and_keeps_the_best():
    calls = []

    def score(cand):
        calls.append(cand)
        return {0: 40.0, 1: 75.0, 2: 60.0, 3: 10.0}[cand[0]] + (cand != (cand[0],) * len(cand)) * 1000

    class Bar:
        n = 0

        def update(self, n=1):
            self.n += n

    bar = Bar()
    result = uniform_search(6, 4, score, progress=bar)
    assert calls == [(0,) * 6, (1,) * 6, (2,) * 6, (3,) * 6]  # only uniform ones, each once, in order
    assert isinstance(result, SearchResult)
    assert result.best == (1,) * 6 and result.best_acc == 75.0
    assert result.num_evaluated == 4 and bar.n == 4
    assert result.history == [[((1,) * 6, 75.0), ((2,) * 6, 60.0), ((0,) * 6, 40.0), ((3,) * 6, 10.0)]]


@pytest.mark.parametrize("scores, best", [
    ([50.0, 50.0, 50.0], 0), ([10.0, 80.0, 80.0], 1), ([10.0, 20.0, 80.0], 2), ([90.0, 20.0, 90.0], 0),
])
def test_uniform_search_ties_go_to_the_lower_branch(scores, best):
    result = uniform_search(3, len(scores), lambda c: scores[c[0]])
    assert result.best == (best,) * 3
    assert result.best_acc == max(scores)
    assert result.num_evaluated == len(scores)


def test_uniform_search_with_one_branch_and_integer_scores():
    result = uniform_search(5, 1, lambda c: 7)
    assert result.best == (0, 0, 0, 0, 0)
    assert result.best_acc == 7.0 and type(result.best_acc) is float
    assert result.num_evaluated == 1


# -- a search killed at any point continues from its state and history ------------------------

class Killed(Exception):
    pass


@pytest.mark.parametrize("draws", [FoldDraws, ReferenceDraws])
def test_a_search_killed_anywhere_continues_to_the_uninterrupted_result(tmp_path, draws):
    settings = {"population_num": 6, "select_num": 3, "mutation_num": 2, "crossover_num": 2,
                "max_epochs": 3}

    def run(save, kill_after=None):
        calls = []

        def score(cand):
            if len(calls) == kill_after:
                raise Killed
            calls.append(cand)
            return matches(cand)

        path = state_path(save, 0)
        saved = read_state(path)
        state = saved[0] if saved is not None else None
        scored = FoldHistory(save, 0, score, state)
        search = EvolutionSearch(len(TARGET), 3, scored, draws=draws(5), state=state,
                                 ranked=lambda epoch, top: setattr(scored, "epoch", epoch + 1),
                                 checkpoint=lambda state: write_state(path, state, {}, {}), **settings)
        return search.run(), calls

    whole, calls = run(tmp_path / "whole")
    total = len(calls)
    assert total == 6 * 4
    expected = (tmp_path / "whole" / "history.jsonl").read_text()
    for kill_after in range(total):
        save = tmp_path / f"killed{kill_after}"
        with pytest.raises(Killed):
            run(save, kill_after)
        again, rescored = run(save)
        assert again == whole
        assert len(rescored) == total - kill_after  # none scored twice
        assert (save / "history.jsonl").read_text() == expected
