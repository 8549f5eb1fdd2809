"""Step time of the BASQ supernet against torchvision's full-precision MobileNet-v2, side by side.

Every step timed runs in the same process, alternating step by step (in an order that rotates
each round), so machine noise hits them alike; the figures of merit are the median ratios of their
step times over the rounds. Training compares three steps (issue #31):

- ``replicas 8``: the supernet's step as stage 1 runs it, the reference's arithmetic (SPEC 5a):
  ``training.step.train_step`` with ``Share.of(batch, 8)``, the pieces in one pass (BatchNorm,
  LSQ's ``k`` and dropout per piece), then gradient clipping and stage 1's Adam
  (``phase_optimizer``: every parameter, ``foreach``), a new random selection every round;
- ``replicas 1``: the same step on the whole batch (``Share.of(batch, 1)``), same model and selection;
- ``torchvision``: ``mobilenet_v2(width_mult=w)`` with the same loop: forward, cross-entropy,
  backward, gradient clipping at the same norm and Adam (``foreach``) over every parameter, as
  torchvision's references/classification train with ``--clip-grad-norm``.

Evaluation compares the supernet's forward with torchvision's. Configurations: width 0.5 / 32 px /
batch 128 and width 1.0 / 224 px / batch 32.

    python -m bench.step_time                 # both configurations, CPU
    python -m bench.step_time --only 0 --steps 3 --warmup 1 --modes train    # a short run
    python -m bench.step_time --device cuda --amp --channels-last
"""
import argparse
import functools
import gc
import random
import resource
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision

from bench.memory import stage_script
from bench.timing import timed
from models import build_supernet
from training.pieces import Draws, Share
from training.step import MAX_GRAD_NORM, Amp, train_step
from utils.cpu_memory import keep_freed_memory
from utils.runtime import load_back_ends

CONFIGS = [(0.5, 32, 128), (1.0, 224, 32)]
LR = 1e-4


def alternate(steps: dict[str, Callable[[int], None]], rounds: int, warmup: int,
              device: torch.device) -> dict[str, list[float]]:
    """The seconds of each of ``steps`` in every round, one step of each per round (called with the
    round's index), their order rotating from round to round; ``warmup`` rounds first, untimed."""
    names = list(steps)
    for i in range(warmup):
        for name in names:
            steps[name](i)
    times = {name: [] for name in names}
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            times[name].append(timed(functools.partial(steps[name], warmup + i), device)[1])
    return times


def ratio(times: dict[str, list[float]], ours: str, theirs: str) -> tuple[float, float, float]:
    """The median of the rounds' ratios ``ours / theirs``, and their lower and upper quartiles."""
    ratios = [a / b for a, b in zip(times[ours], times[theirs], strict=True)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    low, _, high = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), low, high


def training_steps(model, baseline, x, y, replicas: int, amp: bool,
                   device: torch.device) -> dict[str, Callable[[int], None]]:
    """The three training steps (module docstring); round ``i`` draws selection and dropout masks
    of iteration ``i`` (the same for both supernet steps)."""
    stage1 = stage_script("01train_supernet.py")
    optimizer, _ = stage1.phase_optimizer(model, LR, 0.0, 1)
    mixed = Amp(("fp16" if device.type == "cuda" else "bf16") if amp else None, device)
    layers, branches = model.num_searchable_layers, model.num_branches
    selections: dict[int, list[int]] = {}

    def supernet(pieces: int) -> Callable[[int], None]:
        share = Share.of(len(x), pieces)

        def step(i: int) -> None:
            if i not in selections:
                selections.clear()
                selections[i] = [random.randrange(branches) for _ in range(layers)]
            train_step(model, x, selections[i], stage1.criterion(None, x, y, mixed, share), optimizer,
                       mixed, share, draws=Draws(0, i))
        return step

    adam = torch.optim.Adam(baseline.parameters(), lr=LR, foreach=True)
    theirs = Amp(mixed.mode, device)

    def torchvision_step(_: int) -> None:
        adam.zero_grad(set_to_none=True)
        with theirs.autocast():
            loss = F.cross_entropy(baseline(x).float(), y)
        theirs.scaler.scale(loss).backward()
        theirs.scaler.unscale_(adam)
        torch.nn.utils.clip_grad_norm_(baseline.parameters(), MAX_GRAD_NORM)
        theirs.scaler.step(adam)
        theirs.scaler.update()

    return {f"replicas {replicas}": supernet(replicas), "replicas 1": supernet(1),
            "torchvision": torchvision_step}


