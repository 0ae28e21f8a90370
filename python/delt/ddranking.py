"""DD-Ranking's scores, computed with accuracies as fractions: ``delt ddranking``.

DD-Ranking (Li et al., arXiv 2505.13300; github.com/NUS-HPC-AI-Lab/DD-Ranking,
``ddranking/metrics/soft_label.py`` and ``aug_robust.py``) scores a distilled set per evaluation
run from four accuracies:

- ``set_hard``: the set trained with its hard labels, the LR searched over a grid (best);
- ``full_hard``: the full training data trained with hard labels;
- ``set_soft``: the set under its soft-label recipe; ``random_soft``: random real images of the
  same IPC under the same recipe (LR searched too);

``HLR = full_hard − set_hard``, ``IOR = set_soft − random_soft``, ``α = w·IOR − (1 − w)·HLR``
and ``LRS = (e^α − e^−1) / (e − e^−1)``; ``ARS`` likewise from ``β = γ·(set_aug − random_aug) +
(1 − γ)·(set_noaug − random_noaug)``: the set and random real images under the soft-label
recipe (``set_soft``, ``random_soft``) and again with students that see the images without any
augmentation (``delt eval --no-augment``), every LR searched. The normalization maps
α ∈ [−1, 1] onto [0, 1], which holds for accuracies in [0, 1]; DD-Ranking's code passes
percentages, so α spans [−100, 100] and the score saturates (docs/protocols.md, "DD-Ranking's
scores"). The functions here take a ``unit`` and compute either convention;
:func:`run_ddranking` reports the fraction one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from delt.config import ConfigError, check_int_fields, option
from delt.distributed import barrier, is_main, world
from delt.eval_results import EvalResult
from delt.evaluate import EvalConfig, evaluate
from delt.io import read_json, write_json
from delt.models import read_sidecar
from delt.runtime import logger, versions
from delt.teacher import TeacherConfig, train_teacher

__all__ = [
    "DDRankingConfig",
    "DDRankingResult",
    "LabelRobustScore",
    "augmentation_robust_score",
    "label_robust_score",
    "lr_search",
    "normalized_score",
    "run_ddranking",
]

Unit = Literal["fraction", "percent"]
# The delt eval runs of delt ddranking (DDRankingConfig.eval_config).
EVAL_KINDS = ("set-hard", "set-soft", "random-soft", "set-soft-noaug", "random-soft-noaug")
# DD-Ranking's LR grid (_hyper_param_search_for_hard_label / _for_soft_label).
LR_GRID = (0.001, 0.005, 0.01, 0.05, 0.1)
DDRANKING_FORMAT = "delt-ddranking-v1"


def normalized_score(x: float) -> float:
    """DD-Ranking's normalization ``(e^x − e^−1) / (e − e^−1)``: 0 at x = −1, 1 at x = 1."""
    return (math.exp(x) - math.exp(-1.0)) / (math.exp(1.0) - math.exp(-1.0))


def _checked(accuracies: dict[str, float], unit: Unit) -> None:
    """Each accuracy must lie in [0, 1] (fraction) or [0, 100] (percent)."""
    top = {"fraction": 1.0, "percent": 100.0}.get(unit)
    if top is None:
        raise ValueError(f"unit must be 'fraction' or 'percent', got {unit!r}")
    for name, value in accuracies.items():
        if not (math.isfinite(value) and 0.0 <= value <= top):
            hint = " (a percentage? pass unit='percent')" if unit == "fraction" else ""
            raise ValueError(f"{name} must be an accuracy in [0, {top:g}], got {value!r}{hint}")


@dataclass(frozen=True)
class LabelRobustScore:
    """One run's label-robust score, in the unit of its accuracies.

    Attributes:
        hlr: hard-label recovery ``full_hard − set_hard``.
        ior: improvement over random ``set_soft − random_soft``.
        alpha: ``w·IOR − (1 − w)·HLR``.
        lrs: ``normalized_score(alpha)``.
    """

    hlr: float
    ior: float
    alpha: float
    lrs: float


