"""Data: an ImageNet-layout folder, or the built-in Fashion-MNIST, with the reference transforms.

Run as ``python -m utils.data --prepare fashion-mnist --root data`` to unpack Fashion-MNIST once.
"""
import argparse
import gzip
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from . import distributed
from .errors import DataError
from .files import atomic_path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST = "fashion-mnist"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass
class Datasets:
    train: Dataset
    val: Dataset
    num_classes: int


def rank_seed(seed: int, rank: int) -> int:
    """A seed of its own for each rank of a distributed run; rank 0 keeps ``seed``.

    The stride is a prime above any count of epochs (``seed + epoch`` seeds the loaders) and
    below 2**32, the part of a seed torch's generator keeps.
    """
    return seed + rank * 1_000_003


def resolution(base_resolution: int, resolution_multiplier: float) -> int:
    return int(base_resolution * resolution_multiplier)


def train_transform(size: int, grayscale: bool = False, min_crop_scale: float = 0.08) -> transforms.Compose:
    """RandomResizedCrop + horizontal flip + ImageNet normalisation, as the reference's stage 1.

    ``min_crop_scale`` is RandomResizedCrop's smallest area fraction (0.08, torchvision's and the
    reference's default); a 28-pixel image keeps little at 0.08, so small data may want more.
    """
    steps = [transforms.Grayscale(3)] if grayscale else []
    steps += [transforms.RandomResizedCrop(size, scale=(min_crop_scale, 1.0)),
              transforms.RandomHorizontalFlip(), transforms.ToTensor(),
              transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


def val_transform(size: int, grayscale: bool = False) -> transforms.Compose:
    """Resize to ``size / 0.875`` and centre-crop ``size`` (256 / 224 at the defaults)."""
    steps = [transforms.Grayscale(3)] if grayscale else []
    steps += [transforms.Resize(int(size / 0.875)), transforms.CenterCrop(size),
              transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


def prepare_fashion_mnist(root: str | Path) -> Path:
    """Make ``root/FashionMNIST/raw`` hold the four files; returns ``root``.

    Debian's package ships them recompressed (torchvision's checksums fail), so they are
    decompressed into place; without the package, torchvision's downloader fetches them.
    """
    root = Path(root)
    raw = root / "FashionMNIST" / "raw"
    if all((raw / name).is_file() for name in FASHION_MNIST_FILES):
        return root
    if all((DEBIAN_FASHION_MNIST / f"{name}.gz").is_file() for name in FASHION_MNIST_FILES):
        raw.mkdir(parents=True, exist_ok=True)
        for name in FASHION_MNIST_FILES:
            with atomic_path(raw / name) as tmp, gzip.open(DEBIAN_FASHION_MNIST / f"{name}.gz") as src, \
                    open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return root
    try:
        torchvision.datasets.FashionMNIST(root, train=True, download=True)
        torchvision.datasets.FashionMNIST(root, train=False, download=True)
    except Exception as e:  # the downloader raises URLError, HTTPError, RuntimeError...
        raise DataError(
            f"Fashion-MNIST is not in {raw} and could not be downloaded ({e}); install the Debian "
            "package dataset-fashion-mnist or copy the four *-ubyte files there") from None
    return root


def _image_folder(path: Path, transform: transforms.Compose) -> torchvision.datasets.ImageFolder:
    if not path.is_dir():
        raise DataError(f"{path}: missing; --data must hold train/ and val/ with one folder per class")
    try:
        return torchvision.datasets.ImageFolder(path, transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{path}: {e}") from None


def build_datasets(data: str, size: int, root: str | Path = "data", min_crop_scale: float = 0.08) -> Datasets:
    """``data`` is ``fashion-mnist`` or an ImageNet-layout folder with ``train/`` and ``val/``."""
    if data == FASHION_MNIST:
        root = prepare_fashion_mnist(root)
        train = torchvision.datasets.FashionMNIST(
            root, train=True, transform=train_transform(size, True, min_crop_scale))
        val = torchvision.datasets.FashionMNIST(root, train=False, transform=val_transform(size, True))
        return Datasets(train, val, len(train.classes))
    folder = Path(data)
    if not folder.is_dir():
        raise DataError(f"--data {data}: no such folder (give an ImageNet-layout folder or "
                        f"'{FASHION_MNIST}')")
    train = _image_folder(folder / "train", train_transform(size, min_crop_scale=min_crop_scale))
    val = _image_folder(folder / "val", val_transform(size))
    if train.classes != val.classes:
        raise DataError(f"{folder}: train/ and val/ have different class folders "
                        f"({len(train.classes)} and {len(val.classes)})")
    return Datasets(train, val, len(train.classes))


def stage_datasets(args: argparse.Namespace) -> Datasets:
    """The data a stage's flags describe; under torchrun rank 0 unpacks or downloads it first."""
    with distributed.main_first():
        return build_datasets(args.data, resolution(args.base_resolution, args.resolution_multiplier),
                              args.data_root, args.min_crop_scale)


def val_loader(dataset: Dataset, batch_size: int, workers: int) -> DataLoader:
    """The validation set in its fixed order (folds are defined by batch index)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=torch.cuda.is_available())


class EpochSampler(Sampler[int]):
    """A fresh permutation per epoch, drawn from ``(seed, epoch)`` alone, that can start mid-epoch.

    Because the order depends on nothing else, a resumed run reads exactly the batches the
    interrupted one would have read. With ``num_replicas > 1`` each rank takes every
    ``num_replicas``-th index of the same permutation, as ``DistributedSampler`` does, so that
    batch ``b`` of every rank together is global batch ``b``. The tail that does not split evenly
    is dropped: every rank then has as many batches per epoch, and the ranks stay in step.
    """

    def __init__(self, size: int, seed: int, epoch: int, start: int = 0,
                 num_replicas: int = 1, rank: int = 0):
        self.size, self.seed, self.epoch, self.start = size, seed, epoch, start
        self.num_replicas, self.rank = num_replicas, rank

    def __len__(self) -> int:
        return max(self.size - self.start, 0) // self.num_replicas

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        return order[self.start:self.start + len(self) * self.num_replicas][self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())


def epoch_loader(dataset: Dataset, batch_size: int, workers: int, seed: int, epoch: int, batch: int = 0,
                 num_replicas: int = 1, rank: int = 0, drop_last: bool = True) -> DataLoader:
    """Epoch ``epoch`` of the training batches in the ``EpochSampler`` order, from global batch
    ``batch`` on; ``drop_last=False`` keeps the last, partial batch (stage 3's whole epochs).

    The loader's generator, which seeds the workers' augmentation, differs per rank (rank 0 keeps
    the single-process seed), so the ranks do not crop their images alike.
    """
    sampler = EpochSampler(len(dataset), seed, epoch, batch * batch_size * num_replicas, num_replicas, rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=workers, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(rank_seed(seed + epoch, rank)))


def batch_stream(dataset: Dataset, batch_size: int, workers: int, seed: int, epoch: int = 0,
                 batch: int = 0, num_replicas: int = 1, rank: int = 0
                 ) -> Iterator[tuple[int, int, tuple[torch.Tensor, torch.Tensor]]]:
    """Endless training batches as ``(epoch, batch index, (images, labels))``, from any position.

    ``batch_size`` is per process and ``batch`` counts global batches; incomplete last batches
    are dropped (``epoch_loader``).
    """
    while True:
        loader = epoch_loader(dataset, batch_size, workers, seed, epoch, batch, num_replicas, rank)
        for index, item in enumerate(loader, batch):
            yield epoch, index, item
        epoch, batch = epoch + 1, 0


def initialisation_batch(dataset: Dataset, batch_size: int, workers: int, seed: int,
                         num_replicas: int = 1, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch stage 1 initialises the LSQ steps from, drawn for that purpose as the reference's
    ``initialize()`` draws it: not one of the training batches (it is epoch -1 of the sampler)."""
    return next(batch_stream(dataset, batch_size, workers, seed, epoch=-1, num_replicas=num_replicas,
                             rank=rank))[2]


def cache_batches(loader: DataLoader, max_batches: int = 0, limit_bytes: float = 4e9
                  ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]] | DataLoader, int]:
    """The loader's batches in memory when they fit in ``limit_bytes``, else the loader itself;
    and the number of batches to use.

    Scoring hundreds of candidates on the same batches then costs no decoding; an ImageNet-sized
    validation set is streamed instead. ``max_batches`` > 0 keeps only the first ones.
    """
    count = len(loader) if max_batches <= 0 else min(max_batches, len(loader))
    first_images, _ = next(iter(loader))
    per_batch = first_images.element_size() * first_images.numel()
    if count * per_batch > limit_bytes:
        return loader, count
    batches = []
    for i, batch in enumerate(loader):
        if i == count:
            break
        batches.append(batch)
    return batches, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prepare", choices=[FASHION_MNIST], required=True)
    parser.add_argument("--root", default="data")
    args = parser.parse_args()
    try:
        root = prepare_fashion_mnist(args.root)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"Fashion-MNIST ready in {root / 'FashionMNIST' / 'raw'}")


if __name__ == "__main__":
    main()
