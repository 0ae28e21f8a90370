"""delt.distilled_set: the Manifest (typed fields, format versions, checks), save/load of a set."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from delt.data import DataMismatchError, DatasetInfo
from delt.distilled_set import (
    MANIFEST_FORMAT_VERSION,
    READ_FORMAT_VERSION,
    Manifest,
    check_distilled_set,
    load_distilled,
    save_distilled,
    union_prefix,
)

# A manifest as `delt recover --method cda` of main e216f25 wrote it: no format_version, the
# synthesis time under "wall_seconds".
OLD = Path(__file__).parent / "data" / "manifest-e216f25"


def test_a_manifest_of_e216f25_loads(tmp_path):
    document = json.loads((OLD / "manifest.json").read_text())
    assert "format_version" not in document and "synthesis_seconds" not in document
    manifest = Manifest.load(OLD)
    assert manifest.synthesis_seconds == document["wall_seconds"]
    assert manifest.method == "cda" and manifest.ipc == 2 and manifest.num_images == 4
    assert manifest.image_iterations == document["image_iterations"] == 8
    assert manifest.dataset == DatasetInfo.from_dict(document["dataset"])
    assert manifest.teacher["sha256"] == document["teacher"]["sha256"]
    assert manifest.config["iterations"] == 2 and manifest.files == document["files"]
    # Saved again, it is a current manifest that says synthesis_seconds, and reads back equal.
    manifest.save(tmp_path)
    saved = json.loads((tmp_path / "manifest.json").read_text())
    assert saved["format_version"] == MANIFEST_FORMAT_VERSION
    assert saved["synthesis_seconds"] == document["wall_seconds"] and "wall_seconds" not in saved
    assert Manifest.load(tmp_path) == manifest


def _write(folder, document):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(document))
    return folder


@pytest.mark.parametrize(
    "change, message",
    [(lambda d: d.update(kind="something-else"), "not a delt distilled-set manifest"),
     (lambda d: d.update(format_version=READ_FORMAT_VERSION + 1), "upgrade delt"),
     (lambda d: d.pop("wall_seconds"), "missing synthesis_seconds"),
     (lambda d: d.update(num_images=5), "4 iterations_per_image entries for 5 images"),
     (lambda d: d.update(ipc=0), "ipc must be an integer >= 1")],
)  # fmt: skip
def test_bad_manifests_are_refused_naming_the_file(tmp_path, change, message):
    document = json.loads((OLD / "manifest.json").read_text())
    change(document)
    folder = _write(tmp_path / "set", document)
    with pytest.raises(ValueError, match=message) as caught:
        Manifest.load(folder)
    assert str(folder / "manifest.json") in str(caught.value)


def test_unknown_keys_survive_a_round_trip(tmp_path):
    document = {**json.loads((OLD / "manifest.json").read_text()), "note": {"by": "a later tool"}}
    manifest = Manifest.load(_write(tmp_path / "a", document))
    assert manifest.extra == {"note": {"by": "a later tool"}}
    manifest.save(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["note"] == document["note"]


def test_missing_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        Manifest.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no distilled.pt"):
        load_distilled(tmp_path)


def test_save_and_load_a_set(tmp_path, tiny_set):
    images, labels, manifest = load_distilled(tiny_set)
    assert images.shape == (8, 3, 8, 8) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert manifest.method == "cda" and manifest.format_version == MANIFEST_FORMAT_VERSION
    written = json.loads((tiny_set / "manifest.json").read_text())
    assert written["synthesis_seconds"] > 0 and "wall_seconds" not in written
    copy = dataclasses.replace(manifest, method="copy")
    save_distilled(tmp_path, images, labels, copy)
    again_images, again_labels, again = load_distilled(tmp_path)
    assert torch.equal(again_images, images) and torch.equal(again_labels, labels)
    assert again == copy


def test_a_set_of_another_shape_is_refused(tiny_set):
    images, labels, manifest = load_distilled(tiny_set)
    with pytest.raises(DataMismatchError, match=r"images are \(3, 4, 4\)"):
        check_distilled_set(images[:, :, :4, :4], labels, manifest.dataset, tiny_set)
    with pytest.raises(ValueError, match="labels must be in 0..3"):
        check_distilled_set(images, labels + 1, manifest.dataset, tiny_set)


def test_an_old_set_loads_with_its_tensors(tmp_path, tiny_set):
    # distilled.pt did not change: an e216f25 manifest beside a set's tensors loads as a set.
    folder = tmp_path / "old"
    shutil.copytree(OLD, folder)
    images = torch.zeros(4, 1, 8, 8)
    torch.save({"images": images, "labels": torch.tensor([0, 0, 1, 1])}, folder / "distilled.pt")
    loaded, labels, manifest = load_distilled(folder)
    assert torch.equal(loaded, images) and manifest.synthesis_seconds > 0
    check_distilled_set(loaded, labels, manifest.dataset, folder)


def test_union_prefix():
    images = torch.arange(12).view(12, 1)  # 3 classes x 4
    assert union_prefix(images, 4, 2).view(-1).tolist() == [0, 1, 4, 5, 8, 9]
    assert union_prefix(images, 4, 4).view(-1).tolist() == list(range(12))
    with pytest.raises(ValueError, match="length"):
        union_prefix(images, 4, 5)
