"""The BASQ MobileNet-v2 supernet (SPEC section 2), in the released checkpoint's layout."""
import math
from collections.abc import Sequence

import torch
from torch import nn

from .registry import register_supernet
from .skip import FlexibleSkip
from .supernet import PathBlock, SinglePath, Stage, Supernet, make_divisible
from .units import BranchUnit, QuantUnit

# (expansion t, channels c, repeats n, stride s); the first row is the stem.
STAGES = [(1, 32, 1, 2), (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
          (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
LAST_CHANNELS = 1280


class Stem(nn.Module):
    """Full-precision 3x3 stride-2 convolution, BN, ReLU; stride 1 for small inputs."""

    def __init__(self, out_channels: int, stride: int = 2):
        super().__init__()
        self.conv1 = nn.Conv2d(3, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))


class InvertedResidual(nn.Module):
    """Expand unit (when ``t != 1``), branch-wise depthwise unit, project unit, block residual.

    Unlike the standard linear bottleneck, the project unit ends in BN and ReLU too.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: float,
                 bits: int, l2_vals: Sequence[float], quantizer: str = "basq"):
        super().__init__()
        hidden = int(round(in_channels * expansion))
        self.expand = (QuantUnit(self, 0, in_channels, hidden, bits, quantizer=quantizer)
                       if expansion != 1 else None)
        self.depthwise = BranchUnit(self, 1, hidden, hidden, bits, l2_vals, 3, stride, groups=hidden,
                                    quantizer=quantizer)
        self.project = QuantUnit(self, 2, hidden, out_channels, bits, quantizer=quantizer)
        self.residual = stride == 1 and in_channels == out_channels

    def path(self, branch: int) -> PathBlock:
        units = ([self.expand.parts()] if self.expand is not None else []) + [
            self.depthwise.parts(branch), self.project.parts()]
        channels = units[0][4].in_channels
        return PathBlock(units, FlexibleSkip(channels, channels) if self.residual else None)

    def forward(self, x: torch.Tensor, branch: int) -> torch.Tensor:
        out = self.expand(x) if self.expand is not None else x
        out = self.project(self.depthwise(out, branch))
        return out + x if self.residual else out


class LastUnit(nn.Module):
    """The 1x1 unit to 1280 channels before pooling."""

    def __init__(self, in_channels: int, out_channels: int, bits: int, quantizer: str = "basq"):
        super().__init__()
        self.unit = QuantUnit(self, 0, in_channels, out_channels, bits, quantizer=quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unit(x)


@register_supernet("mobilenet_v2", "MobileNet-v2")
class MobileNetV2Supernet(Supernet):
    """``feature.0`` stem, ``feature.1..N`` searchable blocks, ``feature.N+1`` last unit, classifier.

    The depth multiplier scales each stage's repeats to ``ceil(n * depth_multiplier)``.
    ``small_input_stem`` makes the stem stride 1 (for 28-64 px images); ``quantizer`` is
    ``build_supernet``'s.
    """

    def __init__(self, num_classes: int, bits: int, l2_vals: Sequence[float],
                 width_multiplier: float = 1.0, width_divisor: int = 1,
                 depth_multiplier: float = 1.0, quantizer: str = "basq", small_input_stem: bool = False):
        super().__init__()
        stem_channels = make_divisible(STAGES[0][1] * width_multiplier, width_divisor)
        layers: list[nn.Module] = [Stem(stem_channels, 1 if small_input_stem else 2)]
        cin = stem_channels
        for t, c, n, s in STAGES[1:]:
            cout = make_divisible(c * width_multiplier, width_divisor)
            for i in range(math.ceil(n * depth_multiplier)):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t, bits, l2_vals, quantizer))
                cin = cout
        layers.append(LastUnit(cin, LAST_CHANNELS, bits, quantizer))
        self.feature = nn.ModuleList(layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(LAST_CHANNELS, num_classes))
        self.num_searchable_layers = len(layers) - 2
        self.num_branches = len(self.feature[1].branch_bn_q_1)
        self.quantizer = quantizer

    def stages(self) -> list[Stage]:
        stem, *blocks, last = self.feature
        return [Stage(0, (stem,), lambda x, genes: stem(x)),
                *(Stage(1, (block,), lambda x, genes, block=block: block(x, genes[0])) for block in blocks),
                Stage(0, (last, self.classifier), lambda x, genes: self.classifier(last(x).mean((2, 3))))]

    def path(self, selection: Sequence[int]) -> SinglePath:
        stem, *blocks, last = self.feature
        genes = self.check_selection(selection)
        return SinglePath((stem.conv1, stem.bn1, nn.Identity()),
                          [block.path(gene) for block, gene in zip(blocks, genes, strict=True)]
                          + [PathBlock([last.unit.parts()], None)], self.classifier[1])
