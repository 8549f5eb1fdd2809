"""What a training and an evaluation step keep on the device, per image, and what each stage needs.

    python -m bench.memory    # the ImageNet model (width 1.0, 224 px, 2-bit, 7 branches): README's tables

Measured from the tensors themselves, so the figures hold on any device (measured here on the CPU,
with PyTorch's ops: the fused CPU kernels are turned off, as a GPU does not have them):

- *saved*: the tensors autograd saves for backward in a training forward (unique storages, the
  parameters left out), through ``torch.autograd.graph.saved_tensors_hooks``;
- *peak*: the most bytes of tensors made by the step's operations alive at once (``LiveTensors``),
  what ``torch.cuda.max_memory_allocated`` counts over the parameters, gradients and optimizer
  state (which are counted apart, by size). A training step's peak is its forward and backward
  with the gradients already there (a piece of an accumulated step), and the optimizer's step;
  an evaluation step's, a forward under ``inference_mode``.

Each is measured at two batch sizes: the difference is the cost per image, the rest the cost per
step (the quantized weights saved for backward, for example). A stage's memory per device is then
the persistent state plus the larger of its steps' peaks at the piece it computes (SPEC 5a:
``ceil(batch / replicas)`` images). Not counted: the CUDA context and cuDNN's workspaces (outside
PyTorch's allocator), and the caching allocator's fragmentation; ``RESERVE`` keeps room for them.
"""
import argparse
import math
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from models import build_supernet
from search.reference_results import REFERENCE_L2_BOUNDS
from utils.runtime import load_back_ends

GB = 10**9  # GPU memory is sold in decimal gigabytes (a "16 GB" card has 16e9 bytes or a little more)
GIB = 2**30
RESERVE = 1.5 * GIB  # CUDA context, cuDNN workspaces, allocator fragmentation
GPU_SIZES_GB = (16, 24, 40, 80, 141)
IMAGE = 3 * 224 * 224  # values of one input image
BATCH, VAL_BATCH, REPLICAS = 768, 200, 8  # the stages' defaults


class LiveTensors(TorchDispatchMode):
    """Counts the bytes of the storages the operations make while they are alive: now and the
    peak. Storages of ``resident`` tensors (parameters, inputs) are not counted when an operation
    returns a view of them."""

    def __init__(self, resident: list[torch.Tensor] = ()):
        super().__init__()
        self.resident = {t.untyped_storage().data_ptr() for t in resident}
        self.holders: dict[int, list[int]] = {}  # storage address: [tensors holding it, bytes]
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._hold(t)
        return out

    def _hold(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.resident:
            return
        if key not in self.holders:
            self.holders[key] = [0, storage.nbytes()]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.holders[key][0] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.holders[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.holders[key]


def saved_bytes(step: Callable[[], torch.Tensor], parameters: list[torch.Tensor]) -> int:
    """Bytes of the unique storages autograd saves for backward while ``step()`` runs the forward
    (the parameters' own storages left out)."""
    exclude = {p.untyped_storage().data_ptr() for p in parameters}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    del loss
    return sum(seen.values())


@dataclass
class Linear:
    """``per_image * images + per_step`` bytes."""

    per_image: float
    per_step: float

    def __call__(self, images: int) -> float:
        return self.per_image * images + self.per_step


def fit(measure: Callable[[int], int], sizes: tuple[int, int]) -> Linear:
    a, b = sizes
    ma, mb = measure(a), measure(b)
    per_image = (mb - ma) / (b - a)
    return Linear(per_image, ma - per_image * a)


@dataclass
class Figures:
    """What the stages are made of, in bytes: per image or per step (``Linear``), and sizes."""

    amp: str | None
    saved: Linear  # the supernet's training forward: tensors saved for backward
    train: Linear  # the supernet's training step (forward, backward, optimizer), peak
    eval: Linear  # the supernet's evaluation forward, peak
    teacher: Linear  # the teacher's forward (no gradient), peak
    parameters: int  # the supernet's
    teacher_parameters: int

    def stage1(self, piece: int, batch_per_device: int) -> float:
        """Stage 1: parameters, gradients and Adam's two moments; the teacher's weights; the
        process's batch as uint8 and float32; the larger of the teacher's and the student's step
        on a piece (the teacher runs before the student's forward, piece by piece)."""
        return (4 * self.parameters + self.teacher_parameters + batch_per_device * IMAGE * 5
                + max(self.teacher(piece), self.train(piece)))

    def stage3(self, piece: int, batch_per_device: int, val_batch: int) -> float:
        """Stage 3: parameters, gradients and SGD's momentum; the process's batch; the larger of a
        training step on a piece and an evaluation batch."""
        return (3 * self.parameters + batch_per_device * IMAGE * 5
                + max(self.train(piece), self.eval(val_batch)))

    def evaluation(self, val_batch: int) -> float:
        """An evaluation batch: the parameters, the batch, the forward (stage 2's fold cache apart)."""
        return self.parameters + val_batch * IMAGE * 5 + self.eval(val_batch)

    def largest_piece(self, gigabytes: float, stage: Callable[[int], float]) -> int:
        """The largest piece whose stage fits ``gigabytes`` with ``RESERVE`` to spare (0: none)."""
        room = gigabytes * GB - RESERVE
        if stage(1) > room:
            return 0
        low, high = 1, 1
        while stage(high * 2) <= room:
            high *= 2
        high *= 2
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if stage(mid) <= room else (low, mid)
        return low


def imagenet_supernet() -> torch.nn.Module:
    model = build_supernet("mobilenet_v2", 1000, 2, REFERENCE_L2_BOUNDS)
    model.change_precision(True, True)
    return model


def measure(amp: str | None, device: torch.device = torch.device("cpu"), sizes: tuple[int, int] = (2, 4),
            model: torch.nn.Module | None = None, resolution: int = 224,
            teacher: torch.nn.Module | None = None) -> Figures:
    """The figures of ``model`` (default: the ImageNet supernet) at ``resolution``, in float32 or
    under ``--amp bf16|fp16`` autocast. (``main`` measures PyTorch's ops, as a GPU runs them: on
    the CPU the fused kernels would save other tensors.)"""
    model = (model or imagenet_supernet()).to(device)
    teacher = (teacher or torchvision.models.resnet50()).to(device).eval()
    params = list(model.parameters())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp, torch.float32)
    selection = [0] * model.num_searchable_layers
    gen = torch.Generator().manual_seed(0)

    def images(n: int) -> torch.Tensor:
        return torch.randn(n, 3, resolution, resolution, generator=gen).to(device)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=amp is not None)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast():
            logits = model(x, selection)
        return F.cross_entropy(logits.float(), torch.zeros(len(x), dtype=torch.long, device=device))

    optimizer = torch.optim.Adam(params, lr=1e-6, foreach=True)
    model.train()
    forward(images(2)).backward()  # gradients and Adam's state exist, as in every step but the first
    for p in params:  # every parameter has a gradient, as in the stages (training.step)
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad
    optimizer.step()
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    resident = params + [p.grad for p in params] + state + list(model.buffers())

    def saved(n: int) -> int:
        return saved_bytes(lambda: forward(images(n)), params)

    def train_peak(n: int) -> int:
        x = images(n)
        with LiveTensors(resident + [x]) as live:
            forward(x).backward()
            optimizer.step()
        return live.peak

    def eval_peak(net: torch.nn.Module, run: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[int], int]:
        def peak(n: int) -> int:
            x = images(n)
            net.eval()
            resident = [x, *net.parameters(), *net.buffers()]
            with torch.inference_mode(), autocast(), LiveTensors(resident) as live:
                run(x)
            return live.peak
        return peak

    figures = Figures(amp, fit(saved, sizes), fit(train_peak, sizes),
                      fit(eval_peak(model, lambda x: model(x, selection)), sizes),
                      fit(eval_peak(teacher, teacher), sizes),
                      sum(p.numel() * p.element_size() for p in params),
                      sum(p.numel() * p.element_size() for p in teacher.parameters()))
    optimizer.zero_grad(set_to_none=True)
    return figures


