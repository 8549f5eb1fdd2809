"""Wrong steps fail the fixture comparisons, each for its own reason.

The comparisons of ``test_trajectories.py`` and ``test_dataparallel.py`` (``bench/step_compare.py``)
run here on deliberately wrong steps, on every recording where the recording can show the
mistake (a one-piece case cannot show a mistake about pieces: that skip says so). Each mutation
must fail, and on the tensors it concerns: freezing the clips fails the clips, not everything. The
recordings themselves, doctored so that the clips or the LSQ steps did not move, fail against the
faithful step. ``test_search_replay.py`` does the same for the search, ``test_pieces.py`` for the
evaluation's pieces.
"""
import math

import pytest
import torch

from bench.step_compare import compare_step
from models import build_supernet
from quant import ClipActivation, LsqActivation, LsqWeight
from quant.functional import pieces_of
from training.pieces import Share

from .replay import (
    boundary_sides,
    faithful_step,
    noise_parameters,
    pieces,
    recordings,
    run_step,
    stage1_optimizer,
    stage3_optimizer,
    supernet,
    training,
)
from .test_search_replay import CASES as SEARCH_CASES
from .test_search_replay import replayed

STAGE1 = "stage1_phase2_step"  # weights quantized too: every kind of parameter moves
STAGE3 = "stage3_step"
OPTIMIZER_STATE = ("exp_avg", "exp_avg_sq", "step", "momentum_buffer", "grad", "recorded_grad")


@pytest.fixture(scope="module", params=recordings("trajectories*.pt") + recordings("dataparallel*.pt"))
def recording(request, load_fixture) -> dict:
    """A recording, its faithful steps computed (and cached) before any test patches the code."""
    recording = load_fixture(request.param)
    for name in (STAGE1, STAGE3):
        boundary_sides(recording, name)
        noise_parameters(recording, name)
    return recording


def names_of(recording: dict, kinds: tuple[type, ...], branch: int | None = None) -> set[str]:
    """The parameters of the modules of ``kinds`` (the clips, the LSQ steps) in the recorded model,
    of one ``branch`` where given."""
    model = build_supernet("mobilenet_v2", **recording["config"])
    return {f"{m_name}.{p_name}" for m_name, m in model.named_modules()
            if isinstance(m, kinds) and (branch is None or m.branch == branch)
            for p_name, _ in m.named_parameters(recurse=False) if p_name != "bin"}


def clips(recording: dict, branch: int | None = None) -> set[str]:
    return names_of(recording, (ClipActivation,), branch)


def lsq_steps(recording: dict) -> set[str]:
    return names_of(recording, (LsqActivation, LsqWeight))


def tensors(failures: dict[str, str], state: dict) -> set[str]:
    """The tensors (parameters and buffers) that ``compare_step``'s failures are about."""
    out = set()
    for key in failures:
        head, _, tail = key.rpartition(".")
        out.add(head if key not in state and tail in OPTIMIZER_STATE else key)
    return out


def mutated(recording: dict, name: str, **wrong) -> object:
    """``run_step`` with a mutation (``wrong``: its optimizer or pieces), with the quantizer inputs
    on a rounding boundary on the side the faithful step put them (``replay.boundary_sides``)."""
    return run_step(recording, name, sides=boundary_sides(recording, name), **wrong)


def failing(recording: dict, name: str, step) -> set[str]:
    case = recording[name]
    failures = compare_step(case, step, noise_parameters(recording, name))
    return tensors(failures, case["state_after"]) - {"loss", "grad_norm"}


def frozen(params_of, build):
    """An optimizer factory: ``build``'s optimizer with the parameters ``params_of(model)`` moved
    into a group of their own at lr 0 (their optimizer state still updates)."""
    def factory(model, case):
        optimizer = build(model, case)
        chosen = {id(p) for p in params_of(model)}
        moved = []
        for group in optimizer.param_groups:
            moved += [p for p in group["params"] if id(p) in chosen]
            group["params"] = [p for p in group["params"] if id(p) not in chosen]
        optimizer.add_param_group({**{k: v for k, v in optimizer.param_groups[-1].items() if k != "params"},
                                   "params": moved, "lr": 0.0, "weight_decay": 0.0})
        return optimizer
    return factory


