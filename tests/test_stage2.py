"""Stage 2 on a briefly trained supernet: the JSON and printed results, resumable folds, the fold
accuracy against an independent computation, history.jsonl, a search killed inside a fold and
continued (with either random stream), and bad input.

The fold split, mutation, crossover and the memo are tested in test_folds.py and test_evolution.py.
One stage-1 and one stage-2 run serve this module and test_stage3.py.
"""
import contextlib
import io
import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from search.folds import fold_batches
from search.results import parse_block
from utils.checkpoint import load_file, load_supernet
from utils.data import build_datasets, val_loader
from utils.errors import UsageError

from .conftest import assert_clean_failure, load_script, normalised, run_script

stage1 = load_script("01train_supernet.py")
stage2 = load_script("02kfold_evolution.py")

MODEL = ["--width_multiplier", "0.25", "--width_divisor", "8", "--base_resolution", "32",
         "--l2_bounds", "0.01,0.001,0.0001"]
K = 2
VAL_BATCH = 4  # 3 classes x 8 validation images: 6 batches, 3 per fold
SEARCH = ["--k", str(K), "--val_batch_size", str(VAL_BATCH), "--max-epochs", "2", "--population-num", "4",
          "--select-num", "2", "--mutation-num", "1", "--crossover-num", "1", "--replicas", "2"]
SUPERNET = "model_actwbin_best_00002it.pth"


@contextlib.contextmanager
def one_thread():
    """Torch on one thread: the tiny models run as fast, and a machine busy with other work
    (2 cores here) no longer slows every operator down by waiting for a descheduled thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def captured(fn, *args):
    """``fn(*args)`` and what it printed (the log lines and the result block go to stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), one_thread():
        result = fn(*args)
    return result, out.getvalue()


def block(text: str, title: str) -> dict[str, list]:
    marker = f"==={title}==="
    assert text.count(marker) == 1, text
    return parse_block(text[text.index(marker):])


def stage2_args(data, supernet, save, *extra):
    return stage2.parse_args(["--data", str(data), "--supernet", str(supernet), "--save", str(save),
                              "-j", "0", *MODEL, *SEARCH, *extra])


_SHARED: dict[tuple[str, str], object] = {}


def _once(key: tuple[str, str], make):
    """One stage-1 and one stage-2 run per session, whichever test module asks first."""
    if key not in _SHARED:
        _SHARED[key] = make()
    return _SHARED[key]


def shared_supernet(tmp_path_factory, image_folder) -> Path:
    """A stage-1 phase-2 checkpoint after 2 + 2 iterations."""

    def make():
        out = tmp_path_factory.mktemp("stage1")
        args = stage1.parse_args(["--data", str(image_folder), "--teacher", "none", "--save", str(out),
                                  *MODEL, "--batch_size", "8", "--replicas", "2", "-j", "0",
                                  "--abin_total_iters", "2",
                                  "--awbin_total_iters", "2"])
        captured(stage1.train, args)
        assert (out / SUPERNET).is_file()
        return out / SUPERNET

    return _once(("supernet", str(image_folder)), make)


def shared_search_run(tmp_path_factory, image_folder) -> tuple[Path, dict, str]:
    """A finished stage-2 run on that supernet: ``(save folder, returned result, printed text)``."""
    supernet = shared_supernet(tmp_path_factory, image_folder)

    def make():
        save = tmp_path_factory.mktemp("stage2")
        result, text = captured(stage2.search, stage2_args(image_folder, supernet, save))
        return save, result, text

    return _once(("search", str(image_folder)), make)


@pytest.fixture(scope="module")
def supernet(tmp_path_factory, image_folder) -> Path:
    return shared_supernet(tmp_path_factory, image_folder)


@pytest.fixture(scope="module")
def search_run(tmp_path_factory, image_folder):
    return shared_search_run(tmp_path_factory, image_folder)


def test_reference_defaults():
    args = stage2.parse_args([])
    assert (args.k, args.max_epochs, args.select_num, args.population_num) == (10, 20, 10, 45)
    assert (args.mutation_num, args.crossover_num, args.m_prob) == (15, 15, 0.1)
    assert (args.val_batch_size, args.max_val_iters, args.seed) == (200, 0, 0)
    assert args.save == "eval-kfold-evolution"


