"""The pieces of the reference's ``nn.DataParallel`` (SPEC 5a): their sizes, each process's share,
evaluation with LSQ's ``k`` of the piece, and the batches refused before a run."""
import math

import pytest
import torch

from models import build_supernet
from quant import LsqActivation
from quant.functional import lsq_scale, lsq_step
from training.pieces import Share, check_training_pieces, evaluate_in_pieces, piece_sizes
from utils.errors import UsageError

from .test_prefix_scorer import trained_like


def test_piece_sizes_are_torch_chunks():
    for batch in range(1, 40):
        for replicas in range(1, 10):
            expected = [len(c) for c in torch.chunk(torch.arange(batch), replicas)]
            assert piece_sizes(batch, replicas) == expected, (batch, replicas)


def test_each_process_takes_its_run_of_pieces():
    assert piece_sizes(9, 4) == [3, 3, 3]  # fewer pieces than devices
    shares = [Share.of(9, 4, 2, r) for r in (0, 1)]
    assert [(s.sizes, s.start, s.keeps_statistics, s.world) for s in shares] == [((3, 3), 0, True, 2),
                                                                               ((3,), 6, False, 2)]
    assert Share.of(768, 8, 4, 3).sizes == (96, 96) and Share.of(768, 8, 4, 3).start == 576
    assert Share.of(10, 3).bounds() == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(UsageError, match="--replicas 6 does not split over 4 processes"):
        Share.of(768, 6, 4, 0)


def test_evaluation_gives_the_values_of_a_piece_by_piece_evaluation(kernels):
    """Each run of equal pieces at once, LSQ's ``k`` from its piece: bit for bit the values of
    evaluating each piece on its own (the fused kernels' too), uneven last piece included; on
    inputs where the piece's ``k`` changes the values (``check_k_of_the_piece``)."""
    model = trained_like("mobilenet_v2")
    selection = [i % 3 for i in range(model.num_searchable_layers)]
    x = torch.randn(10, 3, 12, 12)
    with torch.no_grad():
        # Pieces of 3, 3, 3, 1; 4, 4, 2; five of 2. (Not ten of 1: a convolution of one image takes
        # other kernels than one of ten, with other float noise, whatever the quantizers do.)
        for replicas in (4, 3, 5):
            by_piece = torch.cat([model(piece, selection) for piece in torch.chunk(x, replicas)])
            assert torch.equal(evaluate_in_pieces(lambda p: model(p, selection), x, replicas), by_piece)
    check_k_of_the_piece(model, selection, x, replicas=5)


def check_k_of_the_piece(model, selection: list[int], x: torch.Tensor, replicas: int) -> None:
    """``evaluate_in_pieces`` over ``replicas`` equal pieces gives a piece-by-piece evaluation's
    values where the piece's ``k`` and the whole batch's give other values: the first LSQ
    quantizer (``feature.2``'s expand unit, its BN_pre made an exact identity) is given inputs
    halfway between its rounding points with the two steps, in every position and channel."""
    piece = piece_sizes(len(x), replicas)[0]
    assert piece * replicas == len(x), "equal pieces: one run, one k"
    block = model.feature[2]
    bn_pre, lsq = block.bn_qconv_bn_relu_0[0], block.bn_qconv_bn_relu_0[1]
    with torch.no_grad():
        positions = model.feature[1](model.feature[0](x[:1]), selection[0])[0, 0].numel()
        bn_pre.eps = 0.0
        for buffer, value in ((bn_pre.running_mean, 0), (bn_pre.running_var, 1), (bn_pre.weight, 1),
                              (bn_pre.bias, 0)):
            buffer.fill_(value)
        lsq.s.copy_(steps_that_tell_pieces_apart(lsq.s.numel(), lsq.qp, len(x), piece, positions))
        a_piece, a_whole = (lsq_step(lsq.s, lsq_scale(n * lsq.s.numel() * positions, lsq.qp)).double()
                            for n in (piece, len(x)))
        side = int(math.isqrt(positions))
        levels = 1 + torch.arange(lsq.s.numel() * positions, dtype=torch.float64).remainder(lsq.qp - 1)
        middle = ((a_piece + a_whole) / 2).view(1, -1, 1, 1)
        halfway = ((levels.view(1, -1, side, side) + 0.5) * middle).float()
    hook = block.register_forward_pre_hook(
        lambda _, args: (halfway.expand_as(args[0]).contiguous(), *args[1:]))
    try:
        with torch.no_grad():
            by_piece = torch.cat([model(p, selection) for p in torch.chunk(x, replicas)])
            assert torch.equal(evaluate_in_pieces(lambda p: model(p, selection), x, replicas),
                               by_piece), "not the values of a piece-by-piece evaluation"
            assert not torch.equal(model(x, selection), by_piece), "these inputs do not tell the k apart"
    finally:
        hook.remove()


