"""A new supernet, defined in this file alone, trains, searches, fine-tunes and exports.

``TinyNet`` registers itself as the architecture ``tiny_test_net`` (``models.registry``) and
builds its blocks, ``stages()`` and its single path (``path``) from the units of ``models.units``;
the four stage scripts take it by ``--arch`` with no other change (README, "Layout").
"""
import json
from collections.abc import Sequence

import pytest
import torch
from torch import nn

from models import PathBlock, SinglePath, Supernet, archs, build_supernet, register_supernet
from models.skip import FlexibleSkip
from models.supernet import Stage, make_divisible
from models.units import BranchUnit, QuantUnit

from .conftest import load_script
from .test_stage2 import captured

ARCH = "tiny_test_net"


class TinyBlock(nn.Module):
    """An LSQ 1x1 unit and a branch-wise 3x3 unit, with a skip over both."""

    def __init__(self, cin: int, cout: int, stride: int, bits: int, l2_vals: Sequence[float], quantizer: str):
        super().__init__()
        self.first = QuantUnit(self, 0, cin, cout, bits, quantizer=quantizer)
        self.second = BranchUnit(self, 1, cout, cout, bits, l2_vals, 3, stride, quantizer=quantizer)
        self.shortcut = FlexibleSkip(cin, cout, stride)

    def forward(self, x: torch.Tensor, branch: int) -> torch.Tensor:
        return self.second(self.first(x), branch) + self.shortcut(x)

    def path(self, branch: int) -> PathBlock:
        return PathBlock([self.first.parts(), self.second.parts(branch)], self.shortcut)


@register_supernet(ARCH, "Tiny test net")
class TinyNet(Supernet):
    def __init__(self, num_classes: int, bits: int, l2_vals: Sequence[float], width_multiplier: float = 1.0,
                 width_divisor: int = 1, depth_multiplier: float = 1.0, quantizer: str = "basq",
                 small_input_stem: bool = False):
        super().__init__()
        def width(channels: int) -> int:
            return make_divisible(channels * width_multiplier, width_divisor)

        self.conv1 = nn.Conv2d(3, width(16), 3, 1 if small_input_stem else 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width(16))
        self.blocks = nn.ModuleList([TinyBlock(width(16), width(24), 2, bits, l2_vals, quantizer),
                                     TinyBlock(width(24), width(32), 2, bits, l2_vals, quantizer)])
        self.classifier = nn.Linear(width(32), num_classes)
        self.num_searchable_layers = len(self.blocks)
        self.num_branches = len(self.blocks[0].branch_bn_q_1)
        self.quantizer = quantizer

    def stages(self) -> list[Stage]:
        stem = (self.conv1, self.bn1)
        return [Stage(0, stem, lambda x, genes: torch.relu(self.bn1(self.conv1(x)))),
                *(Stage(1, (block,), lambda x, genes, block=block: block(x, genes[0]))
                  for block in self.blocks),
                Stage(0, (self.classifier,), lambda x, genes: self.classifier(x.mean((2, 3))))]

    def path(self, selection: Sequence[int]) -> SinglePath:
        genes = self.check_selection(selection)
        return SinglePath((self.conv1, self.bn1, nn.Identity()),
                          [block.path(gene) for block, gene in zip(self.blocks, genes, strict=True)],
                          self.classifier)


MODEL = ["--arch", ARCH, "--width_multiplier", "0.5", "--width_divisor", "8", "--base_resolution", "32",
         "--l2_bounds", "0.01,0.001", "-j", "0"]


def test_the_factory_refuses_an_unknown_architecture():
    assert ARCH in archs()
    with pytest.raises(ValueError, match="arch 'no_such_net' is unknown; choose one of mobilenet_v2"):
        build_supernet("no_such_net", 10, 2, [0.01])


def test_a_new_architecture_trains_searches_finetunes_and_exports(tmp_path, image_folder):
    stage1, stage2 = load_script("01train_supernet.py"), load_script("02kfold_evolution.py")
    stage3, export = load_script("03finetune.py"), load_script("04export.py")
    captured(stage1.train, stage1.parse_args([
        "--data", str(image_folder), "--teacher", "none", "--save", str(tmp_path / "s1"), *MODEL,
        "--batch_size", "8", "--replicas", "2", "--abin_total_iters", "2", "--awbin_total_iters", "2"]))
    supernet = tmp_path / "s1" / "model_actwbin_best_00002it.pth"
    assert supernet.is_file()
    common = ["--data", str(image_folder), "--supernet", str(supernet), *MODEL, "--k", "2",
              "--val_batch_size", "4", "--replicas", "2"]
    captured(stage2.search, stage2.parse_args([
        *common, "--save", str(tmp_path / "s2"), "--max-epochs", "1", "--population-num", "3",
        "--select-num", "2", "--mutation-num", "1", "--crossover-num", "1"]))
    found = json.loads((tmp_path / "s2" / "search_result.json").read_text())
    assert len(found["archs"]) == 2 and all(len(a) == 2 for a in found["archs"])
    captured(stage3.finetune, stage3.parse_args([
        *common, "--search-result", str(tmp_path / "s2" / "search_result.json"),
        "--save", str(tmp_path / "s3"), "--bn_epochs", "1", "--iters_per_epoch", "1", "--batch_size", "4"]))
    checkpoint = tmp_path / "s3" / "arch0_model_actwbin_2_2_bn_0ep.pth"
    assert checkpoint.is_file()
    captured(export.export, export.parse_args([
        "--checkpoint", str(checkpoint), "--data", str(image_folder), "--out", str(tmp_path / "out"),
        "-j", "0"]))
    summary = json.loads((tmp_path / "out" / "arch0_export.json").read_text())
    assert summary["selection"] == found["archs"][0]
    assert summary["check"]["supernet_top1_agreement"] == 100.0
    assert summary["check"]["supernet_max_relative_difference"] <= 1e-5
    assert all(run["top1_agreement"] >= 90 for run in summary["check"]["onnxruntime"])
