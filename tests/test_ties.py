"""The BatchNorm and ReLU ties of ``tests/boundaries.py``: found where float noise can put a value on
either side of zero, nowhere else, and no way round a wrong step.

PyTorch's vectorised BatchNorm (AVX2, AVX-512) and its baseline one (``ATEN_CPU_CAPABILITY=default``)
round ``x * alpha + beta`` otherwise; ``kernel_roundings`` computes both, and must give this
machine's values bit for bit under either kernel (run the file under both). A ReLU tie's gate is
free: what it adds to the gradients (``ReluTies.contributions``) must be what the model's own
backward changes by when it closes.
"""
import pytest
import torch
from torch import nn

from bench.step_compare import compare_step
from quant import QConv
from training.pieces import Share, one_pass

from .boundaries import BatchNormTies, Found, ReluTies, Sides, first_agreement, kernel_roundings
from .replay import STEPS, agreeing_step, noise_parameters, pieces, recordings, supernet
from .test_mutations import lsq_k_from_the_whole_batch, tensors


def batch_norm(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.1)
    return bn


def at_the_mean(channels: int) -> torch.Tensor:
    """Four 1 x 1 images whose channels are ``{0, 0, v, 3v}``: the third is at the batch mean, so
    with weight 1 and bias 0 its output is zero in exact arithmetic (``dataparallel_4bit.pt``'s
    last depthwise unit)."""
    v = torch.rand(1, channels, 1, 1) + 0.1
    return torch.cat([0 * v, 0 * v, v, 3 * v])


def test_kernel_roundings_are_this_machines_batch_norm():
    """The kernel this process runs (``fused`` under AVX2/AVX-512, ``separate`` under the baseline),
    bit for bit; the other differs somewhere, and never by more than the bound."""
    torch.manual_seed(0)
    baseline = torch.backends.cpu.get_cpu_capability() == "DEFAULT"
    for shape in [(4, 96, 1, 1), (8, 32, 7, 7), (16, 5, 3, 3)]:
        bn = batch_norm(shape[1])
        x = torch.randn(shape) * 3 + 1
        fused, separate, bound = kernel_roundings(x, bn)
        ours, other = (separate, fused) if baseline else (fused, separate)
        assert torch.equal(bn(x), ours), shape
        assert not torch.equal(bn(x), other), shape
        assert bool(((fused.double() - separate.double()).abs() <= bound).all()), shape


def test_a_tie_is_found_and_put_on_the_other_side():
    """At the mean the fused kernel leaves a residue of either sign, the baseline an exact 0: every
    channel is a tie, and the other side reverses which of them the ReLU after passes."""
    torch.manual_seed(0)
    bn, x = nn.BatchNorm2d(16), at_the_mean(16)
    gates = []
    for other in (False, True):
        ties = BatchNormTies(bn, other)
        y = x.clone().requires_grad_()
        torch.relu(bn(y)).sum().backward()
        ties.remove()
        assert ties.found == 16
        gates.append(bn.bias.grad.clone())  # the sum of the gradient the ReLU let through
        bn.zero_grad()
    assert not torch.equal(*gates)


def test_no_tie_no_retry():
    """Outputs away from zero (random inputs; the same inputs with a bias moving the mean image
    off zero) hold no tie, and with none found the ties are never retried."""
    torch.manual_seed(0)
    bn = batch_norm(16)
    for x in (torch.randn(8, 16, 3, 3), at_the_mean(16)):
        ties = BatchNormTies(bn, other=True)
        y = bn(x)
        ties.remove()
        assert ties.found == 0 and torch.equal(y, bn(x))
    assert not any(sides.batch_norms for sides in Found([(0, 1), (2, 3)], 0).alternatives())
    assert Found([], 0).alternatives() == []
    assert Found([], 3).alternatives() == [Sides(frozenset(), True)]


@pytest.fixture(scope="module", params=recordings("dataparallel*.pt"))
def recording(request, load_fixture) -> dict:
    return load_fixture(request.param)


def test_a_wrong_step_is_not_rescued(recording):
    """A full-batch step (``--replicas 1``) of stage 1's first phase, where ``dataparallel_4bit.pt``
    meets its BatchNorm ties: no side of the ties or of the quantizer inputs on a boundary makes it
    agree."""
    name = "stage1_phase1_step"
    case = recording[name]
    step, sides = agreeing_step(recording, name, share=Share.of(len(case["batch"]["x"])))
    assert sides is None, sides
    assert compare_step(case, step, noise_parameters(recording, name))


# -- ReLU ties ----------------------------------------------------------------------------------

def conv_unit(channels: int, bias: float = 0.0) -> nn.Sequential:
    """A 1 x 1 ``QConv`` of two input channels, output channel ``c`` being ``k_c (x1 + x2)`` (``k_c``
    from 1 to 3), and the BatchNorm after it (BN_post), in train mode, in float64."""
    unit = nn.Sequential(QConv(2, channels, 1, 4), nn.BatchNorm2d(channels)).double()
    with torch.no_grad():
        unit[0].weights.copy_(torch.randint(1, 4, (channels, 1)).repeat(1, 2).reshape(-1, 1))
        unit[1].bias.fill_(bias)
    return unit.train()


