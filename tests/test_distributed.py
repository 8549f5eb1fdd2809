"""The three stages under ``torchrun``: two CPU processes (gloo) on the generated image folder.

Stage 1: one set of loadable checkpoints, the same selections on both ranks, ``--resume``.
Stages 2 and 3: the folds and archs spread over the ranks give the single-process result.
A failing rank ends the job with a message naming it, instead of a hang.
"""
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models import build_supernet
from search.results import parse_block
from utils import distributed
from utils.checkpoint import load_file
from utils.data import ValidationBatches, train_loader
from utils.errors import UsageError

from .conftest import ROOT, load_script

stage1 = load_script("01train_supernet.py")

MODEL = ["--width_multiplier", "0.25", "--width_divisor", "8", "--base_resolution", "32",
         "--l2_bounds", "0.01,0.001,0.0001", "-j", "0"]
STAGE1 = [*MODEL, "--teacher", "none", "--batch_size", "8", "--replicas", "2", "--abin_total_iters", "2",
          "--awbin_total_iters", "2", "--save_interval", "2", "--record_selections"]
CHECKPOINTS = [f"model_{kind}_best_{i:05d}it.pth" for kind in ("actbin", "actwbin") for i in (1, 2)]
K = 3  # 3 folds over 2 ranks: rank 0 takes folds 0 and 2, rank 1 fold 1
STAGE2 = [*MODEL, "--k", str(K), "--val_batch_size", "4", "--max-epochs", "2", "--population-num", "4",
          "--select-num", "2", "--mutation-num", "1", "--crossover-num", "1", "--replicas", "2"]
STAGE3 = [*MODEL, "--k", str(K), "--val_batch_size", "4", "--bn_epochs", "1", "--iters_per_epoch", "2",
          "--batch_size", "4", "--replicas", "2", "--learning_rate_bnstabilize", "1e-3"]
TIMEOUT = 120  # seconds; a hang fails the test instead of blocking the suite