def label_robust_score(
    full_hard: float,
    set_hard: float,
    set_soft: float,
    random_soft: float,
    weight: float = 0.5,
    unit: Unit = "fraction",
) -> LabelRobustScore:
    """DD-Ranking's LRS of one run (``compute_metrics`` of ``LabelRobustScoreSoft``).

    Args:
        full_hard, set_hard, set_soft, random_soft: top-1 accuracies, all in ``unit``.
        weight: ``w`` (DD-Ranking's ``lrs_lambda``, 0.5).
        unit: ``"fraction"`` (α ∈ [−1, 1], LRS ∈ [0, 1]) or ``"percent"`` (DD-Ranking's code).
    """
    _checked(
        {"full_hard": full_hard, "set_hard": set_hard, "set_soft": set_soft,
         "random_soft": random_soft}, unit,
    )  # fmt: skip
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    hlr = full_hard - set_hard
    ior = set_soft - random_soft
    alpha = weight * ior - (1.0 - weight) * hlr
    return LabelRobustScore(hlr, ior, alpha, normalized_score(alpha))


def augmentation_robust_score(
    set_aug: float,
    random_aug: float,
    set_noaug: float,
    random_noaug: float,
    weight: float = 0.5,
    unit: Unit = "fraction",
) -> tuple[float, float]:
    """DD-Ranking's ARS of one run (``AugmentationRobustScore``): ``(β, normalized_score(β))``
    with ``β = γ·(set_aug − random_aug) + (1 − γ)·(set_noaug − random_noaug)``, ``γ = weight``;
    accuracies in ``unit``."""
    _checked(
        {"set_aug": set_aug, "random_aug": random_aug, "set_noaug": set_noaug,
         "random_noaug": random_noaug}, unit,
    )  # fmt: skip
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    beta = weight * (set_aug - random_aug) + (1.0 - weight) * (set_noaug - random_noaug)
    return beta, normalized_score(beta)


# --------------------------------------------------------------------------------------------
# The runs: delt eval under --protocol dd-ranking, and the full data


@dataclass
class DDRankingConfig:
    """Configuration of ``delt ddranking`` (one field per flag)."""

    distilled: str = option(
        help="folder of a distilled set; the evaluations and ddranking.json go there",
        identity=False,
    )
    teacher: str | None = option(
        None, help="teacher checkpoint (default: the one the set's manifest names)", identity=False
    )
    data_root: str | None = option(
        None, help="folder of the real dataset (default: the dataset's own)", identity=False
    )
    student: str | None = option(None, help="student architecture (default: the teacher's)")
    student_width: int | None = option(None, help="convnetD student width")
    seeds: tuple[int, ...] = option(
        (0, 1, 2, 3, 4), help="one evaluation run per seed (DD-Ranking's num_eval: 5)"
    )
    epochs: int | None = option(None, help="student epochs (default: the protocol's, 300)")
    lr_grid: tuple[str, ...] = option(
        tuple(map(str, LR_GRID)), help="LRs searched for the hard-label and random-real runs"
    )
    soft_lr: float | None = option(
        None, help="the set's soft-label LR (its method's); default: searched over --lr-grid"
    )
    weight: float = option(0.5, help="w of alpha = w IOR - (1 - w) HLR")
    ars: bool = option(
        True,
        help="also the augmentation-robust score: the set and random real images again with "
        "students that see no augmentation (`delt eval --no-augment`, LR searched)",
    )
    ars_weight: float = option(
        0.5, help="gamma of beta = gamma (with augmentation) + (1 - gamma) (without)"
    )
    full_data_epochs: int | None = option(
        None, help="epochs of the full-data student (`delt teacher`; default: --epochs)"
    )
    full_data_accuracy: float | None = option(
        None,
        help="the full data's hard-label top-1 (%%) measured elsewhere with the student's "
        "architecture; default: measured here by `delt teacher`",
    )
    amp: Literal["none", "bf16", "fp16"] = option("none", help="autocast of forward passes")
    device: str = option("auto", help="auto, cpu, cuda, ...", identity=False)
    progress: bool = option(True, help="show progress bars", identity=False)

    def __post_init__(self) -> None:
        check_int_fields(self, ("epochs", "student_width", "full_data_epochs"))
        self.seeds = tuple(self.seeds)
        if not self.seeds:
            raise ConfigError("--seeds needs at least one seed")
        grid = []
        for text in self.lr_grid:
            try:
                value = float(text)
            except ValueError:
                raise ConfigError(f"--lr-grid takes numbers, got {text!r}") from None
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"--lr-grid takes numbers > 0, got {text!r}")
            grid.append(value)
        if not grid:
            raise ConfigError("--lr-grid needs at least one LR")
        self.lr_grid = tuple(map(str, grid))
        if self.soft_lr is not None and not (math.isfinite(self.soft_lr) and self.soft_lr > 0):
            raise ConfigError(f"--soft-lr must be a number > 0, got {self.soft_lr}")
        if not 0 <= self.weight <= 1:
            raise ConfigError(f"--weight must be in [0, 1], got {self.weight}")
        if not 0 <= self.ars_weight <= 1:
            raise ConfigError(f"--ars-weight must be in [0, 1], got {self.ars_weight}")
        if self.full_data_accuracy is not None and not 0 <= self.full_data_accuracy <= 100:
            raise ConfigError(
                f"--full-data-accuracy is a top-1 in percent, 0-100, got {self.full_data_accuracy}"
            )

    @property
    def grid(self) -> tuple[float, ...]:
        return tuple(float(text) for text in self.lr_grid)

    def eval_config(self, kind: str, lr: float) -> EvalConfig:
        """The ``delt eval`` run of ``kind`` (``set-hard``, ``set-soft``, ``random-soft``, and
        ARS's ``set-soft-noaug``, ``random-soft-noaug``) at ``lr`` under ``--protocol
        dd-ranking``; its results file ``DISTILLED/eval-ddranking-<kind>-lr<lr>.json``."""
        if kind not in EVAL_KINDS:
            raise ValueError(f"kind must be one of {', '.join(EVAL_KINDS)}, got {kind!r}")
        return EvalConfig(
            distilled=self.distilled, teacher=self.teacher, data_root=self.data_root,
            student=self.student, student_width=self.student_width, protocol="dd-ranking",
            epochs=self.epochs, seeds=self.seeds, lr=lr, hard_labels=kind == "set-hard",
            random_real=kind.startswith("random"), augment=not kind.endswith("-noaug"),
            amp=self.amp,
            out=str(Path(self.distilled) / f"eval-ddranking-{kind}-lr{lr:g}.json"),
            device=self.device, progress=self.progress,
        )  # fmt: skip


