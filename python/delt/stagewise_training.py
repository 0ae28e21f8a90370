"""Stage-wise student training: one student trains on U_1, then U_1 ∪ U_2, … U_P of a
progressive set, the training epochs split across the stages and one AdamW carried through (PDD's
evaluation, Chen et al., ICLR 2024). ``delt eval --stagewise`` (:mod:`delt.stagewise`) and PDD's
hard-init student (:mod:`delt.methods.pdd`) train with it; it sits below both because pdd sits
below the evaluation commands.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor
from tqdm.auto import tqdm

from delt.config import check_int
from delt.data import ImageDataset
from delt.schedules import stage_epochs
from delt.student_trainer import AccuracyCheck, StudentTrainer

__all__ = ["STAGE_SCHEDULES", "StagePlan", "stagewise_plan", "train_stagewise"]

STAGE_SCHEDULES = ("restart", "continue")


@dataclass(frozen=True)
class StagePlan:
    """One stage of a stage-wise training.

    Attributes:
        stage: 1-based stage number k.
        union_size: images in U_k.
        epochs: epochs trained on U_k.
        first_epoch: epochs done before the stage.
        steps: optimizer steps in the stage (``epochs * ceil(union_size / batch)``).
        steps_before: optimizer steps before it: AdamW's step count when the stage starts.
    """

    stage: int
    union_size: int
    epochs: int
    first_epoch: int
    steps: int
    steps_before: int


def stagewise_plan(
    total_epochs: int, union_sizes: Sequence[int], batch_size: int
) -> list[StagePlan]:
    """Epochs and optimizer steps of every stage: ``total_epochs`` split across the unions.

    >>> [(p.epochs, p.steps) for p in stagewise_plan(100, [20, 40, 60, 80, 100], 50)]
    [(20, 20), (20, 20), (20, 40), (20, 40), (20, 40)]
    """
    check_int("batch_size", batch_size)
    if not union_sizes or min(union_sizes) < 1:
        raise ValueError(f"union_sizes must be >= 1 each, got {list(union_sizes)}")
    plan = []
    first_epoch = steps_before = 0
    for stage, (size, epochs) in enumerate(
        zip(union_sizes, stage_epochs(total_epochs, len(union_sizes)), strict=True), start=1
    ):
        steps = epochs * -(-size // batch_size)  # train_epoch: batches of batch_size, last short
        plan.append(StagePlan(stage, size, epochs, first_epoch, steps, steps_before))
        first_epoch += epochs
        steps_before += steps
    return plan


def train_stagewise(
    trainer: StudentTrainer,
    unions: Sequence[tuple[Tensor, Tensor]],
    plan: Sequence[StagePlan],
    schedule: str,
    test_set: ImageDataset | None = None,
    eval_every: int = 10,
    progress: tqdm | None = None,
) -> tuple[list[float], list[AccuracyCheck], list[dict]]:
    """Trains ``trainer``'s student on each union in turn for its planned epochs.

    The trainer (its optimizer, step count, generator) carries over from stage to stage; with
    ``restart`` its LR schedule restarts at each stage. ``trainer.total_epochs`` must be the plan's
    total. Tests ``test_set`` as :meth:`StudentTrainer.train_epochs` does and at each stage's end.

    Args:
        unions: ``(images (N_k, C, H, W), labels (N_k,))`` of U_1 … U_P on the trainer's device.

    Returns:
        ``(loss of each epoch, checks, one record per stage)``; a record holds the stage, its
        union size, epochs, optimizer steps before and after it, the LR factor it starts at, and
        the test accuracy at its end (None without ``test_set``).
    """
    if len(unions) != len(plan):
        raise ValueError(f"{len(unions)} unions for a plan of {len(plan)} stages")
    total = sum(stage.epochs for stage in plan)
    if trainer.total_epochs != total or trainer.epochs_done != 0:
        raise ValueError(
            f"the trainer must be fresh with total_epochs = {total} (the plan's), got "
            f"{trainer.total_epochs} with {trainer.epochs_done} done"
        )
    losses: list[float] = []
    checks: list[AccuracyCheck] = []
    records: list[dict] = []
    for (images, labels), stage in zip(unions, plan, strict=True):
        if images.shape[0] != stage.union_size:
            raise ValueError(
                f"stage {stage.stage}: {images.shape[0]} images, planned {stage.union_size}"
            )
        if schedule == "restart":
            trainer.restart_schedule(stage.epochs)
        lr_start = trainer.optimizer.param_groups[0]["lr"]
        steps_before = trainer.optimizer_steps
        stage_losses, stage_checks = trainer.train_epochs(
            images, labels, stage.epochs, test_set, eval_every, progress
        )
        accuracy = None
        if test_set is not None:
            if not stage_checks or stage_checks[-1].epoch != trainer.epochs_done:
                stage_checks.append(AccuracyCheck(trainer.epochs_done, trainer.test(test_set)))
            accuracy = stage_checks[-1].accuracy
        losses += stage_losses
        checks += stage_checks
        records.append(
            {
                "stage": stage.stage,
                "union_size": stage.union_size,
                "epochs": stage.epochs,
                "steps_before": steps_before,
                "steps_after": trainer.optimizer_steps,
                "lr_start": lr_start,
                "accuracy": accuracy,
            }
        )
    return losses, checks, records
