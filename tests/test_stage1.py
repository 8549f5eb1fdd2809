"""Stage 1: optimizer groups and decays, schedule, phases, resume, checkpoints and bad input."""
import copy
import itertools
import math
import re
import shutil

import pytest
import torch

from models import build_supernet
from training.losses import kd_loss
from training.step import train_step
from utils.checkpoint import load_file
from utils.errors import UsageError

from .conftest import assert_clean_failure, assert_close_to_scale, load_script, make_image_folder, run_script

stage1 = load_script("01train_supernet.py")

TINY = ["--width_multiplier", "0.25", "--width_divisor", "8", "--base_resolution", "32",
        "--l2_bounds", "0.01,0.001,0.0001", "--batch_size", "8", "--replicas", "2", "-j", "0",
        "--report_freq", "1"]


def tiny_args(tmp_path, data, *extra):
    return stage1.parse_args(["--data", str(data), "--teacher", "none", "--save", str(tmp_path / "out"),
                              *TINY, *extra])


def test_reference_defaults():
    args = stage1.parse_args([])
    assert (args.batch_size, args.abin_total_iters, args.awbin_total_iters) == (768, 466000, 466000)
    assert args.learning_rate_abin == args.learning_rate_wbin == 3.75e-4
    assert args.weight_decay_abin == args.weight_decay_wbin == 5e-6
    assert args.l2_bounds == [0.01, 0.005, 0.001, 0.0005, 0.0001, 0.00005, 0.00001]
    assert (args.bits, args.base_resolution, args.width_multiplier, args.width_divisor) == (2, 224, 1.0, 1)
    assert (args.arch, args.save, args.teacher) == ("mobilenet_v2", "train-supernet", "resnet50")
    assert stage1.parse_args(["--l2_bounds", "0.1, 0.02"]).l2_bounds == [0.1, 0.02]


def test_one_iteration_matches_hand_computed_adam_with_branch_decays():
    torch.manual_seed(0)
    l2 = [0.5, 0.05, 0.005]
    model = build_supernet("mobilenet_v2", 10, 2, l2, width_multiplier=0.25, width_divisor=8)
    model.change_precision(True, False)
    model.classifier[0].eval()  # the same forward as the twin's below
    twin = copy.deepcopy(model)
    lr, wd = 1e-3, 0.01
    optimizer, _ = stage1.phase_optimizer(model, lr, wd, total_iters=10)
    x, teacher_logits = torch.randn(4, 3, 32, 32), torch.randn(4, 10)
    selection = [i % 3 for i in range(model.num_searchable_layers)]
    kd_loss(twin(x, selection), teacher_logits).backward()
    torch.nn.utils.clip_grad_norm_(twin.parameters(), 10.0)
    grads = {n: p.grad for n, p in twin.named_parameters() if p.grad is not None}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(model, x, selection, lambda logits, piece: kd_loss(logits, teacher_logits[piece]), optimizer)
    checked = set()
    unselected = 0
    for name, p in model.named_parameters():
        if name in grads:  # the twin's gradients: the same up to float noise (another run's sums)
            assert_close_to_scale(p.grad, grads[name], rtol=1e-4, atol=1e-7, msg=name)
        if name.endswith("upper_bound"):
            decay = l2[int(name.split(".")[3])]
        elif p.dim() == 4 or name.endswith(".weights"):
            decay = wd
        else:
            decay = 0.0
        if name.endswith(".bin"):
            assert torch.equal(p, before[name]), name  # never optimized
            continue
        # Every parameter is stepped, the unselected branches with a zero gradient (SPEC 3).
        # Adam's first step with coupled L2: g' = g + decay * p; p -= lr * g' / (|g'| + eps).
        # From the gradient the step saw: a mathematically zero one (a BN bias before a train-mode
        # BN) is float noise, and its sign, which another run's sums may flip, decides the step.
        g = p.grad + decay * before[name]
        unselected += name not in grads
        assert name in grads or not p.grad.any(), name
        expected = before[name] - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7, msg=name)
        checked.add(decay)
    assert {*l2, wd, 0.0} == checked and unselected > 0
    clip = model.feature[1].branch_bn_q_1[1][1].upper_bound  # branch 1 of layer 0 was not selected
    assert selection[0] == 0 and clip.item() == pytest.approx(6.0 - lr)  # its L2 term moved it


