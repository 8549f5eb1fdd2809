"""Checkpoint I/O: the released format loads strictly, and misfits are explained in words."""
import os

import pytest
import torch

from models import build_supernet
from utils.checkpoint import load_file, load_model_state, save_file
from utils.errors import CheckpointError

CONFIG = dict(arch="mobilenet_v2", num_classes=10, bits=2, l2_vals=[0.01, 0.001, 0.0001],
              width_multiplier=0.5, width_divisor=8)


def released(tmp_path, model, prefix=""):
    path = tmp_path / "model_actwbin_best_466000it.pth"
    state = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save({"iter": 466000, "model_state_dict": state, "best_top1_acc": 61.5}, path)
    return path


@pytest.mark.parametrize("prefix", ["", "module."])
def test_released_format_loads_strictly(tmp_path, prefix):
    source = build_supernet(**CONFIG)
    with torch.no_grad():
        for p in source.parameters():
            p.uniform_()
    path = released(tmp_path, source, prefix)
    target = build_supernet(**CONFIG)
    ckpt = load_model_state(target, path)
    assert ckpt["iter"] == 466000
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_released_imagenet_layout_loads_under_safe_loading(fixtures_dir, tmp_path):
    import json
    ref = json.loads((fixtures_dir / "mbv2_imagenet_checkpoint_keys.json").read_text())
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    state = {k: torch.zeros(shape, dtype=dtypes[d]) for k, shape, d in ref["keys"]}
    path = tmp_path / "released.pth"
    torch.save({"iter": 466000, "model_state_dict": state, "best_top1_acc": 0.0}, path)
    load_model_state(build_supernet("mobilenet_v2", **ref["config"]), path)


@pytest.mark.parametrize("change, message", [
    (dict(l2_vals=[0.01, 0.001]), "checkpoint has 3 branches per layer, the model 2"),
    (dict(width_multiplier=1.0), r"width differs: feature.0.conv1.weight is \[16, 3, 3, 3\], "
                                 r"the model expects \[32, 3, 3, 3\]"),
    (dict(num_classes=5), "number of classes differs"),
    (dict(depth_multiplier=2.0), "checkpoint has 17 searchable layers, the model 34"),
])
def test_mismatch_is_explained(tmp_path, change, message):
    path = released(tmp_path, build_supernet(**CONFIG))
    with pytest.raises(CheckpointError, match=message) as err:
        load_model_state(build_supernet(**{**CONFIG, **change}), path)
    assert str(path) in str(err.value)


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_file(text)
    other = tmp_path / "other.pth"
    torch.save({"weights": [1, 2, 3]}, other)
    with pytest.raises(CheckpointError, match="not a model checkpoint"):
        load_model_state(build_supernet(**CONFIG), other)
    with pytest.raises(CheckpointError, match="no such file"):
        load_file(tmp_path / "missing.pth")


def test_crafted_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"not a plain checkpoint \(it contains Python objects"):
        load_file(path)
    assert not marker.exists()


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    save_file({"a": torch.ones(2)}, path)

    def broken_save(obj, f):
        with open(f, "wb") as out:
            out.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError):
        save_file({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(load_file(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # the partial file is removed
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]
