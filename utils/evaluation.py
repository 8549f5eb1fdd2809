"""What stages 2 and 3 share: the supernet and the validation batches its folds split, top-1 on a
subset of them, and the folds or archs spread over the processes of a torchrun job."""
import argparse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from models import Supernet

from . import distributed
from .bn_recalibration import recalibrate_bn
from .checkpoint import load_supernet
from .cli import model_config
from .data import Datasets, cache_batches, stage_datasets, val_loader
from .errors import UsageError
from .folds import Batch, fold_batches
from .logs import RunLog


@dataclass
class Evaluation:
    """The supernet a stage evaluates, on ``device``, and the validation batches in their fixed
    order (in memory when they fit, else the loader), of which ``num_batches`` are used."""

    device: torch.device
    data: Datasets
    config: dict
    model: Supernet
    batches: list[Batch] | DataLoader
    num_batches: int

    def accuracy(self, selection: Sequence[int], indices: Iterable[int],
                 calibration: Sequence[Batch] = ()) -> float:
        """Top-1 (%) of ``selection`` in eval mode on the batches at ``indices``, after re-estimating
        its BN statistics on ``calibration`` when given."""
        if calibration:
            recalibrate_bn(self.model, selection, calibration, self.device)
        self.model.eval()
        return accuracy_on(lambda x: self.model(x.to(self.device), selection), self.batches, indices)

    def check_folds(self, folds: Iterable[int], k: int) -> None:
        """Refuse a ``--k`` larger than the number of batches, or a fold outside ``0..k-1``."""
        for fold in folds:
            fold_batches(self.num_batches, k, fold)


def evaluation_setup(args: argparse.Namespace) -> Evaluation:
    """The device, data, supernet (``--supernet``, checked against the flags) and validation batches
    (``--val_batch_size``, ``--max_val_iters``) of stages 2 and 3."""
    device = distributed.setup(args.device, args.dist_timeout)
    data = stage_datasets(args)
    config = model_config(args, data.num_classes)
    model, _ = load_supernet(args.supernet, config, args.trust_pickle)
    model.to(device)
    batches, num_batches = cache_batches(val_loader(data.val, args.val_batch_size, args.workers),
                                         args.max_val_iters)
    return Evaluation(device, data, config, model, batches, num_batches)


def _select(batches: Sequence[Batch] | Iterable[Batch], indices: Iterable[int]) -> Iterator[Batch]:
    """The chosen batches: by index from a sequence, or by walking a loader once in its order."""
    wanted = sorted(set(indices))
    if not wanted:
        return
    if isinstance(batches, Sequence):
        yield from (batches[i] for i in wanted)
        return
    remaining = set(wanted)
    seen = 0
    for i, batch in enumerate(batches):
        seen = i + 1
        if i in remaining:
            remaining.discard(i)
            yield batch
            if not remaining:  # don't load the rest of the epoch
                return
    raise IndexError(f"batch index {min(remaining)} is beyond the loader's {seen} batches")


def accuracy_on(model_fn: Callable[[torch.Tensor], torch.Tensor],
                batches: Sequence[Batch] | Iterable[Batch], indices: Iterable[int]) -> float:
    """Top-1 accuracy in percent (as the reference prints it) over the batches at ``indices``.

    ``batches`` is a list of pre-loaded ``(images, labels)`` (fast when the search scores hundreds
    of candidates on the same fold) or any loader iterated in a fixed order. ``model_fn`` maps
    images to logits and is responsible for devices; labels follow the logits' device. Runs
    under ``torch.inference_mode``; putting the model in eval mode is the caller's job. The counts
    stay on the device until the end, so a GPU never waits for the host between batches.
    """
    correct, total = None, 0
    with torch.inference_mode():
        for images, labels in _select(batches, indices):
            logits = model_fn(images)
            hits = (logits.argmax(dim=1) == labels.to(logits.device)).sum()
            correct = hits if correct is None else correct + hits
            total += labels.numel()
    if total == 0:
        raise UsageError("no samples to score: the chosen batch indices select no data")
    return 100.0 * int(correct) / total


def gather_by_fold(mine: list[dict], log: RunLog, line: Callable[[dict], str]) -> dict[int, dict]:
    """Every process's records (each with its ``fold``), on every process, by fold; rank 0 logs
    those of the other ranks (it logged its own as they ended). A collective under torchrun."""
    shares = distributed.gather_objects(mine)
    for rank, share in enumerate(shares[1:], start=1):
        for record in share:
            log.info(f"{line(record)} [rank {rank}]")
    return {record["fold"]: record for share in shares for record in share}
