"""The architectures, each registered by its own module (``@register_supernet``), timm-style.

Adding an architecture is one module in ``models/`` (or anywhere imported before the model is
built): a ``Supernet`` subclass that builds its blocks, ``stages()`` and ``path(selection)``, under
``@register_supernet("name", "Title")``. ``models`` imports every module of the package, so the
name is then a ``--arch`` choice and ``build_supernet`` builds it; nothing else names it.
"""
from collections.abc import Callable
from dataclasses import dataclass

from .supernet import Supernet


@dataclass(frozen=True)
class Architecture:
    name: str
    title: str  # as tables and plots name it
    build: Callable[..., Supernet]  # (num_classes, bits, l2_vals, width_multiplier, width_divisor,
    #                                  depth_multiplier, quantizer, small_input_stem)


_ARCHITECTURES: dict[str, Architecture] = {}


def register_supernet(name: str, title: str) -> Callable[[Callable[..., Supernet]], Callable[..., Supernet]]:
    """Register ``build`` (a ``Supernet`` class or a function returning one) under ``name``."""
    def register(build: Callable[..., Supernet]) -> Callable[..., Supernet]:
        if name in _ARCHITECTURES and _ARCHITECTURES[name].build is not build:
            raise ValueError(f"an architecture called {name!r} is registered already")
        _ARCHITECTURES[name] = Architecture(name, title, build)
        return build
    return register


def archs() -> tuple[str, ...]:
    """The registered architectures' names."""
    return tuple(_ARCHITECTURES)


def architecture(name: str) -> Architecture:
    """The architecture registered under ``name``; a ``ValueError`` naming the choices otherwise."""
    if name not in _ARCHITECTURES:
        raise ValueError(f"arch {name!r} is unknown; choose one of {', '.join(_ARCHITECTURES)}")
    return _ARCHITECTURES[name]
