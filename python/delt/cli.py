"""The ``delt`` command line (also ``python -m delt``): one :data:`COMMANDS` entry per subcommand.

Each subcommand's flags are generated from its config dataclass (:mod:`delt.config`); bad input
is reported as ``delt <command>: error: <message naming the flag>`` with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from delt.config import ConfigError, add_arguments, from_namespace
from delt.data import DataMismatchError, DatasetNotFoundError
from delt.demo import DemoConfig, run_demo
from delt.distill import DistillConfig, distill
from delt.distributed import is_main, session
from delt.diversity import DiversityConfig, measure_diversity
from delt.evaluate import EvalConfig, evaluate
from delt.recover import RecoverConfig, recover
from delt.report import ReportConfig, compare_runs
from delt.select import SelectConfig, select_images
from delt.stagewise import evaluate_stagewise
from delt.teacher import TeacherConfig, train_teacher

__all__ = ["COMMANDS", "build_parser", "main"]


@dataclass(frozen=True)
class Command:
    """A subcommand: its help, its config dataclass, what it runs and what it then prints."""

    help: str
    config: type
    run: Callable[[Any], Any]
    show: Callable[[Any, Any], None] = lambda config, result: None


def _show_teacher(config: TeacherConfig, result) -> None:
    print(f"teacher: {result.path} (test accuracy {result.test_accuracy:.2f}%)")


def _show_recover(config: RecoverConfig, result) -> None:
    print(
        f"recover: {len(result.labels)} images, "
        f"{sum(result.iterations_per_image)} image-iterations, "
        f"{result.synthesis_seconds:.1f} s of optimization -> {result.out}"
    )


def _run_eval(config: EvalConfig):
    return (evaluate_stagewise if config.stagewise else evaluate)(config)


def _show_eval(config: EvalConfig, result) -> None:
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


def _show_diversity(config: DiversityConfig, result) -> None:
    print(
        f"diversity: {result.mean:.4f} ± {result.std:.4f} (mean cosine to the class centroid; "
        f"lower = more diverse) -> {result.path}"
    )


COMMANDS: dict[str, Command] = {
    "teacher": Command("train a teacher on real data", TeacherConfig, train_teacher, _show_teacher),
    "select": Command(
        "rank real images with the teacher and pick IPC per class", SelectConfig, select_images
    ),
    # --method pdd: recover() hands it to delt.pdd.recover_progressive.
    "recover": Command(
        "synthesize a distilled set (sre2l, cda, delt; pdd: in stages)",
        RecoverConfig,
        recover,
        _show_recover,
    ),
    "eval": Command(
        "train students on a distilled set with teacher soft labels; test them (eval.json)",
        EvalConfig,
        _run_eval,
        _show_eval,
    ),
    "diversity": Command(
        "DELT's diversity: per-class cosine of features to the class centroid (diversity.json)",
        DiversityConfig,
        measure_diversity,
        _show_diversity,
    ),
    "distill": Command(
        "teacher, select, recover, eval, diversity in one cached run (report.json/.md, grid)",
        DistillConfig,
        distill,
    ),
    "report": Command(
        "bar chart and table comparing methods over distill runs", ReportConfig, compare_runs
    ),
    "demo": Command(
        "Fashion-MNIST end to end: DELT and random real images through `delt distill`",
        DemoConfig,
        run_demo,
    ),
}

# Errors caused by the user's input: reported in one line, not as a traceback.
USER_ERRORS = (
    ConfigError,
    DatasetNotFoundError,
    DataMismatchError,
    FileNotFoundError,
    ValueError,
)


def _output_folder(config: Any) -> Path | None:
    """Where a command's rank logs go under torchrun: its output folder, or the folder of its
    results file (eval, diversity, report)."""
    if isinstance(config, EvalConfig):
        return config.results_path.parent
    out = getattr(config, "out", None)
    if out is None:
        distilled = getattr(config, "distilled", None)
        return None if distilled is None else Path(distilled)
    return Path(out).parent if Path(out).suffix else Path(out)


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
        add_arguments(sub, command.config)
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
        config = from_namespace(command.config, args)
        # Under torchrun: one rank of the job (delt.distributed); otherwise a no-op.
        with session(getattr(config, "device", "auto"), _output_folder(config)):
            if not is_main() and getattr(config, "progress", False):
                config = dataclasses.replace(config, progress=False)  # rank 0's bars only
            result = command.run(config)
            if is_main():
                command.show(config, result)
    except USER_ERRORS as error:
        print(f"delt {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
