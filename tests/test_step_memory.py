"""The memory table counts the steps the stages run: stage 1's figure is the peak of its own step."""
import torch
import torchvision

from bench import memory
from models import build_supernet
from training.losses import kd_loss
from utils.checkpoint import save_file

from .conftest import load_script

stage1 = load_script("01train_supernet.py")

MODEL = ["--width_multiplier", "0.25", "--width_divisor", "8", "--base_resolution", "32",
         "--l2_bounds", "0.01,0.001,0.0001"]


def step_peaks(monkeypatch, args) -> list[tuple[tuple[int, ...], int]]:
    """Stage 1 run as a user runs it, the peak of the tensors each of its steps makes (the
    parameters, gradients, optimizer state, buffers and the batch already there) with its pieces."""
    peaks, real = [], stage1.stage_step

    def measured(model, teacher, images, labels, selection, optimizer, amp, share, *how):
        resident = memory.step_resident(model, optimizer, teacher) + [images, labels]
        with memory.LiveTensors(resident) as live:
            out = real(model, teacher, images, labels, selection, optimizer, amp, share, *how)
        peaks.append((share.sizes, live.peak))
        return out

    monkeypatch.setattr(stage1, "stage_step", measured)
    stage1.train(args)
    monkeypatch.undo()
    return peaks


def test_stage1_figure_is_the_peak_of_the_stage_step_as_it_runs(tmp_path, image_folder, monkeypatch):
    """``bench.memory``'s stage-1 figure, fitted on pieces of 2 and 4 with its own images and Adam,
    is the peak of stage 1's step at pieces of 4, one per pass, in a real run (phase 2, weights
    quantized as the table's model; its second step, when Adam's state exists), byte for byte: both
    count the same tensors. A run whose teacher runs inside the loss, beside the student's saved
    activations (the order the table once assumed away), peaks higher by a part of the teacher's
    forward and fails it."""
    teacher = tmp_path / "teacher.pth"
    save_file({"arch": "resnet18", "num_classes": 3,
               "model_state_dict": torchvision.models.resnet18(num_classes=3).state_dict()}, teacher)
    args = stage1.parse_args(["--data", str(image_folder), *MODEL, "--teacher", str(teacher),
                              "--batch_size", "8", "--replicas", "2", "--pieces_per_pass", "1", "-j", "0",
                              "--report_freq", "1",
                              "--abin_total_iters", "0", "--awbin_total_iters", "2",
                              "--save", str(tmp_path / "out")])
    peaks = step_peaks(monkeypatch, args)
    assert [sizes for sizes, _ in peaks] == [(4, 4)] * 2
    ran = peaks[1][1]
    model = build_supernet("mobilenet_v2", 3, 2, [0.01, 0.001, 0.0001], width_multiplier=0.25,
                           width_divisor=8)
    model.change_precision(True, True)
    figures = memory.measure(None, model=model, resolution=32, sizes=(2, 4),
                             teacher=torchvision.models.resnet18(num_classes=3))
    assert figures.stage1_step(4) == ran
    assert figures.stage1(4, 8) == (4 * figures.parameters + figures.teacher_parameters
                                    + 8 * memory.IMAGE * 5 + figures.stage1_step(4))

    def teacher_inside_the_loss(teacher, images, labels, amp, share=None):
        def distillation(logits, piece):
            with torch.no_grad(), amp.autocast():
                targets = teacher(images[piece]).float()
            return kd_loss(logits, targets)
        return distillation

    monkeypatch.setattr(stage1, "criterion", teacher_inside_the_loss)
    args.save = str(tmp_path / "out-late-teacher")
    late = step_peaks(monkeypatch, args)[1][1]
    assert late - ran > 0.2 * figures.teacher(4), (late, ran)
