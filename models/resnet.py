"""The BASQ ResNet supernet (ResNet-18 and ResNet-34), SPEC section 6.

The authors released no ResNet code; the paper only says it applies the same unit structure to
ResNet-18. This module is the project's reading of the paper:

- the stem (7x7 stride-2 convolution, BN, ReLU, 3x3 max-pool) and the classifier stay full precision;
- every 3x3 convolution of every BasicBlock is a branch-wise unit exactly like the MobileNet-v2
  depthwise unit (branch-owned BN_pre, clip quantizer, BN_post and BN_last; shared LSQ-quantized
  weights; parameter-free flexible skip, average-pooled on stride 2);
- the block residual is kept, through a parameter-free ``FlexibleSkip`` where the shape changes, so
  there are no full-precision 1x1 downsample convolutions.

Each block has two searchable layers: 16 for ResNet-18, 32 for ResNet-34. No unit has an LSQ
activation quantizer (but the ``lsq`` baseline), so ``initialize_activation_steps`` only
updates the BatchNorm statistics here.
"""
import functools
import math
from collections.abc import Sequence

import torch
from torch import nn

from .registry import register_supernet
from .skip import FlexibleSkip
from .supernet import PathBlock, SinglePath, Stage, Supernet, make_divisible
from .units import BranchUnit

# BasicBlocks per stage, before the depth multiplier.
STAGE_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
STAGE_CHANNELS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)


class ResNetStem(nn.Module):
    """Full-precision 7x7 stride-2 convolution, BN, ReLU and 3x3 stride-2 max-pool.

    For small inputs (``small_input=True``), the CIFAR-style stem: a 3x3 stride-1 convolution and
    no max-pool, which keeps the full 28-32 px resolution for the first stage.
    """

    def __init__(self, out_channels: int, small_input: bool = False):
        super().__init__()
        if small_input:
            self.conv1 = nn.Conv2d(3, out_channels, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, out_channels, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


class BasicBlock(nn.Module):
    """Two branch-wise 3x3 units (``conv0`` with the block's stride, ``conv1``) and the residual.

    The shortcut is a parameter-free ``FlexibleSkip``, which is the identity when the shapes match.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, bits: int,
                 l2_vals: Sequence[float], quantizer: str = "basq"):
        super().__init__()
        self.unit0 = BranchUnit(self, 0, in_channels, out_channels, bits, l2_vals, 3, stride,
                                quantizer=quantizer)
        self.unit1 = BranchUnit(self, 1, out_channels, out_channels, bits, l2_vals, 3, 1,
                                quantizer=quantizer)
        self.shortcut = FlexibleSkip(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor, branch0: int, branch1: int) -> torch.Tensor:
        return self.unit1(self.unit0(x, branch0), branch1) + self.shortcut(x)

    def path(self, branch0: int, branch1: int) -> PathBlock:
        return PathBlock([self.unit0.parts(branch0), self.unit1.parts(branch1)], self.shortcut)


class ResNetSupernet(Supernet):
    """``stem``, ``blocks.0..N-1`` (two searchable layers each), global average pool, ``classifier``.

    ``stage_blocks`` gives the BasicBlocks per stage (``STAGE_BLOCKS``); the depth multiplier scales
    each to ``ceil(n * depth_multiplier)``. A selection lists both units of block 0, then block 1, ...
    ``quantizer`` and ``small_input_stem`` are ``build_supernet``'s.
    """

    def __init__(self, stage_blocks: Sequence[int], num_classes: int, bits: int,
                 l2_vals: Sequence[float], width_multiplier: float = 1.0, width_divisor: int = 1,
                 depth_multiplier: float = 1.0, quantizer: str = "basq", small_input_stem: bool = False):
        super().__init__()
        cin = make_divisible(STAGE_CHANNELS[0] * width_multiplier, width_divisor)
        self.stem = ResNetStem(cin, small_input_stem)
        blocks = []
        for n, c, s in zip(stage_blocks, STAGE_CHANNELS, STAGE_STRIDES, strict=False):
            cout = make_divisible(c * width_multiplier, width_divisor)
            for i in range(math.ceil(n * depth_multiplier)):
                blocks.append(BasicBlock(cin, cout, s if i == 0 else 1, bits, l2_vals, quantizer))
                cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Linear(cin, num_classes)
        self.num_searchable_layers = 2 * len(blocks)
        self.num_branches = len(self.blocks[0].branch_bn_q_0)
        self.quantizer = quantizer

    def stages(self) -> list[Stage]:
        return [Stage(0, (self.stem,), lambda x, genes: self.stem(x)),
                *(Stage(2, (block,), lambda x, genes, block=block: block(x, genes[0], genes[1]))
                  for block in self.blocks),
                Stage(0, (self.classifier,), lambda x, genes: self.classifier(x.mean((2, 3))))]

    def path(self, selection: Sequence[int]) -> SinglePath:
        genes = self.check_selection(selection)
        return SinglePath((self.stem.conv1, self.stem.bn1, self.stem.maxpool),
                          [block.path(*genes[2 * i:2 * i + 2]) for i, block in enumerate(self.blocks)],
                          self.classifier)


for _name, _title in (("resnet18", "ResNet-18"), ("resnet34", "ResNet-34")):
    register_supernet(_name, _title)(functools.partial(ResNetSupernet, STAGE_BLOCKS[_name]))
