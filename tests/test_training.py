"""The training step's helpers: every parameter gets a gradient, and statistics kept on the device."""
import math

import pytest
import torch

from training.step import Amp, RunningStats, give_every_parameter_a_gradient, train_step

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


def test_clip_gradient_sum_is_float32_and_finite_for_float16_inputs():
    """A million elements of 0.1 above the clip sum to 1e5, past float16's largest value."""
    from quant.functional import clip_quantize

    x = torch.full((1_000_000,), 10.0, dtype=torch.float16, requires_grad=True)
    clip = torch.tensor(6.0, requires_grad=True)
    y = clip_quantize(x, clip, torch.tensor([2 / 3]))
    assert y.dtype == torch.float32
    y.backward(torch.full_like(y, 0.1))
    assert clip.grad.dtype == torch.float32 and clip.grad.item() == pytest.approx(1e5, rel=1e-3)
    assert x.grad.dtype == torch.float16


def test_quantizers_round_in_float32_under_autocast():
    """``x / delta`` is rounded in float32: the same levels as without autocast."""
    from quant import ClipActivation, LsqActivation

    x = torch.linspace(0, 7, 1001).reshape(1, 7, 11, 13)
    clip, lsq = ClipActivation(2), LsqActivation(2, 7)
    clip.quantize = True
    with torch.no_grad():
        lsq.s.copy_(torch.linspace(0.3, 1.7, 7))
    for quantizer in (clip, lsq):
        expected = quantizer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = quantizer(x.bfloat16())
        assert got.dtype == torch.float32
        assert torch.equal(got, quantizer(x.bfloat16().float())) and not torch.equal(expected, x)


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_mixed_precision_steps_of_the_supernet(mode):
    from models import build_supernet
    from training.losses import kd_loss

    torch.manual_seed(0)
    model = build_supernet("mobilenet_v2", 10, 2, [0.01, 0.001], width_multiplier=0.25, width_divisor=8)
    model.change_precision(True, True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    amp = Amp(mode, CPU)
    assert amp.scaler.is_enabled() == (mode == "fp16")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(12):  # fp16 skips its first steps, until the scale comes down far enough
        x, teacher = torch.randn(4, 3, 32, 32), torch.randn(4, 10)
        scale = amp.scaler.get_scale() if amp.scaler.is_enabled() else None
        logits, loss, norm = train_step(model, x, [0] * 17,
                                        lambda logits, piece, t=teacher: kd_loss(logits, t[piece]),
                                        optimizer, amp)
        assert logits.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        if mode == "bf16":
            assert torch.isfinite(norm)
        elif not torch.isfinite(norm):  # fp16: an overflowing step is skipped, the scale comes down
            assert amp.scaler.get_scale() < scale
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert any(n.endswith(".weights") for n in moved)
