"""The searched activation quantizer: a learned clip value under a per-branch L2 decay."""
import torch
from torch import nn

from .functional import clip_quantize


class ClipActivation(nn.Module):
    """Unsigned clip quantizer of BASQ (the reference's ``QtActivation``).

    ``upper_bound`` is the clip ``c`` (init 6.0), learned by gradient under the L2 decay ``l2`` of the
    branch it belongs to. ``bin`` is stored in checkpoints (``1 - 1/(n_lv - 1)``) and never trained.
    Quantization is off until ``change_precision`` switches it on; then the module is the identity.
    """

    def __init__(self, bits: int, l2: float = 0.0, branch: int = 0):
        super().__init__()
        self.bits = bits
        self.l2 = l2
        self.branch = branch
        self.quantize = False
        n_lv = 2**bits
        self.bin = nn.Parameter(torch.tensor([1 - 1 / (n_lv - 1)]), requires_grad=False)
        self.upper_bound = nn.Parameter(torch.tensor(6.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize:
            return x
        return clip_quantize(x, self.upper_bound, self.bin)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, l2={self.l2}, branch={self.branch}, quantize={self.quantize}"
