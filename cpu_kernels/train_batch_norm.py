"""BatchNorm in training on the CPU: PyTorch's values bit for bit, with faster batch statistics.

PyTorch's CPU kernel sums every channel in double, one element after the other: a chain of
dependent additions that takes most of a training-mode BatchNorm's time. ``kernels.c`` runs
the same sums in the same order for eight channels at once, so that their chains overlap; the
output, the saved statistics and the running statistics are PyTorch's bit for bit (checked once per
process against ``nn.BatchNorm2d``, which is used instead if any bit differs). A unit's BN_pre runs
with its quantizer, and BN_post with ReLU and the skip's sum, in the same pass; their backward is
one kernel too (PyTorch's formula, its sums in float lanes added up in double), while a plain
BatchNorm's backward is PyTorch's own.
"""
import ctypes

import torch
from torch import nn

from quant import ClipActivation, LsqActivation
from quant.functional import current_pieces

from . import library as native
from .after import after_quantizer, has_hooks, lsq_step_and_scale, quantizer_tensors


@native.bookkeeping
def applies(bn: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``batch_norm`` can stand in for ``bn(x)``: CPU float32 ``x`` that ``takes`` ``bn``."""
    return native.usable(x) and takes(bn, x.shape)


def takes(bn: nn.Module, shape: torch.Size | tuple[int, ...]) -> bool:
    """Whether ``batch_norm`` can stand in for ``bn`` on contiguous CPU float32 inputs of ``shape``:
    a plain BatchNorm2d in training, no hooks, and this machine's check passed. A tensor with one
    channel or one position per image is also channels-last contiguous, and PyTorch sums those in
    another order."""
    return (bn.training and type(bn) is nn.BatchNorm2d and bn.track_running_stats and bn.affine
            and len(shape) == 4 and shape[1] > 1 and shape[2] * shape[3] > 1
            and not has_hooks(bn)
            and native.usable(bn.weight, bn.bias, bn.running_mean, bn.running_var)
            and is_exact())


@native.bookkeeping
def batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor, skip: torch.Tensor | None = None,
               quantizer: nn.Module | None = None) -> torch.Tensor:
    """``bn(x)`` in training mode (``nn.BatchNorm2d.forward``'s bookkeeping included), followed in
    the same pass by ``ReLU(.) + skip`` (channel ``c`` adding channel ``c % C`` of a ``skip`` of
    ``C`` channels: an input repeated along channels) or by ``quantizer`` (``quantizes_after``).
    In a training pass in pieces (``quant.functional.in_pieces`` with ``batch_norm``) each piece is
    normalised over its own images and the first piece alone updates the running statistics, as
    ``training.pieces.one_pass`` does with PyTorch's BatchNorm."""
    bn.num_batches_tracked.add_(1)
    factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    pieces = current_pieces()
    runs = (pieces.runs(x.shape[0]) if pieces is not None and pieces.batch_norm
            else [(0, x.shape[0], x.shape[0])])
    return _BatchNormTrain.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, factor,
                                 bn.eps, tuple(runs), skip, *quantizer_tensors(quantizer))


class _BatchNormTrain(torch.autograd.Function):
    """The kernels over each run of equal pieces (at most two: an uneven last piece runs alone,
    with LSQ's step and ``k`` of its size)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                running_mean: torch.Tensor, running_var: torch.Tensor, momentum: float, eps: float,
                runs: tuple[tuple[int, int, int], ...], skip: torch.Tensor | None,
                clip: torch.Tensor | None, bin_: torch.Tensor | None, step: torch.Tensor | None,
                hi: float) -> torch.Tensor:
        _, c, h, w = x.shape
        y = torch.empty_like(x)
        saved, afters, scales, new_running = [], [], [], torch.empty(2, c)
        for start, stop, images in runs:
            k = run_step = None
            if step is not None:  # LSQ quantizes with the reference's value of its step
                run_step, k = lsq_step_and_scale(step, x, hi, images)
            if skip is None:
                after = after_quantizer(clip, bin_, run_step, hi)
            else:
                after = native.After(kind=native.After.RELU_SKIP, skip=native.ptr(skip[start:stop]),
                                     skip_channels=skip.shape[1])
            pieces = (stop - start) // images
            mean, invstd = stats = torch.empty(2, pieces, c)
            # The first run's first piece gives the running statistics' update; later runs write theirs aside.
            update = new_running if not saved else torch.empty(2, c)
            native.library().bn_train_forward(
                native.ptr(x[start:stop]), native.ptr(y[start:stop]), pieces, images, c, h * w,
                native.ptr(weight), native.ptr(bias), native.ptr(running_mean), native.ptr(running_var),
                momentum, eps, *map(native.ptr, stats),
                *map(native.ptr, update),
                ctypes.byref(after), native.threads())
            after.skip = None
            saved += [mean, invstd] + ([run_step] if run_step is not None else [])
            afters.append(after)
            scales.append(k)
        # Through PyTorch, so that the buffers' version counters move (eval_unit keys on them).
        running_mean.copy_(new_running[0])
        running_var.copy_(new_running[1])
        ctx.runs, ctx.afters, ctx.scales, ctx.eps = runs, afters, scales, eps
        ctx.clip_shape = None if clip is None else clip.shape
        ctx.skip_channels = skip.shape[1] if skip is not None else 0
        ctx.save_for_backward(x, weight, bias, *saved)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, bias, *saved = ctx.saved_tensors
        needs = ctx.needs_input_grad
        per_run = 2 if ctx.afters[0].kind != native.After.LSQ else 3
        if ctx.afters[0].kind == native.After.NONE:  # PyTorch's own backward is as fast
            grads = [torch.ops.aten.native_batch_norm_backward(
                grad[first:first + images], x[first:first + images], weight, None, None, mean[p],
                invstd[p], True, ctx.eps, list(needs[:3]))
                for (start, _, images), mean, invstd in zip(ctx.runs, saved[0::2], saved[1::2], strict=True)
                for p, first in enumerate(range(start, start + len(mean) * images, images))]
            grad_x, grad_weight, grad_bias = grads[0]
            if len(grads) > 1:
                grad_x = torch.cat([g[0] for g in grads]) if needs[0] else None
                grad_weight, grad_bias = (torch.stack([g[i] for g in grads]).sum(0) if needs[i] else None
                                          for i in (1, 2))
            return grad_x, grad_weight, grad_bias, *[None] * 10
        grad = grad.contiguous()
        _, c, h, w = x.shape
        grad_x = torch.empty_like(x)
        grad_weight, grad_bias, grad_after, grad_step = [], [], [], None
        for run, (start, stop, images) in enumerate(ctx.runs):
            mean, invstd, *run_step = saved[run * per_run:(run + 1) * per_run]
            pieces = len(mean)
            run_weight, run_bias = torch.empty(2, pieces, c)
            run_after = torch.empty(pieces, c, dtype=torch.float64)
            after = ctx.afters[run]
            after.step = native.ptr(run_step[0]) if run_step else None
            native.library().bn_train_backward(
                native.ptr(x[start:stop]), native.ptr(grad[start:stop]), native.ptr(grad_x[start:stop]),
                pieces, images, c, h * w, native.ptr(weight), native.ptr(bias), native.ptr(mean),
                native.ptr(invstd), ctypes.byref(after), native.ptr(run_weight), native.ptr(run_bias),
                native.ptr(run_after), native.threads())
            grad_weight.append(run_weight)
            grad_bias.append(run_bias)
            grad_after.append(run_after)
            if run_step:  # LSQ's step, with its gradient scale k (quant.functional.lsq_quantize)
                term = run_after.sum(0).to(weight.dtype) * ctx.scales[run]
                grad_step = term if grad_step is None else grad_step + term
        grad_weight, grad_bias = (torch.cat(g).sum(0) for g in (grad_weight, grad_bias))
        grad_skip = grad_clip = None
        if needs[8]:  # the adjoint of repeating the skip along channels
            grad_skip = grad.unflatten(1, (c // ctx.skip_channels, ctx.skip_channels)).sum(1)
        if needs[9]:  # the clip: the sum of g over the outputs above it
            grad_clip = torch.cat(grad_after).sum().to(weight.dtype).reshape(ctx.clip_shape)
        return (grad_x if needs[0] else None, grad_weight if needs[1] else None,
                grad_bias if needs[2] else None, None, None, None, None, None, grad_skip, grad_clip,
                None, grad_step if needs[11] else None, None)


# Shapes that cover whole and partial groups of eight channels, one image, two positions per image,
# and the momenta of training (0.1) and of BN re-estimation (1 / batches seen).
_CHECKED = [((4, 24, 9, 7), 0.1), ((3, 13, 5, 5), None), ((1, 8, 3, 3), 0.1), ((16, 5, 2, 1), None),
            ((2, 40, 16, 16), 0.1)]


def _matches() -> bool:
    gen = torch.Generator().manual_seed(0)
    clip, lsq = ClipActivation(2), LsqActivation(2, 1)
    clip.quantize = True
    clip.upper_bound.fill_(1.5)
    for index, (shape, momentum) in enumerate(_CHECKED):
        ours, theirs = (nn.BatchNorm2d(shape[1], momentum=momentum) for _ in range(2))
        for t in ("running_mean", "running_var", "weight", "bias"):
            value = torch.rand(shape[1], generator=gen) + 0.5
            getattr(ours, t).copy_(value)
            getattr(theirs, t).copy_(value)
        lsq.s = nn.Parameter(torch.rand(shape[1], generator=gen) + 0.1)
        for step in range(3):  # three batches: the cumulative momentum takes three values
            x = torch.randn(shape, generator=gen) * 3 + torch.randn(1, generator=gen)
            after = ("none", "relu and skip", "clip", "lsq")[(index + step) % 4]
            if after == "relu and skip":  # a skip repeated twice where the channels are even
                repeats = 2 if shape[1] % 2 == 0 else 1
                skip = torch.randn(shape[0], shape[1] // repeats, *shape[2:], generator=gen)
                y = batch_norm(ours, x, skip)
                expected = torch.relu(theirs(x)) + skip.repeat(1, repeats, 1, 1)
            else:
                quantizer = {"clip": clip, "lsq": lsq}.get(after)
                y = batch_norm(ours, x, quantizer=quantizer)
                expected = quantizer(theirs(x)) if quantizer else theirs(x)
            same = torch.equal(y, expected) and all(
                torch.equal(a, b) for a, b in zip(ours.buffers(), theirs.buffers(), strict=True))
            if not same:
                return False
    return True


is_exact = native.checked_once(
    _matches, "BASQ's training-mode BatchNorm kernel does not give PyTorch's values bit for bit on "
              "this machine; training uses PyTorch's BatchNorm.")
