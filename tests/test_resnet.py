"""The ResNet supernet (SPEC section 6): layer counts, branch isolation, shared weights, shapes."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import archs, build_supernet
from models.resnet import BasicBlock, ResNetSupernet
from quant import ClipActivation, QConv
from training.param_groups import stage1_param_groups, stage3_param_groups

L2 = [0.01, 0.001, 0.0001]
WIDTH = 0.125  # channels 8, 16, 32, 64: keeps every test fast


def tiny(arch: str = "resnet18", bits: int = 2, l2_vals: list[float] = L2, **kw) -> ResNetSupernet:
    torch.manual_seed(0)
    return build_supernet(arch, 10, bits, l2_vals, width_multiplier=kw.pop("width", WIDTH), **kw)


def randomize_branches(model: ResNetSupernet) -> None:
    """Give every branch its own BN and clip values, so that branches compute different things."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            elif isinstance(m, ClipActivation):
                m.upper_bound.fill_(1.0 + m.branch)
            elif isinstance(m, QConv):
                m.weights.normal_(0, 0.1, generator=g)
                m.init_weight_steps()


def branch_params(model: ResNetSupernet, layer: int, branch: int) -> dict[str, nn.Parameter]:
    """The trainable parameters owned by ``branch`` of searchable layer ``layer``."""
    prefix = f"blocks.{layer // 2}."
    index = layer % 2
    owned = (f"branch_bn_q_{index}.{branch}.", f"branch_bn_{index}.{branch}.", f"bn{index}_last.{branch}.")
    return {n: p for n, p in model.named_parameters()
            if p.requires_grad and n.startswith(tuple(prefix + o for o in owned))}


def test_archs_registered():
    assert {"mobilenet_v2", "resnet18", "resnet34"} <= set(archs())
    model = tiny()
    assert isinstance(model, ResNetSupernet)
    assert model.config["arch"] == "resnet18" and model.config["width_multiplier"] == WIDTH


@pytest.mark.parametrize("arch, depth, layers", [
    ("resnet18", 1.0, 16), ("resnet34", 1.0, 32),
    ("resnet18", 0.5, 8), ("resnet34", 0.5, 2 * (2 + 2 + 3 + 2)), ("resnet18", 1.5, 2 * 4 * 3),
])
def test_searchable_layers(arch: str, depth: float, layers: int):
    model = tiny(arch, depth_multiplier=depth)
    assert model.num_searchable_layers == layers
    assert model.num_branches == len(L2)
    assert sum(isinstance(m, QConv) for m in model.modules()) == layers
    assert sum(isinstance(m, ClipActivation) for m in model.modules()) == layers * len(L2)
    with pytest.raises(ValueError):
        model(torch.randn(2, 3, 32, 32), [0] * (layers - 1))
    with pytest.raises(ValueError):
        model(torch.randn(2, 3, 32, 32), [len(L2)] * layers)


