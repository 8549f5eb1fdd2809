"""Small generated image folders for checks: ImageNet-layout ``train/`` and ``val/``."""
from pathlib import Path

import torch
from PIL import Image


def make_image_folder(root: Path, classes: int = 3, train_per_class: int = 12, val_per_class: int = 8,
                      size: int = 36, suffix: str = "png") -> Path:
    """An ImageNet-layout folder of small images (PNG, or JPEG) whose class is visible in the colour."""
    gen = torch.Generator().manual_seed(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = torch.rand(size, size, 3, generator=gen) * 96
                pixels[..., c % 3] += 128
                Image.fromarray(pixels.byte().numpy()).save(folder / f"{i}.{suffix}")
    return root
