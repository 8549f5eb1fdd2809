"""One training iteration as the reference's loops run it, shared by stages 1 and 3."""
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from utils import distributed

from .pieces import Draws, Share, one_pass

MAX_GRAD_NORM = 10.0  # the reference clips the gradient norm at 10 in stages 1 and 3
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Amp:
    """``--amp bf16|fp16``: the forward pass under autocast, and for fp16 a ``GradScaler``; off
    (``None``), float32 throughout, the reference's arithmetic. The quantizers compute in float32
    whatever the autocast dtype (``quant.functional``)."""

    def __init__(self, mode: str | None, device: torch.device = torch.device("cpu")):
        if mode is not None and mode not in AMP_DTYPES:
            raise ValueError(f"amp mode {mode!r} is not one of {', '.join(AMP_DTYPES)}")
        self.mode, self.device_type = mode, device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=mode == "fp16")

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=AMP_DTYPES.get(self.mode, torch.bfloat16),
                              enabled=self.mode is not None)


FP32 = Amp(None)


def give_every_parameter_a_gradient(optimizer: torch.optim.Optimizer) -> None:
    """Zero every gradient, creating the ones that do not exist yet.

    The reference's ``optimizer.zero_grad()`` (PyTorch 1.x, under ``nn.DataParallel``) leaves every
    parameter a gradient, zero where the selection did not use it, so its optimizer steps every
    parameter at every iteration (SPEC 3): Adam keeps moving the branches that were not selected
    and applies their clips' L2 decay. Gradients left ``None`` would make PyTorch skip them.
    The existing gradients are zeroed in one ``_foreach_zero_`` (a few kernels on a GPU, where
    ``zero_grad`` of an optimizer without ``foreach``, stage 3's SGD, zeroes each of the ~1,200 alone).
    """
    grads = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                grads.append(p.grad)
    if grads:
        torch._foreach_zero_(grads)


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def statistics(model: nn.Module) -> list[torch.Tensor]:
    """Every BatchNorm's running statistics and ``num_batches_tracked``."""
    return [b for m in batch_norms(model) for b in m.buffers()]