def run(*args: str, ranks: int = 2) -> subprocess.CompletedProcess:
    """A stage under torchrun with ``ranks`` CPU processes, or as a plain process (``ranks=0``).

    One thread per process: two processes on two cores would otherwise fight over them.
    """
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    launcher = torchrun if ranks else []
    return subprocess.run([sys.executable, *launcher, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory, image_folder) -> Path:
    save = tmp_path_factory.mktemp("ddp-stage1")
    ok(run("01train_supernet.py", "--data", str(image_folder), "--save", str(save), *STAGE1))
    return save


@pytest.fixture(scope="module")
def search_runs(tmp_path_factory, image_folder, stage1_run) -> dict[int, tuple[Path, str]]:
    """Stage 2 on two ranks and in one process: ``{ranks: (save folder, stdout)}``."""
    runs = {}
    for ranks in (2, 0):
        save = tmp_path_factory.mktemp(f"ddp-stage2-{ranks}")
        result = ok(run("02kfold_evolution.py", "--data", str(image_folder), "--save", str(save),
                        "--supernet", str(stage1_run / CHECKPOINTS[-1]), *STAGE2, ranks=ranks))
        runs[ranks] = save, result.stdout
    return runs


def test_stage1_writes_one_set_of_loadable_checkpoints(stage1_run):
    assert sorted(p.name for p in stage1_run.glob("*.pth")) == sorted(CHECKPOINTS)
    assert not list(stage1_run.glob(".*.tmp"))
    for name in CHECKPOINTS:
        ckpt = load_file(stage1_run / name)
        assert not any(k.startswith("module.") for k in ckpt["model_state_dict"])
        build_supernet(**ckpt["config"]).load_state_dict(ckpt["model_state_dict"], strict=True)
    ranks = load_file(stage1_run / CHECKPOINTS[0])["rng"]["ranks"]  # each rank's own generators
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    log = (stage1_run / "log.txt").read_text()  # rank 0 alone logs
    assert log.count("stage 1 done") == 1 and "2 pieces of 4 (--replicas 2), 1 piece per process" in log
    assert len(list(stage1_run.glob("events.out.tfevents.*"))) == 1


def test_stage1_ranks_train_the_same_selections(stage1_run):
    rank0, rank1 = ((stage1_run / "selections" / f"rank{r}.txt").read_text().splitlines() for r in (0, 1))
    assert rank0 == rank1
    assert [line.split()[:2] for line in rank0] == [["1", "1"], ["1", "2"], ["2", "1"], ["2", "2"]]
    assert len({line.split()[2] for line in rank0}) == 4  # a new draw every iteration


def test_stage1_resume_under_torchrun(tmp_path, image_folder, stage1_run):
    """From the phase-1 iteration-1 checkpoint to the end: the uninterrupted run's weights."""
    ok(run("01train_supernet.py", "--data", str(image_folder), "--save", str(tmp_path), *STAGE1,
           "--resume", str(stage1_run / CHECKPOINTS[0])))
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == sorted(CHECKPOINTS[1:])
    final = load_file(stage1_run / CHECKPOINTS[-1])["model_state_dict"]
    again = load_file(tmp_path / CHECKPOINTS[-1])["model_state_dict"]
    for k, v in final.items():
        torch.testing.assert_close(again[k], v, rtol=0, atol=1e-5, msg=k)
    uninterrupted = (stage1_run / "selections" / "rank0.txt").read_text().splitlines()
    for r in (0, 1):
        assert (tmp_path / "selections" / f"rank{r}.txt").read_text().splitlines() == uninterrupted[1:]


def test_pieces_give_the_same_steps_on_one_two_or_four_processes(tmp_path, monkeypatch):
    """A global batch of 4 pieces on 2 processes (2 pieces each) or 4 (1 each), dropout on: each of
    a few steps is the step one process computes from the same state, with all 4 pieces in one
    pass, up to float noise (``compare_step``). So the arithmetic, dropout masks included, does
    not depend on the number of processes (the bits do: the gradients are summed in another
    order). Masks drawn by a piece's index within its process (as each of the reference's devices
    drew its own) fail the classifier."""
    from training.pieces import Draws

    from . import pieces_over_ranks as script

    for ranks in (2, 4):
        out = tmp_path / f"{ranks}.pt"
        ok(run("-m", "tests.pieces_over_ranks", str(out), ranks=ranks))
        cases = torch.load(out)
        assert [c["iteration"] for c in cases] == list(range(1, script.STEPS + 1))
        for case in cases:
            assert replayed_in_one_process(case) == {}, (ranks, case["iteration"])
    generator = Draws.generator
    monkeypatch.setattr(Draws, "generator", lambda self, piece, device: generator(self, piece % 2, device))
    assert "classifier.1.weight" in replayed_in_one_process(cases[0])


def replayed_in_one_process(case: dict) -> dict[str, str]:
    """``compare_step`` of a step of ``tests/pieces_over_ranks.py`` with the step one process
    computes from its state, all pieces in one pass."""
    from bench.step_compare import Step, compare_step, noise_gradient_parameters

    from . import pieces_over_ranks as script
    from .replay import load_optimizer_state

    model = build_supernet("mobilenet_v2", **case["config"])
    model.change_precision(True, False)
    model.load_state_dict(case["state_before"])
    model.train()
    noise = noise_gradient_parameters(copy.deepcopy(model), case["batch"]["x"], case["batch"]["selection"])
    optimizer, _ = load_script("01train_supernet.py").phase_optimizer(model, 1e-3, 5e-6, 10)
    named = dict(model.named_parameters())
    load_optimizer_state(optimizer, named, case["optimizer_state_before"])
    loss, grad_norm = script.step(model, optimizer, case["iteration"],
                                  script.Share.of(script.BATCH, script.REPLICAS))
    ours = Step(list(named), model.state_dict(), script.optimizer_state(optimizer, named),
                {n: p.grad for n, p in named.items()}, loss.item(), grad_norm.item())
    return compare_step(case, ours, noise)


def test_stage2_two_ranks_give_the_single_process_result(search_runs):
    (two, printed_two), (one, printed_one) = search_runs[2], search_runs[0]
    distributed, single = (json.loads((save / "search_result.json").read_text()) for save in (two, one))
    assert distributed["folds"] == list(range(K))
    for key in ("fold_accs", "full_accs", "archs"):
        assert distributed[key] == single[key], key
    assert distributed == single
    assert printed_two.count("===total-result===") == 1
    blocks = [parse_block(text[text.index("===total-result==="):]) for text in (printed_two, printed_one)]
    assert blocks[0] == blocks[1] and blocks[0]["archs"] == single["archs"]
    assert sorted(p.name for p in (two / "folds").iterdir()) == sorted(
        name for i in range(K) for name in (f"fold{i}.json", f"fold{i}.state.json"))
    # both ranks appended their folds' lines to the one history.jsonl: the single process's lines
    lines = [sorted((save / "history.jsonl").read_text().splitlines()) for save in (two, one)]
    assert lines[0] == lines[1] and len(lines[0]) == sum(single["num_candidates"])
    assert "fold 1: " in (two / "log.txt").read_text()  # rank 1's fold, logged by rank 0


def test_stage3_two_ranks_spread_the_archs(tmp_path, image_folder, stage1_run, search_runs):
    found = search_runs[2][0] / "search_result.json"
    saves = {ranks: tmp_path / str(ranks) for ranks in (2, 0)}
    for ranks, save in saves.items():
        ok(run("03finetune.py", "--data", str(image_folder), "--supernet", str(stage1_run / CHECKPOINTS[-1]),
               "--search-result", str(found), "--save", str(save), *STAGE3, ranks=ranks))
    names = [f"arch{i}_model_actwbin_2_2_bn_0ep.pth" for i in range(K)]
    assert sorted(p.name for p in saves[2].glob("*.pth")) == names
    distributed, single = (json.loads((save / "final_result.json").read_text()) for save in saves.values())
    assert distributed == single
    for name in names:  # arch 1 was fine-tuned by rank 1
        mine, theirs = (load_file(save / name)["model_state_dict"] for save in saves.values())
        for k, v in theirs.items():
            assert torch.equal(mine[k], v), f"{name}: {k}"


def test_replicas_must_split_over_the_ranks(tmp_path, image_folder):
    result = run("01train_supernet.py", "--data", str(image_folder), "--save", str(tmp_path),
                 *STAGE1, "--replicas", "3")
    assert result.returncode != 0
    assert "error: --replicas 3 does not split over 2 processes" in result.stderr
    assert "rank 0: error" in result.stderr or "rank 1: error" in result.stderr
    assert not list(tmp_path.glob("*.pth"))


def test_a_failing_rank_ends_the_job_and_is_named(tmp_path, image_folder, stage1_run):
    """Rank 1 cannot use its fold file (a folder in the way); rank 0, waiting for it, is stopped too."""
    (tmp_path / "folds" / "fold1.json").mkdir(parents=True)
    start = time.time()
    result = run("02kfold_evolution.py", "--data", str(image_folder), "--save", str(tmp_path),
                 "--supernet", str(stage1_run / CHECKPOINTS[-1]), *STAGE2)
    assert result.returncode != 0
    assert "[rank1]" in result.stderr and "IsADirectoryError" in result.stderr
    assert time.time() - start < TIMEOUT
    assert not (tmp_path / "search_result.json").exists()
class FakeCuda:
    """The CUDA calls ``distributed.setup`` makes, on a node with ``count`` GPUs, recorded."""

    def __init__(self, monkeypatch, count: int):
        self.set_to, self.init = [], {}
        monkeypatch.setattr(distributed, "_in_use", None)  # restored after the test
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", self.set_to.append)
        monkeypatch.setattr(torch.distributed, "init_process_group",
                            lambda backend, **kw: self.init.update(backend=backend, **kw))


def torchrun_env(monkeypatch, local_rank: int, world: int = 2) -> None:
    for name, value in (("WORLD_SIZE", world), ("RANK", local_rank), ("LOCAL_RANK", local_rank)):
        monkeypatch.setenv(name, str(value))


@pytest.mark.parametrize("count, local_rank, expected", [(8, 3, 3), (1, 3, 0), (1, 0, 0)])
def test_each_process_takes_its_gpu_and_binds_nccl_to_it(monkeypatch, count, local_rank, expected):
    """LOCAL_RANK picks the GPU; a process that sees one GPU (one per task, as SLURM binds them)
    takes it whatever its LOCAL_RANK; the process group is bound to that GPU (device_id)."""
    cuda = FakeCuda(monkeypatch, count)
    torchrun_env(monkeypatch, local_rank, world=8)
    device = distributed.setup(None, 1.0)
    assert device == torch.device("cuda", expected)
    assert cuda.set_to == [device]
    assert cuda.init["backend"] == "nccl" and cuda.init["device_id"] == device
    assert distributed.pin_memory()


def test_a_local_rank_beyond_the_gpus_seen_is_refused(monkeypatch):
    FakeCuda(monkeypatch, 2)
    torchrun_env(monkeypatch, 2, world=4)
    with pytest.raises(UsageError, match="LOCAL_RANK 2 but this process sees 2 GPUs"):
        distributed.setup("cuda", 1.0)


def test_device_cpu_on_a_gpu_node_pins_nothing_and_touches_no_gpu(monkeypatch, tmp_path):
    """--device cpu where CUDA is there: gloo without a device, no GPU chosen, and loaders that do
    not pin (pinning would create a CUDA context)."""
    cuda = FakeCuda(monkeypatch, 8)
    torchrun_env(monkeypatch, 1)
    assert distributed.setup("cpu", 1.0) == torch.device("cpu")
    assert cuda.set_to == [] and cuda.init["backend"] == "gloo" and cuda.init["device_id"] is None
    assert not distributed.pin_memory()
    data = torch.utils.data.TensorDataset(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.zeros(4))
    assert not train_loader(data, 2, 0, 0)[0].pin_memory
    images, _ = next(ValidationBatches(data, 2, 0, cache_bytes=0).stream([0]))
    assert not images.is_pinned()
