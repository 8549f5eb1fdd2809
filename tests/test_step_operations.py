"""A training step's bookkeeping (the running statistics kept around the pieces, the gradients
zeroed) is a few operations, not one per tensor."""
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from models import build_supernet
from training.pieces import Share
from training.step import statistics, train_step

PER_TENSOR = ("aten.clone", "aten.copy_", "aten.zero_", "aten.zeros_like")


class Operations(TorchDispatchMode):
    """Counts the operations dispatched while it is active, by name."""

    def __init__(self):
        super().__init__()
        self.count = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_step_keeps_statistics_and_zeroes_gradients_in_a_few_operations(optimizer):
    """Four pieces of the supernet (7 branches: ~1,400 statistics tensors, ~1,300 parameters): the
    step, a piece a pass, dispatches no more clones, copies or zeroings, one tensor at a time, than
    its pieces' forwards and backwards do by themselves; its bookkeeping is two ``_foreach_copy_``
    (the first piece's statistics kept and put back) and one ``_foreach_zero_``; in one pass, the
    zeroing alone. The per-tensor version (a
    ``clone`` and a ``copy_`` per statistics tensor, stage 3's SGD zeroing each gradient alone)
    dispatched ~4,000 of them."""
    torch.manual_seed(0)
    model = build_supernet("mobilenet_v2", 10, 2, [1e-2, 5e-3, 1e-3, 5e-4, 1e-4, 5e-5, 1e-5],
                           width_multiplier=0.25, width_divisor=8)
    model.change_precision(True, True)
    model.train()
    params = list(model.parameters())
    opt = (torch.optim.Adam(params, lr=1e-4, foreach=True) if optimizer == "adam"
           else torch.optim.SGD(params, lr=1e-4, momentum=0.9, nesterov=True))
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    selection = [1] * model.num_searchable_layers
    share = Share.of(16, 4)

    def criterion(logits, piece):
        return F.cross_entropy(logits, y[piece])

    train_step(model, x, selection, criterion, opt, share=share)  # gradients and state exist
    with Operations() as step:  # one piece a pass: the first piece's statistics kept, put back
        train_step(model, x, selection, criterion, opt, share=share, pieces_per_pass=1)
    with Operations() as one_pass:  # all in one pass: only the first piece updates them
        train_step(model, x, selection, criterion, opt, share=share)
    with Operations() as pieces:
        for start, stop in share.bounds():
            (criterion(model(x[start:stop], selection), slice(start, stop)) * (stop - start) / 16).backward()
    with Operations() as update:
        opt.step()
    assert len(statistics(model)) > 1000 and len(params) > 1000
    for name in PER_TENSOR:
        assert step.count[name] <= pieces.count[name] + update.count[name], name
    assert step.count["aten._foreach_copy_"] == 2 and step.count["aten._foreach_zero_"] == 1
    assert one_pass.count["aten._foreach_copy_"] == 0 and one_pass.count["aten._foreach_zero_"] == 1
