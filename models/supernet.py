"""What every BASQ supernet shares: selections, precision switches and quantizer initialisation."""
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from quant import ClipActivation, LsqActivation, QConv


def make_divisible(v: float, divisor: int) -> int:
    """A width of ``v`` channels rounded to a multiple of ``divisor``, never below 90 % of ``v``
    (SPEC section 2; torchvision's rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


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

    @torch.no_grad()
    def initialize_activation_steps(self, images: torch.Tensor, selection: Sequence[int]) -> None:
        """Set every LSQ activation step from data, as the reference's ``initialize()`` (SPEC 1).

        One no-grad, train-mode forward of ``images`` (a batch drawn for this, before the first
        training step) with a hook that runs after each LSQ activation quantizer: the quantizer
        quantizes with the step it has (1 when new), then sets its step from its input. The pass
        updates every BatchNorm's running statistics once. Under ``nn.DataParallel`` the reference
        took both from the first piece of that batch alone (``training.step``'s wrapper).
        """
        def init_hook(module: LsqActivation, args: tuple, output: torch.Tensor) -> None:
            module.init_from(args[0])

        handles = [m.register_forward_hook(init_hook)
                   for m in self.modules() if isinstance(m, LsqActivation)]
        was_training = self.training
        try:
            self.train()
            self(images, selection)
        finally:
            self.train(was_training)
            for h in handles:
                h.remove()
