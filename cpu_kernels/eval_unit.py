"""A unit in evaluation without autograd, as two fused CPU kernels around its convolution.

``BN_pre`` and the quantizer run as one pass over the unit's input; ``BN_post``, ReLU, the skip and
``BN_last`` as one pass over its output (``kernels.c``), where PyTorch's ops make six to nine.
The values are the model's bit for bit, which depends on how this machine's PyTorch computes
BatchNorm: ``is_exact`` checks every kind of unit once per process against the model's own formula
(``models.units.unit_forward`` with the back end off), and the units run that formula if any bit
differs, or if the formula changed. The skip must be the model's ``FlexibleSkip``: the kernels
repeat and pool its input themselves.
"""
import ctypes
import weakref

import torch
from torch import nn

from models import units as model_units
from models.skip import FlexibleSkip
from quant import fused
from quant.functional import piece_runs, values_key

from . import checks
from . import library as native
from .after import after_quantizer, has_hooks, lsq_step_and_scale, quantizer_tensors, quantizes_after


def _in_evaluation(bn: nn.Module) -> bool:
    return (type(bn) is nn.BatchNorm2d and not bn.training and bn.running_var is not None
            and bn.affine and not has_hooks(bn)
            and native.usable(bn.running_mean, bn.running_var, bn.weight, bn.bias))


def applies(x: torch.Tensor, bn_pre: nn.Module, quantizer: nn.Module, bn_post: nn.Module,
            skip: nn.Module, bn_last: nn.Module) -> bool:
    """Whether the fused kernels can run this unit: no autograd, eval-mode BatchNorms, CPU float32,
    no hooks on the parts the kernels stand in for, the model's skip, and this process's check passed."""
    return (not torch.is_grad_enabled() and x.dim() == 4 and native.usable(x)
            and len(piece_runs(x.shape[0])) == 1  # one k: evaluation's runs of equal pieces
            and quantizes_after(quantizer) and type(skip) is FlexibleSkip
            and all(_in_evaluation(bn) for bn in (bn_pre, bn_post, bn_last)) and is_exact())


_alphas: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _bn_terms(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``alpha = weight / sqrt(var + eps)`` as PyTorch's kernel rounds it, the mean and the bias.

    ``alpha`` is kept until the variance, the weight or ``eps`` change (evaluation runs the same
    BatchNorms again and again; three small ops a BatchNorm are a tenth of a 32 px step).
    """
    var, weight = bn.running_var, bn.weight
    key = values_key(var, weight)
    if key is None:
        return torch.rsqrt(var + bn.eps).mul_(weight), bn.running_mean, bn.bias
    key += (bn.eps,)
    cached = _alphas.get(bn)
    if cached is None or cached[0] != key:
        cached = _alphas[bn] = key, torch.rsqrt(var + bn.eps).mul_(weight)
    return cached[1], bn.running_mean, bn.bias


def unit(x: torch.Tensor, bn_pre: nn.Module, quantizer: nn.Module, conv: nn.Module,
         bn_post: nn.Module, skip: nn.Module, bn_last: nn.Module) -> torch.Tensor:
    """``BN_last(ReLU(BN_post(conv(Q(BN_pre(x))))) + skip(x))`` where ``applies`` holds."""
    lib, threads = native.library(), native.threads()
    n, c, h, w = x.shape
    q = torch.empty_like(x)
    pre = _bn_terms(bn_pre)  # held here: the kernel reads them
    clip, bin_, step, hi = quantizer_tensors(quantizer)
    if step is not None:  # held here: the kernel reads it
        step = lsq_step_and_scale(step, x, hi, piece_runs(n)[0][2])[0]
    after = after_quantizer(clip, bin_, step, hi)
    lib.bn_quantize(native.ptr(x), native.ptr(q), n, c, h * w, *map(native.ptr, pre),
                    ctypes.byref(after), threads)
    z = conv(q).contiguous()
    if skip.in_channels > skip.out_channels:  # summed chunks: PyTorch's sum order, then added
        src, pooled = skip(x).contiguous(), 0
    else:  # the input itself, repeated (and pooled) by the kernel
        src, pooled = x, int(skip.stride > 1)
    terms = _bn_terms(bn_post) + _bn_terms(bn_last)
    out = torch.empty_like(z)
    lib.bn_relu_skip_bn(native.ptr(z), native.ptr(src), native.ptr(out), *z.shape, *src.shape[1:],
                        pooled, *map(native.ptr, terms), threads)
    return out


def _matches_the_model() -> bool:
    gen = torch.Generator().manual_seed(0)
    for x, parts in checks.units(gen):
        with fused.pytorch_only():
            expected = model_units.unit_forward(x, *parts)
        if not torch.equal(unit(x, *parts), expected):
            return False
    return True


is_exact = native.checked_once(
    _matches_the_model,
    "BASQ's fused evaluation kernels do not give the unit's values (models.units.unit_forward) bit "
    "for bit on this machine; evaluation uses the unit's PyTorch ops instead.")
