"""The training step's helpers: every parameter gets a gradient, and statistics kept on the device."""
import math

import torch

from utils.training import RunningStats, give_every_parameter_a_gradient

CPU = torch.device("cpu")


def test_missing_gradients_become_zeros_and_existing_ones_are_zeroed():
    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.Adam([used, unused], lr=0.1)
    (used * 2).sum().backward()
    give_every_parameter_a_gradient(optimizer)
    assert torch.equal(used.grad, torch.zeros(3)) and torch.equal(unused.grad, torch.zeros(2))
    (used * 2).sum().backward()
    optimizer.step()  # Adam steps the unused parameter too, with its zero gradient
    assert optimizer.state[unused]["step"] == 1 and torch.equal(unused.grad, torch.zeros(2))


def test_running_stats_sum_on_the_device_and_read_when_asked():
    stats = RunningStats(CPU, correct=3.0, seen=4.0)  # counts carried over a resume
    logits = torch.tensor([[2.0, 1.0], [0.0, 1.0]])
    stats.add(torch.tensor(1.0), logits, torch.tensor([0, 0]), iteration=1)
    stats.add(torch.tensor(3.0), logits, torch.tensor([0, 1]), iteration=2)
    reading = stats.read()
    assert reading.loss == 2.0 and reading.nonfinite_at == 0
    assert reading.meters == {"correct": 3.0 + 3, "seen": 4.0 + 4}
    assert reading.top1 == 100.0 * 6 / 8
    stats.new_window()
    stats.add(torch.tensor(5.0), logits, torch.tensor([0, 1]), iteration=3)
    reading = stats.read()
    assert reading.loss == 5.0 and reading.meters["seen"] == 10.0


def test_running_stats_remember_the_first_non_finite_loss():
    stats = RunningStats(CPU)
    logits = torch.zeros(1, 2)
    for iteration, loss in enumerate([1.0, math.inf, math.nan, 2.0], start=1):
        stats.add(torch.tensor(loss), logits, torch.tensor([0]), iteration)
    assert stats.read().nonfinite_at == 2