def test_cosine_schedule_per_iteration():
    model = build_supernet("mobilenet_v2", 10, 2, [0.01], width_multiplier=0.25, width_divisor=8)
    optimizer, scheduler = stage1.phase_optimizer(model, 0.1, 0.0, total_iters=8)
    for step in range(8):
        expected = 0.1 * (1 + math.cos(math.pi * step / 8)) / 2
        assert all(g["lr"] == pytest.approx(expected) for g in optimizer.param_groups)
        optimizer.step()
        scheduler.step()


def test_short_run_phases_checkpoints_and_logs(tmp_path, image_folder):
    # A large phase-1 and a tiny phase-2 learning rate make the weight-step re-initialisation visible.
    args = tiny_args(tmp_path, image_folder, "--abin_total_iters", "3", "--awbin_total_iters", "3",
                     "--save_interval", "2", "--learning_rate_abin", "0.01", "--learning_rate_wbin", "1e-7")
    stage1.train(args)
    out = tmp_path / "out"
    names = sorted(p.name for p in out.glob("*.pth"))
    assert names == [f"model_{kind}_best_{i:05d}it.pth" for kind in ("actbin", "actwbin") for i in (1, 2, 3)]
    ckpt = load_file(out / "model_actwbin_best_00003it.pth")  # safe loading, resume state included
    assert {"iter", "model_state_dict", "best_top1_acc", "config", "optimizer", "rng"} <= set(ckpt)
    assert ckpt["iter"] == 3 and ckpt["phase"] == 2 and 0 <= ckpt["best_top1_acc"] <= 100
    assert ckpt["config"]["num_classes"] == 3
    model = build_supernet(**ckpt["config"])
    model.load_state_dict(ckpt["model_state_dict"], strict=True)
    # Phase 2 starts from weight steps re-initialised from the phase-1 weights.
    end1 = load_file(out / "model_actbin_best_00003it.pth")["model_state_dict"]
    start2 = load_file(out / "model_actwbin_best_00001it.pth")["model_state_dict"]
    key = "feature.2.conv1.weights"
    s = start2[key.replace("weights", "w_quantize.s")]
    expected = 2 * end1[key].view(s.numel(), -1).abs().mean(1) / 1.0
    torch.testing.assert_close(s, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(end1[key.replace("weights", "w_quantize.s")], expected, atol=1e-3)
    log = (out / "log.txt").read_text()
    assert "phase 1 iter 3/3" in log and "phase 2 iter 3/3" in log
    assert list(out.glob("events.out.tfevents.*"))
    stage1.train(args)  # a second run into the same folder works


def test_resume_gives_the_uninterrupted_weights(tmp_path, image_folder):
    full = tiny_args(tmp_path / "a", image_folder, "--abin_total_iters", "3", "--awbin_total_iters", "3",
                     "--save_interval", "2")
    stage1.train(full)
    final = load_file(tmp_path / "a/out/model_actwbin_best_00003it.pth")["model_state_dict"]
    for start in ("model_actbin_best_00002it.pth", "model_actbin_best_00003it.pth",
                  "model_actwbin_best_00001it.pth"):
        resumed = tiny_args(tmp_path / start, image_folder, "--abin_total_iters", "3",
                            "--awbin_total_iters", "3", "--save_interval", "2",
                            "--resume", str(tmp_path / "a/out" / start))
        stage1.train(resumed)
        again = load_file(tmp_path / start / "out/model_actwbin_best_00003it.pth")["model_state_dict"]
        for k, v in final.items():
            torch.testing.assert_close(again[k], v, rtol=0, atol=1e-5, msg=f"{start}: {k}")


def test_resume_with_loader_workers_gives_the_uninterrupted_weights(tmp_path, image_folder):
    """Each sample's augmentation has a seed of its own: workers do not change what is read."""
    flags = ("--abin_total_iters", "3", "--awbin_total_iters", "1", "--save_interval", "2", "-j", "2")
    stage1.train(tiny_args(tmp_path / "a", image_folder, *flags))
    final = load_file(tmp_path / "a/out/model_actwbin_best_00001it.pth")["model_state_dict"]
    stage1.train(tiny_args(tmp_path / "b", image_folder, *flags, "--resume",
                           str(tmp_path / "a/out/model_actbin_best_00002it.pth")))
    again = load_file(tmp_path / "b/out/model_actwbin_best_00001it.pth")["model_state_dict"]
    for k, v in final.items():
        torch.testing.assert_close(again[k], v, rtol=0, atol=1e-5, msg=k)


def test_a_resume_that_restarts_the_dropout_draws_is_caught(tmp_path, image_folder, monkeypatch):
    """The resume tests compare with dropout on: masks drawn by a count of this process's steps
    (which restarts at a resume) in place of the iteration leave the resumed run elsewhere."""
    real, count = stage1.Draws, itertools.count(1)
    monkeypatch.setattr(stage1, "Draws", lambda seed, iteration: real(seed, next(count)))
    flags = ("--abin_total_iters", "3", "--awbin_total_iters", "1", "--save_interval", "2")
    stage1.train(tiny_args(tmp_path / "a", image_folder, *flags))
    final = load_file(tmp_path / "a/out/model_actwbin_best_00001it.pth")["model_state_dict"]
    count = itertools.count(1)
    stage1.train(tiny_args(tmp_path / "b", image_folder, *flags, "--resume",
                           str(tmp_path / "a/out/model_actbin_best_00002it.pth")))
    again = load_file(tmp_path / "b/out/model_actwbin_best_00001it.pth")["model_state_dict"]
    assert not torch.allclose(again["classifier.1.weight"], final["classifier.1.weight"], rtol=0, atol=1e-5)


def test_fashion_mnist_short_run(tmp_path):
    from utils.data import DEBIAN_FASHION_MNIST, FASHION_MNIST_FILES
    if not (DEBIAN_FASHION_MNIST / f"{FASHION_MNIST_FILES[0]}.gz").is_file() and \
            not (stage1.Path("data/FashionMNIST/raw") / FASHION_MNIST_FILES[0]).is_file():
        pytest.skip("Fashion-MNIST is not on this machine (make data installs it)")
    args = stage1.parse_args(["--teacher", "none", "--save", str(tmp_path), *TINY,
                              "--abin_total_iters", "2", "--awbin_total_iters", "2"])
    stage1.train(args)
    assert load_file(tmp_path / "model_actwbin_best_00002it.pth")["config"]["num_classes"] == 10


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory, image_folder):
    """A finished run whose checkpoints the failing runs below must leave untouched."""
    out = tmp_path_factory.mktemp("earlier")
    run = run_script("01train_supernet.py", "--data", str(image_folder), "--teacher", "none",
                     "--save", str(out), *TINY, "--abin_total_iters", "1", "--awbin_total_iters", "1")
    assert run.returncode == 0, run.stderr
    return out


