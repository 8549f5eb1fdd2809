"""The stages keep freed memory in the process (glibc), so big tensors are reused, not re-mapped."""
import subprocess
import sys

import pytest

from .conftest import ROOT

# Allocates and frees a 64 MiB tensor, then reports glibc's heap counters (mallinfo2): the bytes
# in mmap'ed blocks and the free bytes kept in the heap.
PROBE = """
import ctypes, sys, torch
from utils.cpu_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
x = torch.ones(2**24)
del x
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
info = libc.mallinfo2()
print(info.hblkhd, info.fordblks)
"""


def heap_after_free(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    mapped, free_in_heap = map(int, out.split())
    return mapped, free_in_heap


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_a_freed_big_tensor_stays_in_the_heap_for_reuse():
    _, free_default = heap_after_free("default")
    mapped, free_kept = heap_after_free("keep")
    assert free_default < 2**26  # by default the 64 MiB block was unmapped on free
    assert free_kept >= 2**26 and mapped < 2**26
