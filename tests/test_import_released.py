"""delt import: released image folders (SRe2L/CDA/DELT, RDED, by class name) as distilled sets."""

import json

import numpy as np
import pytest
import torch
from delt.cli import main
from delt.distilled_set import Manifest, load_distilled, load_stored
from delt.diversity import DiversityConfig, measure_diversity
from delt.evaluate import EvalConfig, evaluate
from delt.import_released import ImportConfig, import_images
from delt.models import load_checkpoint
from delt.report import ReportConfig, compare_runs
from imagefolders import write_images
from PIL import Image


def _sre2l_folder(root, classes=4, per_class=2, size=8, suffix="png"):
    for c in range(classes):
        write_images(
            root / f"new{c:03d}", per_class, size, seed=c, suffix=suffix,
            name=f"class{c:03d}_id{{k:03d}}",
        )  # fmt: skip
    return root


def _import(tiny_teacher, images, out, **overrides):
    return import_images(
        ImportConfig(images=str(images), teacher=str(tiny_teacher.path), out=str(out), **overrides)
    )


def test_sre2l_layout_imports_as_uint8_and_is_scored(tmp_path, tiny_teacher):
    source = _sre2l_folder(tmp_path / "released")
    result = _import(tiny_teacher, source, tmp_path / "set")
    assert [(m["folder"], m["class"], m["by"]) for m in result.mapping] == [
        (f"new{c:03d}", c, "number") for c in range(4)
    ]
    stored, labels, manifest = load_stored(tmp_path / "set")
    assert stored.dtype == torch.uint8 and stored.shape == (8, 3, 8, 8)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert manifest.method == "imported" and manifest.images_dtype == "uint8" and manifest.ipc == 2
    saved = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert saved["format_version"] == 3 and saved["import"]["mapping"][1]["name"] == "class1"
    # PNG is lossless: the stored pixels are the files' (class 1, file id001).
    expected = np.array(Image.open(source / "new001" / "class001_id001.png"))
    assert torch.equal(stored[3], torch.from_numpy(expected).permute(2, 0, 1))
    images, _, _ = load_distilled(tmp_path / "set")
    info = load_checkpoint(tiny_teacher.path).info
    assert torch.allclose(images, info.normalize(stored.float() / 255))
    # eval, diversity and report accept it.
    evaluation = evaluate(
        EvalConfig(
            distilled=str(tmp_path / "set"), epochs=1, eval_every=1, progress=False, device="cpu"
        )
    )
    assert 0 <= evaluation.accuracy_mean <= 100
    measure_diversity(DiversityConfig(distilled=str(tmp_path / "set")))
    rows = compare_runs(ReportConfig(runs=(str(tmp_path / "set"),), out=str(tmp_path / "cmp.png")))
    assert rows[0]["method"] == "imported" and rows[0]["ipc"] == 2
    assert rows[0]["accuracy_mean"] == evaluation.accuracy_mean
    # The same import again is recognized; another one into the same --out is refused.
    assert _import(tiny_teacher, source, tmp_path / "set").reused


def test_class_names_and_rded_numbers(tmp_path, tiny_teacher):
    by_name = tmp_path / "names"
    for c in (3, 0, 2, 1):
        write_images(by_name / f"class{c}", 1, 8, seed=c)
    result = _import(tiny_teacher, by_name, tmp_path / "a")
    assert [(m["folder"], m["by"]) for m in result.mapping] == [
        (f"class{c}", "name") for c in range(4)
    ]
    rded = tmp_path / "rded"
    for c in range(4):
        write_images(rded / f"{c:05d}", 3 - c % 2, 8, seed=c, suffix="jpg")
    result = _import(tiny_teacher, rded, tmp_path / "b")
    assert [m["images"] for m in result.mapping] == [3, 2, 3, 2]
    _, labels, manifest = load_stored(tmp_path / "b")
    assert labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3] and manifest.num_images == 10


def test_resize(tmp_path, tiny_teacher):
    source = _sre2l_folder(tmp_path / "big", size=12)
    with pytest.raises(ValueError, match=r"is 12x12, the teacher takes 8x8; pass --resize"):
        _import(tiny_teacher, source, tmp_path / "set")
    assert not (tmp_path / "set").exists()
    _import(tiny_teacher, source, tmp_path / "set", resize=True)
    stored, _, manifest = load_stored(tmp_path / "set")
    assert stored.shape[2:] == (8, 8) and manifest.extra["import"]["resized"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda root: (root / "mystery").mkdir(), r"class folder\(s\) 'mystery' are neither"),
        (lambda root: (root / "new009").mkdir(), r"'new009' are neither"),
        (lambda root: write_images(root / "1", 1, 8, 0), "folders '1' and 'new001' are both"),
        (lambda root: [p.unlink() for p in (root / "new002").iterdir()], "'new002' holds no image"),
        (lambda root: [p.unlink() for p in (root / "new003").iterdir()]
         and (root / "new003").rmdir(), r"no folder for class\(es\) 3 \('class3'\)"),
    ],
)  # fmt: skip
def test_bad_folders_are_refused_before_writing(tmp_path, tiny_teacher, change, message):
    source = _sre2l_folder(tmp_path / "released")
    change(source)
    with pytest.raises(ValueError, match=message):
        _import(tiny_teacher, source, tmp_path / "set")
    assert not (tmp_path / "set").exists()


def test_cli_prints_mapping_and_refuses_bad_out(tmp_path, tiny_teacher, capsys):
    source = _sre2l_folder(tmp_path / "released")
    argv = ["import", "--images", str(source), "--teacher", str(tiny_teacher.path)]
    (tmp_path / "file").write_text("keep")
    assert main(argv + ["--out", str(tmp_path / "file")]) == 1  # an unwritable output: 1
    err = capsys.readouterr().err
    assert "--out" in err and err.count("\n") == 1
    assert (tmp_path / "file").read_text() == "keep"
    assert main(argv + ["--out", str(tmp_path / "set")]) == 0
    out = capsys.readouterr().out
    assert "new002 -> class 2 (class2, by number): 2 images" in out
    # Another set in --out is not overwritten.
    other = _sre2l_folder(tmp_path / "other", per_class=1)
    before = (tmp_path / "set" / "distilled.pt").read_bytes()
    argv[2] = str(other)
    assert main(argv + ["--out", str(tmp_path / "set")]) == 2
    assert "holds another distilled set" in capsys.readouterr().err
    assert (tmp_path / "set" / "distilled.pt").read_bytes() == before
    assert Manifest.load(tmp_path / "set").num_images == 8
    assert main(["import", "--images", str(tmp_path / "none"), "--teacher",
                 str(tiny_teacher.path), "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "--images" in capsys.readouterr().err