@pytest.mark.parametrize("flags, words", [
    (["--data", "/nonexistent/imagenet"], ["/nonexistent/imagenet", "no such folder"]),
    (["--data", "EMPTY"], ["train", "missing"]),
    (["--data", "NOVAL"], ["val", "missing"]),
    (["--bits", "1"], ["--bits", "2 to 8"]),
    (["--l2_bounds", "0.01,abc"], ["--l2_bounds", "comma-separated"]),
    (["--teacher", "no_such_model"], ["--teacher no_such_model"]),
    (["--resume", "NOTCKPT"], ["not a PyTorch checkpoint"]),
    (["--resume", "OTHERCONFIG"], ["--resume", "bits=2", "the flags say 3"]),
    (["--learning_rate_abin", "1e30", "--abin_total_iters", "20"], ["the loss is", "iteration"]),
])
def test_bad_input(tmp_path, image_folder, earlier_run, flags, words):
    (tmp_path / "EMPTY").mkdir()
    make_image_folder(tmp_path / "NOVAL", classes=2, train_per_class=2, val_per_class=0)
    shutil.rmtree(tmp_path / "NOVAL" / "val")
    (tmp_path / "NOTCKPT").write_text("not a checkpoint")
    replace = {"EMPTY": str(tmp_path / "EMPTY"), "NOVAL": str(tmp_path / "NOVAL"),
               "NOTCKPT": str(tmp_path / "NOTCKPT"),
               "OTHERCONFIG": str(earlier_run / "model_actwbin_best_00001it.pth")}
    flags = [replace.get(f, f) for f in flags]
    if "OTHERCONFIG" in replace and flags[-1] == replace["OTHERCONFIG"]:
        flags += ["--bits", "3"]
    before = {p.name: p.read_bytes() for p in earlier_run.glob("*.pth")}
    result = run_script("01train_supernet.py", "--data", str(image_folder), "--teacher", "none",
                        "--save", str(earlier_run), *TINY, "--abin_total_iters", "1",
                        "--awbin_total_iters", "1", *flags)
    assert_clean_failure(result, *words)
    after = {p.name: p.read_bytes() for p in earlier_run.glob("*.pth")}
    if "--learning_rate_abin" in flags:
        # The diverging run wrote its own good iteration-1 checkpoint before the loss blew up.
        rewritten = "model_actbin_best_00001it.pth"
        load_file(earlier_run / rewritten)
        before.pop(rewritten), after.pop(rewritten)
    assert after == before


