"""The k-fold split of stage 2 and top-1 accuracy on batches."""
import pytest
import torch

from search.evaluation import accuracy_on
from search.folds import fold_batches
from utils.errors import UsageError


@pytest.mark.parametrize("num_batches, k, fold, expected_fold, expected_full", [
    (10, 5, 0, range(2), list(range(2, 10))),
    (10, 5, 4, range(8, 10), list(range(8))),
    (7, 3, 1, range(2, 4), [0, 1, 4, 5, 6]),  # batch 6 is trailing: in no fold, always in full
    (7, 3, 2, range(4, 6), [0, 1, 2, 3, 6]),
    (250, 10, 9, range(225, 250), list(range(225))),  # ImageNet val, batch 200
    (5, 1, 0, range(5), []),
    (5, 5, 3, range(3, 4), [0, 1, 2, 4]),
])
def test_fold_batches_examples(num_batches, k, fold, expected_fold, expected_full):
    assert fold_batches(num_batches, k, fold) == (expected_fold, expected_full)


@pytest.mark.parametrize("num_batches, k", [(10, 3), (250, 10), (255, 10), (7, 7), (13, 4), (1, 1)])
def test_folds_are_equal_disjoint_and_complemented(num_batches, k):
    m = num_batches // k
    folds = []
    for fold in range(k):
        fold_range, full = fold_batches(num_batches, k, fold)
        assert len(fold_range) == m
        assert sorted([*fold_range, *full]) == list(range(num_batches))
        assert full == sorted(full)
        assert set(range(k * m, num_batches)) <= set(full)  # trailing batches in every full set
        folds.extend(fold_range)
    assert folds == list(range(k * m))


def test_k_larger_than_batches_names_the_flag_and_the_count():
    with pytest.raises(UsageError, match=r"--k 10 is larger than the 7 validation batches"):
        fold_batches(7, 10, 0)


@pytest.mark.parametrize("k", [0, -1])
def test_k_below_one_is_refused(k):
    with pytest.raises(UsageError, match=r"--k must be at least 1"):
        fold_batches(10, k, 0)


@pytest.mark.parametrize("fold", [-1, 5, 6])
def test_fold_out_of_range_is_refused(fold):
    with pytest.raises(UsageError, match=rf"fold {fold} is out of range for --k 5"):
        fold_batches(10, 5, fold)


def _fake_model(images: torch.Tensor) -> torch.Tensor:
    """Predicts class ``images[:, 0]`` out of 3, and checks it runs without autograd."""
    assert torch.is_inference_mode_enabled()
    return torch.nn.functional.one_hot(images[:, 0].long(), 3).float()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four batches; predictions are right on 2/2, 1/2, 0/2 and 3/4 samples."""
    def batch(preds, labels):
        return torch.tensor(preds, dtype=torch.float32)[:, None].repeat(1, 5), torch.tensor(labels)
    return [batch([0, 1], [0, 1]), batch([2, 2], [2, 0]), batch([1, 0], [0, 1]),
            batch([0, 1, 2, 2], [0, 1, 2, 1])]


@pytest.mark.parametrize("indices, expected", [
    ([0], 100.0), ([2], 0.0), ([0, 1], 75.0), ([1, 3], 4 / 6 * 100), (range(4), 6 / 10 * 100),
])
def test_accuracy_on_batches(indices, expected):
    batches = _batches()
    assert accuracy_on(_fake_model, [batches[i] for i in indices]) == pytest.approx(expected)
    assert accuracy_on(_fake_model, (batches[i] for i in indices)) == pytest.approx(expected)  # a stream


def test_accuracy_on_no_batches_is_a_user_error():
    with pytest.raises(UsageError, match=r"no samples"):
        accuracy_on(_fake_model, [])