def model_clips(model) -> list[torch.nn.Parameter]:
    return [m.upper_bound for m in model.modules() if isinstance(m, ClipActivation)]


def model_lsq_steps(model) -> list[torch.nn.Parameter]:
    return [m.s for m in model.modules() if isinstance(m, (LsqActivation, LsqWeight))]


def several_pieces(recording: dict, name: str) -> Share:
    share = pieces(recording[name])
    if len(share.sizes) == 1:
        pytest.skip(f"{name} of this recording is one piece of {share.sizes[0]} images: no piece to "
                    "get wrong")
    return share


# -- the optimizers ---------------------------------------------------------------------------

def test_clips_frozen(recording):
    """Stage 1's clips frozen (stage 3's: ``test_stage3_not_training_the_clips``)."""
    wrong = failing(recording, STAGE1, mutated(recording, STAGE1,
                                               optimizer_fn=frozen(model_clips, stage1_optimizer)))
    assert wrong and wrong <= clips(recording), wrong


def test_stage3_not_training_the_clips(recording):
    """``bn_stabilize_optimizer(train_clip=False)``: the clips stand still (and keep no momentum)."""
    wrong = failing(recording, STAGE3, mutated(
        recording, STAGE3, optimizer_fn=lambda model, case: stage3_optimizer(model, case, train_clip=False)))
    assert wrong and wrong <= clips(recording), wrong


def test_lsq_steps_frozen(recording):
    """Stage 1's LSQ steps frozen (stage 3 trains none)."""
    wrong = failing(recording, STAGE1, mutated(recording, STAGE1,
                                               optimizer_fn=frozen(model_lsq_steps, stage1_optimizer)))
    assert wrong and wrong <= lsq_steps(recording), wrong


@pytest.mark.parametrize("name", [STAGE1, STAGE3])
def test_one_branch_decay_doubled(recording, name):
    """The branch of the smallest decay: its clips move least for it."""
    build = stage3_optimizer if name == STAGE3 else stage1_optimizer
    branch = len(recording["config"]["l2_vals"]) - 1

    def doubled(model, case):
        optimizer = build(model, case)
        mine = {id(m.upper_bound) for m in model.modules()
                if isinstance(m, ClipActivation) and m.branch == branch}
        for group in optimizer.param_groups:
            if any(id(p) in mine for p in group["params"]):
                group["weight_decay"] *= 2
        return optimizer

    wrong = failing(recording, name, mutated(recording, name, optimizer_fn=doubled))
    assert wrong and wrong <= clips(recording, branch), wrong


def state_failures(failures: dict[str, str], key: str) -> set[str]:
    return {k for k in failures if k.endswith(f".{key}")}


@pytest.mark.parametrize("change, fails, holds", [
    ({"betas": (0.95, 0.999)}, "exp_avg", "exp_avg_sq"),
    ({"betas": (0.9, 0.99)}, "exp_avg_sq", "exp_avg"),
    ({"eps": 1e-6}, None, "exp_avg")])
def test_adam_settings_changed(recording, change, fails, holds):
    """Each of Adam's settings fails in the state it enters (``eps`` only in the updates)."""
    def changed(model, case):
        optimizer = stage1_optimizer(model, case)
        for group in optimizer.param_groups:
            group.update(change)
        return optimizer

    case = recording[STAGE1]
    step = mutated(recording, STAGE1, optimizer_fn=changed)
    failures = compare_step(case, step, noise_parameters(recording, STAGE1))
    assert not state_failures(failures, holds), failures
    if fails:
        assert state_failures(failures, fails), failures
    else:
        assert not state_failures(failures, "exp_avg_sq")
        assert set(failures) & set(step.parameters) - clips(recording), failures