def test_batches_a_batchnorm_cannot_normalise_are_refused():
    model = build_supernet("mobilenet_v2", 10, 2, [0.01, 0.001], width_multiplier=0.25, width_divisor=8)
    image = torch.zeros(1, 3, 32, 32)  # 1 x 1 feature maps at the end

    def check(batch, size, replicas, world=1):
        check_training_pieces(model, lambda x: model(x, [0] * model.num_searchable_layers), image, batch,
                              size, replicas, world)

    check(16, 96, 8)  # pieces of 2
    with pytest.raises(UsageError, match="a batch of 4 over --replicas 8 gives a piece of 1 image"):
        check(16, 100, 8)  # the epoch's last batch, 100 % 16 = 4: pieces of 1
    with pytest.raises(UsageError, match="batch of 8 over --replicas 8 gives a piece of 1 image.*--replicas"):
        check(8, 96, 8)
    check(8, 32, 4)
    with pytest.raises(UsageError, match="a batch of 12 over --replicas 8 gives 6 pieces, which leaves a "
                                         "process of 4 without one"):
        check(12, 96, 8, world=4)
    assert model.training  # the check's eval-mode forward leaves the mode as it was


def halfway_inputs(s: torch.Tensor, qp: int, images: int, piece: int) -> torch.Tensor:
    """``[images, C, 4, 4]`` inputs between LSQ's rounding points with a piece's ``k`` and with the
    whole batch's: where the two steps differ in their last bits, they round to other levels."""
    a_piece, a_whole = (lsq_step(s, lsq_scale(n * s.numel() * 16, qp)).double().view(1, -1, 1, 1)
                        for n in (piece, images))
    levels = 1 + torch.arange(images * 16, dtype=torch.float64).remainder(qp - 1).view(images, 1, 4, 4)
    return ((levels + 0.5) * (a_piece + a_whole) / 2).float()


def steps_that_tell_pieces_apart(channels: int, qp: int, images: int, piece: int,
                                 positions: int = 16) -> torch.Tensor:
    """LSQ steps whose value with a piece's ``k`` differs from that with the whole batch's (about
    one in two thousand at these sizes), for ``[images, channels, *positions]`` inputs."""
    candidates = torch.rand(2**20, generator=torch.Generator().manual_seed(0)) * 3 + 0.05
    a_piece, a_whole = (lsq_step(candidates, lsq_scale(n * channels * positions, qp))
                        for n in (piece, images))
    return candidates[a_piece != a_whole][:channels]


def test_a_quantizer_takes_k_from_its_piece(kernels):
    """The LSQ activation quantizer (its fused kernel and PyTorch's ops) inside ``pieces_of``: the
    values of quantizing each piece on its own, and not those of the whole batch's ``k``."""
    from quant.functional import pieces_of

    lsq = LsqActivation(2, 64)
    with torch.no_grad():
        lsq.s.copy_(steps_that_tell_pieces_apart(64, lsq.qp, 12, 3))
        x = halfway_inputs(lsq.s, lsq.qp, 12, 3)
        with pieces_of(3):
            ours = lsq(x)
        assert torch.equal(ours, torch.cat([lsq(piece) for piece in torch.chunk(x, 4)]))
        assert not torch.equal(ours, lsq(x))


