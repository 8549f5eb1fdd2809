"""What follows a BatchNorm in a kernel's pass: the quantizers as the kernels take them.

A kernel that runs a BatchNorm (``train_batch_norm``, ``eval_unit``) can quantize its output in the
same pass: these functions say whether it can, and describe the quantizer to it.
"""
import torch
from torch import nn

from quant.clip import ClipActivation
from quant.functional import clip_range, lsq_scale, lsq_step
from quant.lsq import LsqActivation

from . import library as native


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward hooks: then it runs as itself, so that they fire."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def quantizer_tensors(quantizer: nn.Module | None) -> tuple:
    """What the kernels need of a unit's activation quantizer: ``clip, bin, step, hi``, the clip
    and bin of a clip quantizer that is on, or LSQ's step of each channel
    (``LsqActivation.steps``) and top level (``None`` otherwise). The kernels quantize with
    ``lsq_step`` of the step (``after_quantizer``)."""
    if isinstance(quantizer, ClipActivation) and quantizer.quantize:
        return quantizer.upper_bound, quantizer.bin, None, 0.0
    if isinstance(quantizer, LsqActivation):
        return None, None, quantizer.steps(), float(quantizer.qp)
    return None, None, None, 0.0


def lsq_step_and_scale(s: torch.Tensor, x: torch.Tensor, hi: float,
                       piece_images: int) -> tuple[torch.Tensor, float]:
    """The step LSQ quantizes a piece of ``piece_images`` images of ``x`` with (``lsq_step``) and its
    gradient scale ``k`` (``lsq_scale`` of the piece's elements), as ``quant.LsqActivation`` takes them."""
    k = lsq_scale(x[0].numel() * piece_images, hi)
    return lsq_step(s, k), k


def after_quantizer(clip: torch.Tensor | None, bin_: torch.Tensor | None,
                    step: torch.Tensor | None, hi: float) -> native.After:
    """The kernels' description of a quantizer: the tensors ``quantizer_tensors`` gave, LSQ's
    ``step`` being the value it quantizes with (``lsq_step``; kept alive by the caller while a
    kernel runs)."""
    if clip is not None:
        upper, delta = clip_range(clip, bin_)
        return native.After(kind=native.After.CLIP, upper=float(upper), delta=float(delta),
                            clip=float(clip))
    if step is not None:
        return native.After(kind=native.After.LSQ, step=native.ptr(step), lo=0.0, hi=hi)
    return native.After(kind=native.After.NONE)


def quantizes_after(quantizer: nn.Module) -> bool:
    """Whether a kernel can run ``quantizer`` in its BatchNorm's pass: a quantizer with hooks runs
    as itself (the LSQ initialisation is a forward hook)."""
    return (isinstance(quantizer, (ClipActivation, LsqActivation, nn.Identity))
            and not has_hooks(quantizer)
            and (not isinstance(quantizer, LsqActivation) or native.usable(quantizer.s)))
