"""Loader workers do not double the host memory: every loader of a stage starts its workers before
the stage's memory grows and keeps them (stage 1's phases, stage 3's archs, stages 2 and 3's
validation batches), so none forks from a grown process.

Each check runs in a process of its own and measures it with its loader workers, each page they
share counted once (``process_tree_pss``). The memory a stage grows by is a ballast of touched
memory (a step's activations freed and kept in the heap by ``keep_freed_memory``, as the stages
run; a validation cache), written again while the workers run: workers forked after the growth
share its pages, and each page written again is copied, about the ballast more, which the checks
catch (``late``)."""
import json
import subprocess
import sys

import pytest

from .conftest import ROOT

BALLAST = 400 * 2**20  # bytes a step writes and frees, kept in the heap as a large step's activations are
# What else the tree may add meanwhile: a worker's own pages, the stages' small tensors, a few MB.
MARGIN = 100 * 2**20


def write_ballast(kept: list | None = None) -> None:
    """Write ``BALLAST`` bytes: a tensor freed and kept in the heap for the next write, or the one
    in ``kept`` (made at the first write), held as a cache is."""
    import torch

    if kept is None:
        ballast = torch.ones(BALLAST // 4)  # written page by page, freed, kept for the next write
        del ballast
    elif kept:
        kept[0].add_(1)
    else:
        kept.append(torch.ones(BALLAST // 4))


def run_stage1(folder: str, late: bool) -> list[int]:
    """Stage 1 (3 + 3 iterations, -j 2), each step writing ``BALLAST`` first; the memory of the
    process and its workers after each step. ``late``: each phase makes its own loader, as before."""
    from utils.cpu_memory import process_tree_pss

    from .conftest import load_script

    stage1 = load_script("01train_supernet.py")
    if late:
        stage1.started_loader = lambda *args, **kwargs: None
    samples, real = [], stage1.stage_step

    def step(*args):
        write_ballast()
        out = real(*args)
        samples.append(process_tree_pss())
        return out

    stage1.stage_step = step
    stage1.train(stage1.parse_args([
        "--data", folder, "--teacher", "none", "--width_multiplier", "0.25", "--width_divisor", "8",
        "--base_resolution", "32", "--l2_bounds", "0.01,0.001", "--batch_size", "8", "--replicas", "2",
        "-j", "2", "--abin_total_iters", "3", "--awbin_total_iters", "3", "--save", f"{folder}/out-{late}"]))
    return samples


def run_validation(late: bool) -> list[int]:
    """Validation batches streamed (-j 2) beside a grown process, as stage 2 streams a fold for each
    candidate beside its prefix cache: the memory before the passes (the peak so far), then after
    each batch of three passes, each batch writing the ballast, held. ``late``: the workers fork
    after the growth, as a loader made for each pass did."""
    import torch

    from utils.cpu_memory import process_tree_pss
    from utils.data import ValidationBatches

    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    dataset = [(image, 0) for image in images]
    val = None if late else ValidationBatches(dataset, 8, 2, cache_bytes=0)  # as evaluation_setup
    cache: list = []
    write_ballast(cache)
    samples = [process_tree_pss()]
    val = val or ValidationBatches(dataset, 8, 2, cache_bytes=0)
    for _ in range(3):
        for _ in val.stream(range(len(val))):
            write_ballast(cache)
            samples.append(process_tree_pss())
    return samples


def run_stage3(folder: str, supernet: str, found: str, save: str) -> list[list[int]]:
    """Stage 3 on two archs (-j 2, the validation batches kept), each step writing the ballast, held
    from the first step on (the validation cache and the steps' heap); the memory after each step,
    per arch."""
    from utils.cpu_memory import process_tree_pss

    from .conftest import load_script
    from .test_stage2 import MODEL

    stage3 = load_script("03finetune.py")
    samples: dict[int, list[int]] = {}
    cache: list = []
    real_arch, real_to_device = stage3.finetune_arch, stage3.to_device

    def finetune_arch(args, setup, fold, *rest):
        samples[fold] = []
        return real_arch(args, setup, fold, *rest)

    def to_device(images, device):  # once a training step
        write_ballast(cache)
        samples[max(samples)].append(process_tree_pss())
        return real_to_device(images, device)

    stage3.finetune_arch, stage3.to_device = finetune_arch, to_device
    stage3.finetune(stage3.parse_args([
        "--data", folder, "--supernet", supernet, "--search-result", found, "--save", save, *MODEL,
        "--k", "2", "--bn_epochs", "1", "--iters_per_epoch", "3", "--batch_size", "4", "--replicas", "2",
        "--val_batch_size", "4", "-j", "2"]))
    return [samples[fold] for fold in sorted(samples)]


def measured(*args: str) -> list:
    """What ``run_*`` gave, run in a process of its own (``keep_freed_memory`` as the stages)."""
    done = subprocess.run([sys.executable, "-m", "tests.test_loader_memory", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("late", [False, True])
def test_host_memory_after_the_phase_change_stays_within_the_peak_before_it(image_folder, late):
    """Stage 1: phase 2 stays within phase 1's peak (phase 2's own tensors are a few MB at this
    size); workers forked for phase 2 (``late``, the former code) add about the ballast."""
    samples = measured("stage1", str(image_folder), str(late))
    growth = max(samples[3:]) - max(samples[:3])
    if late:
        assert growth > 0.5 * BALLAST, samples
    else:
        assert growth < MARGIN, samples


@pytest.mark.parametrize("late", [False, True])
def test_host_memory_as_validation_batches_stream_beside_a_grown_process_stays_within_the_peak(late):
    """Stages 2 and 3: passes over the validation batches (their workers started with them, before
    the growth) stay within the peak before them; workers forked after the growth add about the
    ballast (``late``, what a loader made for each pass did)."""
    samples = measured("validation", str(late))
    growth = max(samples[1:]) - samples[0]
    if late:
        assert growth > 0.5 * BALLAST, samples
    else:
        assert growth < MARGIN, samples


def test_host_memory_of_stage3_second_arch_stays_within_the_first_arch_peak(image_folder, tmp_path,
                                                                              tmp_path_factory):
    """Stage 3: the second arch's steps stay within the first arch's peak, the validation batches
    kept meanwhile (a loader made for the second arch forked from the grown process: about the
    ballast more)."""
    from .test_stage2 import shared_search_run, shared_supernet

    supernet = shared_supernet(tmp_path_factory, image_folder)
    found = shared_search_run(tmp_path_factory, image_folder)[0] / "search_result.json"
    first, second = measured("stage3", str(image_folder), str(supernet), str(found), str(tmp_path))
    assert len(first) == len(second) == 3
    assert max(second) - max(first) < MARGIN, (first, second)


if __name__ == "__main__":
    from utils.cpu_memory import keep_freed_memory

    keep_freed_memory()  # as the stages (utils.runtime.fail_cleanly)
    what, *given = sys.argv[1:]
    if what == "stage1":
        print(json.dumps(run_stage1(given[0], given[1] == "True")))
    elif what == "validation":
        print(json.dumps(run_validation(given[0] == "True")))
    else:
        print(json.dumps(run_stage3(*given)))
