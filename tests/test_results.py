"""The printed result blocks and the stage-2 result file that stage 3 reads."""
import json

import pytest

from search.results import format_block, parse_block, read_search_result, write_json
from utils.errors import UsageError

CONFIG = {"arch": "mobilenet_v2", "quantizer": "basq", "bits": 2, "l2_vals": [0.01, 0.001, 0.0001],
          "num_classes": 3}
LAYERS, BRANCHES = 17, 3
ARCHS = [[i % 3 for i in range(LAYERS)], [(i + 1) % 3 for i in range(LAYERS)]]
RESULT = {"fold_accs": [100.0, 87.5], "full_accs": [33.333333333333336, 75.0], "archs": ARCHS,
          "config": CONFIG, "k": 2}


def test_block_round_trips():
    rows = {"fold_accs": [71.25, 70.1], "full_accs": [1 / 3, 0.1 + 0.2], "**bnfull_accs": [50.0, 2e-05],
            "archs": ARCHS}
    text = format_block("final-result", rows)
    assert text.splitlines()[0] == "===final-result==="
    assert f"archs: [{tuple(ARCHS[0])}, {tuple(ARCHS[1])}]" in text  # pastes into the reference's scripts
    assert parse_block(text) == rows


def test_parse_block_reads_the_reference_output():
    printed = ("some log line: not a list\n===total-result===\nfolds: [0, 1]\n"
               "fold_accs: [71.5, 70.25]\nfull_accs: [70.9, 71.0]\n"
               "archs: [(1, 2, 0), (0, 0, 6)]\nsearch result: eval-kfold-evolution/search_result.json\n")
    assert parse_block(printed) == {"folds": [0, 1], "fold_accs": [71.5, 70.25], "full_accs": [70.9, 71.0],
                                    "archs": [[1, 2, 0], [0, 0, 6]]}


def test_write_json_replaces_atomically(tmp_path):
    path = tmp_path / "deep" / "result.json"
    write_json({"a": [1, 2]}, path)
    write_json(RESULT, path)
    assert json.loads(path.read_text()) == RESULT
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temporary file left


