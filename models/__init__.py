"""BASQ supernets: ``build_supernet`` is the one entry point.

Every module of this package is imported here, so that each architecture registers itself
(``models.registry``): adding one is one module in ``models/``.
"""
import importlib
import pkgutil
from collections.abc import Sequence

from .registry import architecture, archs, register_supernet
from .supernet import PathBlock, SinglePath, Supernet
from .units import QUANTIZERS

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build_supernet(arch: str, num_classes: int, bits: int, l2_vals: Sequence[float],
                   width_multiplier: float = 1.0, width_divisor: int = 1,
                   depth_multiplier: float = 1.0, resolution_multiplier: float = 1.0,
                   base_resolution: int = 224, quantizer: str = "basq",
                   small_input_stem: bool = False) -> Supernet:
    """Build a supernet with one branch per candidate L2 decay in ``l2_vals``.

    ``resolution_multiplier`` and ``base_resolution`` fix the input size the data pipeline uses;
    they are kept in ``config`` so that checkpoints say what they were trained at.

    ``quantizer`` is ``basq`` (the method) or one of the reproduction's baselines, same network
    and blocks with a single branch and no L2 decays (``l2_vals`` is ignored and saved empty):
    ``lsq``, an LSQ quantizer in place of each searched clip (a step per channel, the reference's);
    ``lsq-tensor``, the same with a step per tensor (the LSQ paper's), in MobileNet-v2's always-on
    LSQ quantizers too; ``float``, no quantizer at all.
    ``small_input_stem`` keeps the first stage at the input's resolution (stride-1 stem; no
    max-pool in the ResNet) for 28-64 px images; the ImageNet stem is the default.
    """
    build = architecture(arch).build
    if quantizer not in QUANTIZERS:
        raise ValueError(f"quantizer {quantizer!r} is unknown; choose one of {', '.join(QUANTIZERS)}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    l2_vals = [float(v) for v in l2_vals] if quantizer == "basq" else []
    if quantizer == "basq" and not l2_vals:
        raise ValueError("l2_vals is empty: give at least one candidate L2 decay")
    if any(not v > 0 for v in l2_vals):
        raise ValueError(f"l2_vals must all be positive decays, got {l2_vals}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    for name, value in (("width_multiplier", width_multiplier), ("depth_multiplier", depth_multiplier),
                        ("resolution_multiplier", resolution_multiplier),
                        ("width_divisor", width_divisor), ("base_resolution", base_resolution)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
    config = dict(arch=arch, num_classes=num_classes, bits=bits, l2_vals=l2_vals,
                  width_multiplier=width_multiplier, width_divisor=width_divisor,
                  depth_multiplier=depth_multiplier, resolution_multiplier=resolution_multiplier,
                  base_resolution=base_resolution, quantizer=quantizer,
                  small_input_stem=bool(small_input_stem))
    model = build(num_classes, bits, l2_vals, width_multiplier, width_divisor, depth_multiplier,
                  quantizer, small_input_stem)
    model.config = config
    return model


__all__ = ["QUANTIZERS", "PathBlock", "SinglePath", "Supernet", "architecture", "archs", "build_supernet",
           "register_supernet"]
