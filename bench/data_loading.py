"""Images per second of stage 1's training loader against torchvision's reference pipeline.

Both read the same ImageNet-layout ``train/`` folder with the same workers, side by side in one
process, alternating round by round, so machine noise hits both alike; the figure of merit is the
ratio of their images/s (ours / torchvision). In each round a loader starts its workers, is brought
to its steady state (its first batches, untimed), is timed, and shuts its workers down before the
other starts: a loader's idle workers would otherwise fill their queue on the cores the other is
timed on, which charges each loader with part of the other's work.

- ours: ``utils.data.batch_stream`` (workers decode, crop and flip, and hand over uint8 images;
  persistent workers), then ``to_device``: conversion and normalisation where the model runs,
  counted here (on ``--device``);
- torchvision's reference (``references/classification``): ``ImageFolder`` + PIL +
  ``RandomResizedCrop``, flip, ``ToTensor`` and ``Normalize`` in the workers, float32 batches.

    python -m bench.data_loading --generate /tmp/jpegs         # 1024 full-size JPEGs to read
    python -m bench.data_loading --data /tmp/jpegs --workers 2
"""
import argparse
import gc
import multiprocessing
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from bench.timing import timed
from utils.data import IMAGENET_MEAN, IMAGENET_STD, batch_stream, to_device, train_transform
from utils.runtime import load_back_ends


def generate(folder: Path, images: int, classes: int = 4, size: tuple[int, int] = (500, 375)) -> None:
    """``images`` JPEGs of ImageNet's typical size (500 x 375) under ``folder/train``: smooth colour
    fields with noise, which compress like photographs more than noise alone does."""
    gen = torch.Generator().manual_seed(0)
    w, h = size
    for i in range(images):
        out = folder / "train" / f"class{i % classes}" / f"{i}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        low = torch.rand(3, h // 25, w // 25, generator=gen)
        field = torch.nn.functional.interpolate(low[None], size=(h, w), mode="bicubic")[0]
        pixels = (field * 200 + torch.rand(3, h, w, generator=gen) * 55).clamp(0, 255).byte()
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(out, quality=90)


def reference_loader(folder: Path, batch_size: int, workers: int, size: int) -> DataLoader:
    transform = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    dataset = torchvision.datasets.ImageFolder(folder / "train", transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                      pin_memory=torch.cuda.is_available())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="an ImageNet-layout folder (its train/ is read)")
    parser.add_argument("--generate", type=Path, help="write full-size JPEGs to this folder and stop")
    parser.add_argument("--images", type=int, default=1024, help="how many JPEGs --generate writes")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per round and loader")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.generate:
        generate(args.generate, args.images)
        print(f"{args.images} JPEGs in {args.generate / 'train'}")
        return
    if args.data is None:
        parser.error("give --data (or --generate a folder first)")
    queued = 2 * max(args.workers, 1)  # DataLoader's prefetch: two batches per worker
    needed = (1 + queued + args.batches) * args.batch_size
    if len(list((args.data / "train").rglob("*.*"))) < needed:
        parser.error(f"{args.data / 'train'} holds fewer than the {needed} images a round of each loader "
                     "reads (a new pass would start the reference's workers again): --generate more")
    device = torch.device(args.device)
    ours_data = torchvision.datasets.ImageFolder(args.data / "train", train_transform(args.size))

    def ours(seed: int) -> tuple[Iterator, Callable]:
        return batch_stream(ours_data, args.batch_size, args.workers, seed=seed), \
            lambda item: to_device(item[2][0], device)

    def theirs(seed: int) -> tuple[Iterator, Callable]:
        torch.manual_seed(seed)  # its shuffle
        return iter(reference_loader(args.data, args.batch_size, args.workers, args.size)), \
            lambda item: item[0].to(device, non_blocking=True)

    def take(source: Iterator, convert: Callable, batches: int) -> None:
        for _ in range(batches):
            convert(next(source))

    def rate(start: Callable, seed: int) -> float:
        source, convert = start(seed)
        take(source, convert, 1 + queued)  # the workers are up and delivering at their pace
        _, seconds = timed(lambda: take(source, convert, args.batches), device)
        return args.batches * args.batch_size / seconds

    rates = {"ours": [], "torchvision": []}
    for round_ in range(args.rounds):
        for name, start in (("ours", ours), ("torchvision", theirs)):
            rates[name].append(rate(start, round_))
            gc.collect()  # the loader is gone: its workers stop before the other loader's start
            if multiprocessing.active_children():
                raise RuntimeError(f"{name}'s loader workers outlived their round")
    ratios = [a / b for a, b in zip(rates["ours"], rates["torchvision"], strict=True)]
    for name, values in rates.items():
        print(f"{name}: {statistics.median(values):.1f} images/s (rounds: "
              f"{', '.join(f'{v:.1f}' for v in values)})")
    print(f"ratio {statistics.median(ratios):.2f} (ours / torchvision, median of {args.rounds} rounds; "
          f"{args.workers} workers, batch {args.batch_size}, {args.size} px, {device})")


if __name__ == "__main__":
    load_back_ends()  # the CPU back end's fused kernels, where it is there (README, "Speed")
    main()
