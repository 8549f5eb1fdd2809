"""Single training iterations of the authors' loops under ``nn.DataParallel`` (every
``dataparallel*.pt`` of the fixtures folder, SPEC 5a), driven through the project's own stage-1 and
stage-3 steps and LSQ initialisation with the recorded number of replicas: each piece of the batch
normalised on its own, LSQ's ``k`` from the piece, running statistics and the initialisation from
the first piece, the gradients summed. Compared as ``test_trajectories.py`` compares.

A full-batch step from the same states differs in most tensors: the last test checks that these
cases tell the two apart, so that passing them means computing the pieces.
"""
import contextlib

import pytest

from bench.step_compare import compare_step, compare_values
from quant import fused
from training.pieces import Share, piece_sizes

from .replay import STEPS, faithful_step, lsq_init, noise_parameters, recordings, run_step

CASES = ("lsq_init", *STEPS)


@pytest.fixture(scope="module", params=recordings("dataparallel*.pt"))
def recording(request, load_fixture) -> dict:
    return load_fixture(request.param)


def test_the_recorded_pieces_are_torch_chunks(recording):
    """The recorded pieces are ``torch.chunk``'s of the batch over the recorded replicas, and the
    cases hold more than one piece (else they would not tell pieces from the whole batch)."""
    for name in CASES:
        batch = recording[name]["batch"]
        assert piece_sizes(len(batch["x"]), batch["replicas"]) == batch["pieces"], name
        assert len(batch["pieces"]) > 1, name


def test_lsq_initialisation_from_the_first_piece(recording):
    case = recording["lsq_init"]
    assert compare_values(lsq_init(recording), case["state_before"], case["state_after"]) == {}


@pytest.mark.parametrize("name", STEPS)
def test_step(recording, name):
    case = recording[name]
    assert compare_step(case, faithful_step(recording, name), noise_parameters(recording, name)) == {}


@pytest.mark.parametrize("name", STEPS)
@pytest.mark.parametrize("back_end, pieces_per_pass", [("fused", 1), ("pytorch", 2)])
def test_step_in_passes(recording, name, back_end, pieces_per_pass):
    """The pieces one by one by the fused CPU kernels, or two at a time by PyTorch's ops (a GPU's
    path; an uneven last piece in a pass of its own or beside another): the same recorded step.
    The default, all of a process's pieces in one pass, is ``test_step``'s (fused kernels) and
    ``test_one_pass_by_pytorch``'s."""
    case = recording[name]
    with fused.pytorch_only() if back_end == "pytorch" else contextlib.nullcontext():
        step = faithful_step(recording, name, pieces_per_pass)
    assert compare_step(case, step, noise_parameters(recording, name)) == {}


def test_one_pass_by_pytorch(recording):
    """All the pieces in one pass by PyTorch's ops (``test_step`` runs the fused kernels)."""
    for name in STEPS:
        with fused.pytorch_only():
            step = faithful_step(recording, name)
        assert compare_step(recording[name], step, noise_parameters(recording, name)) == {}, name


def test_a_full_batch_step_is_told_apart(recording):
    """``--replicas 1`` from the same states fails every case, in its parameters' updates."""
    case = recording["lsq_init"]
    whole = Share.of(len(case["batch"]["x"]))
    assert compare_values(lsq_init(recording, whole), case["state_before"], case["state_after"])
    for name in STEPS:
        case = recording[name]
        step = run_step(recording, name, Share.of(len(case["batch"]["x"])))
        failures = compare_step(case, step, noise_parameters(recording, name))
        assert set(failures) & set(step.parameters), name