def evaluation_steps(model, baseline, x, amp: bool, device: torch.device) -> dict[str, Callable[[int], None]]:
    layers, branches = model.num_searchable_layers, model.num_branches

    def run(forward: Callable[[], torch.Tensor]) -> Callable[[int], None]:
        def step(_: int) -> None:
            with torch.autocast(device.type, enabled=amp), torch.no_grad():
                forward()
        return step

    return {"ours": run(lambda: model(x, [random.randrange(branches) for _ in range(layers)])),
            "torchvision": run(lambda: baseline(x))}


def measure(width: float, size: int, batch: int, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = build_supernet("mobilenet_v2", 1000, args.bits, [0.01, 0.005, 0.001, 0.0005, 0.0001, 5e-5, 1e-5],
                           width_multiplier=width).to(device, memory_format=fmt)
    model.change_precision(True, True)
    baseline = torchvision.models.mobilenet_v2(width_mult=width).to(device, memory_format=fmt)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device=device)
    result = {"config": f"width {width}, {size} px, batch {batch}"}
    if "train" in args.modes:
        model.train()
        baseline.train()
        steps = training_steps(model, baseline, x, y, args.replicas, args.amp, device)
        times = alternate(steps, args.steps, args.warmup, device)
        ours = f"replicas {args.replicas}"
        pairs = ((ours, "replicas 1"), (ours, "torchvision"), ("replicas 1", "torchvision"))
        result["train"] = {
            "ratios": {f"{a} / {b}": ratio(times, a, b) for a, b in pairs},
            "img_s": {name: batch / statistics.median(t) for name, t in times.items()}}
        del steps
    if "eval" in args.modes:
        model.eval()
        baseline.eval()
        times = alternate(evaluation_steps(model, baseline, x, args.amp, device), args.steps, args.warmup,
                          device)
        result["eval"] = {"ratios": {"ours / torchvision": ratio(times, "ours", "torchvision")},
                          "img_s": {name: batch / statistics.median(t) for name, t in times.items()}}
    if device.type == "cuda":
        result["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del model, baseline
    gc.collect()
    return result


def configuration(text: str) -> tuple[float, int, int]:
    try:
        width, size, batch = text.split(",")
        return float(width), int(size), int(batch)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give width,pixels,batch (e.g. 0.5,32,128)") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (one step of each model a round)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--replicas", type=int, default=8,
                        help="the pieces of the supernet's step compared with the whole batch (default 8)")
    parser.add_argument("--modes", default="train,eval", type=lambda s: s.split(","),
                        help="train, eval or both (default train,eval)")
    parser.add_argument("--amp", action="store_true", help="autocast (bf16 on CPU, fp16 on CUDA)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--system-malloc", action="store_true",
                        help="the C library's defaults (the stages keep freed memory: utils/cpu_memory.py)")
    parser.add_argument("--only", type=int, choices=range(len(CONFIGS)),
                        help="one of the configurations: " + ", ".join(
                            f"{i}: width {w}, {s} px, batch {b}" for i, (w, s, b) in enumerate(CONFIGS)))
    parser.add_argument("--config", type=configuration, action="append",
                        help="width,pixels,batch instead (repeatable)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.replicas < 1:
        parser.error("--steps and --replicas take 1 or more, --warmup 0 or more")
    if not set(args.modes) <= {"train", "eval"} or not args.modes:
        parser.error(f"--modes {','.join(args.modes)}: give train, eval or train,eval")
    kept = not args.system_malloc and keep_freed_memory()
    torch.manual_seed(0)
    random.seed(0)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
          f"freed memory kept: {kept}, {args.steps} rounds after {args.warmup}")
    configs = args.config or ([CONFIGS[args.only]] if args.only is not None else CONFIGS)
    for width, size, batch in configs:
        r = measure(width, size, batch, args)
        mem = (f"peak GPU memory {r['peak_mem_mib']:.0f} MiB" if "peak_mem_mib" in r
               else f"peak RSS {r['peak_rss_mib']:.0f} MiB")
        print(f"{r['config']}: {mem}")
        for mode in ("train", "eval"):
            if mode not in r:
                continue
            for name, (median, low, high) in r[mode]["ratios"].items():
                print(f"  {mode:5s} {name}: {median:.2f} (quartiles {low:.2f}-{high:.2f})")
            rates = ", ".join(f"{name} {v:.0f}" for name, v in r[mode]["img_s"].items())
            print(f"  {mode:5s} img/s: {rates}")


if __name__ == "__main__":
    load_back_ends()  # the CPU back end's fused kernels, where it is there (README, "Speed")
    main()
