"""delt.evaluate: `delt eval` (eval.json, caching of seeds, random-real, bad input)."""

import json

import pytest
import torch
from delt.config import ConfigError
from delt.eval_results import mean_std
from delt.evaluate import EvalConfig, _student_kwargs, draw_random_real, evaluate
from delt.io import sha256_file, torch_save
from delt.models import TeacherMismatchError, load_checkpoint
from delt.student_trainer import StudentTrainer


def _eval_config(folder, **overrides):
    values = dict(distilled=str(folder), epochs=2, seeds=(0,), eval_every=1, progress=False)
    values.update(overrides)
    return EvalConfig(**values)


def test_mean_std_is_the_population_std():
    assert mean_std([1.0, 3.0]) == (2.0, 1.0)


def _test_set(info):
    from delt.data import load_like

    return load_like(info, "test")


# --------------------------------------------------------------------------------------------
# delt eval


def test_eval_writes_a_well_formed_eval_json(tiny_set):
    result = evaluate(_eval_config(tiny_set, seeds=(0, 1)))
    document = json.loads((tiny_set / "eval.json").read_text())
    assert result.path == tiny_set / "eval.json" and not result.reused
    assert document["complete"] and document["method"] == "cda" and document["ipc"] == 2
    assert [s["seed"] for s in document["seeds"]] == [0, 1]
    for seed in document["seeds"]:
        assert [c["epoch"] for c in seed["curve"]] == [1, 2]
        assert seed["best_accuracy"] == max(c["accuracy"] for c in seed["curve"])
        assert seed["final_accuracy"] == seed["curve"][-1]["accuracy"]
        assert len(seed["train_loss"]) == 2
    best = [s["best_accuracy"] for s in document["seeds"]]
    assert document["best"]["mean"] == pytest.approx(sum(best) / 2)
    assert document["accuracy_mean"] == document["best"]["mean"]
    config = document["config"]
    assert config["batch_size"] == 8 and config["student"] == "convnet2"  # 10 capped at 8
    assert config["student_kwargs"] == {"width": 8} and config["temperature"] == 20.0
    assert document["wall_seconds"] > 0 and "torch" in document["versions"]


def test_eval_is_reproducible_and_reuses_finished_seeds(tiny_set, tmp_path, monkeypatch):
    first = evaluate(_eval_config(tiny_set, out=str(tmp_path / "a.json")))
    again = evaluate(_eval_config(tiny_set, out=str(tmp_path / "b.json")))
    assert first.seeds[0].curve == again.seeds[0].curve
    assert first.seeds[0].train_loss == again.seeds[0].train_loss

    def no_training(*args, **kwargs):
        raise AssertionError("a cached seed was trained again")

    monkeypatch.setattr(StudentTrainer, "train_epoch", no_training)
    cached = evaluate(_eval_config(tiny_set, out=str(tmp_path / "a.json")))
    assert cached.reused and cached.seeds[0].curve == first.seeds[0].curve
    monkeypatch.undo()
    # Adding a seed trains only the new one.
    more = evaluate(_eval_config(tiny_set, out=str(tmp_path / "a.json"), seeds=(0, 5)))
    assert not more.reused and more.seeds[0].curve == first.seeds[0].curve
    assert [s.seed for s in more.seeds] == [0, 5]


def test_eval_with_fewer_or_other_seeds_keeps_the_cached_ones(tiny_set, tmp_path, monkeypatch):
    out = tmp_path / "e.json"
    both = evaluate(_eval_config(tiny_set, out=str(out), seeds=(0, 1)))

    def no_training(*args, **kwargs):
        raise AssertionError("a cached seed was trained again")

    monkeypatch.setattr(StudentTrainer, "train_epoch", no_training)
    # Fewer seeds: reported over seed 0 alone, seed 1 stays in the file.
    one = evaluate(_eval_config(tiny_set, out=str(out), seeds=(0,)))
    assert one.reused and [s.seed for s in one.seeds] == [0]
    assert one.accuracy_mean == both.seeds[0].best_accuracy and one.accuracy_std == 0.0
    document = json.loads(out.read_text())
    assert [s["seed"] for s in document["seeds"]] == [0] and document["complete"]
    assert document["best"]["mean"] == both.seeds[0].best_accuracy
    assert document["final"]["mean"] == both.seeds[0].final_accuracy
    assert [s["seed"] for s in document["other_seeds"]] == [1]
    assert document["other_seeds"][0]["curve"] == both.seeds[1].curve
    # Both again: nothing trained, the same summary as the first run.
    again = evaluate(_eval_config(tiny_set, out=str(out), seeds=(0, 1)))
    assert again.reused and [s.curve for s in again.seeds] == [s.curve for s in both.seeds]
    assert (again.accuracy_mean, again.accuracy_std) == (both.accuracy_mean, both.accuracy_std)
    assert json.loads(out.read_text())["other_seeds"] == []
    monkeypatch.undo()
    # Other seeds: only seed 2 trains; 0 and 1 are kept.
    other = evaluate(_eval_config(tiny_set, out=str(out), seeds=(2,)))
    assert not other.reused and [s.seed for s in other.seeds] == [2]
    document = json.loads(out.read_text())
    assert [s["seed"] for s in document["seeds"]] == [2]
    assert [s["seed"] for s in document["other_seeds"]] == [0, 1]
    assert document["best"]["mean"] == other.seeds[0].best_accuracy