def test_search_result_json(search_run, supernet):
    save, result, _ = search_run
    found = json.loads((save / "search_result.json").read_text())
    assert found == result
    config = load_file(supernet)["config"]
    assert found["config"] == config
    assert (found["k"], found["num_batches"], found["val_batch_size"]) == (K, 6, VAL_BATCH)
    assert (found["population_num"], found["select_num"], found["max_epochs"]) == (4, 2, 2)
    assert len(found["fold_accs"]) == len(found["full_accs"]) == len(found["archs"]) == K
    for acc in found["fold_accs"] + found["full_accs"]:
        assert isinstance(acc, float) and 0 <= acc <= 100
    for arch in found["archs"]:
        assert len(arch) == 17  # MobileNet-v2's searchable layers
        assert all(type(b) is int and 0 <= b < 3 for b in arch)
    for fold in range(K):
        per_fold = json.loads((save / "folds" / f"fold{fold}.json").read_text())
        assert per_fold["fold"] == fold
        assert per_fold["fold_acc"] == found["fold_accs"][fold]
        assert per_fold["full_acc"] == found["full_accs"][fold]
        assert per_fold["arch"] == found["archs"][fold]
        assert per_fold["num_candidates"] == found["num_candidates"][fold]
    # population x (epochs + 1): the generation bred after the last epoch is evaluated too
    assert found["num_candidates"] == [4 * (2 + 1)] * K
    assert (save / "log.txt").is_file()


def test_printed_block_round_trips(search_run):
    save, _, text = search_run
    found = json.loads((save / "search_result.json").read_text())
    assert "archs: [(" in text  # tuples, as the reference prints them
    assert block(text, "total-result") == {
        "folds": list(range(K)), "fold_accs": found["fold_accs"], "full_accs": found["full_accs"],
        "archs": found["archs"]}


def independent_top1(supernet, config, image_folder):
    """``top1(arch, batch indices)`` computed here, without stage 2's code; and the batches."""
    model, _ = load_supernet(supernet, config)
    model.eval()
    model.change_precision(True, True)
    batches = list(val_loader(build_datasets(str(image_folder), 32).val, VAL_BATCH, 0))

    def top1(arch, indices):
        correct = total = 0
        with torch.no_grad(), one_thread():
            for i in indices:
                images, labels = batches[i]
                correct += int((model(normalised(images), tuple(arch)).argmax(1) == labels).sum())
                total += len(labels)
        return 100.0 * correct / total

    return top1, batches


def test_accuracies_match_an_independent_computation(search_run, image_folder, supernet):
    save, found, _ = search_run
    top1, batches = independent_top1(supernet, found["config"], image_folder)
    assert len(batches) == 6

    for fold, arch in enumerate(found["archs"]):
        fold_range, full = fold_batches(len(batches), K, fold)
        assert list(fold_range) == [3 * fold, 3 * fold + 1, 3 * fold + 2]
        assert found["fold_accs"][fold] == top1(arch, fold_range)
        assert found["full_accs"][fold] == top1(arch, full)


