"""Data: an ImageNet-layout folder, or the built-in Fashion-MNIST, with the reference transforms.

Run as ``python -m utils.data --prepare fashion-mnist --root data`` to unpack Fashion-MNIST once.
"""
import argparse
import functools
import gzip
import math
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from quant import fused

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
    """RandomResizedCrop + horizontal flip, as the reference's stage 1, to a uint8 tensor.

    The workers hand over uint8 images (a quarter of float32's bytes); ``to_device`` converts and
    normalises them where the model runs, to the values ``ToTensor`` + ``Normalize`` give.
    ``min_crop_scale`` is RandomResizedCrop's smallest area fraction (0.08, torchvision's and the
    reference's default); a 28-pixel image keeps little at 0.08, so small data may want more.
    """
    steps = [transforms.Grayscale(3)] if grayscale else []
    steps += [transforms.RandomResizedCrop(size, scale=(min_crop_scale, 1.0)),
              transforms.RandomHorizontalFlip(), transforms.PILToTensor()]
    return transforms.Compose(steps)


def val_transform(size: int, grayscale: bool = False) -> transforms.Compose:
    """Resize to ``size / 0.875`` and centre-crop ``size`` (256 / 224 at the defaults), to uint8."""
    steps = [transforms.Grayscale(3)] if grayscale else []
    steps += [transforms.Resize(int(size / 0.875)), transforms.CenterCrop(size), transforms.PILToTensor()]
    return transforms.Compose(steps)


_NORMALISATION: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to float32, scaled and normalised with the ImageNet mean and std by the
    arithmetic of ``ToTensor`` + ``Normalize``, so the values are theirs."""
    if images.device not in _NORMALISATION:
        _NORMALISATION[images.device] = tuple(
            torch.tensor(v, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
            for v in (IMAGENET_MEAN, IMAGENET_STD))
    mean, std = _NORMALISATION[images.device]
    return images.float().div_(255).sub_(mean).div_(std)


@functools.cache
def _normalisation_table(channels: int) -> torch.Tensor:
    """What each of the 256 values of each channel becomes (``normalise`` of them)."""
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, channels, 1, 256)
    return normalise(values.contiguous()).contiguous()


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch as the model takes it, on ``device``: uint8 images (the loaders') are copied there
    (without waiting, from pinned memory), then converted by ``normalise``; on the CPU in one pass
    through a table of ``normalise``'s 256 values per channel (the same values). Float images
    (already normalised) are only moved."""
    images = images.to(device, non_blocking=True)
    if images.dtype != torch.uint8:
        return images
    kernel = fused.path("normalise_images")  # a back end's one pass (quant.fused)
    if kernel is not None and images.dim() == 4:
        out = kernel(images, _normalisation_table(images.shape[1]))
        if out is not None:
            return out
    return normalise(images)


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
                      pin_memory=distributed.pin_memory())


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s augmentation in ``epoch``."""
    return ((seed * 1_000_003 + epoch) * 2_147_483_647 + index) % 2**63


class EpochSampler(Sampler[tuple[int, int]]):
    """A fresh permutation per epoch, drawn from ``(seed, epoch)`` alone, that can start mid-epoch;
    each index comes with the seed of its augmentation (``SeededSamples``).

    Because the order and the augmentation depend on nothing else, a resumed run reads exactly the
    batches the interrupted one would have read, whatever the number of loader workers or
    processes. ``set_epoch`` moves a persistent loader's sampler on.
    """

    def __init__(self, size: int, seed: int, epoch: int = 0, start: int = 0):
        self.size, self.seed = size, seed
        self.set_epoch(epoch, start)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Sample epoch ``epoch`` from its ``start``-th index on."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(self.size - self.start, 0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()[self.start:]
        return iter([(i, sample_seed(self.seed, self.epoch, i)) for i in order])


class ProcessShare(Protocol):
    """This process's part of a global batch: ``images`` images from image ``start`` on."""

    start: int
    images: int


# The size of a global batch -> this process's part of it: ``training.pieces.Share.of`` over the
# stage's replicas and processes, given by the stage (the pieces are training's, not the loader's).
Shares = Callable[[int], ProcessShare]


