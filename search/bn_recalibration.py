"""Re-estimating BatchNorm statistics for one selection (an option of stages 2 and 3).

After a short supernet training the running statistics lag the quantized activations, and in
eval mode 2-bit quantizers turn the mismatch into constant outputs (see the README). Resetting the
statistics and averaging them over a few training batches of the chosen selection, without
gradients, is the usual one-shot NAS remedy. The reference does not do it: it is off by default.
"""
import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from training.pieces import piece_sizes, run_in_pieces
from utils.data import Batch, to_device


@contextlib.contextmanager
def fresh_bn_statistics(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Inside: every BN of ``modules`` starts from reset statistics, in train mode, and averages
    those of each batch run through it (cumulative average); after: eval mode, momenta restored."""
    modules = list(modules)
    norms = [m for module in modules for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches
    for module in modules:
        module.train()
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        for module in modules:
            module.eval()


@torch.no_grad()
def recalibrate_bn(model: nn.Module, selection: Sequence[int], batches: Sequence[Batch],
                   device: torch.device, replicas: int = 1) -> None:
    """Reset every BN's running statistics and re-estimate them as a cumulative average, each batch
    at once with LSQ's ``k`` of the first of its pieces over ``replicas`` (``calibration_piece``)."""
    with fresh_bn_statistics([model]):
        for images, _ in batches:
            run_in_pieces(lambda x: model(x, selection), to_device(images, device),
                          calibration_piece(len(images), replicas))


def calibration_piece(batch: int, replicas: int) -> int:
    """The piece size a calibration batch's quantizers take ``k`` from: its first piece's. The whole
    batch normalises at once (this re-estimation is the project's, not the reference's), so an
    uneven last piece, which could not be normalised on its own, takes its first piece's ``k``."""
    return piece_sizes(batch, replicas)[0]
