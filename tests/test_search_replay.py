"""The authors' search, candidate by candidate: ``--rng reference`` against ``search_replay.json``.

The fixture ran the reference's ``EvolutionSearcher`` unchanged on numpy's stream seeded 0 once,
folds 0 ... k-1 in sequence, with the model's evaluation replaced by a deterministic scorer (its
``scorer`` field). Here the project's search runs in that mode with that scorer: first the search
itself (search/evolution.py with search/draws.py), then stage 2 end to end (its scorers replaced by the
fixture's), whose history.jsonl must list the same candidates in the same order.
"""
import json

import pytest

from search.draws import ReferenceDraws
from search.evolution import EvolutionSearch

from .conftest import FIXTURES, load_script
from .test_stage2 import MODEL, VAL_BATCH, captured, stage1

stage2 = load_script("02kfold_evolution.py")


def case_count() -> int:
    """How many cases the fixtures folder's ``search_replay.json`` holds (one, which the ``replay``
    fixture then skips or fails on, without the file)."""
    path = FIXTURES / "search_replay.json"
    return len(json.loads(path.read_text())["cases"]) if path.is_file() else 1


CASES = range(case_count())


def correct(table: list, fold: int, cand) -> int:
    """The fixture's ``scorer``: images correct of 5,000 on the fold."""
    noise = (sum((i + 1) * (g + 1) * (i + 7) for i, g in enumerate(cand)) * (fold + 11)) % 23
    return 2500 + sum(table[fold][i][g] for i, g in enumerate(cand)) + noise


def fold_acc(table: list, fold: int, cand) -> float:
    return 100 * correct(table, fold, cand) / 5000


def full_acc(table: list, fold: int, cand) -> float:
    return 100 * (9 * correct(table, fold, cand) - (sum(cand) * 7 + fold) % 50) / 45000


def test_the_scorer_gives_the_recorded_accuracies(replay):
    """The scorer as written here is the fixture's (else the comparisons below prove nothing)."""
    for case in replay["cases"]:
        for fold in case["folds"]:
            assert fold_acc(case["table"], fold["fold"], fold["arch"]) == fold["fold_acc"]
            assert full_acc(case["table"], fold["fold"], fold["arch"]) == fold["full_acc"]


def case_search(case: dict, fold: int, draws: ReferenceDraws, **hooks) -> EvolutionSearch:
    """The project's search with a case's settings and the fixture's scorer on ``fold``."""
    s = case["settings"]
    return EvolutionSearch(
        s["nr_layer"], s["nr_state"], lambda cand: fold_acc(case["table"], fold, cand),
        population_num=s["population_num"], select_num=s["select_num"], mutation_num=s["mutation_num"],
        crossover_num=s["crossover_num"], m_prob=s["m_prob"], max_epochs=s["max_epochs"], draws=draws,
        **hooks)


def replayed(case: dict, **hooks) -> list[tuple[list, list, object]]:
    """Each fold's search on one stream seeded 0 (every fold continues it), as the reference ran
    them: the candidates in the order scored, each generation, the result."""
    draws, out = ReferenceDraws(0), []
    for recorded in case["folds"]:
        evaluated: list = []
        generations: list = []
        search = case_search(
            case, recorded["fold"], draws, progress=lambda cand, acc, seen=evaluated: seen.append(list(cand)),
            checkpoint=lambda state, seen=generations: seen.append([list(c) for c in state.population]))
        for name, hook in hooks.items():
            setattr(search, name, hook.__get__(search))
        out.append((evaluated, generations, search.run()))
    return out


@pytest.mark.parametrize("case_index", CASES)
def test_the_search_replays_every_fold(replay, case_index):
    case = replay["cases"][case_index]
    for recorded, (evaluated, generations, result) in zip(case["folds"], replayed(case), strict=True):
        fold = recorded["fold"]
        assert evaluated == recorded["evaluated"], f"fold {fold}"
        assert generations == recorded["generations"], f"fold {fold}"
        assert list(result.best) == recorded["arch"]
        assert result.best_acc == recorded["fold_acc"]
        assert full_acc(case["table"], fold, result.best) == recorded["full_acc"]
        assert result.num_evaluated == len(recorded["evaluated"])


def test_the_cases_exercise_giving_up(replay):
    """Some case's space is small enough that crossover gives up after ten tries per child asked
    for (the search replays it as the reference did only if it gives up as theirs did)."""
    gave_up = []
    for case in replay["cases"]:
        s = case["settings"]
        draws = ReferenceDraws(0)
        for recorded in case["folds"]:
            search = case_search(case, recorded["fold"], draws)
            crossover = search.get_crossover
            search.get_crossover = lambda crossover=crossover, asked=s["crossover_num"]: gave_up.append(
                len(c := crossover()) < asked) or c
            search.run()
    assert any(gave_up)