class SearchSpy:
    """Counts the searches ``stage2.search`` starts (one per fold it does not keep)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = stage2.EvolutionSearch

        def spy(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(stage2, "EvolutionSearch", spy)


def test_rerun_keeps_finished_folds(search_run, image_folder, supernet, tmp_path, monkeypatch):
    save, first, _ = search_run
    copy = tmp_path / "save"
    shutil.copytree(save, copy)
    spy = SearchSpy(monkeypatch)
    again, text = captured(stage2.search, stage2_args(image_folder, supernet, copy))
    assert spy.calls == 0
    assert again == first
    assert "fold 0: finished earlier" in text and "fold 1: finished earlier" in text
    assert block(text, "total-result")["archs"] == first["archs"]

    # A lost fold file: only that fold is searched again, with the same outcome.
    fold0 = (copy / "folds" / "fold0.json").read_bytes()
    fold1 = (copy / "folds" / "fold1.json").read_bytes()
    (copy / "folds" / "fold1.json").unlink()
    again, text = captured(stage2.search, stage2_args(image_folder, supernet, copy))
    assert spy.calls == 1
    assert "fold 0: finished earlier" in text and "fold 1: finished earlier" not in text
    assert (copy / "folds" / "fold0.json").read_bytes() == fold0
    assert json.loads((copy / "folds" / "fold1.json").read_bytes()) == json.loads(fold1)
    assert again == first

    # A half-written fold file counts as missing.
    (copy / "folds" / "fold1.json").write_text('{"fold": 1, "fold_acc"')
    captured(stage2.search, stage2_args(image_folder, supernet, copy))
    assert spy.calls == 2


def test_a_subset_of_folds_gives_those_folds_of_the_full_run(search_run, image_folder, supernet, tmp_path):
    # Each fold's search is seeded by seed + fold, so it does not depend on the folds searched before.
    _, first, _ = search_run
    only, text = captured(stage2.search, stage2_args(image_folder, supernet, tmp_path, "--folds", "1"))
    assert only["folds"] == [1]
    assert block(text, "total-result")["folds"] == [1]
    for key in ("fold_accs", "full_accs", "archs"):
        assert only[key] == first[key][1:]


def read_history(save: Path) -> list[dict]:
    return [json.loads(line) for line in (save / "history.jsonl").read_text().splitlines()]


def test_history_has_one_line_per_evaluated_candidate(search_run):
    save, found, text = search_run
    lines = read_history(save)
    assert len(lines) == sum(found["num_candidates"])
    for fold in range(K):
        mine = [line for line in lines if line["fold"] == fold]
        assert [line["index"] for line in mine] == list(range(found["num_candidates"][fold]))
        assert len({tuple(line["candidate"]) for line in mine}) == len(mine)  # none scored twice
        # population 4 per epoch: the initial one (epoch 0), then one bred in each of the 2 epochs
        assert [line["epoch"] for line in mine] == [0] * 4 + [1] * 4 + [2] * 4
        best = max(mine, key=lambda line: line["fold_acc"])
        assert best["fold_acc"] == found["fold_accs"][fold]
        tied = [line["candidate"] for line in mine if line["fold_acc"] == best["fold_acc"]]
        assert found["archs"][fold] in tied
        state = json.loads((save / "folds" / f"fold{fold}.state.json").read_text())
        assert state["evaluated"] == [[line["candidate"], line["fold_acc"]] for line in mine]
        assert state["generation"] == 2
    log = (save / "log.txt").read_text()
    assert "fold 0 epoch 0/2: top 2 of 4 evaluated\n  No.1 " in log
    assert f"fold 1 final ranking: top 2 of 12 evaluated, full_acc {found['full_accs'][1]:.2f}" in log


class Killed(Exception):
    """Stands for the process being killed: raised by a scorer after so many evaluations."""


def killing_scorers(monkeypatch, after: int, in_full_acc: bool = False) -> dict:
    """Stage 2's real scorers, counted; the fold scorer raises ``Killed`` once it has scored ``after``
    candidates (or the full accuracy raises, with ``in_full_acc``)."""
    real = stage2.fold_scorers
    counts = {"fold": 0, "full": 0}

    def scorers(*args):
        on_fold, on_rest = real(*args)

        def counted_fold(cand):
            if counts["fold"] == after:
                raise Killed
            counts["fold"] += 1
            return on_fold(cand)

        def counted_rest(cand):
            if in_full_acc:
                raise Killed
            counts["full"] += 1
            return on_rest(cand)

        return counted_fold, counted_rest

    monkeypatch.setattr(stage2, "fold_scorers", scorers)
    return counts


@pytest.fixture(scope="module")
def reference_run(supernet, image_folder, tmp_path_factory):
    save = tmp_path_factory.mktemp("stage2-reference")
    result, _ = captured(stage2.search, stage2_args(image_folder, supernet, save, "--rng", "reference"))
    return save, result


@pytest.mark.parametrize("rng", ["fold", "reference"])
@pytest.mark.parametrize("after, in_full_acc, continued", [  # every point of a search: test_evolution.py
    # inside epoch 0's breeding, the fold's state saved after its initial population
    (6, False, "fold 0: continuing its search at epoch 0/2 (4 candidates scored"),
    # fold 0's candidates all scored, killed in its winner's full accuracy
    (12, True, "fold 0: continuing its search at epoch 2/2 (12 candidates scored"),
    # fold 0 finished, at fold 1's first (--rng reference: continuing fold 0's stream)
    (12, False, None),
    # inside fold 1's initial population, before its first state
    (14, False, None),
])
def test_killed_inside_a_fold_and_rerun_ends_as_the_uninterrupted_run(
        search_run, reference_run, image_folder, supernet, tmp_path, monkeypatch, rng, after, in_full_acc,
        continued):
    whole, expected = (search_run[0], search_run[1]) if rng == "fold" else reference_run
    args = stage2_args(image_folder, supernet, tmp_path, "--rng", rng)
    counts = killing_scorers(monkeypatch, after, in_full_acc)
    with pytest.raises(Killed):
        captured(stage2.search, args)
    assert counts["fold"] == after and len(read_history(tmp_path)) == after
    assert not (tmp_path / "search_result.json").exists()

    monkeypatch.undo()
    counts = killing_scorers(monkeypatch, after=10**6)
    again, text = captured(stage2.search, args)
    assert again == expected
    assert json.loads((tmp_path / "search_result.json").read_text()) == expected
    assert read_history(tmp_path) == read_history(whole)  # no line lost or written twice
    assert counts["fold"] == sum(expected["num_candidates"]) - after  # nothing scored again
    # the fold killed had saved its state (after its initial population of 4) or had none
    assert text.count("continuing its search") == (continued is not None)
    assert continued is None or continued in text


def test_leader_full_acc_is_logged_each_epoch_and_changes_no_result(search_run, image_folder, supernet,
                                                                     tmp_path, monkeypatch):
    counts = killing_scorers(monkeypatch, after=10**6)
    found, _ = captured(stage2.search, stage2_args(image_folder, supernet, tmp_path, "--leader_full_acc"))
    assert found == search_run[1]  # not a setting: it only informs
    log = (tmp_path / "log.txt").read_text()
    leaders = set()
    for fold in range(K):
        state = json.loads((tmp_path / "folds" / f"fold{fold}.state.json").read_text())
        # the kept top-k of each epoch, then the final ranking (not saved in a state: the winner)
        ranked = [top[0][0] for top in state["rankings"]] + [found["archs"][fold]]
        leaders |= {(fold, tuple(arch)) for arch in ranked}
        for epoch in range(2):
            assert f"fold {fold} epoch {epoch}/2: top 2 of {4 * (epoch + 1)} evaluated, full_acc " in log
        assert dict(map(tuple, [(tuple(c), a) for c, a in state["full_accs"]]))[tuple(found["archs"][fold])] \
            == found["full_accs"][fold]
    assert counts["full"] == len(leaders)  # each distinct leader's full accuracy computed once


def test_rng_reference_refuses_a_subset_of_folds_and_several_processes(image_folder, supernet, tmp_path,
                                                                       monkeypatch):
    with pytest.raises(UsageError, match=r"--rng reference searches folds 0..k-1 in sequence \(fold i "
                                         r"continues .* depends on every earlier fold\): drop --folds"):
        stage2.search(stage2_args(image_folder, supernet, tmp_path, "--rng", "reference", "--folds", "1"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match=r"--rng reference runs in one process .* \(2 processes\)"):
        stage2.search(stage2_args(image_folder, supernet, tmp_path, "--rng", "reference"))
    assert not list(tmp_path.iterdir())
    # every fold, named: no subset
    monkeypatch.delenv("WORLD_SIZE")
    args = stage2_args(image_folder, supernet, tmp_path, "--rng", "reference", "--folds", "0,1")
    stage2.check_reference_stream(args)


def test_reference_stream_and_fold_stream_differ(search_run, reference_run):
    assert reference_run[1]["rng"] == "reference" and search_run[1]["rng"] == "fold"
    assert read_history(reference_run[0]) != read_history(search_run[0])


@pytest.mark.parametrize("recalibration", [[], ["--bn_recalibration_batches", "2",
                                                 "--recalibration_batch_size", "4"]])
def test_prefix_sharing_changes_no_result(image_folder, supernet, tmp_path, recalibration):
    shared, _ = captured(stage2.search, stage2_args(image_folder, supernet, tmp_path / "a", *recalibration))
    plain, _ = captured(stage2.search, stage2_args(image_folder, supernet, tmp_path / "b", *recalibration,
                                                   "--prefix_cache_gb", "0"))
    for key in ("fold_accs", "full_accs", "archs"):
        assert shared[key] == plain[key]


@pytest.mark.parametrize("flags, named", [(["--max-epochs", "1"], "max_epochs 2 (the flags say 1)"),
                                          (["--seed", "1"], "seed 0 (the flags say 1)"),
                                          (["--rng", "reference"], "rng 'fold' (the flags say 'reference')")])
def test_rerun_with_other_settings_is_refused(search_run, image_folder, supernet, tmp_path, monkeypatch,
                                              flags, named):
    """Another search would mix its folds, states and history lines with this one's."""
    copy = tmp_path / "save"
    shutil.copytree(search_run[0], copy)
    (copy / "folds" / "fold1.json").unlink()  # an unfinished search is refused as well
    before = folder_bytes(copy)
    spy = SearchSpy(monkeypatch)
    with pytest.raises(UsageError, match=re.escape(named)) as refused:
        captured(stage2.search, stage2_args(image_folder, supernet, copy, *flags))
    assert "rerun with the same flags" in str(refused.value)
    assert spy.calls == 0 and folder_bytes(copy) == before


