"""delt.models: the architecture registry and checkpoints with metadata."""

import json

import pytest
import torch
from delt.data import DatasetInfo
from delt.models import (
    MODELS,
    TeacherMismatchError,
    build_model,
    check_compatible,
    load_checkpoint,
    save_checkpoint,
)
from torch import nn

INFO = DatasetInfo("synthetic", 5, 3, 16, (0.5,) * 3, (0.25,) * 3, tuple("abcde"))


def _meta(info=INFO, arch="convnet3", **kwargs):
    return {"arch": arch, "arch_kwargs": kwargs, "dataset": info.to_dict(), "test_accuracy": 50.0}


@pytest.mark.parametrize("depth", [1, 3, 4])
def test_convnet_blocks_and_shapes(depth):
    model = build_model(f"convnet{depth}", INFO, {"width": 16})
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == depth
    assert sum(isinstance(m, nn.AvgPool2d) for m in model.modules()) == depth
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv.kernel_size == (3, 3) and conv.padding == (1, 1)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)


def test_convnet_too_deep_for_the_resolution():
    with pytest.raises(ValueError, match="at least 32 pixels"):
        build_model("convnet5", INFO)


def test_resnet18_small_stem():
    model = build_model("resnet18_small", INFO)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)


def test_torchvision_model_by_name():
    model = build_model("mobilenet_v3_small", INFO)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    gray = DatasetInfo("g", 5, 1, 16, (0.5,), (0.25,), tuple("abcde"))
    with pytest.raises(ValueError, match="3-channel"):
        build_model("resnet18", gray)


def test_unknown_arch_and_kwargs():
    assert "convnet3" in MODELS and "resnet18_small" in MODELS
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("convnet99", INFO)
    with pytest.raises(ValueError, match="does not take --width"):
        build_model("resnet18_small", INFO, {"width": 4})


def test_checkpoint_round_trip(tmp_path):
    model = build_model("convnet2", INFO, {"width": 8})
    model(torch.randn(4, 3, 16, 16))  # move the BN running statistics off their defaults
    path = tmp_path / "teacher.pt"
    save_checkpoint(path, model, _meta(arch="convnet2", width=8))
    assert json.loads(path.with_suffix(".json").read_text())["arch"] == "convnet2"
    loaded = load_checkpoint(path, INFO)
    assert loaded.info == INFO and not loaded.model.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)
    assert not list(tmp_path.glob("*.tmp"))


def test_mismatched_teacher_is_refused(tmp_path):
    path = tmp_path / "teacher.pt"
    save_checkpoint(
        path, build_model("convnet2", INFO, {"width": 8}), _meta(arch="convnet2", width=8)
    )
    fewer = DatasetInfo("synthetic", 4, 3, 16, (0.5,) * 3, (0.25,) * 3, tuple("abcd"))
    with pytest.raises(TeacherMismatchError, match="5 classes"):
        load_checkpoint(path, fewer)
    reordered = DatasetInfo("synthetic", 5, 3, 16, (0.5,) * 3, (0.25,) * 3, tuple("bacde"))
    with pytest.raises(TeacherMismatchError, match="class order.*class 0"):
        load_checkpoint(path, reordered)
    bigger = DatasetInfo("synthetic", 5, 3, 32, (0.5,) * 3, (0.25,) * 3, tuple("abcde"))
    with pytest.raises(TeacherMismatchError, match="3x16x16"):
        check_compatible(_meta(), bigger)
    renormalized = DatasetInfo("synthetic", 5, 3, 16, (0.4,) * 3, (0.25,) * 3, tuple("abcde"))
    with pytest.raises(TeacherMismatchError, match="normalization"):
        check_compatible(_meta(), renormalized)


def test_only_local_delt_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="delt teacher"):
        load_checkpoint(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"model": {}}, other)
    with pytest.raises(ValueError, match="not a delt checkpoint"):
        load_checkpoint(other)
