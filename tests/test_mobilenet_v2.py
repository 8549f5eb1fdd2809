"""The MobileNet-v2 supernet against the reference fixtures, and where it must go beyond them."""
import json

import pytest
import torch
import torch.nn.functional as F

from models import build_supernet
from models.skip import FlexibleSkip
from tests.boundaries import agrees_up_to_boundaries
from tests.conftest import assert_close_to_scale
from training.param_groups import stage1_param_groups, stage3_param_groups

SMALL = ["mbv2_small_2bit.pt", "mbv2_small_4bit.pt"]
MODES = {"a1w1": (True, True), "a1w0": (True, False), "a0w0": (False, False)}


def reference_model(fixture):
    model = build_supernet("mobilenet_v2", **fixture["config"])
    model.load_state_dict(fixture["state_dict"], strict=True)
    return model


def test_imagenet_state_dict_layout(fixtures_dir):
    ref = json.loads((fixtures_dir / "mbv2_imagenet_checkpoint_keys.json").read_text())
    model = build_supernet("mobilenet_v2", **ref["config"])
    assert model.num_searchable_layers == ref["num_searchable_layers"] == 17
    ours = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    assert ours == ref["keys"]


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("mode", MODES)
def test_eval_logits(load_fixture, name, mode, kernels):
    f = load_fixture(name)
    model = reference_model(f).eval()
    model.change_precision(*MODES[mode])
    for selection, expected in zip(f["selections"], f["eval_logits"][mode], strict=True):
        with torch.no_grad():
            torch.testing.assert_close(model(f["x"], selection), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", SMALL)
def test_train_step(load_fixture, name, kernels):
    """One train-mode forward and backward against the reference's, up to the quantizer inputs
    that lie on a rounding boundary (``tests/boundaries.py``: oneDNN's SSE4.1 stem convolution puts
    one of the 2-bit fixture's on the other side of it)."""
    f = load_fixture(name)
    t = f["train"]
    model = reference_model(f).train()
    model.classifier[0].eval()
    model.change_precision(True, True)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def run():
        model.load_state_dict(start)
        model.zero_grad(set_to_none=True)
        logits = model(f["x"], t["selection"])
        loss = F.cross_entropy(logits, f["target"])
        loss.backward()
        return logits, loss

    def check(result):
        logits, loss = result
        torch.testing.assert_close(logits, t["logits"], rtol=1e-4, atol=1e-5)
        assert loss.item() == pytest.approx(t["loss"], rel=1e-4)
        params = dict(model.named_parameters())
        # Gradients that are zero in exact arithmetic (the bias of a BN followed by a train-mode BN)
        # come out as float noise of ~1e-6 in both implementations, hence the small absolute
        # tolerance; an element of a weight gradient that nearly cancels carries the noise of the
        # tensor's scale (AVX2's sums left -0.00124 off by 1.8e-5 in a tensor whose largest element
        # is 11).
        for k, g in t["grads"].items():
            assert_close_to_scale(params[k].grad, g, rtol=1e-3, atol=1e-5, msg=k)
        assert sorted(k for k, p in params.items() if p.grad is None) == sorted(t["no_grad"])
        state = model.state_dict()
        for k, v in t["running_stats_after"].items():
            torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-6, msg=k)

    agrees_up_to_boundaries(model, run, check)


@pytest.mark.parametrize("name", SMALL)
def test_stage1_groups(load_fixture, name):
    f = load_fixture(name)
    expected = f["optimizer_groups_stage1"]
    groups = stage1_param_groups(build_supernet("mobilenet_v2", **f["config"]), weight_decay=5e-6)
    l2_vals = f["config"]["l2_vals"]
    assert [g["names"] for g in groups[: len(l2_vals)]] == expected["bounds_by_branch"]
    assert [g["weight_decay"] for g in groups[: len(l2_vals)]] == l2_vals
    assert groups[len(l2_vals)]["names"] == expected["weights_decayed"]
    assert groups[len(l2_vals)]["weight_decay"] == 5e-6
    assert groups[len(l2_vals) + 1]["names"] == expected["other_no_decay"]
    assert groups[len(l2_vals) + 1]["weight_decay"] == 0.0
    optimized = {n for g in groups for n in g["names"]}
    assert not optimized & set(expected["not_optimized"])


