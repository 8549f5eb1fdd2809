"""Where a back end plugs in its fused paths: the quantizers, the unit, the images' conversion.

``quant`` and ``models`` are pure PyTorch and import no back end. Each quantizer function
(``quant.functional``), the unit (``models.units.unit_forward``) and ``utils.data.to_device`` ask
``path(name)`` for a back end's fused path and run their PyTorch definition where none is
registered, where the path declines (it does not apply, or returns ``None``), or inside
``pytorch_only()``. A back end registers itself from above when it is imported (``cpu_kernels``;
the entry points import it through ``utils.runtime.load_back_ends``), and checks its paths against
these PyTorch definitions, run inside ``pytorch_only()`` (README, "Speed").

The names: ``"quantizers"`` (an object with ``applies(*tensors)``, ``clip_forward``,
``clip_backward``, ``lsq_forward``, ``lsq_backward``), ``"unit"`` (``unit(x, *parts)``, a tensor or
``None``) and ``"normalise_images"`` (``normalise_images(images, table)``, a tensor or ``None``).
"""
import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

NAMES = ("quantizers", "unit", "normalise_images")

_PATHS: dict[str, Any] = {}
_OFF: contextvars.ContextVar[bool] = contextvars.ContextVar("basq_pytorch_only", default=False)


def register(name: str, fused_path: Any) -> None:
    """A back end's fused path for ``name`` (one of ``NAMES``), replacing any registered before."""
    if name not in NAMES:
        raise ValueError(f"no fused path is called {name!r}; the names are {', '.join(NAMES)}")
    _PATHS[name] = fused_path


def path(name: str) -> Any | None:
    """The fused path registered for ``name``; ``None`` where there is none or inside ``pytorch_only``."""
    return None if _OFF.get() else _PATHS.get(name)


@contextlib.contextmanager
def pytorch_only() -> Iterator[None]:
    """Inside: every quantizer and unit runs its PyTorch definition (the back end off)."""
    token = _OFF.set(True)
    try:
        yield
    finally:
        _OFF.reset(token)
