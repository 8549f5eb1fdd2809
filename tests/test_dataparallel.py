"""Single training iterations of the authors' loops under ``nn.DataParallel`` (``dataparallel.pt``,
SPEC 5a), driven through the project's own stage-1 and stage-3 steps and LSQ initialisation with
the recorded number of replicas: each piece of the batch normalised on its own, LSQ's ``k`` from
the piece, running statistics and the initialisation from the first piece, the gradients summed.

A full-batch step from the same states leaves about half of a stage-1 step off: the last test
checks that these cases tell the two apart, so that passing them means computing the pieces.
"""
import pytest
import torch
import torch.nn.functional as F

from training.losses import kd_loss
from training.lsq_init import initialize_activation_steps
from training.pieces import Share, piece_sizes
from training.step import train_step

from .test_trajectories import (
    MAX_OFF,
    RTOL,
    assert_states_match,
    flatten,
    load_optimizer_state,
    off_elements,
    optimizer_state,
    stage1_before,
    stage3,
    supernet,
)


@pytest.fixture(scope="module")
def dataparallel(load_fixture):
    return load_fixture("dataparallel.pt")


def test_the_cases_cover_uneven_and_missing_pieces(dataparallel):
    """torch.chunk's sizes, as recorded: equal pieces, a smaller last one, and fewer than R pieces."""
    pieces = {}
    for name in ("lsq_init", "stage1_phase1_step", "stage1_phase2_step", "stage3_step"):
        batch = dataparallel[name]["batch"]
        assert piece_sizes(len(batch["x"]), batch["replicas"]) == batch["pieces"]
        pieces[name] = batch["pieces"]
    assert pieces["stage1_phase2_step"] == [4, 4, 2] and pieces["stage3_step"] == [3, 3, 3]


def lsq_init(t: dict, replicas: int) -> dict:
    case = t["lsq_init"]
    model = supernet(t, case["state_before"])
    model.change_precision(True, False)
    x = case["batch"]["x"]
    initialize_activation_steps(model, x[:piece_sizes(len(x), replicas)[0]], case["batch"]["selection"])
    return model.state_dict()


def stage1_step(t: dict, phase: int, replicas: int) -> tuple[dict, dict, torch.Tensor, torch.Tensor]:
    case = t[f"stage1_phase{phase}_step"]
    batch = case["batch"]
    model, optimizer = stage1_before(t, case, phase)
    named = dict(model.named_parameters())
    _, loss, grad_norm = train_step(model, batch["x"], batch["selection"],
                                    lambda logits, piece: kd_loss(logits, batch["teacher_logits"][piece]),
                                    optimizer, share=Share.of(len(batch["x"]), replicas))
    names = {id(p): n for n, p in named.items()}
    return model.state_dict(), optimizer_state(optimizer, names), loss, grad_norm


def stage3_step(t: dict, replicas: int) -> tuple[dict, dict, torch.Tensor, torch.Tensor, dict]:
    case = t["stage3_step"]
    hyper, batch = case["hyper"], case["batch"]
    model = supernet(t, case["state_before"])
    model.change_precision(True, True)
    optimizer = stage3.bn_stabilize_optimizer(model, hyper["lr"])
    named = dict(model.named_parameters())
    recorded = {n: s for n, s in case["optimizer_state_before"].items() if not n.endswith(".bin")}
    load_optimizer_state(optimizer, named, recorded)
    _, loss, grad_norm = train_step(model, batch["x"], case["selection"],
                                    lambda logits, piece: F.cross_entropy(logits, batch["target"][piece]),
                                    optimizer, share=Share.of(len(batch["x"]), replicas))
    names = {id(p): n for n, p in named.items()}
    moving = optimizer_state(optimizer, names, moving=True)
    expected = flatten(case["optimizer_state_after"], {k.rsplit(".", 1)[0] for k in moving})
    return model.state_dict(), moving, loss, grad_norm, expected


def test_lsq_initialisation_from_the_first_piece(dataparallel):
    case = dataparallel["lsq_init"]
    state = lsq_init(dataparallel, case["batch"]["replicas"])
    assert_states_match(state, case["state_after"], max_off=0)


@pytest.mark.parametrize("phase", [1, 2])
def test_stage1_step(dataparallel, phase):
    case = dataparallel[f"stage1_phase{phase}_step"]
    state, opt_state, loss, grad_norm = stage1_step(dataparallel, phase, case["batch"]["replicas"])
    assert loss.item() == pytest.approx(case["loss"], rel=RTOL)
    assert grad_norm.item() == pytest.approx(case["grad_norm_before_clipping"], rel=RTOL)
    assert_states_match(state, case["state_after"])
    assert_states_match(opt_state, flatten(case["optimizer_state_after"]))


def test_stage3_step(dataparallel):
    case = dataparallel["stage3_step"]
    state, moving, loss, grad_norm, expected = stage3_step(dataparallel, case["batch"]["replicas"])
    assert loss.item() == pytest.approx(case["loss"], rel=RTOL)
    assert grad_norm.item() == pytest.approx(case["grad_norm_before_clipping"], rel=RTOL)
    assert_states_match(state, case["state_after"])
    assert_states_match(moving, expected)


def fraction_off(actual: dict, expected: dict) -> float:
    floats = [k for k, v in expected.items() if v.is_floating_point()]
    total = sum(expected[k].numel() for k in floats)
    return sum(off_elements(actual[k], expected[k]) for k in floats) / total


def test_a_full_batch_step_is_told_apart(dataparallel):
    """``--replicas 1`` from the same states: far more than the tolerated elements off in every case."""
    assert fraction_off(lsq_init(dataparallel, 1), dataparallel["lsq_init"]["state_after"]) > 100 * MAX_OFF
    for phase in (1, 2):
        state = stage1_step(dataparallel, phase, 1)[0]
        assert fraction_off(state, dataparallel[f"stage1_phase{phase}_step"]["state_after"]) > 0.3
    assert fraction_off(stage3_step(dataparallel, 1)[0], dataparallel["stage3_step"]["state_after"]) > 0.03
