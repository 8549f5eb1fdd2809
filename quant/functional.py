"""The quantizers' arithmetic and autograd functions (SPEC section 1), in PyTorch.

The rounding is written once, here (``clip_codes``, ``lsq_codes``); the deployed model calls it too.
Each autograd function asks ``quant.fused`` for a back end's fused quantizers, which give the same
values bit for bit where they apply (checked against these functions), and runs PyTorch's ops
elsewhere.
"""
import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from . import fused


def clip_delta(clip: torch.Tensor, bin_: torch.Tensor) -> torch.Tensor:
    """Quantization step of the clip quantizer from the clip ``c`` and the stored ``bin`` ``b``.

    Kept as tensor arithmetic (no ``.item()``) so a GPU never waits on the host.
    """
    r = 1 - bin_
    return torch.where(r >= 1, clip, torch.where(r <= 1 / 255, clip / 255, clip * r))


@dataclass(frozen=True)
class Pieces:
    """The pieces the current forward's batch is cut into, as the reference's devices took them
    (SPEC 5a): ``sizes``, the images of each in order, or ``each``, pieces of that many images
    whatever the batch. LSQ's ``k`` counts a piece's elements; in a training pass (``batch_norm``)
    each train-mode BatchNorm also normalises a piece over its own images
    (``training.pieces.one_pass``; a back end's fused BatchNorm reads it here)."""

    sizes: tuple[int, ...] = ()
    each: int | None = None
    batch_norm: bool = False

    def runs(self, images: int) -> list[tuple[int, int, int]]:
        """The runs of equal consecutive pieces of a batch of ``images`` as ``(start, stop, piece
        images)``: all that LSQ's ``k`` depends on."""
        if self.each is not None:
            return [(0, images, self.each)]
        if images != sum(self.sizes):
            raise ValueError(f"a batch of {images} images inside pieces of {self.sizes}")
        runs, start = [], 0
        for size in self.sizes:
            if runs and runs[-1][2] == size:
                runs[-1] = (runs[-1][0], start + size, size)
            else:
                runs.append((start, start + size, size))
            start += size
        return runs


_PIECES: contextvars.ContextVar[Pieces | None] = contextvars.ContextVar("pieces", default=None)


@contextlib.contextmanager
def _pieces(pieces: Pieces | None) -> Iterator[None]:
    token = _PIECES.set(pieces)
    try:
        yield
    finally:
        _PIECES.reset(token)


def pieces_of(images: int | None) -> contextlib.AbstractContextManager[None]:
    """Inside: LSQ activation quantizers take ``k`` as if their input came in pieces of ``images``
    images; ``None``: from the whole input.

    The reference evaluated under ``nn.DataParallel``, each device on its piece of the batch; in
    evaluation a piece changes nothing but ``k`` (SPEC 5a), so a batch of equal pieces runs at once.
    """
    return _pieces(None if images is None else Pieces(each=images))


def in_pieces(sizes: Sequence[int]) -> contextlib.AbstractContextManager[None]:
    """Inside: a training pass of pieces of ``sizes`` images (``training.pieces.one_pass``): LSQ's
    ``k`` of each piece, and a back end's fused BatchNorm per piece."""
    return _pieces(Pieces(tuple(sizes), batch_norm=True))


def current_pieces() -> Pieces | None:
    """The pieces of ``pieces_of`` or ``in_pieces``, ``None`` outside them."""
    return _PIECES.get()


def piece_runs(images: int) -> list[tuple[int, int, int]]:
    """``Pieces.runs`` of the current pieces for a batch of ``images``; one run, the whole batch,
    outside ``pieces_of`` and ``in_pieces``."""
    pieces = _PIECES.get()
    return [(0, images, images)] if pieces is None else pieces.runs(images)


def lsq_scale(numel: int, hi: float) -> float:
    """LSQ's step-size gradient scale ``k = 1 / sqrt(numel * Qp)`` for a tensor of ``numel`` values."""
    return 1 / math.sqrt(numel * hi)


def lsq_step(s: torch.Tensor, k: float) -> torch.Tensor:
    """The step LSQ quantizes with: the forward value of the reference's ``grad_scale(s, k)``.

    ``(s - s*k) + s*k`` in ``s``'s dtype is not always ``s``: it differs in the last bit for a few
    per cent of channels, and ``x / a`` must round as the reference's does (SPEC section 1).
    """
    s = s.detach()
    return (s - s * k) + s * k


def values_key(*tensors: torch.Tensor) -> tuple | None:
    """What identifies the tensors' current values: their storage and in-place version (for values
    kept until their inputs change). ``None`` for inference tensors, which keep no version."""
    if any(t.is_inference() for t in tensors):
        return None
    return tuple((t.data_ptr(), t._version) for t in tensors)