@pytest.mark.parametrize("name", SMALL)
def test_stage3_trainable(load_fixture, name):
    f = load_fixture(name)
    model = build_supernet("mobilenet_v2", **f["config"])
    groups = stage3_param_groups(model, lr=7.5e-6)
    trained = [n for g in groups if g["lr"] > 0 for n in g["names"]]
    assert sorted(trained) == sorted(f["trainable_stage3"])
    # The rest is frozen at lr 0 (the reference's way): it has gradients, and ``bin`` is left out.
    frozen = groups[-1]
    assert frozen["lr"] == 0 and not set(frozen["names"]) & set(trained)
    optimized = {n for g in groups for n in g["names"]}
    assert optimized == {n for n, p in model.named_parameters() if p.requires_grad}
    never = set(f["optimizer_groups_stage1"]["not_optimized"])
    assert {n for n, p in model.named_parameters()} - optimized == never
    for g in groups[1:-1]:
        assert all(n.endswith("upper_bound") for n in g["names"])
    no_clip = stage3_param_groups(build_supernet("mobilenet_v2", **f["config"]), lr=7.5e-6, train_clip=False)
    assert [n for g in no_clip if g["lr"] > 0 for n in g["names"]] == [
        n for n in f["trainable_stage3"] if "bias" in n]


def small(**kw):
    args = dict(arch="mobilenet_v2", num_classes=10, bits=2, l2_vals=[0.01, 0.001],
                width_multiplier=0.5, width_divisor=8)
    args.update(kw)
    return build_supernet(**args)


def test_backward_runs_and_only_selected_branch_learns():
    # Reference defect 1: its in-place skip addition breaks backward on current PyTorch.
    model = small(l2_vals=[0.01, 0.001, 0.0001])
    model.change_precision(True, True)
    selection = [i % 3 for i in range(model.num_searchable_layers)]
    model(torch.randn(2, 3, 32, 32), selection).sum().backward()
    for name, p in model.named_parameters():
        if ".branch_bn_q_1." in name or ".branch_bn_1." in name or ".bn1_last." in name:
            layer, branch = int(name.split(".")[1]), int(name.split(".")[3])
            selected = branch == selection[layer - 1]
            trainable = not name.endswith(".bin")
            assert (p.grad is not None) == (selected and trainable), name


@pytest.mark.parametrize("width", [0.35, 0.75, 1.3])
def test_widths_that_are_not_multiples(width):
    # Reference defect 2: a skip from Cin to Cout that is not a multiple crashes there.
    model = small(width_multiplier=width, width_divisor=1)
    model.change_precision(True, True)
    model(torch.randn(2, 3, 32, 32), [0] * 17).sum().backward()


@pytest.mark.parametrize("size", [33, 40, 57])
def test_input_sizes_not_divisible_by_32(size):
    # Reference defect 3: the stride-2 skip's pooling and the conv disagree on odd sizes.
    model = small()
    assert model(torch.randn(1, 3, size, size), [1] * 17).shape == (1, 10)


def test_depth_multiplier_is_applied():
    assert small(depth_multiplier=1.0).num_searchable_layers == 17
    assert small(depth_multiplier=0.5).num_searchable_layers == 1 + 1 + 2 + 2 + 2 + 2 + 1
    assert small(depth_multiplier=2.0).num_searchable_layers == 34


def test_skip_repeat_truncate_and_chunk_sum_by_hand():
    x = torch.arange(3.0).view(1, 3, 1, 1)
    assert FlexibleSkip(3, 7)(x).flatten().tolist() == [0, 1, 2, 0, 1, 2, 0]
    x = torch.arange(7.0).view(1, 7, 1, 1)
    # chunks of 3: [0,1,2] + [3,4,5] + [6,0,0]
    assert FlexibleSkip(7, 3)(x).flatten().tolist() == [9, 5, 7]
    x = torch.arange(9.0).view(1, 1, 3, 3)
    pooled = FlexibleSkip(1, 1, stride=2)(x)
    assert pooled.flatten().tolist() == [2.0, 3.5, 6.5, 8.0]


