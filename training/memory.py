"""How many of a process's pieces a training pass computes at once (``train_step``'s
``pieces_per_pass``): a choice of memory against speed, never of arithmetic (``one_pass`` computes
each piece as the reference's devices did, however many go into a pass)."""
from collections.abc import Callable

import torch

MARGIN = 0.9  # of the free memory: the caching allocator's fragmentation, cuDNN's workspaces


def device_free(device: torch.device) -> int:
    """Bytes a GPU has for new tensors: what the driver has free (``mem_get_info``) and the blocks
    PyTorch's caching allocator holds unused (``memory_reserved - memory_allocated``: freed tensors,
    kept for reuse), which the driver counts as used."""
    return (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
            - torch.cuda.memory_allocated(device))


def step_peak(device: torch.device, step: Callable[[], object]) -> int:
    """Bytes ``step()`` allocates on the GPU at its peak, beyond what was there before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def pieces_per_pass(requested: int | None, pieces: int, device: torch.device,
                    trial: Callable[[int], object]) -> tuple[int, str]:
    """``--pieces_per_pass``, and the line the stage logs about it. ``requested`` where given; on a
    CPU all ``pieces`` of the process (memory is not the limit there, and one pass is fastest); on
    a GPU as many as fit its free memory by the stage's own step, measured on passes of one and two
    pieces (``trial(n)``: a step on a pass of ``n`` pieces, on a copy of the model): the difference
    is a piece's cost, the rest the step's."""
    if requested:
        chosen = min(requested, pieces)
        return chosen, f"{chosen} of {pieces} pieces per pass (--pieces_per_pass)"
    if device.type != "cuda" or pieces == 1:
        return pieces, f"all {pieces} pieces of a process in one pass"
    one = step_peak(device, lambda: trial(1))
    try:
        two = step_peak(device, lambda: trial(2))
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return 1, "1 piece per pass: two do not fit this GPU's memory"
    per_piece, free = max(two - one, 1), device_free(device)
    chosen = max(1, min(pieces, int((MARGIN * free - (one - per_piece)) // per_piece)))
    return chosen, (f"{chosen} of {pieces} pieces per pass: {per_piece / 2**30:.2f} GiB a piece and "
                    f"{(one - per_piece) / 2**30:.2f} GiB a step (measured), {free / 2**30:.1f} GiB free "
                    f"(--pieces_per_pass sets it)")
