"""Convolution with LSQ-quantized weights, stored flat as in the released checkpoints."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .functional import values_key
from .lsq import LsqWeight


class QConv(nn.Module):
    """The reference's ``QtConv``: weights as a ``[numel, 1]`` parameter named ``weights``.

    No bias. The weight quantizer ``w_quantize`` applies only while ``quantize_weights`` is on.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bits: int,
                 stride: int = 1, groups: int = 1):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.groups = kernel_size, stride, groups
        self.shape = (out_channels, in_channels // groups, kernel_size, kernel_size)
        self.weights = nn.Parameter(torch.empty(math.prod(self.shape), 1).uniform_(-0.01, 0.01))
        self.w_quantize = LsqWeight(bits, out_channels)
        self.w_quantize.init_from(self.weight)
        self.quantize_weights = False
        self._kept: tuple | None = None  # (key, quantized weight), see effective_weight

    @property
    def weight(self) -> torch.Tensor:
        return self.weights.view(self.shape)

    def init_weight_steps(self) -> None:
        self.w_quantize.init_from(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.effective_weight(), None, self.stride, self.kernel_size // 2, 1,
                        self.groups)

    def effective_weight(self) -> torch.Tensor:
        """The weight the convolution uses: quantized while ``quantize_weights`` is on.

        Without autograd, the quantized weight is kept until the weights or the steps change:
        stage 2 evaluates thousands of candidates with the same weights.
        """
        if not self.quantize_weights:
            return self.weight
        key = values_key(self.weights, self.w_quantize.s)
        if torch.is_grad_enabled() or key is None:
            return self.w_quantize(self.weight)
        key += (torch.is_inference_mode_enabled(),)
        if self._kept is None or self._kept[0] != key:
            self._kept = key, self.w_quantize(self.weight)
        return self._kept[1]

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, groups={self.groups}, bits={self.w_quantize.bits}")
