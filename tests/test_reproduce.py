"""reproduce.py and reproduction/report.py without training anything: the plan of steps, resuming stage 1,
the step runner on tiny Python snippets, and the report made from synthetic result files."""
import json
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from reproduction.report import METHOD_NAMES, Row, mean_sd, update_readme, write_plot, write_table
from utils.errors import UsageError

from .conftest import load_script

reproduce = load_script("reproduce.py")
stage1 = load_script("01train_supernet.py")
stage2 = load_script("02kfold_evolution.py")
stage3 = load_script("03finetune.py")

STAGES = {"01train_supernet.py": stage1, "02kfold_evolution.py": stage2, "03finetune.py": stage3}
QUANTIZER = {"float": "float", "lsq": "lsq", "lsq-tensor": "lsq-tensor", "basq-uniform": "basq",
             "basq": "basq"}
PER_CHANNEL, PER_TENSOR = METHOD_NAMES["lsq"], METHOD_NAMES["lsq-tensor"]


def flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, (name, argv)
    return argv[argv.index(name) + 1]


# ---------------------------------------------------------------------------------------------- plan


@pytest.fixture
def planned(tmp_path):
    args = reproduce.parse_args(["--archs", "resnet18", "--bits", "2,4", "--work", str(tmp_path / "w")])
    steps, rows = reproduce.plan(args)
    return args, steps, rows


def test_plan_trains_each_quantizer_and_bits_once(planned):
    _, steps, _ = planned
    trains = [s for s in steps if s.name.startswith("train")]
    keys = [(flag(s.argv, "--quantizer"), int(flag(s.argv, "--bits"))) for s in trains]
    # basq trains once per bit width for both basq rows; float once, at the first bit width.
    assert sorted(keys) == [("basq", 2), ("basq", 4), ("float", 2), ("lsq", 2), ("lsq", 4), ("lsq-tensor", 2),
                            ("lsq-tensor", 4)]
    assert all(s.argv[0] == "01train_supernet.py" for s in trains)
    assert all(s.deps == [] and s.resumable is not None for s in trains)
    # The marker is the phase-2 checkpoint stage 1 writes at its last iteration.
    iters = reproduce.PRESETS["full"]["iters"][0]
    for s in trains:
        assert s.marker.name == stage1.checkpoint_name(2, iters)
        assert s.marker.parent == s.resumable == Path(flag(s.argv, "--save"))
        assert flag(s.argv, "--abin_total_iters") == flag(s.argv, "--awbin_total_iters") == str(iters)
    assert len({s.marker for s in trains}) == len(trains)
    assert len({s.name for s in steps}) == len(steps) == 7 + 2 * 9


def test_plan_rows_and_their_search_and_finetune(planned):
    _, steps, rows = planned
    by_name = {s.name: s for s in steps}
    assert sorted((r.arch, r.method, r.bits) for r in rows) == [
        ("resnet18", m, b) for m, b in sorted([("float", 2), ("lsq", 2), ("lsq", 4), ("lsq-tensor", 2),
                                               ("lsq-tensor", 4), ("basq-uniform", 2), ("basq-uniform", 4),
                                               ("basq", 2), ("basq", 4)])]
    evolution = reproduce.PRESETS["full"]["evolution"]
    for row in rows:
        finetune = next(s for s in steps if s.marker == row.final)
        search = next(s for s in steps if s.marker == row.search)
        assert finetune.argv[0] == "03finetune.py" and search.argv[0] == "02kfold_evolution.py"
        assert finetune.deps == [search.name]
        assert len(search.deps) == 1
        train = by_name[search.deps[0]]
        quantizer = QUANTIZER[row.method]
        for step in (train, search, finetune):
            assert flag(step.argv, "--quantizer") == quantizer
            assert flag(step.argv, "--bits") == str(row.bits)
            assert flag(step.argv, "--arch") == "resnet18"
        assert flag(search.argv, "--supernet") == flag(finetune.argv, "--supernet") == str(train.marker)
        assert flag(finetune.argv, "--search-result") == str(row.search)
        assert Path(flag(search.argv, "--save")) == row.search.parent
        assert Path(flag(finetune.argv, "--save")) == row.final.parent
        if row.method == "basq":
            assert "--uniform" not in search.argv
            start = search.argv.index(evolution[0])
            assert search.argv[start:start + len(evolution)] == evolution
        else:
            assert "--uniform" in search.argv
            assert "--population-num" not in search.argv and "--max-epochs" not in search.argv
    # basq and basq-uniform at one bit width share one supernet; their outputs do not collide.
    for bits in (2, 4):
        pair = [next(s for s in steps if s.marker == r.search) for r in rows
                if r.bits == bits and r.method in ("basq", "basq-uniform")]
        assert len(pair) == 2 and pair[0].deps == pair[1].deps
    assert len({r.final for r in rows}) == len({r.search for r in rows}) == len(rows)


