"""The ``delt`` command line (also ``python -m delt``): one :data:`COMMANDS` entry per subcommand.

Each subcommand's flags are generated from its config dataclass (:mod:`delt.config`); two global
flags come before the subcommand: ``-v`` (debug logging and tracebacks) and ``--threads``
(torch's CPU threads, fixed so that results do not depend on the machine's load).

Every failure is one line, ``delt <command>: error: <message>``: exit status 2 for bad input
(flags, files: naming the flag or file and what was expected), 1 for what the machine refused
(a full disk, read-only media, memory) or an internal error. ``-v`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from delt.bench import SynthesisBenchConfig, run_synthesis_bench
from delt.bench_eval import EvalBenchConfig, run_eval_bench
from delt.compare import CompareConfig, run_compare
from delt.config import ConfigError, add_arguments, from_namespace
from delt.data import DataMismatchError, DatasetNotFoundError
from delt.ddranking import DDRankingConfig, run_ddranking
from delt.demo import DemoConfig, run_demo
from delt.distributed import alone, is_main, session, torchrun_environment
from delt.diversity import DiversityConfig, measure_diversity
from delt.evaluate import EvalConfig, evaluate
from delt.fkd_labels import ImportLabelsConfig, import_fkd_labels
from delt.import_released import ImportConfig, import_images
from delt.io import FileFormatError, WriteError
from delt.lock import output_lock
from delt.pipeline import DistillConfig, distill
from delt.recover import RecoverConfig, recover
from delt.relabel import RelabelConfig, relabel
from delt.report import ReportConfig, compare_runs
from delt.runtime import DEFAULT_THREADS, ResourceError, logger
from delt.select import SelectConfig, select_images
from delt.stagewise import evaluate_stagewise
from delt.stats import StatsConfig, collect_statistics
from delt.teacher import TeacherConfig, train_teacher

__all__ = ["COMMANDS", "build_parser", "main"]


@dataclass(frozen=True)
class Command:
    """A subcommand: its help, its config dataclass, what it runs and what it then prints; or,
    with ``subcommands`` (``delt bench synthesis``), a group whose parts are commands."""

    help: str
    config: type | None
    run: Callable[[Any], Any] | None
    show: Callable[[Any, Any], None] = lambda config, result: None
    subcommands: dict[str, Command] | None = None
    # Under torchrun: rank 0 alone runs it (one output, written once); the others leave.
    main_rank_only: bool = False


def _show_teacher(config: TeacherConfig, result) -> None:
    accuracy = (
        "test accuracy not measured (--measure)"
        if result.test_accuracy is None
        else f"test accuracy {result.test_accuracy:.2f}%"
    )
    source = f"imported from {result.source}, " if result.source else ""
    print(f"teacher: {result.path} ({source}{accuracy})")


def _show_import(config: ImportConfig, result) -> None:
    for entry in result.mapping:
        print(
            f"import: {entry['folder']} -> class {entry['class']} ({entry['name']}, by "
            f"{entry['by']}): {entry['images']} images"
        )
    print(
        f"import: {result.num_images} images of {len(result.mapping)} classes -> {result.out}"
        f"{' (already there)' if result.reused else ''}"
    )


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


def _show_ddranking(config: DDRankingConfig, result) -> None:
    summary = result.document["summary"]
    for unit, label in (("fraction", "fractions"), ("percent_convention", "DD-Ranking's %")):
        parts = ", ".join(
            f"{key.upper()} {summary[unit][key]['mean']:.4f} ± {summary[unit][key]['std']:.4f}"
            for key in ("hlr", "ior", "lrs", "ars")
            if key in summary[unit]
        )
        print(f"ddranking: {parts} (accuracies as {label})")
    print(f"ddranking: LRS {result.lrs_mean:.4f} ± {result.lrs_std:.4f} -> {result.path}")


def _show_relabel(config: RelabelConfig, result) -> None:
    state = "already there" if result.reused else f"{result.epochs_labelled} epochs labelled"
    print(f"relabel: {result.path} ({result.size} bytes; {state})")


def _show_import_labels(config: ImportLabelsConfig, result) -> None:
    state = "already there" if result.reused else f"{result.epochs} epochs imported"
    print(
        f"import-labels: {result.path} ({result.size} bytes; {state}; batches of "
        f"{result.batch_size}, {result.mix}; largest logit = sampled image's class in "
        f"{100 * result.agreement:.1f}% of rows)"
    )


def _show_diversity(config: DiversityConfig, result) -> None:
    print(
        f"diversity: {result.mean:.4f} ± {result.std:.4f} (mean cosine to the class centroid; "
        f"lower = more diverse) -> {result.path}"
    )


def _show_compare(config, result) -> None:
    print(result.markdown, end="")
    print(f"compare: {result.out / 'compare.json'}, compare.md, compare.png")


COMMANDS: dict[str, Command] = {
    "teacher": Command(
        "train a teacher on real data",
        TeacherConfig,
        train_teacher,
        _show_teacher,
        main_rank_only=True,
    ),
    "select": Command(
        "rank real images with the teacher and pick IPC per class", SelectConfig, select_images
    ),
    "stats": Command(
        "per-class and global BN statistics of the teacher over its training set (--match class)",
        StatsConfig,
        collect_statistics,
        lambda config, result: print(
            f"stats: {len(result.layer_names)} BN layers, {result.num_classes} classes, "
            f"{int(result.class_images.sum())} images -> {result.path}"
        ),
    ),
    # recover() looks the method up (delt.method); pdd, rded: delt.methods.
    "recover": Command(
        "synthesize a distilled set (sre2l, cda, delt; pdd: in stages; rded: scored real crops)",
        RecoverConfig,
        recover,
        _show_recover,
    ),
    "import": Command(
        "turn a released set (class folders of PNG/JPEG images) into a distilled set",
        ImportConfig,
        import_images,
        _show_import,
    ),
    "eval": Command(
        "train students on a distilled set with teacher soft labels; test them (eval.json)",
        EvalConfig,
        _run_eval,
        _show_eval,
    ),
    "ddranking": Command(
        "DD-Ranking's HLR, IOR, LRS and ARS of a set (fractions; ddranking.json)",
        DDRankingConfig,
        run_ddranking,
        _show_ddranking,
    ),
    "relabel": Command(
        "store a teacher's soft labels on every batch of a delt eval seed (delt eval --labels)",
        RelabelConfig,
        relabel,
        _show_relabel,
    ),
    "import-labels": Command(
        "turn an FKD relabel folder (SRe2L/CDA soft labels) into a store for delt eval --labels",
        ImportLabelsConfig,
        import_fkd_labels,
        _show_import_labels,
        main_rank_only=True,
    ),
    "diversity": Command(
        "DELT's diversity: per-class cosine of features to the class centroid (diversity.json)",
        DiversityConfig,
        measure_diversity,
        _show_diversity,
        main_rank_only=True,
    ),
    "distill": Command(
        "teacher, select, recover, eval, diversity in one cached run (report.json/.md, grid)",
        DistillConfig,
        distill,
    ),
    "report": Command(
        "bar chart and table comparing methods over distill runs",
        ReportConfig,
        compare_runs,
        main_rank_only=True,
    ),
    "compare": Command(
        "sets against random real images (and their starting images), paired by seed, per "
        "student budget (compare.json/.md/.png)",
        CompareConfig,
        run_compare,
        _show_compare,
    ),
    "bench": Command(
        "throughput benchmarks",
        None,
        None,
        subcommands={
            "synthesis": Command(
                "one recovery chunk: the papers' eager loop, the teacher alone, delt's loop",
                SynthesisBenchConfig,
                run_synthesis_bench,
            ),
            "eval": Command(
                "one student epoch and one test pass: main's loop, the models alone, delt's",
                EvalBenchConfig,
                run_eval_bench,
            ),
        },
    ),
    "demo": Command(
        "Fashion-MNIST end to end: DELT and random real images through `delt distill`",
        DemoConfig,
        run_demo,
    ),
}

# Errors caused by the user's input: reported in one line, not as a traceback (status 2).
USER_ERRORS = (
    ConfigError,
    DatasetNotFoundError,
    DataMismatchError,
    FileFormatError,
    FileNotFoundError,
    ValueError,
)


def _output_folder(config: object) -> Path | None:
    """Where a command's rank logs go under torchrun: its output folder, or the folder of its
    results file (eval, diversity, report)."""
    if isinstance(config, EvalConfig):
        return config.results_path.parent
    if isinstance(config, RelabelConfig):
        return config.out_path.parent
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
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging; tracebacks of errors"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        dest="global_threads",
        metavar="N",
        help="torch CPU threads of the command (default: %(default)s, whatever the machine's "
        "load; results can differ in the last bits between thread counts; recorded in every "
        "output's versions). `delt demo` and `delt bench synthesis|eval` have their own --threads",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        if command.subcommands is None:
            add_arguments(sub, command.config)
            continue
        parts = sub.add_subparsers(dest="subcommand", required=True, metavar="SUITE")
        for part_name, part in command.subcommands.items():
            part_parser = parts.add_parser(part_name, help=part.help, description=part.help)
            add_arguments(part_parser, part.config)
    return parser


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _out_of_memory(error: BaseException) -> bool:
    # torch's CPU allocator raises a plain RuntimeError; CUDA's an OutOfMemoryError.
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and "not enough memory" in str(error)
    )


def error_line(error: BaseException, verbose: bool = False) -> tuple[str, int]:
    """The one-line message (after ``delt <command>: error:``) and exit status of ``error``."""
    if isinstance(error, USER_ERRORS):
        if isinstance(error, OSError) and error.filename and error.strerror:
            return f"{error.filename}: {error.strerror}", 2
        return _one_line(error), 2
    if isinstance(error, (WriteError, ResourceError)):
        return _one_line(error), 1
    if _out_of_memory(error):
        return (
            f"out of memory ({_one_line(error)[:200]}); use smaller sizes (--batch-size, "
            "--resolution, --ipc)",
            1,
        )
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror or _one_line(error)}", 1
    hint = "" if verbose else " (run `delt -v ...` for the traceback)"
    return f"internal error: {type(error).__name__}: {_one_line(error)}{hint}", 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``delt`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.global_threads < 1:
        parser.error(f"argument --threads: must be an integer >= 1, got {args.global_threads}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    command, name = COMMANDS[args.command], args.command
    if command.subcommands is not None:
        command, name = command.subcommands[args.subcommand], f"{name} {args.subcommand}"
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.global_threads)
    try:
        config = from_namespace(command.config, args)
        # Under torchrun: one rank of the job (delt.distributed), rank 0 holding the output
        # folder's lock for the whole job (the ranks share it); otherwise a no-op.
        folder = _output_folder(config)
        locking = not isinstance(config, ReportConfig)  # report writes a file, not a folder
        under_torchrun = torchrun_environment() is not None
        lock = output_lock if under_torchrun and locking and folder is not None else None
        with session(getattr(config, "device", "auto"), folder, lock=lock) as job:
            if command.main_rank_only and not is_main():
                # Nothing to share out: rank 0 makes the one output. The others leave now rather
                # than wait at a barrier, whose timeout would bound rank 0's time (a teacher
                # trains for hours); torchrun ends the job when rank 0 ends, failed if it fails.
                logger.info(
                    "delt %s runs on rank 0 alone; rank %d of %d has nothing to do", name,
                    job.rank, job.size,
                )  # fmt: skip
                return 0
            if not is_main() and getattr(config, "progress", False):
                config = dataclasses.replace(config, progress=False)  # rank 0's bars only
            # A command rank 0 runs alone: its collectives (a sweep's barrier) must not wait
            # for the ranks that left above.
            with alone() if command.main_rank_only else contextlib.nullcontext():
                result = command.run(config)
            if is_main():
                command.show(config, result)
    except KeyboardInterrupt:
        if args.verbose:
            traceback.print_exc()
        print(f"delt {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.verbose:
            traceback.print_exc()
        message, status = error_line(error, args.verbose)
        print(f"delt {name}: error: {message}", file=sys.stderr)
        return status
    finally:
        torch.set_num_threads(threads_before)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