class ShareBatches(Sampler[list[tuple[int, int]]]):
    """The global batches of an ``EpochSampler``'s order, each as this process's share of it
    (``share``; default the whole batch), so that the processes' shares of batch ``b`` together are
    global batch ``b``, cut as the reference's ``nn.DataParallel`` cut it. ``drop_last=False`` keeps
    an epoch's last, partial batch."""

    def __init__(self, sampler: EpochSampler, batch_size: int, drop_last: bool, share: Shares | None = None):
        self.sampler, self.batch_size, self.drop_last, self.share = sampler, batch_size, drop_last, share
        self.stream: object | None = None  # the ``batch_stream`` it serves now

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Sample epoch ``epoch`` from global batch ``start`` on."""
        self.sampler.set_epoch(epoch, start * self.batch_size)

    def retarget(self, seed: int, drop_last: bool) -> None:
        """Serve another stream from the same loader: the order and augmentation of ``seed``. The
        sampler runs in the main process and hands each sample its seed (``SeededSamples``), so a
        persistent loader's workers serve any seed's stream, batch for batch as a new loader would."""
        self.sampler.seed, self.drop_last = seed, drop_last

    def __len__(self) -> int:
        return (len(self.sampler) // self.batch_size if self.drop_last
                else math.ceil(len(self.sampler) / self.batch_size))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        items = list(self.sampler)
        for b in range(len(self)):
            batch = items[b * self.batch_size:(b + 1) * self.batch_size]
            if self.share is None:
                yield batch
                continue
            mine = self.share(len(batch))
            yield batch[mine.start:mine.start + mine.images]


class SeededSamples(Dataset):
    """``dataset[index]`` with its random augmentation drawn from the seed the sampler gave it: the
    same crop of the same image at the same epoch in any worker, process or resumed run."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        # Only the CPU generator, which the transforms draw from: ``torch.manual_seed`` would seed
        # every device's too, at ~40x the cost, a few per cent of a sample's time.
        if torch.utils.data.get_worker_info() is not None:  # a loader worker: its generator is ours
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]
        with torch.random.fork_rng(devices=[]):  # the main process's generator stays as it was
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


def train_loader(dataset: Dataset, batch_size: int, workers: int, seed: int, drop_last: bool = True,
                 share: Shares | None = None) -> tuple[DataLoader, ShareBatches]:
    """A loader of training batches and its batch sampler (``set_epoch`` before iterating an epoch).

    ``batch_size`` is the global batch; under torchrun each process loads its ``share`` of it
    (``ShareBatches``). Its workers persist across epochs (no start-up per epoch) and
    return uint8 images (``to_device``); batches are pinned for a non-blocking copy when the stage
    computes on a GPU (``distributed.pin_memory``). ``drop_last=False`` keeps an epoch's last,
    partial batch (the reference's loaders do).
    """
    batches = ShareBatches(EpochSampler(len(dataset), seed), batch_size, drop_last, share)
    # The loader's own generator (for its workers' base seed, which the per-sample seeds make moot)
    # leaves the caller's generator alone.
    loader = DataLoader(SeededSamples(dataset), batch_sampler=batches,
                        num_workers=workers, persistent_workers=workers > 0,
                        pin_memory=distributed.pin_memory(),
                        generator=torch.Generator().manual_seed(seed))
    return loader, batches


def batch_stream(dataset: Dataset, batch_size: int, workers: int, seed: int, epoch: int = 0,
                 batch: int = 0, drop_last: bool = True, share: Shares | None = None,
                 source: tuple[DataLoader, ShareBatches] | None = None
                 ) -> Iterator[tuple[int, int, tuple[torch.Tensor, torch.Tensor]]]:
    """Endless training batches as ``(epoch, batch index, (images, labels))``, from any position:
    this process's share of each global batch of ``batch_size`` (``train_loader``). ``source``: a
    ``train_loader`` of this dataset, batch size and share made earlier (``started_loader``), whose
    persistent workers serve this stream, of this ``seed`` and ``drop_last`` (``retarget``), until
    another stream takes the loader over: this one then stops with an error rather than read the
    other's batches."""
    loader, batches = source or train_loader(dataset, batch_size, workers, seed, drop_last, share)
    me = object()
    while True:
        batches.retarget(seed, drop_last)
        batches.set_epoch(epoch, batch)
        batches.stream = me
        for index, item in enumerate(loader, batch):
            if batches.stream is not me:
                raise RuntimeError("a batch_stream resumed after another stream took its loader over")
            yield epoch, index, item
        epoch, batch = epoch + 1, 0


def started_loader(dataset: Dataset, batch_size: int, workers: int, seed: int, epoch: int = 0, batch: int = 0,
                   drop_last: bool = True, share: Shares | None = None) -> tuple[DataLoader, ShareBatches]:
    """A ``train_loader`` whose workers start now, reading from ``(epoch, batch)`` on, to serve every
    ``batch_stream`` of a stage (``source``), whatever its seed: stage 1's phases, stage 3's archs.

    A worker is a fork of the process: it shares the process's memory as it is at that moment, and
    each page the process writes afterwards is copied. Workers forked once the training step's memory
    has grown (a new loader for stage 1's phase 2, formerly) keep that heap alive beside the one the
    process goes on writing, which doubles it (12 GB more at the ImageNet defaults on a CPU host).
    Started before the first step and persistent, the workers share only the small process they
    forked from; the data order is the sampler's, the same however the loader is made.

    Rather than workers started late from a small process (a ``forkserver`` or ``spawn`` context):
    each of those starts an interpreter, imports torch and unpickles the dataset (ImageNet's list
    of 1.28 M files) per worker, seconds per loader (measured to a first batch of Fashion-MNIST,
    2 workers, on 2 busy cores: fork 0.2 s, forkserver 9.4 s, spawn 12.4 s), paid per arch, or per
    candidate where stage 2 streams a fold, where a persistent worker costs nothing per stream;
    the order is the same either way.
    """
    loader, batches = train_loader(dataset, batch_size, workers, seed, drop_last, share)
    batches.set_epoch(epoch, batch)
    iter(loader)  # persistent workers: the loader keeps this iterator and resets it for each epoch
    return loader, batches


