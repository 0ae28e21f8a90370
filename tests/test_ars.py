"""DD-Ranking's augmentation-robust score: `delt eval --no-augment` (the student sees the images
as they are), its identity, and the ARS of `delt ddranking`; `delt teacher`'s step schedule of
DD-Ranking's full-data recipe."""

import json
import math

import pytest
import torch
from conftest import SYNTHETIC
from delt.cli import build_parser
from delt.config import ConfigError, from_namespace
from delt.ddranking import augmentation_robust_score
from delt.distilled_set import normalized
from delt.evaluate import EvalConfig, EvalContext, evaluate
from delt.student_augment import NoAugment, StudentAugment

# e = 2.718282, e^-1 = 0.367879, e - e^-1 = 2.350402.


def test_ars_by_hand_in_both_conventions():
    # beta = 0.5 (0.70 - 0.72) + 0.5 (0.40 - 0.30) = -0.01 + 0.05 = 0.04;
    # ARS = (e^0.04 - e^-1) / 2.350402 = (1.040811 - 0.367879) / 2.350402 = 0.286305.
    beta, ars = augmentation_robust_score(0.70, 0.72, 0.40, 0.30)
    assert beta == pytest.approx(0.04) and ars == pytest.approx(0.286305, abs=1e-6)
    # DD-Ranking's percent convention: beta = 4.0, ARS = (e^4 - e^-1) / 2.350402
    # = (54.598150 - 0.367879) / 2.350402 = 54.230271 / 2.350402 = 23.072760: far outside [0, 1].
    beta, ars = augmentation_robust_score(70.0, 72.0, 40.0, 30.0, unit="percent")
    assert beta == pytest.approx(4.0) and ars == pytest.approx(23.072760, abs=1e-5)
    # gamma = 1: only the augmented runs count, beta = -0.02, ARS = (e^-0.02 - e^-1) / 2.350402
    # = (0.980199 - 0.367879) / 2.350402 = 0.260517.
    beta, ars = augmentation_robust_score(0.70, 0.72, 0.40, 0.30, weight=1.0)
    assert beta == pytest.approx(-0.02) and ars == pytest.approx(0.260517, abs=1e-6)
    # A set 10 points below random real images in both: beta = -0.1, ARS = (e^-0.1 - e^-1) /
    # 2.350402 = (0.904837 - 0.367879) / 2.350402 = 0.228454 with fractions; in percent
    # beta = -10, ARS = (e^-10 - e^-1) / 2.350402 = (0.000045 - 0.367879) / 2.350402 = -0.156498.
    assert augmentation_robust_score(0.5, 0.6, 0.5, 0.6)[1] == pytest.approx(0.228454, abs=1e-6)
    low = augmentation_robust_score(50.0, 60.0, 50.0, 60.0, unit="percent")[1]
    assert low == pytest.approx(-0.156498, abs=1e-6)


# --------------------------------------------------------------------------------------------
# delt eval --no-augment


def _captured_batches(folder, monkeypatch, **overrides):
    """The batches the student of seed 0 is trained on during one epoch (its forward inputs in
    training mode), and the set's normalized images."""
    config = EvalConfig(distilled=str(folder), epochs=1, seeds=(0,), progress=False, **overrides)
    context = EvalContext.from_config(config)
    trainer = context.make_trainer(0)
    seen: list[torch.Tensor] = []
    forward = trainer.student.forward

    def recording(images):
        if trainer.student.training:
            seen.append(images.detach().clone())
        return forward(images)

    monkeypatch.setattr(trainer.student, "forward", recording)
    trainer.train_epoch(context.images, context.labels)
    return seen, normalized(context.images, context.info)


def _is_a_row_of(row, images):
    return any(torch.equal(row, image) for image in images)


def test_the_no_augment_student_sees_the_images_as_they_are(tiny_set, monkeypatch):
    seen, images = _captured_batches(tiny_set, monkeypatch, augment=False)
    rows = torch.cat(seen)
    assert rows.shape[0] == images.shape[0]  # one epoch: every image once
    assert all(_is_a_row_of(row, images) for row in rows)
    order = [next(i for i, image in enumerate(images) if torch.equal(row, image)) for row in rows]
    assert sorted(order) == list(range(images.shape[0]))
    # The default student (crops, flips, CutMix) sees other images: the check can fail.
    seen, images = _captured_batches(tiny_set, monkeypatch)
    assert not all(_is_a_row_of(row, images) for row in torch.cat(seen))


