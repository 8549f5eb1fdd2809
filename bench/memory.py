"""What a training and an evaluation step keep on the device, per image, and what each stage needs.

    python -m bench.memory    # the ImageNet model (width 1.0, 224 px, 2-bit, 7 branches): README's tables

Measured from the tensors themselves, so the figures hold on any device (measured here on the CPU,
with PyTorch's ops: the fused CPU kernels are turned off, as a GPU does not have them):

- *saved*: the tensors autograd saves for backward in a training forward (unique storages, the
  parameters left out), through ``torch.autograd.graph.saved_tensors_hooks``;
- *peak*: the most bytes of tensors made by the step's operations alive at once (``LiveTensors``),
  what ``torch.cuda.max_memory_allocated`` counts over the parameters, gradients and optimizer
  state (which are counted apart, by size). The training steps are the stages' own, run as they
  run: stage 1's ``stage_step`` (the teacher's logits of the pieces, then the student's DataParallel
  step, ``training.step.train_step``, with the stage's Adam) and stage 3's (``train_step`` with
  cross-entropy and the stage's SGD), each on a batch of two pieces, the gradients already there;
  an evaluation step's, a forward under ``inference_mode``.

Each is measured at two piece sizes: the difference is the cost per image, the rest the cost per
step (the quantized weights saved for backward, for example). A stage's memory per device is then
the persistent state plus its steps' peak at the piece it computes (SPEC 5a:
``ceil(batch / replicas)`` images). Not counted: the CUDA context and cuDNN's workspaces (outside
the step's tensors), and the caching allocator's fragmentation; ``RESERVE`` keeps room for them.
"""
import argparse
import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision

import utils.torch_floor  # noqa: F401  (first: an older torch stops here, with one line)
from models import build_supernet
from search.reference_results import REFERENCE_L2_BOUNDS
from training.memory import Linear, LiveTensors, fit
from training.pieces import Share
from training.step import Amp, train_step
from utils.runtime import load_back_ends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 10**9  # GPU memory is sold in decimal gigabytes (a "16 GB" card has 16e9 bytes or a little more)
GIB = 2**30
RESERVE = 1.5 * GIB  # CUDA context, cuDNN workspaces, allocator fragmentation
GPU_SIZES_GB = (16, 24, 40, 80, 141)
IMAGE = 3 * 224 * 224  # values of one input image
BATCH, VAL_BATCH, REPLICAS = 768, 200, 8  # the stages' defaults


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
class Figures:
    """What the stages are made of, in bytes: per image or per step (``Linear``), and sizes."""

    amp: str | None
    saved: Linear  # the supernet's training forward: tensors saved for backward
    train: Linear  # stage 3's step on a piece (forward, backward, SGD), peak
    eval: Linear  # the supernet's evaluation forward, peak
    teacher: Linear  # the teacher's forward (no gradient), peak
    parameters: int  # the supernet's
    teacher_parameters: int
    stage1_step: Linear  # stage 1's step on a piece (teacher, student, loss, backward, Adam), peak

    def stage1(self, piece: int, batch_per_device: int) -> float:
        """Stage 1: parameters, gradients and Adam's two moments; the teacher's weights; the
        process's batch as uint8 and float32; the peak of the stage's step on pieces of ``piece``
        (measured as it runs: the teacher's activations are gone before the student's forward)."""
        return (4 * self.parameters + self.teacher_parameters + batch_per_device * IMAGE * 5
                + self.stage1_step(piece))

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


def stage_script(name: str):
    """A numbered stage script (``01train_supernet.py``) as a module, to run its functions here."""
    spec = importlib.util.spec_from_file_location(name[2:-3], os.path.join(ROOT, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_resident(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  teacher: torch.nn.Module | None = None) -> list[torch.Tensor]:
    """What a training step finds on the device and does not make: the parameters, gradients,
    optimizer state and buffers (of the teacher too)."""
    params = list(model.parameters())
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    nets = [model] + ([teacher] if teacher is not None else [])
    return (params + [p.grad for p in params if p.grad is not None] + state
            + [t for net in nets for t in (*net.parameters(), *net.buffers())])


def measure(amp: str | None, device: torch.device = torch.device("cpu"), sizes: tuple[int, int] = (2, 4),
            model: torch.nn.Module | None = None, resolution: int = 224,
            teacher: torch.nn.Module | None = None) -> Figures:
    """The figures of ``model`` (default: the ImageNet supernet) at ``resolution``, in float32 or
    under ``--amp bf16|fp16`` autocast. (``main`` measures PyTorch's ops, as a GPU runs them: on
    the CPU the fused kernels would save other tensors.)"""
    stage1, stage3 = stage_script("01train_supernet.py"), stage_script("03finetune.py")
    model = (model or imagenet_supernet()).to(device)
    teacher = (teacher or torchvision.models.resnet50()).to(device).eval()
    params = list(model.parameters())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp, torch.float32)
    mixed = Amp(amp, device)
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

    model.train()
    adam, _ = stage1.phase_optimizer(model, 1e-9, 0.0, 1)
    sgd = stage3.bn_stabilize_optimizer(model, 1e-9)

    def step_peak(run: Callable[[torch.Tensor, torch.Tensor, Share], object],
                  optimizer: torch.optim.Optimizer, net: torch.nn.Module | None = None
                  ) -> Callable[[int], int]:
        """The peak of ``run(images, labels, share)`` on a batch of two pieces of ``n``, after a first
        step (gradients and the optimizer's state exist, as in every step but the first)."""
        def peak(n: int) -> int:
            x, labels = images(2 * n), torch.zeros(2 * n, dtype=torch.long, device=device)
            share = Share.of(2 * n, 2)
            model.train()
            run(x, labels, share)
            with LiveTensors(step_resident(model, optimizer, net) + [x, labels]) as live:
                run(x, labels, share)
            return live.peak
        return peak

    # One piece per pass: the figures are a piece's; a pass of k pieces holds about k pieces' images.
    def stage1_step(x: torch.Tensor, labels: torch.Tensor, share: Share):
        return stage1.stage_step(model, teacher, x, labels, selection, adam, mixed, share, 1)

    def stage3_step(x: torch.Tensor, labels: torch.Tensor, share: Share):
        return train_step(model, x, selection, lambda logits, piece: F.cross_entropy(logits, labels[piece]),
                          sgd, mixed, share, 1)

    def saved(n: int) -> int:
        return saved_bytes(lambda: forward(images(n)), params)

    def eval_peak(net: torch.nn.Module, run: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[int], int]:
        def peak(n: int) -> int:
            x = images(n)
            net.eval()
            resident = [x, *net.parameters(), *net.buffers()]
            with torch.inference_mode(), autocast(), LiveTensors(resident) as live:
                run(x)
            return live.peak
        return peak

    figures = Figures(amp, fit(saved, sizes), fit(step_peak(stage3_step, sgd), sizes),
                      fit(eval_peak(model, lambda x: model(x, selection)), sizes),
                      fit(eval_peak(teacher, teacher), sizes),
                      sum(p.numel() * p.element_size() for p in params),
                      sum(p.numel() * p.element_size() for p in teacher.parameters()),
                      fit(step_peak(stage1_step, adam, teacher), sizes))
    model.train()
    for p in params:
        p.grad = None
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
            line("stage 1's step (teacher and student), peak", figures.stage1_step),
            line("stage 3's step, peak", figures.train), line("evaluation, peak", figures.eval),
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