def at_the_mean_of_a_sum() -> torch.Tensor:
    """Four 1 x 1 images of two channels whose sums are ``{0, 2, 2, 4}``: the middle two at the
    batch mean, each off its channels' means (so a tie reaches the weights too)."""
    sums = [[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]]
    return torch.tensor(sums, dtype=torch.float64).view(4, 2, 1, 1)


def gradients(unit: nn.Sequential, x: torch.Tensor, upstream: torch.Tensor,
              opened: frozenset | None = None) -> tuple[dict[str, torch.Tensor], ReluTies]:
    """The gradients of ``sum(upstream * ReLU(unit(x)))`` with the ReLU ties' gates ``opened``."""
    unit.zero_grad()
    ties = ReluTies(unit, opened)
    (upstream * torch.relu(unit(x))).sum().backward()
    ties.remove()
    return {n: p.grad.clone() for n, p in unit.named_parameters() if p.grad is not None}, ties


def test_relu_ties_are_found_and_their_gates_are_what_they_add():
    """At the batch mean the BN_post output is zero in exact arithmetic: every channel of those
    images is a tie. Closing one tie changes the model's own gradients by that tie's measured
    contribution (its gate is linear in the gradient), and by nothing else (in float64, where the
    two backward passes agree to the last bits)."""
    torch.manual_seed(0)
    unit, x = conv_unit(16), at_the_mean_of_a_sum()
    upstream = torch.randn(4, 16, 1, 1, dtype=torch.float64)
    _, listed = gradients(unit, x, upstream)
    assert sorted(listed.found) == [(0, image * 16 + c) for image in (1, 2) for c in range(16)]
    everything = frozenset(listed.found)
    opened, measured = gradients(unit, x, upstream, everything)
    assert set(measured.contributions) == everything
    for tie in listed.found[::5]:
        closed, _ = gradients(unit, x, upstream, everything - {tie})
        for name, added in measured.contributions[tie].items():
            moved = opened[name] - closed[name]
            scale = opened[name].abs().max()
            assert torch.allclose(moved, added, rtol=0, atol=1e-12 * scale), (tie, name)
        assert all(bool(c.abs().max() > 1e-6 * opened[n].abs().max())
                   for n, c in measured.contributions[tie].items() if n != "1.weight"), tie


def test_no_relu_tie_no_retry():
    """Outputs away from zero (random inputs; the same images at the mean with a bias moving BN_post's
    output off zero) hold no ReLU tie, and a search that meets none never asks for gates."""
    torch.manual_seed(0)
    for unit, x in ((conv_unit(16), torch.randn(8, 2, 3, 3, dtype=torch.float64)),
                    (conv_unit(16, bias=0.1), at_the_mean_of_a_sum())):
        y = unit(x)
        _, ties = gradients(unit, x, torch.ones_like(y), frozenset())
        assert ties.found == [] and ties.contributions == {}
    asked = []
    result, sides, found = first_agreement(lambda sides, found: None, lambda result: False,
                                           lambda sides, found: asked.append(sides) or sides)
    assert sides is None and found.relu_ties == [] and asked == []


def reached_by_relu_ties(recording: dict, name: str) -> tuple[set[str], list]:
    """The parameters whose gradient a ReLU tie's gate can move (those upstream of a BN_post that
    holds a tie, its own included), and the ties, in a forward of the case's pieces."""
    case = recording[name]
    model = supernet(recording, case["state_before"])
    model.change_precision(True, name != "stage1_phase1_step")
    ties, outputs = ReluTies(model), []

    def after(module, args, out):  # after ReluTies' hook: keeps the output of each BN_post call
        if len(outputs) < len(ties.units):
            outputs.append(out)

    handles = [m.register_forward_hook(after) for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with one_pass(pieces(case).sizes):
        model(case["batch"]["x"], case["batch"]["selection"])
    ties.remove()
    for h in handles:
        h.remove()
    held = {call for call, _ in ties.found}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(sum(outputs[call].sum() for call in held), list(params.values()),
                                allow_unused=True) if held else [None] * len(params)
    return {n for n, g in zip(params, grads, strict=True) if g is not None}, ties.found


def test_a_wrong_step_is_not_rescued_by_relu_gates(recording, monkeypatch):
    """LSQ's ``k`` from the whole batch (``tests/test_mutations.py``) in stage 1's second phase,
    whose forward is the faithful one, ReLU ties and all: the search with their gates chosen (on
    any CPU: it runs once the plain step fails) finds no agreement, and the step fails on
    parameters that no tie's gate reaches, so no choice of gates could rescue it."""
    name = STEPS[1]
    reached, ties = reached_by_relu_ties(recording, name)
    if not ties:
        pytest.skip(f"{name} of this recording meets no ReLU tie")
    case = recording[name]
    lsq_k_from_the_whole_batch(monkeypatch, len(case["batch"]["x"]))
    step, sides = agreeing_step(recording, name)
    assert sides is None, sides
    wrong = tensors(compare_step(case, step, noise_parameters(recording, name)), case["state_after"])
    assert wrong & set(step.parameters) - reached, wrong