@pytest.mark.parametrize("content", [b"[]", b"\x80\x81"])
def test_unreadable_fold_file_is_searched_again(search_run, image_folder, supernet, tmp_path, monkeypatch,
                                               content):
    copy = tmp_path / "save"
    shutil.copytree(search_run[0], copy)
    (copy / "folds" / "fold0.json").write_bytes(content)
    spy = SearchSpy(monkeypatch)
    again, _ = captured(stage2.search, stage2_args(image_folder, supernet, copy))
    assert spy.calls == 1
    assert again == search_run[1]


# ---------------------------------------------------------------------------------------------
# --uniform (an ablation) and the single-branch baselines.


def check_uniform_result(save: Path, found: dict, num_branches: int) -> None:
    assert json.loads((save / "search_result.json").read_text()) == found
    assert len(found["archs"]) == K and found["uniform"] is True
    for fold, arch in enumerate(found["archs"]):
        assert len(arch) == 17 and len(set(arch)) == 1 and 0 <= arch[0] < num_branches
        per_fold = json.loads((save / "folds" / f"fold{fold}.json").read_text())
        assert per_fold["arch"] == arch
        assert per_fold["num_candidates"] == num_branches
        assert per_fold["settings"]["uniform"] is True


def test_uniform_search_picks_the_best_uniform_selection(supernet, image_folder, tmp_path, monkeypatch):
    spy = SearchSpy(monkeypatch)
    found, text = captured(stage2.search, stage2_args(image_folder, supernet, tmp_path, "--uniform"))
    assert spy.calls == 0  # no evolution
    check_uniform_result(tmp_path, found, 3)
    assert block(text, "total-result")["archs"] == found["archs"]

    # Each fold keeps the uniform selection with the best fold accuracy, the lower branch on ties.
    top1, batches = independent_top1(supernet, found["config"], image_folder)

    for fold, arch in enumerate(found["archs"]):
        fold_range, full = fold_batches(len(batches), K, fold)
        accs = [top1([b] * 17, fold_range) for b in range(3)]
        assert arch == [accs.index(max(accs))] * 17
        assert found["fold_accs"][fold] == max(accs)
        assert found["full_accs"][fold] == top1(arch, full)


