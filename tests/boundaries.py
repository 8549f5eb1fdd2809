"""Comparing a quantized network with recorded values across CPUs: the values on a boundary.

Two kinds of value sit within float noise of a boundary, where the last bits of what computed
them decide which side they take, and one side reaches every logit of a train-mode step through
the batch's BatchNorm statistics (or the gradient norm through a ReLU):

* **A quantizer's input on a rounding boundary** (``k + 0.5`` steps) goes to the level above or
  below. Another CPU's convolution kernel (oneDNN's SSE4.1 code against AVX2/AVX-512) moves such an
  input across. Such an input is put on the other side of its boundary only when it lies within
  ``REL`` of it, relative to its value (``BoundarySides``).
* **A train-mode BatchNorm's output that is zero in exact arithmetic** (an input at its batch mean,
  weight 1, bias 0: the ReLU after it passes or blocks its gradient by the sign of a rounding
  residue). PyTorch's CPU BatchNorm computes ``y = x * alpha + beta`` with ``alpha = invstd * weight``
  and ``beta = bias - mean * alpha``; its vectorised kernels (AVX2, AVX-512) contract both into
  fused multiply-adds, its baseline kernel (``ATEN_CPU_CAPABILITY=default``, a CPU without AVX2)
  rounds each product on its own, and at such an output the two leave residues of other signs (or
  an exact 0). ``BatchNormTies`` finds these outputs and computes them as the other kernel does.

Which side the recorded values took depends on the recording machine's kernels, so a comparison
that fails may still agree once such values go the other way (``first_agreement``). Nothing else
moves.
"""
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import combinations
from typing import TypeVar

import torch
from torch import nn

from quant import ClipActivation, LsqActivation
from quant.functional import current_pieces

REL = 2e-6  # a few float32 ulps: further from a boundary than that is not a kernel's noise
MAX_RUNS = 16
EPS32 = torch.finfo(torch.float32).eps
Result = TypeVar("Result")


