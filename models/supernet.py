"""What every BASQ supernet shares: selections, precision switches and quantizer initialisation."""
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from quant import ClipActivation, QConv
from quant.lsq import initialize_during


def make_divisible(v: float, divisor: int) -> int:
    """A width of ``v`` channels rounded to a multiple of ``divisor``, never below 90 % of ``v``
    (SPEC section 2; torchvision's rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


@dataclass(frozen=True)
class PathBlock:
    """A block of a single path: its units one after the other (each unit's parts, ``bn_pre,
    quantizer, conv, bn_post, skip, bn_last``, as ``Unit.parts`` gives them), plus ``shortcut(x)``
    of the block's input where the block has a residual (``None`` where it has none)."""

    units: list[tuple[nn.Module, ...]]
    shortcut: nn.Module | None


@dataclass(frozen=True)
class SinglePath:
    """A supernet's single path for one selection, in the supernet's own modules: the full-precision
    stem ``pool(ReLU(bn(conv(x))))`` (``pool`` an ``nn.Identity`` or a max-pool), the blocks, and the
    ``classifier`` (an ``nn.Linear``) after the global average pool. ``export`` makes it the
    deployed model and the ONNX graph."""

    stem: tuple[nn.Conv2d, nn.BatchNorm2d, nn.Module]
    blocks: list[PathBlock]
    classifier: nn.Linear


@dataclass(frozen=True)
class Stage:
    """A piece of the forward pass that takes the next ``genes`` branch indices of a selection.

    ``modules`` hold the stage's parameters and BatchNorms; ``run(x, genes)`` computes it.
    """

    genes: int
    modules: tuple[nn.Module, ...]
    run: Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


class Supernet(nn.Module):
    """Base of the supernets: ``forward(x, selection)`` with one branch index per searchable layer.

    Subclasses set ``num_searchable_layers``, ``num_branches``, ``quantizer`` and ``config`` (the
    ``build_supernet`` arguments, saved in checkpoints).
    """

    num_searchable_layers: int
    num_branches: int
    quantizer: str
    config: dict

    def stages(self) -> list[Stage]:
        """The forward pass as a chain of stages (stem, searchable blocks, head).

        The output of a stage depends only on the selection's genes up to its own, so stage 2 can
        reuse it for every selection with that prefix.
        """
        raise NotImplementedError

    def path(self, selection: Sequence[int]) -> SinglePath:
        """The single path of ``selection``: what ``forward(x, selection)`` computes in evaluation."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, selection: Sequence[int]) -> torch.Tensor:
        selection = self.check_selection(selection)
        start = 0
        for stage in self.stages():
            x = stage.run(x, selection[start:start + stage.genes])
            start += stage.genes
        return x

    def check_selection(self, selection: Sequence[int]) -> list[int]:
        selection = [int(b) for b in selection]
        if len(selection) != self.num_searchable_layers:
            raise ValueError(f"selection has {len(selection)} entries, the supernet has "
                             f"{self.num_searchable_layers} searchable layers")
        if any(b < 0 or b >= self.num_branches for b in selection):
            raise ValueError(f"selection {selection} has a branch outside 0..{self.num_branches - 1}")
        return selection

    def change_precision(self, a_bin: bool, w_bin: bool) -> None:
        """Switch the clip quantizers (``a_bin``) and the weight quantizers (``w_bin``).

        The LSQ activation quantizers are always on. A ``float`` supernet stays full precision.
        """
        for m in self.modules():
            if isinstance(m, ClipActivation):
                m.quantize = a_bin
            elif isinstance(m, QConv):
                m.quantize_weights = w_bin and self.quantizer != "float"

    def init_weight_steps(self) -> None:
        """Re-initialise every LSQ weight step from the current weights (start of phase 2)."""
        for m in self.modules():
            if isinstance(m, QConv):
                m.init_weight_steps()

    def initialize_activation_steps(self, images: torch.Tensor, selection: Sequence[int]) -> None:
        """Set every LSQ activation step from ``images`` (``quant.lsq.initialize_during``) in one
        train-mode pass of ``selection``, which updates every BatchNorm's running statistics once.
        When and from which images stage 1 does it: ``training.lsq_init``."""
        was_training = self.training
        try:
            self.train()
            initialize_during(self, lambda: self(images, selection))
        finally:
            self.train(was_training)
