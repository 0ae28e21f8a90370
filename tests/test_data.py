"""delt.data: the dataset registry, IDX reading, missing-data errors, ImageFolder class order."""

import gzip
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from delt.data import (
    DATASETS,
    FASHION_MNIST_ROOT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataMismatchError,
    DatasetInfo,
    DatasetNotFoundError,
    TensorImageDataset,
    load_dataset,
    load_like,
)
from delt.models import check_compatible

HAS_FASHION_MNIST = Path(FASHION_MNIST_ROOT, "train-images-idx3-ubyte.gz").is_file()


def test_registry_names():
    assert set(DATASETS) == {
        "fashion-mnist", "cifar10", "cifar100", "imagefolder", "tiny-imagenet", "synthetic",
    }  # fmt: skip


def test_synthetic_shapes_options_and_determinism():
    train = load_dataset("synthetic:classes=3,channels=1,size=6,train=5,test=2")
    test = load_dataset("synthetic:classes=3,channels=1,size=6,train=5,test=2", "test")
    assert len(train) == 15 and len(test) == 6
    image, label = train[7]
    assert image.shape == (1, 6, 6) and image.dtype == torch.float32 and label == 1
    assert train.info.class_names == ("class0", "class1", "class2")
    again = load_dataset("synthetic:classes=3,channels=1,size=6,train=5,test=2")
    assert torch.equal(train.images(range(15)), again.images(range(15)))
    assert not torch.equal(train.images(range(6)), test.images(range(6)))
    assert load_dataset("synthetic", resolution=12).info.resolution == 12


@pytest.mark.parametrize(
    "name, message",
    [
        ("nope", "unknown dataset"),
        ("synthetic:colour=3", "unknown option"),
        ("synthetic:classes=x", "must be an integer"),
        ("synthetic:classes", "key=value"),
        ("synthetic:classes=0", ">= 1"),
    ],
)
def test_bad_dataset_names(name, message):
    with pytest.raises(ValueError, match=message):
        load_dataset(name)


def test_info_normalization_round_trip_and_bounds():
    info = DatasetInfo("x", 2, 3, 4, (0.5, 0.4, 0.3), (0.2, 0.25, 0.5), ("a", "b"))
    images = torch.rand(2, 3, 4, 4)
    assert torch.allclose(info.denormalize(info.normalize(images)), images, atol=1e-6)
    low, high = info.pixel_bounds()
    assert low.shape == (3, 1, 1)
    assert low.view(-1).tolist() == pytest.approx([-2.5, -1.6, -0.6])
    assert high.view(-1).tolist() == pytest.approx([2.5, 2.4, 1.4])
    assert DatasetInfo.from_dict(info.to_dict()) == info


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reads_idx_files(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 28, 28))
    labels = np.array([0, 1, 2, 9, 9, 3])
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", images, compress)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", labels, compress)
    data = load_dataset("fashion-mnist", "test", root=str(tmp_path))
    assert isinstance(data, TensorImageDataset)
    assert data.pixels.shape == (6, 1, 28, 28)
    assert torch.equal(data.pixels[:, 0], torch.from_numpy(images.astype(np.uint8)))
    assert data.targets.tolist() == labels.tolist()
    assert data.info.class_names[9] == "Ankle boot"


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", root=str(tmp_path))


def test_fixed_datasets_refuse_resolution_and_class_order(tmp_path):
    with pytest.raises(ValueError, match="fixed resolution of 28"):
        load_dataset("fashion-mnist", root=str(tmp_path), resolution=32)
    with pytest.raises(ValueError, match="--class-order applies to imagefolder"):
        load_dataset("fashion-mnist", root=str(tmp_path), class_order="order.txt")


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing_says_how_to_get_it(tmp_path, name):
    with pytest.raises(DatasetNotFoundError, match="--data-root"):
        load_dataset(name)
    with pytest.raises(DatasetNotFoundError, match="cs.toronto.edu"):
        load_dataset(name, root=str(tmp_path))


def _image_tree(root: Path, classes: list[str], per_class: int = 2) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(per_class):
                Image.new("RGB", (10, 12), (index * 40, k * 50, 0)).save(folder / f"{k}.png")


def test_imagefolder_with_explicit_class_order(tmp_path):
    _image_tree(tmp_path, ["cat", "ant", "bee"])
    sorted_order = load_dataset("imagefolder", root=str(tmp_path), resolution=8)
    assert sorted_order.info.class_names == ("ant", "bee", "cat")
    order = tmp_path / "order.txt"
    order.write_text("cat\nbee\nant\n")
    data = load_dataset("imagefolder", root=str(tmp_path), resolution=8, class_order=str(order))
    assert data.info.class_names == ("cat", "bee", "ant")
    image, label = data[0]  # files are listed by folder name: "ant" first, label 2
    assert image.shape == (3, 8, 8) and label == 2
    assert data.targets.tolist() == [2, 2, 1, 1, 0, 0]
    assert data.images([0, 5]).shape == (2, 3, 8, 8)
    # load_like reuses a recorded order without any file.
    again = load_like(data.info, "test", str(tmp_path))
    assert again.info == data.info


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="--data-root"):
        load_dataset("imagefolder")
    with pytest.raises(DatasetNotFoundError, match="train"):
        load_dataset("imagefolder", root=str(tmp_path))
    _image_tree(tmp_path, ["a", "b"])
    order = tmp_path / "order.txt"
    order.write_text("a\nzebra\n")
    with pytest.raises(DatasetNotFoundError, match="zebra"):
        load_dataset("imagefolder", root=str(tmp_path), class_order=str(order))
    with pytest.raises(DatasetNotFoundError, match="no such file"):
        load_dataset("imagefolder", root=str(tmp_path), class_order=str(tmp_path / "missing.txt"))