def test_no_gradient_clipping(recording, monkeypatch):
    """Gradients above the norm of 10 not scaled down: Adam's moments fail."""
    norm = recording[STAGE1]["grad_norm_before_clipping"]
    if norm <= training.MAX_GRAD_NORM:
        pytest.skip(f"the recorded gradient norm {norm:.3g} is not above {training.MAX_GRAD_NORM}: "
                    "the reference did not clip")
    monkeypatch.setattr(training, "MAX_GRAD_NORM", math.inf)
    step = mutated(recording, STAGE1)
    failures = compare_step(recording[STAGE1], step, noise_parameters(recording, STAGE1))
    assert state_failures(failures, "exp_avg") and state_failures(failures, "exp_avg_sq"), failures


def test_unselected_branches_not_stepped(recording, monkeypatch):
    """Gradients left ``None`` where the selection did not reach (PyTorch 2's ``zero_grad``): Adam
    skips those parameters, which the reference stepped (SPEC 3)."""
    monkeypatch.setattr(training, "give_every_parameter_a_gradient",
                        lambda optimizer: optimizer.zero_grad(set_to_none=True))
    case = recording[STAGE1]
    wrong = failing(recording, STAGE1, mutated(recording, STAGE1))
    selection = case["batch"]["selection"]
    model = supernet(recording, case["state_before"])
    model.change_precision(True, True)
    used = set()
    hooks = [p.register_hook(lambda g, n=n: used.add(n) or g) for n, p in model.named_parameters()
             if p.requires_grad]
    model(case["batch"]["x"][:2], selection).sum().backward()
    for h in hooks:
        h.remove()
    assert wrong and not wrong & used, wrong & used


# -- the pieces -------------------------------------------------------------------------------

def lsq_k_from_the_whole_batch(monkeypatch, batch: int) -> None:
    """Each piece's LSQ quantizers count the elements of ``batch`` images (PyTorch's quantizer and
    the fused BatchNorm's)."""
    import cpu_kernels.train_batch_norm as fused_batch_norm
    import quant.lsq

    quantize, step_and_scale = quant.lsq.lsq_quantize, fused_batch_norm.lsq_step_and_scale
    monkeypatch.setattr(quant.lsq, "lsq_quantize", lambda x, s, lo, hi, dim, numel=None:
                        quantize(x, s, lo, hi, dim, numel=x[0].numel() * batch))
    monkeypatch.setattr(fused_batch_norm, "lsq_step_and_scale",
                        lambda s, x, hi, piece_images: step_and_scale(s, x, hi, batch))


def test_lsq_k_from_the_whole_batch(recording, monkeypatch):
    """Each piece's LSQ quantizers count the whole batch's elements (PyTorch's quantizer and the
    fused BatchNorm's): their steps' gradients shrink."""
    several_pieces(recording, STAGE1)
    lsq_k_from_the_whole_batch(monkeypatch, len(recording[STAGE1]["batch"]["x"]))
    wrong = failing(recording, STAGE1, mutated(recording, STAGE1))
    assert wrong & names_of(recording, (LsqActivation,)), wrong


def test_running_statistics_from_the_last_piece(recording, monkeypatch):
    """The BN running statistics updated by the last piece instead of the first (PyTorch's
    BatchNorm; the fused kernels update from the first): only they fail."""
    import torch.nn.functional as F

    from quant import fused
    from training import pieces as pieces_module

    several_pieces(recording, STAGE1)
    sides = boundary_sides(recording, STAGE1)

    def last_piece_updates(self, input, running_mean, running_var, weight=None, bias=None,
                           training=False, momentum=0.1, eps=1e-5):
        if not training:
            return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        pieces = self.split(input)
        return torch.cat([F.batch_norm(piece, running_mean if i == len(pieces) - 1 else None,
                                       running_var if i == len(pieces) - 1 else None, weight, bias,
                                       True, momentum, eps) for i, piece in enumerate(pieces)])

    monkeypatch.setattr(pieces_module._InPieces, "batch_norm", last_piece_updates)
    with fused.pytorch_only():
        wrong = failing(recording, STAGE1, run_step(recording, STAGE1, sides=sides))
    assert wrong and all(k.endswith(("running_mean", "running_var")) for k in wrong), wrong


