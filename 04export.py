"""Export a searched, fine-tuned arch as a deployable quantized model (after stage 3).

From a stage-3 checkpoint (or a supernet, a search result and an arch index) it writes to --out:
- ``arch{i}.pt``: the single-path model (``export/deploy.py``): only the selected branch of every
  searchable layer, weight codes packed at their bits with their per-channel steps, explicit
  quantizers; a plain ``{"config", "state_dict"}`` that ``torch.load(weights_only=True)`` reads and
  ``DeployedNet.load`` rebuilds;
- ``arch{i}.onnx``: the same model in standard ONNX operators, codes in the opset's smallest integer
  types (``--opset``; 25: INT2/UINT2), every quantizer a QuantizeLinear/DequantizeLinear pair, run
  by onnxruntime with graph optimisations off and on; with ``--fold`` also ``arch{i}_fold.onnx``,
  BatchNorms folded for speed (not bit-exact);
- ``arch{i}_size.json``: bits and packed bytes per layer and in total, against float32, and each
  file's bytes on disk.

    python 04export.py --checkpoint eval-blast/arch0_model_actwbin_2_2_bn_2ep.pth --data DIR
    python 04export.py --supernet train-supernet/model_actwbin_best_466000it.pth \\
        --search-result eval-kfold-evolution/search_result.json --arch-index 0

With ``--data`` (an ImageNet-layout folder or ``fashion-mnist``) the standalone model and the ONNX
model are scored on the whole validation set; without it they are compared on random inputs.
LSQ's deployed steps are those of one piece of ``--val_batch_size`` over ``--replicas`` (SPEC 5a),
both taken from the stage-3 checkpoint or the search result unless given.
"""

import argparse
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

import utils.torch_floor  # noqa: F401  (first: an older torch stops here, with one line)
from export.deploy import deploy, size_report
from export.onnx_export import MIN_OPSET, OPSET, ORT_SETTINGS, ort_session, to_onnx
from models import build_supernet
from search.results import read_search_result, write_json
from training.pieces import piece_sizes, run_in_pieces
from utils.checkpoint import load_file, load_model_state, state_dict_of
from utils.cli import (
    REPLICAS,
    VAL_BATCH_SIZE,
    add_loader_args,
    add_model_args,
    add_replicas_arg,
    add_trust_arg,
    add_val_batch_arg,
    model_config,
)
from utils.data import build_datasets, resolution, to_device, val_loader
from utils.errors import UsageError
from utils.files import atomic_path
from utils.runtime import fail_cleanly, load_back_ends


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", help="a stage-3 checkpoint (eval-blast/arch{i}_..._{epoch}ep.pth)")
    parser.add_argument(
        "--supernet",
        help="instead of --checkpoint: a stage-1 or released supernet, with "
        "--search-result and --arch-index (and the model's flags)",
    )
    parser.add_argument("--search-result", help="stage 2's search_result.json or a printed block")
    parser.add_argument("--arch-index", type=int, help="which fold's arch of --search-result (arch{i})")
    parser.add_argument("--out", default="export", help="output folder")
    parser.add_argument(
        "--data",
        default=None,
        help="score on this validation set (an ImageNet-layout folder or fashion-mnist)",
    )
    add_loader_args(parser)
    add_val_batch_arg(parser, default=None)  # the deployed LSQ steps: those of one piece of it
    add_replicas_arg(parser, default=None)
    parser.add_argument(
        "--compare_batches", type=int, default=2, help="batches on which the supernet is run too"
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=OPSET,
        help=f"ONNX opset of the graph ({MIN_OPSET}-{OPSET}): 25 stores 2-bit codes as INT2/UINT2, 21-24 "
        "as INT4/UINT4, older opsets as int8/uint8 (for runtimes without the low-bit types; README)",
    )
    parser.add_argument(
        "--fold",
        action="store_true",
        help="also write arch{i}_fold.onnx, a graph for speed: BatchNorms folded into the weights' "
        "scales, not bit-exact (its top-1 agreement is reported)",
    )
    add_trust_arg(parser)
    add_model_args(parser)
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.supernet is None):
        parser.error(
            "give --checkpoint (a stage-3 checkpoint), or --supernet with --search-result and --arch-index"
        )
    if not MIN_OPSET <= args.opset <= OPSET:
        parser.error(f"--opset {args.opset}: the export writes opsets {MIN_OPSET} to {OPSET}")
    if args.supernet is not None and (args.search_result is None or args.arch_index is None):
        parser.error("--supernet needs --search-result and --arch-index")
    return args