def test_plan_order_and_common_flags(planned):
    _, steps, _ = planned
    kinds = [s.name.split()[0] for s in steps]
    assert kinds[:7] == ["train"] * 7 and "train" not in kinds[7:]
    # Every dependency comes earlier in the order.
    position = {s.name: i for i, s in enumerate(steps)}
    assert all(position[d] < position[s.name] for s in steps for d in s.deps)
    for s in steps:
        assert "--small_input_stem" in s.argv
        assert flag(s.argv, "--data") == "fashion-mnist"
        assert flag(s.argv, "--data-root") == "data"


def test_plan_argv_parses_in_each_stage_script(planned):
    """Each step's flags are ones its stage script knows, with the values the plan meant."""
    _, steps, _ = planned
    for s in steps:
        args = STAGES[s.argv[0]].parse_args(s.argv[1:])
        assert args.small_input_stem and args.arch == "resnet18"
        assert args.quantizer == flag(s.argv, "--quantizer") and args.bits == int(flag(s.argv, "--bits"))
        if s.argv[0] == "02kfold_evolution.py":
            assert args.folds == [int(f) for f in reproduce.PRESETS["full"]["folds"].split(",")]
            assert args.uniform == ("--uniform" in s.argv)


def test_plan_quick_and_two_archs(tmp_path):
    args = reproduce.parse_args(["--quick", "--bits", "4", "--work", str(tmp_path)])
    assert args.archs == ["mobilenet_v2", "resnet18"] and args.bits == [4]
    steps, rows = reproduce.plan(args)
    quick = reproduce.PRESETS["quick"]
    assert len(rows) == 2 * 5 and len(steps) == 2 * (4 + 2 * 5)
    assert {r.arch for r in rows} == {"mobilenet_v2", "resnet18"}
    for s in steps:
        if s.argv[0] == "01train_supernet.py":
            assert s.marker.name == stage1.checkpoint_name(2, quick["iters"][0])
        elif "--uniform" not in s.argv and s.argv[0] == "02kfold_evolution.py":
            start = s.argv.index("--population-num")
            assert s.argv[start:start + len(quick["evolution"])] == quick["evolution"]
        if s.argv[0] != "01train_supernet.py":
            assert flag(s.argv, "--max_val_iters") == str(quick["max_val_iters"])


