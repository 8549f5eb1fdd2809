"""How a stage fails: a user error is one line and status 2; a defect keeps its traceback."""
import argparse

import pytest
import torch

from models import Supernet
from utils.errors import BasqError, CheckpointError, DataError, UsageError
from utils.runtime import fail_cleanly, use_tf32

from .conftest import load_script, run_script


@pytest.mark.parametrize("error", [UsageError, CheckpointError, DataError, BasqError])
def test_a_user_error_is_one_line_and_status_2(error, capsys):
    def stage(args):
        raise error("--flag x: cannot be used")

    with pytest.raises(SystemExit) as exit_:
        fail_cleanly(stage, None)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: --flag x: cannot be used\n"


def test_a_defect_keeps_its_traceback():
    def stage(args):
        raise ValueError("a bug, not bad input")

    with pytest.raises(ValueError, match="a bug"):
        fail_cleanly(stage, None)
    defect = "from utils.runtime import fail_cleanly; fail_cleanly(lambda args: int('x'), None)"
    run = run_script("-c", defect)
    assert run.returncode == 1
    assert "Traceback" in run.stderr and "ValueError: invalid literal" in run.stderr
    assert not run.stderr.startswith("error:")


CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.25 GiB. GPU 0 has a total capacity of 15.77 GiB of "
            "which 1.02 GiB is free. Of the allocated memory 13.9 GiB is allocated by PyTorch")


@pytest.mark.parametrize("amp", [None, "bf16"])
def test_out_of_gpu_memory_names_the_piece_and_what_to_change(amp, capsys):
    def stage(args):
        raise torch.OutOfMemoryError(CUDA_OOM)

    with pytest.raises(SystemExit) as exit_:
        fail_cleanly(stage, argparse.Namespace(batch_size=768, replicas=8, amp=amp))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: out of GPU memory (Tried to allocate 2.25 GiB; "
                                                   "GPU 0 has a total capacity of 15.77 GiB)")
    assert "pieces of 96 images (--batch_size 768 in --replicas 8 pieces)" in err
    assert "--replicas 16 (pieces of 48)" in err
    assert ("--amp bf16" in err) == (amp is None)


def test_out_of_gpu_memory_in_a_stage_is_one_line(tmp_path, image_folder, monkeypatch, capsys):
    """Stage 1 whose model runs out of GPU memory (mocked): the message, no traceback."""
    stage1 = load_script("01train_supernet.py")

    def out_of_memory(self, x, selection):
        raise torch.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(Supernet, "forward", out_of_memory)
    args = stage1.parse_args([
        "--data", str(image_folder), "--save", str(tmp_path), "--width_multiplier", "0.25",
        "--base_resolution", "32", "--l2_bounds", "0.01,0.001", "--teacher", "none", "--batch_size", "12",
        "--replicas", "4", "-j", "0", "--abin_total_iters", "1", "--awbin_total_iters", "1",
        "--device", "cpu"])
    with pytest.raises(SystemExit) as exit_:
        fail_cleanly(stage1.train, args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of GPU memory") and "pieces of 3 images" in err
    assert "Traceback" not in err


def test_stage2_out_of_memory_names_its_batches(capsys):
    def stage(args):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    with pytest.raises(SystemExit):
        fail_cleanly(stage, argparse.Namespace(val_batch_size=200, replicas=8))
    err = capsys.readouterr().err
    assert "evaluation batches of 200 images: lower --val_batch_size or --prefix_cache_gb" in err


@pytest.mark.parametrize("enabled", [True, False])
def test_tf32_flag_sets_cudnn_and_the_log_says_so(enabled, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", not enabled)  # restored after the test
    assert "not used on the CPU" in use_tf32(enabled, torch.device("cpu"))
    assert torch.backends.cudnn.allow_tf32 is enabled
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))  # an H100
    line = use_tf32(enabled, torch.device("cuda", 0))
    assert line.startswith("TF32: on for float32 convolutions" if enabled else "TF32: off (--tf32 off)")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla V100")
    assert use_tf32(enabled, torch.device("cuda", 0)) == "TF32: not available on Tesla V100 (before Ampere)"


def test_tf32_is_a_flag_of_every_stage():
    for script in ("01train_supernet.py", "02kfold_evolution.py", "03finetune.py"):
        assert load_script(script).parse_args(["--tf32", "off"]).tf32 is False
        assert load_script(script).parse_args([]).tf32 is True