def test_the_fused_evaluation_unit_takes_k_from_its_piece():
    """``cpu_kernels.eval_unit.unit`` (one kernel for BN_pre and the quantizer) inside ``pieces_of``:
    the values of PyTorch's ops with the piece's ``k``, which differ from the whole batch's."""
    from cpu_kernels import eval_unit
    from models.skip import FlexibleSkip
    from models.units import unit_forward
    from quant import QConv, fused
    from quant.functional import pieces_of

    from .conftest import require_exact

    require_exact(lambda: eval_unit.is_exact(),
                  "this machine's PyTorch rounds BatchNorm otherwise: evaluation runs PyTorch's ops")
    torch.manual_seed(0)
    channels = 32
    quantizer, conv = LsqActivation(2, channels), QConv(channels, channels, 1, 2, 1, 1)
    conv.quantize_weights = True
    bn_pre, bn_post, bn_last = (torch.nn.BatchNorm2d(channels, eps=0.0).eval() for _ in range(3))
    with torch.no_grad():  # BN_pre passes its input on unchanged: the quantizer sees the halfway inputs
        quantizer.s.copy_(steps_that_tell_pieces_apart(channels, quantizer.qp, 12, 3))
        for bn in (bn_post, bn_last):
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 2.0)
        x = halfway_inputs(quantizer.s, quantizer.qp, 12, 3)
        parts = (bn_pre, quantizer, conv, bn_post, FlexibleSkip(channels, channels, 1), bn_last)
        with pieces_of(3):
            fused_unit = eval_unit.unit(x, *parts)
            with fused.pytorch_only():  # the model's own formula
                assert torch.equal(fused_unit, unit_forward(x, *parts))
        assert not torch.equal(fused_unit, eval_unit.unit(x, *parts))


def test_dropout_masks_depend_on_the_seed_iteration_and_global_piece_only():
    """``one_pass``'s dropout: a piece's mask is that of its generator (``Draws``), the same in any
    pass that holds the piece, and another for another seed, iteration or piece."""
    from training.pieces import Draws, one_pass

    x = torch.ones(8, 64)

    def masks(sizes, first, seed=0, iteration=1):
        with one_pass(sizes, first, Draws(seed, iteration)):
            return torch.nn.functional.dropout(x[:sum(sizes)], 0.5, training=True)

    together = masks([2, 2, 2, 2], 0)
    assert torch.equal(torch.cat([masks([2], i) for i in range(4)]), together)
    assert torch.equal(masks([2, 2], 2), together[4:])
    assert set(together.unique().tolist()) == {0.0, 2.0}  # kept values scaled by 1 / (1 - p)
    four = [2, 2, 2, 2]
    for other in (masks(four, 0, seed=1), masks(four, 0, iteration=2), masks(four, 1)):
        assert not torch.equal(other, together)
    for a, b in ((0, 2), (2, 4), (4, 6)):  # the pieces of one pass draw different masks
        assert not torch.equal(together[a:b], together[b:b + 2])


def test_pieces_per_pass_fit_the_memory_a_measured_step_leaves(monkeypatch):
    """``training.memory.pieces_per_pass``: the flag where given; else from the trial passes' peaks
    (here a step that makes 4,000 bytes per image and 10,000 per step) and the host's memory shared
    by the run's processes on it: ``(0.9 * free - per step) // (per image * piece)`` pieces, at
    least 1 and at most the process's."""
    from training import memory

    def trial(images):
        a, b = torch.empty(images * 1000), torch.empty(2500)  # noqa: F841 (held to the end: the peak)

    cpu = torch.device("cpu")
    monkeypatch.setattr(memory, "host_available", lambda: 10**6)
    assert memory.pieces_per_pass(None, 8, 100, cpu, trial)[0] == (0.9 * 10**6 - 10_000) // 400_000 == 2
    assert memory.pieces_per_pass(3, 8, 100, cpu, trial) == (3, "3 of 8 pieces per pass (--pieces_per_pass)")
    assert memory.pieces_per_pass(None, 8, 10, cpu, trial)[0] == 8  # all fit
    assert memory.pieces_per_pass(None, 8, 10**4, cpu, trial)[0] == 1  # not even one: the least there is
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert memory.pieces_per_pass(None, 8, 100, cpu, trial)[0] == (0.45 * 10**6 - 10_000) // 400_000 == 1
