"""The authors' published search result, which their stage 3 has as defaults (SPEC section 5).

Source: the BASQ authors' README (ImageNet, MobileNet-v2, 2-bit, their released supernet
``model_actwbin_best_466000it.pth``), as recorded in this project's ``shared/reference_results.md``.
The block is kept as their stage 2 printed it, and read by the same parser as a user's paste.
"""
from typing import Any

from utils.cli import REFERENCE_L2_BOUNDS

TOTAL_RESULT = """\
===total-result===
[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
fold_accs: [67.62, 66.2, 64.86, 68.94, 55.18, 58.96, 54.82, 56.46, 53.54, 63.48]
full_accs: [59.30222222222222, 59.29333333333334, 59.26222222222222, 58.67777777777778, 59.733333333333334, 59.15777777777778, 60.01111111111111, 60.45333333333333, 60.10888888888889, 59.53333333333333]
archs: [(5, 3, 2, 2, 1, 1, 6, 6, 1, 2, 4, 6, 0, 3, 3, 5, 5), (1, 4, 5, 0, 5, 2, 3, 6, 4, 5, 6, 6, 6, 6, 3, 2, 5), (1, 4, 5, 0, 2, 5, 5, 2, 5, 2, 1, 1, 2, 2, 6, 4, 5), (1, 4, 5, 1, 1, 2, 4, 6, 2, 1, 2, 6, 4, 2, 6, 4, 5), (1, 4, 5, 5, 1, 5, 1, 5, 6, 5, 4, 1, 6, 4, 3, 2, 3), (5, 3, 2, 2, 6, 6, 5, 0, 5, 5, 6, 6, 4, 6, 5, 0, 2), (1, 4, 5, 1, 6, 2, 6, 4, 2, 1, 1, 6, 4, 0, 6, 4, 5), (5, 3, 2, 2, 1, 1, 4, 2, 1, 2, 4, 6, 0, 0, 3, 6, 5), (1, 4, 5, 5, 6, 5, 2, 3, 5, 6, 3, 6, 5, 2, 6, 0, 2), (5, 3, 2, 2, 4, 1, 4, 2, 1, 4, 6, 6, 0, 4, 3, 2, 5)]
"""  # noqa: E501

# What their stage 3 printed for these archs (``**bnfull_accs``), for comparison.
BNFULL_ACCS = [63.95, 64.02, 64.28, 63.89, 65.46, 65.1, 65.23, 65.32, 65.4, 64.49]

# The model these archs belong to: the ImageNet defaults of the three stages, and k = 10 folds.
CONFIG = dict(arch="mobilenet_v2", quantizer="basq", num_classes=1000, bits=2, l2_vals=REFERENCE_L2_BOUNDS,
              width_multiplier=1.0, width_divisor=1, depth_multiplier=1.0, resolution_multiplier=1.0,
              base_resolution=224, small_input_stem=False)
K = 10
SOURCE = "the authors' published search result (their README: ImageNet, MobileNet-v2, 2-bit)"


def belongs_to(config: dict[str, Any], k: int) -> bool:
    """Whether the published archs are archs of the model ``config`` describes, split in ``k`` folds."""
    return k == K and all(config.get(key) == value for key, value in CONFIG.items())