def stage_rows(figures: Figures, replicas: int = REPLICAS) -> list[tuple[str, int, Callable[[int], float]]]:
    """(stage, its piece at the defaults, its memory per device as a function of the piece), one
    process per device holding its whole batch (``--batch_size`` 768)."""
    piece = math.ceil(BATCH / replicas)
    return [("stage 1 (Adam, ResNet-50 teacher)", piece, lambda p: figures.stage1(p, BATCH)),
            ("stage 3 (SGD; evaluation batches of 200)", piece,
             lambda p: figures.stage3(p, BATCH, VAL_BATCH)),
            ("evaluation, a batch at once (stage 2 without its fold cache)", VAL_BATCH, figures.evaluation)]


def table(by_amp: dict[str | None, Figures]) -> str:
    sizes = " | ".join(f"{g} GB" for g in GPU_SIZES_GB)
    lines = [f"| stage | precision | piece | GiB per device | largest piece: {sizes} |",
             "|---|---|---|---|" + "---|" * len(GPU_SIZES_GB)]
    for amp, figures in by_amp.items():
        for name, piece, stage in stage_rows(figures):
            fits = " | ".join(str(figures.largest_piece(g, stage)) for g in GPU_SIZES_GB)
            lines.append(f"| {name} | {amp or 'float32'} | {piece} | {stage(piece) / GIB:.1f} | {fits} |")
    return "\n".join(lines)


def per_image_lines(figures: Figures) -> list[str]:
    """The measured figures, in MiB."""
    def line(name: str, f: Linear) -> str:
        return f"  {name}: {f.per_image / 2**20:.2f} MiB per image + {f.per_step / 2**20:.0f} MiB per step"
    return [f"{figures.amp or 'float32'}:", line("saved for backward", figures.saved),
            line("training step, peak", figures.train), line("evaluation, peak", figures.eval),
            line("teacher (ResNet-50, no gradient), peak", figures.teacher),
            f"  parameters {figures.parameters / 2**20:.1f} MiB, "
            f"the teacher's {figures.teacher_parameters / 2**20:.1f} MiB"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="where to run the steps (the figures do not "
                        "depend on it: on a GPU the backward pass may run outside the count's reach)")
    parser.add_argument("--amp", nargs="*", default=["none", "bf16"], choices=["none", "bf16", "fp16"],
                        help="precisions to measure (none: float32)")
    args = parser.parse_args(argv)
    os.environ["BASQ_NATIVE"] = "0"  # before the first quantizer runs: PyTorch's ops, as on a GPU
    torch.manual_seed(0)
    by_amp = {None if a == "none" else a: measure(None if a == "none" else a, torch.device(args.device))
              for a in args.amp}
    for figures in by_amp.values():
        print("\n".join(per_image_lines(figures)))
    print(f"\nper device at --replicas {REPLICAS}, one process (reserve {RESERVE / GIB:.1f} GiB for the "
          "CUDA context, cuDNN and fragmentation):\n")
    print(table(by_amp))


if __name__ == "__main__":
    load_back_ends()  # the CPU back end's fused kernels, where it is there (README, "Speed")
    main()
