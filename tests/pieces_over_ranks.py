"""A few stage-1 iterations (the LSQ initialisation, then ``STEPS`` steps, the classifier's dropout
on) of global batches over 4 pieces, run by ``tests/test_distributed.py`` under torchrun on 2 or 4
processes (2 or 1 pieces each); rank 0 saves each step as a recorded case (``trajectories.pt``'s
keys, with the gradients, the parameters' names and the iteration) to ``argv[1]``. The test replays
each in one process, all 4 pieces there, from the same state."""
import sys

import torch

from models import build_supernet
from training.losses import kd_loss
from training.lsq_init import initialize_activation_steps
from training.pieces import Draws, Share
from training.step import train_step
from utils import distributed

from .conftest import load_script

REPLICAS, BATCH, STEPS, SEED = 4, 14, 3, 5  # pieces of 4, 4, 4, 2
CONFIG = dict(num_classes=10, bits=2, l2_vals=[0.01, 0.001, 0.0001], width_multiplier=0.25, width_divisor=8)


def batch(iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and teacher logits of an iteration's global batch."""
    data = torch.Generator().manual_seed(iteration)
    return torch.randn(BATCH, 3, 32, 32, generator=data), torch.randn(BATCH, 10, generator=data)


def selection(model: torch.nn.Module, iteration: int) -> list[int]:
    return [(i + iteration) % 3 for i in range(model.num_searchable_layers)]


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, iteration: int, share: Share
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Iteration ``iteration``'s step of ``share``'s pieces: its mean loss and the gradient norm."""
    x, teacher = batch(iteration)
    mine = slice(share.start, share.start + share.images)
    _, loss, grad_norm = train_step(model, x[mine], selection(model, iteration),
                                    lambda logits, images: kd_loss(logits, teacher[mine][images]),
                                    optimizer, share=share, draws=Draws(SEED, iteration))
    return loss, grad_norm


def optimizer_state(optimizer: torch.optim.Optimizer, named: dict) -> dict:
    """Adam's state per parameter name; before the first step, the state it starts from."""
    state = {id(p): s for p, s in optimizer.state.items()}
    return {n: ({k: v.clone() for k, v in state[id(p)].items()} if id(p) in state else
                {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                 "exp_avg_sq": torch.zeros_like(p)})
            for n, p in named.items() if any(p is q for g in optimizer.param_groups for q in g["params"])}


def main(out: str) -> None:
    distributed.setup("cpu", 1)
    world, rank = distributed.world_size(), distributed.rank()
    torch.manual_seed(rank)  # each process builds its own model; process 0's is shared
    model = build_supernet("mobilenet_v2", **CONFIG)
    distributed.broadcast_from_main(list(model.state_dict().values()))
    model.change_precision(True, False)
    first = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(100)) * 2
    initialize_activation_steps(model, first[:4], selection(model, 0))
    model.train()  # the classifier's dropout on: each piece's masks from its own generator
    optimizer, _ = load_script("01train_supernet.py").phase_optimizer(model, 1e-3, 5e-6, 10)
    named = dict(model.named_parameters())
    share = Share.of(BATCH, REPLICAS, world, rank)
    cases = []
    for iteration in range(1, STEPS + 1):
        before, optimizer_before = ({k: v.clone() for k, v in model.state_dict().items()},
                                    optimizer_state(optimizer, named))
        loss, grad_norm = step(model, optimizer, iteration, share)
        loss = distributed.all_reduce_sum(loss * (share.images / share.batch))  # the global batch's mean
        cases.append({
            "iteration": iteration, "state_before": before,
            "state_after": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizer_state_before": optimizer_before,
            "optimizer_state_after": optimizer_state(optimizer, named),
            "group_lrs": [g["lr"] for g in optimizer.param_groups], "hyper": {"lr": 1e-3}, "config": CONFIG,
            "batch": {"x": batch(iteration)[0], "selection": selection(model, iteration)},
            "loss": loss.item(), "grad_norm_before_clipping": grad_norm.item(),
            "grads": {n: p.grad.clone() for n, p in named.items() if p.grad is not None},
            "parameters": list(named)})
    if distributed.is_main():
        torch.save(cases, out)
    distributed.teardown()


if __name__ == "__main__":
    main(sys.argv[1])
