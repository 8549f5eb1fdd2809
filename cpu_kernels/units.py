"""A BASQ unit on the CPU back end: the fused path ``models.units.unit_forward`` asks for.

``forward`` runs the unit with the fused kernels where they give the model's values bit for bit on
this machine, and returns ``None`` where they do not apply (the model then runs its formula,
``models.units.unit_formula``): in evaluation without autograd, two passes around the convolution
(``eval_unit``); in training, each BatchNorm with what follows it (``train_batch_norm``). Each is
checked once per process against the model's own formula run with the back end off
(``eval_unit.is_exact``, ``is_exact``): if the formula changes, the check fails, a warning says so
once, and the kernels stand aside.
"""
import copy

import torch
from torch import nn

from models import units as model_units
from models.skip import FlexibleSkip
from quant import fused

from . import checks, eval_unit, train_batch_norm
from . import library as native
from .after import quantizes_after


def forward(x: torch.Tensor, bn_pre: nn.Module, quantizer: nn.Module, conv: nn.Module,
            bn_post: nn.Module, skip: nn.Module, bn_last: nn.Module) -> torch.Tensor | None:
    """The unit by the fused kernels, or ``None`` where they do not apply."""
    parts = (bn_pre, quantizer, conv, bn_post, skip, bn_last)
    if eval_unit.applies(x, *parts[:2], *parts[3:]):
        return eval_unit.unit(x, *parts)
    if trains(x, *parts) and is_exact():
        return _train(x, *parts)
    return None


@native.bookkeeping
def trains(x: torch.Tensor, bn_pre: nn.Module, quantizer: nn.Module, conv: nn.Module,
           bn_post: nn.Module, skip: nn.Module, bn_last: nn.Module) -> bool:
    """Whether the training kernels take the unit: ``BN_pre`` with the quantizer, and ``BN_post``
    with ReLU and the sum with the model's skip, each in one pass (``train_batch_norm.applies``)."""
    if not (type(skip) is FlexibleSkip and quantizes_after(quantizer)
            and train_batch_norm.applies(bn_pre, x)):
        return False
    n, _, h, w = x.shape  # the convolution's output: odd kernel, padding kernel // 2
    return train_batch_norm.takes(bn_post, (n, skip.out_channels, (h - 1) // skip.stride + 1,
                                            (w - 1) // skip.stride + 1))


def _train(x: torch.Tensor, bn_pre: nn.Module, quantizer: nn.Module, conv: nn.Module,
           bn_post: nn.Module, skip: FlexibleSkip, bn_last: nn.Module) -> torch.Tensor:
    z = conv(train_batch_norm.batch_norm(bn_pre, x, quantizer=quantizer))  # BN_pre and Q in one pass
    z = z.contiguous()
    repeats = skip.out_channels % skip.in_channels == 0  # then the kernel repeats the input itself
    src = (skip.pool(x) if repeats else skip(x)).contiguous()
    y = train_batch_norm.batch_norm(bn_post, z, src)  # BN_post, ReLU and the sum in one pass
    return train_batch_norm.batch_norm(bn_last, y) if train_batch_norm.applies(bn_last, y) else bn_last(y)


def _matches_the_model() -> bool:
    """Training-mode units by the kernels and by the model's formula (back end off): outputs and
    running statistics bit for bit; input gradients within 1e-4 of their largest value, since the
    kernels' backward sums in another order (a changed formula moves them by their own size)."""
    gen = torch.Generator().manual_seed(1)
    with torch.enable_grad():
        for x, parts in checks.units(gen):
            ours, theirs = (copy.deepcopy(parts) for _ in range(2))
            for part in (*ours, *theirs):
                part.train()
            if not trains(x, *ours):
                continue
            x_ours, x_theirs = (x.clone().requires_grad_() for _ in range(2))
            y = _train(x_ours, *ours)
            with fused.pytorch_only():
                expected = model_units.unit_forward(x_theirs, *theirs)
            grad = torch.randn(y.shape, generator=gen)
            y.backward(grad)
            with fused.pytorch_only():
                expected.backward(grad)
            scale = x_theirs.grad.abs().max()
            if not (torch.equal(y, expected)
                    and all(torch.equal(a, b) for a, b in zip(_buffers(ours), _buffers(theirs), strict=True))
                    and torch.allclose(x_ours.grad, x_theirs.grad, rtol=0, atol=1e-4 * float(scale))):
                return False
    return True


def _buffers(parts: tuple[nn.Module, ...]) -> list[torch.Tensor]:
    return [b for part in parts for b in part.buffers()]


is_exact = native.checked_once(
    _matches_the_model,
    "BASQ's fused training kernels do not give the unit's values (models.units.unit_forward) bit "
    "for bit on this machine; training uses the unit's PyTorch ops instead.")
