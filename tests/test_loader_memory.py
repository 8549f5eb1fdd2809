"""Loader workers do not double the host memory: stage 1's workers start before the steps' memory
grows and serve both phases, so none forks from a grown process."""
import json
import subprocess
import sys

import pytest

from .conftest import ROOT

BALLAST = 400 * 2**20  # bytes a step writes and frees, kept in the heap as a large step's activations are


def run_stage1(folder: str, late: bool) -> list[int]:
    """Stage 1 (3 + 3 iterations, -j 2), each step writing ``BALLAST`` first; the memory of the
    process and its workers after each step. ``late``: each phase makes its own loader, as before."""
    import torch

    from utils.cpu_memory import keep_freed_memory, process_tree_pss

    from .conftest import load_script

    keep_freed_memory()  # as the stages (utils.runtime.fail_cleanly)
    stage1 = load_script("01train_supernet.py")
    if late:
        stage1.started_loader = lambda *args, **kwargs: None
    samples, real = [], stage1.stage_step

    def step(*args):
        ballast = torch.ones(BALLAST // 4)  # written page by page, freed, kept for the next step
        del ballast
        out = real(*args)
        samples.append(process_tree_pss())
        return out

    stage1.stage_step = step
    stage1.train(stage1.parse_args([
        "--data", folder, "--teacher", "none", "--width_multiplier", "0.25", "--width_divisor", "8",
        "--base_resolution", "32", "--l2_bounds", "0.01,0.001", "--batch_size", "8", "--replicas", "2",
        "-j", "2", "--abin_total_iters", "3", "--awbin_total_iters", "3", "--save", f"{folder}/out-{late}"]))
    return samples


@pytest.mark.parametrize("late", [False, True])
def test_host_memory_after_the_phase_change_stays_within_the_peak_before_it(image_folder, late):
    """The process and its loader workers, each shared page counted once (PSS): phase 2 stays within
    phase 1's peak plus 100 MB (phase 2's own tensors are a few MB at this size). Workers forked for
    phase 2 from the process that holds the ballast (``late``, the former code) share its pages,
    and each page the steps write again is copied: about the ballast more, which the check catches."""
    done = subprocess.run([sys.executable, "-m", "tests.test_loader_memory", str(image_folder), str(late)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    samples = json.loads(done.stdout.splitlines()[-1])
    growth = max(samples[3:]) - max(samples[:3])
    if late:
        assert growth > 0.5 * BALLAST, samples
    else:
        assert growth < 100 * 2**20, samples


if __name__ == "__main__":
    print(json.dumps(run_stage1(sys.argv[1], sys.argv[2] == "True")))
