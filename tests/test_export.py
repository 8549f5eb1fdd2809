"""04export.py and export/: the standalone model equals the supernet's selection, its file holds the
codes packed and loads safely, the ONNX graph writes every quantizer out with codes at their bits
(each opset) and onnxruntime agrees with optimisations off and on, the folded graph, the sizes."""

import json

import numpy as np
import onnx
import pytest
import torch

from export.deploy import ClipQuant, DeployedNet, LsqQuant, QuantizedConv, deploy, size_report
from export.onnx_export import ORT_SETTINGS, ort_session, to_onnx
from export.packing import pack_codes, unpack_codes
from models import build_supernet
from utils.data import build_datasets, to_device, val_loader

from .conftest import assert_clean_failure, load_script, run_script
from .test_stage2 import MODEL
from .test_stage3 import checkpoint_path, finetune_run, found, supernet  # noqa: F401  (fixtures)

CPU = torch.device("cpu")


def trained(arch: str, quantizer: str = "basq", bits: int = 2) -> torch.nn.Module:
    """A small supernet with non-trivial BatchNorm statistics, weights quantized, in evaluation."""
    torch.manual_seed(0)
    extra = {
        "mobilenet_v2": {"width_multiplier": 0.25, "width_divisor": 8},
        "resnet18": {"width_multiplier": 0.125, "width_divisor": 8},
    }[arch]
    model = build_supernet(
        arch, 10, bits, [0.01, 0.001, 0.0001], base_resolution=32, quantizer=quantizer, **extra
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
    "arch, quantizer", [("mobilenet_v2", "basq"), ("resnet18", "basq"), ("mobilenet_v2", "lsq"),
                        ("resnet18", "lsq-tensor")]
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
        ("resnet18", "lsq-tensor"): {LsqQuant},
    }[arch, quantizer]
    assert kinds == expected
    if quantizer == "lsq-tensor":  # one step per tensor, deployed as that step in every channel
        assert all(u.quant.step.unique().numel() == 1 and u.quant.step.numel() > 1 for u in net.units())


def test_codes_pack_at_their_bits():
    # Two's complement fields, lowest bits first: -1, 0, 1, -2 at 2 bits are 0b11, 0b00, 0b01, 0b10.
    assert pack_codes(torch.tensor([-1, 0, 1, -2]), 2).tolist() == [0b10_01_00_11]
    assert pack_codes(torch.tensor([-1, 7, 1]), 4).tolist() == [0x7F, 0x01]
    gen = torch.Generator().manual_seed(0)
    for bits in range(1, 9):
        top = 2 ** (bits - 1)
        codes = torch.randint(-top, top, (7, 3, 3, 3), generator=gen, dtype=torch.int8)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-codes.numel() * bits // 8)
        assert torch.equal(unpack_codes(packed, bits, codes.shape), codes)
    with pytest.raises(ValueError, match="do not hold"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 2, [4, 4])


def test_the_saved_model_is_packed_loads_safely_and_rebuilds(tmp_path):
    model = trained("mobilenet_v2")
    selection = [2] * model.num_searchable_layers
    net = deploy(model, selection, batch_size=4, resolution=32)
    path = tmp_path / "arch.pt"
    net.save(path)
    saved = torch.load(path, weights_only=True)  # plain data only
    assert saved["config"]["source"]["selection"] == selection
    convs = [(name, m) for name, m in net.named_modules() if isinstance(m, QuantizedConv)]
    assert len(convs) == len(net.units())
    for name, conv in convs:  # four 2-bit codes a byte
        codes = saved["state_dict"][f"{name}.codes"]
        assert codes.dtype == torch.uint8 and codes.numel() == -(-conv.codes.numel() // 4)
    again = DeployedNet.load(path)
    for a, b in zip(again.units(), net.units(), strict=True):
        assert torch.equal(a.conv.codes, b.conv.codes) and a.conv.codes.dtype == torch.int8
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), net(x))


CODE_TYPES = {  # opset: weight codes, activation codes, their bits (2-bit codes)
    25: (onnx.TensorProto.INT2, onnx.TensorProto.UINT2, 2),
    21: (onnx.TensorProto.INT4, onnx.TensorProto.UINT4, 4),
    17: (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, 8),
}