def test_plan_sweep_four_budgets_of_one_network(tmp_path):
    args = reproduce.parse_args(["--sweep", "--work", str(tmp_path)])
    assert (args.archs, args.bits, args.out) == (["mobilenet_v2"], [2], Path("results"))
    steps, rows = reproduce.plan(args)
    budgets = reproduce.PRESETS["sweep"]["iters"]
    assert max(budgets) >= 10 * min(budgets) and len(budgets) >= 4
    assert sorted((r.iters, r.method) for r in rows) == sorted(
        (b, m) for b in budgets for m in reproduce.METHODS)
    trains = [s for s in steps if s.argv[0] == "01train_supernet.py"]
    assert len(trains) == 4 * len(budgets) and len(steps) == len(budgets) * (4 + 2 * 5)
    for s in trains:
        iters = int(flag(s.argv, "--abin_total_iters"))
        assert flag(s.argv, "--awbin_total_iters") == str(iters)
        assert s.marker == tmp_path / f"{iters}it" / s.marker.relative_to(tmp_path / f"{iters}it")
        assert flag(s.argv, "--base_resolution") == "32" and "--small_input_stem" not in s.argv
    for s in steps:  # each budget's steps use its own supernets
        if s.argv[0] != "01train_supernet.py":
            assert Path(flag(s.argv, "--supernet")).parts[:len(tmp_path.parts) + 1] == \
                Path(flag(s.argv, "--save")).parts[:len(tmp_path.parts) + 1]
    # smaller budgets first, so an interrupted sweep has finished whole budgets; training first in each
    order = [(int(Path(flag(s.argv, "--save")).parts[len(tmp_path.parts)].removesuffix("it")),
              s.argv[0] != "01train_supernet.py") for s in steps]
    assert order == sorted(order) and order[0] == (min(budgets), False)
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--sweep", "--quick"])


def test_parse_args_defaults_and_normalisation(tmp_path):
    args = reproduce.parse_args(["--bits", "4, 2,4", "--archs", " resnet18 ,"])
    assert args.bits == [2, 4] and args.archs == ["resnet18"]
    assert args.work == Path("runs/reproduce/full") and args.out == Path("results")
    quick = reproduce.parse_args(["--quick"])
    assert quick.work == Path("runs/reproduce/quick") and quick.out == Path("results/quick")


@pytest.mark.parametrize("argv", [["--archs", "vgg16"], ["--archs", "resnet18,vgg"], ["--archs", ","],
                                  ["--bits", "2,x"], ["--bits", "1"], ["--bits", "9"], ["--bits", ","],
                                  ["--jobs", "0"], ["--jobs", "-1"]])
