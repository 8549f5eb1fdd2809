"""When and from which data stage 1 initialises the LSQ activation steps; how: ``quant.lsq``.

At the start of phase 1 (``01train_supernet.py``'s ``start_phase``), before the first training
step, from the first piece of a batch drawn for the purpose, as the reference's ``initialize()``
under ``nn.DataParallel`` did: one train-mode pass on process 0 sets the steps and updates the BN
running statistics once (``Supernet.initialize_activation_steps``); under torchrun the other
processes then take both from it.
"""
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from models import Supernet
from quant import LsqActivation
from utils import distributed
from utils.data import to_device, train_loader

from .pieces import Share
from .step import statistics


def initialisation_batch(dataset: Dataset, batch_size: int, replicas: int, seed: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first piece of the batch stage 1 initialises the LSQ steps from, drawn for that purpose
    as the reference's ``initialize()`` draws it: not one of the training batches (it is epoch -1
    of the sampler)."""
    loader, batches = train_loader(dataset, batch_size, 0, seed,
                                   share=lambda n: Share.of(n, replicas, replicas))
    batches.set_epoch(-1)
    return next(iter(loader))


def first_piece(dataset: Dataset, batch_size: int, replicas: int, seed: int,
                device: torch.device) -> torch.Tensor:
    """Process 0's images to initialise from (``initialisation_batch``), on ``device``; an empty
    tensor on the other processes."""
    if not distributed.is_main():
        return torch.empty(0)
    images, _ = initialisation_batch(dataset, batch_size, replicas, seed)
    return to_device(images, device)


def initialize_activation_steps(model: Supernet, images: torch.Tensor, selection: Sequence[int]) -> None:
    """The LSQ activation steps and one update of the BN running statistics from ``images``
    (``first_piece``), on process 0; under torchrun then shared."""
    if distributed.is_main():
        model.initialize_activation_steps(images, selection)
    steps = [m.s.detach() for m in model.modules() if isinstance(m, LsqActivation)]
    distributed.broadcast_from_main(steps + statistics(model))