@dataclass
class LRSearch:
    """A searched accuracy: per seed the best top-1 (%) over the LRs, and the LR that gave it."""

    best: dict[int, float]
    best_lr: dict[int, float]
    files: dict[str, str]  # LR -> its eval.json


def lr_search(configs: Sequence[EvalConfig]) -> LRSearch:
    """Runs (or reuses) ``delt eval`` for each config (one per LR, the same seeds) and keeps,
    seed by seed, the best-epoch accuracy of the best LR (DD-Ranking's search, per run)."""
    best: dict[int, float] = {}
    best_lr: dict[int, float] = {}
    files: dict[str, str] = {}
    for config in configs:
        result: EvalResult = evaluate(config)
        files[f"{config.lr:g}"] = str(result.path)
        for seed in result.seeds:
            if seed.seed not in best or seed.best_accuracy > best[seed.seed]:
                best[seed.seed] = seed.best_accuracy
                best_lr[seed.seed] = config.lr
    return LRSearch(best, best_lr, files)


@dataclass
class DDRankingResult:
    """What ``delt ddranking`` reports; ``document`` is ``DISTILLED/ddranking.json``."""

    path: Path
    lrs_mean: float
    lrs_std: float
    document: dict


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std())}


# DD-Ranking's full-data hard-label training (ddranking/metrics/soft_label.py,
# _compute_hard_label_metrics with mode='real'; ddranking/utils/train_and_eval.py,
# REAL_DATA_TRAINING_CONFIG's ConvNet-3 entries, the ones of its 32 px datasets): SGD with plain
# momentum 0.9 and weight decay 5e-4 on every parameter, LR 0.01 divided by 10 every 100 epochs
# (StepLR), cross-entropy without label smoothing, the training split without augmentation
# (use_aug_for_hard false: ToTensor + Normalize), for the evaluation's epochs (num_epochs),
# tested every 20 epochs, the best test kept; batch: real_batch_size of its soft-label configs.
FULL_DATA_RECIPE = {
    "lr": 0.01,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 5e-4,
    "decay_all": True,
    "lr_schedule": "step",
    "lr_step_epochs": 100,
    "label_smoothing": 0.0,
    "augment": "none",
    "batch_size": 1024,
}
FULL_DATA_TEST_EVERY = 20


