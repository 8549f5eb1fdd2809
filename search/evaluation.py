"""What stages 2 and 3 share: the supernet and the validation batches its folds split, top-1 on a
subset of them, and the folds or archs spread over the processes of a torchrun job."""
import argparse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from models import Supernet
from training.pieces import evaluate_in_pieces
from utils import distributed
from utils.checkpoint import load_supernet
from utils.cli import model_config
from utils.data import Batch, Datasets, ValidationBatches, stage_datasets, to_device
from utils.errors import UsageError
from utils.logs import RunLog

from .bn_recalibration import recalibrate_bn
from .folds import fold_batches


@dataclass
class Evaluation:
    """The supernet a stage evaluates, on ``device``, and the validation batches in their fixed
    order (``ValidationBatches``: in memory when they fit), evaluated as the reference's
    ``nn.DataParallel`` over ``replicas`` devices did (``training.pieces.evaluate_in_pieces``)."""

    device: torch.device
    data: Datasets
    config: dict
    model: Supernet
    val: ValidationBatches
    replicas: int = 1

    @property
    def num_batches(self) -> int:
        return len(self.val)

    def accuracy(self, selection: Sequence[int], batches: Iterable[Batch],
                 calibration: Sequence[Batch] = ()) -> float:
        """Top-1 (%) of ``selection`` in eval mode on ``batches`` (``val.stream(indices)``, or batches
        kept), after re-estimating its BN statistics on ``calibration`` when given."""
        if calibration:
            recalibrate_bn(self.model, selection, calibration, self.device, self.replicas)
        self.model.eval()
        return accuracy_on(lambda x: evaluate_in_pieces(lambda piece: self.model(piece, selection),
                                                        to_device(x, self.device), self.replicas), batches)

    def check_folds(self, folds: Iterable[int], k: int) -> None:
        """Refuse a ``--k`` larger than the number of batches, or a fold outside ``0..k-1``."""
        for fold in folds:
            fold_batches(self.num_batches, k, fold)


def evaluation_setup(args: argparse.Namespace) -> Evaluation:
    """The device, data, supernet (``--supernet``, checked against the flags) and validation batches
    (``--val_batch_size``, ``--max_val_iters``) of stages 2 and 3, evaluated over ``--replicas``."""
    device = distributed.setup(args.device, args.dist_timeout)
    data = stage_datasets(args)
    config = model_config(args, data.num_classes)
    model, _ = load_supernet(args.supernet, config, args.trust_pickle)
    model.to(device)
    val = ValidationBatches(data.val, args.val_batch_size, args.workers, args.max_val_iters,
                            args.val_cache_gb * 2**30)
    return Evaluation(device, data, config, model, val, args.replicas)


def accuracy_on(model_fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[Batch]) -> float:
    """Top-1 accuracy in percent (as the reference prints it) over ``batches`` of ``(images, labels)``.

    ``model_fn`` maps images to logits and is responsible for devices; labels follow the logits'
    device. Runs under ``torch.inference_mode``; putting the model in eval mode is the caller's
    job. The counts stay on the device until the end, so a GPU never waits for the host between
    batches.
    """
    correct, total = None, 0
    with torch.inference_mode():
        for images, labels in batches:
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
