"""Running a stage under ``torchrun``: the process group, this process's rank and device, collectives.

``torchrun`` tells each process its place through the environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``). Without it (``python script.py``) the world has one process, no process group is
made, and every helper below is a no-op that returns its input: the single-process run is unchanged.
"""
import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from .errors import UsageError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    """Rank 0, the one process that writes logs, TensorBoard and the result files."""
    return rank() == 0


def rank_prefix() -> str:
    """``"rank 3: "`` in a distributed run, so that a message says which process wrote it."""
    return f"rank {rank()}: " if is_distributed() else ""


def pick_device(name: str | None) -> torch.device:
    """``--device``: a name, or ``None`` for CUDA when available and the CPU otherwise."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


_in_use: torch.device | None = None  # the device ``setup`` gave this process


def setup(device_name: str | None, timeout_minutes: float) -> torch.device:
    """This process's device, and under ``torchrun`` the process group (NCCL on GPUs, else gloo).

    Each process takes the GPU of its ``LOCAL_RANK`` (``local_gpu``). Every collective gives up
    after ``timeout_minutes``, so a rank that hangs ends the job instead of blocking it forever.
    """
    global _in_use
    device = pick_device(device_name)
    if is_distributed():
        if device.type == "cuda":
            if device.index is not None:
                raise UsageError(f"--device {device_name}: under torchrun each process takes the GPU of "
                                 "its LOCAL_RANK; give --device cuda (or leave it out)")
            device = torch.device("cuda", local_gpu())
            torch.cuda.set_device(device)
        # device_id binds the NCCL communicator to this GPU at once (no guessing of a rank's GPU
        # at the first collective, no context made on GPU 0 by every process).
        backend = backend_for(device)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if backend == "nccl" else None)
    _in_use = device
    return device


BACKEND_VARIABLE = "BASQ_DIST_BACKEND"


def backend_for(device: torch.device) -> str:
    """NCCL on GPUs, gloo on the CPU; ``BASQ_DIST_BACKEND=gloo`` for processes that share a GPU
    (NCCL refuses two ranks on one device; gloo reduces CUDA tensors through the host, slower), as
    ``bench.gpu_check`` runs 2 processes on a one-GPU machine."""
    backend = os.environ.get(BACKEND_VARIABLE) or ("nccl" if device.type == "cuda" else "gloo")
    if backend not in ("nccl", "gloo") or (backend == "nccl" and device.type != "cuda"):
        raise UsageError(f"{BACKEND_VARIABLE}={backend}: give gloo, or nccl on GPUs")
    return backend


def local_gpu() -> int:
    """The GPU index of this process: its ``LOCAL_RANK``, or the only GPU it sees.

    A cluster that binds one GPU to each task (SLURM's ``--gpus-per-task 1``, or
    ``CUDA_VISIBLE_DEVICES`` per process) shows each process a single GPU, index 0, whatever its
    ``LOCAL_RANK``."""
    count = torch.cuda.device_count()
    if count == 1:
        return 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= count:
        raise UsageError(f"LOCAL_RANK {local_rank} but this process sees {count} GPUs: "
                         "start at most one process per GPU (--nproc_per_node)")
    return local_rank


def pin_memory() -> bool:
    """Whether the loaders pin their batches (for a copy that does not block): when this process
    computes on a GPU. Decided by the device in use, not by CUDA being there: ``--device cpu`` on
    a GPU node pins nothing, so it creates no CUDA context."""
    return _in_use is not None and _in_use.type == "cuda"


def teardown() -> None:
    """Wait for every rank to finish, then leave the process group."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first, then the other ranks: for work that downloads or unpacks files
    (a dataset, a teacher's weights) into a place the ranks share, which they must not write at once."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over the ranks, in place; returns ``values``."""
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_min(values: torch.Tensor) -> torch.Tensor:
    """The elementwise minimum of ``values`` over the ranks, in place; returns ``values``."""
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return values


def _coalesced(tensors: list[torch.Tensor], collective: Callable[[torch.Tensor], Any]) -> None:
    """``collective`` on ``tensors`` flattened into one tensor per dtype, then copied back."""
    for dtype in dict.fromkeys(t.dtype for t in tensors):  # the same order on every rank
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in group])
        collective(flat)
        values = flat.split([t.numel() for t in group])
        torch._foreach_copy_(group, [v.view_as(t) for t, v in zip(group, values, strict=True)])  # one op


def all_reduce_sum_coalesced(tensors: list[torch.Tensor]) -> None:
    """Sum each of ``tensors`` over the ranks, in place, in one collective per dtype."""
    if is_distributed():
        _coalesced(tensors, lambda flat: dist.all_reduce(flat, op=dist.ReduceOp.SUM))


def broadcast_from_main(tensors: list[torch.Tensor]) -> None:
    """Give every rank rank 0's values of ``tensors``, in place, in one collective per dtype."""
    if is_distributed():
        _coalesced(tensors, lambda flat: dist.broadcast(flat, src=0))


def share(items: list) -> list:
    """This process's share of ``items``: every ``world_size``-th, from its rank on."""
    return items[rank()::world_size()]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
