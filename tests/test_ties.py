"""The BatchNorm ties of ``tests/boundaries.py``: found where the CPU kernels put an output on other
sides of zero, nowhere else, and no way round a wrong step.

PyTorch's vectorised BatchNorm (AVX2, AVX-512) and its baseline one (``ATEN_CPU_CAPABILITY=default``)
round ``x * alpha + beta`` otherwise; ``kernel_roundings`` computes both, and must give this
machine's values bit for bit under either kernel (run the file under both).
"""
import pytest
import torch
from torch import nn

from bench.step_compare import compare_step
from training.pieces import Share

from .boundaries import BatchNormTies, Found, Sides, kernel_roundings
from .replay import agreeing_step, noise_parameters, recordings


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