def test_foreach_adam_gives_the_per_parameter_loops_values():
    from training.param_groups import stage1_param_groups

    torch.manual_seed(0)
    model = build_supernet("mobilenet_v2", 10, 2, [0.5, 0.05, 0.005], width_multiplier=0.25,
                           width_divisor=8)
    model.change_precision(True, True)
    twin = copy.deepcopy(model)
    foreach, _ = stage1.phase_optimizer(model, 1e-3, 0.01, total_iters=10)
    loop = torch.optim.Adam(stage1_param_groups(twin, 0.01), lr=1e-3, foreach=False)
    x, target = torch.randn(4, 3, 32, 32), torch.randn(4, 10)
    for step in range(3):
        selection = [(i + step) % 3 for i in range(model.num_searchable_layers)]
        for net, optimizer in ((model, foreach), (twin, loop)):
            optimizer.zero_grad()
            torch.manual_seed(step)  # the same dropout
            kd_loss(net(x, selection), target).backward()
            optimizer.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_lsq_steps_initialised_once_before_training_on_a_batch_of_their_own(tmp_path, image_folder,
                                                                            monkeypatch):
    from models.supernet import Supernet

    events = []
    real_init, real_step = Supernet.initialize_activation_steps, stage1.train_step

    def init(model, images, selection):
        events.append(("init", images.clone()))
        return real_init(model, images, selection)

    def step(model, images, *rest):
        events.append(("step", images.clone()))
        return real_step(model, images, *rest)

    monkeypatch.setattr(Supernet, "initialize_activation_steps", init)
    monkeypatch.setattr(stage1, "train_step", step)
    args = tiny_args(tmp_path, image_folder, "--abin_total_iters", "2", "--awbin_total_iters", "1")
    stage1.train(args)
    assert [kind for kind, _ in events] == ["init", "step", "step", "step"]
    init_images = events[0][1]
    assert len(init_images) == 4 and events[1][1].shape == (8, *init_images.shape[1:])  # a piece of 8 / 2
    assert not any(torch.equal(init_images, images) for _, images in events[1:])  # not a training batch
    steps = load_file(tmp_path / "out/model_actbin_best_00001it.pth")["model_state_dict"]
    assert not torch.equal(steps["feature.2.bn_qconv_bn_relu_0.1.s"], torch.ones_like(
        steps["feature.2.bn_qconv_bn_relu_0.1.s"]))
    events.clear()  # a resumed run keeps the saved steps
    first = tmp_path / "out/model_actbin_best_00001it.pth"
    resumed = tiny_args(tmp_path / "resumed", image_folder, "--abin_total_iters", "2",
                        "--awbin_total_iters", "1", "--resume", str(first))
    stage1.train(resumed)
    assert [kind for kind, _ in events] == ["step", "step"]


