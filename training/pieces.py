"""The pieces the reference's ``nn.DataParallel`` cut each batch into (SPEC 5a), and who computes them.

Over ``replicas`` devices a batch of ``B`` is cut by ``torch.chunk``: pieces of ``ceil(B / replicas)``,
the last smaller, fewer than ``replicas`` where the chunks run out. In training each piece is a
batch of its own (BatchNorm over the piece, LSQ's ``k`` from the piece); in evaluation only ``k``
depends on it, and it reaches the quantizers in one place, ``run_in_pieces`` (through
``quant.functional.pieces_of``), which every evaluation calls. Under torchrun with ``W`` processes,
process ``r`` computes pieces ``r*R/W ... (r+1)*R/W - 1``: one arithmetic, whatever the number of processes.
"""
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from quant.functional import pieces_of
from utils.errors import UsageError


def piece_sizes(batch: int, replicas: int) -> list[int]:
    """The sizes ``torch.chunk`` gives a batch of ``batch`` over ``replicas``."""
    if batch <= 0:
        return []
    size = math.ceil(batch / replicas)
    count = math.ceil(batch / size)
    return [size] * (count - 1) + [batch - size * (count - 1)]


@dataclass(frozen=True)
class Share:
    """One process's pieces of a global batch: ``sizes`` (in order, from image ``start`` of the
    global batch), the global ``batch`` size (each piece's loss weighs ``size / batch``), whether
    the process holds piece 0 (``keeps_statistics``: its first piece alone updates the BN running
    statistics) and the number of processes that share the batch (``world``)."""

    sizes: tuple[int, ...]
    start: int
    batch: int
    keeps_statistics: bool
    world: int = 1

    @classmethod
    def of(cls, batch: int, replicas: int = 1, world: int = 1, rank: int = 0) -> "Share":
        """Process ``rank``'s pieces of a global batch of ``batch`` over ``replicas``."""
        if replicas % world:
            raise UsageError(f"--replicas {replicas} does not split over {world} processes: give a "
                             f"multiple of {world} (each process computes --replicas / {world} pieces)")
        sizes, per = piece_sizes(batch, replicas), replicas // world
        mine = sizes[rank * per:(rank + 1) * per]
        return cls(tuple(mine), sum(sizes[:rank * per]), batch, rank == 0, world)

    @property
    def images(self) -> int:
        return sum(self.sizes)

    def bounds(self) -> list[tuple[int, int]]:
        """Each piece as ``(start, stop)`` in this process's images."""
        ends = [sum(self.sizes[:i + 1]) for i in range(len(self.sizes))]
        return [(end - size, end) for size, end in zip(self.sizes, ends, strict=True)]


def evaluation_groups(batch: int, replicas: int) -> list[tuple[int, int, int]]:
    """A batch's pieces as at most two runs of equal pieces, ``(start, stop, piece size)``: in
    evaluation a run of equal pieces computes at once (only ``k`` depends on the piece)."""
    sizes, groups, start = piece_sizes(batch, replicas), [], 0
    for size in sorted(set(sizes), reverse=True):
        stop = start + size * sizes.count(size)
        groups.append((start, stop, size))
        start = stop
    return groups


def run_in_pieces(run: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                  piece: int) -> torch.Tensor:
    """``run(images)`` in evaluation (or BN re-estimation) as if ``images`` came in pieces of
    ``piece`` images: LSQ's ``k`` of a piece (SPEC 5a). The one place a piece size enters the
    quantizers."""
    with pieces_of(piece):
        return run(images)


def evaluate_in_pieces(model_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                       replicas: int) -> torch.Tensor:
    """``model_fn(images)`` as the reference's evaluation under ``nn.DataParallel`` over ``replicas``
    devices computed it: each run of equal pieces at once with LSQ's ``k`` of its piece size."""
    outputs = []
    for start, stop, size in evaluation_groups(images.shape[0], replicas):
        outputs.append(run_in_pieces(model_fn, images[start:stop], size))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def smallest_bn_positions(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
                          image: torch.Tensor) -> int:
    """The fewest values per channel any BatchNorm of ``model`` sees for one image (its smallest
    feature map), from an eval-mode forward of ``image`` (``[1, C, H, W]``)."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _, args: seen.append(args[0][0, 0].numel()))
             for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            forward(image)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return min(seen)


def check_training_pieces(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
                          image: torch.Tensor, batch_size: int, dataset_size: int, replicas: int,
                          world: int = 1) -> None:
    """Refuse, before training, a ``--replicas`` that does not split over the processes, or whose
    pieces would give a BatchNorm one value per channel in training (PyTorch's error, mid-run) or
    leave a process without a piece, in the run's batches (its batch and an epoch's last, partial
    one). ``forward`` and ``image``: as ``smallest_bn_positions``."""
    Share.of(batch_size, replicas, world)
    positions = smallest_bn_positions(model, forward, image)
    last = dataset_size % batch_size if dataset_size > batch_size else 0
    for batch in sorted({min(batch_size, dataset_size)} | ({last} if last else set())):
        sizes = piece_sizes(batch, replicas)
        if min(sizes) * positions <= 1:
            raise UsageError(
                f"a batch of {batch} over --replicas {replicas} gives a piece of {min(sizes)} image"
                f"{'s' if min(sizes) > 1 else ''}, and the model's smallest feature maps have "
                f"{positions} position{'s' if positions > 1 else ''}: a BatchNorm would see one value "
                f"per channel. Give fewer --replicas (or another --batch_size)")
        if len(sizes) <= replicas - replicas // world:
            raise UsageError(
                f"a batch of {batch} over --replicas {replicas} gives {len(sizes)} pieces, which leaves "
                f"a process of {world} without one: give fewer --replicas (or another --batch_size)")