def _full_data_accuracy(config: DDRankingConfig, evaluation: dict) -> tuple[float, dict]:
    """The full training data's hard-label top-1 (%) of the student's architecture: measured by
    ``delt teacher`` with DD-Ranking's recipe (:data:`FULL_DATA_RECIPE`; seed: the first of
    --seeds) in ``DISTILLED/ddranking-full-data/``, tested every 20 epochs (its checkpoints) and
    at the end, the best kept."""
    if config.full_data_accuracy is not None:
        return config.full_data_accuracy, {"given": True}
    student = evaluation["config"]["student"]
    kwargs = evaluation["config"]["student_kwargs"] or {}
    epochs = config.full_data_epochs or evaluation["config"]["epochs"]
    dataset = evaluation["dataset"]
    if dataset.split(":")[0] == "imagefolder":
        raise ConfigError(
            f"delt ddranking: {dataset}: the full-data student of an imagefolder dataset needs "
            "its class order; train it with `delt teacher --arch STUDENT` and pass its test "
            "accuracy as --full-data-accuracy"
        )
    tests = tuple(range(FULL_DATA_TEST_EVERY, epochs + 1, FULL_DATA_TEST_EVERY))
    amp = "bf16" if config.amp == "bf16" else "none"  # delt teacher has no fp16
    teacher_config = TeacherConfig(
        out=str(Path(config.distilled) / "ddranking-full-data"), dataset=dataset,
        data_root=config.data_root, arch=student, width=kwargs.get("width"), epochs=epochs,
        seed=config.seeds[0], amp=amp, save_epochs=tests or None, device=config.device,
        progress=config.progress, **FULL_DATA_RECIPE,
    )  # fmt: skip
    try:
        result = train_teacher(teacher_config)
    except (ConfigError, ValueError) as error:
        raise ConfigError(
            f"delt ddranking: the full data's accuracy could not be measured ({error}); "
            "pass --full-data-accuracy"
        ) from None
    if result.test_accuracy is None:
        raise ConfigError("delt ddranking: the full-data student has no test accuracy")
    meta = read_sidecar(result.path) or {}
    tested = {int(c["epoch"]): float(c["test_accuracy"]) for c in meta.get("checkpoints", [])}
    tested[epochs] = float(result.test_accuracy)
    best_epoch = max(tested, key=lambda epoch: (tested[epoch], -epoch))
    return tested[best_epoch], {
        "given": False,
        "teacher": str(result.path),
        "arch": student,
        "arch_kwargs": kwargs,
        "epochs": epochs,
        "tests": {str(epoch): tested[epoch] for epoch in sorted(tested)},
        "best_epoch": best_epoch,
        "final_accuracy_percent": float(result.test_accuracy),
        "recipe": {**FULL_DATA_RECIPE, "test_every": FULL_DATA_TEST_EVERY, "amp": amp},
        "recipe_source": "DD-Ranking's full-data hard-label training (soft_label.py, mode "
        "'real'; REAL_DATA_TRAINING_CONFIG, ConvNet-3 entries); differences: docs/protocols.md",
    }