class FakeCuda:
    """``torch.cuda``'s generator calls, recorded: the CUDA path of saving and resuming on a CPU."""

    def __init__(self, monkeypatch):
        self.set = []
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([device.index or 0, 7],
                                                                                      dtype=torch.uint8))
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: self.set.append(
            (state.tolist(), device)))
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("all devices set"))


def test_each_rank_saves_its_own_cuda_generator(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    rng = stage1.random.Random(3)
    state = stage1.rng_state(rng, torch.device("cuda", 0))
    assert len(state["ranks"]) == 1 and state["ranks"][0]["cuda"].tolist() == [0, 7]
    assert "cuda" not in stage1.rng_state(rng, torch.device("cpu"))["ranks"][0]
    # Resumed on a GPU: this rank's own device gets this rank's own state.
    stage1.restore_rng(state, rng, torch.device("cuda", 0))
    assert cuda.set == [([0, 7], torch.device("cuda", 0))]


@pytest.mark.parametrize("saved_on, resumed_on", [("cuda", "cpu"), ("cpu", "cuda")])
def test_resume_on_another_device_kind(monkeypatch, saved_on, resumed_on):
    cuda = FakeCuda(monkeypatch)
    rng = stage1.random.Random(3)
    state = stage1.rng_state(rng, torch.device(saved_on, 0) if saved_on == "cuda" else torch.device("cpu"))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(99)
    rng.random()
    stage1.restore_rng(state, rng, torch.device("cuda", 0) if resumed_on == "cuda" else torch.device("cpu"))
    assert cuda.set == []  # no CUDA state to restore, or no GPU to restore it on
    assert rng.random() == stage1.random.Random(3).random()
    assert not torch.equal(torch.rand(3), expected)


def test_resume_on_more_or_fewer_processes(monkeypatch):
    """Two ranks saved; resumed on three, rank 2 keeps its own seed; on one, rank 0 takes its own."""
    cuda = FakeCuda(monkeypatch)
    torch.manual_seed(5)
    first = torch.get_rng_state()
    torch.manual_seed(6)
    second = torch.get_rng_state()
    selection = stage1.rng_state(stage1.random.Random(0), torch.device("cpu"))["selection"]
    state = {"selection": selection,
             "ranks": [{"torch": first, "cuda": torch.tensor([0, 1], dtype=torch.uint8)},
                       {"torch": second, "cuda": torch.tensor([1, 1], dtype=torch.uint8)}]}
    for rank, expected in ((0, first), (1, second), (2, None)):
        monkeypatch.setattr(stage1.distributed, "rank", lambda rank=rank: rank)
        torch.manual_seed(1000 + rank)
        mine = torch.get_rng_state()
        cuda.set.clear()
        stage1.restore_rng(state, stage1.random.Random(), torch.device("cuda", rank))
        assert torch.equal(torch.get_rng_state(), expected if expected is not None else mine)
        assert cuda.set == ([] if expected is None else [([rank, 1], torch.device("cuda", rank))])


def test_resume_reads_the_rng_of_earlier_releases():
    torch.manual_seed(8)
    selection = stage1.rng_state(stage1.random.Random(1), torch.device("cpu"))["selection"]
    legacy = {"torch": torch.get_rng_state(), "selection": selection,
              "cuda": [torch.zeros(2, dtype=torch.uint8)]}  # rank 0's, of every device
    torch.manual_seed(0)
    stage1.restore_rng(legacy, stage1.random.Random(), torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), legacy["torch"])


