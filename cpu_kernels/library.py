"""The fused CPU kernels of ``kernels.c``, compiled with the machine's C compiler at first use.

The quantizers and the units call them on contiguous float32 CPU tensors and fall back to
PyTorch's ops (same forward values, bit for bit; slower) everywhere else: on a GPU, under bfloat16
autocast, with ``BASQ_NATIVE=0``, or where no compiler works (a warning says so, once). The library
is built with ``-march=native`` into ``$BASQ_CACHE`` (default ``~/.cache/basq``), named by a hash
of the source, the compiler, its flags and the CPU, and renamed into place when complete, so
processes started together (torchrun) can build it at the same time.
"""
import concurrent.futures
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")

SOURCE = Path(__file__).with_name("kernels.c")
# -ffp-contract=off: no fused multiply-add, so every value is rounded as PyTorch's ops round it.
FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
TUNINGS = (["-march=native"], [])  # the second when the compiler does not know -march=native

# Pointers go in as addresses (``ptr``): ctypes converts an int to void* faster than it casts.
_ptr = ctypes.c_void_p
_i64, _f32, _int = ctypes.c_int64, ctypes.c_float, ctypes.c_int


class After(ctypes.Structure):
    """``after_t`` of kernels.c: what follows a BatchNorm in the same pass."""
    NONE, RELU_SKIP, CLIP, LSQ = range(4)
    _fields_ = [("kind", _int), ("skip", _ptr), ("skip_channels", _i64), ("upper", _f32),
                ("delta", _f32), ("clip", _f32), ("step", _ptr), ("lo", _f32), ("hi", _f32)]


SIGNATURES = {
    "clip_forward": (None, [_ptr, _ptr, _i64, _f32, _f32, _int]),
    "clip_backward": (ctypes.c_double, [_ptr, _ptr, _ptr, _i64, _f32, _int]),
    "lsq_forward": (None, [_ptr, _ptr, _ptr, _i64, _i64, _i64, _f32, _f32, _int]),
    "lsq_backward": (None, [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64,
                            _f32, _f32, _int]),
    "bn_quantize": (None, [_ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr, _ptr, ctypes.POINTER(After),
                           _int]),
    "bn_relu_skip_bn": (None, [_ptr, _ptr, _ptr, *[_i64] * 7, _int, *[_ptr] * 6,
                               _int]),
    "bn_train_forward": (None, [_ptr, _ptr, _i64, _i64, _i64, _i64, *[_ptr] * 4, _f32, ctypes.c_double,
                                *[_ptr] * 4, ctypes.POINTER(After), _int]),
    "bn_train_backward": (None, [_ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, *[_ptr] * 4,
                                 ctypes.POINTER(After), *[_ptr] * 3, _int]),
    "normalize_images": (None, [_ptr, _ptr, _i64, _i64, _i64, _ptr]),
}


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))


def _compiler_version(cc: str) -> str:
    return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout


def _build(cc: str, flags: list[str], cache: Path) -> Path:
    key = "\n".join([SOURCE.read_text(), cc, _compiler_version(cc), " ".join(flags), platform.machine(),
                     _cpu_id()])
    target = cache / f"basq_kernels_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if not target.exists():  # built beside the target, renamed when complete
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            built = Path(tmp) / target.name
            subprocess.run([cc, *flags, str(SOURCE), "-o", str(built)], check=True, capture_output=True,
                           text=True, timeout=300)
            os.replace(built, target)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or ``None`` (turned off, or no working compiler: warns once)."""
    if os.environ.get("BASQ_NATIVE", "1") == "0":
        return None
    cc = shutil.which(os.environ.get("CC", "cc"))
    cache = Path(os.environ.get("BASQ_CACHE", Path.home() / ".cache" / "basq"))
    errors = []
    for tuning in TUNINGS if cc else ():
        try:
            lib = ctypes.CDLL(str(_build(cc, FLAGS + tuning, cache)))
        except (OSError, subprocess.SubprocessError) as e:
            errors.append((getattr(e, "stderr", None) or str(e)).strip())
            continue
        for name, (restype, argtypes) in SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        return lib
    reason = errors[-1] if errors else f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH"
    warnings.warn(f"BASQ's fused CPU kernels are not available ({reason}); the quantizers use "
                  f"PyTorch's ops instead: the same results, slower. Set BASQ_NATIVE=0 to silence this.",
                  stacklevel=2)
    return None


def bookkeeping(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn``, the kernels' bookkeeping around a call (shapes, pointers, buffers), with torch
    function handling off: it computes nothing a function mode should see, and a mode
    (``training.pieces.one_pass``'s, in a training forward) would cost a Python call for each of
    its thousands of tensor methods and attributes per step."""
    @functools.wraps(fn)
    def run(*args, **kwargs) -> T:
        with torch._C.DisableTorchFunction():
            return fn(*args, **kwargs)
    return run


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors (and are built)."""
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            return False
    return library() is not None


def ptr(t: torch.Tensor | None) -> int | None:
    """The address of the tensor's data (NULL for ``None``); the caller holds the tensor."""
    return None if t is None else t.data_ptr()


def threads() -> int:
    return torch.get_num_threads()


def checked_once(matches: Callable[..., bool], warning: str) -> Callable[..., bool]:
    """``matches`` (a comparison of kernels with PyTorch's ops) run once per process and
    arguments, leaving the caller's random stream as it was; ``warning`` when it fails. The result
    has ``cache_clear``, for tests.

    It runs in a thread of its own: the first use comes in the middle of a forward, whose
    thread-local settings (autocast, grad and inference modes, a training pass's pieces and its
    function mode, ``training.pieces.one_pass``) must not reach the comparison."""
    def run(*args) -> bool:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            return matches(*args)

    @functools.cache
    def is_exact(*args) -> bool:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            if pool.submit(run, *args).result():
                return True
        warnings.warn(warning, stacklevel=3)
        return False
    return is_exact
