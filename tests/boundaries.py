"""Comparing a quantized network with recorded values across CPUs: the values on a boundary.

Three kinds of value sit within float noise of a boundary, where the last bits of what computed
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
* **A ReLU input that is zero in exact arithmetic**: a quantized convolution's outputs are sums
  of products of levels, so an output can equal its channel's batch mean exactly, and the unit's
  BN_post maps it to a residue of the convolution's rounding, which another CPU's kernel (oneDNN's
  SSE4.1 code) sums in another order. No emulation gives the other machine's residue; but the
  gradient is linear in the ReLU's gates there, so ``ReluTies`` sets each such gate open or closed
  and measures what each open one adds to its unit's parameters' gradients (``relu_contributions``),
  and ``gates_closest_to`` picks the gates whose gradients come closest to the recorded ones.

Which side the recorded values took depends on the recording machine's kernels, so a comparison
that fails may still agree once such values go the other way (``first_agreement``). Nothing else
moves.
"""
import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import combinations
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from quant import ClipActivation, LsqActivation, QConv
from quant.functional import current_pieces

REL = 2e-6  # a few float32 ulps: further from a boundary than that is not a kernel's noise
MAX_RUNS = 16
MAX_SHARED_TIES = 16  # ReLU ties reaching the same parameters: every gate of up to 2^16 tried at once
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


def piece_sizes(images: int) -> list[int]:
    """The images of each piece a train-mode BatchNorm normalises on its own in the current pass
    (``training.pieces.one_pass``): the pass's pieces, or one piece of ``images``."""
    pieces = current_pieces()
    return list(pieces.sizes) if pieces is not None and pieces.batch_norm else [images]