def test_eval_random_real_and_hard_labels(tiny_teacher, tmp_path):
    folder = tmp_path / "random"
    config = _eval_config(
        folder, teacher=str(tiny_teacher.path), random_real=True, ipc=3, hard_labels=True,
        seeds=(4,),
    )  # fmt: skip
    result = evaluate(config)
    document = json.loads((folder / "eval.json").read_text())
    assert document["method"] == "random-real" and document["num_images"] == 12
    info = load_checkpoint(tiny_teacher.path).info
    from delt.data import load_like

    _, labels, indices = draw_random_real(load_like(info, "train"), 3, 4)
    assert result.seeds[0].indices == indices.tolist()
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert "CE on CutMix labels" in document["config"]["loss"]


def test_shuffle_patches_is_recorded_and_part_of_the_identity(tiny_set, tmp_path):
    plain = evaluate(_eval_config(tiny_set, out=str(tmp_path / "plain.json")))
    shuffled = evaluate(_eval_config(tiny_set, out=str(tmp_path / "s.json"), shuffle_patches=2))
    plain_doc = json.loads((tmp_path / "plain.json").read_text())
    shuffled_doc = json.loads((tmp_path / "s.json").read_text())
    assert plain_doc["config"]["shuffle_patches"] is None
    assert shuffled_doc["config"]["shuffle_patches"] == 2
    # Off: the identity is the one of files written before the flag existed.
    assert "shuffle_patches" not in plain_doc["identity"]["config"]
    assert shuffled_doc["identity"]["config"]["shuffle_patches"] == 2
    assert plain.seeds[0].train_loss != shuffled.seeds[0].train_loss
    with pytest.raises(ConfigError, match="--shuffle-patches 3 must divide the image resolution 8"):
        evaluate(_eval_config(tiny_set, out=str(tmp_path / "x.json"), shuffle_patches=3))


GRAY28 = "synthetic:classes=3,channels=1,size=28,train=6,test=3"


@pytest.fixture(scope="module")
def gray_set(tmp_path_factory):
    """A 1-channel 28 px set (Fashion-MNIST's shape) drawn at random, with a ConvNet-3 teacher."""
    from delt.pipeline import DistillConfig, distill

    out = tmp_path_factory.mktemp("gray")
    distill(
        DistillConfig(
            method="random-real", ipc=2, out=str(out), dataset=GRAY28, arch="convnet3",
            width=8, teacher_epochs=1, eval_epochs=1, progress=False,
        )
    )  # fmt: skip
    return out / "distilled"


@pytest.mark.parametrize(
    "student, kwargs, expected_kwargs",
    [("resnet18_small", {}, {}), ("convnet4", {"student_width": 4}, {"width": 4}),
     # --student-width left out: the teacher's width (8), not convnet4's default 128.
     ("convnet4", {}, {"width": 8}), ("convnet3", {}, {"width": 8})],
)  # fmt: skip
def test_another_student_architecture_evaluates_the_set(
    gray_set, tmp_path, student, kwargs, expected_kwargs
):
    result = evaluate(
        _eval_config(gray_set, out=str(tmp_path / "e.json"), epochs=1, student=student, **kwargs)
    )
    document = json.loads((tmp_path / "e.json").read_text())
    assert document["config"]["student"] == student
    assert document["config"]["student_kwargs"] == expected_kwargs
    assert document["teacher"]["arch"] == "convnet3"  # soft labels from the set's teacher
    assert document["identity"]["config"]["student"] == student
    assert 0 <= result.accuracy_mean <= 100 and len(result.seeds[0].train_loss) == 1


