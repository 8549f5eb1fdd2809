"""The BASQ unit and its pieces, shared by every supernet.

A unit wraps one quantized convolution with a parameter-free skip and a BatchNorm after the sum:

    U(x) = BN_last( ReLU(BN_post(QConv(Q(BN_pre(x))))) + Skip(x) )

The released checkpoints store a unit's parts directly on the block that holds it, under names
indexed by the unit's position (``bn_qconv_bn_relu_0``, ``bn0_last``, ``branch_bn_q_1``, ``conv1``,
...). So a unit is not a sub-module: it registers its parts on its ``owner`` block under those names
and looks them up there at every call.
"""
from collections.abc import Sequence

import torch
from torch import nn

from models.skip import FlexibleSkip
from quant import ClipActivation, LsqActivation, QConv, fused

QUANTIZERS = ("basq", "lsq", "lsq-tensor", "float")


def activation_quantizers(quantizer: str, bits: int, channels: int,
                          l2_vals: Sequence[float]) -> list[nn.Module]:
    """A branch-wise unit's activation quantizers, one per branch.

    ``basq``: one clip quantizer per candidate L2 decay (the method). The baselines of the
    reproduction have a single branch: ``lsq``, an LSQ quantizer with a step per channel (the
    reference's); ``lsq-tensor``, one with a step per tensor (the LSQ paper's); ``float``, none.
    """
    if quantizer == "basq":
        return [ClipActivation(bits, l2, branch) for branch, l2 in enumerate(l2_vals)]
    if quantizer == "float":
        return [nn.Identity()]
    return [lsq_activation(quantizer, bits, channels)]


def lsq_activation(quantizer: str, bits: int, channels: int) -> LsqActivation:
    """The LSQ activation quantizer of a model built with ``quantizer``: a step per tensor under
    ``lsq-tensor``, else the reference's step per channel."""
    return LsqActivation(bits, channels, per_tensor=quantizer == "lsq-tensor")


def unit_formula(x: torch.Tensor, bn_pre: nn.Module, quantizer: nn.Module, conv: nn.Module,
                 bn_post: nn.Module, skip: FlexibleSkip, bn_last: nn.Module) -> torch.Tensor:
    """``U(x) = BN_last(ReLU(BN_post(QConv(Q(BN_pre(x))))) + Skip(x))`` in PyTorch: the unit's one
    definition, which the supernets, the deployed model and the back end's check run."""
    return bn_last(skip.add_to(torch.relu(bn_post(conv(quantizer(bn_pre(x))))), x))


def unit_forward(x: torch.Tensor, bn_pre: nn.Module, quantizer: nn.Module, conv: nn.Module,
                 bn_post: nn.Module, skip: FlexibleSkip, bn_last: nn.Module) -> torch.Tensor:
    """The unit of every supernet and branch: a back end's fused path where one is registered and
    takes these parts (``quant.fused``; it is checked against ``unit_formula``), else ``unit_formula``."""
    fused_unit = fused.path("unit")
    out = fused_unit(x, bn_pre, quantizer, conv, bn_post, skip, bn_last) if fused_unit is not None else None
    return out if out is not None else unit_formula(x, bn_pre, quantizer, conv, bn_post, skip, bn_last)


class Unit:
    """What the units share: the parts live on the owner block; ``unit_forward`` runs them.

    A unit looks its parts up on ``owner`` at every call, so that replacing a registered module
    (``nn.SyncBatchNorm.convert_sync_batchnorm``) replaces it in the unit too.
    """

    def __init__(self, owner: nn.Module, parts: dict[str, nn.Module]):
        self.owner = owner
        for name, module in parts.items():
            owner.add_module(name, module)

    def parts(self, branch: int) -> tuple[nn.Module, ...]:
        """``bn_pre, quantizer, conv, bn_post, skip, bn_last`` of ``branch``."""
        raise NotImplementedError


class QuantUnit(Unit):
    """A unit with an always-on LSQ activation quantizer (the 1x1 convolutions of MobileNet-v2).

    Registers ``bn_qconv_bn_relu_{index}`` (BN_pre, LSQ, QConv, BN_post, ReLU) and
    ``bn{index}_last`` on ``owner``. With ``quantizer="float"`` the LSQ quantizer is an identity;
    with ``"lsq-tensor"`` it has one step per tensor, as the baseline's searched units.
    """

    def __init__(self, owner: nn.Module, index: int, in_channels: int, out_channels: int,
                 bits: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 quantizer: str = "basq"):
        self.names = (f"bn_qconv_bn_relu_{index}", f"skip{index}", f"bn{index}_last")
        body = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Identity() if quantizer == "float" else lsq_activation(quantizer, bits, in_channels),
            QConv(in_channels, out_channels, kernel_size, bits, stride, groups),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )
        super().__init__(owner, dict(zip(self.names, (
            body, FlexibleSkip(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels)),
            strict=True)))

    def parts(self, branch: int = 0) -> tuple[nn.Module, ...]:
        modules = self.owner._modules
        body, skip, bn_last = (modules[name] for name in self.names)
        bn_pre, quantizer, conv, bn_post, _ = body
        return bn_pre, quantizer, conv, bn_post, skip, bn_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return unit_forward(x, *self.parts())


class BranchUnit(Unit):
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
        self.names = (f"branch_bn_q_{index}", f"conv{index}", f"branch_bn_{index}",
                      f"skip{index}", f"bn{index}_last")
        super().__init__(owner, dict(zip(self.names, (
            nn.ModuleList(nn.Sequential(nn.BatchNorm2d(in_channels), q) for q in quantizers),
            QConv(in_channels, out_channels, kernel_size, bits, stride, groups),
            nn.ModuleList(nn.Sequential(nn.BatchNorm2d(out_channels), nn.ReLU()) for _ in quantizers),
            FlexibleSkip(in_channels, out_channels, stride),
            nn.ModuleList(nn.BatchNorm2d(out_channels) for _ in quantizers)), strict=True)))

    def parts(self, branch: int) -> tuple[nn.Module, ...]:
        pre, conv, post, skip, bn_last = (self.owner._modules[name] for name in self.names)
        bn_pre, quantizer = pre[branch]
        return bn_pre, quantizer, conv, post[branch][0], skip, bn_last[branch]

    def __call__(self, x: torch.Tensor, branch: int) -> torch.Tensor:
        return unit_forward(x, *self.parts(branch))