def write(tmp_path, obj, name="search_result.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_read_search_result_accepts_a_stage2_result(tmp_path):
    # A result without a fold list (pasted from the reference's block) covers folds 0..n-1.
    expected = {**RESULT, "folds": [0, 1]}
    assert read_search_result(write(tmp_path, RESULT), CONFIG, LAYERS, BRANCHES) == expected
    subset = {**RESULT, "folds": [3, 7]}
    assert read_search_result(write(tmp_path, subset), CONFIG, LAYERS, BRANCHES) == subset


def test_read_search_result_of_a_single_branch_baseline(tmp_path):
    lsq = {**CONFIG, "quantizer": "lsq", "l2_vals": []}
    result = {**RESULT, "config": lsq, "archs": [[0] * LAYERS, [0] * LAYERS]}
    assert read_search_result(write(tmp_path, result), lsq, LAYERS, 1)["archs"] == result["archs"]
    with pytest.raises(UsageError, match="arch 0 is not 17 branch indices in 0..0"):
        read_search_result(write(tmp_path, RESULT | {"config": lsq}), lsq, LAYERS, 1)
    with pytest.raises(UsageError, match="belongs to quantizer=lsq, the flags say basq"):
        read_search_result(write(tmp_path, result), CONFIG, LAYERS, BRANCHES)


def test_read_search_result_without_quantizer_is_basq(tmp_path):
    older = {**RESULT, "config": {k: v for k, v in CONFIG.items() if k != "quantizer"}}
    assert read_search_result(write(tmp_path, older), CONFIG, LAYERS, BRANCHES)["archs"] == ARCHS


def with_changes(**changes):
    return {**RESULT, **changes}


@pytest.mark.parametrize("content, words", [
    ("{'fold_accs': [1.0]", ["not a JSON search result"]),
    ([1, 2], ["not a search result", "fold_accs, full_accs, archs, config"]),
    ({k: v for k, v in RESULT.items() if k != "archs"}, ["not a search result"]),
    (with_changes(config={**CONFIG, "bits": 4}), ["belongs to bits=4", "the flags say 2"]),
    (with_changes(config={**CONFIG, "arch": "resnet18"}), ["belongs to arch=resnet18"]),
    (with_changes(config={**CONFIG, "l2_vals": [0.01]}), ["belongs to l2_vals=[0.01]"]),
    (with_changes(full_accs=[1.0]), ["differ in length"]),
    (with_changes(archs=[ARCHS[0], ARCHS[1][:-1]]), ["arch 1 is not 17 branch indices in 0..2"]),
    (with_changes(archs=[ARCHS[0] + [0], ARCHS[1]]), ["arch 0 is not 17"]),
    (with_changes(archs=[[3] + ARCHS[0][1:], ARCHS[1]]), ["arch 0"]),
    (with_changes(archs=[[-1] + ARCHS[0][1:], ARCHS[1]]), ["arch 0"]),
    (with_changes(archs=[[0.0] + ARCHS[0][1:], ARCHS[1]]), ["arch 0"]),
    (with_changes(archs=[tuple(ARCHS[0]), "012"]), ["arch 1"]),
])
def test_read_search_result_refuses(tmp_path, content, words):
    path = write(tmp_path, content)
    with pytest.raises(UsageError) as e:
        read_search_result(path, CONFIG, LAYERS, BRANCHES)
    for word in ["--search-result", str(path), *words]:
        assert word in str(e.value)


def test_read_search_result_missing_or_binary(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        read_search_result(tmp_path / "missing.json", CONFIG, LAYERS, BRANCHES)
    (tmp_path / "binary.json").write_bytes(bytes(range(256)))
    with pytest.raises(UsageError, match="not a JSON search result"):
        read_search_result(tmp_path / "binary.json", CONFIG, LAYERS, BRANCHES)


@pytest.mark.parametrize("changes", [dict(config=None), dict(archs=5), dict(fold_accs=None),
                                     dict(full_accs=["x", "y"]), dict(fold_accs=[True, None])])
def test_read_search_result_refuses_wrong_types(tmp_path, changes):
    with pytest.raises(UsageError, match="--search-result"):
        read_search_result(write(tmp_path, with_changes(**changes)), CONFIG, LAYERS, BRANCHES)


def test_parse_block_from_a_log_with_prefixes():
    """The reference's own output, as its log writes it: a prefix on every line."""
    from search import reference_results

    prefix = "{02/22 06:44:32 AM}-(2484025)-"
    lines = ["searching fold 9", *reference_results.TOTAL_RESULT.splitlines(), "done"]
    log = "".join(f"{prefix}{line}\n" for line in lines)
    rows = parse_block(log)
    assert rows == parse_block(reference_results.TOTAL_RESULT)
    assert rows["folds"] == list(range(10)) and rows["fold_accs"][0] == 67.62
    assert rows["archs"][9] == [5, 3, 2, 2, 4, 1, 4, 2, 1, 4, 6, 6, 0, 4, 3, 2, 5]
    # Of two blocks, the last one; another title's block is not a search result.
    older = format_block("total-result", {"folds": [0], "fold_accs": [1.0], "full_accs": [2.0],
                                          "archs": [ARCHS[0]]})
    assert parse_block(older + "\n" + log) == rows
    assert parse_block(log.replace("total-result", "something-else")) == {}


def test_read_search_result_accepts_a_pasted_block(tmp_path):
    printed = format_block("total-result", {"folds": [0, 1], "fold_accs": RESULT["fold_accs"],
                                            "full_accs": RESULT["full_accs"], "archs": ARCHS})
    path = write(tmp_path, "$ python 02kfold_evolution.py ...\n" + printed + "\nsearch result: x.json\n",
                 "pasted.txt")
    found = read_search_result(path, CONFIG, LAYERS, BRANCHES, k=2)
    assert (found["folds"], found["archs"], found["fold_accs"]) == ([0, 1], ARCHS, RESULT["fold_accs"])
    with pytest.raises(UsageError, match="arch 0 is not 17 branch indices in 0..1"):
        read_search_result(path, CONFIG, LAYERS, 2)
    without_archs = write(tmp_path, "\n".join(printed.splitlines()[:-1]), "short.txt")
    with pytest.raises(UsageError, match="the printed block lacks archs"):
        read_search_result(without_archs, CONFIG, LAYERS, BRANCHES)
    no_folds = write(tmp_path, printed.replace("[0, 1]\n", ""), "nofolds.txt")
    with pytest.raises(UsageError, match="has 2 folds, --k is 10"):
        read_search_result(no_folds, CONFIG, LAYERS, BRANCHES, k=10)
