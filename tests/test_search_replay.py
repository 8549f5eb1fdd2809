"""The authors' search, candidate by candidate: ``--rng reference`` against ``search_replay.json``.

The fixture ran the reference's ``EvolutionSearcher`` unchanged on numpy's stream seeded 0 once,
folds 0 ... k-1 in sequence, with the model's evaluation replaced by a deterministic scorer (its
``scorer`` field). Here the project's search runs in that mode with that scorer: first the search
itself (search/evolution.py with search/draws.py), then stage 2 end to end (its scorers replaced by the
fixture's), whose history.jsonl must list the same candidates in the same order.
"""
import json
import os
from pathlib import Path

import pytest

from search.draws import ReferenceDraws
from search.evolution import EvolutionSearch

from .conftest import load_script
from .test_stage2 import MODEL, VAL_BATCH, captured, stage1

stage2 = load_script("02kfold_evolution.py")


@pytest.fixture(scope="module")
def replay(fixtures_dir) -> dict:
    path = fixtures_dir / "search_replay.json"
    if not path.is_file():
        why = f"{path} not found (the reference's search, recorded candidate by candidate)"
        if os.environ.get("BASQ_REQUIRE_FIXTURES") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return json.loads(path.read_text())


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


@pytest.mark.parametrize("case_index", [0, 1])
def test_the_search_replays_every_fold(replay, case_index):
    case = replay["cases"][case_index]
    draws = ReferenceDraws(0)  # seeded once: every fold continues the stream
    for recorded in case["folds"]:
        fold = recorded["fold"]
        evaluated: list = []
        generations: list = []
        result = case_search(
            case, fold, draws, progress=lambda cand, acc, seen=evaluated: seen.append(list(cand)),
            checkpoint=lambda state, seen=generations: seen.append([list(c) for c in state.population])).run()
        assert evaluated == recorded["evaluated"], f"fold {fold}"
        assert generations == recorded["generations"], f"fold {fold}"
        assert list(result.best) == recorded["arch"]
        assert result.best_acc == recorded["fold_acc"]
        assert full_acc(case["table"], fold, result.best) == recorded["full_acc"]
        assert result.num_evaluated == len(recorded["evaluated"])


def test_the_small_case_exercises_giving_up(replay):
    """Case 2's space (27 candidates) makes crossover give up after ten tries per child asked for."""
    case = replay["cases"][1]
    s = case["settings"]
    assert s["nr_state"] ** s["nr_layer"] == 27
    draws, children = ReferenceDraws(0), []
    for recorded in case["folds"]:
        search = case_search(case, recorded["fold"], draws)
        crossover = search.get_crossover
        search.get_crossover = lambda crossover=crossover: children.append(len(c := crossover())) or c
        search.run()
    assert min(children) < s["crossover_num"]


# -- stage 2 end to end -----------------------------------------------------------------------

def fixture_scorers(table: list):
    """Stage 2's ``fold_scorers`` replaced by the fixture's scorer (the model is not asked)."""
    def scorers(args, setup, fold, calibration):
        return (lambda cand: fold_acc(table, fold, cand)), (lambda cand: full_acc(table, fold, cand))
    return scorers


@pytest.fixture(scope="module")
def seven_branch_supernet(tmp_path_factory, image_folder) -> tuple[Path, list[str]]:
    """A supernet with the fixture's 7 branches (17 searchable layers, as MobileNet-v2's)."""
    model = [*MODEL[:-1], "0.01,0.005,0.001,0.0005,0.0001,0.00005,0.00001"]
    out = tmp_path_factory.mktemp("stage1-7")
    captured(stage1.train, stage1.parse_args([
        "--data", str(image_folder), "--teacher", "none", "--save", str(out), *model,
        "--batch_size", "8", "--replicas", "2", "-j", "0", "--abin_total_iters", "1",
        "--awbin_total_iters", "1"]))
    return out / "model_actwbin_best_00001it.pth", model


def case_args(image_folder, supernet: Path, model: list[str], save: Path, settings: dict, *extra: str):
    # 6 validation batches: k = 3 gives folds of 2 batches
    return stage2.parse_args([
        "--data", str(image_folder), "--supernet", str(supernet), "--save", str(save), "-j", "0", *model,
        "--k", str(settings["k"]), "--val_batch_size", str(VAL_BATCH),
        "--max-epochs", str(settings["max_epochs"]), "--population-num", str(settings["population_num"]),
        "--select-num", str(settings["select_num"]), "--mutation-num", str(settings["mutation_num"]),
        "--crossover-num", str(settings["crossover_num"]), "--m_prob", str(settings["m_prob"]), *extra])


def history(save: Path) -> list[dict]:
    return [json.loads(line) for line in (save / "history.jsonl").read_text().splitlines()]


def test_stage2_with_rng_reference_replays_the_authors_search(replay, seven_branch_supernet, image_folder,
                                                              tmp_path, monkeypatch):
    case = replay["cases"][0]
    assert case["settings"]["nr_layer"] == 17 and case["settings"]["nr_state"] == 7
    monkeypatch.setattr(stage2, "fold_scorers", fixture_scorers(case["table"]))
    supernet, model = seven_branch_supernet
    found, text = captured(stage2.search, case_args(image_folder, supernet, model, tmp_path,
                                                    case["settings"], "--rng", "reference"))
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
    assert log.count("fold 0 epoch ") == case["settings"]["max_epochs"]
    assert f"fold 2 final ranking: top 10 of 945 evaluated, full_acc {folds[2]['full_acc']:.2f}" in log
    assert f"  No.1 {tuple(folds[2]['arch'])} fold_acc {folds[2]['fold_acc']:.2f}" in log
