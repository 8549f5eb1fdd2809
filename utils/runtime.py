"""How a stage script runs: seeded, and failing on a user error with one line instead of a traceback."""
import argparse
import importlib
import math
import os
import random
import re
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import distributed
from .cpu_memory import keep_freed_memory
from .data import rank_seed
from .errors import BasqError, UsageError

# The back ends the entry points load: each registers its fused paths with quant.fused on import.
BACK_ENDS = ("cpu_kernels",)


def load_back_ends() -> None:
    """Import the back ends (``BACK_ENDS``), which plug their fused paths into the quantizers and
    the unit; one that is not there is skipped: the project runs its PyTorch definitions, slower."""
    for name in BACK_ENDS:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch; torch's generator gets a sequence of its own on each rank.

    That generator draws the training augmentation when there are no loader workers: the ranks
    must not crop their images alike. Rank 0 keeps the single-process seed.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(rank_seed(seed, rank))


def use_tf32(enabled: bool, device: torch.device) -> str:
    """``--tf32 on|off``: whether cuDNN may compute float32 convolutions in TF32; returns the line
    a stage logs about it.

    On Ampere and later GPUs TF32 rounds a float32 convolution's operands to 10 bits of mantissa
    (float32 has 23), and the quantizers then round what comes out: an input near a rounding
    boundary can land on the other level than the float32 convolution gives. PyTorch allows it for
    convolutions by default (``torch.backends.cudnn.allow_tf32``), as the reference's PyTorch 1.x
    did, so ``on`` is the reference's arithmetic on such a GPU; matrix products stay float32
    (PyTorch's default).
    """
    torch.backends.cudnn.allow_tf32 = enabled
    if device.type != "cuda":
        return "TF32: not used on the CPU (float32 convolutions in float32)"
    if torch.cuda.get_device_capability(device)[0] < 8:
        return f"TF32: not available on {torch.cuda.get_device_name(device)} (before Ampere)"
    if enabled:
        return ("TF32: on for float32 convolutions (PyTorch's default, as the reference's PyTorch 1.x; "
                "--tf32 off for float32 arithmetic)")
    return "TF32: off (--tf32 off): float32 convolutions in float32"


def check_amp(mode: str | None, device: torch.device) -> None:
    """``--amp bf16`` on a GPU without bfloat16 arithmetic (before Ampere, compute capability 8.0) is
    refused before anything runs: PyTorch would emulate it, slowly, or fail inside a kernel."""
    if mode != "bf16" or device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise UsageError(f"--amp bf16: {torch.cuda.get_device_name(device)} (compute capability "
                         f"{major}.{minor}) has no bfloat16 arithmetic (Ampere, 8.0, and later have): "
                         "use --amp fp16, or leave --amp out (float32)")


SHARED_MEMORY = "/dev/shm"
PREFETCH = 2  # batches each loader worker holds in flight (DataLoader's prefetch_factor)


def shared_memory_free(path: str = SHARED_MEMORY) -> int | None:
    """Bytes free in ``path`` (where loader workers put their batches), or None where there is none."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def check_shared_memory(workers: int, batch_images: int, resolution: int, free: int | None = None) -> str:
    """Refuse loader workers whose batches in flight (``PREFETCH`` per worker, uint8 images) do not
    fit the shared memory they are handed over in (Docker gives a container 64 MB): PyTorch would
    fail at the first batch, inside a worker. Returns the line a stage logs about its loaders."""
    if workers <= 0:
        return "data loading in the main process (-j 0)"
    batch = batch_images * 3 * resolution**2
    need = workers * PREFETCH * batch
    free = shared_memory_free() if free is None else free
    if free is not None and need > free:
        raise UsageError(
            f"{SHARED_MEMORY} has {free / 1e6:.0f} MB free, and -j {workers} loader workers hold up to "
            f"{need / 1e6:.0f} MB of batches there ({PREFETCH} each of {batch / 1e6:.0f} MB): give the "
            f"container more shared memory (Docker: --shm-size {max(1, math.ceil(2 * need / 1e9))}g), "
            "or load in the main process with -j 0 (slower)")
    return (f"{workers} loader workers (-j; default the CPU cores per process, at most 16), "
            f"{need / 1e6:.0f} MB of batches in flight in {SHARED_MEMORY}")


OOM_DETAILS = (r"Tried to allocate [\d.]+ \w+", r"GPU \d+ has a total capacity of [\d.]+ \w+")


def out_of_memory_message(error: torch.OutOfMemoryError, args: argparse.Namespace | None) -> str:
    """A GPU out of memory, said as bad input: what the stage computed at once and what to change."""
    details = [m.group(0) for pattern in OOM_DETAILS if (m := re.search(pattern, str(error)))]
    said = "out of GPU memory" + (f" ({'; '.join(details)})" if details else "")
    batch, replicas = getattr(args, "batch_size", None), getattr(args, "replicas", None)
    if batch is not None and replicas is not None:  # a training stage: one piece at a time
        more = 2 * replicas
        said += (f" with pieces of {math.ceil(batch / replicas)} images (--batch_size {batch} in "
                 f"--replicas {replicas} pieces): give more pieces, e.g. --replicas {more} (pieces of "
                 f"{math.ceil(batch / more)})" + ("" if getattr(args, "amp", None) else
                                                   ", or --amp bf16 (58 % of the activations)"))
    elif hasattr(args, "val_batch_size"):  # stage 2: evaluation batches, the fold and its cache
        said += (f" with evaluation batches of {args.val_batch_size} images: lower --val_batch_size "
                 "or --prefix_cache_gb")
    return said + "; README, 'Memory', lists the largest piece for each GPU size"


def fail_cleanly(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> Any:
    """Run a stage; a user error (``BasqError``) prints ``error: ...`` and exits with status 2,
    without a traceback, and so does a GPU out of memory (``out_of_memory_message``: the flags to
    change). Any other exception is a defect: it keeps its traceback.

    The process keeps freed memory for reuse (``utils.cpu_memory``), which makes large CPU steps
    faster (README, "Speed").

    Under torchrun the message starts with ``rank N:``; the failed process's exit makes torchrun
    stop the others. (Once the process group is up, torch also tags tracebacks with ``[rankN]``.)
    """
    keep_freed_memory()
    try:
        result = main(args)
    except BasqError as e:
        print(f"{distributed.rank_prefix()}error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except torch.OutOfMemoryError as e:
        print(f"{distributed.rank_prefix()}error: {out_of_memory_message(e, args)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{distributed.rank_prefix()}interrupted; the last checkpoint written is intact",
              file=sys.stderr)
        raise SystemExit(130) from None
    distributed.teardown()
    return result
