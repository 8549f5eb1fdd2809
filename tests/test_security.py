"""A crafted checkpoint cannot run code: every stage loads files with safe unpickling."""
import os

import pytest
import torch

from utils.checkpoint import PLAIN_REFUSED, load_file

from .conftest import assert_clean_failure, run_script

TINY = ["--width_multiplier", "0.25", "--width_divisor", "8", "--base_resolution", "32",
        "--l2_bounds", "0.01,0.001", "-j", "0", "--replicas", "2"]


@pytest.fixture
def crafted(tmp_path):
    """A .pth whose unpickling would create ``marker``."""
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "model_actwbin_best_466000it.pth"
    torch.save({"iter": 1, "model_state_dict": Payload(), "best_top1_acc": 0.0}, path)
    return path, marker


@pytest.mark.parametrize("script, flag", [
    ("01train_supernet.py", "--resume"),
    ("01train_supernet.py", "--teacher"),
    ("02kfold_evolution.py", "--supernet"),
    ("03finetune.py", "--supernet"),
])
def test_crafted_pickle_runs_nothing(tmp_path, image_folder, crafted, script, flag):
    path, marker = crafted
    extra = ["--teacher", "none"] if flag == "--resume" else []
    result = run_script(script, "--data", str(image_folder), "--save", str(tmp_path / "out"), *TINY,
                        *extra, flag, str(path))
    assert_clean_failure(result, f"{path}: {PLAIN_REFUSED}")
    assert not marker.exists()


def test_released_format_and_stage1_checkpoints_load_safely(tmp_path, image_folder):
    result = run_script("01train_supernet.py", "--data", str(image_folder), "--save", str(tmp_path),
                        "--teacher", "none", *TINY, "--batch_size", "8", "--abin_total_iters", "1",
                        "--awbin_total_iters", "1")
    assert result.returncode == 0, result.stderr
    ckpt = load_file(tmp_path / "model_actwbin_best_00001it.pth")  # weights_only=True
    assert {"optimizer", "scheduler", "rng", "meters", "args", "config"} <= set(ckpt)
    released = {k: ckpt[k] for k in ("iter", "model_state_dict", "best_top1_acc")}
    torch.save(released, tmp_path / "released.pth")
    assert load_file(tmp_path / "released.pth")["iter"] == 1
