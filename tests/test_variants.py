"""The supernet variants of ``build_supernet``: the ``lsq`` and ``float`` baselines (single branch,
no L2 decays) next to BASQ's clip branches, the small-input stem, and the CLI flags that pick them.

Checkpoint key layout of the default model is checked against the fixtures in test_mobilenet_v2.py.
"""
import math
import re

import pytest
import torch
from torch import nn

from models import QUANTIZERS, build_supernet
from quant import ClipActivation, LsqActivation, QConv
from utils.checkpoint import load_supernet, save_file
from utils.cli import model_config
from utils.errors import UsageError

from .conftest import load_script

ARCHS = ("mobilenet_v2", "resnet18")
L2 = [0.01, 0.001, 0.0001]
SIZE = 16  # input side: small, to keep every forward cheap


def tiny(arch: str, quantizer: str = "basq", l2_vals=L2, **kw) -> nn.Module:
    torch.manual_seed(0)
    return build_supernet(arch, 10, 2, l2_vals, width_multiplier=0.25, width_divisor=8,
                          quantizer=quantizer, **kw)


def uniform(model, branch: int = 0) -> tuple[int, ...]:
    return (branch,) * model.num_searchable_layers


def images(n: int = 4, size: int = SIZE, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def branch_quantizer_lists(model) -> dict[str, nn.ModuleList]:
    """Every branch unit's ``branch_bn_q_{i}`` list (BN_pre, activation quantizer) per branch."""
    found = {name: m for name, m in model.named_modules() if re.search(r"(^|\.)branch_bn_q_\d+$", name)}
    assert len(found) == model.num_searchable_layers
    return found


def count(model, kind) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def start_activation_steps(model, x: torch.Tensor) -> None:
    """Stage 1's start: the LSQ activation steps set from a batch."""
    model.initialize_activation_steps(x, uniform(model))


# -- basq, the default ------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_basq_has_one_clip_quantizer_per_decay_in_every_searchable_layer(arch):
    model = tiny(arch)
    assert model.quantizer == "basq" and model.config["quantizer"] == "basq"
    assert model.config["l2_vals"] == L2 and model.num_branches == len(L2)
    assert count(model, ClipActivation) == model.num_searchable_layers * len(L2)
    for name, branches in branch_quantizer_lists(model).items():
        assert len(branches) == len(L2), name
        for j, (bn, clip) in enumerate(branches):
            assert isinstance(bn, nn.BatchNorm2d) and isinstance(clip, ClipActivation), name
            assert (clip.l2, clip.branch) == (L2[j], j), name
    assert build_supernet(arch, 10, 2, L2, width_multiplier=0.25, width_divisor=8).config == model.config


def test_basq_still_needs_decays():
    with pytest.raises(ValueError, match="l2_vals is empty"):
        tiny("resnet18", "basq", l2_vals=[])


def test_unknown_quantizer_is_refused_naming_the_choices():
    assert set(QUANTIZERS) == {"basq", "lsq", "lsq-tensor", "float"}
    with pytest.raises(ValueError, match="pact") as info:
        tiny("mobilenet_v2", "pact")
    assert all(q in str(info.value) for q in QUANTIZERS)


# -- lsq --------------------------------------------------------------------------------------

LSQS = ["lsq", "lsq-tensor"]  # a step per channel (the reference's), a step per tensor (the paper's)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quantizer", LSQS)
def test_lsq_has_a_single_branch_of_lsq_quantizers(arch, quantizer):
    model = tiny(arch, quantizer)  # the l2 values given are ignored
    assert model.quantizer == quantizer and model.num_branches == 1
    assert model.config["l2_vals"] == [] and model.config["quantizer"] == quantizer
    assert count(model, ClipActivation) == 0
    for name, branches in branch_quantizer_lists(model).items():
        assert len(branches) == 1, name
        bn, q = branches[0]
        assert isinstance(q, LsqActivation), name
        assert q.s.shape == ((1,) if quantizer == "lsq-tensor" else (bn.num_features,)), name
        assert q.steps().shape == (bn.num_features,), name
        assert q.qp == 3  # 2 bits
    # Every activation quantizer of the network, MobileNet-v2's always-on ones too, has the row's steps.
    per_tensor = {q.per_tensor for q in model.modules() if isinstance(q, LsqActivation)}
    assert per_tensor == {quantizer == "lsq-tensor"}
    per_branch = [re.search(r"(?:branch_bn_q_|branch_bn_|bn)\d+(?:_last)?\.(\d+)\.", k)
                  for k in model.state_dict()]
    assert {m.group(1) for m in per_branch if m} == {"0"}  # BN_pre, BN_post, BN_last of branch 0 only
    assert model(images(), uniform(model)).shape == (4, 10)
    with pytest.raises(ValueError, match="branch outside 0..0"):
        model(images(), uniform(model, 1))


def test_lsq_ignores_even_invalid_decays():
    model = tiny("resnet18", "lsq", l2_vals=[-1.0, 0.0])
    assert model.config["l2_vals"] == [] and model.num_branches == 1


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quantizer", LSQS)
def test_lsq_branch_quantizers_output_steps_set_from_the_first_batch(arch, quantizer):
    model = tiny(arch, quantizer).train()
    quantizers = {name: branches[0][1] for name, branches in branch_quantizer_lists(model).items()}
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = (args[0].detach().clone(), output.detach().clone(), module.steps().detach().clone())
        return hook

    handles = [q.register_forward_hook(record(name)) for name, q in quantizers.items()]
    try:
        start_activation_steps(model, images())
        first = dict(seen)
        assert first.keys() == quantizers.keys()
        seen.clear()
        model(images(seed=1), uniform(model))  # afterwards the steps stay
    finally:
        for h in handles:
            h.remove()

    def check(name, x, y, s):
        q = y / s.view(1, -1, 1, 1)
        torch.testing.assert_close(q, q.round(), atol=1e-4, rtol=0, msg=name)  # multiples of the step
        assert q.min() >= -1e-4 and q.max() <= 3 + 1e-4, name  # within [0, qp * s] per channel
        assert q.round().unique().numel() > 1, name
        assert not torch.allclose(x, y), name

    for name, (x, y, s) in first.items():  # the initialising pass quantizes with the initial step 1
        assert torch.equal(s, torch.ones_like(s)), name
        check(name, x, y, s)
        set_from_input = quantizers[name].s.detach()
        assert (set_from_input > 0).all(), name
        # LSQ's initial step, 2 <|x|> / sqrt(Qp), the mean over each channel or over the tensor
        mean = x.abs().mean().view(1) if quantizer == "lsq-tensor" else x.abs().mean((0, 2, 3))
        torch.testing.assert_close(set_from_input, 2 * mean / math.sqrt(3), msg=name)
    for name, (x, y, s) in seen.items():
        torch.testing.assert_close(s, quantizers[name].steps().detach(), rtol=0, atol=0, msg=name)
        check(name, x, y, s)


# -- float ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_float_has_no_quantizer_at_all(arch):
    model = tiny(arch, "float")
    assert model.quantizer == "float" and model.num_branches == 1
    assert model.config["l2_vals"] == [] and model.config["quantizer"] == "float"
    assert count(model, ClipActivation) == count(model, LsqActivation) == 0
    assert all(len(b) == 1 for b in branch_quantizer_lists(model).values())
    model.change_precision(True, True)
    convs = [m for m in model.modules() if isinstance(m, QConv)]
    assert convs and not any(m.quantize_weights for m in convs)

    # The switch changes nothing: the forward is the one of the full-precision weights.
    model.eval()
    x = images()
    with torch.no_grad():
        switched = model(x, uniform(model))
        model.change_precision(False, False)
        plain = model(x, uniform(model))
    torch.testing.assert_close(switched, plain, rtol=0, atol=0)


def directional_derivatives(model, x: torch.Tensor) -> tuple[float, float]:
    """Autograd's and a central finite difference's derivative of a projection of the output along
    a random input direction, in float64 and train mode (BN on batch statistics, dropout off).

    They agree for a network without quantizers (piecewise linear and smooth). A rounding quantizer
    has zero derivative almost everywhere while its straight-through gradient passes ``g``.
    """
    model.double().train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    g = torch.Generator().manual_seed(3)
    x = x.double()
    direction = torch.randn(x.shape, generator=g, dtype=torch.float64)
    weights = torch.randn(x.shape[0], model.config["num_classes"], generator=g, dtype=torch.float64)
    selection = uniform(model)
    xr = x.clone().requires_grad_()
    (model(xr, selection) * weights).sum().backward()
    analytic = float((xr.grad * direction).sum())
    eps = 1e-8  # small: a ReLU kink within reach of the step would bend the difference
    with torch.no_grad():
        up, down = model(x + eps * direction, selection), model(x - eps * direction, selection)
    numeric = float(((up - down) * weights).sum() / (2 * eps))
    return analytic, numeric


@pytest.mark.parametrize("arch", ARCHS)
def test_float_output_is_a_smooth_function_of_the_input(arch):
    model = tiny(arch, "float", small_input_stem=True)
    model.change_precision(True, True)
    analytic, numeric = directional_derivatives(model, images())
    assert math.isfinite(analytic) and abs(analytic) > 1e-3
    assert numeric == pytest.approx(analytic, rel=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quantizer", ["lsq", "lsq-tensor", "basq"])
def test_the_smoothness_check_sees_active_quantizers(arch, quantizer):
    # The check above, on the quantized variants: their straight-through gradient is no derivative.
    model = tiny(arch, quantizer, small_input_stem=True)
    start_activation_steps(model, images())
    model.change_precision(True, True)
    analytic, numeric = directional_derivatives(model, images())
    assert numeric != pytest.approx(analytic, rel=1e-2)


# -- the small-input stem ---------------------------------------------------------------------

@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_mobilenet_small_input_stem_has_stride_one(quantizer):
    small, imagenet = tiny("mobilenet_v2", quantizer, small_input_stem=True), tiny("mobilenet_v2", quantizer)
    x = images(2, 20)
    assert small.feature[0].conv1.stride == (1, 1) and imagenet.feature[0].conv1.stride == (2, 2)
    assert small.feature[0](x).shape[-2:] == (20, 20)
    assert imagenet.feature[0](x).shape[-2:] == (10, 10)
    assert small.config["small_input_stem"] is True and imagenet.config["small_input_stem"] is False
    for model in (small, imagenet):
        assert model(x, uniform(model)).shape == (2, 10)
    assert small.state_dict().keys() == imagenet.state_dict().keys()
    assert tiny("mobilenet_v2", quantizer, small_input_stem=1).config["small_input_stem"] is True


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_resnet_small_input_stem_is_a_3x3_stride_one_conv_without_max_pool(quantizer):
    small, imagenet = tiny("resnet18", quantizer, small_input_stem=True), tiny("resnet18", quantizer)
    conv = small.stem.conv1
    assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (1, 1), (1, 1))
    assert isinstance(small.stem.maxpool, nn.Identity)
    conv = imagenet.stem.conv1
    assert (conv.kernel_size, conv.stride, conv.padding) == ((7, 7), (2, 2), (3, 3))
    assert isinstance(imagenet.stem.maxpool, nn.MaxPool2d)
    x = images(2, 20)
    assert small.stem(x).shape[-2:] == (20, 20)
    assert imagenet.stem(x).shape[-2:] == (5, 5)
    assert small.config["small_input_stem"] is True and imagenet.config["small_input_stem"] is False
    for model in (small, imagenet):
        assert model(x, uniform(model)).shape == (2, 10)


# -- checkpoints ------------------------------------------------------------------------------

def test_variant_checkpoint_round_trips_and_other_variants_are_refused(tmp_path):
    model = tiny("resnet18", "lsq", small_input_stem=True)
    path = tmp_path / "lsq.pth"
    save_file({"config": model.config, "model_state_dict": model.state_dict()}, path)
    loaded, _ = load_supernet(path, dict(model.config))
    assert loaded.quantizer == "lsq" and loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(UsageError, match="small_input_stem=True, the flags say False"):
        load_supernet(path, {**model.config, "small_input_stem": False})
    with pytest.raises(UsageError, match="quantizer=lsq, the flags say float"):
        load_supernet(path, {**model.config, "quantizer": "float"})


# -- the flags --------------------------------------------------------------------------------

STAGES = {name: load_script(name)
          for name in ("01train_supernet.py", "02kfold_evolution.py", "03finetune.py")}


@pytest.mark.parametrize("script", STAGES)
def test_flags_pick_the_variant(script):
    parse = STAGES[script].parse_args
    default = model_config(parse(["--l2_bounds", "0.1,0.02"]), 7)
    assert default["quantizer"] == "basq" and default["small_input_stem"] is False
    assert default["l2_vals"] == [0.1, 0.02]
    for quantizer in ("lsq", "lsq-tensor", "float"):
        config = model_config(parse(["--l2_bounds", "0.1,0.02", "--quantizer", quantizer]), 7)
        assert config["quantizer"] == quantizer and config["l2_vals"] == []
    assert model_config(parse(["--small_input_stem"]), 7)["small_input_stem"] is True


@pytest.mark.parametrize("flags", [[], ["--quantizer", "lsq", "--small_input_stem"],
                                   ["--quantizer", "float", "--arch", "resnet18"]])
def test_flag_config_is_the_config_the_model_records(flags):
    args = STAGES["02kfold_evolution.py"].parse_args(
        ["--width_multiplier", "0.25", "--width_divisor", "8", "--l2_bounds", "0.01,0.001", *flags])
    config = model_config(args, 5)
    assert build_supernet(**config).config == config  # what stages 2 and 3 compare checkpoints with


def test_bad_quantizer_flag_lists_the_choices(capsys):
    with pytest.raises(SystemExit) as info:
        STAGES["01train_supernet.py"].parse_args(["--quantizer", "pact"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--quantizer" in err and "pact" in err
    assert all(f"'{q}'" in err for q in QUANTIZERS)
