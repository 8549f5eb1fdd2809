"""The k-fold split of the validation batches and top-1 accuracy on a subset of them (SPEC section 4).

Stage 2 searches one branch choice per fold: the search scores candidates on the fold, then the
winner is scored on every other batch ("full accuracy"), so fold and full sets never overlap.
"""
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


def fold_batches(num_batches: int, k: int, fold: int) -> tuple[range, list[int]]:
    """Batch indices of fold ``fold`` and of its "full" complement, as the reference splits them.

    With ``m = num_batches // k`` the fold is ``[fold*m, (fold+1)*m)``; the full set is every
    other batch, the ``num_batches - k*m`` trailing batches that belong to no fold included.
    """
    if k < 1:
        raise ValueError(f"--k must be at least 1, got {k}")
    if k > num_batches:
        raise ValueError(f"--k {k} is larger than the {num_batches} validation batches "
                         f"(every fold needs at least one batch)")
    if not 0 <= fold < k:
        raise ValueError(f"fold {fold} is out of range for --k {k} (folds are 0..{k - 1})")
    m = num_batches // k
    fold_range = range(fold * m, (fold + 1) * m)
    full = [i for i in range(num_batches) if i not in fold_range]
    return fold_range, full


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
    under ``torch.inference_mode``; putting the model in eval mode is the caller's job.
    """
    correct = total = 0
    with torch.inference_mode():
        for images, labels in _select(batches, indices):
            logits = model_fn(images)
            correct += int((logits.argmax(dim=1) == labels.to(logits.device)).sum().item())
            total += labels.numel()
    if total == 0:
        raise ValueError("no samples to score: the chosen batch indices select no data")
    return 100.0 * correct / total
