"""One stage-1 iteration (the LSQ initialisation, then a step) of a global batch over 4 pieces, run
by ``tests/test_distributed.py`` in one process (4 pieces) and under torchrun on 2 processes (2
pieces each); rank 0 saves the model and optimizer state to ``argv[1]``."""
import sys

import torch

from models import build_supernet
from training.losses import kd_loss
from training.lsq_init import initialize_activation_steps
from training.pieces import Share
from training.step import train_step
from utils import distributed

from .conftest import load_script

REPLICAS, BATCH = 4, 14  # pieces of 4, 4, 4, 2


def main(out: str) -> None:
    distributed.setup("cpu", 1)
    world, rank = distributed.world_size(), distributed.rank()
    torch.manual_seed(rank)  # each process builds its own model; process 0's is shared
    model = build_supernet("mobilenet_v2", 10, 2, [0.01, 0.001, 0.0001], width_multiplier=0.25,
                           width_divisor=8)
    distributed.broadcast_from_main(list(model.state_dict().values()))
    model.change_precision(True, False)
    data = torch.Generator().manual_seed(0)
    first = torch.randn(BATCH, 3, 32, 32, generator=data) * 2
    x, teacher = torch.randn(BATCH, 3, 32, 32, generator=data), torch.randn(BATCH, 10, generator=data)
    selection = [i % 3 for i in range(model.num_searchable_layers)]
    initialize_activation_steps(model, first[:4], selection)
    model.train()
    model.classifier[0].eval()  # no dropout: the processes would draw their own
    optimizer, _ = load_script("01train_supernet.py").phase_optimizer(model, 1e-3, 5e-6, 10)
    share = Share.of(BATCH, REPLICAS, world, rank)
    mine = slice(share.start, share.start + share.images)
    train_step(model, x[mine], selection, lambda logits, piece: kd_loss(logits, teacher[mine][piece]),
               optimizer, share=share)
    names = {id(p): n for n, p in model.named_parameters()}
    state = {**model.state_dict(), **{f"{names[id(p)]}.{k}": v for p, s in optimizer.state.items()
                                      for k, v in s.items() if k != "step"}}
    if distributed.is_main():
        torch.save(state, out)
    distributed.teardown()


if __name__ == "__main__":
    main(sys.argv[1])
