"""The command line of the stage scripts: the flags they share and the model config they describe."""
import argparse
import os
from collections.abc import Callable
from typing import Any, TypeVar

from models import QUANTIZERS, archs

T = TypeVar("T")

# The L2 decays of the authors' seven branches (their released supernet's; SPEC section 2).
REFERENCE_L2_BOUNDS = [0.01, 0.005, 0.001, 0.0005, 0.0001, 0.00005, 0.00001]

TRUST_FLAG = "--trust-pickled-checkpoint-DANGEROUS"
RELEASED_SUPERNET = "train-supernet/model_actwbin_best_466000it.pth"


def comma_list(text: str, convert: Callable[[str], T], what: str) -> list[T]:
    """``"a, b,c"`` as ``[convert("a"), convert("b"), convert("c")]`` for an argparse ``type``;
    ``what`` names the items in the message when one does not convert or none is given."""
    try:
        values = [convert(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least one of the {what}")
    return values


def l2_bounds(text: str) -> list[float]:
    """``--l2_bounds 0.01,0.001`` (the reference parsed it as a list of characters)."""
    values = comma_list(text, float, "numbers, e.g. 0.01,0.001,0.0001")
    if any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more positive decays")
    return values


def boolean(text: str) -> bool:
    """``--train_clip False`` means false (the reference's ``type=bool`` made every string true)."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true/false)")


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: must be positive")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: cannot be negative")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text}: a probability lies in [0, 1]")
    return value


def bits(text: str) -> int:
    value = int(text)
    if not 2 <= value <= 8:
        raise argparse.ArgumentTypeError(f"{value}: bits must be from 2 to 8")
    return value


def stage_parser(description: str, save: str, dist_timeout: float) -> argparse.ArgumentParser:
    """A stage script's parser with the model and run flags every stage has."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_run_args(parser, save, dist_timeout)
    return parser


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The supernet's flags, under the reference's spellings and defaults."""
    parser.add_argument("--arch", default="mobilenet_v2", choices=archs())
    parser.add_argument("--bits", type=bits, default=2, help="weight and activation bits (2-8)")
    parser.add_argument("--l2_bounds", type=l2_bounds, default=REFERENCE_L2_BOUNDS,
                        help="candidate L2 decays of the clips, one branch each (comma-separated)")
    parser.add_argument("--depth_multiplier", type=positive_float, default=1.0)
    parser.add_argument("--width_multiplier", type=positive_float, default=1.0)
    parser.add_argument("--width_divisor", type=positive_int, default=1)
    parser.add_argument("--resolution_multiplier", type=positive_float, default=1.0)
    parser.add_argument("--base_resolution", type=positive_int, default=224)
    parser.add_argument("--quantizer", default="basq", choices=QUANTIZERS,
                        help="basq: the method; the reproduction's baselines, one branch and no "
                             "--l2_bounds: lsq (LSQ activation quantizers, a step per channel as "
                             "the reference's), lsq-tensor (a step per tensor, as the LSQ paper's) "
                             "or float (none)")
    parser.add_argument("--small_input_stem", action="store_true",
                        help="stride-1 stem (no ResNet max-pool) for 28-64 px images such as "
                             "Fashion-MNIST; default: the ImageNet stem")


def add_run_args(parser: argparse.ArgumentParser, save: str, dist_timeout: float) -> None:
    """Data, output, device, reproducibility and ``torchrun`` flags.

    ``dist_timeout`` is the stage's default for ``--dist_timeout``, in minutes.
    """
    parser.add_argument("--data", default="fashion-mnist",
                        help="an ImageNet-layout folder (train/, val/) or 'fashion-mnist'")
    add_loader_args(parser)
    parser.add_argument("--min_crop_scale", type=float, default=0.08,
                        help="smallest area fraction of RandomResizedCrop (0.08: the reference)")
    parser.add_argument("--save", default=save, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--tf32", type=boolean, default=True,
                        help="on (the default, PyTorch's and the reference's): Ampere and later GPUs "
                             "compute float32 convolutions in TF32 (10-bit mantissa); off: in float32. "
                             "See README, 'TF32'")
    add_trust_arg(parser)
    parser.add_argument("--dist_timeout", type=float, default=dist_timeout,
                        help="under torchrun: minutes a process waits for the others at a "
                             "synchronisation point before the job fails")
    add_replicas_arg(parser)


REPLICAS = 8  # the project's assumption about the authors' GPUs (README, "--replicas")
VAL_BATCH_SIZE = 200  # the reference's evaluation batch


def add_replicas_arg(parser: argparse.ArgumentParser, default: int | None = REPLICAS) -> None:
    """``--replicas`` of every stage (and the export, whose LSQ steps are those of a piece)."""
    parser.add_argument("--replicas", type=positive_int, default=default,
                        help="the devices the reference's nn.DataParallel split each batch over "
                             "(SPEC 5a): each batch is computed as that many pieces (torch.chunk), "
                             "each normalised on its own (--pieces_per_pass of them at once); 1: the "
                             "whole batch at once"
                             + ("" if default else f" (default: the run's, else {REPLICAS})"))


def add_loader_args(parser: argparse.ArgumentParser) -> None:
    """Where built-in datasets are and how many processes load them (every stage, and the export)."""
    parser.add_argument("--data-root", default="data", help="where built-in datasets are unpacked")
    parser.add_argument("-j", "--workers", type=int, default=default_workers(),
                        help="data loading workers per process (default: the CPU cores per process, "
                             f"at most {MAX_WORKERS}: {default_workers()} here)")


MAX_WORKERS = 16  # beyond, a DataLoader's workers gain little (each holds the dataset's index)


def default_workers() -> int:
    """The CPU cores this process may use, shared by the processes torchrun starts on the node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def add_trust_arg(parser: argparse.ArgumentParser) -> None:
    """The opt-in to unpickling legacy checkpoints (every stage, and the export)."""
    parser.add_argument(TRUST_FLAG, dest="trust_pickle", action="store_true",
                        help="DANGEROUS: load legacy checkpoints with full unpickling, which runs "
                             "any code the file contains; only for files you made yourself")


def add_val_batch_arg(parser: argparse.ArgumentParser, default: int | None = VAL_BATCH_SIZE) -> None:
    """The evaluation batch (stages 2 and 3, and the export): LSQ's steps are those of its pieces
    over ``--replicas``."""
    parser.add_argument("--val_batch_size", type=positive_int, default=default,
                        help="evaluation batch; LSQ's activation steps depend in their last bit on the "
                             "size of its pieces over --replicas"
                             + ("" if default else f" (default: the run's, else {VAL_BATCH_SIZE})"))


def add_amp_arg(parser: argparse.ArgumentParser) -> None:
    """``--amp`` and ``--pieces_per_pass`` of the training stages (1 and 3): how a step computes,
    not what."""
    parser.add_argument("--amp", choices=("bf16", "fp16"), default=None,
                        help="mixed precision: the forward pass in bfloat16 or float16 (with a gradient "
                             "scaler), the quantizers in float32. Default: float32, the reference's "
                             "arithmetic (README, 'Mixed precision')")
    parser.add_argument("--pieces_per_pass", type=positive_int, default=None,
                        help="how many of a process's --replicas pieces a training pass computes at once, "
                             "each with its own BatchNorm statistics (the same arithmetic for any value). "
                             "Default: all on a CPU; on a GPU as many as fit its free memory (logged)")


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    """What stages 2 and 3 share: the supernet, and the validation batches the folds split."""
    parser.add_argument("--supernet", default=RELEASED_SUPERNET,
                        help="stage-1 checkpoint, or the released one (the default)")
    parser.add_argument("--k", type=int, default=10, help="number of folds")
    add_val_batch_arg(parser)
    parser.add_argument("--max_val_iters", type=int, default=0,
                        help="use only the first N validation batches (0: all)")
    parser.add_argument("--val_cache_gb", type=float, default=8.0,
                        help="memory for validation images (uint8): the whole set when it fits (decoded "
                             "once), else each searched fold (decoded once per fold, the rest streamed)")
    parser.add_argument("--bn_recalibration_batches", type=int, default=0,
                        help="re-estimate the BN statistics of a selection on N training batches "
                             "before evaluating it (0: off, as the reference; see README)")


def model_config(args: argparse.Namespace, num_classes: int) -> dict[str, Any]:
    """The ``build_supernet`` arguments the flags describe."""
    # quantizer before l2_vals: a checkpoint of another quantizer is refused under that name.
    return dict(arch=args.arch, quantizer=args.quantizer, num_classes=num_classes, bits=args.bits,
                l2_vals=list(args.l2_bounds) if args.quantizer == "basq" else [],
                width_multiplier=args.width_multiplier, width_divisor=args.width_divisor,
                depth_multiplier=args.depth_multiplier,
                resolution_multiplier=args.resolution_multiplier,
                base_resolution=args.base_resolution, small_input_stem=args.small_input_stem)


