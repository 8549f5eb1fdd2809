"""Stage 2's prefix-sharing scorer gives the plain evaluation's logits, with less computation."""
import random

import pytest
import torch

from models import build_supernet
from search import prefix_scorer
from search.bn_recalibration import recalibrate_bn
from search.evaluation import accuracy_on
from search.prefix_scorer import PrefixScorer
from training.pieces import evaluate_in_pieces

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


@pytest.mark.parametrize("recalibrate", [False, True])
def test_chunks_give_the_logits_of_the_whole_fold_at_once(recalibrate):
    """A fold computed chunk after chunk (the GPU has no room for all of it) scores exactly as at once,
    from a cache that holds entries per chunk."""
    model = trained_like("mobilenet_v2")
    batches = [(torch.randn(6, 3, 12, 12), torch.randint(0, 10, (6,))) for _ in range(5)]
    calibration = [(torch.randn(16, 3, 12, 12), None)] if recalibrate else []
    whole = PrefixScorer(model, batches, calibration, CPU)
    chunked = {chunk: PrefixScorer(model, batches, calibration, CPU, chunk=chunk) for chunk in (1, 2, 5)}
    assert [len(s.chunks) for s in chunked.values()] == [5, 3, 1]
    for selection in family(model, 4, seed=2):
        expected = whole.logits(selection)
        for scorer in chunked.values():
            assert torch.equal(scorer.logits(selection), expected)
            assert scorer.accuracy(selection) == whole.accuracy(selection)
    assert chunked[2].computed == 3 * chunked[5].computed  # the same prefixes reused, in each chunk
    assert {key[0] for key in chunked[2].cache} == {0, 1, 2}


@pytest.mark.parametrize("replicas", [3, 4])
def test_chunks_over_replicas_give_the_evaluation_in_pieces(replicas):
    """Chunks and pieces together: batches of 7 and 5 over 3 or 4 replicas (pieces of 3, 3, 1 and
    2, 2, 1; 2, 2, 2, 1 and 2, 2, 1), each run of equal pieces with its own k, chunk after chunk."""
    model = trained_like("mobilenet_v2")
    batches = [(torch.randn(n, 3, 12, 12), torch.randint(0, 10, (n,))) for n in (7, 5, 7)]
    calibration = [(torch.randn(6, 3, 12, 12), None)]
    for selection in family(model, 3, seed=3):
        expected = plain_logits(model, selection, batches, calibration, replicas)
        for chunk in (0, 1, 2):
            scorer = PrefixScorer(model, batches, calibration, CPU, chunk=chunk, replicas=replicas)
            assert torch.equal(scorer.logits(selection), expected), (chunk, selection)


def test_bytes_per_image_is_the_image_and_the_two_largest_consecutive_stage_outputs(monkeypatch):
    model = trained_like("mobilenet_v2")
    outputs = [3 * 12 * 12 * 4]  # the image as float32
    x = torch.zeros(1, 3, 12, 12)
    for stage in model.stages():  # each stage's output for one image
        x = stage.run(x, [0] * stage.genes)
        outputs.append(x.numel() * 4)
    expected = outputs[0] + max(outputs[i] + outputs[i + 1] for i in range(len(outputs) - 1))
    assert prefix_scorer.bytes_per_image(model, (3, 12, 12), CPU) == expected
    assert model.training is False


def fake_gpu(monkeypatch, free: float) -> torch.device:
    """A GPU with ``free`` bytes (the CUDA memory query mocked); the scorer's probe runs on the CPU."""
    real = prefix_scorer.bytes_per_image
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(free), 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
    monkeypatch.setattr(prefix_scorer, "bytes_per_image",
                        lambda model, shape, device: real(model, shape, CPU))
    return torch.device("cuda", 0)


def test_the_room_check_counts_everything_the_scorer_keeps(monkeypatch):
    """The fold (uint8), its images as float32 and two stage outputs, the calibration batches' alike,
    and the cache, within 90 % of the free memory: all at once when they fit, else as many batches
    as fit, at least one."""
    model = trained_like("mobilenet_v2")
    batches = [(torch.zeros(6, 3, 12, 12, dtype=torch.uint8), torch.zeros(6, dtype=torch.long))
               for _ in range(10)]
    calibration = [(torch.zeros(4, 3, 12, 12, dtype=torch.uint8), None)]
    per_image, cache = prefix_scorer.bytes_per_image(model, (3, 12, 12), CPU), 10_000
    whole = 60 * (3 * 12 * 12 + per_image) + 4 * per_image + cache

    def chunk(free: float) -> int:
        return prefix_scorer.fold_chunk(model, batches, calibration, fake_gpu(monkeypatch, free), cache)

    assert chunk(whole / 0.9 + 1) == 0  # everything fits: the fold moves to the GPU
    assert chunk(whole / 0.9 - 1) == 10  # not the uint8 fold too: all at once, from the host
    three = 3 * 6 * per_image + 4 * per_image + cache
    assert chunk(three / 0.9 + 1) == 3 and chunk(three / 0.9 - 1) == 2
    assert chunk(0) == 1  # no room at all: one batch at a time (and a clear message if it fails)
    assert prefix_scorer.fold_chunk(model, batches, calibration, CPU, cache) == 0  # the CPU: at once


def test_on_device_scores_a_fold_too_large_for_the_gpu_in_chunks(monkeypatch):
    model = trained_like("resnet18")
    batches = [(torch.randn(6, 3, 12, 12), torch.randint(0, 10, (6,))) for _ in range(4)]
    per_image = prefix_scorer.bytes_per_image(model, (3, 12, 12), CPU)
    device = fake_gpu(monkeypatch, (2 * 6 * per_image + 100) / 0.9 + 10)  # room for two batches
    assert prefix_scorer.fold_chunk(model, batches, [], device, 100) == 2
    scorer = PrefixScorer(model, batches, [], CPU, 100, chunk=2)  # what on_device builds, on the CPU
    selection = family(model, 0)[0]
    assert torch.equal(scorer.logits(selection), PrefixScorer(model, batches, [], CPU).logits(selection))