def test_backward_reaches_only_selected_branches():
    model = tiny()
    model.change_precision(True, True)
    with torch.no_grad():  # clips low enough that some inputs exceed them and give a gradient
        for m in model.modules():
            if isinstance(m, ClipActivation):
                m.upper_bound.fill_(0.5)
    selection = [i % len(L2) for i in range(model.num_searchable_layers)]
    # not out.sum(): a constant upstream gradient through train-mode BN is exactly zero
    F.cross_entropy(model(torch.randn(2, 3, 32, 32), selection), torch.tensor([1, 7])).backward()
    for layer, chosen in enumerate(selection):
        for branch in range(len(L2)):
            params = branch_params(model, layer, branch)
            assert len(params) == 2 + 2 + 2 + 1  # BN_pre, BN_post, BN_last, upper_bound
            for name, p in params.items():
                if branch == chosen:
                    assert p.grad is not None, name
                else:
                    assert p.grad is None, name
        clip = model.blocks[layer // 2].get_submodule(f"branch_bn_q_{layer % 2}.{chosen}.1")
        assert clip.upper_bound.grad.abs() > 0
    assert all(m.bin.grad is None for m in model.modules() if isinstance(m, ClipActivation))


def test_selections_give_different_outputs():
    model = tiny()
    randomize_branches(model)
    model.change_precision(True, True)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    n = model.num_searchable_layers
    with torch.no_grad():
        out0, out0_again, out1 = model(x, [0] * n), model(x, [0] * n), model(x, [1] * n)
        one_layer = model(x, [0] * (n - 1) + [2])
    assert torch.equal(out0, out0_again)
    assert not torch.allclose(out0, out1)
    assert not torch.allclose(out0, one_layer)


def test_conv_weights_shared_across_branches():
    model = tiny(width=WIDTH)
    for block in model.blocks:
        names = [n for n, _ in block.named_parameters()]
        assert names.count("conv0.weights") == 1 and names.count("conv1.weights") == 1
        assert sum(n.endswith("weights") for n in names) == 2
    assert not any(isinstance(m, nn.Conv2d) for m in model.blocks.modules())  # no 1x1 downsample


def branch_unit_params(cin: int, cout: int, branches: int) -> int:
    # per branch: BN_pre (2 cin), upper_bound and bin (2), BN_post and BN_last (4 cout);
    # shared: 3x3 weights and one LSQ weight step per output channel
    return branches * (2 * cin + 2 + 4 * cout) + 9 * cin * cout + cout


def test_parameter_count_by_hand():
    branches, classes = len(L2), 10
    chans = [8, 16, 32, 64]
    expected = 3 * 8 * 49 + 2 * 8  # stem conv and BN
    cin = 8
    for c in chans:
        for _ in range(2):
            expected += branch_unit_params(cin, c, branches) + branch_unit_params(c, c, branches)
            cin = c
    expected += 64 * classes + classes
    model = tiny(width=WIDTH)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("size", [32, 33, 64])
def test_forward_backward_bits_and_sizes(bits: int, size: int):
    model = tiny(bits=bits, l2_vals=L2[:2])
    model.change_precision(True, True)
    selection = torch.randint(0, 2, (model.num_searchable_layers,)).tolist()
    out = model(torch.randn(2, 3, size, size), selection)
    assert out.shape == (2, 10)
    F.cross_entropy(out, torch.tensor([0, 1])).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.stem.conv1.weight.grad is not None and model.classifier.weight.grad is not None


@pytest.mark.parametrize("width, first, last", [(0.5, 32, 256), (0.3, 19, 154)])
def test_width_multiplier(width: float, first: int, last: int):
    model = tiny(width=width, l2_vals=[0.01])
    assert model.stem.conv1.out_channels == first
    assert model.classifier.in_features == last
    F.cross_entropy(model(torch.randn(2, 3, 32, 32), [0] * 16), torch.tensor([0, 1])).backward()


def test_downsampling_blocks_use_parameter_free_shortcut():
    model = tiny()
    strides = [b.conv0.stride for b in model.blocks]
    assert strides == [1, 1, 2, 1, 2, 1, 2, 1]
    block = model.blocks[2]
    assert isinstance(block, BasicBlock)
    assert not list(block.shortcut.parameters())
    assert block.shortcut.stride == 2 and block.shortcut.out_channels == 2 * block.shortcut.in_channels


def test_precision_switches_and_step_init():
    model = tiny()
    model.change_precision(True, True)
    assert all(m.quantize for m in model.modules() if isinstance(m, ClipActivation))
    assert all(m.quantize_weights for m in model.modules() if isinstance(m, QConv))
    model.init_weight_steps()
    conv = model.blocks[0].conv0
    expected = 2 * conv.weight.abs().flatten(1).mean(1) / math.sqrt(conv.w_quantize.qp)
    assert torch.allclose(conv.w_quantize.s, expected)
    # no LSQ activation quantizers: nothing to do but the BN statistics, no error
    model.initialize_activation_steps(torch.randn(2, 3, 32, 32), [0] * model.num_searchable_layers)
    model.change_precision(False, False)
    assert not any(m.quantize for m in model.modules() if isinstance(m, ClipActivation))


def test_stage1_groups_clips_by_branch():
    model = tiny("resnet34")
    groups = stage1_param_groups(model, 5e-6)
    assert len(groups) == len(L2) + 2
    for j, l2 in enumerate(L2):
        group = groups[j]
        assert group["weight_decay"] == l2
        assert len(group["names"]) == model.num_searchable_layers
        assert all(n.endswith(f".{j}.1.upper_bound") and ".branch_bn_q_" in n for n in group["names"])
    decayed = groups[len(L2)]
    assert decayed["weight_decay"] == 5e-6
    assert "stem.conv1.weight" in decayed["names"]
    assert sum(n.endswith(".weights") for n in decayed["names"]) == model.num_searchable_layers
    grouped = [n for g in groups for n in g["names"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_stage3_trains_biases_and_clips():
    model = tiny()
    groups = stage3_param_groups(model, lr=1e-3)
    biases, *clips, frozen = groups
    assert "classifier.bias" in biases["names"] and "stem.bn1.bias" in biases["names"]
    assert sorted(g["weight_decay"] for g in clips) == sorted(L2)
    assert all(len(g["names"]) == model.num_searchable_layers and g["lr"] == 1e-3 for g in clips)
    assert frozen["lr"] == 0 and "blocks.0.conv0.weights" in frozen["names"]


def test_stage1_and_stage2_run_with_resnet18(tmp_path, image_folder):
    from .conftest import assert_clean_failure, run_script

    tiny = ["--arch", "resnet18", "--width_multiplier", "0.125", "--width_divisor", "8",
            "--base_resolution", "32", "--l2_bounds", "0.01,0.001", "-j", "0", "--data", str(image_folder)]
    stage1 = run_script("01train_supernet.py", *tiny, "--teacher", "none", "--batch_size", "8",
                        "--replicas", "2",
                        "--abin_total_iters", "1", "--awbin_total_iters", "2", "--save", str(tmp_path / "s1"))
    assert stage1.returncode == 0, stage1.stderr
    supernet = tmp_path / "s1" / "model_actwbin_best_00002it.pth"
    stage2 = run_script("02kfold_evolution.py", *tiny, "--supernet", str(supernet), "--k", "2",
                        "--val_batch_size", "6", "--max-epochs", "1", "--population-num", "3",
                        "--save", str(tmp_path / "s2"))
    assert stage2.returncode == 0, stage2.stderr
    result = json.loads((tmp_path / "s2" / "search_result.json").read_text())
    assert result["config"]["arch"] == "resnet18"
    assert [len(a) for a in result["archs"]] == [16, 16]
    assert all(0 <= b < 2 for a in result["archs"] for b in a)
    wrong = run_script("02kfold_evolution.py", *tiny[2:], "--supernet", str(supernet), "--k", "2",
                       "--save", str(tmp_path / "s3"))
    assert_clean_failure(wrong, "arch=resnet18", "mobilenet_v2")