def run_onnx(net: DeployedNet, path, x: torch.Tensor, **kwargs) -> tuple[onnx.GraphProto, list[np.ndarray]]:
    """Write ``net``'s graph, check its weight codes are only ever dequantized into a convolution
    (the onnxruntime defect that zeroed negative constants passed through DequantizeLinear and
    Reshape needs a Reshape there), and run it with graph optimisations off, all, and all with the
    weights dequantized at load (where constant folding turns the codes into float weights)."""
    to_onnx(net, path, **kwargs)
    graph = onnx.load(path).graph
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0].startswith("weight_codes"):
            assert consumers[node.output[0]] == ["Conv"]
    images = {"images": x.numpy()}
    return graph, [ort_session(path, *setting).run(None, images)[0] for setting in ORT_SETTINGS.values()]


def assert_agrees(ours: np.ndarray, theirs: np.ndarray) -> None:
    """onnxruntime's BatchNorm and divisions round in their own order: an activation on a rounding
    boundary may land on the next level, so all but a few top-1 agree and the typical logit matches."""
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.9
    assert np.median(np.abs(ours - theirs)) < 1e-3


@pytest.mark.parametrize("opset", sorted(CODE_TYPES, reverse=True))
@pytest.mark.parametrize(
    "arch, quantizer", [("mobilenet_v2", "basq"), ("resnet18", "basq"), ("mobilenet_v2", "lsq"),
                        ("resnet18", "lsq-tensor")]
)
def test_onnx_writes_every_quantizer_at_its_bits_and_onnxruntime_agrees(tmp_path, arch, quantizer, opset):
    model = trained(arch, quantizer)
    selection = [i % model.num_branches for i in range(model.num_searchable_layers)]
    net = deploy(model, selection, batch_size=8, resolution=32)
    x = torch.randn(16, 3, 32, 32)
    graph, outputs = run_onnx(net, tmp_path / "net.onnx", x, opset=opset)
    assert {o.domain: o.version for o in onnx.load(tmp_path / "net.onnx").opset_import} == {"": opset}
    ops = [node.op_type for node in graph.node]
    quants = [u.quant for u in net.units() if isinstance(u.quant, (ClipQuant, LsqQuant))]
    assert ops.count("QuantizeLinear") == len(quants)  # one per activation quantizer
    assert ops.count("DequantizeLinear") == len(quants) + len(net.units())  # and one per weight quantizer
    weight_type, activation_type, bits = CODE_TYPES[opset]
    codes = [i for i in graph.initializer if i.name.startswith("weight_codes")]
    assert len(codes) == len(net.units()) and all(i.data_type == weight_type for i in codes)
    assert [len(i.raw_data) for i in codes] == [-(-u.conv.codes.numel() * bits // 8) for u in net.units()]
    assert all(i.data_type == activation_type for i in graph.initializer if i.name.startswith("act_zero"))
    # A 2-bit type's range is the quantizer's: its saturation clamps; wider types clamp first in float.
    clamps = 0 if bits == 2 else len(quants)
    assert ops.count("Clip") + ops.count("Min") == clamps
    assert ops[0] == "Conv" and ops[-1] == "Gemm"  # the stem and the classifier stay float
    with torch.no_grad():
        ours = net(x).numpy()
    for theirs in outputs:
        assert_agrees(ours, theirs)


def test_onnx_of_three_bits_and_of_levels_below_the_types_range(tmp_path):
    """3-bit codes go in INT4/UINT4, whose range is wider: the quantizers clamp in float first, as
    does a clip whose ``bin`` gives five levels (not 2**b - 1)."""
    model = trained("mobilenet_v2", "basq", bits=3)
    net = deploy(model, [1] * model.num_searchable_layers, batch_size=8, resolution=32)
    clip = next(u.quant for u in net.units() if isinstance(u.quant, ClipQuant))
    clip.delta.copy_(clip.upper / 5)
    x = torch.randn(16, 3, 32, 32) * 2
    graph, outputs = run_onnx(net, tmp_path / "net.onnx", x)
    codes = [i for i in graph.initializer if i.name.startswith("weight_codes")]
    assert all(i.data_type == onnx.TensorProto.INT4 for i in codes)
    ops = [node.op_type for node in graph.node]
    assert ops.count("Clip") == sum(isinstance(u.quant, ClipQuant) for u in net.units())
    assert ops.count("Min") == sum(isinstance(u.quant, LsqQuant) for u in net.units())
    with torch.no_grad():
        ours = net(x).numpy()
    for theirs in outputs:
        assert_agrees(ours, theirs)


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18"])
def test_the_folded_graph_drops_the_batchnorms_into_the_weights_scales(tmp_path, arch):
    model = trained(arch)
    net = deploy(model, [1] * model.num_searchable_layers, batch_size=8, resolution=32)
    x = torch.randn(64, 3, 32, 32)
    exact, _ = run_onnx(net, tmp_path / "exact.onnx", x)
    folded, outputs = run_onnx(net, tmp_path / "fold.onnx", x, fold=True)
    count = [node.op_type for node in exact.node].count("BatchNormalization")
    assert [node.op_type for node in folded.node].count("BatchNormalization") == count - len(net.units()) - 1
    def codes(graph: onnx.GraphProto) -> list[bytes]:
        return [i.raw_data for i in graph.initializer if i.name.startswith("weight_codes")]

    assert codes(folded) == codes(exact)  # the codes unchanged
    with torch.no_grad():
        ours = net(x).numpy()
    for theirs in outputs:
        assert_agrees(ours, theirs)


def test_files_of_a_width_1_model_are_within_1_3x_of_the_packed_size(tmp_path):
    """An ImageNet-config MobileNet-v2 (width 1.0, seven branches, random weights) at a small input."""
    torch.manual_seed(0)
    model = build_supernet("mobilenet_v2", 10, 2, [0.01, 0.005, 0.001, 0.0005, 0.0001, 0.00005, 0.00001])
    model.change_precision(True, True)
    model.init_weight_steps()
    net = deploy(model.eval(), [0] * model.num_searchable_layers, batch_size=8, resolution=32)
    files = [tmp_path / "arch.pt", tmp_path / "arch.onnx"]
    net.save(files[0])
    to_onnx(net, files[1])
    report = size_report(net, files)
    assert report["files"] == {str(f): f.stat().st_size for f in files}
    for size in report["files"].values():
        assert report["total_bytes"] <= size <= 1.3 * report["total_bytes"]


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
        "-j",
        "0",
        "--fold",
    )
    assert run.returncode == 0, run.stderr
    assert {p.name for p in tmp_path.iterdir()} == {
        "arch1.pt",
        "arch1.onnx",
        "arch1_fold.onnx",
        "arch1_size.json",
        "arch1_export.json",
    }
    summary = json.loads((tmp_path / "arch1_export.json").read_text())
    assert summary["selection"] == found["archs"][1] and summary["opset"] == 25
    check = summary["check"]
    # LSQ's steps as stage 3 evaluated: batches of 4 over --replicas 2, from the checkpoint.
    assert summary["evaluation"] == {"val_batch_size": 4, "replicas": 2}
    assert check["lsq_steps_of_pieces_of"] == 2 and "pieces of 2: --val_batch_size 4" in run.stdout
    assert check["supernet_top1_agreement"] == 100.0 and check["supernet_max_relative_difference"] <= 1e-5
    assert "top-1 on the whole validation set" in run.stdout and "onnxruntime" in run.stdout
    # Each graph, with onnxruntime's optimisations off and on, scored against the standalone model.
    runs = {(e["graph"], e["graph_optimisations"]): e for e in check["onnxruntime"]}
    assert set(runs) == {(g, o) for g in ("onnx", "onnx --fold") for o in ORT_SETTINGS}
    assert all(e["top1_agreement"] >= 90 and "top1" in e for e in runs.values())
    # The size report gives each file's bytes on disk.
    size = json.loads((tmp_path / "arch1_size.json").read_text())
    names = ("arch1.pt", "arch1.onnx", "arch1_fold.onnx")
    assert size["files"] == {str(tmp_path / n): (tmp_path / n).stat().st_size for n in names}
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
                "--replicas",
                "1",
                *MODEL,
            ]
        )
    )
    assert summary["selection"] == found["archs"][0] and (tmp_path / "arch0.onnx").is_file()
    # The search's evaluation batch, the pieces given here.
    assert summary["evaluation"] == {"val_batch_size": 4, "replicas": 1}
    assert summary["check"]["compared_on"] == "8 random inputs"
    assert summary["check"]["supernet_max_relative_difference"] <= 1e-5


@pytest.mark.parametrize(
    "case", ["stage-1 checkpoint", "arch index", "unwritable out", "no source", "opset"]
)
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
        "opset": (["--checkpoint", str(supernet), "--opset", "12"], ["--opset 12", "opsets 13 to 25"]),
    }[case]
    result = run_script(
        "04export.py", *(["--out", str(tmp_path / "out")] if case != "unwritable out" else []), *flags
    )
    assert_clean_failure(result, *words)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("arch*"))
