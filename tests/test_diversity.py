"""delt.diversity: DELT's centroid-cosine metric on features with known answers."""

import json
import math
import shutil

import pytest
import torch
from delt.data import DataMismatchError, DatasetInfo
from delt.diversity import (
    DiversityConfig,
    centroid_cosine,
    final_linear,
    measure_diversity,
    penultimate_features,
)
from delt.io import sha256_file, torch_save
from delt.models import ConvNet, TeacherMismatchError, build_model, load_checkpoint
from delt.recover import RecoverConfig, recover
from torch import nn


def test_identical_features_score_one():
    features = torch.tensor([[1.0, 2.0, 3.0]] * 4)
    values = centroid_cosine(features, torch.tensor([0, 0, 1, 1]), 2)
    assert values.tolist() == pytest.approx([1.0, 1.0])


def test_two_orthogonal_images_and_scaled_copies():
    # Class 0: e1 and e2; the centroid (1/2, 1/2) is at 45 degrees from both: cos = 1/sqrt(2).
    # Class 1: 3 * e1 and e1: same direction, any lengths: cos = 1.
    # Class 2: a single image: 1.0. Class 3: no images: NaN.
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    values = centroid_cosine(features, labels, 4)
    assert values[:3].tolist() == pytest.approx([1 / math.sqrt(2), 1.0, 1.0])
    assert math.isnan(values[3])


def test_two_orthogonal_clusters_in_one_class():
    # 3 images near e1 and 1 near e2: centroid (3/4, 1/4); cosines 3/sqrt(10) and 1/sqrt(10).
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    values = centroid_cosine(features, torch.zeros(4, dtype=torch.int64), 1)
    expected = (3 * (3 / math.sqrt(10)) + 1 / math.sqrt(10)) / 4
    assert values.item() == pytest.approx(expected)


def test_more_spread_scores_lower():
    generator = torch.Generator().manual_seed(0)
    center = torch.randn(1, 16, generator=generator)
    tight = center + 0.1 * torch.randn(20, 16, generator=generator)
    loose = center + 2.0 * torch.randn(20, 16, generator=generator)
    labels = torch.zeros(20, dtype=torch.int64)
    assert centroid_cosine(loose, labels, 1).item() < centroid_cosine(tight, labels, 1).item()


def _info(channels=3, resolution=16, classes=5):
    return DatasetInfo(
        "x", classes, channels, resolution, (0.5,) * channels, (0.25,) * channels,
        tuple(map(str, range(classes))),
    )  # fmt: skip


def test_penultimate_features_are_the_classifier_input():
    model = ConvNet(5, 3, 16, depth=2, width=4).eval()
    images = torch.randn(7, 3, 16, 16)
    features = penultimate_features(model, images, batch_size=3)
    assert features.shape == (7, 4 * 4 * 4)
    # Batches of 3 vs 7 may round differently in the convolution (1 seed in 200 differed by
    # more than allclose's default atol of 1e-8 near zero).
    assert torch.allclose(features, torch.flatten(model.features(images), 1), atol=1e-6)
    assert final_linear(model) is model.classifier


@pytest.mark.parametrize("arch, attribute", [("resnet18_small", "fc"), ("mobilenet_v2", None)])
def test_final_linear_of_resnet_and_torchvision(arch, attribute):
    model = build_model(arch, _info())
    layer = final_linear(model)
    assert layer.out_features == 5
    if attribute:
        assert layer is getattr(model, attribute)
    else:
        assert layer is model.classifier[-1]
    features = penultimate_features(model, torch.randn(2, 3, 16, 16))
    assert features.shape == (2, layer.in_features)