def test_lsq_baseline_trains_and_searches_uniformly(image_folder, tmp_path):
    # --l2_bounds stays in the flags: a baseline ignores it in every stage.
    variant = ["--quantizer", "lsq", "--small_input_stem"]
    args = stage1.parse_args(["--data", str(image_folder), "--teacher", "none",
                              "--save", str(tmp_path / "s1"), *MODEL, *variant, "--batch_size", "8",
                              "--replicas", "2",
                              "-j", "0", "--abin_total_iters", "1", "--awbin_total_iters", "1"])
    captured(stage1.train, args)
    supernet = tmp_path / "s1" / "model_actwbin_best_00001it.pth"
    config = load_file(supernet)["config"]
    assert (config["quantizer"], config["small_input_stem"], config["l2_vals"]) == ("lsq", True, [])
    found, _ = captured(stage2.search,
                        stage2_args(image_folder, supernet, tmp_path / "s2", *variant, "--uniform"))
    check_uniform_result(tmp_path / "s2", found, 1)
    assert found["archs"] == [[0] * 17] * K
    assert found["config"] == config


# ---------------------------------------------------------------------------------------------
# Bad input: a message naming the flag or file, a non-zero exit, no traceback, nothing overwritten.


def run_many(commands: dict[str, list[str]]) -> dict:
    """Run the scripts side by side (each is mostly interpreter start-up), torch on one thread each."""
    with pytest.MonkeyPatch.context() as patch, ThreadPoolExecutor(max_workers=2) as pool:
        patch.setenv("OMP_NUM_THREADS", "1")
        futures = {name: pool.submit(run_script, *command) for name, command in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_bad_cases(command: list[str], cases: dict, replace: dict[str, str], save: Path):
    """``command`` plus each case's flags (placeholders replaced), all at once, writing into the
    finished run in ``save``: ``(results by case, bytes of save before, after)``."""
    before = folder_bytes(save)
    results = run_many({name: [*command, *[replace.get(f, f) for f in flags]]
                        for name, (flags, _) in cases.items()})
    return results, before, folder_bytes(save)


def check_bad_case(runs, cases: dict, name: str) -> None:
    """The case failed cleanly with its words, and left the earlier run's files as they were."""
    results, before, after = runs
    assert_clean_failure(results[name], *cases[name][1])
    assert after == before


BAD_STAGE2 = {
    "missing": (["--supernet", "MISSING"], ["MISSING", "no such file"]),
    "corrupt": (["--supernet", "CORRUPT"], ["corrupt.pth", "not a PyTorch checkpoint"]),
    "bits": (["--bits", "3"], [SUPERNET, "bits=2", "the flags say 3"]),
    "branches": (["--l2_bounds", "0.01,0.001"], [SUPERNET, "l2_vals=[0.01, 0.001, 0.0001]"]),
    "width": (["--width_multiplier", "0.5"], [SUPERNET, "width_multiplier=0.25", "the flags say 0.5"]),
    "arch": (["--arch", "resnet18"], [SUPERNET, "arch=mobilenet_v2", "the flags say resnet18"]),
    # A checkpoint without its config (as the released one) is checked by its layout.
    "bare arch": (["--supernet", "BARE", "--arch", "resnet18"],
                  ["bare.pth", "17 searchable layers, the model 16"]),
    "k": (["--k", "7"], ["--k 7", "6 validation batches"]),
    "reference folds": (["--rng", "reference", "--folds", "1"],
                        ["--rng reference", "depends on every earlier fold", "drop --folds"]),
    "other settings": (["--m_prob", "0.5"],
                       ["holds a search with other settings", "m_prob 0.1 (the flags say 0.5)"]),
}


@pytest.fixture(scope="module")
def bad_stage2_runs(search_run, image_folder, supernet, tmp_path_factory):
    """Every bad stage-2 run, into the folder of the finished run: ``(results, bytes before, after)``."""
    save = search_run[0]
    tmp = tmp_path_factory.mktemp("bad-stage2")
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    (tmp / "corrupt.pth").write_bytes(noise.numpy().tobytes())
    torch.save({"model_state_dict": load_file(supernet)["model_state_dict"]}, tmp / "bare.pth")
    replace = {"MISSING": str(tmp / "MISSING.pth"), "CORRUPT": str(tmp / "corrupt.pth"),
               "BARE": str(tmp / "bare.pth")}
    command = ["02kfold_evolution.py", "--data", str(image_folder), "--supernet", str(supernet),
               "--save", str(save), "-j", "0", *MODEL, *SEARCH]
    return run_bad_cases(command, BAD_STAGE2, replace, save)


@pytest.mark.parametrize("name", BAD_STAGE2)
def test_bad_input(bad_stage2_runs, name):
    check_bad_case(bad_stage2_runs, BAD_STAGE2, name)
