"""A BASQ unit on the CPU back end: ``models.units``' one way into it.

``forward`` runs ``U(x) = BN_last(ReLU(BN_post(QConv(Q(BN_pre(x))))) + Skip(x))`` with the fused
kernels where they give PyTorch's values bit for bit on this machine, and returns ``None`` where
none applies (the caller runs PyTorch's ops): in evaluation without autograd, two passes around the
convolution (``eval_unit``); in training, each BatchNorm with what follows it (``train_batch_norm``).
"""
import torch
from torch import nn

from . import eval_unit, train_batch_norm
from . import library as native
from .after import quantizes_after


def forward(x: torch.Tensor, bn_pre: nn.Module, quantizer: nn.Module, conv: nn.Module,
            bn_post: nn.Module, skip: nn.Module, bn_last: nn.Module) -> torch.Tensor | None:
    """The unit by the fused kernels, or ``None`` where they do not apply. ``skip`` is the model's
    skip (``models.skip.FlexibleSkip``: ``pool``, ``add_to``, channel counts)."""
    parts = (bn_pre, quantizer, conv, bn_post, skip, bn_last)
    if eval_unit.applies(x, bn_pre, quantizer, bn_post, skip, bn_last):
        return eval_unit.unit(x, *parts)
    if not (native.usable(x) and any(bn.training for bn in (bn_pre, bn_post, bn_last))):
        return None
    if train_batch_norm.applies(bn_pre, x) and quantizes_after(quantizer):
        z = conv(train_batch_norm.batch_norm(bn_pre, x, quantizer=quantizer))  # BN_pre and Q in one pass
    else:
        z = conv(quantizer(_norm(bn_pre, x)))
    if train_batch_norm.applies(bn_post, z):  # BN_post, ReLU and the sum in one pass
        repeats = skip.out_channels % skip.in_channels == 0
        src = (skip.pool(x) if repeats else skip(x)).contiguous()
        if native.usable(src):
            return _norm(bn_last, train_batch_norm.batch_norm(bn_post, z, src))
    return _norm(bn_last, skip.add_to(torch.relu(_norm(bn_post, z)), x))


def _norm(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``bn(x)``; in training with the faster statistics of ``train_batch_norm`` where it applies."""
    return train_batch_norm.batch_norm(bn, x) if train_batch_norm.applies(bn, x) else bn(x)