def test_a_model_without_a_linear_classifier_is_refused():
    with pytest.raises(ValueError, match="no nn.Linear classifier"):
        final_linear(nn.Sequential(nn.Conv2d(3, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()))


def test_delt_diversity_writes_and_reuses(tiny_teacher, tmp_path, monkeypatch):
    out = tmp_path / "sre2l"
    recover(
        RecoverConfig(
            teacher=str(tiny_teacher.path), ipc=3, out=str(out), method="sre2l", iterations=2,
            progress=False,
        )
    )  # fmt: skip
    result = measure_diversity(DiversityConfig(distilled=str(out)))
    document = json.loads((out / "diversity.json").read_text())
    assert document["mean"] == pytest.approx(result.mean) and len(document["per_class"]) == 4
    assert document["model"]["arch"] == "convnet2" and document["feature_dim"] == 8 * 2 * 2
    assert all(-1.0 <= v <= 1.0 for v in document["per_class"])
    model = load_checkpoint(tiny_teacher.path).model
    payload = torch.load(out / "distilled.pt", weights_only=True)
    expected = centroid_cosine(penultimate_features(model, payload["images"]), payload["labels"], 4)
    assert document["per_class"] == pytest.approx(expected.tolist())

    def no_features(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr("delt.diversity.penultimate_features", no_features)
    assert measure_diversity(
        DiversityConfig(distilled=str(out), model=str(tiny_teacher.path))
    ).reused


def test_diversity_bad_model_path(tiny_teacher, tmp_path):
    out = tmp_path / "cda"
    recover(
        RecoverConfig(
            teacher=str(tiny_teacher.path), ipc=1, out=str(out), method="cda", iterations=1,
            progress=False,
        )
    )  # fmt: skip
    with pytest.raises(FileNotFoundError, match="--model missing.pt: no such checkpoint"):
        measure_diversity(DiversityConfig(distilled=str(out), model="missing.pt"))


def _altered_set(tiny_set, folder, images=None, labels=None):
    """A copy of the tiny CDA set in ``folder`` with its images and/or labels replaced."""
    skip = shutil.ignore_patterns("*eval*.json", "diversity.json")
    shutil.copytree(tiny_set, folder, ignore=skip)
    payload = torch.load(folder / "distilled.pt", weights_only=True)
    images = payload["images"] if images is None else images
    labels = payload["labels"] if labels is None else labels
    torch_save({"images": images, "labels": labels}, folder / "distilled.pt")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["distilled_sha256"] = sha256_file(folder / "distilled.pt")  # a consistent set
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_diversity_refuses_an_empty_set(tiny_set, tmp_path):
    empty = (torch.empty(0, 3, 8, 8), torch.empty(0, dtype=torch.int64))
    out = _altered_set(tiny_set, tmp_path / "empty", *empty)
    with pytest.raises(ValueError, match=r"--distilled .*: the distilled set is empty"):
        measure_diversity(DiversityConfig(distilled=str(out)))
    assert not (out / "diversity.json").exists()


def test_diversity_refuses_labels_outside_the_classes(tiny_set, tmp_path):
    # As delt eval: label 9 in a 4-class set is an error, not a silently dropped image.
    labels = torch.load(tiny_set / "distilled.pt", weights_only=True)["labels"].clone()
    labels[-1] = 9
    out = _altered_set(tiny_set, tmp_path / "labels", labels=labels)
    with pytest.raises(ValueError, match=r"--distilled .*: labels must be in 0\.\.3, got 0\.\.9"):
        measure_diversity(DiversityConfig(distilled=str(out)))
    assert not (out / "diversity.json").exists()


def test_diversity_refuses_images_of_another_shape(tiny_set, tmp_path):
    out = _altered_set(tiny_set, tmp_path / "shape", images=torch.zeros(4, 3, 16, 16))
    with pytest.raises(DataMismatchError, match=r"--distilled .*: images are \(3, 16, 16\)"):
        measure_diversity(DiversityConfig(distilled=str(out)))


def test_diversity_refuses_a_model_of_another_dataset(tiny_set, three_class_teacher, tmp_path):
    out = _altered_set(tiny_set, tmp_path / "model")
    other = three_class_teacher
    with pytest.raises(TeacherMismatchError, match=r"^--model .*: .*trained on 3 classes"):
        measure_diversity(DiversityConfig(distilled=str(out), model=str(other.path)))
    assert not (out / "diversity.json").exists()
