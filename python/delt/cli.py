"""The ``delt`` command line (also ``python -m delt``): ``delt teacher|select|recover`` (the
steps), ``delt eval|diversity`` (what a distilled set is worth), ``delt distill`` (all of them,
cached), ``delt report`` (a chart over runs) and ``delt demo``.

Each subcommand's flags are generated from its config dataclass (:mod:`delt.config`), so
``delt recover --batch-size 50`` is ``RecoverConfig(batch_size=50)``. Bad input is reported as
``delt <command>: error: <message naming the flag>`` with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from delt.config import ConfigError, add_arguments, from_namespace
from delt.data import DatasetNotFoundError
from delt.models import TeacherMismatchError

__all__ = ["main"]


@dataclass(frozen=True)
class Command:
    help: str
    config: Callable[[], type]
    run: Callable[[Any], object]


def _teacher_config():
    from delt.teacher import TeacherConfig

    return TeacherConfig


def _run_teacher(config) -> object:
    from delt.teacher import train_teacher

    result = train_teacher(config)
    print(f"teacher: {result.path} (test accuracy {result.test_accuracy:.2f}%)")
    return result


def _select_config():
    from delt.select import SelectConfig

    return SelectConfig


def _run_select(config) -> object:
    from delt.select import select_images

    return select_images(config)


def _recover_config():
    from delt.recover import RecoverConfig

    return RecoverConfig


def _run_recover(config) -> object:
    from delt.recover import recover

    result = recover(config)
    print(
        f"recover: {len(result.labels)} images, "
        f"{sum(result.iterations_per_image)} image-iterations, "
        f"{result.wall_seconds:.1f} s of optimization -> {result.out}"
    )
    return result


def _eval_config():
    from delt.evaluate import EvalConfig

    return EvalConfig


def _run_eval(config) -> object:
    from delt.evaluate import evaluate

    result = evaluate(config)
    kind = "stage-wise " if config.stagewise else ""
    for seed in result.seeds:
        print(
            f"eval: {kind}seed {seed.seed}: best {seed.best_accuracy:.2f}% (epoch "
            f"{seed.best_epoch}), final {seed.final_accuracy:.2f}%"
        )
    print(
        f"eval: {kind}best top-1 {result.accuracy_mean:.2f} ± {result.accuracy_std:.2f}%, final "
        f"{result.final_mean:.2f} ± {result.final_std:.2f}% over {len(result.seeds)} seed(s)"
        f"{' (cached)' if result.reused else ''} -> {result.path}"
    )
    if config.stagewise:
        plain = result.document["plain"]
        print(
            f"eval: plain (the final set, same epochs) best top-1 {plain['best']['mean']:.2f} ± "
            f"{plain['best']['std']:.2f}%, final {plain['final']['mean']:.2f} ± "
            f"{plain['final']['std']:.2f}%"
        )
    return result


def _diversity_config():
    from delt.diversity import DiversityConfig

    return DiversityConfig


def _run_diversity(config) -> object:
    from delt.diversity import measure_diversity

    result = measure_diversity(config)
    print(
        f"diversity: {result.mean:.4f} ± {result.std:.4f} (mean cosine to the class centroid; "
        f"lower = more diverse) -> {result.path}"
    )
    return result


def _distill_config():
    from delt.distill import DistillConfig

    return DistillConfig


def _run_distill(config) -> object:
    from delt.distill import distill

    return distill(config)


def _report_config():
    from delt.report import ReportConfig

    return ReportConfig


def _run_report(config) -> object:
    from delt.report import compare_runs

    return compare_runs(config)


def _demo_config():
    from delt.demo import DemoConfig

    return DemoConfig


def _run_demo(config) -> object:
    from delt.demo import run_demo

    return run_demo(config)


COMMANDS: dict[str, Command] = {
    "teacher": Command("train a teacher on real data", _teacher_config, _run_teacher),
    "select": Command(
        "rank real images with the teacher and pick IPC per class", _select_config, _run_select
    ),
    "recover": Command(
        "synthesize a distilled set (sre2l, cda, delt; pdd: in stages)",
        _recover_config,
        _run_recover,
    ),
    "eval": Command(
        "train students on a distilled set with teacher soft labels; test them (eval.json)",
        _eval_config,
        _run_eval,
    ),
    "diversity": Command(
        "DELT's diversity: per-class cosine of features to the class centroid (diversity.json)",
        _diversity_config,
        _run_diversity,
    ),
    "distill": Command(
        "teacher, select, recover, eval, diversity in one cached run (report.json/.md, grid)",
        _distill_config,
        _run_distill,
    ),
    "report": Command(
        "bar chart and table comparing methods over distill runs", _report_config, _run_report
    ),
    "demo": Command(
        "Fashion-MNIST end to end: DELT and random real images through `delt distill`",
        _demo_config,
        _run_demo,
    ),
}

# Errors caused by the user's input: reported in one line, not as a traceback.
USER_ERRORS = (
    ConfigError,
    DatasetNotFoundError,
    TeacherMismatchError,
    FileNotFoundError,
    ValueError,
)


def build_parser() -> argparse.ArgumentParser:
    from delt_ext import __version__

    parser = argparse.ArgumentParser(
        prog="delt", description="Dataset distillation: DELT, CDA, SRe2L."
    )
    parser.add_argument("--version", action="version", version=f"delt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        add_arguments(sub, command.config())
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``delt`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    command = COMMANDS[args.command]
    try:
        config = from_namespace(command.config(), args)
        command.run(config)
    except USER_ERRORS as error:
        print(f"delt {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