def selected_supernet(args: argparse.Namespace) -> tuple[torch.nn.Module, list[int], int, str, dict]:
    """The supernet, the selection to export, its arch index (fold), where they came from, and how
    the run evaluated it (``val_batch_size`` and ``replicas``, as far as its files say)."""
    if args.checkpoint is not None:
        checkpoint = load_file(args.checkpoint, args.trust_pickle)
        if not isinstance(checkpoint, dict) or not {"selection", "fold", "config"} <= set(checkpoint):
            raise UsageError(
                f"--checkpoint {args.checkpoint}: not a stage-3 checkpoint (it names no selection; "
                "a stage-1 or released supernet goes with --supernet, --search-result and --arch-index)"
            )
        model = build_supernet(**checkpoint["config"])
        load_model_state(model, checkpoint, args.checkpoint)
        evaluation = checkpoint.get("evaluation")
        return (model, list(checkpoint["selection"]), int(checkpoint["fold"]), str(args.checkpoint),
                evaluation if isinstance(evaluation, dict) else {})
    checkpoint = load_file(args.supernet, args.trust_pickle)
    state = state_dict_of(checkpoint, args.supernet)
    classes = next(
        v.shape[0] for k, v in state.items() if k.startswith("classifier") and k.endswith("weight")
    )
    config = (
        dict(checkpoint["config"])
        if isinstance(checkpoint, dict) and "config" in checkpoint
        else model_config(args, classes)
    )
    model = build_supernet(**config)
    load_model_state(model, checkpoint, args.supernet)
    found = read_search_result(args.search_result, config, model.num_searchable_layers, model.num_branches)
    if args.arch_index not in found["folds"]:
        raise UsageError(
            f"--arch-index {args.arch_index}: --search-result {args.search_result} has the archs of "
            f"folds {found['folds']}"
        )
    arch = found["archs"][found["folds"].index(args.arch_index)]
    return (
        model,
        list(arch),
        args.arch_index,
        f"{args.supernet} with arch {args.arch_index} of {args.search_result}",
        {k: found[k] for k in ("val_batch_size", "replicas") if k in found},
    )


def writable(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {folder}: cannot be created ({e.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise UsageError(f"--out {folder}: not writable")
    return folder


def top1(logits: list[np.ndarray], labels: list[np.ndarray]) -> float:
    return (
        100.0
        * sum(int((out.argmax(1) == y).sum()) for out, y in zip(logits, labels, strict=True))
        / sum(len(y) for y in labels)
    )


def scoring_inputs(args: argparse.Namespace, size: int) -> tuple[Iterable, str]:
    """The batches the models are compared on (with labels when --data is given), and what they are."""
    if args.data is not None:  # the whole validation set
        data = build_datasets(args.data, size, args.data_root)
        cpu = torch.device("cpu")
        loader = val_loader(data.val, args.val_batch_size, args.workers)
        what = f"the {len(data.val)} validation images of {args.data}"
        return ((to_device(x, cpu), y) for x, y in loader), what
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.val_batch_size, 3, size, size, generator=gen), None) for _ in range(2)]
    return batches, f"{2 * args.val_batch_size} random inputs"


