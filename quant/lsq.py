"""LSQ quantizers (Esser et al. 2020): learned step sizes, per channel as the reference's (or per
tensor, as the paper's activations), and how their steps are
initialised (``init_from``; ``initialize_during``, the pass that calls it). When and from which
data stage 1 initialises them: ``training.lsq_init``."""
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .functional import lsq_quantize, piece_runs


class LsqActivation(nn.Module):
    """Unsigned LSQ activation quantizer with one step per input channel (reference ``ActLsqQuan``),
    or with ``per_tensor`` one step for the whole tensor (the LSQ paper's own activation quantizer).

    Always on. The steps are set from data by ``init_from`` (stage 1 does it on its first batch).
    ``k`` counts the elements of the input, or of one piece of it (``quant.functional.in_pieces``);
    a run of equal pieces quantizes at once, an uneven last piece on its own.
    """

    def __init__(self, bits: int, channels: int, per_tensor: bool = False):
        super().__init__()
        self.bits = bits
        self.qp = 2**bits - 1
        self.channels = channels
        self.per_tensor = per_tensor
        self.s = nn.Parameter(torch.ones(1 if per_tensor else channels))

    def steps(self) -> torch.Tensor:
        """The step of each channel: ``s`` itself, or the one step repeated (a view, so that the
        channels' gradients sum into it). What the kernels and the deployed model read."""
        return self.s.expand(self.channels) if self.per_tensor else self.s

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        mean = x.abs().mean() if self.per_tensor else x.abs().mean(dim=(0, 2, 3))
        self.s.copy_(2 * mean / math.sqrt(self.qp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, runs = self.steps(), piece_runs(x.shape[0])
        if len(runs) == 1:
            return lsq_quantize(x, s, 0, self.qp, dim=1, numel=x[0].numel() * runs[0][2])
        return torch.cat([lsq_quantize(piece, s, 0, self.qp, dim=1, numel=x[0].numel() * images)
                          for piece, (_, _, images) in zip(x.split([stop - start for start, stop, _ in runs]),
                                                           runs, strict=True)])

    def extra_repr(self) -> str:
        per_tensor = ", per_tensor=True" if self.per_tensor else ""
        return f"bits={self.bits}, channels={self.channels}{per_tensor}"


class LsqWeight(nn.Module):
    """Symmetric LSQ weight quantizer, one step per output channel (reference ``WLsqQuan``).

    Levels ``-Qp .. Qp`` with ``Qp = 2**(bits-1) - 1``: 2-bit weights are ternary.
    """

    def __init__(self, bits: int, out_channels: int):
        super().__init__()
        self.bits = bits
        self.qp = 2 ** (bits - 1) - 1
        self.s = nn.Parameter(torch.ones(out_channels))

    @torch.no_grad()
    def init_from(self, w: torch.Tensor) -> None:
        self.s.copy_(2 * w.abs().flatten(1).mean(dim=1) / math.sqrt(self.qp))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return lsq_quantize(w, self.s, -self.qp, self.qp, dim=0)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channels={self.s.numel()}"


@torch.no_grad()
def initialize_during(module: nn.Module, run: Callable[[], Any]) -> None:
    """The reference's ``initialize()`` (SPEC 1): ``run()``, a no-grad pass of ``module``, with a
    hook after each of its LSQ activation quantizers: the quantizer quantizes with the step it has
    (1 when new), then sets its step from its input (``LsqActivation.init_from``)."""
    handles = [m.register_forward_hook(lambda q, args, output: q.init_from(args[0]))
               for m in module.modules() if isinstance(m, LsqActivation)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