def test_batch_norm_over_the_whole_batch(recording, monkeypatch):
    """One BatchNorm over the whole pass (PyTorch's and the fused kernels'; LSQ's ``k`` still of a
    piece): the parameters fail."""
    import torch.nn.functional as F

    from training import pieces as pieces_module

    share = several_pieces(recording, STAGE1)
    monkeypatch.setattr(pieces_module, "in_pieces", lambda sizes: pieces_of(sizes[0]))
    monkeypatch.setattr(pieces_module._InPieces, "batch_norm", lambda self, **args: F.batch_norm(**args))
    step = mutated(recording, STAGE1, share=share)
    wrong = failing(recording, STAGE1, step)
    assert wrong & set(step.parameters), wrong


# -- recordings in which something did not move --------------------------------------------------

@pytest.mark.parametrize("name, what", [("stage1_phase1_step", "clips"), (STAGE1, "clips"), (STAGE3, "clips"),
                                        ("stage1_phase1_step", "lsq_steps"), (STAGE1, "lsq_steps")])
def test_a_recording_where_they_did_not_move_fails(recording, name, what):
    """The case copied with ``state_after``'s clips (or LSQ steps) set to ``state_before``'s: the
    faithful step fails on those, and on nothing else. (Stage 3 trains no LSQ step.)"""
    chosen = clips(recording) if what == "clips" else lsq_steps(recording)
    case = recording[name]
    moved = {k for k in chosen if not torch.equal(case["state_before"][k], case["state_after"][k])}
    if not moved:
        pytest.skip(f"no {what} moved in {name} of this recording")
    doctored = {**case, "state_after": {k: case["state_before"][k] if k in chosen else v
                                        for k, v in case["state_after"].items()}}
    failures = compare_step(doctored, faithful_step(recording, name), noise_parameters(recording, name))
    wrong = tensors(failures, case["state_after"])
    assert wrong and wrong <= moved, wrong


# -- evaluation in pieces ---------------------------------------------------------------------

def test_evaluation_without_the_pieces_k(monkeypatch):
    """``evaluate_in_pieces`` with ``pieces_of`` switched off (LSQ's ``k`` of the whole run of
    pieces): ``test_pieces.py``'s evaluation check fails."""
    import contextlib

    from training import pieces as pieces_module

    from .test_pieces import check_k_of_the_piece
    from .test_prefix_scorer import trained_like

    model = trained_like("mobilenet_v2")
    selection = [i % 3 for i in range(model.num_searchable_layers)]
    monkeypatch.setattr(pieces_module, "pieces_of", lambda images: contextlib.nullcontext())
    with pytest.raises(AssertionError, match="not the values of a piece-by-piece evaluation"):
        check_k_of_the_piece(model, selection, torch.randn(10, 3, 12, 12), replicas=5)


# -- the search -------------------------------------------------------------------------------

def mutate_genes_first(self, parents):
    """The reference's mutation with its draws in another order: every gene's ``uniform`` first,
    then the parent, then the resampled genes."""
    resampled = [self.draws.uniform() < self.m_prob for _ in range(self.num_layers)]
    child = list(parents[self.draws.below(len(parents))])
    for i, again in enumerate(resampled):
        if again:
            child[i] = self.draws.below(self.num_branches)
    return tuple(child)


@pytest.mark.parametrize("case_index", SEARCH_CASES)
def test_mutation_draws_in_another_order(replay, case_index):
    """The same mutation, its draws taken in another order: the replay of the recorded search
    fails at a generation bred by mutation."""
    case = replay["cases"][case_index]
    runs = replayed(case, mutate=mutate_genes_first)
    assert any(evaluated != recorded["evaluated"]
               for recorded, (evaluated, _, _) in zip(case["folds"], runs, strict=True))