def test_parse_args_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        reproduce.parse_args(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- resume


def test_command_resumes_from_latest_checkpoint(tmp_path):
    folder = tmp_path / "train"
    step = reproduce.Step("train x", ["01train_supernet.py", "--bits", "2"], folder / "final.pth",
                          resumable=folder)
    plain = [sys.executable, "01train_supernet.py", "--bits", "2"]
    assert step.command() == plain  # no folder yet
    folder.mkdir()
    assert step.command() == plain  # an empty folder
    (folder / "log.txt").write_text("not a checkpoint")
    assert step.command() == plain

    def latest() -> str:
        argv = step.command()
        assert argv[:len(plain)] == plain and argv[-2] == "--resume" and len(argv) == len(plain) + 2
        return Path(argv[-1]).name

    for it in (1, 100, 20):
        (folder / f"model_actbin_best_{it:05d}it.pth").touch()
    assert latest() == "model_actbin_best_00100it.pth"
    # Iterations compare as numbers, not as text.
    (folder / "model_actbin_best_99999it.pth").touch()
    (folder / "model_actbin_best_100000it.pth").touch()
    assert latest() == "model_actbin_best_100000it.pth"
    # Phase 2 beats phase 1 whatever the iteration.
    (folder / "model_actwbin_best_00001it.pth").touch()
    assert latest() == "model_actwbin_best_00001it.pth"
    (folder / "model_actwbin_best_00050it.pth").touch()
    (folder / "model_actwbin_best_00003it.pth").touch()
    assert latest() == "model_actwbin_best_00050it.pth"
    # A half-written temporary file of utils.checkpoint.save_file is not a checkpoint.
    (folder / ".model_actwbin_best_00400it.pth.abc123.tmp").touch()
    assert latest() == "model_actwbin_best_00050it.pth"
    assert step.command()[-1] == str(folder / "model_actwbin_best_00050it.pth")


def test_command_without_resumable_never_resumes(tmp_path):
    (tmp_path / "model_actwbin_best_00050it.pth").touch()
    step = reproduce.Step("search x", ["02kfold_evolution.py", "--save", str(tmp_path)], tmp_path / "m")
    assert step.command() == [sys.executable, "02kfold_evolution.py", "--save", str(tmp_path)]


# --------------------------------------------------------------------------------------- run_steps

# Records its start and end times and which dependency markers were missing when it started,
# appends its name to runs.txt, then writes its marker.
SNIPPET = """
import json, pathlib, sys, time
name, marker, delay, *deps = sys.argv[1:]
began = time.time()
missing = [d for d in deps if not pathlib.Path(d).exists()]
with open(pathlib.Path(marker).parent / "runs.txt", "a") as f:
    f.write(name + "\\n")
time.sleep(float(delay))
pathlib.Path(marker).write_text(json.dumps({"began": began, "ended": time.time(), "missing": missing}))
"""


def fake_step(work: Path, name: str, deps: tuple[str, ...] = (), delay: float = 0.0):
    marker = work / "markers" / f"{name}.json"
    marker.parent.mkdir(parents=True, exist_ok=True)
    dep_markers = [str(work / "markers" / f"{d}.json") for d in deps]
    return reproduce.Step(name, ["-c", SNIPPET, name, str(marker), str(delay), *dep_markers], marker,
                          deps=list(deps))


def runs(work: Path) -> list[str]:
    path = work / "markers" / "runs.txt"
    return path.read_text().split() if path.exists() else []


def marker(work: Path, name: str) -> dict:
    return json.loads((work / "markers" / f"{name}.json").read_text())


@pytest.fixture
def fast(monkeypatch):
    """The runner polls every second; poll every 20 ms so that these tests stay short."""
    real_sleep = time.sleep
    clock = types.SimpleNamespace(sleep=lambda s: real_sleep(min(s, 0.02)), monotonic=time.monotonic,
                                  strftime=time.strftime)
    monkeypatch.setattr(reproduce, "time", clock)


def test_run_steps_respects_dependencies(tmp_path, fast):
    steps = [fake_step(tmp_path, "d", ("b", "c")), fake_step(tmp_path, "b", ("a",)),
             fake_step(tmp_path, "c", ("a",)), fake_step(tmp_path, "a", delay=0.1)]
    reproduce.run_steps(steps, 2, tmp_path)
    assert sorted(runs(tmp_path)) == ["a", "b", "c", "d"]
    got = {n: marker(tmp_path, n) for n in "abcd"}
    assert all(m["missing"] == [] for m in got.values()), got
    for step in steps:
        for dep in step.deps:
            assert got[dep]["ended"] <= got[step.name]["began"], (dep, step.name)
    times = json.loads((tmp_path / "step_seconds.json").read_text())
    assert sorted(times) == ["a", "b", "c", "d"]
    assert all(isinstance(t, float) and t >= 0 for t in times.values())
    assert times["a"] >= 0.1
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["a.txt", "b.txt", "c.txt", "d.txt"]


def test_run_steps_one_job_at_a_time(tmp_path, fast):
    steps = [fake_step(tmp_path, n, delay=0.05) for n in ("p", "q", "r")]
    reproduce.run_steps(steps, 1, tmp_path)
    spans = sorted((marker(tmp_path, n)["began"], marker(tmp_path, n)["ended"]) for n in ("p", "q", "r"))
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False)), spans


def test_run_steps_skips_finished_steps(tmp_path, fast):
    steps = [fake_step(tmp_path, "a"), fake_step(tmp_path, "b", ("a",))]
    steps[0].marker.write_text("earlier")
    # b was interrupted in an earlier session after 100 s: its time adds up.
    (tmp_path / "step_seconds.json").write_text(json.dumps({"a": 5.0, "b": 100.0}))
    reproduce.run_steps(steps, 2, tmp_path)
    assert runs(tmp_path) == ["b"]
    assert steps[0].marker.read_text() == "earlier"
    times = json.loads((tmp_path / "step_seconds.json").read_text())
    assert times["a"] == 5.0 and 100.0 < times["b"] < 160.0
    # Everything finished: nothing runs again, the times stay.
    reproduce.run_steps(steps, 2, tmp_path)
    assert runs(tmp_path) == ["b"]
    assert json.loads((tmp_path / "step_seconds.json").read_text()) == times


