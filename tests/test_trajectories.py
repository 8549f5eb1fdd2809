"""Single training iterations of the authors' loops (every ``trajectories*.pt`` of the fixtures
folder), driven through the project's own stage-1 and stage-3 steps: the LSQ initialisation, a
phase-1 and a phase-2 step of Adam, the weight-step re-initialisation and a BN-stabilize step of
SGD. Every number comes from the recorded case (``tests/replay.py``), so any recording made by the
procedure of the fixtures' README is valid input.

What a step changed is compared, tensor by tensor, with what the recorded step changed
(``bench/step_compare.py`` derives the tolerances); ``tests/test_mutations.py`` shows that wrong
steps fail these comparisons. The reference gives every parameter a gradient at every iteration
(zero where its branch was not selected), so its optimizers step every parameter (SPEC 3).
"""
import pytest
import torch

from bench.step_compare import compare_step, compare_values

from .replay import STEPS, faithful_step, lsq_init, noise_parameters, recordings, weight_step_reinit


@pytest.fixture(scope="module", params=recordings("trajectories*.pt"))
def recording(request, load_fixture) -> dict:
    return load_fixture(request.param)


def lsq_steps(state: dict) -> list[str]:
    return [k for k in state if k.endswith("_quantize.s") or k.endswith(".1.s")]


def test_lsq_initialisation(recording):
    case = recording["lsq_init"]
    assert compare_values(lsq_init(recording), case["state_before"], case["state_after"]) == {}
    assert any(not torch.equal(case["state_before"][k], case["state_after"][k])
               for k in lsq_steps(case["state_after"]))


def test_weight_step_reinitialisation(recording):
    case = recording["weight_step_reinit"]
    assert compare_values(weight_step_reinit(recording), case["state_before"], case["state_after"]) == {}


@pytest.mark.parametrize("name", STEPS)
def test_step(recording, name):
    """Stage 1's phases (Adam over every parameter, one group per branch's clips) and stage 3
    (SGD, the biases and the clips at lr, every other parameter at 0)."""
    case = recording[name]
    assert compare_step(case, faithful_step(recording, name), noise_parameters(recording, name)) == {}