def run_ddranking(config: DDRankingConfig) -> DDRankingResult:
    """DD-Ranking's LRS of a set, each accuracy measured here (per seed: a run).

    ``set_hard`` and ``random_soft`` search the LR over ``--lr-grid``; ``set_soft`` too unless
    ``--soft-lr``; ``full_hard`` is one ``delt teacher`` run on the full data with the student's
    architecture and the protocol's epochs, shared by every run. Every evaluation is cached by
    ``delt eval`` (rerunning trains nothing). Writes ``DISTILLED/ddranking.json``.
    """
    if config.full_data_accuracy is None and world().size > 1:
        # delt teacher runs on rank 0 alone (hours); the other ranks cannot wait for it here.
        raise ConfigError(
            "delt ddranking under torchrun: measure the full data first (`delt teacher --arch "
            "STUDENT` on the full data) and pass its test accuracy as --full-data-accuracy"
        )
    set_hard = lr_search([config.eval_config("set-hard", lr) for lr in config.grid])
    soft_grid = config.grid if config.soft_lr is None else (config.soft_lr,)
    set_soft = lr_search([config.eval_config("set-soft", lr) for lr in soft_grid])
    random_soft = lr_search([config.eval_config("random-soft", lr) for lr in config.grid])
    noaug: dict[str, LRSearch] = {}
    if config.ars:
        # DD-Ranking's ARS: the same runs with students that see no augmentation; the set's LR
        # as for set_soft (its own, else searched), random real images' searched.
        noaug["set_soft_noaug"] = lr_search(
            [config.eval_config("set-soft-noaug", lr) for lr in soft_grid]
        )
        noaug["random_soft_noaug"] = lr_search(
            [config.eval_config("random-soft-noaug", lr) for lr in config.grid]
        )
    evaluation = read_json(Path(next(iter(set_soft.files.values()))))
    full_hard, full_record = _full_data_accuracy(config, evaluation)

    runs = []
    for seed in config.seeds:
        accuracies = {
            "full_hard": full_hard,
            "set_hard": set_hard.best[seed],
            "set_soft": set_soft.best[seed],
            "random_soft": random_soft.best[seed],
        }
        fraction = label_robust_score(
            **{k: v / 100.0 for k, v in accuracies.items()}, weight=config.weight
        )
        percent = label_robust_score(**accuracies, weight=config.weight, unit="percent")
        run = {
            "seed": seed,
            "accuracy_percent": accuracies,
            "lr": {
                "set_hard": set_hard.best_lr[seed],
                "set_soft": set_soft.best_lr[seed],
                "random_soft": random_soft.best_lr[seed],
            },
            "fraction": asdict(fraction),
            "percent_convention": asdict(percent),
        }
        if config.ars:
            for name, search in noaug.items():
                accuracies[name] = search.best[seed]
                run["lr"][name] = search.best_lr[seed]
            order = ("set_soft", "random_soft", "set_soft_noaug", "random_soft_noaug")
            conventions = (("fraction", "fraction", 100.0), ("percent", "percent_convention", 1.0))
            for unit, key, scale in conventions:
                beta, ars = augmentation_robust_score(
                    *(accuracies[name] / scale for name in order), weight=config.ars_weight,
                    unit=unit,
                )  # fmt: skip
                run[key].update(beta=beta, ars=ars)
        runs.append(run)
    keys = ("hlr", "ior", "alpha", "lrs") + (("beta", "ars") if config.ars else ())
    summary = {
        unit: {key: _mean_std([run[unit][key] for run in runs]) for key in keys}
        for unit in ("fraction", "percent_convention")
    }
    document = {
        "format": DDRANKING_FORMAT,
        "distilled": config.distilled,
        "weight": config.weight,
        "seeds": list(config.seeds),
        "lr_grid": list(config.grid),
        "soft_lr": config.soft_lr,
        "protocol": evaluation["protocol"],
        "full_data": {"accuracy_percent": full_hard, **full_record},
        "ars_weight": config.ars_weight if config.ars else None,
        "evaluations": {
            "set_hard": set_hard.files,
            "set_soft": set_soft.files,
            "random_soft": random_soft.files,
            **{name: search.files for name, search in noaug.items()},
        },
        "runs": runs,
        "summary": summary,
        "lrs_mean": summary["fraction"]["lrs"]["mean"],
        "lrs_std": summary["fraction"]["lrs"]["std"],
        "ars_mean": summary["fraction"]["ars"]["mean"] if config.ars else None,
        "ars_std": summary["fraction"]["ars"]["std"] if config.ars else None,
        "not_computed": [] if config.ars else ["ARS (--no-ars)"],
        "versions": versions(),
    }
    path = Path(config.distilled) / "ddranking.json"
    if is_main():
        write_json(path, document)
    barrier()
    logger.info(
        "ddranking: LRS %.4f%s (fractions) -> %s", document["lrs_mean"],
        "" if not config.ars else f", ARS {document['ars_mean']:.4f}", path,
    )  # fmt: skip
    return DDRankingResult(path, document["lrs_mean"], document["lrs_std"], document)
