"""delt.stagewise_training: the stage plan and LR factors (pure), and a student trained stage by
stage with its optimizer state carried over."""

import pytest
import torch
from delt.data import load_like
from delt.models import build_model, load_checkpoint
from delt.stagewise_training import STAGE_SCHEDULES, StagePlan, stagewise_plan, train_stagewise
from delt.student_augment import StudentAugment
from delt.student_trainer import StudentTrainer, TrainSettings, half_cosine_factor

# --------------------------------------------------------------------------------------------
# The schedule (pure)


def stage_lr_factors(plan: list[StagePlan], schedule: str) -> list[float]:
    """The expected LR factor (times the base LR) of every epoch of a stage-wise training, in order.

    ``restart``: DELT's half-cosine over each stage's epochs, from 1 at every stage start;
    ``continue``: one half-cosine over all epochs (a plain evaluation's curve).
    """
    if schedule not in STAGE_SCHEDULES:
        raise ValueError(f"schedule must be one of {STAGE_SCHEDULES}, got {schedule!r}")
    total = sum(stage.epochs for stage in plan)
    if schedule == "continue":
        return [half_cosine_factor(epoch, total) for epoch in range(total)]
    return [
        half_cosine_factor(epoch, stage.epochs) for stage in plan for epoch in range(stage.epochs)
    ]


def test_plan_splits_the_epochs_and_counts_the_steps():
    # IPC 10 in 5 stages of 2 per class: unions of 20 ... 100 images, batch 50 (DELT's).
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