def test_run_steps_failure_names_step_and_log_tail(tmp_path, fast, monkeypatch):
    started = {}
    real_popen = subprocess.Popen

    def popen(argv, **kwargs):
        proc = real_popen(argv, **kwargs)
        started[argv[2]] = proc  # by the snippet: argv is [python, -c, snippet, ...]
        return proc

    monkeypatch.setattr(reproduce, "subprocess",
                        types.SimpleNamespace(Popen=popen, STDOUT=subprocess.STDOUT))
    noisy = "[print(f'line {i}') for i in range(30)]; raise SystemExit(3)"
    bad = reproduce.Step("search bad-row", ["-c", noisy], tmp_path / "bad.json")
    slow = reproduce.Step("train slow", ["-c", "import time; time.sleep(20)"], tmp_path / "slow.json")
    after = fake_step(tmp_path, "after", ("search bad-row",))
    try:
        with pytest.raises(UsageError) as exc:
            reproduce.run_steps([slow, bad, after], 2, tmp_path)
        message = str(exc.value)
        assert "search bad-row" in message and "exit 3" in message
        assert str(tmp_path / "logs" / "search_bad-row.txt") in message
        assert "line 29" in message and "line 15" in message and "line 14" not in message
        assert runs(tmp_path) == [] and not bad.marker.exists()
        # The step still running when another failed is stopped.
        proc = started["import time; time.sleep(20)"]
        assert proc.wait(timeout=5) != 0
    finally:
        for proc in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    times_file = tmp_path / "step_seconds.json"
    assert not times_file.exists() or "search bad-row" not in json.loads(times_file.read_text())


def test_run_steps_refuses_a_dependency_that_is_not_planned(tmp_path, fast):
    with pytest.raises(ValueError, match="not planned: ghost"):
        reproduce.run_steps([fake_step(tmp_path, "a", ("ghost",))], 1, tmp_path)


# -------------------------------------------------------------------------------------------- main


def test_main_counts_a_failed_session_in_the_wall_time(tmp_path, monkeypatch):
    def fail(steps, jobs, work):
        raise UsageError("step 'x' failed")

    monkeypatch.setattr(reproduce, "run_steps", fail)
    args = reproduce.parse_args(["--quick", "--archs", "resnet18", "--work", str(tmp_path / "w")])
    with pytest.raises(UsageError):
        reproduce.main(args)
    sessions = json.loads((tmp_path / "w" / "sessions.json").read_text())
    assert len(sessions) == 1 and sessions[0]["seconds"] >= 0 and sessions[0]["jobs"] == 2


