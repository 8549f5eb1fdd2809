"""The frozen full-precision teacher of stage 1, and a command that trains one for small data.

``--teacher`` takes a torchvision classification model name (ImageNet weights through the weights
API), a path to a full-precision checkpoint written by this module, or ``none``.

Train a teacher for the built-in data (the demo does this)::

    python -m training.teacher --data fashion-mnist --arch resnet18 --epochs 2 \
        --out teacher/fashion-mnist-resnet18.pth
"""
import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils.checkpoint import load_file, save_file
from utils.data import build_datasets, resolution, to_device, val_loader
from utils.distributed import pick_device
from utils.errors import CheckpointError, UsageError
from utils.runtime import fail_cleanly, load_back_ends, seed_everything

REFERENCE_WEIGHTS = "IMAGENET1K_V1"  # what ``pretrained=True`` gave the authors
# The teacher's layout: oneDNN's CPU convolutions take channels-last tensors without reordering
# them at every layer, cuDNN's use tensor cores with them. A ResNet-18 at 32 px, batch 128, side by
# side with the default layout: training steps x0.85 and evaluation x0.62 under AVX2 kernels,
# x0.95 and x0.83 under AVX-512 (README, "Speed").
FORMAT = torch.channels_last


def _torchvision_model(name: str, num_classes: int, weights: str | None = None) -> nn.Module:
    """A torchvision classifier; ``weights`` names its pretrained weights (``IMAGENET1K_V1``,
    ``DEFAULT``...), which must predict ``num_classes`` classes (checked before any download)."""
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise UsageError(f"--teacher {name}: neither a file nor a torchvision classification model; "
                         "give a model name such as resnet50, a checkpoint path, or 'none'")
    if weights is None:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    choices = torchvision.models.get_model_weights(name)
    try:
        chosen = choices[weights] if weights != "DEFAULT" else choices.DEFAULT
    except KeyError:
        raise UsageError(f"--teacher_weights {weights}: {name} has "
                         f"{', '.join(['DEFAULT', *choices.__members__])}") from None
    if (classes := len(chosen.meta["categories"])) != num_classes:
        raise UsageError(f"--teacher {name} predicts {classes} classes, the data has {num_classes}: "
                         "train a teacher on this data (python -m training.teacher) or use --teacher none")
    try:
        return torchvision.models.get_model(name, weights=chosen)
    except Exception as e:  # no network and nothing cached, most often
        raise UsageError(f"--teacher {name}: its ImageNet weights cannot be had ({type(e).__name__}: {e}); "
                         "give a path to a teacher checkpoint, or --teacher none") from None


def weights_description(name: str, weights: str) -> str:
    """``resnet50 (IMAGENET1K_V1, 76.13 % ImageNet top-1)``: the log's name of a torchvision teacher."""
    choices = torchvision.models.get_model_weights(name)
    chosen = choices.DEFAULT if weights == "DEFAULT" else choices[weights]
    top1 = chosen.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
    return f"{name} ({str(chosen).split('.')[-1]}" + (f", {top1} % ImageNet top-1)" if top1 else ")")


def load_teacher(spec: str, num_classes: int, device: torch.device, trust_pickle: bool = False,
                 weights: str = REFERENCE_WEIGHTS) -> tuple[nn.Module | None, str]:
    """The teacher for ``--teacher spec``, frozen and in eval mode (``None`` for ``none``), and a
    description for the log that names the weights used.

    A torchvision model name takes its ``weights`` (``IMAGENET1K_V1``: the reference's
    ``pretrained=True``, not today's ``DEFAULT``); a path, a checkpoint of ``python -m training.teacher``.
    """
    if spec.lower() == "none":
        return None, "none (cross-entropy on the labels)"
    if Path(spec).exists():
        ckpt = load_file(spec, trust_pickle)
        if not isinstance(ckpt, dict) or not {"arch", "num_classes", "model_state_dict"} <= set(ckpt):
            raise CheckpointError(f"{spec}: not a teacher checkpoint (needs arch, num_classes and "
                                  "model_state_dict, as python -m training.teacher writes)")
        model = _torchvision_model(ckpt["arch"], ckpt["num_classes"])
        try:
            model.load_state_dict(ckpt["model_state_dict"])
        except RuntimeError as e:
            raise CheckpointError(f"{spec}: does not fit {ckpt['arch']}: {str(e).splitlines()[0]}") from None
        if ckpt["num_classes"] != num_classes:
            raise UsageError(f"--teacher {spec} predicts {ckpt['num_classes']} classes, the data has "
                             f"{num_classes}: train a teacher on this data (python -m training.teacher)")
        description = f"{ckpt['arch']} from {spec}"
    else:
        model = _torchvision_model(spec, num_classes, weights)
        description = weights_description(spec, weights)
    model.to(device, memory_format=FORMAT).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, description


def train_teacher(args: argparse.Namespace) -> None:
    seed_everything(args.seed)
    device = pick_device(args.device)
    data = build_datasets(args.data, resolution(args.base_resolution, 1.0), args.data_root,
                          args.min_crop_scale)
    model = _torchvision_model(args.arch, data.num_classes).to(device, memory_format=FORMAT)
    loader = DataLoader(data.train, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        drop_last=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    iters = args.epochs * len(loader)
    iters = min(args.max_iters, iters) if args.max_iters > 0 else iters
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=iters)
    start = time.time()
    bar = tqdm(total=iters, desc="teacher", dynamic_ncols=True)
    while bar.n < iters:
        model.train()
        for images, labels in loader:
            if bar.n == iters:
                break
            images, labels = to_device(images, device), labels.to(device)
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in val_loader(data.val, 500, args.workers):
            correct += (model(to_device(images, device)).argmax(1).cpu() == labels).sum().item()
            total += labels.numel()
    top1 = 100.0 * correct / total
    save_file({"arch": args.arch, "num_classes": data.num_classes, "top1": top1,
               "model_state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}, args.out)
    print(f"teacher {args.arch}: val top-1 {top1:.2f}% after {iters} iterations "
          f"({time.time() - start:.0f} s); saved to {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Train a full-precision teacher for stage 1.")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--data-root", default="data", help="where built-in datasets are unpacked")
    parser.add_argument("--arch", default="resnet18", help="torchvision classification model")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max_iters", type=int, default=0, help="stop after N iterations (0: all epochs)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--base_resolution", type=int, default=32)
    parser.add_argument("--min_crop_scale", type=float, default=0.08,
                        help="smallest area fraction RandomResizedCrop keeps")
    parser.add_argument("-j", "--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default="teacher/teacher.pth")
    fail_cleanly(train_teacher, parser.parse_args())


if __name__ == "__main__":
    load_back_ends()  # the CPU back end's fused kernels, where it is there (README, "Speed")
    main()
