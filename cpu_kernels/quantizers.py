"""The quantizers in one pass each: the fused path ``quant.functional`` asks for (``"quantizers"``).

``applies`` says whether the kernels take the tensors (contiguous float32 on the CPU, kernels
built, this process's check passed); the functions then give the outputs and input gradients of
``quant.functional``'s PyTorch ops bit for bit (the same IEEE operations in the same order). The
parameters' gradient sums accumulate in double. ``is_exact`` checks them once per process against
those PyTorch ops (the back end off): if the quantizers' formula changes, the kernels stand aside.
"""
import math

import torch

from quant import fused
from quant.functional import clip_quantize, clip_range, lsq_quantize, lsq_scale, lsq_step

from . import library as native


@native.bookkeeping
def applies(*tensors: torch.Tensor) -> bool:
    return native.usable(*tensors) and is_exact()


@native.bookkeeping
def clip_forward(x: torch.Tensor, upper: float, delta: float) -> torch.Tensor:
    """``round(clamp(x, 0, upper) / delta) * delta``."""
    y = torch.empty_like(x)
    native.library().clip_forward(native.ptr(x), native.ptr(y), x.numel(), upper, delta,
                                   native.threads())
    return y


def clip_backward(x: torch.Tensor, grad: torch.Tensor, clip: float) -> tuple[torch.Tensor, float]:
    """``grad`` where ``0 < x < clip`` (zero elsewhere), and the sum of ``grad`` over ``x > clip``."""
    grad = grad.contiguous()
    grad_x = torch.empty_like(x)
    grad_clip = native.library().clip_backward(native.ptr(x), native.ptr(grad), native.ptr(grad_x),
                                                x.numel(), clip, native.threads())
    return grad_x, grad_clip


@native.bookkeeping
def lsq_forward(x: torch.Tensor, a: torch.Tensor, lo: float, hi: float, dim: int) -> torch.Tensor:
    """``round(clamp(x / a, lo, hi)) * a`` with one step ``a`` per index of ``dim``."""
    y = torch.empty_like(x)
    native.library().lsq_forward(native.ptr(x), native.ptr(a), native.ptr(y),
                                  *_channel_view(x, dim), lo, hi, native.threads())
    return y


def lsq_backward(x: torch.Tensor, a: torch.Tensor, grad: torch.Tensor, lo: float, hi: float,
                 dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad`` where ``lo <= x / a <= hi``, and per channel the sum (in double, before LSQ's
    gradient scale) of ``grad * (round(q) - q)`` inside the range and ``grad * clamp(q)`` outside."""
    grad = grad.contiguous()
    grad_x = torch.empty_like(x)
    grad_s = torch.empty(a.numel(), dtype=torch.float64)
    native.library().lsq_backward(native.ptr(x), native.ptr(a), native.ptr(grad),
                                   native.ptr(grad_x), native.ptr(grad_s), *_channel_view(x, dim),
                                   lo, hi, native.threads())
    return grad_x, grad_s


def _channel_view(x: torch.Tensor, dim: int) -> tuple[int, int, int]:
    """``x`` as ``[outer, channels, inner]`` around ``dim``."""
    return math.prod(x.shape[:dim]), x.shape[dim], math.prod(x.shape[dim + 1:])


def _matches_the_model() -> bool:
    """The kernels against the quantizers' PyTorch ops (``quant.functional``, the back end off) on
    random data: outputs and input gradients bit for bit, the parameters' gradients within 1e-5 of
    their size (summed in double here, in float by PyTorch; a changed formula moves them by their
    own size)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, 5, 3, generator=gen) * 2
    grad = torch.randn(x.shape, generator=gen)
    clip, bin_ = torch.tensor(2.5), torch.tensor([1 - 1 / 3])
    upper, delta = clip_range(clip, bin_)
    ours = [(clip_forward(x, float(upper), float(delta)), *clip_backward(x, grad, float(clip)))]
    s = torch.rand(6, generator=gen) + 0.1
    for lo, hi in ((0, 3), (-1, 1)):  # activations, ternary weights
        k = lsq_scale(x.numel(), hi)
        a = lsq_step(s, k)
        grad_x, grad_s = lsq_backward(x, a, grad, lo, hi, 1)
        ours.append((lsq_forward(x, a, lo, hi, 1), grad_x, grad_s.float() * k))
    theirs = []
    with fused.pytorch_only(), torch.enable_grad():
        for run, p in [(lambda x, p: clip_quantize(x, p, bin_), clip),
                       (lambda x, p: lsq_quantize(x, p, 0, 3, dim=1), s),
                       (lambda x, p: lsq_quantize(x, p, -1, 1, dim=1), s)]:
            xs, p = x.clone().requires_grad_(), p.clone().requires_grad_()
            y = run(xs, p)
            y.backward(grad)
            theirs.append((y, xs.grad, p.grad))
    for (y, gx, gp), (y_ref, gx_ref, gp_ref) in zip(ours, theirs, strict=True):
        gp = torch.as_tensor(gp, dtype=gp_ref.dtype).reshape(gp_ref.shape)
        if not (torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
                and torch.allclose(gp, gp_ref, rtol=0, atol=1e-5 * float(gp_ref.abs().max()))):
            return False
    return True


is_exact = native.checked_once(
    _matches_the_model,
    "BASQ's fused quantizer kernels do not give the quantizers' values (quant.functional) bit for "
    "bit on this machine; the quantizers use their PyTorch ops instead.")
