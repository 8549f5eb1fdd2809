"""The pieces the reference's ``nn.DataParallel`` cut each batch into (SPEC 5a), and who computes them.

Over ``replicas`` devices a batch of ``B`` is cut by ``torch.chunk``: pieces of ``ceil(B / replicas)``,
the last smaller, fewer than ``replicas`` where the chunks run out. In training each piece is a
batch of its own (BatchNorm over the piece, LSQ's ``k`` from the piece, its own dropout masks):
``one_pass`` computes several pieces at once with that arithmetic. In evaluation only ``k``
depends on the piece, and it reaches the quantizers in one place, ``run_in_pieces`` (through
``quant.functional.pieces_of``), which every evaluation calls. Under torchrun with ``W`` processes,
process ``r`` computes pieces ``r*R/W ... (r+1)*R/W - 1``: one arithmetic, whatever the number of processes.
"""
import contextlib
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from quant.functional import in_pieces, pieces_of
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
    first: int = 0  # the global index of this process's first piece (its dropout masks' generator)

    @classmethod
    def of(cls, batch: int, replicas: int = 1, world: int = 1, rank: int = 0) -> "Share":
        """Process ``rank``'s pieces of a global batch of ``batch`` over ``replicas``."""
        if replicas % world:
            raise UsageError(f"--replicas {replicas} does not split over {world} processes: give a "
                             f"multiple of {world} (each process computes --replicas / {world} pieces)")
        sizes, per = piece_sizes(batch, replicas), replicas // world
        mine = sizes[rank * per:(rank + 1) * per]
        return cls(tuple(mine), sum(sizes[:rank * per]), batch, rank == 0, world, rank * per)

    @property
    def images(self) -> int:
        return sum(self.sizes)

    def bounds(self) -> list[tuple[int, int]]:
        """Each piece as ``(start, stop)`` in this process's images."""
        ends = [sum(self.sizes[:i + 1]) for i in range(len(self.sizes))]
        return [(end - size, end) for size, end in zip(self.sizes, ends, strict=True)]

    def passes(self, pieces_per_pass: int | None = None) -> list["Pass"]:
        """This process's pieces in passes of ``pieces_per_pass`` consecutive pieces (default: all
        in one pass)."""
        per = pieces_per_pass or len(self.sizes)
        if per < 1:
            raise UsageError(f"--pieces_per_pass {per}: give 1 or more (or leave it out)")
        bounds = self.bounds()
        return [Pass(self.sizes[i:i + per], bounds[i][0], bounds[min(i + per, len(bounds)) - 1][1],
                     self.first + i) for i in range(0, len(self.sizes), per)]


@dataclass(frozen=True)
class Pass:
    """Consecutive pieces of a process's share computed at once: their ``sizes``, the images
    ``start:stop`` of the share they cover, and the global index of the first (``first``)."""

    sizes: tuple[int, ...]
    start: int
    stop: int
    first: int

    @property
    def images(self) -> slice:
        return slice(self.start, self.stop)


@dataclass(frozen=True)
class Draws:
    """Where the random draws of a training step (the classifier's dropout masks) come from: a
    generator for each piece, seeded by the run's ``seed``, the ``iteration`` and the piece's index
    in the global batch. So a batch's masks do not depend on how many processes compute it or how
    its pieces are grouped into passes, and a resumed run draws the masks it would have drawn.
    (The reference drew them from each device's generator: the masks changed with the device count.)"""

    seed: int
    iteration: int

    def generator(self, piece: int, device: torch.device) -> torch.Generator:
        """The generator of global piece ``piece``, seeded through NumPy's ``SeedSequence`` (its
        spawn key keeps the seeds of different iterations and pieces apart)."""
        words = np.random.SeedSequence(self.seed, spawn_key=(self.iteration, piece)).generate_state(2)
        return torch.Generator(device).manual_seed(int(words[0]) << 31 ^ int(words[1]))


_BATCH_NORM = inspect.signature(F.batch_norm)
_DROPOUT = inspect.signature(F.dropout)


class _InPieces(TorchFunctionMode):
    """``F.batch_norm`` in training and ``F.dropout`` on each piece of a pass, whatever module calls
    them: every train-mode BatchNorm normalises a piece over its own images (the pass's first piece
    alone updates the running statistics: ``train_step`` keeps those of the global batch's first
    piece), and each piece's dropout masks come from its own generator (``Draws``)."""

    def __init__(self, sizes: Sequence[int], first: int, draws: Draws | None):
        super().__init__()
        self.sizes, self.first, self.draws = list(sizes), first, draws
        self.generators: dict[int, torch.Generator] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            return self.batch_norm(**_BATCH_NORM.bind(*args, **kwargs).arguments)
        if func is F.dropout:
            return self.dropout(**_DROPOUT.bind(*args, **kwargs).arguments)
        return func(*args, **kwargs)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.shape[0] != sum(self.sizes):
            raise ValueError(f"a layer saw {x.shape[0]} images in a pass of pieces of {self.sizes}")
        return x.split(self.sizes)

    def batch_norm(self, input, running_mean, running_var, weight=None, bias=None, training=False,
                   momentum=0.1, eps=1e-5):
        if not training or len(self.sizes) == 1:
            return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return torch.cat([F.batch_norm(piece, running_mean if i == 0 else None,
                                       running_var if i == 0 else None, weight, bias, True, momentum, eps)
                          for i, piece in enumerate(self.split(input))])

    def dropout(self, input, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return F.dropout(input, p, training, inplace)
        keep = 1 - p
        pieces = []
        for i, piece in enumerate(self.split(input)):
            mask = torch.empty_like(piece)
            if keep > 0:  # PyTorch's dropout: the mask of kept values, divided by their probability
                mask.bernoulli_(keep, generator=self.generator(self.first + i, piece.device)).div_(keep)
            else:
                mask.zero_()
            pieces.append(piece * mask)
        return torch.cat(pieces)

    def generator(self, piece: int, device: torch.device) -> torch.Generator | None:
        """Piece ``piece``'s generator, made at its first draw of the pass; ``None`` (PyTorch's
        default generator) without ``draws``."""
        if self.draws is None:
            return None
        if piece not in self.generators:
            self.generators[piece] = self.draws.generator(piece, device)
        return self.generators[piece]


@contextlib.contextmanager
def one_pass(sizes: Sequence[int], first: int = 0, draws: Draws | None = None) -> Iterator[None]:
    """Inside: a training forward of a batch of pieces of ``sizes`` images computes with the
    arithmetic of computing each piece on its own (SPEC 5a): BatchNorm and dropout per piece
    (``_InPieces``), LSQ's ``k`` of each piece (``quant.functional.in_pieces``, which a back end's
    fused BatchNorm also reads). ``first``: the global index of the first piece."""
    with in_pieces(sizes), _InPieces(sizes, first, draws):
        yield


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
