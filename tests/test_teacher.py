"""delt.teacher: training, caching, augmentation, config errors."""

import json

import pytest
import torch
from delt.config import ConfigError
from delt.teacher import TeacherConfig, _augment, train_teacher


def test_teacher_checkpoint_and_metadata(tiny_teacher):
    meta = json.loads(tiny_teacher.path.with_suffix(".json").read_text())
    assert meta["arch"] == "convnet2" and meta["arch_kwargs"] == {"width": 8}
    assert meta["dataset"]["class_names"] == ["class0", "class1", "class2", "class3"]
    assert meta["epochs"] == 1 and meta["test_accuracy"] == tiny_teacher.test_accuracy
    assert set(meta["versions"]) >= {"torch", "delt_ext", "python"}


def test_teacher_is_cached_and_a_different_config_refused(tiny_teacher):
    config = json.loads(tiny_teacher.path.with_suffix(".json").read_text())["config"]
    same = TeacherConfig(out=str(tiny_teacher.path.parent), progress=False, **config)
    assert train_teacher(same).reused
    config["epochs"] = 2
    with pytest.raises(ConfigError, match="--epochs: 1 -> 2"):
        train_teacher(TeacherConfig(out=str(tiny_teacher.path.parent), **config))


def test_augment_keeps_shape_and_content():
    images = torch.randn(6, 3, 8, 8)
    generator = torch.Generator().manual_seed(0)
    assert _augment(images, "none", generator) is images
    flipped = _augment(images, "flip", generator)
    for original, out in zip(images, flipped, strict=True):
        assert torch.equal(out, original) or torch.equal(out, original.flip(2))
    shifted = _augment(images, "crop-flip", generator)
    assert shifted.shape == images.shape


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"epochs": 0}, "--epochs must be >= 1"),
        ({"lr": 0.0}, "--lr must be > 0"),
        ({"label_smoothing": 1.0}, "--label-smoothing"),
        ({"arch": "resnet18_small", "width": 8}, "--width applies to convnetD"),
        ({"arch": "nope"}, "unknown architecture"),
    ],
)
def test_bad_teacher_configs(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        TeacherConfig(out=str(tmp_path), **overrides)
