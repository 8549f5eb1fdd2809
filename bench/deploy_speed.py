"""What a deployed model costs to run: images/s of the exported model against torchvision's float
MobileNet-v2, side by side.

Models, in one process, alternating call by call: torchvision's float ``mobilenet_v2`` in PyTorch
and in onnxruntime (its ONNX export), our standalone model (``export.deploy``, PyTorch) and our ONNX
graphs in onnxruntime: each code type's opset (25 INT2, 21 INT4, 17 int8) and opset 25 with
``--fold``, with onnxruntime's default graph optimisations, and the opset-25 graphs again with the
weights dequantized at load (``export.onnx_export.ort_session``; every session without its memory
arena, which at 224 px and batch 64 would keep gigabytes each). Random weights serve: speed does
not depend on their values. Each round runs every model on the same 64 images (``--images``: 64
calls at batch 1, one at batch 64); a cell gives the median images/s and, in brackets, the median
over rounds of the speed relative to torchvision's PyTorch model in the same round (above 1:
faster). Configurations:
the demo's model (width 0.5, divisor 8, 32 px, 10 classes) and ImageNet's (width 1.0, 224 px, 1000
classes), 2 bits.

    python -m bench.deploy_speed                 # both configurations, batch 1 and 64
    python -m bench.deploy_speed --only demo --threads 1
"""

import argparse
import statistics
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch
import torchvision

from bench.timing import timed
from export.deploy import deploy
from export.onnx_export import ort_session, to_onnx
from models import build_supernet
from utils.cli import comma_list
from utils.runtime import load_back_ends

CONFIGS = {  # name: width, divisor, pixels, classes
    "demo": (0.5, 8, 32, 10),
    "imagenet": (1.0, 1, 224, 1000),
}
BASELINE = "torchvision float, PyTorch"
L2_BOUNDS = [0.01, 0.005, 0.001, 0.0005, 0.0001, 0.00005, 0.00001]


def standalone(width: float, divisor: int, size: int, classes: int, batch: int) -> torch.nn.Module:
    """Our deployed model of a randomly initialised supernet (its quantizers' steps set as stage 1
    sets them), one random selection."""
    model = build_supernet("mobilenet_v2", classes, 2, L2_BOUNDS, width_multiplier=width,
                           width_divisor=divisor, base_resolution=size)
    selection = [int(i) for i in torch.randint(0, model.num_branches, (model.num_searchable_layers,))]
    model.change_precision(True, False)
    model.initialize_activation_steps(torch.randn(4, 3, size, size), selection)
    model.change_precision(True, True)
    model.init_weight_steps()
    return deploy(model.eval(), selection, batch, size)


def runners(config: str, batch: int, folder: Path, threads: int) -> dict[str, Callable[[np.ndarray], object]]:
    """One function per model, each taking a float32 batch of images."""
    width, divisor, size, classes = CONFIGS[config]
    baseline = torchvision.models.mobilenet_v2(width_mult=width, num_classes=classes).eval()
    net = standalone(width, divisor, size, classes, batch)
    baseline_onnx = folder / f"{config}_torchvision.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter (the dynamo one needs onnxscript)
        warnings.simplefilter("ignore")
        torch.onnx.export(baseline, (torch.randn(1, 3, size, size),), str(baseline_onnx), dynamo=False,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}}, opset_version=17)
    graphs = {}
    for opset, fold in ((25, False), (21, False), (17, False), (25, True)):
        path = folder / f"{config}_opset{opset}{'_fold' if fold else ''}.onnx"
        to_onnx(net, path, opset, fold)
        graphs[opset, fold] = path

    def torch_model(m: torch.nn.Module) -> Callable[[np.ndarray], object]:
        def run(x: np.ndarray) -> object:
            with torch.inference_mode():
                return m(torch.from_numpy(x))
        return run

    def ort_model(path: Path, weights_at_load: bool = False) -> Callable[[np.ndarray], object]:
        session = ort_session(path, weights_at_load=weights_at_load, threads=threads, arena=False)
        return lambda x: session.run(None, {"images": x})

    return {
        BASELINE: torch_model(baseline),
        "torchvision float, onnxruntime": ort_model(baseline_onnx),
        "ours standalone, PyTorch": torch_model(net),
        "ours opset 25 (INT2), onnxruntime": ort_model(graphs[25, False]),
        "ours opset 21 (INT4), onnxruntime": ort_model(graphs[21, False]),
        "ours opset 17 (int8), onnxruntime": ort_model(graphs[17, False]),
        "ours opset 25 --fold, onnxruntime": ort_model(graphs[25, True]),
        "ours opset 25, onnxruntime, weights at load": ort_model(graphs[25, False], True),
        "ours opset 25 --fold, onnxruntime, weights at load": ort_model(graphs[25, True], True),
    }


def measure(config: str, batch: int, args: argparse.Namespace, folder: Path) -> dict[str, dict]:
    """Median images/s and median ratio to the baseline of every model, over ``args.rounds``."""
    size = CONFIGS[config][2]
    models = runners(config, batch, folder, args.threads)
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    calls = max(1, args.images // batch)
    seconds = {name: [] for name in models}
    cpu = torch.device("cpu")
    for round_ in range(args.warmup + args.rounds):
        for name, run in models.items():
            _, took = timed(lambda run=run: [run(x) for _ in range(calls)], cpu)
            if round_ >= args.warmup:
                seconds[name].append(took)
    return {
        name: {
            "images_s": calls * batch / statistics.median(t),
            "speed": statistics.median(b / a for a, b in zip(t, seconds[BASELINE], strict=True)),
        }
        for name, t in seconds.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=CONFIGS, help="one configuration")
    parser.add_argument("--batches", type=lambda t: comma_list(t, int, "batch sizes"), default=[1, 64])
    parser.add_argument("--images", type=int, default=64, help="images per model and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="threads of PyTorch and of each onnxruntime session")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {args.threads} threads, "
          f"median of {args.rounds} rounds of {args.images} images", flush=True)
    columns, cells = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in [args.only] if args.only else list(CONFIGS):
            width, _, size, _ = CONFIGS[config]
            for batch in args.batches:
                column = f"{size} px, width {width}, batch {batch}"
                columns.append(column)
                for name, r in measure(config, batch, args, Path(tmp)).items():
                    cells[name, column] = f"{r['images_s']:.0f} ({r['speed']:.2f})"
                    print(f"{column}: {name}: {cells[name, column]}", flush=True)
    names = list(dict.fromkeys(name for name, _ in cells))
    print("\nimages/s (speed relative to torchvision float, PyTorch)")
    print("| model | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name in names:
        print(f"| {name} | " + " | ".join(cells[name, c] for c in columns) + " |")


if __name__ == "__main__":
    load_back_ends()  # the CPU back end's fused kernels, where it is there (README, "Speed")
    main()
