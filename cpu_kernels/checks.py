"""The units every once-per-process check runs: one of each kind the supernets have.

The kernels are checked against the model's own formula (``models.units.unit_forward`` with the
back end off, ``quant.fused.pytorch_only``), on units built of the model's own parts.
"""
from collections.abc import Iterator

import torch
from torch import nn

from models.skip import FlexibleSkip
from quant import ClipActivation, LsqActivation, QConv

# (in, out, kernel, stride, quantizer). The skip repeats, repeats and truncates, sums chunks (with
# and without padding), and pools odd sizes.
KINDS = [(8, 24, 1, 1, "lsq"), (24, 24, 3, 2, "clip"), (24, 24, 3, 1, "clip off"),
         (24, 8, 1, 1, "lsq"), (20, 8, 1, 2, "lsq"), (8, 20, 1, 2, "none"), (16, 16, 3, 1, "none")]


def units(gen: torch.Generator) -> Iterator[tuple[torch.Tensor, tuple[nn.Module, ...]]]:
    """An input and the parts (``bn_pre, quantizer, conv, bn_post, skip, bn_last``, BatchNorms in
    evaluation, statistics and affine terms far from the identity) of each kind of unit."""
    for cin, cout, kernel, stride, kind in KINDS:
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
        yield x, (bns[0], quantizer, conv, bns[1], FlexibleSkip(cin, cout, stride), bns[2])
