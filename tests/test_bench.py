"""The loader benchmark runs end to end: each loader alone per round, its workers stopped after it."""
import multiprocessing
import re
from pathlib import Path

import pytest
import torch
import torchvision

from bench import data_loading, deploy_speed, gpu_check, memory, step_time
from models import build_supernet


def test_loader_benchmark_reports_both_loaders_and_a_ratio(tmp_path, capsys):
    data_loading.generate(tmp_path, images=20, size=(60, 45))
    data_loading.main(["--data", str(tmp_path), "--workers", "1", "--batch_size", "2", "--batches", "2",
                       "--rounds", "2", "--size", "32"])
    out = capsys.readouterr().out
    rates = {name: float(v) for name, v in re.findall(r"^(ours|torchvision): ([\d.]+) images/s", out, re.M)}
    assert set(rates) == {"ours", "torchvision"} and all(v > 0 for v in rates.values())
    assert re.search(r"^ratio [\d.]+ \(ours / torchvision, median of 2 rounds; 1 workers", out, re.M)
    assert not multiprocessing.active_children()


def test_loader_benchmark_refuses_a_folder_too_small_for_a_round(tmp_path, capsys):
    data_loading.generate(tmp_path, images=4, size=(60, 45))
    with pytest.raises(SystemExit) as exc:
        data_loading.main(["--data", str(tmp_path), "--workers", "1", "--batch_size", "2", "--size", "32"])
    assert exc.value.code == 2 and "fewer than the 22 images" in capsys.readouterr().err


def test_deployment_benchmark_reports_every_model_and_its_speed_against_torchvision(capsys):
    deploy_speed.main(["--only", "demo", "--batches", "1,2", "--images", "2", "--rounds", "1",
                       "--warmup", "0", "--threads", "1"])
    out = capsys.readouterr().out
    table = out[out.index("| model |"):].splitlines()
    assert table[0] == "| model | 32 px, width 0.5, batch 1 | 32 px, width 0.5, batch 2 |"
    rows = {line.split(" | ")[0][2:]: re.findall(r"([\d.]+) \(([\d.]+)\)", line) for line in table[2:]}
    assert len(rows) == 9 and all(len(cells) == 2 for cells in rows.values())
    assert all(float(rate) > 0 and float(speed) > 0 for cells in rows.values() for rate, speed in cells)
    assert [speed for _, speed in rows["torchvision float, PyTorch"]] == ["1.00", "1.00"]
    assert "ours opset 25 (INT2), onnxruntime" in rows
    assert "ours opset 25 --fold, onnxruntime, weights at load" in rows


def test_step_time_benchmark_reports_the_pieces_whole_batch_and_torchvision_ratios(capsys):
    """A smoke run (no timing asserted): the supernet's step in pieces and whole, and torchvision's,
    in training; the supernet's forward and torchvision's in evaluation."""
    step_time.main(["--config", "0.5,32,16", "--replicas", "4", "--steps", "2", "--warmup", "0"])
    out = capsys.readouterr().out
    ratios = dict(re.findall(r"^  (?:train|eval) +(.+ / .+): ([\d.]+) \(quartiles", out, re.M))
    assert set(ratios) == {"replicas 4 / replicas 1", "replicas 4 / torchvision",
                           "replicas 1 / torchvision", "ours / torchvision"}
    assert all(float(v) > 0 for v in ratios.values())
    assert "width 0.5, 32 px, batch 16" in out


def test_live_tensors_counts_what_the_operations_make_while_it_lives():
    x = torch.ones(1000)  # made outside: not counted, nor its views
    with memory.LiveTensors([x]) as live:
        a = x * 2  # 4,000 bytes
        b = a + 1  # 8,000 alive
        view = b.view(10, 100)  # the same storage: nothing more
        del a, b  # the view keeps b's storage
        c = x.view(100, 10) - 1  # 8,000 again
        del view, c
    assert live.peak == 8000 and live.live == 0


def test_saved_bytes_counts_unique_storages_saved_for_backward_without_parameters():
    w = torch.nn.Parameter(torch.ones(256))
    x = torch.randn(256)

    def step():
        y = x * w  # saves x (1 KiB) and w (a parameter: left out)
        return (y.sin() * y.exp()).sum()  # saves y once for both (1 KiB), sin(y) and exp(y) (2 KiB)

    assert memory.saved_bytes(step, [w]) == 4 * 1024


def test_a_fit_per_image_and_the_largest_piece_that_fits():
    line = memory.fit(lambda n: 100 + 7 * n, (2, 4))
    assert (line.per_image, line.per_step) == (7, 100)
    figures = memory.Figures(None, line, line, line, line, 0, 0, line)
    room = 16 * memory.GB - memory.RESERVE
    largest = figures.largest_piece(16, lambda p: 2**30 * p)
    assert largest * 2**30 <= room < (largest + 1) * 2**30
    assert figures.largest_piece(16, lambda p: 10 * memory.GB * p) == 1
    assert figures.largest_piece(16, lambda p: 20 * memory.GB) == 0


def test_memory_of_a_small_supernet_per_image():
    """Measured on a small model: the training step keeps what it saves for backward, and more per
    image than evaluation; float32 saves more than bfloat16; the table covers every GPU size."""
    model = build_supernet("mobilenet_v2", 10, 2, [0.01, 0.001], width_multiplier=0.25, width_divisor=8)
    teacher = torchvision.models.resnet18(num_classes=10)
    fp32 = memory.measure(None, model=model, resolution=32, teacher=teacher)
    bf16 = memory.measure("bf16", model=model, resolution=32, teacher=teacher)
    for f in (fp32, bf16):
        assert f.saved.per_image > 0 and f.train.per_image >= 0.9 * f.saved.per_image
        assert 0 < f.eval.per_image < f.train.per_image / 3 and f.teacher.per_image > 0
    assert bf16.saved.per_image < 0.8 * fp32.saved.per_image
    assert fp32.parameters == sum(p.numel() * 4 for p in model.parameters())
    rows = memory.table({None: fp32, "bf16": bf16}).splitlines()
    assert len(rows) == 2 + 2 * 3 and all(r.count("|") == 10 for r in rows)


