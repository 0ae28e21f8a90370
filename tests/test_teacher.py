"""delt.teacher: training, caching, augmentation, --save-epochs checkpoints, config errors."""

import json

import pytest
import torch
from conftest import SYNTHETIC
from delt.config import ConfigError
from delt.models import load_checkpoint
from delt.teacher import TeacherConfig, _augment, saved_checkpoints, train_teacher


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


def _tiny_config(out, **overrides):
    values = dict(
        out=str(out), dataset=SYNTHETIC, arch="convnet2", width=8, epochs=3, batch_size=16,
        amp="none", channels_last=False, progress=False,
    )  # fmt: skip
    values.update(overrides)
    return TeacherConfig(**values)


def test_save_epochs_writes_checkpoints_early_phase_first(tmp_path):
    result = train_teacher(_tiny_config(tmp_path / "with", save_epochs=(1, 3)))
    entries = saved_checkpoints(result.path)
    assert [entry["epoch"] for entry in entries] == [1, 3]
    assert [entry["path"].name for entry in entries] == ["epoch-001.pt", "epoch-003.pt"]
    for entry in entries:
        checkpoint = load_checkpoint(entry["path"])
        assert checkpoint.meta["epoch"] == entry["epoch"]
        assert checkpoint.meta["arch"] == "convnet2" and checkpoint.meta["arch_kwargs"] == {
            "width": 8
        }
        assert checkpoint.meta["test_accuracy"] == entry["test_accuracy"]
    final = load_checkpoint(result.path).model.state_dict()
    last = load_checkpoint(entries[-1]["path"]).model.state_dict()
    first = load_checkpoint(entries[0]["path"]).model.state_dict()
    assert all(torch.equal(final[k], last[k]) for k in final)  # epoch 3 is the end of training
    assert not torch.equal(final["features.1.running_mean"], first["features.1.running_mean"])
    # Saving does not disturb training: the final teacher is the one trained without checkpoints.
    plain = train_teacher(_tiny_config(tmp_path / "without"))
    assert saved_checkpoints(plain.path) == []
    plain_state = load_checkpoint(plain.path).model.state_dict()
    assert all(torch.equal(final[k], plain_state[k]) for k in final)
    # A cached teacher is reused with its checkpoints, refused when one is missing.
    assert train_teacher(_tiny_config(tmp_path / "with", save_epochs=(1, 3))).reused
    assert train_teacher(_tiny_config(tmp_path / "with")).reused
    with pytest.raises(ConfigError, match=r"without checkpoints at epochs \[2\]"):
        train_teacher(_tiny_config(tmp_path / "with", save_epochs=(1, 2)))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"epochs": 0}, "--epochs must be an integer >= 1"),
        ({"save_epochs": (2, 1)}, "--save-epochs must be strictly increasing"),
        ({"save_epochs": (1, 1)}, "--save-epochs must be strictly increasing"),
        ({"save_epochs": (0, 1)}, r"--save-epochs must lie in \[1, --epochs 3\]"),
        ({"save_epochs": (1, 4)}, r"--save-epochs must lie in \[1, --epochs 3\]"),
        ({"lr": 0.0}, "--lr must be > 0"),
        ({"label_smoothing": 1.0}, "--label-smoothing"),
        ({"arch": "resnet18_small", "width": 8}, "--width applies to convnetD"),
        ({"arch": "nope"}, "unknown architecture"),
    ],
)
def test_bad_teacher_configs(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        TeacherConfig(out=str(tmp_path), **overrides)


def test_imagefolder_teacher_refuses_a_folder_with_other_classes(tmp_path):
    from delt.data import DataMismatchError, load_like
    from PIL import Image

    root = tmp_path / "data"
    for split in ("train", "val"):
        for index, name in enumerate(("a", "b")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(2):
                Image.new("RGB", (8, 8), (index * 200, k * 50, 0)).save(folder / f"{k}.png")
    order = tmp_path / "order.txt"
    order.write_text("b\na\n")
    result = train_teacher(
        TeacherConfig(
            out=str(tmp_path / "t"), dataset="imagefolder", data_root=str(root), resolution=8,
            class_order=str(order), arch="convnet1", width=4, epochs=1, batch_size=4, amp="none",
            channels_last=False, progress=False,
        )
    )  # fmt: skip
    info = load_checkpoint(result.path).info
    assert info.class_names == ("b", "a")
    assert load_like(info, "train", str(root)).info == info  # the recorded order, no file
    (root / "train" / "c").mkdir()
    Image.new("RGB", (8, 8)).save(root / "train" / "c" / "0.png")
    with pytest.raises(DataMismatchError, match=r"not known to the teacher: \['c'\]"):
        load_like(info, "train", str(root))


def test_a_run_of_exactly_four_steps_trains(tmp_path):
    # torch's OneCycleLR divides by pct_start * total_steps - 1, zero at 0.25 x 4 steps.
    dataset = "synthetic:classes=4,channels=3,size=8,train=16,test=4"  # 64 images: 4 batches
    result = train_teacher(_tiny_config(tmp_path, dataset=dataset, epochs=1))
    assert load_checkpoint(result.path).meta["epochs"] == 1 and 0 <= result.test_accuracy <= 100


def test_a_teacher_of_other_training_data_is_not_reused(tmp_path):
    import shutil

    from imagefolders import write_image_folder, write_images

    root = write_image_folder(tmp_path / "data", ["a", "b"], 3, 2, 8)
    other = tmp_path / "other"  # the same class folders and file names, other train/ images
    shutil.copytree(root, other)
    shutil.rmtree(other / "train" / "a")
    write_images(other / "train" / "a", 3, 8, seed=99)
    values = dict(
        out=str(tmp_path / "t"), dataset="imagefolder", resolution=8, arch="convnet1", width=4,
        epochs=1, batch_size=4, amp="none", channels_last=False, progress=False,
    )  # fmt: skip
    first = train_teacher(TeacherConfig(data_root=str(root), **values))
    assert train_teacher(TeacherConfig(data_root=str(root), **values)).reused
    message = r"teacher\.pt holds a teacher trained on other imagefolder data than --data-root"
    with pytest.raises(ConfigError, match=message + ".*other"):
        train_teacher(TeacherConfig(data_root=str(other), **values))
    assert load_checkpoint(first.path).meta["dataset"]["fingerprint"].startswith("sha256:")
