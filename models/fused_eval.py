"""A unit in evaluation without autograd, as two fused CPU kernels around its convolution.

``BN_pre`` and the quantizer run as one pass over the unit's input; ``BN_post``, ReLU, the skip and
``BN_last`` as one pass over its output (``quant/kernels.c``), where PyTorch's ops make six to nine.
The values are PyTorch's bit for bit, which depends on how this machine's PyTorch computes
BatchNorm: ``is_exact`` checks every kind of unit against PyTorch's ops once per process, and the
units keep PyTorch's ops if any bit differs.
"""
import ctypes
import weakref

import torch
from torch import nn

from quant import ClipActivation, LsqActivation, QConv, native
from quant.functional import lsq_scale, lsq_step, piece_numel, values_key
from quant.fused import after_quantizer, has_hooks, quantizer_tensors, quantizes_after

from .skip import FlexibleSkip


def _in_evaluation(bn: nn.Module) -> bool:
    return (type(bn) is nn.BatchNorm2d and not bn.training and bn.running_var is not None
            and bn.affine and not has_hooks(bn)
            and native.usable(bn.running_mean, bn.running_var, bn.weight, bn.bias))


def applies(x: torch.Tensor, bn_pre: nn.Module, quantizer: nn.Module, bn_post: nn.Module,
            bn_last: nn.Module) -> bool:
    """Whether the fused kernels can run this unit: no autograd, eval-mode BatchNorms, CPU float32,
    no hooks on the parts the kernels stand in for."""
    return (not torch.is_grad_enabled() and x.dim() == 4 and native.usable(x)
            and quantizes_after(quantizer)
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
    """``models.units.unit_forward`` where ``applies`` holds."""
    lib, threads = native.library(), native.threads()
    n, c, h, w = x.shape
    q = torch.empty_like(x)
    pre = _bn_terms(bn_pre)  # held here: the kernel reads them
    clip, bin_, step, hi = quantizer_tensors(quantizer)
    if step is not None:  # held here: the kernel reads it
        step = lsq_step(step, lsq_scale(piece_numel(x), hi))
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


def _by_pytorch_ops(x: torch.Tensor, bn_pre: nn.Module, quantizer: nn.Module, conv: nn.Module,
                    bn_post: nn.Module, skip: FlexibleSkip, bn_last: nn.Module) -> torch.Tensor:
    """The unit in evaluation, one PyTorch op after the other: what ``unit`` must equal."""
    return bn_last(skip.add_to(torch.relu(bn_post(conv(quantizer(bn_pre(x))))), x))


# Every kind of unit the supernets have: (in, out, kernel, stride, quantizer). The skip repeats,
# repeats and truncates, sums chunks (with and without padding), and pools odd sizes.
_CHECKED_UNITS = [(8, 24, 1, 1, "lsq"), (24, 24, 3, 2, "clip"), (24, 24, 3, 1, "clip off"),
                  (24, 8, 1, 1, "lsq"), (20, 8, 1, 2, "lsq"), (8, 20, 1, 2, "none"), (16, 16, 3, 1, "none")]


def _matches() -> bool:
    gen = torch.Generator().manual_seed(0)
    for cin, cout, kernel, stride, kind in _CHECKED_UNITS:
        quantizer = {"lsq": LsqActivation(2, cin), "none": nn.Identity()}.get(kind) or ClipActivation(2)
        if kind == "clip":
            quantizer.quantize = True
            quantizer.upper_bound.data.fill_(2.5)
        conv = QConv(cin, cout, kernel, 2, stride, cin if kernel == 3 else 1)
        conv.quantize_weights = True
        bns = [nn.BatchNorm2d(c).eval() for c in (cin, cout, cout)]
        for bn in bns:
            for t in (bn.running_mean, bn.weight.data, bn.bias.data):
                t.copy_(torch.randn(t.shape, generator=gen))
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) * 3 + 1e-3)
        x = torch.randn(3, cin, 9, 7, generator=gen) * 3
        if kind == "lsq":
            quantizer.init_from(bns[0](x))
        parts = (bns[0], quantizer, conv, bns[1], FlexibleSkip(cin, cout, stride), bns[2])
        if not torch.equal(unit(x, *parts), _by_pytorch_ops(x, *parts)):
            return False
    return True


is_exact = native.checked_once(
    _matches, "BASQ's fused evaluation kernels do not give PyTorch's BatchNorm values bit for bit "
              "on this machine; evaluation uses PyTorch's ops instead.")
