"""How many of a process's pieces a training pass computes at once (``train_step``'s
``pieces_per_pass``): a choice of memory against speed, never of arithmetic (``one_pass`` computes
each piece as the reference's devices did, however many go into a pass)."""
import copy
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .pieces import Draws, one_pass
from .step import Amp

MARGIN = 0.9  # of the free memory: the caching allocator's fragmentation, cuDNN's workspaces
TRIAL_IMAGES = (2, 4)  # the trial passes' images (two per BatchNorm channel even on 1 x 1 maps)


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


def device_free(device: torch.device) -> int:
    """Bytes a GPU has for new tensors: what the driver has free (``mem_get_info``) and the blocks
    PyTorch's caching allocator holds unused (``memory_reserved - memory_allocated``: freed tensors,
    kept for reuse), which the driver counts as used."""
    return (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
            - torch.cuda.memory_allocated(device))


def host_available() -> int:
    """Bytes the host can give this process without swapping: ``MemAvailable`` of ``/proc/meminfo``
    (free memory and the caches the kernel can drop), else the free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def local_processes() -> int:
    """The processes of this run on this host (torchrun's ``LOCAL_WORLD_SIZE``; 1 without it)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def step_peak(device: torch.device, step: Callable[[], object]) -> int:
    """Bytes of the tensors ``step()`` makes, at their peak: on a GPU what the allocator counts
    beyond what was there before it, elsewhere ``LiveTensors``'."""
    if device.type != "cuda":
        with LiveTensors() as live:
            step()
        return live.peak
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def trial_forward(model: nn.Module, selection: Sequence[int], images: int, resolution: int,
                  amp: str | None, device: torch.device) -> None:
    """A training forward of ``images`` random images on a copy of ``model``, weights quantized:
    what a pass holds for its backward, the most of its step (``bench.memory``: at the ImageNet
    model 149.7 MiB an image saved for backward, 148.9 MiB an image at the step's peak). Its
    random numbers come from generators of its own: the run's stay as they are."""
    twin = copy.deepcopy(model)
    twin.change_precision(True, True)
    twin.train()
    x = torch.randn(images, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.enable_grad(), Amp(amp, device).autocast(), one_pass([images], 0, Draws(0, 0)):
        twin(x, selection)


def pieces_per_pass(requested: int | None, pieces: int, piece: int, device: torch.device,
                    trial: Callable[[int], object]) -> tuple[int, str]:
    """``--pieces_per_pass``, and the line the stage logs about it: ``requested`` where given, else
    as many of the process's ``pieces`` (of ``piece`` images) as fit the device's free memory (a
    GPU's) or the host's available memory, by ``trial(n)`` (``trial_forward`` of ``n`` images)
    measured at ``TRIAL_IMAGES``: the difference is the cost of an image, the rest the step's."""
    if requested or pieces == 1:
        chosen = min(requested or 1, pieces)
        return chosen, f"{chosen} of {pieces} pieces per pass" + (" (--pieces_per_pass)" if requested else "")
    try:
        line = fit(lambda images: step_peak(device, lambda: trial(images)), TRIAL_IMAGES)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return 1, (f"1 piece per pass: a trial pass of {TRIAL_IMAGES[-1]} images or fewer does not fit "
                   "this GPU's memory")
    per_image = max(line.per_image, 1.0)
    per_step = max(line(TRIAL_IMAGES[0]) - per_image * TRIAL_IMAGES[0], 0.0)
    # The processes torchrun starts on a host share its memory (each GPU is its own).
    free = device_free(device) if device.type == "cuda" else host_available() // local_processes()
    chosen = max(1, min(pieces, int((MARGIN * free - per_step) // (per_image * piece))))
    where = "free on the GPU" if device.type == "cuda" else "available on the host"
    return chosen, (f"{chosen} of {pieces} pieces per pass: {per_image * piece / 2**30:.2f} GiB a piece "
                    f"of {piece} images and {per_step / 2**30:.2f} GiB a step (measured), "
                    f"{free / 2**30:.1f} GiB {where} (--pieces_per_pass sets it)")