def test_gpu_check_statuses(tmp_path, monkeypatch):
    """A check is passed, failed or not exercised, never passed by default: GPU memory on the CPU is
    not exercised, a peak over the table fails."""
    checks = gpu_check.Checks(tmp_path, cuda=False)
    checks.run("memory on the CPU", lambda: checks.peak(2**30, "a stage"))
    checks.run("a stage that raises", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    gpu = gpu_check.Checks(tmp_path, cuda=True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: int(1.2 * 2**30))
    gpu.run("over the table", lambda: gpu.peak(2**30, "a stage"))
    gpu.run("within the table", lambda: gpu.peak(1.2 * 2**30, "a stage"))
    gpu.run("far under the table", lambda: gpu.peak(1.5 * 2**30, "a stage"))
    statuses = [r["status"] for r in checks.results + gpu.results]
    assert statuses == ["not exercised", "failed", "failed", "passed", "failed"]
    assert not checks.report("cpu")  # a failed check fails the run


class Enough(Exception):
    """Stops a stage-1 run once its step is recorded."""


def recorded_step(folder: Path, name: str, at: int, *flags: str, change=lambda stage1: None) -> dict:
    """Stage 1 on a small model over ``folder``, its ``at``-th step recorded (``bench.stage1_ranks``),
    the run stopped there; ``change`` edits the stage's module first (a mutation)."""
    from bench.stage1_ranks import recording

    stage1 = memory.stage_script("01train_supernet.py")
    change(stage1)
    with recording(stage1, folder / f"{name}.pt", at) as case:
        recorded = stage1.stage_step

        def then_stop(*args):
            out = recorded(*args)
            if "state_after" in case:
                raise Enough
            return out

        stage1.stage_step = then_stop
        with pytest.raises(Enough):
            stage1.train(stage1.parse_args([
                "--data", str(folder.parent / "images"), "--teacher", "none", "--width_multiplier", "0.25",
                "--width_divisor", "8", "--base_resolution", "32", "--l2_bounds", "0.01,0.001",
                "--batch_size", "8", "--replicas", "2", "--pieces_per_pass", "1", "-j", "0",
                "--save", str(folder / name), *flags]))
    assert torch.load(folder / f"{name}.pt", weights_only=True).keys() == case.keys()
    return case


@pytest.fixture
def runs(tmp_path, image_folder) -> Path:
    """A folder for stage-1 runs, beside a link to the image folder."""
    (tmp_path / "images").symlink_to(image_folder)
    (tmp_path / "runs").mkdir()
    return tmp_path / "runs"


def test_gpu_check_compares_a_resumed_step_by_the_step_rule(runs, monkeypatch):
    """``same_resumed_step``: a run resumed from its iteration-2 checkpoint repeats the uninterrupted
    run's iteration 3 (dropout on) from the same bits, by the step rule; a resume that loses Adam's
    state fails before the step and in it, one that draws another iteration's dropout masks in the
    step (on the loss and the updates), with no count of elements allowed off."""
    from training.pieces import Draws

    budget = ["--save_interval", "2", "--abin_total_iters", "4", "--awbin_total_iters", "4"]
    one = recorded_step(runs, "uninterrupted", 3, *budget)
    resume = [*budget, "--resume", str(runs / "uninterrupted" / "model_actbin_best_00002it.pth")]
    ok, said = gpu_check.same_resumed_step(one, recorded_step(runs, "resumed", 1, *resume))
    assert ok, said

    with monkeypatch.context() as m:  # the checkpoint's Adam state is not loaded
        m.setattr(torch.optim.Adam, "load_state_dict", lambda self, state: None)
        lost = recorded_step(runs, "fresh_adam", 1, *resume)
    ok, said = gpu_check.same_resumed_step(one, lost)
    assert not ok and "exp_avg (before): resumed from another value" in said, said
    other = recorded_step(runs, "other_masks", 1, *resume, change=lambda stage1: setattr(
        stage1, "Draws", lambda seed, iteration: Draws(seed, iteration + 1)))
    ok, said = gpu_check.same_resumed_step(one, other)
    assert not ok and "before" not in said and ("loss" in said or "elements off" in said), said


def test_gpu_check_compares_first_steps_by_the_step_rule(runs):
    """``same_first_step`` (stage 1 over two processes against one, README "GPUs") passes a first
    step against itself and fails one whose second piece never reached the gradients (what the
    other rank's gradients missing from the all-reduce give), on the updates: a rule of float noise
    and structurally zero gradients, no count of elements allowed off. The two-process run itself
    is the CPU smoke run's (``python -m bench.gpu_check --device cpu``, CI)."""

    def first_step(name: str, second_piece: float = 1.0) -> dict:
        def weighted_pieces(stage1):
            real = stage1.criterion

            def weighted(*args):  # one piece per pass: the loss of each piece apart
                loss = real(*args)
                return lambda logits, piece: loss(logits, piece) * (1.0 if piece.start == 0 else second_piece)

            stage1.criterion = weighted

        return recorded_step(runs, name, 1, change=weighted_pieces)

    one = first_step("one")
    ok, said = gpu_check.same_first_step(one, one)
    assert ok, said
    ok, said = gpu_check.same_first_step(one, first_step("missing", second_piece=0.0))
    assert not ok and "elements off" in said, said