def keep(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``tensors`` in one operation (``_foreach_copy_``; the allocations launch nothing),
    where a ``clone`` each would be ~1,400 kernels per step for the supernet's BN statistics."""
    kept = [torch.empty_like(t) for t in tensors]
    if kept:  # a model without BatchNorms keeps nothing (``_foreach_copy_`` refuses empty lists)
        torch._foreach_copy_(kept, tensors)
    return kept


def train_step(model: nn.Module, images: torch.Tensor, selection: Sequence[int],
               criterion: Callable[[torch.Tensor, slice], torch.Tensor], optimizer: torch.optim.Optimizer,
               amp: Amp = FP32, share: Share | None = None, pieces_per_pass: int | None = None,
               draws: Draws | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the reference's ``nn.DataParallel`` (SPEC 5a): forward, loss and backward of the
    pieces of ``share``, ``pieces_per_pass`` of them at once (default: all) with the arithmetic of
    one piece at a time (``one_pass``: BatchNorm, LSQ's ``k`` and dropout per piece), gradients
    accumulated over the passes, each pass's loss weighted by its share of the global batch; then
    gradient-norm clipping at 10 over every parameter and the optimizer step. Only a pass's
    activations are held at a time.

    ``images`` are this process's images (``share.images`` of them; default: one piece, the whole
    batch). ``model(images, selection)`` gives the logits and ``criterion(logits, images)`` the mean
    loss of the images at ``images[images]`` (a slice). The BatchNorm running statistics keep the
    update of the global batch's first piece alone; with a share of a batch over several processes
    (``share.world``) the gradients are summed over them and process 0's statistics are shared.
    ``draws``: where the dropout masks come from (default: PyTorch's generator). Every parameter of
    ``optimizer`` gets a gradient (``give_every_parameter_a_gradient``), so the norm is taken over
    all of them (frozen ones, at lr 0, included) as in the reference. With fp16 ``amp`` the loss is
    scaled, and the gradients unscaled before they are clipped; a step whose gradients are not
    finite is skipped by the scaler. Returns this process's logits and mean loss (detached) and
    the gradient norm before clipping, all on the device: the caller decides when to wait.
    """
    share = share or Share.of(len(images))
    if share.images != len(images):
        raise ValueError(f"{len(images)} images for a share of {share.images}")
    give_every_parameter_a_gradient(optimizer)
    kept, logits, losses = None, [], []
    for index, one in enumerate(share.passes(pieces_per_pass)):
        if index == int(share.keeps_statistics):  # the updates from here on are the other devices'
            kept = keep(statistics(model))
        with amp.autocast():
            with one_pass(one.sizes, one.first, draws):
                pass_logits = model(images[one.images], selection)
            loss = criterion(pass_logits, one.images)
        amp.scaler.scale(loss * ((one.stop - one.start) / share.batch)).backward()
        logits.append(pass_logits.detach())
        losses.append(loss.detach() * ((one.stop - one.start) / share.images))
    if kept:
        torch._foreach_copy_(statistics(model), kept)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    if share.world > 1:  # a batch over processes (stage 3's processes train archs of their own)
        distributed.all_reduce_sum_coalesced([p.grad for p in parameters])
        distributed.broadcast_from_main(statistics(model))
    amp.scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
    amp.scaler.step(optimizer)
    amp.scaler.update()
    return logits[0] if len(logits) == 1 else torch.cat(logits), torch.stack(losses).sum(), grad_norm


class DataWait:
    """The time a training loop spends waiting for its next batch: what the loaders cost the device."""

    def __init__(self):
        self.seconds, self.steps = 0.0, 0

    def __call__(self, batches: Iterable) -> Iterator:
        """``batches``, timing each ``next``."""
        batches = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                item = next(batches)
            except StopIteration:
                return
            self.seconds += time.perf_counter() - start
            self.steps += 1
            yield item

    def per_step_ms(self) -> float:
        """Milliseconds per batch since the last ``reset``."""
        return 1000.0 * self.seconds / max(self.steps, 1)

    def reset(self) -> None:
        self.seconds, self.steps = 0.0, 0


@dataclass
class Reading:
    """What ``RunningStats.read`` gives: the mean loss since the last window, the running top-1
    (percent), the meters to save, and the first iteration with a non-finite loss (0: none)."""

    loss: float
    top1: float
    meters: dict[str, float]
    nonfinite_at: int


class RunningStats:
    """Loss, top-1 and non-finite losses summed on the device, read only when asked.

    A step that reads a value off the device (``.item()``) waits for the device to finish it; here
    the training steps queue up and only a report or a checkpoint waits, once, for the sums of every
    process (``over_ranks``; stage 3's processes train archs of their own, so its sums are local).
    ``correct`` and ``seen`` (the running top-1 of a phase) carry over a resume.
    """

    def __init__(self, device: torch.device, correct: float = 0.0, seen: float = 0.0,
                 over_ranks: bool = True):
        self.device, self.over_ranks = device, over_ranks
        self.saved = (correct, seen)  # the counts up to the last resume, summed over the processes
        # loss sum and steps of the window, correct and seen since the start (this process's)
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.first_nonfinite = torch.full((), math.inf, dtype=torch.float64, device=device)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, iteration: int) -> None:
        correct = (logits.argmax(1) == labels).sum()
        self.sums += torch.stack([loss.double(), torch.ones_like(loss, dtype=torch.float64),
                                  correct.double(), torch.full_like(correct, labels.numel(),
                                                                    dtype=torch.float64)])
        at = torch.where(torch.isfinite(loss), math.inf, float(iteration)).double()
        torch.minimum(self.first_nonfinite, at, out=self.first_nonfinite)

    def new_window(self) -> None:
        """Start the next window of the mean loss."""
        self.sums[:2] = 0

    def read(self) -> Reading:
        """The sums, over every process with ``over_ranks`` (then a collective: every rank calls it at
        the same iteration)."""
        sums, first = self.sums.clone(), self.first_nonfinite.clone()
        if self.over_ranks:
            distributed.all_reduce_sum(sums)
            distributed.all_reduce_min(first)
        sums, first = sums.tolist(), first.item()
        loss_sum, steps, correct, seen = sums
        correct, seen = correct + self.saved[0], seen + self.saved[1]
        return Reading(loss=loss_sum / max(steps, 1), top1=100.0 * correct / max(seen, 1),
                       meters={"correct": correct, "seen": seen},
                       nonfinite_at=0 if math.isinf(first) else int(first))
