"""delt.student: batches, the batch-size rule, LR factor, CutMix, losses, the trainer and the
stage-wise schedule."""

import math

import delt.student as student_module
import pytest
import torch
from delt.data import load_like
from delt.models import build_model, load_checkpoint
from delt.student import (
    CutMixParams,
    StudentAugment,
    StudentTrainer,
    TrainSettings,
    apply_cutmix,
    cutmix_cross_entropy,
    default_batch_size,
    half_cosine_factor,
    parameter_groups,
    sample_cutmix,
    shuffle_patches,
    soft_label_kl,
    stage_lr_factors,
    stagewise_plan,
    train_stagewise,
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


def test_shuffle_patches_permutes_whole_column_then_row_strips():
    # An RDED-like 2x2 grid of constant tiles on a 4x4 image: every output keeps 2x2 constant
    # tiles, the same four values, and tiles that shared a row (column) still do.
    tiles = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    image = tiles.repeat_interleave(2, 0).repeat_interleave(2, 1)[None, None]
    batch = image.expand(64, 3, 4, 4).contiguous()
    out = shuffle_patches(batch, 2, torch.Generator().manual_seed(0))
    seen = set()
    for result in out:
        grid = result[:, ::2, ::2]
        assert torch.equal(result, grid.repeat_interleave(2, 1).repeat_interleave(2, 2))
        assert sorted(grid[0].flatten().tolist()) == [1.0, 2.0, 3.0, 4.0]
        assert sorted(grid[0, 0].tolist()) in ([1.0, 2.0], [3.0, 4.0])  # rows stay rows
        seen.add(tuple(grid[0].flatten().tolist()))
    assert len(seen) == 4  # 2 column orders x 2 row orders
    again = shuffle_patches(batch, 2, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert torch.equal(shuffle_patches(batch, 1, torch.Generator()), batch)
    with pytest.raises(ValueError, match="factor 3 must divide 4x4"):
        shuffle_patches(batch, 3, torch.Generator())


def test_student_augment_without_shuffle_patches_is_unchanged(tiny_teacher):
    info = load_checkpoint(tiny_teacher.path).info
    images = info.normalize(torch.rand(6, 3, 8, 8))
    plain = StudentAugment(info, 0, 6, 0.5, torch.Generator().manual_seed(1))(images)
    off = StudentAugment(info, 0, 6, 0.5, torch.Generator().manual_seed(1), None)(images)
    on = StudentAugment(info, 0, 6, 0.5, torch.Generator().manual_seed(1), 2)(images)
    assert torch.equal(plain, off) and not torch.equal(plain, on)


@pytest.mark.parametrize("patches", [None, 2])
def test_augmenting_some_rows_gives_those_rows_of_the_whole_batch(tiny_teacher, patches):
    # What a DDP rank does: the whole batch's draws, only its rows augmented. The rows equal
    # the whole batch's, and both generators end where the whole batch leaves them.
    info = load_checkpoint(tiny_teacher.path).info
    images = info.normalize(torch.rand(9, 3, 8, 8, generator=torch.Generator().manual_seed(3)))
    for seed in range(6):
        whole = StudentAugment(info, 2, 6, 0.25, torch.Generator().manual_seed(seed), patches)
        torch.manual_seed(100 + seed)
        expected = whole(images)
        state_after, generator_after = torch.get_rng_state(), whole.generator.get_state()
        part = StudentAugment(info, 2, 6, 0.25, torch.Generator().manual_seed(seed), patches)
        assert part.augments_subsets()
        rows = torch.tensor([1, 4, 5, 8])
        torch.manual_seed(100 + seed)
        plan = part.plan(images.shape)
        assert torch.equal(part.apply(images[rows], plan, rows), expected[rows])
        assert torch.equal(torch.get_rng_state(), state_after)
        assert torch.equal(part.generator.get_state(), generator_after)
        empty = part.apply(images[:0], part.plan(images.shape), torch.empty(0, dtype=torch.int64))
        assert empty.shape == (0, 3, 8, 8)


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
    original_kl = student_module.soft_label_kl

    def spy_kl(student_logits, teacher_logits, temperature):
        kl_targets.append(teacher_logits.detach().clone())
        return original_kl(student_logits, teacher_logits, temperature)

    monkeypatch.setattr(student_module, "soft_label_kl", spy_kl)
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


# --------------------------------------------------------------------------------------------
# The schedule (pure)


def test_plan_splits_the_epochs_and_counts_the_steps():
    # IPC 10 in 5 stages of 2 per class: unions of 20 ... 100 images, batch 50 (delt.md §5).
    plan = stagewise_plan(100, [20, 40, 60, 80, 100], 50)
    assert [stage.epochs for stage in plan] == [20] * 5  # no extra training time: 100 in all
    assert [stage.first_epoch for stage in plan] == [0, 20, 40, 60, 80]
    assert [stage.steps for stage in plan] == [20, 20, 40, 40, 40]
    assert [stage.steps_before for stage in plan] == [0, 20, 40, 80, 120]
    # 160 optimizer steps against 200 for a plain evaluation of the final 100 images.
    assert plan[-1].steps_before + plan[-1].steps == 160
    uneven = stagewise_plan(7, [3, 6], 4)
    assert [(s.epochs, s.steps) for s in uneven] == [(3, 3), (4, 8)]  # the remainder goes last


@pytest.mark.parametrize(
    "args, message",
    [((4, [2, 4, 6, 8, 10], 2), "at least one epoch"), ((10, [], 2), "union_sizes"),
     ((10, [2, 0], 2), "union_sizes"), ((10, [2, 4], 0), "batch_size")],
)  # fmt: skip
def test_bad_plans(args, message):
    with pytest.raises(ValueError, match=message):
        stagewise_plan(*args)


def test_lr_restarts_per_stage_or_continues():
    plan = stagewise_plan(6, [2, 4, 6], 2)
    restart = stage_lr_factors(plan, "restart")
    assert restart == [half_cosine_factor(e, 2) for _ in range(3) for e in range(2)]
    assert [restart[stage.first_epoch] for stage in plan] == [1.0, 1.0, 1.0]
    assert stage_lr_factors(plan, "continue") == [half_cosine_factor(e, 6) for e in range(6)]
    with pytest.raises(ValueError, match="schedule"):
        stage_lr_factors(plan, "cyclic")


# --------------------------------------------------------------------------------------------
# Carried optimizer state


def _trainer(tiny_teacher, total_epochs, batch_size=4):
    checkpoint = load_checkpoint(tiny_teacher.path)
    info = checkpoint.info
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    return StudentTrainer(
        build_model("convnet2", info, {"width": 4}), checkpoint.model,
        StudentAugment(info, 0, 0, 0.5, generator), TrainSettings(batch_size=batch_size),
        total_epochs=total_epochs, lr=1e-3, weight_decay=0.01, device=torch.device("cpu"),
        generator=generator,
    )  # fmt: skip


def _unions(info, sizes):
    images = info.normalize(
        torch.rand(sizes[-1], 3, 8, 8, generator=torch.Generator().manual_seed(1))
    )
    labels = torch.arange(sizes[-1]) % 4
    return [(images[:size], labels[:size]) for size in sizes]


@pytest.mark.parametrize("schedule", ["restart", "continue"])
def test_optimizer_state_carries_over_the_stages(tiny_teacher, schedule):
    info = load_checkpoint(tiny_teacher.path).info
    plan = stagewise_plan(5, [4, 8, 12], 4)  # epochs 1, 2, 2; steps 1, 4, 6
    trainer = _trainer(tiny_teacher, total_epochs=5)
    optimizer = trainer.optimizer
    test_set = load_like(info, "test")
    losses, checks, records = train_stagewise(
        trainer, _unions(info, [4, 8, 12]), plan, schedule, test_set, eval_every=2
    )
    assert trainer.optimizer is optimizer  # one AdamW for all stages
    # AdamW's step count goes on from stage to stage: it is never reset.
    assert [(r["steps_before"], r["steps_after"]) for r in records] == [(0, 1), (1, 5), (5, 11)]
    assert [r["steps_before"] for r in records] == [stage.steps_before for stage in plan]
    for state in optimizer.state.values():
        assert int(state["step"]) == 11 and state["exp_avg_sq"].abs().sum() > 0
    assert len(losses) == 5 and trainer.epochs_done == 5
    # Tests at the global epochs 2 and 4, at the end of each stage (1, 3, 5) and after the last.
    assert [c.epoch for c in checks] == [1, 2, 3, 4, 5]
    assert [r["accuracy"] for r in records] == [
        checks[0].accuracy,
        checks[2].accuracy,
        checks[4].accuracy,
    ]
    expected_lr = [1e-3 * stage_lr_factors(plan, schedule)[stage.first_epoch] for stage in plan]
    assert [r["lr_start"] for r in records] == pytest.approx(expected_lr)
    if schedule == "restart":
        assert [r["lr_start"] for r in records] == pytest.approx([1e-3] * 3)


def test_train_stagewise_refuses_a_mismatched_trainer_or_unions(tiny_teacher):
    info = load_checkpoint(tiny_teacher.path).info
    plan = stagewise_plan(3, [4, 8], 4)
    with pytest.raises(ValueError, match="total_epochs = 3"):
        train_stagewise(_trainer(tiny_teacher, 4), _unions(info, [4, 8]), plan, "restart")
    with pytest.raises(ValueError, match="2 unions for a plan of 1"):
        train_stagewise(_trainer(tiny_teacher, 3), _unions(info, [4, 8]), plan[:1], "restart")
    with pytest.raises(ValueError, match="stage 1: 8 images, planned 4"):
        train_stagewise(_trainer(tiny_teacher, 3), _unions(info, [8, 8]), plan, "restart")