@pytest.mark.parametrize(
    "student, width, teacher, teacher_kwargs, expected",
    [("convnet4", None, "convnet3", {"width": 64}, {"width": 64}),
     ("convnet4", 32, "convnet3", {"width": 64}, {"width": 32}),
     ("convnet3", None, "convnet3", {"width": 64}, {"width": 64}),
     ("convnet4", None, "convnet3", {}, {}),  # a teacher at the default width: the same 128
     ("convnet4", None, "resnet18_small", {}, {}),
     ("resnet18_small", None, "convnet3", {"width": 64}, {})],
)  # fmt: skip
def test_student_kwargs_take_the_teacher_width(student, width, teacher, teacher_kwargs, expected):
    assert _student_kwargs(student, width, teacher, teacher_kwargs) == expected


def test_empty_distilled_set_is_refused(tiny_set, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    torch_save(
        {"images": torch.empty(0, 3, 8, 8), "labels": torch.empty(0, dtype=torch.int64)},
        empty / "distilled.pt",
    )
    manifest = json.loads((tiny_set / "manifest.json").read_text())
    manifest["distilled_sha256"] = sha256_file(empty / "distilled.pt")
    (empty / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="the distilled set is empty"):
        evaluate(_eval_config(empty))


def test_missing_distilled_set_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no distilled.pt"):
        evaluate(_eval_config(tmp_path))
    with pytest.raises(ConfigError, match="--teacher is required"):
        evaluate(_eval_config(tmp_path, random_real=True, ipc=2))


def test_teacher_of_another_dataset_is_refused(tiny_set, three_class_teacher):
    other = three_class_teacher
    with pytest.raises(TeacherMismatchError, match="trained on 3 classes"):
        evaluate(_eval_config(tiny_set, teacher=str(other.path)))


@pytest.mark.parametrize(
    "overrides, message",
    [({"student": "nonet"}, "--student 'nonet': unknown architecture"),
     ({"student": "resnet18_small", "student_width": 8}, "--student-width applies"),
     ({"ipc": 3}, "--ipc applies to --random-real"),
     ({"seeds": (1, 1)}, "lists a seed twice"),
     ({"epochs": 0}, "--epochs must be an integer >= 1"),
     ({"min_crop": 0.0}, "--min-crop must be in"),
     ({"randaugment_magnitude": 11}, "--randaugment-magnitude must be in 0..10")],
)  # fmt: skip
def test_bad_config_names_the_flag(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _eval_config(tmp_path, **overrides)


# --------------------------------------------------------------------------------------------
# The results file: its identity covers the test split; other identities are kept, not replaced


@pytest.fixture(scope="module")
def folder_teacher(tmp_path_factory):
    """An imagefolder dataset (``root/train``, ``root/val``; 2 classes of 8 px) and a teacher
    trained on it: ``(root, teacher path)``."""
    from delt.teacher import TeacherConfig, train_teacher
    from imagefolders import write_image_folder

    root = write_image_folder(tmp_path_factory.mktemp("folder"), ["a", "b"], 4, 3, 8)
    teacher = train_teacher(
        TeacherConfig(
            out=str(root.parent / "teacher"), dataset="imagefolder", data_root=str(root),
            resolution=8, arch="convnet1", width=4, epochs=1, batch_size=8, amp="none",
            channels_last=False, progress=False,
        )
    )  # fmt: skip
    return root, str(teacher.path)


def test_a_cached_result_of_another_test_split_is_not_reused(folder_teacher, tmp_path, monkeypatch):
    import shutil

    from imagefolders import write_images

    root, teacher = folder_teacher
    other = tmp_path / "other"  # the same training split, another val/
    shutil.copytree(root, other)
    for index, name in enumerate(["a", "b"]):
        shutil.rmtree(other / "val" / name)
        write_images(other / "val" / name, 3, 8, seed=100 + index)
    folder = tmp_path / "random"
    values = dict(teacher=teacher, random_real=True, ipc=2, seeds=(0,), epochs=2)
    first = evaluate(_eval_config(folder, data_root=str(root), **values))
    fresh = evaluate(_eval_config(folder, data_root=str(other), **values))
    assert not fresh.reused
    split = evaluate(_eval_config(tmp_path / "check", data_root=str(other), **values))
    assert fresh.seeds[0].curve == split.seeds[0].curve  # measured on the other val/
    # The first split's evaluation was kept beside it, and comes back without training.
    assert len(list((folder / "eval-kept").glob("*.json"))) == 1
    monkeypatch.setattr(StudentTrainer, "train_epoch", lambda *a: pytest.fail("trained again"))
    back = evaluate(_eval_config(folder, data_root=str(root), **values))
    assert back.reused and back.seeds[0].curve == first.seeds[0].curve
    document = json.loads((folder / "eval.json").read_text())
    assert document["identity"] == first.document["identity"]
    assert document["identity"]["data_fingerprints"]["test"].startswith("sha256:")
    assert document["seeds"] == first.document["seeds"]
    kept = list((folder / "eval-kept").glob("*.json"))
    assert [json.loads(p.read_text())["seeds"] for p in kept] == [fresh.document["seeds"]]


def test_an_evaluation_with_other_flags_is_kept_not_replaced(
    tiny_set, tmp_path, monkeypatch, caplog
):
    out = tmp_path / "e.json"
    first = evaluate(_eval_config(tiny_set, out=str(out), seeds=(0, 1)))
    with caplog.at_level("WARNING", logger="delt"):
        other = evaluate(_eval_config(tiny_set, out=str(out), epochs=1))
    assert not other.reused and json.loads(out.read_text())["identity"]["config"]["epochs"] == 1
    (kept,) = (tmp_path / "e-kept").iterdir()
    assert json.loads(kept.read_text()) == first.document
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "--epochs: 2 -> 1" in warnings[0] and str(kept) in warnings[0]
    # The first flags again: their seeds come back (nothing trained), the other is kept.
    monkeypatch.setattr(StudentTrainer, "train_epoch", lambda *a: pytest.fail("trained again"))
    back = evaluate(_eval_config(tiny_set, out=str(out), seeds=(1, 0)))
    assert back.reused and [s.curve for s in back.seeds] == [s.curve for s in first.seeds[::-1]]
    assert json.loads(out.read_text())["identity"] == first.document["identity"]
    (kept,) = (tmp_path / "e-kept").iterdir()
    assert json.loads(kept.read_text()) == other.document


def _predating_data_fingerprints(path):
    """``path`` as `delt eval` wrote it before identities held the data fingerprints."""
    document = json.loads(path.read_text())
    del document["identity"]["data_fingerprints"]
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path.read_bytes()


def test_a_results_file_before_test_fingerprints_is_reused_read_only(
    tiny_set, tmp_path, monkeypatch, caplog
):
    out = tmp_path / "e.json"
    first = evaluate(_eval_config(tiny_set, out=str(out), seeds=(0, 1)))
    before = _predating_data_fingerprints(out)
    monkeypatch.setattr(StudentTrainer, "train_epoch", lambda *a: pytest.fail("trained again"))
    for seeds in ((0, 1), (1,)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="delt"):
            again = evaluate(_eval_config(tiny_set, out=str(out), seeds=seeds))
        assert again.reused and out.read_bytes() == before
        assert again.accuracy_mean == pytest.approx(
            sum(first.seeds[s].best_accuracy for s in seeds) / len(seeds)
        )
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and str(out) in warnings[0]
        assert "test split was not recorded" in warnings[0]
    monkeypatch.undo()
    # A new seed would be tested on a split the file cannot vouch for: all afresh, the old kept.
    more = evaluate(_eval_config(tiny_set, out=str(out), seeds=(0, 2)))
    assert not more.reused and "data_fingerprints" in json.loads(out.read_text())["identity"]
    (kept,) = (tmp_path / "e-kept").iterdir()
    assert kept.read_bytes() == before


@pytest.mark.parametrize(
    "name, results",
    [("eval", "recover-delt/eval.json"), ("eval-stagewise", "recover-pdd/eval-stagewise.json")],
)
def test_a_results_file_of_main_a713465_warns_once_and_stays_as_it_is(
    tmp_path, monkeypatch, caplog, name, results
):
    # The real files of before the test fingerprint (tests/fixtures/a713465, test_old_runs.py).
    import shutil
    from pathlib import Path

    from delt.cli import main

    fixture = Path(__file__).parent / "fixtures" / "a713465"
    command = json.loads((fixture / "fixture.json").read_text())["commands"][name]["command"]
    shutil.copytree(fixture, tmp_path / "runs", ignore=shutil.ignore_patterns("make.py"))
    monkeypatch.chdir(tmp_path / "runs")
    before = Path(results).read_bytes()
    assert "data_fingerprints" not in json.loads(before)["identity"]
    monkeypatch.setattr(StudentTrainer, "train_epoch", lambda *a: pytest.fail("trained again"))
    with caplog.at_level("WARNING", logger="delt"):
        assert main(command.split()[1:]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= 30]
    assert len(warnings) == 1, warnings
    assert results in warnings[0] and "its test split was not recorded" in warnings[0]
    assert Path(results).read_bytes() == before
    assert not list(Path(results).parent.glob("*-kept"))
