"""The fused CPU kernels (cpu_kernels/kernels.c) against PyTorch's ops: forward values and input gradients
the same bit for bit, the sums of the step-size and clip gradients to float accuracy."""
import os
import subprocess
import sys

import pytest
import torch

from cpu_kernels import eval_unit, train_batch_norm
from cpu_kernels import library as native
from cpu_kernels.after import quantizes_after
from quant.functional import clip_quantize, lsq_quantize
from tests.conftest import ROOT, require_exact, require_native

# Values on and next to every boundary, and the non-finite ones.
EDGES = [0.0, -0.0, 6.0, 3.0, 2.0, 4.0, 1.5, 0.5, 2.5, 3.0000002, 5.9999995, 6.0000005, -1e-30,
         1e30, -1e30, float("inf"), float("-inf"), float("nan")]


def with_edges(shape, scale=3.0, seed=0):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    x.view(-1)[: len(EDGES)] = torch.tensor(EDGES)
    return x


def forward_backward(fn, inputs, fused: bool, monkeypatch):
    """Outputs and gradients of ``fn`` with the fused kernels or with PyTorch's ops."""
    with monkeypatch.context() as m:
        if not fused:
            m.setattr(native, "usable", lambda *tensors: False)
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        y = fn(*leaves)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    return y.detach(), [t.grad for t in leaves]


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert torch.equal(a.nan_to_num(nan=7.0), b.nan_to_num(nan=7.0))
    assert torch.equal(a.isnan(), b.isnan())


@pytest.fixture(autouse=True)
def built():
    require_native()


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (8, 24, 16, 16), (4, 96, 56, 56)])
@pytest.mark.parametrize("clip, bin_", [(6.0, 2 / 3), (2.5, 6 / 7), (3.0, 14 / 15), (4.0, 0.0),
                                        (4.0, 1.0), (0.0, 2 / 3), (-1.0, 2 / 3)])
def test_clip_quantizer_is_pytorch_bit_for_bit(monkeypatch, shape, clip, bin_):
    x, c = with_edges(shape), torch.tensor(clip)
    fn = lambda x, c: clip_quantize(x, c, torch.tensor([bin_]))  # noqa: E731
    (y, (gx, gc)), (y0, (gx0, gc0)) = (forward_backward(fn, [x, c], fused, monkeypatch)
                                       for fused in (True, False))
    assert_same_bits(y, y0)
    assert_same_bits(gx, gx0)
    torch.testing.assert_close(gc, gc0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, dim, lo, hi", [
    ((2, 3, 5, 7), 1, 0, 3), ((8, 24, 16, 16), 1, 0, 15), ((4, 96, 56, 56), 1, 0, 7),
    ((24, 1, 3, 3), 0, -1, 1), ((64, 32, 1, 1), 0, -7, 7), ((7, 5, 3, 3), 0, -3, 3)])
def test_lsq_quantizer_is_pytorch_bit_for_bit(monkeypatch, shape, dim, lo, hi):
    x = with_edges(shape)
    s = torch.rand(shape[dim], generator=torch.Generator().manual_seed(2)) + 0.05
    fn = lambda x, s: lsq_quantize(x, s, lo, hi, dim)  # noqa: E731
    (y, (gx, gs)), (y0, (gx0, gs0)) = (forward_backward(fn, [x, s], fused, monkeypatch)
                                       for fused in (True, False))
    assert_same_bits(y, y0)
    assert_same_bits(gx, gx0)
    finite = torch.isfinite(gs0)  # a channel holding inf or nan has a nan step gradient in both
    assert torch.equal(finite, torch.isfinite(gs))
    torch.testing.assert_close(gs[finite], gs0[finite], rtol=1e-5, atol=1e-5)


def test_gradient_sums_do_not_depend_on_the_thread_count():
    lib = native.library()
    x, g = with_edges((8, 24, 16, 16)).nan_to_num(0, 0, 0), torch.randn(8, 24, 16, 16)
    s = torch.rand(24) + 0.1
    clip_sums, step_sums = [], []
    for threads in (1, 2, 3):
        grad_x, grad_s = torch.empty_like(x), torch.empty(24, dtype=torch.float64)
        clip_sums.append(lib.clip_backward(native.ptr(x), native.ptr(g), native.ptr(grad_x),
                                           x.numel(), 3.0, threads))
        lib.lsq_backward(native.ptr(x), native.ptr(s), native.ptr(g), native.ptr(grad_x),
                         native.ptr(grad_s), 8, 24, 256, 0.0, 3.0, threads)
        step_sums.append(grad_s)
    assert clip_sums[0] == clip_sums[1] == clip_sums[2]
    assert torch.equal(step_sums[0], step_sums[1]) and torch.equal(step_sums[0], step_sums[2])


