"""The teacher: a torchvision model with ImageNet weights, a trained checkpoint, or none."""
import pytest
import torch
import torchvision

from training.teacher import load_teacher
from utils.checkpoint import save_file
from utils.errors import UsageError

from .conftest import load_script

CPU = torch.device("cpu")


@pytest.fixture
def no_download(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("no network here")

    # Where torchvision's weights API looks the function up, so no machine downloads here.
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse)


def test_none_means_cross_entropy():
    assert load_teacher("none", 10, CPU)[0] is None


def test_class_count_is_checked_before_any_download(no_download):
    with pytest.raises(UsageError, match="predicts 1000 classes, the data has 10"):
        load_teacher("resnet50", 10, CPU)


def test_unavailable_weights_suggest_a_path_or_none(no_download):
    with pytest.raises(UsageError, match="weights cannot be had.*--teacher none"):
        load_teacher("resnet18", 1000, CPU)


def test_unknown_name():
    with pytest.raises(UsageError, match="neither a file nor a torchvision"):
        load_teacher("no_such_net", 10, CPU)


def test_trained_checkpoint_loads_frozen_in_eval_mode(tmp_path):
    model = torchvision.models.get_model("resnet18", weights=None, num_classes=3)
    path = tmp_path / "teacher.pth"
    save_file({"arch": "resnet18", "num_classes": 3, "top1": 0.0,
               "model_state_dict": model.state_dict()}, path)
    teacher, description = load_teacher(str(path), 3, CPU)
    assert description == f"resnet18 from {path}"
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(teacher(x), model.eval()(x))
    with pytest.raises(UsageError, match="predicts 3 classes, the data has 10"):
        load_teacher(str(path), 10, CPU)


@pytest.mark.parametrize("weights, url, named", [
    ("IMAGENET1K_V1", "resnet50-0676ba61.pth", "resnet50 (IMAGENET1K_V1, 76.13 % ImageNet top-1)"),
    ("DEFAULT", "resnet50-11ad3fa6.pth", "resnet50 (IMAGENET1K_V2, 80.858 % ImageNet top-1)"),
])
def test_named_teacher_takes_the_weights_pretrained_true_gave(monkeypatch, weights, url, named):
    """The reference's ``resnet50(pretrained=True)`` is IMAGENET1K_V1, not today's DEFAULT (V2)."""
    asked = []

    def fetch(address, *args, **kwargs):
        asked.append(address)
        return torchvision.models.get_model("resnet50", weights=None).state_dict()

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", fetch)
    teacher, description = load_teacher("resnet50", 1000, CPU, weights=weights)
    assert len(asked) == 1 and asked[0].endswith(url)
    assert description == named and not teacher.training
    if weights == "IMAGENET1K_V1":  # the stage's default
        assert load_script("01train_supernet.py").parse_args([]).teacher_weights == weights


def test_unknown_weights_name_lists_the_choices(no_download):
    with pytest.raises(UsageError, match="--teacher_weights V9: resnet50 has DEFAULT, IMAGENET1K_V1"):
        load_teacher("resnet50", 1000, CPU, weights="V9")
