"""Straight-through helpers and the clip quantizer's autograd function (SPEC section 1)."""
import math

import torch

# grad_scale and round_pass are the reference's definitions of LSQ (SPEC section 1). The model runs
# the fused LsqQuantize below; the tests check it against these.


def grad_scale(x: torch.Tensor, k: float) -> torch.Tensor:
    """Forward ``x``, backward ``k * grad`` (LSQ's step-size gradient scale)."""
    return (x - x * k).detach() + x * k


def round_pass(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity in the backward pass."""
    return (x.round() - x).detach() + x


def clip_delta(clip: torch.Tensor, bin_: torch.Tensor) -> torch.Tensor:
    """Quantization step of the clip quantizer from the clip ``c`` and the stored ``bin`` ``b``.

    Kept as tensor arithmetic (no ``.item()``) so a GPU never waits on the host.
    """
    r = 1 - bin_
    return torch.where(r >= 1, clip, torch.where(r <= 1 / 255, clip / 255, clip * r))


class ClipQuantize(torch.autograd.Function):
    """PACT-style clip-and-round with the reference's straight-through backward.

    ``dx = g`` where ``0 < x < c``; ``dc = sum(g)`` over ``x > c``; ``bin`` receives nothing.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, clip: torch.Tensor, bin_: torch.Tensor) -> torch.Tensor:
        # The reference gives 0 for c <= 0. Handled on scalars: with c clamped at 0 every x clamps
        # to 0, and a step of 1 in place of 0 keeps 0 / step from being nan.
        upper = clip.clamp_min(0)
        delta = clip_delta(upper, bin_)
        delta = torch.where(delta > 0, delta, torch.ones_like(delta))
        # round(clamp(x, 0, c) / delta) * delta, in this order (bit-exact rounding), in place on
        # the one new tensor.
        y = torch.clamp(x, min=torch.zeros_like(upper), max=upper).div_(delta).round_().mul_(delta)
        ctx.save_for_backward(x, clip)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, clip = ctx.saved_tensors
        grad_x = grad * ((x > 0) & (x < clip)) if ctx.needs_input_grad[0] else None
        grad_clip = None
        if ctx.needs_input_grad[1]:
            grad_clip = torch.where(x > clip, grad, 0.0).sum().reshape(clip.shape)
        return grad_x, grad_clip, None


def clip_quantize(x: torch.Tensor, clip: torch.Tensor, bin_: torch.Tensor) -> torch.Tensor:
    return ClipQuantize.apply(x, clip, bin_)


class LsqQuantize(torch.autograd.Function):
    """``round_pass(clamp(x / a, lo, hi)) * a`` with ``a = grad_scale(s, k)``, in one node.

    Autograd through the composite saves five temporaries and runs a dozen kernels; this saves
    ``q = x / a`` alone. Same gradients: ``dx = g`` where ``lo <= q <= hi``; ``ds = k * sum(g *
    (round(q) - q))`` inside the range and ``k * sum(g * clamp(q))`` outside, summed over all
    dimensions but the channel ``dim``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: torch.Tensor, lo: float, hi: float, k: float,
                dim: int) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[dim] = -1
        a = s.view(shape)
        q = x / a
        ctx.lo, ctx.hi, ctx.k, ctx.dim = lo, hi, k, dim
        if not any(ctx.needs_input_grad):  # evaluation: work in place on the one new tensor
            return q.clamp_(lo, hi).round_().mul_(a)
        ctx.save_for_backward(q)
        return torch.clamp(q, lo, hi).round_().mul_(a)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (q,) = ctx.saved_tensors
        inside = (q >= ctx.lo) & (q <= ctx.hi)
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            dims = [d for d in range(grad.dim()) if d != ctx.dim]
            r = torch.round(torch.clamp(q, ctx.lo, ctx.hi))
            grad_s = (grad * torch.where(inside, r - q, r)).sum(dims) * ctx.k
        return grad_x, grad_s, None, None, None, None


def lsq_quantize(x: torch.Tensor, s: torch.Tensor, lo: float, hi: float, dim: int) -> torch.Tensor:
    """LSQ fake quantization of ``x`` with one step per index of ``dim``, levels ``lo .. hi``."""
    k = 1 / math.sqrt(x.numel() * hi)
    return LsqQuantize.apply(x, s, lo, hi, k, dim)