def test_channels_last_and_non_contiguous_inputs_take_pytorchs_ops():
    x = torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last)
    s = torch.rand(8) + 0.1
    assert not native.usable(x) and native.usable(x.contiguous(), s)
    torch.testing.assert_close(lsq_quantize(x, s, 0, 3, 1), lsq_quantize(x.contiguous(), s, 0, 3, 1),
                               rtol=0, atol=0)
    assert not native.usable(torch.randn(4, 4).t()) and not native.usable(x.contiguous().double())


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


QUANTIZE = ("import torch, warnings; from cpu_kernels import library as native; from quant.functional import "
            "clip_quantize; warnings.simplefilter('always'); "
            "print(native.library() is None, clip_quantize(torch.tensor([0.4, 1.6, 9.0]), "
            "torch.tensor(3.0), torch.tensor([0.75])).tolist())")


def test_without_a_compiler_the_quantizers_warn_and_use_pytorchs_ops(tmp_path):
    r = run_python(QUANTIZE, CC="/bin/false", BASQ_CACHE=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0] == "True [0.75, 1.5, 3.0]"
    assert "fused CPU kernels are not available" in r.stderr and "BASQ_NATIVE=0" in r.stderr


def test_basq_native_0_turns_them_off_silently(tmp_path):
    r = run_python(QUANTIZE, BASQ_NATIVE="0", BASQ_CACHE=str(tmp_path))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.strip() == "True [0.75, 1.5, 3.0]"
    assert not list(tmp_path.iterdir())


def test_the_library_is_built_once_into_the_cache(tmp_path):
    first = run_python(QUANTIZE, BASQ_CACHE=str(tmp_path))
    built = sorted(tmp_path.iterdir())
    second = run_python(QUANTIZE, BASQ_CACHE=str(tmp_path))
    assert first.stdout == second.stdout == "False [0.75, 1.5, 3.0]\n", first.stderr + second.stderr
    assert len(built) == 1 and built[0].suffix == ".so" and sorted(tmp_path.iterdir()) == built


# ---- A unit in evaluation as two fused kernels (models/eval_unit.py) ----

def randomise_batchnorms(model: torch.nn.Module, seed: int = 0) -> None:
    """BatchNorm statistics and affine terms far from the identity, as after training."""
    gen = torch.Generator().manual_seed(seed)
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.normal_(0, 1, generator=gen)
            bn.running_var.uniform_(0.05, 3, generator=gen)
            bn.weight.data.normal_(1, 0.5, generator=gen)
            bn.bias.data.normal_(0, 0.5, generator=gen)


def supernet(arch: str, width: float):
    from models import build_supernet

    model = build_supernet(arch, 10, 2, [0.01, 0.001, 0.0001], width_multiplier=width)
    model.change_precision(True, True)
    randomise_batchnorms(model)
    return model.eval()


def fused_and_pytorch(model, x, selection, monkeypatch):
    with torch.no_grad():
        fused = model(x, selection)
        with monkeypatch.context() as m:
            m.setattr(native, "usable", lambda *tensors: False)
            return fused, model(x, selection)


@pytest.fixture
def exact():
    require_exact(lambda: eval_unit.is_exact(),
                  "this machine's PyTorch rounds BatchNorm otherwise: evaluation runs PyTorch's ops "
                  "(test_evaluation_keeps_pytorchs_ops_where_the_kernels_differ)")


@pytest.mark.parametrize("arch, width, size", [("mobilenet_v2", 0.5, 32), ("mobilenet_v2", 0.35, 33),
                                               ("mobilenet_v2", 1.0, 57), ("resnet18", 0.5, 40)])
def test_eval_unituation_is_pytorch_bit_for_bit(exact, monkeypatch, arch, width, size):
    model = supernet(arch, width)
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(3))
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        selection = torch.randint(0, model.num_branches, (model.num_searchable_layers,),
                                  generator=gen).tolist()
        fused, pytorch = fused_and_pytorch(model, x, selection, monkeypatch)
        assert torch.equal(fused, pytorch)


