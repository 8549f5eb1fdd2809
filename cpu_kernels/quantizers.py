"""The quantizers in one pass each: ``quant.functional``'s one way into the back end.

``applies`` says whether the kernels take the tensors (contiguous float32 on the CPU, kernels
built); the functions then give PyTorch's ops' outputs and input gradients bit for bit (the same
IEEE operations in the same order). The parameters' gradient sums accumulate in double.
"""
import math

import torch

from . import library as native


def applies(*tensors: torch.Tensor) -> bool:
    return native.usable(*tensors)


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
