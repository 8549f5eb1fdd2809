"""04export.py and export/: the standalone model equals the supernet's selection, its file
loads safely, the ONNX graph writes every quantizer out and onnxruntime agrees, the size report."""

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from export.deploy import ClipQuant, DeployedNet, LsqQuant, deploy, size_report
from export.onnx_export import to_onnx
from models import build_supernet
from utils.data import build_datasets, to_device, val_loader

from .conftest import assert_clean_failure, load_script, run_script
from .test_stage2 import MODEL
from .test_stage3 import checkpoint_path, finetune_run, found, supernet  # noqa: F401  (fixtures)

CPU = torch.device("cpu")


def trained(arch: str, quantizer: str = "basq") -> torch.nn.Module:
    """A small supernet with non-trivial BatchNorm statistics, weights quantized, in evaluation."""
    torch.manual_seed(0)
    extra = {
        "mobilenet_v2": {"width_multiplier": 0.25, "width_divisor": 8},
        "resnet18": {"width_multiplier": 0.125, "width_divisor": 8},
    }[arch]
    model = build_supernet(
        arch, 10, 2, [0.01, 0.001, 0.0001], base_resolution=32, quantizer=quantizer, **extra
    )
    model.change_precision(True, False)
    last = [model.num_branches - 1] * model.num_searchable_layers
    model.initialize_activation_steps(torch.randn(16, 3, 32, 32), last)
    model.change_precision(True, True)
    model.init_weight_steps()
    model.train()
    with torch.no_grad():
        for branch in range(model.num_branches):
            for _ in range(2):
                model(torch.randn(16, 3, 32, 32) * 1.5, [branch] * model.num_searchable_layers)
        for name, p in model.named_parameters():
            if name.endswith("upper_bound"):
                p.fill_(2.5)
    return model.eval()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference, relative to the largest logit."""
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize(
    "arch, quantizer", [("mobilenet_v2", "basq"), ("resnet18", "basq"), ("mobilenet_v2", "lsq")]
)
def test_the_standalone_model_computes_the_supernets_selection(arch, quantizer):
    model = trained(arch, quantizer)
    selection = [i % model.num_branches for i in range(model.num_searchable_layers)]
    net = deploy(model, selection, batch_size=8, resolution=32)
    assert "branch" not in " ".join(n for n, _ in net.named_modules())  # one path, no supernet
    x = torch.randn(8, 3, 32, 32) * 2
    with torch.no_grad():
        expected, got = model(x, selection), net(x)
    assert relative(got, expected) <= 1e-5 and torch.equal(got.argmax(1), expected.argmax(1))
    # The quantized weights are int8 codes within the levels, times one step per output channel.
    for unit in net.units():
        assert unit.conv.codes.dtype == torch.int8 and unit.conv.codes.abs().max() <= 1  # 2-bit: ternary
        assert unit.conv.scale.shape == (unit.conv.codes.shape[0],)
    kinds = {type(u.quant) for u in net.units()}
    expected = {
        ("mobilenet_v2", "basq"): {ClipQuant, LsqQuant},
        ("resnet18", "basq"): {ClipQuant},
        ("mobilenet_v2", "lsq"): {LsqQuant},
    }[arch, quantizer]
    assert kinds == expected


def test_the_saved_model_loads_safely_and_rebuilds(tmp_path):
    model = trained("mobilenet_v2")
    selection = [2] * model.num_searchable_layers
    net = deploy(model, selection, batch_size=4, resolution=32)
    path = tmp_path / "arch.pt"
    torch.save({"config": net.describe(), "state_dict": net.state_dict()}, path)
    saved = torch.load(path, weights_only=True)  # plain data only
    assert saved["config"]["source"]["selection"] == selection
    again = DeployedNet.load(path)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), net(x))


def onnx_session(net: DeployedNet, path) -> onnxruntime.InferenceSession:
    to_onnx(net, path)
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18"])
def test_onnx_writes_every_quantizer_and_onnxruntime_agrees(tmp_path, arch):
    model = trained(arch)
    selection = [i % 3 for i in range(model.num_searchable_layers)]
    net = deploy(model, selection, batch_size=8, resolution=32)
    session = onnx_session(net, tmp_path / "net.onnx")
    graph = onnx.load(tmp_path / "net.onnx").graph
    ops = [node.op_type for node in graph.node]
    activation = sum(isinstance(u.quant, (ClipQuant, LsqQuant)) for u in net.units())
    assert ops.count("QuantizeLinear") == activation  # one per activation quantizer
    assert ops.count("DequantizeLinear") == activation + len(net.units())  # and one per weight quantizer
    codes = [i for i in graph.initializer if i.name.startswith("weight_codes")]
    assert len(codes) == len(net.units()) and all(i.data_type == onnx.TensorProto.INT8 for i in codes)
    assert ops[0] == "Conv" and ops[-1] == "Gemm"  # the stem and the classifier stay float
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        ours = net(x).numpy()
    theirs = session.run(None, {"images": x.numpy()})[0]
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.9  # all but a rounding-boundary few
    assert np.median(np.abs(ours - theirs)) < 1e-3


def test_size_report_by_hand():
    model = trained("mobilenet_v2")
    net = deploy(model, [0] * model.num_searchable_layers, batch_size=4, resolution=32)
    report = size_report(net)
    stem, first, *_, classifier = report["layers"]
    assert stem["weight_bits"] == 32 and stem["bytes"] == stem["float32_bytes"] == 4 * 3 * 8 * 3 * 3
    conv = net.units()[0].conv
    assert first["weight_bits"] == 2 and first["activation_bits"] == 2
    assert first["bytes"] == -(-conv.codes.numel() * 2 // 8) + 4 * conv.codes.shape[0]
    assert classifier["bytes"] == 4 * (1280 * 10 + 10)
    assert report["weights_bytes"] == sum(layer["bytes"] for layer in report["layers"])
    assert report["total_bytes"] < report["total_float32_bytes"] and report["compression"] > 1


export = load_script("04export.py")


def test_export_of_a_stage3_checkpoint(tmp_path, finetune_run, image_folder, found):  # noqa: F811
    save = finetune_run[0]
    checkpoint = checkpoint_path(save, 1, 0)
    run = run_script(
        "04export.py",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(image_folder),
        "--out",
        str(tmp_path),
        "--val_batch_size",
        "4",
        "-j",
        "0",
    )
    assert run.returncode == 0, run.stderr
    assert {p.name for p in tmp_path.iterdir()} == {
        "arch1.pt",
        "arch1.onnx",
        "arch1_size.json",
        "arch1_export.json",
    }
    summary = json.loads((tmp_path / "arch1_export.json").read_text())
    assert summary["selection"] == found["archs"][1]
    check = summary["check"]
    assert check["supernet_top1_agreement"] == 100.0 and check["supernet_max_relative_difference"] <= 1e-5
    assert "top-1 on the whole validation set" in run.stdout and "onnxruntime" in run.stdout
    # The standalone model scores what the checkpoint scores on the images outside the fold.
    net = DeployedNet.load(tmp_path / "arch1.pt")
    data = build_datasets(str(image_folder), 32)
    correct = total = 0
    with torch.no_grad():
        for x, y in val_loader(data.val, 4, 0):
            correct += int((net(to_device(x, CPU)).argmax(1) == y).sum())
            total += len(y)
    assert 100.0 * correct / total == pytest.approx(check["top1_pytorch"])


def test_export_from_a_supernet_and_a_search_result(tmp_path, supernet, found):  # noqa: F811
    summary = export.export(
        export.parse_args(
            [
                "--supernet",
                str(supernet),
                "--search-result",
                str(found["path"]),
                "--arch-index",
                "0",
                "--out",
                str(tmp_path),
                "--val_batch_size",
                "4",
                *MODEL,
            ]
        )
    )
    assert summary["selection"] == found["archs"][0] and (tmp_path / "arch0.onnx").is_file()
    assert summary["check"]["compared_on"] == "8 random inputs"


@pytest.mark.parametrize("case", ["stage-1 checkpoint", "arch index", "unwritable out", "no source"])
def test_export_bad_input(tmp_path, supernet, found, case):  # noqa: F811
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    flags, words = {
        "stage-1 checkpoint": (["--checkpoint", str(supernet)], ["not a stage-3 checkpoint", "--supernet"]),
        "arch index": (
            ["--supernet", str(supernet), "--search-result", str(found["path"]), "--arch-index", "7", *MODEL],
            ["--arch-index 7", "folds [0, 1]"],
        ),
        "unwritable out": (
            ["--checkpoint", str(supernet), "--out", str(blocker / "sub")],
            ["--out", "cannot be"],
        ),
        "no source": ([], ["give --checkpoint"]),
    }[case]
    result = run_script(
        "04export.py", *(["--out", str(tmp_path / "out")] if case != "unwritable out" else []), *flags
    )
    assert_clean_failure(result, *words)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("arch*"))
