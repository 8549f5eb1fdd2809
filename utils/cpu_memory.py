"""Keep freed memory in the process, so that big CPU tensors are not page-faulted in at every step.

glibc serves every allocation over 32 MiB with its own ``mmap`` and unmaps it on ``free``; the next
tensor of that size is mapped again and touched page by page. A training step allocates and frees
such tensors by the hundred (a 16 x 96 x 112 x 112 activation is 77 MB), so on the CPU the page
faults can cost more than the arithmetic (README, "Speed", has the measurements). PyTorch's CPU tuning guide
recommends jemalloc or tcmalloc for this; ``mallopt`` gets the same from the C library already
loaded, with nothing to install.
"""
import ctypes
import ctypes.util
import os
import sys

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Serve allocations up to 1 GiB from the heap and keep freed memory for reuse (glibc only).

    The process keeps its peak memory instead of returning it to the system between steps.
    Returns whether the setting took (False on other platforms and C libraries).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def process_tree_pss(pid: int | None = None) -> int:
    """Bytes of memory of process ``pid`` (default: this one) and its descendants (loader workers),
    each page shared between them counted once (the sum of their proportional set sizes, Linux's
    ``smaps_rollup``); 0 where there is no ``/proc``."""
    pending, total = [pid or os.getpid()], 0
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:")) * 1024
            with open(f"/proc/{current}/task/{current}/children") as f:
                pending += [int(child) for child in f.read().split()]
        except (OSError, StopIteration):  # gone meanwhile, or no /proc
            continue
    return total