def test_eval_unituation_runs_only_without_autograd_in_eval_mode(exact, monkeypatch):
    calls = []
    unit = eval_unit.unit
    monkeypatch.setattr(eval_unit, "unit", lambda *a: calls.append(1) or unit(*a))
    model = supernet("mobilenet_v2", 0.35)
    x, selection = torch.randn(2, 3, 32, 32), [0] * model.num_searchable_layers
    model(x, selection)
    assert not calls  # autograd on
    with torch.no_grad():
        model.train()(x, selection)
        assert not calls  # BatchNorm in training mode
        model.eval()(x, selection)
    assert len(calls) == 51  # every unit: 17 depthwise, 17 project, 16 expand, the last conv


def test_eval_unituation_follows_changed_batchnorm_statistics(exact, monkeypatch):
    model = supernet("mobilenet_v2", 0.35)
    x, selection = torch.randn(2, 3, 32, 32), [1] * model.num_searchable_layers
    before, _ = fused_and_pytorch(model, x, selection, monkeypatch)
    randomise_batchnorms(model, seed=1)  # in place, as BN recalibration and load_state_dict do
    after, pytorch = fused_and_pytorch(model, x, selection, monkeypatch)
    assert torch.equal(after, pytorch) and not torch.equal(after, before)


def test_evaluation_keeps_pytorchs_ops_where_the_kernels_differ(monkeypatch):
    terms = eval_unit._bn_terms
    monkeypatch.setattr(eval_unit, "_bn_terms",
                        lambda bn: (terms(bn)[0] * 1.0000001, *terms(bn)[1:]))
    eval_unit.is_exact.cache_clear()
    try:
        with pytest.warns(UserWarning, match="evaluation uses the unit's PyTorch ops"):
            assert not eval_unit.is_exact()
        model = supernet("mobilenet_v2", 0.35)
        x, selection = torch.randn(2, 3, 32, 32), [2] * model.num_searchable_layers
        fused, pytorch = fused_and_pytorch(model, x, selection, monkeypatch)
        assert torch.equal(fused, pytorch)
    finally:
        eval_unit.is_exact.cache_clear()


def test_the_check_leaves_the_random_stream_alone():
    eval_unit.is_exact.cache_clear()
    torch.manual_seed(5)
    eval_unit.is_exact()
    drawn = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(drawn, torch.rand(3))


def test_eval_unituation_under_inference_mode(exact, monkeypatch):
    eval_unit.is_exact.cache_clear()  # the first check may come under inference_mode
    model = supernet("mobilenet_v2", 0.35)
    x, selection = torch.randn(2, 3, 32, 32), [0] * model.num_searchable_layers
    with torch.inference_mode():
        fused = model(x, selection)
    assert eval_unit.is_exact()
    assert torch.equal(fused, fused_and_pytorch(model, x, selection, monkeypatch)[1])


# ---- BatchNorm in training with faster statistics (models/train_batch_norm.py) ----

@pytest.fixture
def exact_train():
    require_exact(train_batch_norm.is_exact,
                  "this machine's PyTorch computes training-mode BatchNorm otherwise: training runs "
                  "nn.BatchNorm2d (test_training_keeps_pytorchs_batchnorm_where_the_kernel_differs)")


@pytest.mark.parametrize("shape, momentum", [((8, 24, 9, 7), 0.1), ((3, 13, 16, 16), None),
                                             ((1, 96, 28, 28), 0.1), ((5, 7, 2, 3), 0.3)])
def test_training_batchnorm_is_pytorch_bit_for_bit(exact_train, shape, momentum):
    gen = torch.Generator().manual_seed(0)
    ours, theirs = (torch.nn.BatchNorm2d(shape[1], momentum=momentum) for _ in range(2))
    with torch.no_grad():
        for name in ("running_mean", "running_var", "weight", "bias"):
            value = torch.rand(shape[1], generator=gen) + 0.5
            getattr(ours, name).copy_(value)
            getattr(theirs, name).copy_(value)
    for _ in range(3):
        x = (torch.randn(shape, generator=gen) * 4 + 2).requires_grad_()
        g = torch.randn(shape, generator=gen)
        assert train_batch_norm.applies(ours, x)
        y = train_batch_norm.batch_norm(ours, x)
        (grad_x, grad_w, grad_b) = torch.autograd.grad(y, (x, ours.weight, ours.bias), g)
        y0 = theirs(x)
        assert torch.equal(y, y0)
        for a, b in zip(ours.buffers(), theirs.buffers(), strict=True):
            assert torch.equal(a, b)
        for ours_grad, theirs_grad in zip((grad_x, grad_w, grad_b),
                                          torch.autograd.grad(y0, (x, theirs.weight, theirs.bias), g),
                                          strict=True):
            torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18"])
