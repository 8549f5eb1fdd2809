"""The k-fold split of the validation batches (SPEC section 4).

Stage 2 searches one branch choice per fold: the search scores candidates on the fold, then the
winner is scored on every other batch ("full accuracy"), so fold and full sets never overlap.
"""
from utils.errors import UsageError


def fold_batches(num_batches: int, k: int, fold: int) -> tuple[range, list[int]]:
    """Batch indices of fold ``fold`` and of its "full" complement, as the reference splits them.

    With ``m = num_batches // k`` the fold is ``[fold*m, (fold+1)*m)``; the full set is every
    other batch, the ``num_batches - k*m`` trailing batches that belong to no fold included.
    """
    if k < 1:
        raise UsageError(f"--k must be at least 1, got {k}")
    if k > num_batches:
        raise UsageError(f"--k {k} is larger than the {num_batches} validation batches "
                         f"(every fold needs at least one batch)")
    if not 0 <= fold < k:
        raise UsageError(f"fold {fold} is out of range for --k {k} (folds are 0..{k - 1})")
    m = num_batches // k
    fold_range = range(fold * m, (fold + 1) * m)
    full = [i for i in range(num_batches) if i not in fold_range]
    return fold_range, full