@pytest.mark.parametrize(("cin", "cout", "stride"), [(4, 12, 1), (4, 12, 2), (3, 7, 1), (6, 4, 2), (5, 5, 1)])
def test_skip_added_to_a_unit_output_is_the_sum_with_the_skip(cin, cout, stride):
    """``add_to`` broadcasts a whole-number repeat instead of copying it: the same sum, bit for bit."""
    skip = FlexibleSkip(cin, cout, stride)
    x = torch.randn(2, cin, 7, 7, requires_grad=True)
    out = torch.randn(2, cout, 4 if stride == 2 else 7, 4 if stride == 2 else 7)
    expected = out + skip(x)
    (grad_expected,) = torch.autograd.grad(expected, x, torch.ones_like(expected))
    added = skip.add_to(out, x)
    assert torch.equal(added, expected)
    (grad,) = torch.autograd.grad(added, x, torch.ones_like(added))
    torch.testing.assert_close(grad, grad_expected)


def test_different_selections_differ_and_precision_modes_differ():
    model = small().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 0:
                p.uniform_(1.0, 4.0)  # distinct clips per branch
        model.change_precision(True, True)
        a, b = model(x, [0] * 17), model(x, [1] * 17)
        model.change_precision(False, False)
        c = model(x, [0] * 17)
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("kwargs, word", [
    (dict(bits=1), "bits"), (dict(bits=9), "bits"), (dict(l2_vals=[]), "l2_vals"),
    (dict(l2_vals=[0.01, 0.0]), "l2_vals"), (dict(l2_vals=[-1e-3]), "l2_vals"),
    (dict(arch="vgg16"), "arch"), (dict(width_multiplier=0), "width_multiplier"),
])
def test_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        small(**kwargs)


@pytest.mark.parametrize("selection", [[0] * 16, [0] * 18, [0] * 16 + [2], [-1] + [0] * 16])
def test_bad_selection(selection):
    with pytest.raises(ValueError, match="selection"):
        small()(torch.randn(1, 3, 32, 32), selection)


def test_activation_steps_initialised_as_the_references_initialize():
    """One no-grad train-mode pass; each quantizer quantizes with step 1, then takes its step."""
    model = small().eval()
    x = torch.randn(4, 3, 32, 32)
    first = model.feature[2].bn_qconv_bn_relu_0
    second = model.feature[2].bn_qconv_bn_relu_2
    seen = {}
    first[1].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach().clone()))
    first[1].register_forward_hook(lambda m, a, y: seen.setdefault("y", y.detach().clone()))
    bn = model.feature[2].bn0_last
    model.initialize_activation_steps(x, [0] * 17)
    expected = 2 * seen["x"].abs().mean((0, 2, 3)) / 3**0.5
    torch.testing.assert_close(first[1].s.data, expected)
    assert torch.equal(seen["y"], seen["x"].clamp(0, 3).round())  # quantized with the initial step 1
    assert not torch.equal(second[1].s.data, torch.ones_like(second[1].s))
    assert int(bn.num_batches_tracked) == 1  # the pass updated the running statistics once
    assert not model.training and not seen["x"].requires_grad  # back in eval mode; no autograd
    before = first[1].s.detach().clone()
    model(x * 3, [0] * 17)  # afterwards the steps stay
    assert torch.equal(first[1].s.data, before)


def test_weight_steps_reinitialised_from_trained_weights():
    model = small()
    conv = model.feature[3].conv1
    with torch.no_grad():
        conv.weights.mul_(10)
    model.init_weight_steps()
    expected = 2 * conv.weight.abs().flatten(1).mean(1) / 1.0
    torch.testing.assert_close(conv.w_quantize.s.data, expected)