def test_training_step_is_pytorchs(exact_train, monkeypatch, arch):
    import copy

    import torch.nn.functional as F

    model = supernet(arch, 0.5).train()
    reference = copy.deepcopy(model)
    x, y = torch.randn(8, 3, 40, 40), torch.randint(0, 10, (8,))
    selection = [1] * model.num_searchable_layers
    outputs = []
    for net, fused in ((model, True), (reference, False)):
        with monkeypatch.context() as m:
            if not fused:
                m.setattr(native, "usable", lambda *tensors: False)
            torch.manual_seed(1)  # the classifier's dropout
            outputs.append(net(x, selection))
            F.cross_entropy(outputs[-1], y).backward()
    assert torch.equal(*outputs)
    for a, b in zip(model.buffers(), reference.buffers(), strict=True):
        assert torch.equal(a, b)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_training_batchnorm_applies_only_where_pytorch_sums_the_same_way(exact_train):
    bn = torch.nn.BatchNorm2d(4)
    assert train_batch_norm.applies(bn, torch.randn(2, 4, 3, 3))
    assert not train_batch_norm.applies(bn, torch.randn(8, 4, 1, 1))  # also channels-last contiguous
    assert not train_batch_norm.applies(torch.nn.BatchNorm2d(1), torch.randn(8, 1, 3, 3))
    assert not train_batch_norm.applies(bn, torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last))
    assert not train_batch_norm.applies(bn.eval(), torch.randn(2, 4, 3, 3))
    bn.train().register_forward_hook(lambda *args: None)
    assert not train_batch_norm.applies(bn, torch.randn(2, 4, 3, 3))


def test_training_keeps_pytorchs_batchnorm_where_the_kernel_differs(monkeypatch):
    batch_norm = train_batch_norm.batch_norm
    monkeypatch.setattr(train_batch_norm, "batch_norm",
                        lambda *args, **kwargs: batch_norm(*args, **kwargs) * 1.0000001)
    train_batch_norm.is_exact.cache_clear()
    try:
        with pytest.warns(UserWarning, match="training uses PyTorch's BatchNorm"):
            assert not train_batch_norm.is_exact()
        assert not train_batch_norm.applies(torch.nn.BatchNorm2d(4), torch.randn(2, 4, 3, 3))
    finally:
        train_batch_norm.is_exact.cache_clear()


@pytest.mark.parametrize("after", ["relu and skip", "clip", "lsq", "lsq per tensor"])
def test_training_batchnorm_with_what_follows_it_is_pytorchs(exact_train, after):
    from quant import ClipActivation, LsqActivation

    gen = torch.Generator().manual_seed(4)
    shape = (6, 12, 10, 9)
    ours, theirs = torch.nn.BatchNorm2d(12), torch.nn.BatchNorm2d(12)
    x = (torch.randn(shape, generator=gen) * 2 + 1).requires_grad_()
    g = torch.randn(shape, generator=gen)
    if after == "relu and skip":  # a skip of 4 channels, repeated 3 times
        skip = torch.randn(6, 4, 10, 9, generator=gen).requires_grad_()
        y = train_batch_norm.batch_norm(ours, x, skip)
        y0 = torch.relu(theirs(x)) + skip.repeat(1, 3, 1, 1)
        own = skip
    else:
        quantizer = (ClipActivation(2) if after == "clip"
                     else LsqActivation(2, 12, per_tensor=after == "lsq per tensor"))
        if after == "clip":
            quantizer.quantize = True
            quantizer.upper_bound.data.fill_(1.2)
        else:
            quantizer.s.data.copy_(torch.rand(quantizer.s.numel(), generator=gen) * 0.5 + 0.2)
        assert quantizes_after(quantizer)
        y = train_batch_norm.batch_norm(ours, x, quantizer=quantizer)
        y0 = quantizer(theirs(x))
        own = quantizer.upper_bound if after == "clip" else quantizer.s
    grads = torch.autograd.grad(y, [x, ours.weight, ours.bias, own], g)
    grads0 = torch.autograd.grad(y0, [x, theirs.weight, theirs.bias, own], g)
    assert torch.equal(y, y0)
    for a, b in zip(grads, grads0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_lsq_initialisation_hook_keeps_the_quantizer_separate(exact_train):
    from quant import LsqActivation

    quantizer = LsqActivation(2, 4)
    quantizer.register_forward_pre_hook(lambda module, args: None)
    assert not quantizes_after(quantizer)


def test_parts_with_hooks_run_as_themselves_in_evaluation(exact):
    model = supernet("mobilenet_v2", 0.35)
    called = []
    bn_last = model.feature[2].bn0_last
    bn_last.register_forward_hook(lambda *args: called.append("bn"))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32), [0] * model.num_searchable_layers)
    assert called == ["bn"]