def test_the_no_augment_teacher_labels_the_same_unaugmented_batch(tiny_set, monkeypatch):
    config = EvalConfig(distilled=str(tiny_set), epochs=1, seeds=(0,), augment=False,
                        progress=False)  # fmt: skip
    context = EvalContext.from_config(config)
    trainer = context.make_trainer(0)
    assert isinstance(trainer.augment, NoAugment) and trainer.settings.cutmix_beta == 0.0
    labelled: list[torch.Tensor] = []
    teacher_forward = trainer.teacher.forward
    monkeypatch.setattr(
        trainer.teacher, "forward", lambda x: labelled.append(x.clone()) or teacher_forward(x)
    )
    trainer.train_epoch(context.images, context.labels)
    images = normalized(context.images, context.info)
    assert labelled and all(_is_a_row_of(row, images) for row in torch.cat(labelled))
    default = EvalContext.from_config(dataclass_replace(config, augment=True)).make_trainer(0)
    assert isinstance(default.augment, StudentAugment) and default.settings.cutmix_beta == 1.0


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_no_augment_is_recorded_and_part_of_the_identity_only_when_off(tiny_set, tmp_path):
    path = tmp_path / "eval.json"
    values = dict(distilled=str(tiny_set), epochs=1, seeds=(0,), eval_every=1, progress=False,
                  out=str(path))  # fmt: skip
    first = evaluate(EvalConfig(**values))
    document = json.loads(path.read_text())
    assert "augment" not in document["identity"]["config"]  # at its default: as before the flag
    assert document["config"]["augment"] is True
    assert evaluate(EvalConfig(**values, augment=True)).reused
    plain = evaluate(EvalConfig(**values, augment=False))
    assert not plain.reused  # another identity: trained, the augmented result kept aside
    document = json.loads(path.read_text())
    assert document["identity"]["config"]["augment"] is False
    assert document["config"]["augment"] is False and document["config"]["randaugment"] == "none"
    assert "no CutMix" in document["config"]["student_augmentation"]
    assert list((tmp_path / "eval-kept").glob("*.json"))
    assert plain.seeds[0].train_loss != first.seeds[0].train_loss
    assert evaluate(EvalConfig(**values, augment=False)).reused
    # The augmented result comes back from where it was kept.
    assert evaluate(EvalConfig(**values)).seeds[0].train_loss == first.seeds[0].train_loss


def test_the_cli_takes_no_augment_and_refuses_it_with_stored_labels():
    args = build_parser().parse_args(["eval", "--distilled", "x", "--no-augment"])
    assert from_namespace(EvalConfig, args).augment is False
    args = build_parser().parse_args(["eval", "--distilled", "x"])
    assert from_namespace(EvalConfig, args).augment is True
    with pytest.raises(ConfigError, match="--labels: stored soft labels are of augmented"):
        EvalConfig(distilled="x", labels="store", augment=False)


# --------------------------------------------------------------------------------------------
# delt teacher's step schedule (DD-Ranking's full-data recipe)


def test_the_teacher_step_schedule_and_identity(tmp_path):
    from delt.teacher import TeacherConfig, teacher_identity

    config = TeacherConfig(out="x")
    identity = teacher_identity(config)
    assert not {"lr_schedule", "lr_step_epochs", "nesterov", "decay_all"} & set(identity)
    step = TeacherConfig(out="x", lr_schedule="step", lr_step_epochs=3, nesterov=False,
                         decay_all=True)  # fmt: skip
    identity = teacher_identity(step)
    assert identity["lr_schedule"] == "step" and identity["lr_step_epochs"] == 3
    assert identity["nesterov"] is False and identity["decay_all"] is True
    with pytest.raises(ConfigError, match="--lr-step-epochs"):
        TeacherConfig(out="x", lr_schedule="step", lr_step_epochs=0)


def test_the_teacher_step_schedule_divides_the_lr_by_ten(tiny_teacher, tmp_path, monkeypatch):
    from delt.teacher import TeacherConfig, train_teacher

    rates: list[float] = []
    original = torch.optim.SGD.step

    def recording(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        groups = [(g["nesterov"], g["weight_decay"], len(g["params"])) for g in self.param_groups]
        recording.groups = groups
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording)
    result = train_teacher(
        TeacherConfig(
            out=str(tmp_path / "t"), dataset=SYNTHETIC, arch="convnet2", width=8, epochs=3,
            batch_size=1024, lr=0.01, lr_schedule="step", lr_step_epochs=1, nesterov=False,
            decay_all=True, label_smoothing=0.0, amp="none", progress=False,
        )
    )  # fmt: skip
    steps = len(rates) // 3
    assert steps >= 1 and len(rates) == 3 * steps
    expected = [0.01] * steps + [0.001] * steps + [0.0001] * steps
    assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(rates, expected, strict=True))
    assert recording.groups[0][:2] == (False, 5e-4)
    assert recording.groups[1][1] == 0.0 and recording.groups[1][2] == 0  # all decayed
    assert result.test_accuracy is not None


def test_the_full_data_student_is_tested_every_20_epochs_and_the_best_kept(tiny_set, tmp_path):
    import shutil

    from delt.ddranking import FULL_DATA_RECIPE, DDRankingConfig, run_ddranking

    folder = tmp_path / "set"
    shutil.copytree(tiny_set, folder, ignore=shutil.ignore_patterns("eval*", "chunks", ".lock"))
    config = DDRankingConfig(
        distilled=str(folder), seeds=(0,), epochs=1, lr_grid=("0.001",), soft_lr=0.001,
        full_data_epochs=45, ars=False, progress=False,
    )  # fmt: skip
    full = run_ddranking(config).document["full_data"]
    assert set(full["tests"]) == {"20", "40", "45"}  # every 20 epochs, and the end
    assert full["accuracy_percent"] == max(full["tests"].values())
    assert full["tests"][str(full["best_epoch"])] == full["accuracy_percent"]
    assert full["final_accuracy_percent"] == full["tests"]["45"]
    teacher = json.loads((folder / "ddranking-full-data" / "teacher.json").read_text())
    for name, value in FULL_DATA_RECIPE.items():
        assert teacher["config"][name] == value, name
    assert teacher["config"]["epochs"] == 45
    assert [c["epoch"] for c in teacher["checkpoints"]] == [20, 40]


def test_delt_compare_forwards_no_augment_to_every_evaluation():
    from delt.compare import CompareConfig

    config = CompareConfig(sets=("x",), augment=False)
    assert config.eval_config("x", 300, "r.json").augment is False
    assert config.eval_config("x", 300, "r.json", random_real=True, ipc=10).augment is False
    assert CompareConfig(sets=("x",)).eval_config("x", 300, "r.json").augment is True
