"""delt.student_trainer: the batch-size rule, LR factor, KL loss, AdamW groups, GlobalBatchNorm2d
and StudentTrainer."""

import copy
import math

import delt.student_trainer as trainer_module
import pytest
import torch
from delt.data import load_like
from delt.models import build_model, load_checkpoint
from delt.student_augment import StudentAugment, apply_cutmix, sample_cutmix
from delt.student_trainer import (
    GlobalBatchNorm2d,
    StudentTrainer,
    TrainSettings,
    default_batch_size,
    half_cosine_factor,
    parameter_groups,
    soft_label_kl,
)

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


def test_soft_label_kl_against_a_hand_computed_value():
    temperature = 20.0
    # Teacher: softmax(t / T) = (3/4, 1/4); student: uniform (1/2, 1/2).
    teacher = torch.tensor([[temperature * math.log(3.0), 0.0], [0.0, 0.0]])
    student = torch.zeros(2, 2)
    kl_first = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    # batchmean: the sum over the batch divided by its size (the second row has KL 0); no T².
    expected = kl_first / 2
    assert soft_label_kl(student, teacher, temperature).item() == pytest.approx(expected)


def test_weight_decay_only_on_weights_with_ndim_above_one(tiny_teacher):
    model = load_checkpoint(tiny_teacher.path).model
    decay, no_decay = parameter_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() > 1 for p in decay["params"]) and decay["params"]
    assert all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_global_batch_norm_is_batch_norm_in_one_process():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    converted = GlobalBatchNorm2d.convert(copy.deepcopy(model))
    assert isinstance(converted[1], GlobalBatchNorm2d)
    x = torch.randn(5, 3, 6, 6)
    assert torch.equal(converted(x), model(x))
    assert torch.equal(converted[1].running_var, model[1].running_var)


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
    test_set = load_like(info, "test")
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
    original_kl = trainer_module.soft_label_kl

    def spy_kl(student_logits, teacher_logits, temperature):
        kl_targets.append(teacher_logits.detach().clone())
        return original_kl(student_logits, teacher_logits, temperature)

    monkeypatch.setattr(trainer_module, "soft_label_kl", spy_kl)
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
