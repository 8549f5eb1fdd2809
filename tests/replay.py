"""The project's own steps driven from a recorded case of the authors' loops (``trajectories*.pt``,
``dataparallel*.pt``): every number (sizes, pieces, hyper-parameters, which groups train) comes from
the case. ``bench/step_compare.py`` compares what the steps changed; the fixture tests and the
mutation suite (``tests/test_mutations.py``) share both.
"""
import inspect
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from bench.step_compare import Step
from models import build_supernet
from quant import fused
from training.losses import kd_loss
from training.lsq_init import initialize_activation_steps
from training.pieces import Share
from training.step import train_step

from .boundaries import Found, Sides, first_agreement, gates_closest_to, on_sides
from .conftest import FIXTURES, load_script

stage1 = load_script("01train_supernet.py")
stage3 = load_script("03finetune.py")
# Where ``train_step`` lives (mutations patch its module's names), wherever that module moves.
training = inspect.getmodule(train_step)

STEPS = ("stage1_phase1_step", "stage1_phase2_step", "stage3_step")


def recordings(pattern: str) -> list[str]:
    """The names of the fixture files matching ``pattern`` (``trajectories*.pt``): a recording
    dropped into ``BASQ_FIXTURES`` is tested as the public ones are. Without any, one name that the
    ``fixtures_dir`` fixture then skips (or fails, under CI) on."""
    return sorted(p.name for p in FIXTURES.glob(pattern)) or [pattern.replace("*", "")]


def supernet(recording: dict, state: dict) -> nn.Module:
    """The recorded model in the recorded state: train mode, the classifier's dropout off (as in
    every recorded forward)."""
    model = build_supernet("mobilenet_v2", **recording["config"])
    model.load_state_dict(state, strict=True)
    model.train()
    model.classifier[0].eval()
    return model


def pieces(case: dict) -> Share:
    """The case's pieces of the batch: ``replicas`` devices for a DataParallel recording, one piece
    (the whole batch) for a recording without it."""
    batch = case["batch"]
    return Share.of(len(batch["x"]), batch.get("replicas", 1))


def lsq_init(recording: dict, share: Share | None = None) -> nn.Module:
    """The reference's ``initialize()`` from the recorded state: the steps and the BN statistics
    from the first piece of the initialisation batch."""
    case = recording["lsq_init"]
    share = share or pieces(case)
    model = supernet(recording, case["state_before"])
    model.change_precision(True, False)
    initialize_activation_steps(model, case["batch"]["x"][:share.sizes[0]], case["batch"]["selection"])
    return model


def weight_step_reinit(recording: dict) -> nn.Module:
    """Switching weight quantization on, every LSQ weight step re-initialised from the weights."""
    case = recording["weight_step_reinit"]
    model = supernet(recording, case["state_before"])
    model.change_precision(True, True)
    model.init_weight_steps()
    return model


def load_optimizer_state(optimizer: torch.optim.Optimizer, named: dict[str, nn.Parameter],
                         state: dict[str, dict]) -> None:
    """The recorded per-name optimizer state, into the optimizer the stage built; it must hold the
    same parameters."""
    grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert {name for name, p in named.items() if id(p) in grouped} == set(state)
    for name, values in state.items():
        optimizer.state[named[name]] = {k: v.clone() for k, v in values.items()}


def stage1_optimizer(model: nn.Module, case: dict) -> torch.optim.Optimizer:
    """Stage 1's Adam from the case's ``hyper``, each group at the recorded lr of this iteration,
    in the recorded state."""
    hyper = case["hyper"]
    optimizer, _ = stage1.phase_optimizer(model, hyper["lr"], hyper["weight_decay"], hyper["total_iters"])
    assert len(optimizer.param_groups) == len(case["group_lrs"])
    for group, lr in zip(optimizer.param_groups, case["group_lrs"], strict=True):
        group["lr"] = lr
    return optimizer


def stage3_optimizer(model: nn.Module, case: dict, train_clip: bool = True) -> torch.optim.Optimizer:
    """Stage 3's SGD at the case's lr; its momentum and Nesterov flag must be the recorded ones,
    its learning rates the recorded groups' (``lr`` or 0)."""
    hyper = case["hyper"]
    optimizer = stage3.bn_stabilize_optimizer(model, hyper["lr"], train_clip)
    assert (optimizer.defaults["momentum"], optimizer.defaults["nesterov"]) == (hyper["momentum"],
                                                                                hyper["nesterov"])
    assert {g["lr"] for g in optimizer.param_groups} <= set(case["group_lrs"])
    return optimizer


def run_step(recording: dict, name: str, share: Share | None = None,
             optimizer_fn: Callable[[nn.Module, dict], torch.optim.Optimizer] | None = None,
             sides: Sides = Sides(), found: Found | None = None,
             pieces_per_pass: int | None = None) -> Step:
    """Our stage-1 (``stage1_phase{1,2}_step``) or stage-3 (``stage3_step``) step from the case's
    recorded state, over the case's pieces (``share``: others, for a mutation), ``pieces_per_pass``
    at once (default: all); ``optimizer_fn`` builds the optimizer (default: the stage's, as
    ``stage1_optimizer``/``stage3_optimizer``). ``sides``: the values on a boundary put on their
    other side, ``found``: where those met are listed (``tests/boundaries.py``)."""
    case = recording[name]
    batch = case["batch"]
    stage3_case = name == "stage3_step"
    model = supernet(recording, case["state_before"])
    model.change_precision(True, stage3_case or name.endswith("phase2_step"))
    optimizer = (optimizer_fn or (stage3_optimizer if stage3_case else stage1_optimizer))(model, case)
    named = dict(model.named_parameters())
    recorded = case["optimizer_state_before"]
    if stage3_case:
        # The reference also steps ``bin`` at lr 0 (its momentum stays 0); ours leaves it out.
        recorded = {n: s for n, s in recorded.items() if not n.endswith(".bin")}
        selection = case["selection"]

        def criterion(logits, piece):
            return F.cross_entropy(logits, batch["target"][piece])
    else:
        selection = batch["selection"]

        def criterion(logits, piece):
            return kd_loss(logits, batch["teacher_logits"][piece])
    load_optimizer_state(optimizer, named, recorded)
    with on_sides(model, sides, found):
        _, loss, grad_norm = train_step(model, batch["x"], selection, criterion, optimizer,
                                        share=share or pieces(case), pieces_per_pass=pieces_per_pass)
    names = {id(p): n for n, p in named.items()}
    return Step(list(named), model.state_dict(),
                {names[id(p)]: dict(s) for p, s in optimizer.state.items()},
                {n: p.grad.clone() for n, p in named.items() if p.grad is not None},
                loss.item(), grad_norm.item())


