"""The parameter-free skip connection of every BASQ unit."""
import math

import torch
import torch.nn.functional as F
from torch import nn


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
        return self.pool(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The 2x2 average pool of a stride-2 skip (``ceil_mode``); the identity on stride 1."""
        return F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True) if self.stride > 1 else x

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out + self(x)``; an input repeated a whole number of times is broadcast, not copied."""
        cin, cout = self.in_channels, self.out_channels
        if cout <= cin or cout % cin:
            return out + self(x)
        x = self.pool(x)  # pooling commutes with repeating channels
        return (out.unflatten(1, (cout // cin, cin)) + x.unsqueeze(1)).flatten(1, 2)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"
