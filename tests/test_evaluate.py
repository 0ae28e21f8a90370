"""delt.evaluate: the `delt eval` protocol (CutMix, KL loss, schedule, trainer, eval.json)."""

import json
import math

import delt.evaluate as evaluate_module
import pytest
import torch
from delt.config import ConfigError
from delt.evaluate import (
    CutMixParams,
    EvalConfig,
    StudentAugment,
    StudentTrainer,
    TrainSettings,
    apply_cutmix,
    cutmix_cross_entropy,
    default_batch_size,
    draw_random_real,
    evaluate,
    half_cosine_factor,
    load_distilled,
    mean_std,
    parameter_groups,
    sample_cutmix,
    soft_label_kl,
)
from delt.io import torch_save
from delt.models import TeacherMismatchError, build_model, load_checkpoint


def _eval_config(folder, **overrides):
    values = dict(distilled=str(folder), epochs=2, seeds=(0,), eval_every=1, progress=False)
    values.update(overrides)
    return EvalConfig(**values)


# --------------------------------------------------------------------------------------------
# Pure pieces


def test_half_cosine_lr_factor():
    assert half_cosine_factor(0, 300) == 1.0
    assert half_cosine_factor(300, 300) == pytest.approx(0.5)  # ends at half the LR, not 0
    assert half_cosine_factor(150, 300) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


@pytest.mark.parametrize(
    "ipc, classes, images, expected",
    [(50, 10, 500, 100), (10, 10, 100, 50), (1, 10, 10, 10), (10, 1000, 10000, 100),
     (50, 200, 10000, 100), (10, 4, 40, 40), (3, 4, 12, 10)],
)  # fmt: skip
def test_default_batch_size_follows_delt_and_is_capped(ipc, classes, images, expected):
    assert default_batch_size(ipc, classes, images) == expected


def test_cutmix_pastes_the_partners_box():
    images = torch.stack([torch.full((1, 4, 4), 1.0), torch.full((1, 4, 4), 2.0)])
    params = CutMixParams(torch.tensor([1, 0]), top=1, bottom=3, left=0, right=2, lam=0.75)
    mixed = apply_cutmix(images, params)
    expected_first = torch.ones(4, 4)
    expected_first[1:3, 0:2] = 2.0
    assert torch.equal(mixed[0, 0], expected_first)
    assert torch.equal(mixed[1, 0], 3.0 - expected_first)
    assert torch.equal(images[0], torch.full((1, 4, 4), 1.0))  # input untouched


def test_sampled_cutmix_lambda_is_the_box_area_and_reproducible():
    for seed in range(20):
        params = sample_cutmix(8, 28, 28, 1.0, torch.Generator().manual_seed(seed))
        assert 0 <= params.top <= params.bottom <= 28 and 0 <= params.left <= params.right <= 28
        area = (params.bottom - params.top) * (params.right - params.left)
        assert params.lam == pytest.approx(1 - area / 28**2)
        assert sorted(params.permutation.tolist()) == list(range(8))
        again = sample_cutmix(8, 28, 28, 1.0, torch.Generator().manual_seed(seed))
        assert (again.top, again.left, again.lam) == (params.top, params.left, params.lam)


def test_soft_label_kl_against_a_hand_computed_value():
    temperature = 20.0
    # Teacher: softmax(t / T) = (3/4, 1/4); student: uniform (1/2, 1/2).
    teacher = torch.tensor([[temperature * math.log(3.0), 0.0], [0.0, 0.0]])
    student = torch.zeros(2, 2)
    kl_first = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    # batchmean: the sum over the batch divided by its size (the second row has KL 0); no T².
    expected = kl_first / 2
    assert soft_label_kl(student, teacher, temperature).item() == pytest.approx(expected)


def test_cutmix_cross_entropy_mixes_both_labels():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2]]))
    labels = torch.tensor([0, 1])
    params = CutMixParams(torch.tensor([1, 0]), 0, 0, 0, 0, lam=0.75)
    own = -(math.log(0.5) + math.log(0.6)) / 2
    partner = -(math.log(0.25) + math.log(0.2)) / 2
    loss = cutmix_cross_entropy(logits, labels, params)
    assert loss.item() == pytest.approx(0.75 * own + 0.25 * partner)


def test_weight_decay_only_on_weights_with_ndim_above_one(tiny_teacher):
    model = load_checkpoint(tiny_teacher.path).model
    decay, no_decay = parameter_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() > 1 for p in decay["params"]) and decay["params"]
    assert all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_mean_std_is_the_population_std():
    assert mean_std([1.0, 3.0]) == (2.0, 1.0)