def clip_range(clip: torch.Tensor, bin_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The clip quantizer's upper bound and step: ``y = round(clamp(x, 0, upper) / delta) * delta``.

    The reference gives 0 for ``c <= 0``. Handled on scalars: with ``c`` clamped at 0 every ``x``
    clamps to 0, and a step of 1 in place of 0 keeps ``0 / delta`` from being nan.
    """
    upper = clip.clamp_min(0)
    delta = clip_delta(upper, bin_)
    return upper, torch.where(delta > 0, delta, torch.ones_like(delta))


def clip_codes(x: torch.Tensor, upper: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The clip quantizer's level of each value, ``round(clamp(x, 0, upper) / delta)``, in this order
    (bit-exact rounding; SPEC section 1); a new tensor. Times ``delta``: the quantized values."""
    return torch.clamp(x, min=torch.zeros_like(upper), max=upper).div_(delta).round_()


def lsq_codes(q: torch.Tensor, lo: float, hi: float, in_place: bool = False) -> torch.Tensor:
    """LSQ's level of each value, ``round(clamp(q, lo, hi))`` of ``q = x / step``: a new tensor, or
    ``q`` itself with ``in_place`` (evaluation, where nothing else keeps ``q``). Times the step: the
    quantized values."""
    return (q.clamp_(lo, hi) if in_place else torch.clamp(q, lo, hi)).round_()


def _kernels(*tensors: torch.Tensor):
    """The back end's fused quantizers where they take these tensors, else ``None``."""
    kernels = fused.path("quantizers")
    return kernels if kernels is not None and kernels.applies(*tensors) else None


class ClipQuantize(torch.autograd.Function):
    """PACT-style clip-and-round with the reference's straight-through backward.

    ``dx = g`` where ``0 < x < c``; ``dc = sum(g)`` over ``x > c``; ``bin`` receives nothing.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, clip: torch.Tensor, bin_: torch.Tensor) -> torch.Tensor:
        upper, delta = clip_range(clip, bin_)
        ctx.kernels = kernels = _kernels(x)
        y = (kernels.clip_forward(x, float(upper), float(delta)) if kernels is not None
             else clip_codes(x, upper, delta).mul_(delta))
        ctx.save_for_backward(x, clip)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, clip = ctx.saved_tensors
        if ctx.kernels is not None:
            grad_x, grad_clip = ctx.kernels.clip_backward(x, grad, float(clip))
            grad_clip = torch.tensor(grad_clip, dtype=clip.dtype).reshape(clip.shape)
            return (grad_x if ctx.needs_input_grad[0] else None,
                    grad_clip if ctx.needs_input_grad[1] else None, None)
        grad_x = grad * ((x > 0) & (x < clip)) if ctx.needs_input_grad[0] else None
        grad_clip = None
        if ctx.needs_input_grad[1]:
            grad_clip = torch.where(x > clip, grad, 0.0).sum().reshape(clip.shape)
        return grad_x, grad_clip, None


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is in a half-precision dtype (mixed precision), else as it is: a
    quantizer divides and rounds as the reference's does, in float32, and sums its parameter's
    gradient over the whole tensor, which would overflow in float16."""
    return x.float() if x.is_floating_point() and x.element_size() < 4 else x


def clip_quantize(x: torch.Tensor, clip: torch.Tensor, bin_: torch.Tensor) -> torch.Tensor:
    """The clip quantizer, in float32 when ``x`` is in half precision (``at_least_float32``)."""
    return ClipQuantize.apply(at_least_float32(x), clip, bin_)


class LsqQuantize(torch.autograd.Function):
    """``round_pass(clamp(x / a, lo, hi)) * a`` with ``a = grad_scale(s, k)``, in one node.

    ``a`` takes the reference's forward value (``lsq_step``).

    Autograd through the composite saves five temporaries and runs a dozen kernels; this saves one
    tensor (``x`` for the fused CPU kernels, ``q = x / a`` for PyTorch's ops). Same
    gradients: ``dx = g`` where ``lo <= q <= hi``; ``ds = k * sum(g *
    (round(q) - q))`` inside the range and ``k * sum(g * clamp(q))`` outside, summed over all
    dimensions but the channel ``dim``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: torch.Tensor, lo: float, hi: float, k: float,
                dim: int) -> torch.Tensor:
        ctx.lo, ctx.hi, ctx.k, ctx.dim = lo, hi, k, dim
        a = lsq_step(s, k)
        ctx.kernels = kernels = _kernels(x, a)
        if kernels is not None:  # one pass; the backward recomputes q from x
            ctx.save_for_backward(x, a)
            return kernels.lsq_forward(x, a, lo, hi, dim)
        shape = [1] * x.dim()
        shape[dim] = -1
        a = a.view(shape)
        q = x / a
        training = any(ctx.needs_input_grad)
        if training:
            ctx.save_for_backward(q, None)
        return lsq_codes(q, lo, hi, in_place=not training).mul_(a)  # evaluation: no second tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_or_q, a = ctx.saved_tensors
        if a is not None:
            grad_x, grad_s = ctx.kernels.lsq_backward(x_or_q, a, grad, ctx.lo, ctx.hi, ctx.dim)
            return (grad_x if ctx.needs_input_grad[0] else None,
                    grad_s.to(a.dtype) * ctx.k if ctx.needs_input_grad[1] else None,
                    None, None, None, None)
        q = x_or_q
        inside = (q >= ctx.lo) & (q <= ctx.hi)
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            dims = [d for d in range(grad.dim()) if d != ctx.dim]
            r = torch.round(torch.clamp(q, ctx.lo, ctx.hi))
            grad_s = (grad * torch.where(inside, r - q, r)).sum(dims) * ctx.k
        return grad_x, grad_s, None, None, None, None


def lsq_quantize(x: torch.Tensor, s: torch.Tensor, lo: float, hi: float, dim: int,
                 numel: int | None = None) -> torch.Tensor:
    """LSQ fake quantization of ``x`` with one step per index of ``dim``, levels ``lo .. hi``; in
    float32 when ``x`` is in half precision, as ``clip_quantize``. ``k`` counts ``numel`` elements
    (default: ``x``'s)."""
    x = at_least_float32(x)
    return LsqQuantize.apply(x, s, lo, hi, lsq_scale(x.numel() if numel is None else numel, hi), dim)