def export(args: argparse.Namespace) -> dict:
    out = writable(Path(args.out))
    supernet, selection, index, source, evaluation = selected_supernet(args)
    for key, default in (("val_batch_size", VAL_BATCH_SIZE), ("replicas", REPLICAS)):  # as the run evaluated
        if getattr(args, key) is None:
            setattr(args, key, int(evaluation.get(key, default)))
    piece = piece_sizes(args.val_batch_size, args.replicas)[0]
    supernet.change_precision(True, True)
    supernet.eval()
    size = resolution(supernet.config["base_resolution"], supernet.config["resolution_multiplier"])
    net = deploy(supernet, selection, piece, size)
    model_file, size_file = out / f"arch{index}.pt", out / f"arch{index}_size.json"
    graphs = {"onnx": out / f"arch{index}.onnx"}
    if args.fold:
        graphs["onnx --fold"] = out / f"arch{index}_fold.onnx"
    net.save(model_file)
    for name, path in graphs.items():
        with atomic_path(path) as tmp:
            to_onnx(net, tmp, args.opset, fold=name != "onnx")
    report = size_report(net, [model_file, *graphs.values()])
    write_json(report, size_file)
    sessions = {
        (name, setting): ort_session(path, *ORT_SETTINGS[setting])
        for name, path in graphs.items()
        for setting in ORT_SETTINGS
    }
    inputs, what = scoring_inputs(args, size)
    ours, theirs, labels = [], [], []
    runs = {key: [] for key in sessions}
    with torch.no_grad():
        for x, y in inputs:
            ours.append(net(x).numpy())
            for key, session in sessions.items():
                runs[key].append(session.run(None, {"images": x.numpy()})[0])
            if len(theirs) < args.compare_batches:  # the supernet is slower: a few batches show it
                # the deployed steps' k, on every image alike
                theirs.append(run_in_pieces(lambda x: supernet(x, selection), x, piece).numpy())
            if y is not None:
                labels.append(y.numpy())
    ours_all, theirs_all = np.concatenate(ours), np.concatenate(theirs)
    compared = ours_all[: len(theirs_all)]
    check = {
        "compared_on": what,
        "compared_with_the_supernet_on": f"the first {len(theirs_all)} images",
        "lsq_steps_of_pieces_of": piece,
        "supernet_max_relative_difference": float(
            np.abs(compared - theirs_all).max() / np.abs(theirs_all).max()
        ),
        "supernet_top1_agreement": float((compared.argmax(1) == theirs_all.argmax(1)).mean() * 100),
        "onnxruntime": [],
    }
    for (name, setting), logits in runs.items():
        got = np.concatenate(logits)
        entry = {
            "graph": name,
            "file": str(graphs[name]),
            "graph_optimisations": setting,
            "top1_agreement": float((got.argmax(1) == ours_all.argmax(1)).mean() * 100),
            "max_logit_difference": float(np.abs(got - ours_all).max()),
        }
        if labels:
            entry["top1"] = top1(logits, labels)
        check["onnxruntime"].append(entry)
    if labels:
        check["top1_pytorch"] = top1(ours, labels)
    files = [str(model_file), *map(str, graphs.values()), str(size_file)]
    summary = {
        "arch": index,
        "selection": selection,
        "source": source,
        "opset": args.opset,
        "evaluation": {"val_batch_size": args.val_batch_size, "replicas": args.replicas},
        "files": files,
        "size": {k: v for k, v in report.items() if k != "layers"},
        "check": check,
    }
    write_json(summary, out / f"arch{index}_export.json")
    print(f"arch {index} from {source}")
    print(
        f"size: {report['total_bytes'] / 1024:.1f} KiB packed against "
        f"{report['total_float32_bytes'] / 1024:.1f} KiB in float32 ({report['compression']:.1f}x; "
        f"weights {report['weights_bytes'] / 1024:.1f} against "
        f"{report['weights_float32_bytes'] / 1024:.1f} KiB); on disk "
        + ", ".join(
            f"{Path(f).name} {b / 1024:.1f} KiB ({b / report['total_bytes']:.2f}x packed)"
            for f, b in report["files"].items()
        )
    )
    print(
        f"standalone model against the supernet on {check['compared_with_the_supernet_on']} ({what}): "
        f"top-1 agreement {check['supernet_top1_agreement']:.2f} %, "
        f"largest difference {check['supernet_max_relative_difference']:.1e} of the largest logit "
        f"(LSQ's steps of pieces of {piece}: --val_batch_size {args.val_batch_size} over --replicas "
        f"{args.replicas})"
    )
    for e in check["onnxruntime"]:
        print(
            f"onnxruntime ({e['graph']}, opset {args.opset}, graph optimisations {e['graph_optimisations']}) "
            f"against the standalone model: top-1 agreement {e['top1_agreement']:.2f} %, "
            f"largest logit difference {e['max_logit_difference']:.3g}"
        )
    if labels:
        print(
            f"top-1 on the whole validation set: standalone {check['top1_pytorch']:.2f} %, "
            + ", ".join(
                f"onnxruntime {e['graph']} (optimisations {e['graph_optimisations']}) {e['top1']:.2f} %"
                for e in check["onnxruntime"]
            )
        )
    print(f"wrote {', '.join(files)} and {out / f'arch{index}_export.json'}")
    return summary


if __name__ == "__main__":
    load_back_ends()  # the CPU back end's fused kernels, where it is there (README, "Speed")
    fail_cleanly(export, parse_args())