def test_student_augment_keeps_shape_and_range(tiny_teacher):
    info = load_checkpoint(tiny_teacher.path).info
    images = info.normalize(torch.rand(6, 3, 8, 8))
    augment = StudentAugment(info, 2, 6, 0.25, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    out = augment(images)
    assert out.shape == images.shape and out.dtype == torch.float32
    low, high = info.pixel_bounds()
    assert bool((out >= low - 1e-5).all() and (out <= high + 1e-5).all())
    torch.manual_seed(0)
    again = StudentAugment(info, 2, 6, 0.25, torch.Generator().manual_seed(0))(images)
    assert torch.equal(out, again)


# --------------------------------------------------------------------------------------------
# The trainer as a building block (stage-wise schedules reuse it)


def test_trainer_carries_optimizer_and_schedule_across_calls(tiny_teacher):
    checkpoint = load_checkpoint(tiny_teacher.path)
    info = checkpoint.info
    torch.manual_seed(0)
    student = build_model("convnet2", info, {"width": 4})
    generator = torch.Generator().manual_seed(0)
    trainer = StudentTrainer(
        student, checkpoint.model, StudentAugment(info, 0, 0, 0.5, generator),
        TrainSettings(batch_size=4), total_epochs=4, lr=1e-3, weight_decay=0.01,
        device=torch.device("cpu"), generator=generator,
    )  # fmt: skip
    first = info.normalize(torch.rand(4, 3, 8, 8))
    union = torch.cat([first, info.normalize(torch.rand(4, 3, 8, 8))])
    labels = torch.arange(8) % 4
    losses, checks = trainer.train_epochs(first, labels[:4], 1)
    assert len(losses) == 1 and checks == [] and trainer.epochs_done == 1
    steps_after_first = trainer.optimizer.state[next(iter(student.parameters()))]["step"]
    assert float(steps_after_first) == 1  # one batch of 4
    test_set = _test_set(info)
    losses, checks = trainer.train_epochs(union, labels, 3, test_set, eval_every=2)
    assert [c.epoch for c in checks] == [2, 4]  # global epoch count; the last always tested
    assert float(trainer.optimizer.state[next(iter(student.parameters()))]["step"]) == 1 + 3 * 2
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5)
    with pytest.raises(RuntimeError, match="already done"):
        trainer.train_epoch(union, labels)


def test_teacher_labels_exactly_the_augmented_mixed_batch_the_student_sees(
    tiny_teacher, monkeypatch
):
    checkpoint = load_checkpoint(tiny_teacher.path)
    info = checkpoint.info
    teacher = checkpoint.model.requires_grad_(False).eval()
    torch.manual_seed(0)
    student = build_model("convnet2", info, {"width": 4})
    generator = torch.Generator().manual_seed(0)
    augment = StudentAugment(info, 2, 6, 0.25, generator)
    trainer = StudentTrainer(
        student, teacher, augment, TrainSettings(batch_size=8, cutmix_beta=1.0),
        total_epochs=1, lr=1e-3, weight_decay=0.01, device=torch.device("cpu"),
        generator=generator,
    )  # fmt: skip
    inputs = {"teacher": [], "student": []}
    for name, model in (("teacher", teacher), ("student", student)):
        model.register_forward_pre_hook(
            lambda module, args, name=name: inputs[name].append(args[0].detach().clone())
        )
    kl_targets = []
    original_kl = evaluate_module.soft_label_kl

    def spy_kl(student_logits, teacher_logits, temperature):
        kl_targets.append(teacher_logits.detach().clone())
        return original_kl(student_logits, teacher_logits, temperature)

    monkeypatch.setattr(evaluate_module, "soft_label_kl", spy_kl)
    images = info.normalize(torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(2)))
    labels = torch.arange(8) % 4
    global_state, generator_state = torch.get_rng_state(), generator.get_state()
    trainer.step(images, labels)

    assert len(inputs["teacher"]) == len(inputs["student"]) == 1
    seen = inputs["student"][0]
    assert torch.equal(inputs["teacher"][0], seen)  # the very same pixels
    assert not torch.allclose(seen, images)  # ... which are not the raw set
    # Replaying the step's draws: the batch is RandAugment + crop/flip, then CutMix.
    torch.set_rng_state(global_state)
    generator.set_state(generator_state)
    augmented = augment(images)
    params = sample_cutmix(8, 8, 8, 1.0, generator)
    assert params.lam < 1.0 and not torch.equal(augmented, seen)  # CutMix pasted a box
    assert torch.equal(apply_cutmix(augmented, params), seen)
    # The KL target is the teacher's logits of that batch.
    with torch.no_grad():
        assert len(kl_targets) == 1 and torch.equal(kl_targets[0], teacher(seen))


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


def test_empty_distilled_set_is_refused(tiny_set, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text((tiny_set / "manifest.json").read_text())
    torch_save(
        {"images": torch.empty(0, 3, 8, 8), "labels": torch.empty(0, dtype=torch.int64)},
        empty / "distilled.pt",
    )
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


def test_load_distilled_roundtrip(tiny_set):
    images, labels, manifest = load_distilled(tiny_set)
    assert images.shape == (8, 3, 8, 8) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert manifest["method"] == "cda"
