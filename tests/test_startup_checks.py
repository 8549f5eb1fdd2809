"""What fails at start-up fails there, in one line that says what to do: a torch older than the
floor, shared memory too small for the loaders' batches, bf16 asked of a GPU without it; and the
loader workers' default."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils import cli, runtime
from utils.errors import UsageError
from utils.torch_floor import TORCH_FLOOR, check_torch, release

from .conftest import ROOT, load_script

stage1 = load_script("01train_supernet.py")


def test_a_torch_older_than_the_floor_stops_with_one_line():
    assert release("2.5.1+cu124") == (2, 5) and release("2.10.0a0+git1234") == (2, 10)
    check_torch("2.5.0")
    check_torch(torch.__version__)
    with pytest.raises(SystemExit) as e:
        check_torch("2.4.1+cu121")
    assert str(e.value) == ("error: torch 2.4.1+cu121 is older than 2.5, the oldest this project runs on: "
                            "install torch>=2.5 (pip install -r requirements.txt; on a GPU node, a CUDA "
                            "build of torch 2.5 or later from pytorch.org)")


def test_a_script_under_an_old_torch_exits_before_its_imports_fail():
    """A stage script as a user runs it, with torch's version string made older: one line, exit 1."""
    code = ("import sys, runpy, torch; torch.__version__ = '2.1.2'; sys.argv = ['01train_supernet.py']; "
            "runpy.run_path('01train_supernet.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: torch 2.1.2 is older than 2.5, the oldest this project runs on: install torch>=2.5 (pip "
        "install -r requirements.txt; on a GPU node, a CUDA build of torch 2.5 or later from pytorch.org)"]


def test_requirements_name_the_floor():
    text = (Path(ROOT) / "requirements.txt").read_text()
    assert re.search(r"^torch>=(\d+)\.(\d+)\b", text, re.M).groups() == tuple(map(str, TORCH_FLOOR))


def test_shared_memory_too_small_for_the_loaders_is_refused_with_what_to_do():
    """768 images of 224 px (115 MB) twice per worker: 4 workers need 925 MB, Docker gives 64 MB."""
    with pytest.raises(UsageError) as e:
        runtime.check_shared_memory(4, 768, 224, free=64 * 10**6)
    assert str(e.value) == ("/dev/shm has 64 MB free, and -j 4 loader workers hold up to 925 MB of batches "
                            "there (2 each of 116 MB): give the container more shared memory (Docker: "
                            "--shm-size 2g), or load in the main process with -j 0 (slower)")
    assert "925 MB of batches in flight" in runtime.check_shared_memory(4, 768, 224, free=10**9)
    assert runtime.check_shared_memory(0, 768, 224, free=0) == "data loading in the main process (-j 0)"


def test_stage1_refuses_small_shared_memory_before_it_starts(tmp_path, image_folder, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "shared_memory_free", lambda path="/dev/shm": 10**4)
    args = stage1.parse_args(["--data", str(image_folder), "--teacher", "none", "--save", str(tmp_path),
                              "--base_resolution", "32", "--batch_size", "8", "--replicas", "2", "-j", "2"])
    with pytest.raises(SystemExit) as e:
        runtime.fail_cleanly(stage1.train, args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: /dev/shm has 0 MB free, and -j 2 loader workers")
    assert "--shm-size" in err and "-j 0" in err and not list(tmp_path.glob("*.pth"))


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    gpu = torch.device("cuda", 0)
    with pytest.raises(UsageError) as e:
        runtime.check_amp("bf16", gpu)
    assert str(e.value) == ("--amp bf16: Tesla V100-SXM2-32GB (compute capability 7.0) has no bfloat16 "
                            "arithmetic (Ampere, 8.0, and later have): use --amp fp16, or leave --amp out "
                            "(float32)")
    runtime.check_amp("fp16", gpu)
    runtime.check_amp(None, gpu)
    runtime.check_amp("bf16", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    runtime.check_amp("bf16", gpu)


def test_loader_workers_default_to_the_cores_per_process_capped(monkeypatch):
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cli.default_workers() == cli.MAX_WORKERS == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert cli.default_workers() == 8
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {0, 1})
    assert cli.default_workers() == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert stage1.parse_args([]).workers == cli.default_workers() == 2