Batch = tuple[torch.Tensor, torch.Tensor]


class BatchIndices(Sampler[list[int]]):
    """The samples of the validation batches at ``indices`` (set before each pass), whole batches
    in order: what a persistent loader decodes next."""

    def __init__(self, size: int, batch_size: int):
        self.size, self.batch_size, self.indices = size, batch_size, []

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.indices:
            yield list(range(b * self.batch_size, min((b + 1) * self.batch_size, self.size)))


class ValidationBatches:
    """The validation set in its fixed order, by batch index (folds are batch indices), as uint8.

    When all ``count`` batches fit in ``cache_bytes`` (``keeps_all``), a batch is decoded the
    first time it is asked for and kept: a process decodes only the batches it uses (its folds, and
    the full-accuracy batches), each once. Otherwise (ImageNet's 50,000 images over
    ``--val_cache_gb``) a batch is decoded each time it is asked for, and only the batches asked for
    are (``stream``); ``kept`` holds a subset, a searched fold, decoded once for all of its
    candidates. Kept batches are in ordinary memory: only batches streamed to a GPU, those in
    flight, are pinned.

    One loader decodes every batch, its workers started here, before a stage's memory grows (the
    cache, a search's prefix cache, a training step's heap): a loader made for each pass would fork
    its workers from that grown process, and each page the process then writes would be copied
    (``started_loader``).
    """

    def __init__(self, dataset: Dataset, batch_size: int, workers: int, max_batches: int = 0,
                 cache_bytes: float = 8e9):
        self.dataset, self.batch_size = dataset, batch_size
        total = math.ceil(len(dataset) / batch_size)
        self.count = total if max_batches <= 0 else min(max_batches, total)
        image = dataset[0][0]
        self.batch_bytes = image.numel() * image.element_size() * batch_size
        self.cache_bytes = cache_bytes
        self.keeps_all = self.count * self.batch_bytes <= cache_bytes
        self.decoded: dict[int, Batch] = {}  # what ``keeps_all`` kept so far
        self.asked = BatchIndices(len(dataset), batch_size)
        # Pinned where streamed to a GPU; its own generator: decoding when first asked (any time in
        # a stage) leaves the global one alone, which draws the training augmentation.
        self.loader = DataLoader(dataset, batch_sampler=self.asked, num_workers=workers,
                                 persistent_workers=workers > 0,
                                 pin_memory=not self.keeps_all and distributed.pin_memory(),
                                 generator=torch.Generator())
        if workers > 0:
            iter(self.loader)  # the workers start now and wait for ``asked``

    def __len__(self) -> int:
        return self.count

    def stream(self, indices: Iterable[int]) -> Iterator[Batch]:
        """The batches at ``indices``, in index order, from memory or decoded now (those alone)."""
        wanted = sorted(set(indices))
        if wanted and not 0 <= wanted[0] <= wanted[-1] < self.count:
            raise IndexError(f"batch index {wanted[-1]} is beyond the {self.count} validation batches")
        decoded = self._decode([i for i in wanted if i not in self.decoded])
        for i in wanted:
            if i not in self.decoded:
                batch = next(decoded)
                if not self.keeps_all:
                    yield batch
                    continue
                self.decoded[i] = batch
            yield self.decoded[i]

    def _decode(self, indices: list[int]) -> Iterator[Batch]:
        if not indices:
            return
        self.asked.indices = indices
        yield from self.loader

    def kept(self, indices: Sequence[int]) -> list[Batch] | None:
        """The batches at ``indices`` in memory (not pinned), for scoring many candidates on them:
        decoded once here unless all are kept; ``None`` when they do not fit in ``cache_bytes``
        either (then each candidate streams them). ``PrefixScorer.on_device`` moves them to a GPU
        where they fit."""
        if self.keeps_all:
            return list(self.stream(indices))
        if len(indices) * self.batch_bytes > self.cache_bytes:
            return None
        copy = self.loader.pin_memory  # out of the streams' pinned memory: GBs pinned would lock them
        return [(images.clone(), labels.clone()) if copy else (images, labels)
                for images, labels in self._decode(sorted(set(indices)))]


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
