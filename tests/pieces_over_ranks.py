"""One stage-1 iteration (the LSQ initialisation, then a step) of a global batch over 4 pieces, run
by ``tests/test_distributed.py`` in one process (4 pieces) and under torchrun on 2 processes (2
pieces each); rank 0 saves the step as a recorded case (``trajectories.pt``'s keys, with the
gradients and the parameters' names) to ``argv[1]``."""
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
CONFIG = dict(num_classes=10, bits=2, l2_vals=[0.01, 0.001, 0.0001], width_multiplier=0.25, width_divisor=8)


def main(out: str) -> None:
    distributed.setup("cpu", 1)
    world, rank = distributed.world_size(), distributed.rank()
    torch.manual_seed(rank)  # each process builds its own model; process 0's is shared
    model = build_supernet("mobilenet_v2", **CONFIG)
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
    before = {k: v.clone() for k, v in model.state_dict().items()}
    share = Share.of(BATCH, REPLICAS, world, rank)
    mine = slice(share.start, share.start + share.images)
    _, loss, grad_norm = train_step(model, x[mine], selection,
                                    lambda logits, piece: kd_loss(logits, teacher[mine][piece]),
                                    optimizer, share=share)
    named = dict(model.named_parameters())
    names = {id(p): n for n, p in named.items()}
    stepped = {names[id(p)]: dict(s) for p, s in optimizer.state.items()}
    loss = distributed.all_reduce_sum(loss * (share.images / share.batch))  # the global batch's mean
    case = {
        "state_before": before, "state_after": model.state_dict(), "optimizer_state_after": stepped,
        "optimizer_state_before": {n: {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(named[n]),
                                       "exp_avg_sq": torch.zeros_like(named[n])} for n in stepped},
        "group_lrs": [g["lr"] for g in optimizer.param_groups], "hyper": {"lr": 1e-3},
        "batch": {"x": x, "selection": selection}, "config": CONFIG,
        "loss": loss.item(), "grad_norm_before_clipping": grad_norm.item(),
        "grads": {n: p.grad for n, p in named.items() if p.grad is not None}, "parameters": list(named)}
    if distributed.is_main():
        torch.save(case, out)
    distributed.teardown()


if __name__ == "__main__":
    main(sys.argv[1])
