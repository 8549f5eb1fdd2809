"""The quantizers against the vectors recorded from the reference (fixtures/quantizers.pt)."""
import math

import pytest
import torch

from quant import ClipActivation, LsqActivation, LsqWeight, QConv
from quant.functional import clip_quantize, lsq_quantize
from tests.conftest import require_exact
from training.losses import kd_loss

BITS = [2, 3, 4]


# The reference's definitions of LSQ (SPEC section 1); the model runs the fused LsqQuantize.
def grad_scale(x: torch.Tensor, k: float) -> torch.Tensor:
    """Forward ``x``, backward ``k * grad`` (LSQ's step-size gradient scale)."""
    return (x - x * k).detach() + x * k


def round_pass(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity in the backward pass."""
    return (x.round() - x).detach() + x


@pytest.mark.parametrize("bits", BITS)
def test_clip_activation_matches_reference(load_fixture, bits, kernels):
    f = load_fixture("quantizers.pt")[f"clip_act_{bits}bit"]
    assert f["n_lv"] == 2**bits
    q = ClipActivation(bits)
    q.quantize = True
    with torch.no_grad():
        q.upper_bound.fill_(f["clip"])
    x = f["x"].clone().requires_grad_()
    y = q(x)
    y.backward(f["upstream"])
    torch.testing.assert_close(y, f["y"], rtol=1e-4, atol=0)
    torch.testing.assert_close(x.grad, f["grad_x"], rtol=1e-3, atol=0)
    torch.testing.assert_close(q.upper_bound.grad, f["grad_clip"].reshape(()), rtol=1e-3, atol=1e-6)
    assert q.bin.grad is None


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("name, quantizer, inp",
                         [("lsq_act", LsqActivation, "x"), ("lsq_weight", LsqWeight, "w")])
def test_lsq_matches_reference(load_fixture, bits, name, quantizer, inp, kernels):
    f = load_fixture("quantizers.pt")[f"{name}_{bits}bit"]
    q = quantizer(bits, f["s"].numel())
    with torch.no_grad():
        q.s.copy_(f["s"])
    x = f[inp].clone().requires_grad_()
    y = q(x)
    y.backward(f["upstream"])
    torch.testing.assert_close(y, f["y"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(x.grad, f[f"grad_{inp}"], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(q.s.grad, f["grad_s"], rtol=1e-3, atol=1e-6)


def test_kd_loss_matches_reference(load_fixture):
    f = load_fixture("quantizers.pt")["kd_loss"]
    loss = kd_loss(f["student_logits"], f["teacher_logits"])
    assert loss.item() == pytest.approx(f["loss"], rel=1e-5)


def test_clip_quantizer_by_hand(kernels):
    # 2 bits, c = 3: r = 1 - (1 - 1/3) = 1/3, step 1, levels 0..3.
    x = torch.tensor([-1.0, 0.4, 1.6, 2.4, 3.0, 7.0], requires_grad=True)
    c = torch.tensor(3.0, requires_grad=True)
    y = clip_quantize(x, c, torch.tensor([1 - 1 / 3]))
    assert y.tolist() == pytest.approx([0.0, 0.0, 2.0, 2.0, 3.0, 3.0], abs=1e-6)
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0, 0.0]  # x == c passes nothing
    assert c.grad.item() == 6.0  # only x > c


def test_clip_quantizer_step_limits_and_nonpositive_clip(kernels):
    x = torch.linspace(-1, 4, 50)
    c = torch.tensor(2.0)
    # r >= 1 (bin <= 0): one step of c.
    assert set(clip_quantize(x, c, torch.tensor([0.0])).tolist()) == {0.0, 2.0}
    # r <= 1/255: 255 steps of c / 255.
    y = clip_quantize(x, c, torch.tensor([1.0]))
    assert torch.allclose(y, torch.round(x.clamp(0, 2) / (2 / 255)) * (2 / 255))
    for bad in (0.0, -1.0):
        assert clip_quantize(x, torch.tensor(bad), torch.tensor([2 / 3])).abs().sum() == 0


def test_clip_quantizer_off_is_identity():
    q = ClipActivation(2)
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(q(x), x)


def test_lsq_initialisation_from_data():
    x = torch.rand(4, 3, 5, 5) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    q = LsqActivation(2, 3)
    q.init_from(x)
    expected = 2 * x.abs().mean((0, 2, 3)) / math.sqrt(3)
    torch.testing.assert_close(q.s.data, expected)
    w = torch.randn(6, 3, 3, 3)
    qw = LsqWeight(2, 6)
    qw.init_from(w)
    torch.testing.assert_close(qw.s.data, 2 * w.abs().flatten(1).mean(1) / math.sqrt(1))


@pytest.mark.parametrize("bits", BITS)
def test_per_tensor_lsq_is_the_papers_quantizer(bits, kernels):
    """``per_tensor``: the LSQ paper's activation quantizer, one step ``s`` for the tensor, by its
    definition: ``a = grad_scale(s, 1 / sqrt(numel * Qp))``, ``y = round_pass(clamp(x / a, 0, Qp)) * a``,
    the initial step ``2 <|x|> / sqrt(Qp)`` over the tensor."""
    gen = torch.Generator().manual_seed(bits)
    # Channels of different scales: a step per channel would quantize and initialise otherwise.
    x = torch.rand(4, 6, 5, 5, generator=gen) * torch.arange(1.0, 7.0).view(1, 6, 1, 1)
    q = LsqActivation(bits, 6, per_tensor=True)
    q.init_from(x)
    hi = 2**bits - 1
    assert q.s.shape == (1,)
    torch.testing.assert_close(q.s.data, (2 * x.abs().mean() / math.sqrt(hi)).view(1), rtol=1e-6, atol=0)
    s = q.s.detach().clone().requires_grad_()
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(x.shape, generator=gen)
    a = grad_scale(s, 1 / math.sqrt(x.numel() * hi))
    expected = round_pass(torch.clamp(x_ref / a, 0, hi)) * a
    expected.backward(g)
    y = q(x_ours)
    y.backward(g)
    assert torch.equal(y, expected)
    assert expected.detach().div(a.detach()).round().unique().numel() > 2  # several levels are used
    # The composite's dx is g * a / a (float noise); ours is the straight-through g inside the range.
    torch.testing.assert_close(x_ours.grad, g * (x / a.detach() <= hi), rtol=0, atol=0)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-6, atol=0)
    torch.testing.assert_close(q.s.grad, s.grad, rtol=1e-5, atol=1e-7)


def test_per_tensor_lsq_check_catches_a_gradient_scale_over_one_channel(monkeypatch):
    """The comparison above fails a per-tensor quantizer whose ``k`` counts one channel's elements
    (the per-channel quantizer's count), the one way it could differ and still quantize alike."""
    import quant.lsq

    real = quant.lsq.lsq_quantize
    monkeypatch.setattr(quant.lsq, "lsq_quantize", lambda x, s, lo, hi, dim, numel: real(
        x, s, lo, hi, dim, numel // x.shape[1]))
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        test_per_tensor_lsq_is_the_papers_quantizer(2, "pytorch")


def test_two_bit_weights_are_ternary():
    q = LsqWeight(2, 4)
    w = torch.randn(4, 2, 3, 3)
    q.init_from(w)
    levels = (q(w) / q.s.view(-1, 1, 1, 1)).round().unique().tolist()
    assert set(levels) <= {-1.0, 0.0, 1.0}


def test_qconv_flat_weights_and_switch():
    conv = QConv(4, 6, 3, bits=2, stride=2)
    assert conv.weights.shape == (6 * 4 * 9, 1)
    assert conv.weights.abs().max() <= 0.01
    x = torch.randn(1, 4, 9, 9)
    plain = torch.nn.functional.conv2d(x, conv.weights.view(6, 4, 3, 3), stride=2, padding=1)
    torch.testing.assert_close(conv(x), plain)
    conv.quantize_weights = True
    quantized = torch.nn.functional.conv2d(x, conv.w_quantize(conv.weight), stride=2, padding=1)
    torch.testing.assert_close(conv(x), quantized)
    assert not torch.allclose(conv(x), plain)


@pytest.mark.parametrize("lo, hi, dim", [(0, 3, 1), (0, 15, 1), (-1, 1, 0), (-7, 7, 0)])
def test_fused_lsq_equals_the_reference_composite(lo, hi, dim, kernels):
    # SPEC: a = grad_scale(s, k), y = round_pass(clamp(x / a, lo, hi)) * a, gradients by autograd.
    torch.manual_seed(0)
    x = (torch.randn(4, 6, 5, 5) * 2).requires_grad_()
    s = (torch.rand(x.shape[dim]) + 0.2).requires_grad_()
    g = torch.randn_like(x)
    lsq_quantize(x, s, lo, hi, dim).backward(g)
    fused = x.grad.clone(), s.grad.clone()
    x.grad = s.grad = None
    shape = [1] * 4
    shape[dim] = -1
    a = grad_scale(s, 1 / math.sqrt(x.numel() * hi)).view(shape)
    y = round_pass(torch.clamp(x / a, lo, hi)) * a
    y.backward(g)
    torch.testing.assert_close(lsq_quantize(x, s, lo, hi, dim), y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused[0], x.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused[1], s.grad, rtol=1e-5, atol=1e-6)


def test_quantized_weights_are_kept_without_autograd_until_they_change():
    torch.manual_seed(0)
    conv = QConv(4, 6, 3, 2)
    conv.quantize_weights = True
    fresh = lambda: conv.w_quantize(conv.weight).detach()  # noqa: E731
    with torch.no_grad():
        kept = conv.effective_weight()
        assert torch.equal(kept, fresh()) and conv.effective_weight() is kept
        conv.weights.add_(0.003)  # an optimizer step, in place
        assert torch.equal(conv.effective_weight(), fresh()) and conv.effective_weight() is not kept
        kept = conv.effective_weight()
        conv.load_state_dict({k: v * 2 for k, v in conv.state_dict().items()})
        assert torch.equal(conv.effective_weight(), fresh()) and conv.effective_weight() is not kept
    assert conv.effective_weight().requires_grad  # with autograd: quantized anew, in the graph


def boundary_inputs(s: torch.Tensor, hi: int) -> torch.Tensor:
    """Per channel, values on the rounding boundaries of ``x / s`` (``(m + 0.5) * s`` as float32),
    shape ``[2, C, hi, 3]``."""
    levels = torch.arange(hi, dtype=torch.float32) + 0.5
    return (levels[None, :, None] * s[None, None, :]).permute(0, 2, 1)[..., None].repeat(2, 1, 1, 3)


def steps_off_by_a_bit(channels: int, hi: int, seed: int) -> torch.Tensor:
    """Steps ``s`` whose reference value ``(s - s*k) + s*k`` differs from ``s`` (SPEC 1) for the
    ``k`` of ``boundary_inputs``: half of them, the other half plain."""
    k = 1 / math.sqrt(2 * channels * hi * 3 * hi)
    pool = torch.rand(100_000, generator=torch.Generator().manual_seed(seed)) + 0.05
    off = pool[grad_scale(pool, k) != pool]
    assert off.numel() >= channels // 2
    return torch.cat([off[: channels // 2], pool[: channels - channels // 2]])


@pytest.mark.parametrize("hi", [3, 15])
def test_lsq_quantizes_with_the_references_value_of_the_step(hi, kernels):
    s = steps_off_by_a_bit(64, hi, seed=0)
    x = boundary_inputs(s, hi)
    a = grad_scale(s, 1 / math.sqrt(x.numel() * hi)).view(1, -1, 1, 1)  # the reference's step
    expected = round_pass(torch.clamp(x / a, 0, hi)) * a
    plain_step = torch.round(torch.clamp(x / s.view(1, -1, 1, 1), 0, hi)) * s.view(1, -1, 1, 1)
    assert not torch.equal(expected, plain_step)  # the inputs do reach the boundary
    q = LsqActivation(hi.bit_length(), s.numel())
    with torch.no_grad():
        q.s.copy_(s)
        assert torch.equal(q(x), expected)
    assert torch.equal(q(x.clone().requires_grad_()), expected)


def test_fused_batch_norm_quantizes_with_the_references_step(kernels):
    from cpu_kernels import train_batch_norm as fused_train

    if kernels == "fused":
        require_exact(fused_train.is_exact, "this machine's PyTorch computes training-mode "
                      "BatchNorm otherwise: training runs nn.BatchNorm2d")
    s = steps_off_by_a_bit(64, 3, seed=1)
    x = boundary_inputs(s, 3)
    q = LsqActivation(2, s.numel())
    bn = torch.nn.BatchNorm2d(s.numel(), affine=True)
    with torch.no_grad():
        q.s.copy_(s)
        # A BatchNorm that passes its input through: y = (x - mean) / sqrt(var + eps) * w + b.
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        bn.weight.copy_(torch.sqrt(var + bn.eps))
        bn.bias.copy_(mean)
    normalised = torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.1, bn.eps)
    expected = q(normalised)
    assert fused_train.applies(bn, x) == (kernels == "fused")
    if kernels == "fused":
        assert torch.equal(fused_train.batch_norm(bn, x, quantizer=q), expected)