def test_main_refuses_work_folder_of_other_settings(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(reproduce, "run_steps", lambda steps, jobs, work: calls.append(len(steps)) or 1.0)
    monkeypatch.setattr(reproduce, "write_table", lambda path, rows, meta: "table")
    monkeypatch.setattr(reproduce, "write_plot", lambda path, rows: None)
    monkeypatch.setattr(reproduce, "update_readme", lambda *a: pytest.fail("README touched under --quick"))
    monkeypatch.setattr(reproduce, "machine", lambda: "test machine")
    common = ["--quick", "--archs", "resnet18", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]
    reproduce.main(reproduce.parse_args([*common, "--bits", "2,4"]))
    settings = (tmp_path / "w" / "settings.json").read_text()
    reproduce.main(reproduce.parse_args([*common, "--bits", "4,2"]))  # the same settings
    assert len(json.loads((tmp_path / "w" / "sessions.json").read_text())) == 2
    assert calls == [7 + 2 * 9] * 2
    with pytest.raises(UsageError, match="other settings"):  # every step's command line changes
        reproduce.main(reproduce.parse_args([*common, "--bits", "2,4", "--data-root", "elsewhere"]))
    with pytest.raises(UsageError, match=str(tmp_path / "w")):
        reproduce.main(reproduce.parse_args([*common[1:], "--bits", "2,4"]))  # another preset
    assert calls == [7 + 2 * 9] * 2
    assert (tmp_path / "w" / "settings.json").read_text() == settings
    # Fewer rows, then a network more: the finished steps are kept, the planned ones remembered.
    reproduce.main(reproduce.parse_args([*common, "--bits", "2"]))
    assert (tmp_path / "w" / "settings.json").read_text() == settings
    reproduce.main(reproduce.parse_args([*common[:2], "mobilenet_v2,resnet18", *common[3:]]))
    grown = json.loads((tmp_path / "w" / "settings.json").read_text())["steps"]
    assert set(json.loads(settings)["steps"]) < set(grown) and len(grown) == 2 * (7 + 2 * 9)


# ------------------------------------------------------------------------------------------ report

L2 = [0.01, 0.001, 0.0001, 1e-05]
# (method, bits): (top-1 per fold, each fold's selection of branches, one per layer)
RESULTS = {
    ("float", 2): ([93.0, 94.0, 95.0], [[0] * 4] * 3),
    ("lsq", 2): ([80.0, 82.0, 84.0], [[0] * 4] * 3),
    ("lsq", 4): ([88.0, 89.0, 90.0], [[0] * 4] * 3),
    ("lsq-tensor", 2): ([79.0, 80.0, 81.0], [[0] * 4] * 3),
    ("lsq-tensor", 4): ([89.0, 89.0, 89.0], [[0] * 4] * 3),
    ("basq-uniform", 2): ([83.0, 83.0, 86.0], [[1] * 4, [2] * 4, [1] * 4]),
    ("basq-uniform", 4): ([90.0, 90.0, 90.0], [[0] * 4, [3] * 4, [0] * 4]),
    ("basq", 2): ([90.0, 91.0, 95.0], [[0, 1, 1, 2], [1, 1, 3, 0], [0, 0, 1, 1]]),
    ("basq", 4): ([88.0, 88.5, 89.0], [[0] * 4] * 3),
}
CLIPS = [[1.0, 2.5], [0.5, 3.0]]  # per layer and branch, plus the bits (to tell 2 and 4 apart)
META = {"budget": {"iters": [300], "max_val_iters": 25, "finetune_iters": 60, "folds": "0,1,2"},
        "machine": "test machine",
        "sessions": [{"seconds": 600.0, "jobs": 2, "finished": "2024-01-01 10:00"},
                     {"seconds": 1200.0, "jobs": 1, "finished": "2024-01-02 11:00"}],
        "command": "make reproduce"}


def make_rows(root: Path, arch: str = "resnet18") -> list[Row]:
    rows = []
    for (method, bits), (accs, archs) in RESULTS.items():
        folder = root / f"{arch}-{method}-{bits}"
        folder.mkdir(parents=True)
        l2 = L2 if method.startswith("basq") else []
        supernet = folder / "supernet.pth"
        clips = {f"blocks.{i}.branch_bn_q_0.{b}.1.upper_bound": torch.tensor(CLIPS[i][b] + bits)
                 for i in range(len(CLIPS)) for b in range(2)} if l2 else {}
        torch.save({"model_state_dict": {"stem.conv1.weight": torch.zeros(1), **clips}}, supernet)
        (folder / "final_result.json").write_text(json.dumps(
            {"bnfull_accs": accs, "archs": archs, "folds": [0, 1, 2], "config": {"l2_vals": l2},
             "supernet": str(supernet)}))
        rows.append(Row(arch, method, bits, folder / "final_result.json", folder / "search_result.json"))
    return rows


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def table_line(text: str, *start: str) -> list[str]:
    found = [cells(line) for line in text.splitlines() if cells(line)[:len(start)] == list(start)]
    assert len(found) == 1, (start, text)
    return found[0]


def test_mean_sd_is_the_sample_deviation():
    assert mean_sd([90.0, 92.0]) == pytest.approx((91.0, 2 ** 0.5))
    assert mean_sd([90.0, 91.0, 95.0]) == pytest.approx((92.0, 7 ** 0.5))
    assert mean_sd([42.0]) == (42.0, 0.0)


def test_write_table(tmp_path):
    rows = make_rows(tmp_path / "runs")
    path = tmp_path / "out" / "table.md"
    main_table = write_table(path, rows, META)
    text = path.read_text()
    assert main_table in text
    assert "over 3 folds" in main_table
    assert table_line(main_table, "Network") == ["Network", "Method", "2-bit", "4-bit", "32-bit"]
    # Mean ± sample standard deviation over the folds; full precision only in the 32-bit column.
    assert table_line(main_table, "ResNet-18", "Full precision (no quantizer)")[2:] == [
        "", "", "94.00 ± 1.00"]
    assert table_line(main_table, "ResNet-18", PER_CHANNEL)[2:] == [
        "82.00 ± 2.00", "89.00 ± 1.00", ""]
    assert table_line(main_table, "ResNet-18", PER_TENSOR)[2:] == [
        "80.00 ± 1.00", "89.00 ± 0.00", ""]
    assert table_line(main_table, "ResNet-18", "BASQ, one L2 decay for all layers")[2:] == [
        "84.00 ± 1.73", "90.00 ± 0.00", ""]
    assert table_line(main_table, "ResNet-18", "BASQ (k-fold search)")[2:] == [
        "92.00 ± 2.65", "88.50 ± 0.50", ""]
    # The rows of the main table in the order of the methods.
    methods = [c[1] for c in map(cells, main_table.splitlines()) if c[0] == "ResNet-18"]
    assert methods == ["Full precision (no quantizer)", PER_TENSOR,
                       PER_CHANNEL,
                       "BASQ, one L2 decay for all layers", "BASQ (k-fold search)"]
    # What the search buys: BASQ - each baseline, differences of the means.
    assert table_line(text, "Network", "Bits", "BASQ - LSQ per tensor") == [
        "Network", "Bits", "BASQ - LSQ per tensor", "BASQ - LSQ per channel", "BASQ - one L2 for all"]
    assert table_line(text, "ResNet-18", "2-bit") == ["ResNet-18", "2-bit", "+12.00", "+10.00", "+8.00"]
    assert table_line(text, "ResNet-18", "4-bit") == ["ResNet-18", "4-bit", "-0.50", "-0.50", "-1.50"]
    # Decays: each fold's for one L2 for all; mean layers per decay for the search; none for baselines.
    uniform = "BASQ, one L2 decay for all layers"
    assert table_line(text, "ResNet-18", uniform, "2")[3] == "0.001, 0.0001, 0.001"
    assert table_line(text, "ResNet-18", uniform, "4")[3] == "0.01, 1e-05, 0.01"
    assert table_line(text, "ResNet-18", "BASQ (k-fold search)", "2")[3] == (
        "0.01: 1.3, 0.001: 2.0, 0.0001: 0.3, 1e-05: 0.3")
    assert table_line(text, "ResNet-18", "BASQ (k-fold search)", "4")[3] == "0.01: 4.0"
    assert not any(c[:2] == ["ResNet-18", PER_CHANNEL] and len(c) == 4
                   for c in map(cells, text.splitlines()))
    # The clips of each BASQ supernet: count, min, mean, max.
    assert table_line(text, "Network", "Bits", "Clips") == ["Network", "Bits", "Clips", "Min", "Mean", "Max"]
    assert table_line(text, "ResNet-18", "2", "4") == ["ResNet-18", "2", "4", "2.50", "3.75", "5.00"]
    assert table_line(text, "ResNet-18", "4", "4") == ["ResNet-18", "4", "4", "4.50", "5.75", "7.00"]
    assert "Wall time: 30 min in 2 session(s), 1 steps at a time" in text
    assert "Machine: test machine" in text and "`make reproduce`" in text


def test_write_table_without_float_row(tmp_path):
    rows = [r for r in make_rows(tmp_path) if r.method != "float"]
    text = write_table(tmp_path / "t.md", rows, META)
    assert "Full precision" not in (tmp_path / "t.md").read_text()
    assert table_line(text, "ResNet-18", "BASQ (k-fold search)")[2:] == ["92.00 ± 2.65", "88.50 ± 0.50", ""]


def test_write_plot_writes_png(tmp_path):
    rows = make_rows(tmp_path / "a", "resnet18") + make_rows(tmp_path / "b", "mobilenet_v2")
    path = tmp_path / "plots" / "fashion_mnist.png"
    write_plot(path, rows)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_update_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nintro\n<!-- reproduce:begin -->\nold table\nmore old\n"
                      "<!-- reproduce:end -->\nafter\n")
    assert update_readme(readme, "| new | table |")
    expected = "# Title\n\nintro\n<!-- reproduce:begin -->\n| new | table |\n<!-- reproduce:end -->\nafter\n"
    assert readme.read_text() == expected
    assert update_readme(readme, "| new | table |")  # again: the same text
    assert readme.read_text() == expected
    for text in ("no markers\n", "<!-- reproduce:begin -->\nonly the first\n",
                 "only the last\n<!-- reproduce:end -->\n",
                 "<!-- reproduce:end -->\nswapped\n<!-- reproduce:begin -->\n"):
        readme.write_text(text)
        assert update_readme(readme, "table") is False
        assert readme.read_text() == text