def test_the_back_end_stands_aside_where_no_kernel_applies(monkeypatch):
    from cpu_kernels import units

    model = supernet("mobilenet_v2", 0.35)  # eval mode
    parts = model.feature[2].depthwise.parts(1)
    x = torch.randn(2, parts[0].num_features, 8, 8)
    assert units.forward(x, *parts) is None  # autograd on, BatchNorms in eval mode
    with monkeypatch.context() as m:
        m.setattr(native, "usable", lambda *tensors: False)
        assert units.forward(x, *(p.train() for p in parts)) is None  # no kernel takes the tensors
    # Training-mode BatchNorms: the kernels', unless this machine's PyTorch computes them otherwise
    # (ATEN_CPU_CAPABILITY=default), where the back end stands aside too.
    assert (units.forward(x, *parts) is not None) == train_batch_norm.is_exact()


# ---- The kernels follow the model's formula (issue 30, item 6) ----

def test_the_kernels_stand_aside_when_the_units_formula_changes(monkeypatch):
    """A researcher edits the unit in models/ (its ReLU becomes an absolute value): the kernels'
    once-per-process checks, which run the model's own formula with the back end off, fail; each
    says so in one line; the CPU path then computes the edited unit, in evaluation and in training."""
    import copy
    import warnings

    from cpu_kernels import units
    from models import units as model_units
    from quant import fused

    require_exact(eval_unit.is_exact, "this machine's PyTorch rounds BatchNorm otherwise")
    require_exact(train_batch_norm.is_exact, "this machine's PyTorch rounds BatchNorm otherwise")
    require_exact(units.is_exact, "the training kernels stand aside on this machine")

    def edited(x, bn_pre, quantizer, conv, bn_post, skip, bn_last):
        return bn_last(skip.add_to(torch.abs(bn_post(conv(quantizer(bn_pre(x))))), x))

    model = supernet("mobilenet_v2", 0.35)
    x, selection = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), [1] * 17

    def outputs():  # evaluation without autograd, then training (a copy: its statistics move)
        with torch.no_grad():
            evaluated = model(x, selection)
        trained = copy.deepcopy(model).train()
        torch.manual_seed(0)  # the classifier's dropout
        y = trained(x, selection)
        y.sum().backward()
        return evaluated, y.detach(), trained.feature[3].conv1.weights.grad

    def pytorch_outputs():
        with fused.pytorch_only():
            return outputs()

    checks = (eval_unit.is_exact, units.is_exact)
    before = pytorch_outputs()
    with monkeypatch.context() as m:
        m.setattr(model_units, "unit_formula", edited)
        for check in checks:
            check.cache_clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = outputs()
        expected = pytorch_outputs()
    for check in checks:
        check.cache_clear()
    notices = [str(w.message) for w in caught]
    assert len(notices) == 2 and all(len(n.splitlines()) == 1 for n in notices)
    assert "evaluation uses the unit's PyTorch ops" in notices[0]
    assert "training uses the unit's PyTorch ops" in notices[1]
    for a, b, unedited in zip(ours, expected, before, strict=True):
        assert torch.equal(a, b) and not torch.allclose(a, unedited)
    assert eval_unit.is_exact() and units.is_exact()  # the formula as it is: the kernels run again
