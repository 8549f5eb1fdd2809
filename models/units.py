"""The BASQ unit and its pieces, shared by every supernet.

A unit wraps one quantized convolution with a parameter-free skip and a BatchNorm after the sum:

    U(x) = BN_last( ReLU(BN_post(QConv(Q(BN_pre(x))))) + Skip(x) )

The released checkpoints store a unit's parts directly on the block that holds it, under names
indexed by the unit's position (``bn_qconv_bn_relu_0``, ``bn0_last``, ``branch_bn_q_1``, ``conv1``,
...). So a unit is not a sub-module: it registers its parts on its ``owner`` block under those names
and keeps references to them for its forward pass.
"""
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from quant import ClipActivation, LsqActivation, QConv


class FlexibleSkip(nn.Module):
    """Parameter-free shortcut from ``in_channels`` to ``out_channels``, pooled on stride 2.

    More outputs than inputs: the input is repeated along channels (and truncated to
    ``out_channels`` when it is not a multiple, which the reference cannot do). Fewer: consecutive
    chunks of ``out_channels`` channels are summed, a last partial chunk zero-padded. Stride 2 is a
    2x2 average pool with ``ceil_mode`` so that odd sizes match the strided conv's output.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cin, cout = self.in_channels, self.out_channels
        if cout > cin:
            x = x.repeat(1, math.ceil(cout / cin), 1, 1)
            if x.shape[1] != cout:
                x = x[:, :cout]
        elif cin > cout:
            pad = -cin % cout
            if pad:
                x = F.pad(x, (0, 0, 0, 0, 0, pad))
            n, _, h, w = x.shape
            x = x.view(n, -1, cout, h, w).sum(1)
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True)
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


QUANTIZERS = ("basq", "lsq", "float")


def activation_quantizers(quantizer: str, bits: int, channels: int,
                          l2_vals: Sequence[float]) -> list[nn.Module]:
    """A branch-wise unit's activation quantizers, one per branch.

    ``basq``: one clip quantizer per candidate L2 decay (the method). The baselines of the
    reproduction have a single branch: ``lsq``, an LSQ quantizer; ``float``, none.
    """
    if quantizer == "basq":
        return [ClipActivation(bits, l2, branch) for branch, l2 in enumerate(l2_vals)]
    if quantizer == "lsq":
        return [LsqActivation(bits, channels)]
    return [nn.Identity()]


class QuantUnit:
    """A unit with an always-on LSQ activation quantizer (the 1x1 convolutions of MobileNet-v2).

    Registers ``bn_qconv_bn_relu_{index}`` (BN_pre, LSQ, QConv, BN_post, ReLU) and
    ``bn{index}_last`` on ``owner``. With ``quantizer="float"`` the LSQ quantizer is an identity.
    """

    def __init__(self, owner: nn.Module, index: int, in_channels: int, out_channels: int,
                 bits: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 quantizer: str = "basq"):
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Identity() if quantizer == "float" else LsqActivation(bits, in_channels),
            QConv(in_channels, out_channels, kernel_size, bits, stride, groups),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )
        self.bn_last = nn.BatchNorm2d(out_channels)
        self.skip = FlexibleSkip(in_channels, out_channels, stride)
        owner.add_module(f"bn_qconv_bn_relu_{index}", self.body)
        owner.add_module(f"bn{index}_last", self.bn_last)
        owner.add_module(f"skip{index}", self.skip)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_last(self.body(x) + self.skip(x))


class BranchUnit:
    """A branch-wise unit: one clip quantizer per candidate L2 decay, the convolution shared.

    Branch ``j`` owns BN_pre and the clip quantizer (``branch_bn_q_{index}[j]``), BN_post
    (``branch_bn_{index}[j]``) and BN_last (``bn{index}_last[j]``); the weights of
    ``conv{index}`` serve every branch. ``quantizer`` picks the activation quantizers
    (``activation_quantizers``).
    """

    def __init__(self, owner: nn.Module, index: int, in_channels: int, out_channels: int,
                 bits: int, l2_vals: Sequence[float], kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, quantizer: str = "basq"):
        quantizers = activation_quantizers(quantizer, bits, in_channels, l2_vals)
        self.pre = nn.ModuleList(nn.Sequential(nn.BatchNorm2d(in_channels), q) for q in quantizers)
        self.conv = QConv(in_channels, out_channels, kernel_size, bits, stride, groups)
        self.post = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(out_channels), nn.ReLU()) for _ in quantizers
        )
        self.bn_last = nn.ModuleList(nn.BatchNorm2d(out_channels) for _ in quantizers)
        self.skip = FlexibleSkip(in_channels, out_channels, stride)
        owner.add_module(f"branch_bn_q_{index}", self.pre)
        owner.add_module(f"conv{index}", self.conv)
        owner.add_module(f"branch_bn_{index}", self.post)
        owner.add_module(f"bn{index}_last", self.bn_last)
        owner.add_module(f"skip{index}", self.skip)

    def __call__(self, x: torch.Tensor, branch: int) -> torch.Tensor:
        return self.bn_last[branch](self.post[branch](self.conv(self.pre[branch](x))) + self.skip(x))