def make_sweep_rows(root: Path) -> list[Row]:
    rows = []
    for iters, shift in ((200, 0.0), (2000, 3.0)):
        for row in make_rows(root / f"{iters}it"):
            if row.bits == 2:
                row.iters = iters
                result = json.loads(row.final.read_text())
                result["bnfull_accs"] = [a + shift for a in result["bnfull_accs"]]
                row.final.write_text(json.dumps(result))
                rows.append(row)
    return rows


def test_write_sweep_table_and_plot(tmp_path):
    from reproduction.report import write_sweep_plot, write_sweep_table

    rows = make_sweep_rows(tmp_path / "runs")
    path = tmp_path / "out" / "budget_sweep.md"
    main_table = write_sweep_table(path, rows, {**META, "command": "make sweep"})
    text = path.read_text()
    assert main_table in text and "`make sweep`" in text
    assert table_line(main_table, "Method") == ["Method", "200 it", "2000 it"]
    assert table_line(main_table, PER_CHANNEL) == [
        PER_CHANNEL, "82.00 ± 2.00", "85.00 ± 2.00"]
    assert table_line(main_table, "BASQ - LSQ per tensor") == ["BASQ - LSQ per tensor", "+12.00", "+12.00"]
    assert table_line(main_table, "BASQ - LSQ per channel") == ["BASQ - LSQ per channel", "+10.00", "+10.00"]
    assert table_line(main_table, "BASQ - one L2 for all") == ["BASQ - one L2 for all", "+8.00", "+8.00"]
    # The clips of the 2-bit supernet: layers [3, 4.5] and [2.5, 5]; spreads 1.5 and 2.5.
    assert table_line(text, "200") == ["200", "3.75", "2.50", "5.00", "2.00", "2.50"]
    assert table_line(text, "BASQ, one L2 decay for all layers", "2000") == [
        "BASQ, one L2 decay for all layers", "2000", "0.001, 0.0001, 0.001"]  # branches 1, 2, 1
    assert table_line(text, "BASQ (k-fold search)", "200")[2] == \
        "0.01: 1.3, 0.001: 2.0, 0.0001: 0.3, 1e-05: 0.3"  # 4, 6, 1 and 1 of 12 layers in 3 folds
    # A sweep without a baseline has neither its row nor its difference.
    without = write_sweep_table(path, [r for r in rows if r.method != "lsq-tensor"], META)
    assert "per tensor" not in without and "BASQ - LSQ per channel" in without
    write_sweep_plot(tmp_path / "out" / "budget_sweep.png", rows)
    assert (tmp_path / "out" / "budget_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_update_readme_sections(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- sweep:begin -->\nold\n<!-- sweep:end -->\nb\n<!-- reproduce:begin -->x"
                      "<!-- reproduce:end -->\n")
    assert update_readme(readme, "new", "sweep")
    assert readme.read_text() == ("a\n<!-- sweep:begin -->\nnew\n<!-- sweep:end -->\nb\n"
                                  "<!-- reproduce:begin -->x<!-- reproduce:end -->\n")
    assert not update_readme(readme, "new", "other")
