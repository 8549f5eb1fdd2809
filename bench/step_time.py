"""Step time of the BASQ supernet against torchvision's full-precision MobileNet-v2, side by side.

Both models run in the same process, alternating step by step, so machine noise hits both alike;
the figure of merit is the median ratio of their step times. Configurations (issue #7):
width 0.5 / 32 px / batch 128 and width 1.0 / 224 px / batch 16.

    python -m bench.step_time                 # both configurations, CPU
    python -m bench.step_time --device cuda --amp --channels-last
"""
import argparse
import gc
import random
import resource
import statistics

import torch
import torch.nn.functional as F
import torchvision

from bench.timing import timed
from models import build_supernet
from utils.cpu_memory import keep_freed_memory
from utils.runtime import load_back_ends

CONFIGS = [(0.5, 32, 128), (1.0, 224, 16)]


def steps(model, baseline, optimizers, x, y, train: bool, amp: bool, device: torch.device):
    """One step function per model; the supernet draws a new random selection every step."""
    layers, branches = model.num_searchable_layers, model.num_branches

    def run(net, forward, opt):
        def step():
            with torch.autocast(device.type, enabled=amp), torch.set_grad_enabled(train):
                out = forward(net)
                if train:
                    loss = F.cross_entropy(out.float(), y)
            if train:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return step

    ours = run(model, lambda n: n(x, [random.randrange(branches) for _ in range(layers)]), optimizers[0])
    theirs = run(baseline, lambda n: n(x), optimizers[1])
    return ours, theirs


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
    for mode in ("train", "eval"):
        train = mode == "train"
        for net in (model, baseline):
            net.train(train)
        # Stage 1's Adam (foreach) for both models.
        optimizers = [torch.optim.Adam(net.parameters(), lr=1e-4, foreach=True) for net in (model, baseline)]
        ours, theirs = steps(model, baseline, optimizers, x, y, train, args.amp, device)
        for _ in range(args.warmup):
            ours(), theirs()
        times = {"ours": [], "theirs": []}
        for _ in range(args.steps):
            times["ours"].append(timed(ours, device)[1])
            times["theirs"].append(timed(theirs, device)[1])
        ratios = [a / b for a, b in zip(times["ours"], times["theirs"], strict=True)]
        result[mode] = {"ratio": statistics.median(ratios),
                        "ours_img_s": batch / statistics.median(times["ours"]),
                        "theirs_img_s": batch / statistics.median(times["theirs"])}
    if device.type == "cuda":
        result["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del model, baseline, optimizers
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--amp", action="store_true", help="autocast (bf16 on CPU, fp16 on CUDA)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--system-malloc", action="store_true",
                        help="the C library's defaults (the stages keep freed memory: utils/cpu_memory.py)")
    parser.add_argument("--only", type=int, choices=range(len(CONFIGS)), help="one configuration")
    args = parser.parse_args()
    kept = not args.system_malloc and keep_freed_memory()
    torch.manual_seed(0)
    random.seed(0)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
          f"freed memory kept: {kept}")
    configs = [CONFIGS[args.only]] if args.only is not None else CONFIGS
    for width, size, batch in configs:
        r = measure(width, size, batch, args)
        mem = (f"peak GPU memory {r['peak_mem_mib']:.0f} MiB" if "peak_mem_mib" in r
               else f"peak RSS {r['peak_rss_mib']:.0f} MiB")
        print(f"{r['config']}: {mem}")
        for mode in ("train", "eval"):
            m = r[mode]
            print(f"  {mode:5s} ratio {m['ratio']:.2f}  (ours {m['ours_img_s']:.0f} img/s, "
                  f"torchvision mobilenet_v2 {m['theirs_img_s']:.0f} img/s)")


if __name__ == "__main__":
    load_back_ends()  # the CPU back end's fused kernels, where it is there (README, "Speed")
    main()
