"""Comparing a quantized network with recorded values across CPUs: the inputs on rounding boundaries.

A quantizer rounds ``x / step``; an input within float noise of a rounding boundary (``k + 0.5``)
goes to the level above or below depending on the last bits of what computed it. Another CPU's
convolution kernel (oneDNN's SSE4.1 code against AVX2/AVX-512) moves such an input across, and in a
train-mode step that one level reaches every logit through the batch's BatchNorm statistics. Which
side the recorded values took depends on the recording machine's kernels, so a comparison that
fails may still agree once such inputs go the other way. Nothing else moves: an input is put on the
other side of its boundary only when it lies within ``REL`` of it, relative to its value.
"""
from collections.abc import Callable
from itertools import combinations

import torch
from torch import nn

from quant import ClipActivation, LsqActivation

REL = 2e-6  # a few float32 ulps: further from a boundary than that is not a kernel's noise
MAX_RUNS = 16


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


def agrees_up_to_boundaries(model: nn.Module, run: Callable[[], object],
                            check: Callable[[object], None]) -> None:
    """``check(run())`` (which raises ``AssertionError`` on a mismatch), and where it fails, again
    with the quantizers' inputs that lie on a rounding boundary put on its other side, one and then
    two at a time: passes when one of those agrees. ``run`` must start from the same state each time
    (a fresh model, fresh gradients)."""
    try:
        check(run())
        return
    except AssertionError as first:
        failure = first
    probe = BoundarySides(model)
    try:
        run()
    finally:
        probe.remove()
    candidates = [frozenset(s) for n in (1, 2) for s in combinations(probe.found, n)][:MAX_RUNS]
    for flipped in candidates:
        sides = BoundarySides(model, flipped)
        try:
            check(run())
            return
        except AssertionError:
            pass
        finally:
            sides.remove()
    raise AssertionError(f"no agreement with {len(probe.found)} quantizer input(s) on a rounding boundary "
                         f"put on its other side ({len(candidates)} tried); the plain comparison: {failure}")
