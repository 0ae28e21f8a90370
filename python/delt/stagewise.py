"""``delt eval --stagewise``: PDD's stage-wise evaluation of a progressive set (PDD: Chen et al.,
ICLR 2024).

Per seed, one student trains on U_1, then U_1 ∪ U_2, … U_P
(:func:`delt.stagewise_training.train_stagewise`:
``--epochs`` split across the stages, one AdamW carried through, ``--stage-schedule`` restart or
continue), and beside it the plain evaluation of U_P with the same seed. The results file
(default ``DISTILLED/eval-stagewise.json``) has ``eval.json``'s keys for the stage-wise student,
the plain one under ``plain`` and the plan under ``stagewise``; finished seeds are reused, and
results of another identity are kept aside, as ``eval.json``'s
(:class:`delt.eval_results.ResultsFile`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from torch import Tensor
from tqdm.auto import tqdm

from delt.config import ConfigError
from delt.distilled_set import load_stage_unions
from delt.distributed import barrier, is_main
from delt.eval_results import EvalResult, ResultsFile, SeedResult, kept_folder, summary
from delt.evaluate import EvalConfig, EvalContext, eval_document
from delt.lock import results_lock
from delt.runtime import logger
from delt.stagewise_training import StagePlan, stagewise_plan, train_stagewise
from delt.student_trainer import seeded

__all__ = ["STAGEWISE_FORMAT", "StagewiseSeedResult", "evaluate_stagewise"]

STAGEWISE_FORMAT = "delt-eval-stagewise-v1"


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
    if not config.stagewise:
        raise ConfigError("evaluate_stagewise runs --stagewise configs; use delt.evaluate.evaluate")
    config.check_results_path(probe=False)
    with results_lock(config.results_path) as lock:
        lock.sweep(kept_folder(config.results_path), recursive=False)
        return _evaluate_stagewise(config)


def _evaluate_stagewise(config: EvalConfig) -> EvalResult:
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
    # As eval.json: another identity's results are kept aside.
    results = ResultsFile.open(path, STAGEWISE_FORMAT, identity, context.identity_defaults())
    if results.document is not None:
        saved = results.document
        plain = {
            int(entry["seed"]): SeedResult(**entry)
            for entry in saved["plain"]["seeds"] + saved["plain"].get("other_seeds", [])
        }
        for entry in saved["seeds"] + saved.get("other_seeds", []):
            seed = int(entry["seed"])
            finished[seed] = (StagewiseSeedResult(**entry), plain[seed])
        saved_order = [int(entry["seed"]) for entry in saved["seeds"]]
    reused = all(seed in finished for seed in config.seeds)
    # A new summary or new seeds would vouch for a split a legacy file did not record.
    if results.legacy and not results.keep_legacy(reused and saved_order == list(config.seeds)):
        finished, saved_order, reused = {}, [], False
    rewrite = saved_order != list(config.seeds) or results.needs_write
    if not reused or rewrite:
        config.check_results_path()  # before training: a result that cannot be saved is lost
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
        if is_main():  # under torchrun every rank trained the same students
            results.write(_stagewise_document(context, identity, plan, finished, config))
    if reused and rewrite and not results.legacy and is_main():
        # A subset or reordering (or results taken back from their kept copy).
        results.write(_stagewise_document(context, identity, plan, finished, config))
    barrier()  # rank 0's file, read by every rank
    results = [finished[seed][0] for seed in config.seeds]
    return EvalResult.read(path, results, reused)


def _run_stagewise_seed(
    context: EvalContext, unions: list[tuple[Tensor, Tensor]], plan: list[StagePlan], seed: int
) -> StagewiseSeedResult:
    config = context.config
    start = time.perf_counter()
    # The same seed as the plain run: both students start from the same weights.
    with seeded(seed):
        trainer = context.make_trainer(seed, total_epochs=config.epochs)
        bar = tqdm(
            total=config.epochs, desc=f"stage-wise seed {seed}", leave=False,
            disable=None if config.progress else True,
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
    document = eval_document(
        context, identity, stagewise, len(results) == len(config.seeds),
        [entry for entry, _ in others],
    )  # fmt: skip
    plain_summary = summary(plain)
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
            "best": plain_summary["best"],
            "final": plain_summary["final"],
            "optimizer_steps": config.epochs
            * -(-len(context.images) // context.settings.batch_size),
        },
        wall_seconds=float(sum(s.seconds for s in stagewise) + sum(s.seconds for s in plain)),
    )
    return document