def batch_terms(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``alpha = invstd * weight`` (one rounding in both of PyTorch's CPU kernels), the batch mean
    and the bias of ``bn``'s train-mode pass over ``x`` (this machine's statistics), shaped to
    broadcast over ``x``."""
    ones = torch.ones(x.shape[1], dtype=x.dtype)
    weight = ones if bn.weight is None else bn.weight.detach()
    bias = ones * 0 if bn.bias is None else bn.bias.detach()
    _, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, bn.eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (invstd * weight).view(shape), mean.view(shape), bias.view(shape)


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
    alpha, mean, bias = batch_terms(x, bn)
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
            fused, separate, bound = (torch.cat(parts) for parts in zip(
                *(kernel_roundings(piece, module) for piece in args[0].split(piece_sizes(len(args[0])))),
                strict=True))
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


def relu_tie_bound(z: torch.Tensor, terms: torch.Tensor, k: int, bn: nn.modules.batchnorm._BatchNorm,
                   y: torch.Tensor) -> torch.Tensor:
    """How far from ``y = bn(z)`` (train mode, one piece, this machine's value) another CPU's
    kernels can put it (float64), ``z`` a convolution's output whose ``k`` products per output sum
    in magnitude to ``terms``; only an output within this of zero can take the other side of the
    ReLU after it.

    Rounding errors that do not conspire grow as the square root of their number (as
    ``bench.step_compare.RHO``'s): another order of the convolution's sum moves an output by about
    ``sqrt(k) EPS32 terms`` at most, the batch mean by the mean of those plus ``sqrt(M) EPS32`` of
    the mean magnitude over its ``M`` values; times ``|alpha|`` (``invstd * weight``). The
    BatchNorm's own arithmetic adds the roundings of ``kernel_roundings`` (``EPS32 (|z alpha| +
    |mean alpha| + |beta|)``), and ``alpha``, from a mean of ``M`` squares, is off by about
    ``sqrt(M) EPS32`` of itself, which moves ``y - bias`` in proportion. Measured in
    ``dataparallel_4bit.pt``'s ``stage1_phase2_step``: its ties (zero in exact arithmetic) within
    0.08 of the bound under SSE4.1, AVX2 or AVX-512, every other output beyond 3.5 times it.
    """
    z = z.detach()
    alpha, mean, bias = (t.double() for t in batch_terms(z, bn))
    dims = [0] + list(range(2, z.dim()))
    zd, m = z.double(), z.numel() // z.shape[1]
    conv = math.sqrt(k) * EPS32 * terms.double()
    shift = conv.mean(dims, keepdim=True) + math.sqrt(m) * EPS32 * zd.abs().mean(dims, keepdim=True)
    beta = bias - mean * alpha
    return (alpha.abs() * (conv + shift) + EPS32 * ((zd * alpha).abs() + (mean * alpha).abs() + beta.abs())
            + math.sqrt(m) * EPS32 * (y.detach().double() - bias).abs())


@dataclass
class _OpenTies:
    """What the contributions of one BN_post call's open ties need: the convolution and its input,
    the values of its and the BatchNorm's parameters in that forward, the pieces, the open ties,
    and (once the backward has run) the gradient that reached the ReLU."""

    call: int
    ties: list[int]
    conv: nn.Module
    conv_name: str
    x: torch.Tensor
    conv_values: dict[str, torch.Tensor]
    bn: nn.Module
    bn_name: str
    bn_values: tuple[torch.Tensor, torch.Tensor]
    sizes: list[int]
    grad: torch.Tensor | None = None

    def contributions(self) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
        """Each open tie's gradient through its piece's BN_post and convolution: the piece replayed
        by PyTorch's ops from the kept values, its backward from that one element's gradient."""
        if self.grad is None:
            return {}
        conv_leaves = {n: v.clone().requires_grad_() for n, v in self.conv_values.items()}
        weight, bias = (v.clone().requires_grad_() for v in self.bn_values)
        leaves = [*conv_leaves.values(), weight, bias]
        names = ([f"{self.conv_name}.{n}" for n in conv_leaves]
                 + [f"{self.bn_name}.weight", f"{self.bn_name}.bias"])
        per_image = self.grad[0].numel()
        out, start = {}, 0
        for size in self.sizes:
            stop = start + size
            mine = [i for i in self.ties if start * per_image <= i < stop * per_image]
            if mine:
                with torch.enable_grad():
                    z = torch.func.functional_call(self.conv, conv_leaves, (self.x[start:stop],))
                    y = F.batch_norm(z, None, None, weight, bias, True, 0.0, self.bn.eps)
                for i in mine:
                    one = torch.zeros(y.numel(), dtype=y.dtype)
                    one[i - start * per_image] = self.grad.reshape(-1)[i]
                    grads = torch.autograd.grad(y, leaves, one.view_as(y), retain_graph=True,
                                                allow_unused=True)  # the weight steps, in phase 1
                    out[(self.call, i)] = {n: g for n, g in zip(names, grads, strict=True) if g is not None}
            start = stop
        return out


class ReluTies:
    """Forward hooks on every quantized convolution (``QConv``) and on the BatchNorm that takes its
    output (a unit's BN_post, whose output the ReLU gates) that find, in train mode, the BN_post
    outputs within ``relu_tie_bound`` of zero (``found``: ``(call, flat index)``, in the order met)
    and the BN_post of each call (``units``, by name); with ``opened`` (a set of those ties), they
    put each such output on the side of zero that opens the ReLU's gate where listed and closes it
    elsewhere (by a constant shift: the gradient passes), and measure each open tie's contribution
    to the gradients of its convolution's and BN_post's parameters (``contributions``, once the
    backward has run and ``remove``)."""

    def __init__(self, model: nn.Module, opened: frozenset | None = None):
        self.opened, self.found, self.units = opened, [], []
        self.contributions: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.names = {m: n for n, m in model.named_modules()}
        self.outputs: dict[int, tuple] = {}  # a convolution's output's id: what BN_post needs of it
        self.kept: list[_OpenTies] = []
        self.handles = [m.register_forward_hook(self._conv if isinstance(m, QConv) else self._batch_norm)
                        for m in model.modules()
                        if isinstance(m, (QConv, nn.modules.batchnorm._BatchNorm))]

    def _conv(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        with torch.no_grad():
            weight = module.effective_weight()
        values = (None if self.opened is None else
                  {n: p.detach().clone() for n, p in module.named_parameters()})
        self.outputs[id(out)] = out, module, args[0].detach(), weight.detach(), values

    def _batch_norm(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        entry = self.outputs.pop(id(args[0]), None)
        if not module.training or entry is None or entry[0] is not args[0]:
            return None
        _, conv, x, weight, values = entry
        call = len(self.units)
        self.units.append(self.names[module])
        with torch.no_grad():
            # QConv.forward's convolution of the magnitudes: each output's sum of |products|
            terms = F.conv2d(x.abs(), weight.abs(), None, conv.stride, conv.kernel_size // 2, 1, conv.groups)
            sizes = piece_sizes(len(out))
            bound = torch.cat([relu_tie_bound(*parts, weight[0].numel(), module, y) for parts, y in zip(
                zip(args[0].split(sizes), terms.split(sizes), strict=True), out.split(sizes), strict=True)])
            now = out.detach().reshape(-1)
            tie = now.double().abs() < bound.reshape(-1)  # a bound of 0: nothing to round
            ties = tie.nonzero().flatten().tolist()
            self.found += [(call, i) for i in ties]
            if self.opened is None or not ties:
                return None
            opened = [i for i in ties if (call, i) in self.opened]
            gate = torch.zeros_like(tie)
            gate[opened] = True
            side = torch.where(gate, now.abs().clamp_min(torch.finfo(now.dtype).tiny), -now.abs())
            shift = torch.where(tie, side - now, torch.zeros_like(now)).view_as(out)
        result = out + shift
        if opened:
            kept = _OpenTies(call, opened, conv, self.names[conv], x, values, module, self.units[call],
                             (module.weight.detach().clone(), module.bias.detach().clone()), sizes)
            result.register_hook(lambda grad: setattr(kept, "grad", grad.detach()))
            self.kept.append(kept)
        return result

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for kept in self.kept:
            self.contributions.update(kept.contributions())


def gates_closest_to(contributions: dict[tuple[int, int], dict[str, torch.Tensor]],
                     residual: dict[str, torch.Tensor], tolerance: dict[str, float]) -> frozenset:
    """The ReLU ties to leave open, from a run with every tie of ``contributions`` open: closing a
    tie takes its contribution off the gradient, and the gates chosen bring ``residual`` (that
    run's gradients minus the recorded ones) closest to zero, in units of each tensor's
    ``tolerance`` (the sum of squares). Ties whose contributions share an element are chosen
    together (every combination of their gates), the others apart."""
    scaled = {key: {(n, j): v / tolerance[n] for n, g in c.items()
                    for j, v in zip(g.reshape(-1).nonzero().flatten().tolist(),
                                    g.reshape(-1)[g.reshape(-1) != 0].double().tolist(), strict=True)}
              for key, c in contributions.items()}
    groups: list[tuple[list, set]] = []  # ties that share elements, and those elements
    for key, elements in scaled.items():
        sharing = [g for g in groups if g[1] & elements.keys()]
        merged = ([key] + [k for g in sharing for k in g[0]], set(elements).union(*(g[1] for g in sharing)))
        groups = [g for g in groups if g not in sharing] + [merged]
    closed = set()
    for keys, elements in groups:
        assert len(keys) <= MAX_SHARED_TIES, (f"{len(keys)} ReLU ties reach the same parameters: "
                                              f"more than the {MAX_SHARED_TIES} whose gates are all tried")
        order = sorted(elements)
        r = torch.tensor([float(residual[n].reshape(-1)[j]) / tolerance[n] for n, j in order],
                         dtype=torch.float64)
        d = torch.tensor([[scaled[key].get(e, 0.0) for e in order] for key in keys], dtype=torch.float64)
        masks = ((torch.arange(2 ** len(keys)).unsqueeze(1) >> torch.arange(len(keys))) & 1).double()
        best = masks[int(((r - masks @ d) ** 2).sum(1).argmin())]
        closed |= {key for key, c in zip(keys, best.tolist(), strict=True) if c}
    return frozenset(contributions) - closed


@dataclass(frozen=True)
class Sides:
    """Which values on a boundary a run puts on their other side: the quantizer inputs
    ``quantizers`` (``BoundarySides``), with ``batch_norms`` every BatchNorm tie
    (``BatchNormTies``), and with ``relus`` the ReLU ties' gates, open where listed, closed
    elsewhere (``ReluTies``; ``None``: as computed)."""

    quantizers: frozenset = frozenset()
    batch_norms: bool = False
    relus: frozenset | None = None


@dataclass
class Found:
    """The values on a boundary that a run met: the quantizer inputs (``(call, flat index)``), the
    number of BatchNorm ties, the ReLU ties (``(call, flat index)``) and, where the run set their
    gates, each open one's contribution to its unit's parameters' gradients."""

    quantizers: list = field(default_factory=list)
    batch_norm_ties: int = 0
    relu_ties: list = field(default_factory=list)
    relu_contributions: dict = field(default_factory=dict)

    def alternatives(self) -> list[Sides]:
        """What to try once a comparison failed: the BatchNorm ties on their other side (where
        there are any), the quantizer inputs one and two at a time, each with the ties either way."""
        flips = [frozenset()] + [frozenset(s) for n in (1, 2)
                                 for s in combinations(self.quantizers, n)][:MAX_RUNS]
        ties = (False, True) if self.batch_norm_ties else (False,)
        return [Sides(flipped, other) for flipped in flips for other in ties][1:]

    def __str__(self) -> str:
        return (f"{len(self.quantizers)} quantizer input(s) on a rounding boundary, "
                f"{self.batch_norm_ties} BatchNorm output(s) that the CPU kernels put on other sides of 0 "
                f"and {len(self.relu_ties)} ReLU input(s) within float noise of 0")


@contextlib.contextmanager
def on_sides(model: nn.Module, sides: Sides = Sides(), found: Found | None = None) -> Iterator[None]:
    """Inside: ``model``'s values on a boundary on the sides ``sides`` says, those met added to
    ``found``. Hooks make the fused CPU kernels stand aside, so a plain run goes without them."""
    if sides == Sides() and found is None:
        yield
        return
    quantizers, batch_norms = BoundarySides(model, sides.quantizers), BatchNormTies(model, sides.batch_norms)
    relus = ReluTies(model, sides.relus)
    try:
        yield
    finally:
        quantizers.remove()
        batch_norms.remove()
        relus.remove()
    if found is not None:
        found.quantizers += quantizers.found
        found.batch_norm_ties += batch_norms.found
        found.relu_ties += relus.found
        found.relu_contributions.update(relus.contributions)


def first_agreement(run: Callable[[Sides, Found | None], Result], agrees: Callable[[Result], bool],
                    gates: Callable[[Sides, Found], Sides] | None = None
                    ) -> tuple[Result, Sides | None, Found | None]:
    """``run(Sides(), None)`` where ``agrees`` with it; else ``run`` again listing the values on a
    boundary (``found``), and with each of ``found.alternatives()`` in turn: the first result that
    agrees and its sides. Where none does, and ``gates`` is given, each of those runs that met
    ReLU ties is run again with the gates ``gates(sides, met)`` chooses for them (``met``: that
    run's values on a boundary). Where none agrees, the plain result and ``None``. ``run`` must
    start from the same state each time (a fresh model, fresh gradients)."""
    plain = run(Sides(), None)
    if agrees(plain):
        return plain, Sides(), None
    found = Found()
    run(Sides(), found)
    met = {Sides(): found}
    for sides in found.alternatives():
        met[sides] = Found()
        result = run(sides, met[sides])
        if agrees(result):
            return result, sides, found
    for sides, values in met.items():
        if values.relu_ties and gates is not None:
            gated = gates(sides, values)
            result = run(gated, None)
            if agrees(result):
                return result, gated, found
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