class BoundarySides:
    """Forward pre-hooks on every activation quantizer of ``model`` that find the inputs within
    ``REL`` of a rounding boundary (``found``: ``(call, flat index)``, in the order met) and put
    those in ``flipped`` on the other side of it (by a constant shift: the gradient passes)."""

    def __init__(self, model: nn.Module, flipped: frozenset = frozenset()):
        self.flipped, self.found, self.call = flipped, [], 0
        self.handles = [m.register_forward_pre_hook(self._hook) for m in model.modules()
                        if isinstance(m, (ClipActivation, LsqActivation))]

    def _hook(self, module: nn.Module, args: tuple) -> tuple:
        x, call = args[0], self.call
        self.call += 1
        with torch.no_grad():
            flat = x.detach().reshape(-1)
            up, down = (module.forward(t.view_as(x)).reshape(-1)
                        for t in (flat * (1 + REL), flat * (1 - REL)))
            near = (up != down).nonzero().flatten().tolist()
            self.found += [(call, i) for i in near]
            shift = torch.zeros_like(flat)
            mine = [i for c, i in self.flipped if c == call]
            if mine:  # to the side the input does not take now
                now = module.forward(x).reshape(-1)
                for i in mine:
                    shift[i] = flat[i] * (-REL if now[i] == up[i] else REL)
        return (x + shift.view_as(x),) + args[1:]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def kernel_roundings(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The train-mode output of ``bn`` on ``x`` as PyTorch's vectorised CPU kernels round it
    (``fused``: ``beta = fma(-mean, alpha, bias)``, ``y = fma(x, alpha, beta)``) and as its baseline
    kernel does (``separate``: every product rounded), both from this machine's batch statistics,
    and the bound on how far apart the two can be (float64).

    An fma is computed in float64, which holds a product of two float32 values exactly, and
    rounded once to float32 (the sum rounds twice, which differs from one rounding only for sums
    within 2^-29 of an ulp of a float32 midpoint; at an output near zero the sum cancels and is
    exact). The kernels differ by the roundings one does and the other does not: the product
    ``x * alpha``, the product ``mean * alpha`` and ``beta`` (the final rounding of ``y`` keeps its
    sign); each is at most one ulp of its value, and one ulp is at most ``EPS32`` of it, so
    ``|fused - separate| <= EPS32 * (|x alpha| + |mean alpha| + |beta|)``, and only an output within
    that of zero can take another sign under the other kernel.
    """
    x = x.detach()
    ones = torch.ones(x.shape[1], dtype=x.dtype)
    weight = ones if bn.weight is None else bn.weight.detach()
    bias = ones * 0 if bn.bias is None else bn.bias.detach()
    _, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, bn.eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    alpha = (invstd * weight).view(shape)  # one rounding in both kernels
    mean, bias = mean.view(shape), bias.view(shape)
    a, m, b, xd = alpha.double(), mean.double(), bias.double(), x.double()
    fused = (xd * a + (b - m * a).float().double()).float()
    beta = bias - mean * alpha
    separate = x * alpha + beta
    bound = EPS32 * ((xd * a).abs() + (m * a).abs() + beta.double().abs())
    return fused, separate, bound


class BatchNormTies:
    """Forward hooks on every BatchNorm of ``model`` that find, in train mode, the outputs that
    PyTorch's two CPU kernels put on different sides of zero (``kernel_roundings``: within the
    kernels' difference of zero, and of other signs; ``found``: how many) and, with ``other``,
    compute those as the kernel this machine does not run does (by a constant shift: the gradient
    passes)."""

    def __init__(self, model: nn.Module, other: bool = False):
        self.other, self.found = other, 0
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def _hook(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if not module.training:
            return None
        with torch.no_grad():
            # In a training pass of several pieces each piece has its own statistics (one_pass).
            pieces = current_pieces()
            sizes = pieces.sizes if pieces is not None and pieces.batch_norm else [len(args[0])]
            fused, separate, bound = (torch.cat(parts) for parts in zip(
                *(kernel_roundings(piece, module) for piece in args[0].split(list(sizes))), strict=True))
            now = out.detach()
            tie = (now.double().abs() <= bound) & (fused.sign() != separate.sign())
            self.found += int(tie.sum())
            if not (self.other and bool(tie.any())):
                return None
            other = torch.where(fused.sign() != now.sign(), fused, separate)
            shift = torch.where(tie, other - now, torch.zeros_like(now))
        return out + shift

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass(frozen=True)
class Sides:
    """Which values on a boundary a run puts on their other side: the quantizer inputs
    ``quantizers`` (``BoundarySides``), and with ``batch_norms`` every BatchNorm tie
    (``BatchNormTies``)."""

    quantizers: frozenset = frozenset()
    batch_norms: bool = False


@dataclass
class Found:
    """The values on a boundary that a run met: the quantizer inputs (``(call, flat index)``) and
    the number of BatchNorm ties."""

    quantizers: list = field(default_factory=list)
    batch_norm_ties: int = 0

    def alternatives(self) -> list[Sides]:
        """What to try once a comparison failed: the BatchNorm ties on their other side (where
        there are any), the quantizer inputs one and two at a time, each with the ties either way."""
        flips = [frozenset()] + [frozenset(s) for n in (1, 2)
                                 for s in combinations(self.quantizers, n)][:MAX_RUNS]
        ties = (False, True) if self.batch_norm_ties else (False,)
        return [Sides(flipped, other) for flipped in flips for other in ties][1:]

    def __str__(self) -> str:
        return (f"{len(self.quantizers)} quantizer input(s) on a rounding boundary and "
                f"{self.batch_norm_ties} BatchNorm output(s) that the CPU kernels put on other sides of 0")


@contextlib.contextmanager
def on_sides(model: nn.Module, sides: Sides = Sides(), found: Found | None = None) -> Iterator[None]:
    """Inside: ``model``'s values on a boundary on the sides ``sides`` says, those met added to
    ``found``. Hooks make the fused CPU kernels stand aside, so a plain run goes without them."""
    if sides == Sides() and found is None:
        yield
        return
    quantizers, batch_norms = BoundarySides(model, sides.quantizers), BatchNormTies(model, sides.batch_norms)
    try:
        yield
    finally:
        quantizers.remove()
        batch_norms.remove()
    if found is not None:
        found.quantizers += quantizers.found
        found.batch_norm_ties += batch_norms.found


def first_agreement(run: Callable[[Sides, Found | None], Result], agrees: Callable[[Result], bool]
                    ) -> tuple[Result, Sides | None, Found | None]:
    """``run(Sides(), None)`` where ``agrees`` with it; else ``run`` again listing the values on a
    boundary (``found``), and with each of ``found.alternatives()`` in turn: the first result that
    agrees and its sides. Where none does, the plain result and ``None``. ``run`` must start from
    the same state each time (a fresh model, fresh gradients)."""
    plain = run(Sides(), None)
    if agrees(plain):
        return plain, Sides(), None
    found = Found()
    run(Sides(), found)
    for sides in found.alternatives():
        result = run(sides, None)
        if agrees(result):
            return result, sides, found
    return plain, None, found


def agrees_up_to_boundaries(model: nn.Module, run: Callable[[], object],
                            check: Callable[[object], None]) -> None:
    """``check(run())`` (which raises ``AssertionError`` on a mismatch), and where it fails, again
    with the values on a boundary put on their other side (``first_agreement``): passes when one of
    those agrees."""
    def on(sides: Sides, found: Found | None) -> object:
        with on_sides(model, sides, found):
            return run()

    def agrees(result: object) -> bool:
        try:
            check(result)
        except AssertionError:
            return False
        return True

    plain, sides, found = first_agreement(on, agrees)
    if sides is None:
        try:
            check(plain)
        except AssertionError as failure:
            tried = len(found.alternatives())
            raise AssertionError(f"no agreement with {found} put on their other side ({tried} tried); "
                                 f"the plain comparison: {failure}") from None
