"""BASQ's CPU back end: fused C kernels (``kernels.c``) that give the model's values bit for bit.

It plugs in from above: importing it registers its fused paths with ``quant.fused`` (the stages
import it through ``utils.runtime.load_back_ends``); without it, or with ``BASQ_NATIVE=0``, the
project runs the PyTorch definitions, slower. ``library`` builds the kernels with the machine's C
compiler at first use and runs each once-per-process check; the rest wraps them:

- ``quantizers``: the clip and LSQ quantizers in one pass (``"quantizers"``);
- ``units``: a unit of the supernets (``"unit"``), through ``eval_unit`` (a unit in evaluation as
  two passes) and ``train_batch_norm`` (training-mode BatchNorm with what follows it, described by
  ``after``), checked against the model's own formula on the units of ``checks``;
- ``images``: uint8 images to normalised float32 in one pass (``"normalise_images"``).

Each returns to PyTorch's ops wherever the kernels do not apply: a GPU, other dtypes or layouts,
``BASQ_NATIVE=0``, no compiler, a machine whose PyTorch rounds BatchNorm otherwise, or a formula
that no longer matches the kernels. Nothing here imports ``utils`` or what stands on it.
"""
from quant import fused

from . import images, quantizers, units

fused.register("quantizers", quantizers)
fused.register("unit", units.forward)
fused.register("normalise_images", images.normalise_images)
