"""The oldest torch the project runs on, checked first by every script: an older one stops with one
line instead of an ``AttributeError`` from inside an import or a ``TypeError`` mid-run.

2.5: ``torch.OutOfMemoryError`` (new in 2.5; ``utils.runtime``'s annotations evaluate it at import),
and from earlier 2.x releases ``torch.amp.GradScaler(device)`` and ``init_process_group(device_id=...)``.
``make torch-floor`` imports every module and runs stage 1 under exactly this release (README,
"Two commands"); ``requirements.txt`` names the same floor (tested).
"""
import torch

TORCH_FLOOR = (2, 5)


def release(version: str) -> tuple[int, int]:
    """``"2.5.1+cu124"`` as ``(2, 5)``."""
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def check_torch(version: str = torch.__version__) -> None:
    """Stop with one line (exit status 1, no traceback) under a torch older than ``TORCH_FLOOR``."""
    if release(version) < TORCH_FLOOR:
        floor = ".".join(map(str, TORCH_FLOOR))
        raise SystemExit(f"error: torch {version} is older than {floor}, the oldest this project runs on: "
                         f"install torch>={floor} (pip install -r requirements.txt; on a GPU node, a CUDA "
                         f"build of torch {floor} or later from pytorch.org)")


check_torch()