# -- stage 2 end to end -----------------------------------------------------------------------

def fixture_scorers(table: list):
    """Stage 2's ``fold_scorers`` replaced by the fixture's scorer (the model is not asked)."""
    def scorers(args, setup, fold, calibration, log):
        return (lambda cand: fold_acc(table, fold, cand)), (lambda cand: full_acc(table, fold, cand))
    return scorers


@pytest.fixture(scope="module")
def supernet_file(tmp_path_factory, image_folder):
    """A briefly trained supernet for stage 2 to load (its evaluation is replaced by the fixture's
    scorer)."""
    out = tmp_path_factory.mktemp("stage1")
    captured(stage1.train, stage1.parse_args([
        "--data", str(image_folder), "--teacher", "none", "--save", str(out), *MODEL,
        "--batch_size", "8", "--replicas", "2", "-j", "0", "--abin_total_iters", "1",
        "--awbin_total_iters", "1"]))
    return out / "model_actwbin_best_00001it.pth"


def case_args(image_folder, supernet, save, settings: dict, *extra: str):
    # 6 validation batches: up to k = 6 folds
    return stage2.parse_args([
        "--data", str(image_folder), "--supernet", str(supernet), "--save", str(save), "-j", "0", *MODEL,
        "--k", str(settings["k"]), "--val_batch_size", str(VAL_BATCH),
        "--max-epochs", str(settings["max_epochs"]), "--population-num", str(settings["population_num"]),
        "--select-num", str(settings["select_num"]), "--mutation-num", str(settings["mutation_num"]),
        "--crossover-num", str(settings["crossover_num"]), "--m_prob", str(settings["m_prob"]), *extra])


def history(save) -> list[dict]:
    return [json.loads(line) for line in (save / "history.jsonl").read_text().splitlines()]


def case_space(settings: dict):
    """Stage 2's ``evaluation_setup`` with the model standing for the case's search space: the
    fixture's scorer replaces the model's evaluation, so only its layer and branch counts matter."""
    real = stage2.evaluation_setup

    def setup(args):
        found = real(args)
        found.model.num_searchable_layers = settings["nr_layer"]
        found.model.num_branches = settings["nr_state"]
        return found
    return setup


@pytest.mark.parametrize("case_index", CASES)
def test_stage2_with_rng_reference_replays_the_authors_search(replay, supernet_file, image_folder, tmp_path,
                                                              monkeypatch, case_index):
    case = replay["cases"][case_index]
    settings = case["settings"]
    monkeypatch.setattr(stage2, "fold_scorers", fixture_scorers(case["table"]))
    monkeypatch.setattr(stage2, "evaluation_setup", case_space(settings))
    found, text = captured(stage2.search, case_args(image_folder, supernet_file, tmp_path, settings,
                                                    "--rng", "reference"))
    folds = case["folds"]
    assert found["archs"] == [f["arch"] for f in folds]
    assert found["fold_accs"] == [f["fold_acc"] for f in folds]
    assert found["full_accs"] == [f["full_acc"] for f in folds]
    assert found["num_candidates"] == [len(f["evaluated"]) for f in folds] and found["rng"] == "reference"
    lines = history(tmp_path)
    assert len(lines) == sum(found["num_candidates"])
    for recorded in folds:
        mine = [line for line in lines if line["fold"] == recorded["fold"]]
        assert [line["candidate"] for line in mine] == recorded["evaluated"]
        assert [line["index"] for line in mine] == list(range(len(mine)))
        assert [line["fold_acc"] for line in mine] == [fold_acc(case["table"], recorded["fold"], c)
                                                      for c in recorded["evaluated"]]
        for epoch, generation in enumerate(recorded["generations"]):
            assert [line["candidate"] for line in mine if line["epoch"] == epoch] == generation
    # each epoch's top-k in the log, the final ranking with the winner's full accuracy
    log = (tmp_path / "log.txt").read_text()
    last = folds[-1]
    top = min(settings["select_num"], len(last["evaluated"]))
    assert log.count(f"fold {folds[0]['fold']} epoch ") == settings["max_epochs"]
    assert (f"fold {last['fold']} final ranking: top {top} of {len(last['evaluated'])} evaluated, "
            f"full_acc {last['full_acc']:.2f}") in log
    assert f"  No.1 {tuple(last['arch'])} fold_acc {last['fold_acc']:.2f}" in log