def _folder_info(classes: tuple[str, ...], class_subset: bool = False) -> DatasetInfo:
    """What a teacher trained on an imagefolder tree with these classes records."""
    return DatasetInfo(
        "imagefolder", len(classes), 3, 8, IMAGENET_MEAN, IMAGENET_STD, tuple(classes), class_subset
    )


def test_load_like_refuses_a_folder_with_a_class_the_teacher_does_not_know(tmp_path):
    _image_tree(tmp_path, ["a", "b", "c"])
    with pytest.raises(DataMismatchError) as caught:
        load_like(_folder_info(("a", "b")), "train", str(tmp_path))
    message = str(caught.value)
    assert str(tmp_path / "train") in message and "--data-root" in message
    assert "not known to the teacher: ['c']" in message and "missing: none" in message
    with pytest.raises(DataMismatchError, match=re.escape("teacher: ['c']; missing: none")):
        load_like(_folder_info(("a", "b")), "test", str(tmp_path))  # val/ is checked too


def test_load_like_refuses_a_folder_without_a_class_of_the_teacher(tmp_path):
    _image_tree(tmp_path, ["a", "b"])
    with pytest.raises(DataMismatchError, match=re.escape("teacher: none; missing: ['z']")):
        load_like(_folder_info(("a", "b", "z")), "train", str(tmp_path))
    # Same count, other classes: both sides are named.
    with pytest.raises(DataMismatchError, match=re.escape("teacher: ['b']; missing: ['z']")):
        load_like(_folder_info(("a", "z")), "train", str(tmp_path))


def test_load_like_uses_the_teachers_order_for_the_same_classes(tmp_path):
    _image_tree(tmp_path, ["a", "b"])
    info = _folder_info(("b", "a"))  # e.g. trained with --class-order b,a
    data = load_like(info, "train", str(tmp_path))
    assert data.info == info
    assert data.targets.tolist() == [1, 1, 0, 0]  # files are listed by folder name: "a" first
    check_compatible({"dataset": info.to_dict()}, data.info)


def test_class_order_subset_is_recorded_and_reloads_beside_other_folders(tmp_path):
    _image_tree(tmp_path, ["a", "b", "c"])
    order = tmp_path / "order.txt"
    order.write_text("c\na\n")  # ImageNet-100 out of an ImageNet-1K tree, in miniature
    data = load_dataset("imagefolder", root=str(tmp_path), resolution=8, class_order=str(order))
    assert data.info.class_names == ("c", "a") and data.info.class_subset
    assert len(data) == 4 and sorted(data.targets.tolist()) == [0, 0, 1, 1]
    assert not load_dataset("imagefolder", root=str(tmp_path), resolution=8).info.class_subset
    # A teacher of the subset ignores the folder it was not trained on; it still needs its own.
    assert load_like(data.info, "train", str(tmp_path)).info == data.info
    assert DatasetInfo.from_dict(data.info.to_dict()) == data.info
    with pytest.raises(DataMismatchError, match=re.escape("missing: ['z']")):
        load_like(_folder_info(("a", "z"), class_subset=True), "train", str(tmp_path))


@pytest.mark.skipif(not HAS_FASHION_MNIST, reason="needs `apt-get install dataset-fashion-mnist`")
def test_real_fashion_mnist():
    train = load_dataset("fashion-mnist")
    assert len(train) == 60_000 and train.info.resolution == 28
    assert torch.bincount(train.targets).tolist() == [6000] * 10
    # The recorded normalization is the training set's.
    pixels = train.pixels.float() / 255
    assert pixels.mean().item() == pytest.approx(train.info.mean[0], abs=1e-3)
    assert pixels.std().item() == pytest.approx(train.info.std[0], abs=1e-3)


def test_tiny_imagenet_in_its_released_layout(tmp_path):
    from delt.data import IMAGENET_MEAN
    from imagefolders import write_tiny_imagenet

    root = write_tiny_imagenet(tmp_path / "tiny-imagenet-200", ["n03", "n01", "n02"], 2, 3)
    train = load_dataset("tiny-imagenet", "train", str(root))
    test = load_dataset("tiny-imagenet", "test", str(root))
    assert train.info.class_names == ("n01", "n02", "n03")  # sorted WNIDs, not wnids.txt's order
    assert train.info.resolution == 64 and train.info.mean == IMAGENET_MEAN
    assert train.targets.tolist() == [0, 0, 1, 1, 2, 2]
    # val/images is one folder: the labels come from val_annotations.txt (n03 wrote val_0_*).
    assert test.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert test.samples[0][0].name.startswith("val_1_")
    image, label = test[0]
    assert image.shape == (3, 64, 64) and label == 0
    small = load_dataset("tiny-imagenet", "train", str(root), resolution=16)
    assert small[0][0].shape == (3, 16, 16)
    (root / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="val_annotations.txt not found"):
        load_dataset("tiny-imagenet", "test", str(root))
    with pytest.raises(DatasetNotFoundError, match="needs --data-root"):
        load_dataset("tiny-imagenet", "train")
