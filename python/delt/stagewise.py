"""``delt eval --stagewise``: PDD's stage-wise evaluation of a progressive set (pdd.md §1.5).

One student is trained on U_1, then on U_1 ∪ U_2, …, finally on U_P: the unions of a
``delt recover --method pdd`` run (:func:`delt.pdd.load_stage_unions`).

* **No extra training time.** The ``--epochs`` of a plain evaluation are split across the stages
  (:func:`delt.schedules.stage_epochs`: equal shares, the remainder to the last stages), so the
  stage-wise student trains for as many epochs as a plain one, and makes *fewer* optimizer steps
  because the early unions are smaller (:func:`stagewise_plan` counts them).
* **Carried optimizer state.** One :class:`delt.evaluate.StudentTrainer` (one AdamW) trains
  through all stages: its moments and step count go on from stage to stage, as PDD carries its
  SGD momentum (``init_state=optimizer.state``).
* **LR schedule** (``--stage-schedule``): ``restart`` (default; PDD's code restarts the schedule
  at every stage) runs DELT's half-cosine over each stage's epochs; ``continue`` runs one
  half-cosine over all ``--epochs``, the LR curve of a plain evaluation.
* Everything else is ``delt eval``'s protocol (soft labels of the set's teacher, RandAugment,
  CutMix, AdamW), with the batch size of the final set, capped at each union's size. Tests run at
  every ``--eval-every`` epochs, after the last and at the end of every stage.

For every seed the plain evaluation of the final union (the same epochs, the same initial
weights: both students are drawn from the seed) runs beside it, so the two can be compared. The
results file (default ``DISTILLED/eval-stagewise.json``) holds both: at the top level the
stage-wise results (``seeds``, ``best``, ``final``: the same keys as ``eval.json``, each seed
with its per-stage record), under ``plain`` the plain ones, under ``stagewise`` the plan. It is
written after every seed; a re-run reuses the finished seeds, and finished seeds that a run with
other ``--seeds`` does not ask for are kept under ``other_seeds`` (top level and ``plain``), as
in ``eval.json``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from torch import Tensor
from tqdm.auto import tqdm

from delt.config import ConfigError
from delt.data import ImageDataset
from delt.evaluate import (
    Check,
    EvalConfig,
    EvalContext,
    EvalResult,
    SeedResult,
    StudentTrainer,
    _document,
    half_cosine_factor,
    mean_std,
    seeded,
)
from delt.io import read_json, write_json
from delt.pdd import load_stage_unions
from delt.runtime import logger
from delt.schedules import stage_epochs

__all__ = [
    "STAGEWISE_FORMAT",
    "StagePlan",
    "StagewiseSeedResult",
    "evaluate_stagewise",
    "stage_lr_factors",
    "stagewise_plan",
    "train_stagewise",
]

STAGEWISE_FORMAT = "delt-eval-stagewise-v1"
SCHEDULES = ("restart", "continue")


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
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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


def stage_lr_factors(plan: Sequence[StagePlan], schedule: str) -> list[float]:
    """The LR factor (times the base LR) of every epoch of a stage-wise training, in order.

    ``restart``: DELT's half-cosine over each stage's epochs, from 1 at every stage start;
    ``continue``: one half-cosine over all epochs (a plain evaluation's curve).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    total = sum(stage.epochs for stage in plan)
    if schedule == "continue":
        return [half_cosine_factor(epoch, total) for epoch in range(total)]
    return [
        half_cosine_factor(epoch, stage.epochs) for stage in plan for epoch in range(stage.epochs)
    ]


def train_stagewise(
    trainer: StudentTrainer,
    unions: Sequence[tuple[Tensor, Tensor]],
    plan: Sequence[StagePlan],
    schedule: str,
    test_set: ImageDataset | None = None,
    eval_every: int = 10,
    progress: tqdm | None = None,
) -> tuple[list[float], list[Check], list[dict]]:
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
    checks: list[Check] = []
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
                stage_checks.append(Check(trainer.epochs_done, trainer.test(test_set)))
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


@dataclass
class StagewiseSeedResult(SeedResult):
    """A stage-wise student: :class:`SeedResult`'s fields and one record per stage."""

    stages: list[dict] = field(default_factory=list)


def evaluate_stagewise(config: EvalConfig) -> EvalResult:
    """Runs ``delt eval --stagewise``: per seed a stage-wise and a plain student.

    Returns:
        The stage-wise results (``seeds``, ``accuracy_mean`` …); ``document["plain"]`` holds
        the plain evaluation of the same set with the same seeds.
    """
    context = EvalContext.from_config(config)
    try:
        unions = load_stage_unions(config.distilled)
    except ValueError as error:
        raise ConfigError(f"--stagewise: {error}") from None
    if config.epochs < len(unions):
        raise ConfigError(
            f"--epochs {config.epochs} with --stagewise: needs at least one epoch per stage "
            f"({len(unions)} stages)"
        )
    if not unions[-1][0].to(context.images.device).equal(context.images):
        raise ConfigError(
            f"--stagewise: {config.distilled}/distilled.pt is not the last stage's union"
        )
    unions = [(images.to(context.device), labels.to(context.device)) for images, labels in unions]
    plan = stagewise_plan(
        config.epochs, [len(images) for images, _ in unions], context.settings.batch_size
    )
    identity = context.identity()
    path = config.results_path
    finished: dict[int, tuple[StagewiseSeedResult, SeedResult]] = {}
    saved_order: list[int] = []
    if path.is_file():
        saved = read_json(path)
        if saved.get("format") == STAGEWISE_FORMAT and saved.get("identity") == identity:
            plain = {
                int(entry["seed"]): SeedResult(**entry)
                for entry in saved["plain"]["seeds"] + saved["plain"].get("other_seeds", [])
            }
            for entry in saved["seeds"] + saved.get("other_seeds", []):
                seed = int(entry["seed"])
                finished[seed] = (StagewiseSeedResult(**entry), plain[seed])
            saved_order = [int(entry["seed"]) for entry in saved["seeds"]]
        else:
            logger.info("eval: %s comes from another configuration; evaluating again", path)
    reused = all(seed in finished for seed in config.seeds)
    logger.info(
        "eval --stagewise: %s, %d stages (unions of %s images), %s epochs, %s schedule, "
        "batch %d, seeds %s%s",
        config.distilled, len(plan), ",".join(str(stage.union_size) for stage in plan),
        "+".join(str(stage.epochs) for stage in plan), config.stage_schedule,
        context.settings.batch_size, ",".join(map(str, config.seeds)),
        " (all cached)" if reused else "",
    )  # fmt: skip
    for seed in config.seeds:
        if seed in finished:
            continue
        stagewise = _run_stagewise_seed(context, unions, plan, seed)
        plain = context.run_seed(seed)
        logger.info(
            "eval --stagewise: seed %d: stage-wise best %.2f%% final %.2f%% (after each stage: "
            "%s), plain best %.2f%% final %.2f%%",
            seed, stagewise.best_accuracy, stagewise.final_accuracy,
            " ".join(f"{record['accuracy']:.1f}" for record in stagewise.stages),
            plain.best_accuracy, plain.final_accuracy,
        )  # fmt: skip
        finished[seed] = (stagewise, plain)
        write_json(path, _stagewise_document(context, identity, plan, finished, config))
    if reused and saved_order != list(config.seeds):
        # A subset or reordering: the summary is over --seeds.
        write_json(path, _stagewise_document(context, identity, plan, finished, config))
    results = [finished[seed][0] for seed in config.seeds]
    return EvalResult.read(path, results, reused)


def _run_stagewise_seed(
    context: EvalContext,
    unions: list[tuple[Tensor, Tensor]],
    plan: list[StagePlan],
    seed: int,
) -> StagewiseSeedResult:
    config = context.config
    start = time.perf_counter()
    # The same seed as the plain run: both students start from the same weights.
    with seeded(seed):
        trainer = context.make_trainer(seed, total_epochs=config.epochs)
        bar = tqdm(
            total=config.epochs, desc=f"stage-wise seed {seed}", leave=False,
            disable=not config.progress,
        )  # fmt: skip
        losses, checks, records = train_stagewise(
            trainer, unions, plan, config.stage_schedule, context.test_set, config.eval_every, bar
        )
        bar.close()
    result = StagewiseSeedResult.from_checks(seed, checks, losses, time.perf_counter() - start)
    result.stages = records
    return result


def _stagewise_document(
    context: EvalContext,
    identity: dict,
    plan: list[StagePlan],
    finished: dict[int, tuple[StagewiseSeedResult, SeedResult]],
    config: EvalConfig,
) -> dict:
    # As eval.json: the requested seeds (summarized), then the other finished ones (kept).
    results = [finished[seed] for seed in config.seeds if seed in finished]
    others = [finished[seed] for seed in sorted(finished) if seed not in config.seeds]
    stagewise = [entry for entry, _ in results]
    plain = [entry for _, entry in results]
    document = _document(
        context, identity, stagewise, len(results) == len(config.seeds),
        [entry for entry, _ in others],
    )  # fmt: skip
    plain_best = mean_std([s.best_accuracy for s in plain])
    plain_final = mean_std([s.final_accuracy for s in plain])
    document.update(
        format=STAGEWISE_FORMAT,
        stagewise={
            "schedule": config.stage_schedule,
            "plan": [asdict(stage) for stage in plan],
            "optimizer_steps": plan[-1].steps_before + plan[-1].steps,
            "note": "top-level seeds/best/final are the stage-wise student's",
        },
        plain={
            "seeds": [asdict(s) for s in plain],
            "other_seeds": [asdict(entry) for _, entry in others],
            "best": {"mean": plain_best[0], "std": plain_best[1]},
            "final": {"mean": plain_final[0], "std": plain_final[1]},
            "optimizer_steps": config.epochs
            * -(-len(context.images) // context.settings.batch_size),
        },
        wall_seconds=float(sum(s.seconds for s in stagewise) + sum(s.seconds for s in plain)),
    )
    return document