_steps: dict = {}


def faithful_step(recording: dict, name: str, pieces_per_pass: int | None = None) -> Step:
    """``run_step`` of the case as the stages run it (``pieces_per_pass``: as there), computed once
    per process and back end (the fixture tests and the mutation suite compare it; nobody changes it)."""
    return _faithful(recording, name, pieces_per_pass)[0]


def boundary_sides(recording: dict, name: str) -> Sides:
    """The values on a boundary that the faithful step put on their other side to agree with the
    recording, and the ReLU ties' gates it set (``tests/boundaries.py``): a mutation's step takes
    the same."""
    return _faithful(recording, name)[1]


def agreeing_step(recording: dict, name: str, **wrong) -> tuple[Step, Sides | None]:
    """``run_step`` (``wrong``: a mutation's optimizer or pieces), and where it fails the
    comparison, again with the values within float noise of a boundary put on their other side
    (``boundaries.first_agreement``: which side the recording took depends on the recording
    machine's kernels; PyTorch's baseline BatchNorm leaves exact zeros where the recording's fused
    kernel left ``dataparallel_4bit.pt``'s stage-1 residues), and where none agrees, with the ReLU
    ties' gates whose gradients come closest to the recorded ones (oneDNN's SSE4.1 convolutions
    leave other residues at ``dataparallel_4bit.pt``'s ties): the first that agrees and its sides,
    else the plain step and ``None``."""
    from bench.step_compare import compare_step

    def agrees(step: Step) -> bool:
        return not compare_step(recording[name], step, noise_parameters(recording, name))

    def gates(sides: Sides, found: Found) -> Sides:
        """The ReLU ties' gates whose gradients come closest to the recorded ones: measured with
        every tie open (``boundaries.gates_closest_to``)."""
        opened = replace(sides, relus=frozenset(found.relu_ties))
        measured = Found()
        step = run_step(recording, name, sides=opened, found=measured, **wrong)
        names = {n for c in measured.relu_contributions.values() for n in c}
        residual, tolerance = gradient_residual(recording[name], step, names)
        return replace(sides, relus=gates_closest_to(measured.relu_contributions, residual, tolerance))

    step, sides, _ = first_agreement(
        lambda sides, found: run_step(recording, name, sides=sides, found=found, **wrong), agrees, gates)
    return step, sides


def gradient_residual(case: dict, step: Step, names: set[str]) -> tuple[dict[str, torch.Tensor],
                                                                         dict[str, float]]:
    """Our gradients of ``names`` minus the recorded ones, both before clipping (the clipping
    factors differ where the gradients do), and each tensor's tolerance, ``RHO`` of its largest
    recorded gradient (``bench.step_compare``). The recorded clipped gradient is ours less the
    difference of the two optimizer states' gradients (``recorded_gradient``: the weight decay,
    from the same parameters, cancels)."""
    from bench.step_compare import RHO, recorded_gradient

    ours_case = {**case, "optimizer_state_after": step.optimizer_after}
    clipping = [min(1.0, training.MAX_GRAD_NORM / norm) for norm in (step.grad_norm,
                                                                     case["grad_norm_before_clipping"])]
    residual, tolerance = {}, {}
    for k in names:
        ours, theirs = recorded_gradient(ours_case, k)[0], recorded_gradient(case, k)[0]
        recorded = (step.grads[k].double() - (ours - theirs)) / clipping[1]
        residual[k] = step.grads[k].double() / clipping[0] - recorded
        tolerance[k] = RHO * recorded.abs().max().item()
    return residual, tolerance


def _faithful(recording: dict, name: str, pieces_per_pass: int | None = None) -> tuple[Step, Sides]:
    """The faithful step (``agreeing_step``, computed once per process and back end) and its sides."""
    key = (id(recording), name, pieces_per_pass, fused.path("unit") is None)
    if key not in _steps:
        step, sides = agreeing_step(recording, name, pieces_per_pass=pieces_per_pass)
        _steps[key] = (recording, (step, sides or Sides()))  # the recording kept alive with its id
    return _steps[key][1]


_noise: dict = {}


def noise_parameters(recording: dict, name: str) -> set[str]:
    """``bench.step_compare.noise_gradient_parameters`` of the case's model, selection and batch."""
    from bench.step_compare import noise_gradient_parameters

    key = (id(recording), name)
    if key not in _noise:
        case = recording[name]
        model = supernet(recording, case["state_before"])
        model.change_precision(True, name != "stage1_phase1_step")
        selection = case["selection"] if "selection" in case else case["batch"]["selection"]
        _noise[key] = (recording, noise_gradient_parameters(model, case["batch"]["x"], selection))
    return _noise[key][1]
