"""Stage 2's prefix-sharing scorer gives the plain evaluation's logits, with less computation."""
import random

import pytest
import torch

from models import build_supernet
from utils.bn_recalibration import recalibrate_bn
from utils.evaluation import accuracy_on
from utils.pieces import evaluate_in_pieces
from utils.prefix_scorer import PrefixScorer

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trained_like(arch: str):
    """A tiny 2-bit supernet with data-set LSQ steps and BN statistics that differ per branch."""
    torch.manual_seed(0)
    model = build_supernet(arch, 10, 2, [1e-2, 1e-3, 1e-4], width_multiplier=0.25, width_divisor=8,
                           small_input_stem=True)
    model.change_precision(True, True)
    model.initialize_activation_steps(torch.randn(32, 3, 12, 12), [0] * model.num_searchable_layers)
    for branch in range(model.num_branches):  # running statistics of every branch
        model(torch.randn(32, 3, 12, 12) * (1 + branch), [branch] * model.num_searchable_layers)
    return model.eval()


def family(model, count: int, seed: int = 0) -> list[list[int]]:
    """A parent and mutated children, as the evolution breeds them: long shared prefixes."""
    rng = random.Random(seed)
    parent = [rng.randrange(model.num_branches) for _ in range(model.num_searchable_layers)]
    children = [[rng.randrange(model.num_branches) if rng.random() < 0.15 else g for g in parent]
                for _ in range(count)]
    return [parent, *children, parent]


def plain_logits(model, selection, batches, calibration, replicas=1):
    if calibration:
        recalibrate_bn(model, selection, calibration, CPU, replicas)
    with torch.no_grad():
        return torch.cat([evaluate_in_pieces(lambda x: model(x, selection), images, replicas)
                          for images, _ in batches])


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18"])
@pytest.mark.parametrize("recalibrate", [False, True])
@pytest.mark.parametrize("replicas", [1, 4])
def test_same_logits_as_the_whole_network(arch, recalibrate, replicas):
    """Over 4 replicas, batches of 7 are pieces of 2, 2, 2, 1: LSQ's k of each piece (SPEC 5a)."""
    model = trained_like(arch)
    batches = [(torch.randn(7, 3, 12, 12), torch.randint(0, 10, (7,))) for _ in range(2)]
    calibration = [(torch.randn(15, 3, 12, 12), None) for _ in range(2)] if recalibrate else []
    scorer = PrefixScorer(model, batches, calibration, CPU, replicas=replicas)
    selections = family(model, 6)
    for selection in selections:
        ours = scorer.logits(selection)
        assert torch.equal(ours, plain_logits(model, selection, batches, calibration, replicas)), selection
        assert scorer.accuracy(selection) == accuracy_on(
            lambda x, s=selection: evaluate_in_pieces(lambda p: model(p, s), x, replicas), batches)
    # Children reuse their parent's prefix, and the repeated parent only recomputes its head.
    stages = len(model.stages())
    assert scorer.computed < len(selections) * stages
    assert model.training is False


def test_recalibration_changes_the_result():
    # Guards the test above: with and without BN re-estimation the logits differ.
    model = trained_like("mobilenet_v2")
    batches = [(torch.randn(6, 3, 12, 12), torch.zeros(6, dtype=torch.long))]
    calibration = [(torch.randn(16, 3, 12, 12) * 3, None)]
    selection = family(model, 0)[0]
    plain = PrefixScorer(model, batches, [], CPU).logits(selection)
    assert not torch.allclose(plain, PrefixScorer(model, batches, calibration, CPU).logits(selection))


def test_the_cache_stays_within_its_bytes():
    model = trained_like("resnet18")
    batches = [(torch.randn(4, 3, 12, 12), torch.zeros(4, dtype=torch.long))]
    selections = family(model, 5, seed=1)
    unbounded = PrefixScorer(model, batches, [], CPU)
    for s in selections:
        unbounded.logits(s)
    stem_bytes = 4 * 4 * 12 * 12 * model.stem.conv1.out_channels  # the stem's output, float32
    small = PrefixScorer(model, batches, [], CPU, cache_bytes=stem_bytes)
    none = PrefixScorer(model, batches, [], CPU, cache_bytes=0)
    for s in selections:
        assert torch.equal(small.logits(s), unbounded.logits(s))
        none.logits(s)
        assert small.used <= stem_bytes
    stages = len(model.stages())
    assert none.computed == len(selections) * stages and not none.cache
    assert unbounded.computed < small.computed < none.computed


def test_bad_selection_and_no_batches():
    model = trained_like("resnet18")
    with pytest.raises(ValueError, match="no batches"):
        PrefixScorer(model, [], [], CPU)
    scorer = PrefixScorer(model, [(torch.randn(2, 3, 12, 12), torch.zeros(2, dtype=torch.long))], [], CPU)
    with pytest.raises(ValueError, match="searchable layers"):
        scorer.accuracy([0])