def test_mixed_precision_run_keeps_its_scaler_and_resumes(tmp_path, image_folder):
    args = tiny_args(tmp_path, image_folder, "--abin_total_iters", "2", "--awbin_total_iters", "1",
                     "--amp", "fp16")
    stage1.train(args)
    first = load_file(tmp_path / "out/model_actbin_best_00001it.pth")
    assert first["args"]["amp"] == "fp16" and first["scaler"]["scale"] > 0
    resumed = tiny_args(tmp_path / "again", image_folder, "--abin_total_iters", "2", "--awbin_total_iters",
                        "1", "--amp", "fp16", "--resume", str(tmp_path / "out/model_actbin_best_00001it.pth"))
    stage1.train(resumed)
    assert (tmp_path / "again/out/model_actwbin_best_00001it.pth").is_file()
    other = tiny_args(tmp_path / "other", image_folder, "--abin_total_iters", "2", "--awbin_total_iters", "1",
                      "--resume", str(tmp_path / "out/model_actbin_best_00001it.pth"))
    with pytest.raises(UsageError, match="amp=fp16, the flags say None"):
        stage1.train(other)


def test_a_diverging_run_stops_at_its_next_report_and_writes_no_nonfinite_checkpoint(tmp_path, image_folder):
    """The non-finite check is read at reports and checkpoints, not every step: the run stops at the
    next one, names the iteration where the loss first went non-finite, and saves nothing past it."""
    args = tiny_args(tmp_path, image_folder, "--abin_total_iters", "40", "--awbin_total_iters", "1",
                     "--learning_rate_abin", "1e30", "--report_freq", "30", "--save_interval", "30")
    message = r"the loss is not finite \(nan or inf\) at phase 1 iteration (\d+)"
    with pytest.raises(UsageError, match=message) as e:
        stage1.train(args)
    first = int(re.search(r"iteration (\d+)", str(e.value)).group(1))
    assert 1 < first <= 30 and "model_actbin_best_00001it.pth, is intact" in str(e.value)
    saved = sorted(p.name for p in (tmp_path / "out").glob("*.pth"))
    assert saved == ["model_actbin_best_00001it.pth"]  # iteration 30's checkpoint was never written
    state = load_file(tmp_path / "out" / saved[0])["model_state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_epochs_keep_their_last_batch_and_phase_2_starts_a_fresh_one(tmp_path, image_folder, monkeypatch):
    """As the reference's loader and its second ``train()``: 36 images in batches of 8 are four
    batches and one of 4, each cut into pieces; phase 2 begins epoch 2, not the rest of epoch 1."""
    sizes, real = [], stage1.train_step

    def step(model, images, selection, criterion, optimizer, amp, share, *how):
        sizes.append((len(images), share.sizes))
        return real(model, images, selection, criterion, optimizer, amp, share, *how)

    monkeypatch.setattr(stage1, "train_step", step)
    stage1.train(tiny_args(tmp_path, image_folder, "--abin_total_iters", "6", "--awbin_total_iters", "2"))
    assert sizes == [(8, (4, 4))] * 4 + [(4, (2, 2))] + [(8, (4, 4))] * 3
    end = load_file(tmp_path / "out/model_actwbin_best_00002it.pth")
    assert (end["epoch"], end["batch"]) == (2, 2)
