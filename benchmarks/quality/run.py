"""Quality benchmark: random-real, RDED, SRe2L, CDA, DELT and PDD on Fashion-MNIST.

One ConvNet-3 teacher (trained once, ``OUT/teacher``, or an existing checkpoint, ``--teacher``)
synthesizes for every method and labels every student; the students are ConvNet-3s of the same
width, trained by ``delt eval``'s protocol (DELT's, Shen et al. 2025). Every (method, IPC, seed)
is one ``delt distill`` run in ``OUT/<method>/ipc<IPC>/seed<seed>``: synthesis seed and evaluation
seed are the same number, so the spread over seeds covers both. ``--synthesis once`` instead
synthesizes once per (method, IPC) with seed 0 and evaluates that set with every seed
(``OUT/<method>/ipc<IPC>/once``). Every run's configuration is checked before any work.

A method that optimizes pixels may carry its own recovery step size, ``delt-lr0.05``
(``delt distill --recover-lr 0.05``, into ``OUT/delt-lr0.05``), and RDED its own tiling,
``rded-factor1`` (``--factor 1``): a variant, pooled apart. PDD's variants are those of
benchmarks/pdd/run.py, each ``delt distill --method pdd`` with 5 stages of IPC/5 images per class
over a DELT base, its per-stage MI/RI chosen so that its image-iterations match DELT's at the
run's MI/RI (:func:`delt.schedules.pdd_matched_iterations`): ``pdd`` (only freezing),
``pdd+ckpt`` (``--stage-teachers checkpoints``: the teacher is trained with 5 checkpoints evenly
spaced over its epochs), ``pdd+union`` (``--union-in-batch --union-sample`` IPC/5 x 10),
``pdd+hard`` (``--stage-init hard --hard-student-epochs 30``) and ``pdd+all``, each into
``OUT/<variant>``.

Resumable: ``delt distill`` caches each step (teacher, selection, recovery chunks, each
evaluation seed, diversity), so a killed run picks up where it stopped; finished runs cost
nothing. Each finished run appends a line to ``OUT/progress.jsonl``; at the end the pooled
table goes to ``OUT/results.md`` / ``results.json`` and the chart to ``OUT/results.png``, with
every method's gain over random-real paired by seed (the same seed's random-real run; the pooling
and pairing are :mod:`delt.comparison`'s, this script composes the runs and names them), charted
with each method's synthesis seconds and image-iterations in ``OUT/results-gains.png``.
``--report-only`` writes those files from whichever of the named runs have finished, running
nothing (several commands can share one OUT, one per method or seed, then one report); a run
whose folder is gone but whose line is in ``OUT/progress.jsonl`` is reported from that line
(its other evaluations, which lived in the folder, are not). Other
evaluations of a run's set written beside its ``eval.json`` as ``RUN/distilled/eval-NAME.json``
(``delt eval --out``: another student, a shorter student budget, ShufflePatches; ``--students``
writes ``eval-STUDENT.json``) get their own table, pooled by NAME and paired with random-real's
evaluation of the same NAME; the files of one NAME at one IPC must share their training protocol
(student and width, epochs, augmentation, loss, optimizer, batch size), or the report stops.

    nohup python benchmarks/quality/run.py --out runs/quality > runs/quality.log 2>&1 &

Two budgets (``--budget``): ``short`` (the default, the committed short-budget table: IPC 1, 10,
50; MI 400, RI 50; 100 student epochs tested every 50) and ``paper`` (the papers' budget: IPC 10
and 50; MI 4000, RI 500; 300 student epochs tested every 10; RDED added; every set also
evaluated with a ResNet-18-small and a ConvNet-4 student, in ``results.md``'s table of other
evaluations). A flag given on the command line overrides its budget's value.

    nohup python benchmarks/quality/run.py --budget paper > runs/quality-paper.log 2>&1 &

Options are listed by ``--help``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # delt is imported when needed: --help answers without torch
    from delt.compare import CompareConfig
    from delt.comparison import RunRecord
    from delt.pipeline import DistillConfig

METHODS = ("random-real", "rded", "sre2l", "cda", "delt")
# PDD's variants (benchmarks/pdd/run.py's names): `delt distill --method pdd` flags of each;
# --union-sample, which depends on the IPC, is set per run (method_settings).
PDD_STAGES = 5
PDD_OPTIONS = {
    "pdd+ckpt": {"stage_teachers": "checkpoints"},
    "pdd+union": {"union_in_batch": True},
    "pdd+hard": {"stage_init": "hard", "hard_student_epochs": 30},
}
PDD_VARIANTS = {
    "pdd": {},
    **PDD_OPTIONS,
    "pdd+all": {key: value for options in PDD_OPTIONS.values() for key, value in options.items()},
}
# Per-class BN matching (docs/stats.md): `delt distill --match` flags of each variant, with the
# statistics of --stats (default: each run makes its own OUT/<run>/stats.pt).
MATCH_VARIANTS = {
    # WMDD-style (Liu et al., ICCV 2025): each class's images against its class statistics.
    "sre2l+class": ("sre2l", {"match": "class"}),
    # EDC-style (Shao et al., NeurIPS 2024): half global, half the batch's classes' mean.
    "cda+class-mean": ("cda", {"match": "class-mean", "match_class_weight": 0.5}),
}
CLASSES = 10  # Fashion-MNIST

# Each budget's values of the flags left unset on the command line.
BUDGETS = {
    "short": dict(
        out="runs/quality", ipcs="1,10,50", methods="random-real,sre2l,cda,delt", iterations=400,
        round_iterations=50, eval_epochs=100, eval_every=50, students="",
    ),
    "paper": dict(
        out="runs/quality-paper", ipcs="10,50", methods=",".join(METHODS), iterations=4000,
        round_iterations=500, eval_epochs=300, eval_every=10, students="resnet18_small,convnet4",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class QualityConfig:
    """The benchmark's settings, parsed (:func:`parse_args`; one field per flag, the budget's
    values filled in). ``flags`` holds the flags as given, recorded in ``OUT/results.json``."""

    budget: str
    out: Path
    data_root: str | None
    ipcs: tuple[int, ...]
    methods: tuple[str, ...]  # --methods entries: a method or a variant (parse_method)
    teacher: str | None
    stats: str | None  # delt stats file of the teacher, for the MATCH_VARIANTS
    seeds: tuple[int, ...]
    synthesis: str  # per-seed, once
    width: int
    teacher_epochs: int
    iterations: int
    round_iterations: int
    eval_epochs: int
    eval_every: int
    students: tuple[str, ...]
    students_eval_every: int
    amp: str
    report_only: bool
    device: str
    threads: int
    flags: dict = field(default_factory=dict, compare=False)

    @property
    def teacher_path(self) -> Path:
        """The given teacher, or the one trained into ``OUT/teacher``."""
        return Path(self.teacher) if self.teacher else self.out / "teacher" / "teacher.pt"

    @property
    def title(self) -> str:
        return f"Fashion-MNIST, ConvNet-3 w{self.width} teacher and student"

    def run_names(self) -> list[tuple[int, str]]:
        """(synthesis seed, the runs' folder name) of each set of one (method, IPC): one per
        seed, or one set, ``once``, of seed 0."""
        if self.synthesis == "per-seed":
            return [(seed, f"seed{seed}") for seed in self.seeds]
        return [(0, "once")]

    def run_dirs(self) -> list[tuple[str, int, Path]]:
        """(method, IPC, run folder) of every run the flags name, in run order."""
        return [
            (method, ipc, self.out / method / f"ipc{ipc}" / name)
            for ipc in self.ipcs
            for _, name in self.run_names()
            for method in self.methods
        ]


def parse_args(argv=None) -> QualityConfig:
    """The command line as a :class:`QualityConfig`; bad flags end the program (status 2, or
    ``--methods: ...`` / ``--students: ...``)."""

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--budget", choices=tuple(BUDGETS), default="short",
        help="short: the committed short-budget table; paper: the papers' budget",
    )  # fmt: skip
    parser.add_argument("--out", help="output folder (short: runs/quality; paper: ...-paper)")
    parser.add_argument("--data-root", default=None, help="Fashion-MNIST folder")
    parser.add_argument("--ipcs", help="comma-separated IPCs (short: 1,10,50; paper: 10,50)")
    parser.add_argument(
        "--methods",
        help=f"comma-separated methods of {', '.join(METHODS)} (short: no rded) and PDD's "
        f"variants {', '.join(PDD_VARIANTS)} (not by default); a method that optimizes pixels "
        "may end in -lrVALUE for a variant with that recovery step size (`delt distill "
        "--recover-lr`; e.g. delt-lr0.05, into OUT/delt-lr0.05), rded in -factorN for its "
        "tiling (`--factor N`; e.g. rded-factor1); per-class BN matching: sre2l+class (WMDD's "
        "--match class), cda+class-mean (EDC's --match class-mean --match-class-weight 0.5)",
    )
    parser.add_argument(
        "--teacher",
        help="an existing teacher checkpoint instead of training OUT/teacher (e.g. "
        "OUT/teacher/checkpoints/epoch-002.pt, a weaker one, into another --out); "
        "--teacher-epochs does not apply",
    )
    parser.add_argument(
        "--stats",
        help="`delt stats` file of the teacher for the per-class variants (sre2l+class, "
        "cda+class-mean); default: each of their runs makes its own",
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument(
        "--synthesis", choices=("per-seed", "once"), default="per-seed",
        help="per-seed: synthesis and evaluation seed together; once: one set, every seed "
        "evaluates it",
    )  # fmt: skip
    parser.add_argument("--width", type=int, default=64, help="ConvNet-3 width")
    parser.add_argument("--teacher-epochs", type=int, default=10, help="teacher epochs")
    parser.add_argument("--iterations", type=int, help="MI of every method (400; paper 4000)")
    parser.add_argument("--round-iterations", type=int, help="DELT's RI (50; paper 500)")
    parser.add_argument("--eval-epochs", type=int, help="student epochs (100; paper 300)")
    parser.add_argument("--eval-every", type=int, help="test every k epochs (50; paper 10)")
    parser.add_argument(
        "--students",
        help="comma-separated extra student architectures each set is also evaluated with "
        "(`delt eval --student`; convnetD at --width; short: none; paper: resnet18_small,convnet4)",
    )
    parser.add_argument(
        "--students-eval-every",
        type=int,
        help="test the --students every k epochs (default --eval-every; one ResNet-18-small "
        "test of the 10,000 test images cost about 80 CPU-s on a 2-core CPU, so 100 keeps three "
        "tests of 300 epochs)",
    )
    parser.add_argument(
        "--amp", choices=("none", "bf16"), default="bf16",
        help="autocast of the teacher's training, the selection's scoring and the students (none: "
        "float32; on a CPU without bfloat16 units bf16 is emulated, several times slower)",
    )  # fmt: skip
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: write OUT/results.* from the named runs that have finished",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (1: on a shared 2-core machine two OpenMP threads ran the "
        "recovery 4-8x slower than one)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    for name, value in BUDGETS[args.budget].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.students_eval_every is None:
        args.students_eval_every = args.eval_every
    for name in ("eval_every", "students_eval_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive number of epochs, "
                         f"got {getattr(args, name)}")  # fmt: skip
    flags = dict(vars(args))
    methods = tuple(m for m in args.methods.split(",") if m)
    for method in methods:
        parse_method(method)  # an unknown one is refused now
    students = tuple(s for s in args.students.split(",") if s)
    if students:
        from delt.models import MODELS

        for student in students:
            if student not in MODELS:
                raise SystemExit(f"--students: unknown {student!r}; known: {', '.join(MODELS)}")
    return QualityConfig(
        budget=args.budget, out=Path(args.out), data_root=args.data_root, ipcs=_ints(args.ipcs),
        methods=methods, teacher=args.teacher, stats=args.stats, seeds=_ints(args.seeds),
        synthesis=args.synthesis, width=args.width, teacher_epochs=args.teacher_epochs,
        iterations=args.iterations, round_iterations=args.round_iterations,
        eval_epochs=args.eval_epochs,
        eval_every=args.eval_every, students=students,
        students_eval_every=args.students_eval_every, amp=args.amp,
        report_only=args.report_only, device=args.device, threads=args.threads, flags=flags,
    )  # fmt: skip


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def parse_method(name: str) -> tuple[str, dict]:
    """A ``--methods`` entry → (``delt distill --method``, its other DistillConfig fields).

    ``"delt"`` → ``("delt", {})``; ``"delt-lr0.05"`` → ``("delt", {"recover_lr": 0.05})``;
    ``"rded-factor1"`` → ``("rded", {"factor": 1})``; ``"pdd+ckpt"`` → ``("pdd",
    {"stage_teachers": "checkpoints"})`` (the per-IPC settings: :func:`method_settings`).

    Raises:
        SystemExit: ``--methods: ...`` for an unknown method, or a suffix on a method it does
            not apply to (-lr: the methods that optimize pixels; -factor: rded).
    """
    if name in METHODS:
        return name, {}
    if name in PDD_VARIANTS:
        return "pdd", dict(PDD_VARIANTS[name])
    if name in MATCH_VARIANTS:
        method, options = MATCH_VARIANTS[name]
        return method, dict(options)
    optimizing = [m for m in METHODS if m not in ("random-real", "rded")] + list(PDD_VARIANTS)
    match = re.fullmatch(r"(.+?)-(lr|factor)(.*)", name)
    if match is not None:
        base, suffix, text = match.groups()
        if suffix == "lr" and base in optimizing:
            try:
                value = float(text)
            except ValueError:
                value = float("nan")
            if value > 0:
                method, options = parse_method(base)
                return method, {**options, "recover_lr": value}
        if suffix == "factor" and base == "rded" and text.isdigit() and int(text) >= 1:
            return "rded", {"factor": int(text)}
    raise SystemExit(
        f"--methods: unknown {name!r}; known: {', '.join(METHODS)}, "
        f"{', '.join(PDD_VARIANTS)}, {', '.join(MATCH_VARIANTS)}, or one of "
        f"{', '.join(optimizing)} with -lrVALUE "
        "(VALUE > 0), or rded-factorN (N >= 1)"
    )


def method_settings(method: str, options: dict, ipc: int, config: QualityConfig) -> dict:
    """The DistillConfig fields of one (method, IPC) beyond the shared ones: ``options``
    (:func:`parse_method`) with the iterations. pdd: 5 stages, the per-stage MI/RI whose
    image-iterations match DELT's at ``config.iterations`` / ``config.round_iterations``, and
    with ``--union-in-batch`` a sample of one stage's new images (IPC/5 per class)."""
    from delt.schedules import pdd_matched_iterations

    if method == "rded":
        return dict(options)
    if "match" in options and config.stats:
        options = {**options, "stats": config.stats}
    if method == "pdd":
        matched = pdd_matched_iterations(
            ipc, config.iterations, config.round_iterations, CLASSES, PDD_STAGES
        )
        settings = {"stages": PDD_STAGES, "iterations": matched.iterations,
                    "round_iterations": matched.round_iterations, **options}  # fmt: skip
        if settings.get("union_in_batch"):
            settings["union_sample"] = ipc // PDD_STAGES * CLASSES
        return settings
    return {
        "iterations": config.iterations,
        "round_iterations": config.round_iterations if method == "delt" else None,
        **options,
    }


def save_epochs(teacher_epochs: int) -> tuple[int, ...]:
    """The teacher's checkpoints of ``--stage-teachers checkpoints``: one per PDD stage, evenly
    spaced, the last at the end (benchmarks/pdd's 2,4,6,8,10 at 10 epochs).

    Raises:
        SystemExit: fewer epochs than stages.
    """
    if teacher_epochs < PDD_STAGES:
        raise SystemExit(
            f"--teacher-epochs {teacher_epochs}: --stage-teachers checkpoints needs one "
            f"checkpoint per stage, >= {PDD_STAGES} epochs"
        )
    return tuple(teacher_epochs * k // PDD_STAGES for k in range(1, PDD_STAGES + 1))


@dataclass(frozen=True)
class Job:
    """One ``delt distill`` run: its ``--methods`` entry, IPC, the seeds its students train
    with, and its config."""

    method: str
    ipc: int
    eval_seeds: tuple[int, ...]
    distill: DistillConfig

    @property
    def folder(self) -> Path:
        return Path(self.distill.out)


def plan_jobs(config: QualityConfig) -> list[Job]:
    """Every run's ``delt distill`` config, checked before any work: a bad one (pdd's 5 stages
    at IPC 1) ends the program naming the method and IPC."""
    from delt.config import ConfigError
    from delt.pipeline import DistillConfig

    jobs = []
    for ipc in config.ipcs:
        for synthesis_seed, name in config.run_names():
            eval_seeds = (synthesis_seed,) if config.synthesis == "per-seed" else config.seeds
            for method in config.methods:
                run_dir = config.out / method / f"ipc{ipc}" / name
                base, options = parse_method(method)
                try:
                    settings = method_settings(base, options, ipc, config)
                    distill_config = DistillConfig(
                        method=base, ipc=ipc, out=str(run_dir), dataset="fashion-mnist",
                        data_root=config.data_root, teacher=str(config.teacher_path),
                        eval_epochs=config.eval_epochs, seeds=eval_seeds,
                        eval_every=config.eval_every, amp=config.amp, channels_last=True,
                        seed=synthesis_seed, device=config.device, progress=False, **settings,
                    )  # fmt: skip
                except (ConfigError, ValueError) as error:
                    raise SystemExit(f"--methods {method} at IPC {ipc}: {error}") from None
                jobs.append(Job(method, ipc, eval_seeds, distill_config))
    return jobs


def prepare_teacher(config: QualityConfig, jobs: list[Job]) -> None:
    """The given teacher is reported; otherwise ``OUT/teacher`` is trained (or found cached),
    with one checkpoint per PDD stage where a job's ``--stage-teachers checkpoints`` needs them
    (checked here, before any run)."""
    from delt.config import ConfigError
    from delt.methods.pdd import stage_checkpoints
    from delt.models import load_checkpoint
    from delt.teacher import TeacherConfig, train_teacher

    checkpoints = [job for job in jobs if job.distill.stage_teachers == "checkpoints"]
    if config.teacher:
        meta = load_checkpoint(config.teacher).meta
        print(f"teacher: {config.teacher} (given) {meta.get('test_accuracy', float('nan')):.2f}% "
              "test", flush=True)  # fmt: skip
    else:
        try:
            teacher = train_teacher(
                TeacherConfig(
                    out=str(config.out / "teacher"), dataset="fashion-mnist",
                    data_root=config.data_root, arch="convnet3", width=config.width,
                    epochs=config.teacher_epochs, seed=0, amp=config.amp, device=config.device,
                    progress=False,
                    save_epochs=save_epochs(config.teacher_epochs) if checkpoints else None,
                )
            )  # fmt: skip
        except ConfigError as error:
            if not checkpoints:
                raise
            # A cached teacher trained without the checkpoints: refused here, not deep inside.
            raise SystemExit(
                f"--methods {checkpoints[0].method} needs the teacher's checkpoints: {error}; or "
                f"pass --teacher PATH of a teacher trained with {PDD_STAGES} checkpoints (`delt "
                "teacher --save-epochs`)"
            ) from None
        print(f"teacher: {teacher.path} {teacher.test_accuracy:.2f}% test", flush=True)
    if checkpoints:
        try:  # before any run: the given teacher may lack them
            stage_checkpoints(checkpoints[0].distill, config.teacher_path)
        except ConfigError as error:
            raise SystemExit(f"--methods {checkpoints[0].method}: {error}") from None


def compare_config(config: QualityConfig, job: Job, student: str | None = None) -> CompareConfig:
    """``delt compare`` of a run's set (``RUN/distilled``) with the run's evaluation seeds, its
    teacher and the benchmark's student protocol (``--student``: another student, tested every
    ``--students-eval-every`` epochs), into ``RUN/compare`` (``RUN/compare-STUDENT``)."""
    from delt.compare import CompareConfig

    return CompareConfig(
        sets=(str(job.folder / "distilled"),), seeds=tuple(job.eval_seeds),
        epochs=(config.eval_epochs,), teacher=str(config.teacher_path),
        data_root=config.data_root, student=student,
        student_width=config.width if student and student.startswith("convnet") else None,
        eval_every=config.students_eval_every if student else config.eval_every,
        batch_size=job.distill.eval_batch_size, amp=config.amp, channels_last=True,
        device=config.device, progress=False,
        out=str(job.folder / ("compare" if student is None else f"compare-{student}")),
    )  # fmt: skip


def compared_accuracy(document: dict) -> tuple[float, float, str]:
    """A one-set ``compare.json``'s (accuracy mean, std, the ``eval.json`` it comes from)."""
    (budget,) = document["budgets"]
    (evaluation,) = budget["evaluations"]
    return evaluation["mean"], evaluation["std"], evaluation["eval"]


def run_job(config: QualityConfig, job: Job) -> None:
    """``delt distill`` of one job (finished steps are reused), then ``delt compare`` of its set
    (:func:`compare_config`: it reuses the evaluation ``delt distill`` made, the same ``delt
    eval`` identity, and names it), its line in ``OUT/progress.jsonl`` with compare's accuracy,
    then its ``--students`` evaluations."""
    from delt.compare import run_compare
    from delt.pipeline import distill

    run_started = time.time()
    result = distill(job.distill, print_summary=False)
    compared = run_compare(compare_config(config, job))
    accuracy, std, source = compared_accuracy(compared.document)
    if round(accuracy, 2) != round(result.report["accuracy_mean"], 2):
        raise SystemExit(
            f"{job.folder}: delt compare's {accuracy:.2f}% ({source}) is not delt distill's "
            f"{result.report['accuracy_mean']:.2f}%: the two evaluations differ"
        )
    record = {
        **result.report,
        "accuracy_mean": accuracy,
        "accuracy_std": std,
        "compare": str(compared.out / "compare.json"),
        "eval": source,
        "run": str(job.folder),
        "variant": job.method,
        "seed": job.distill.seed,
        "eval_seeds": list(job.eval_seeds),
        "final_mean": result.evaluation.final_mean,
        "cached": all(step["cached"] for step in result.steps),
        "wall_seconds": time.time() - run_started,
        "steps": result.steps,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    with open(config.out / "progress.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(
        f"{job.method:>11} IPC {job.ipc:>2} {job.folder.name}: "
        f"{result.report['accuracy_mean']:6.2f}% (final {result.evaluation.final_mean:6.2f}%), "
        f"diversity {result.report['diversity']:.4f}, {result.report['image_iterations']:>9,} "
        f"image-its, synthesis {result.report['synthesis_seconds']:7.1f} s, run "
        f"{record['wall_seconds']:7.1f} s{' (cached)' if record['cached'] else ''}",
        flush=True,
    )
    for student in config.students:
        evaluate_student(config, job, student)


def evaluate_student(config: QualityConfig, job: Job, student: str) -> None:
    """``delt eval --student STUDENT`` of a run's set (the set's teacher labels it), configured
    as ``delt compare --student STUDENT`` configures it (:func:`compare_config`), into
    ``RUN/distilled/eval-STUDENT.json``: a row of results.md's table of other evaluations."""
    from delt.evaluate import evaluate

    distilled = job.folder / "distilled"
    eval_config = compare_config(config, job, student).eval_config(
        distilled, config.eval_epochs, distilled / f"eval-{student}.json"
    )
    result = evaluate(eval_config)
    print(
        f"{job.method:>11} IPC {job.ipc:>2} student {student}: {result.accuracy_mean:6.2f}% "
        f"({result.document['wall_seconds']:.0f} s{', cached' if result.reused else ''})",
        flush=True,
    )


def main(argv=None) -> int:
    config = parse_args(argv)
    import torch
    from delt import runtime

    torch.set_num_threads(config.threads)
    started = time.time()
    machine = {
        **runtime.machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    print(json.dumps(machine), flush=True)

    if config.report_only:
        write_results(config, machine, finished_runs(config))
        return 0

    jobs = plan_jobs(config)  # every run's config first: a bad one is refused before any work
    prepare_teacher(config, jobs)
    for job in jobs:
        run_job(config, job)
    write_results(config, machine, [run_record(job.method, job.folder) for job in jobs])
    print(f"done in {time.time() - started:.0f} s", flush=True)
    return 0


def logged_reports(path: Path) -> dict:
    """The report of every run ``OUT/progress.jsonl`` logged, by (``--methods`` entry, IPC, run
    folder name), the last line of a run winning: what ``--report-only`` reports for a run whose
    folder is gone. No file: none.

    Raises:
        ValueError: naming the file and line of one that is not a run's JSON record.
    """
    from delt.report import REPORT_KEYS, check_report

    logged = {}
    if not path.is_file():
        return logged
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
            key = (record["variant"], record["ipc"], Path(record["run"]).name)
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{where}: expected a run's JSON record ({error})") from None
        report = {name: record[name] for name in REPORT_KEYS if name in record}
        check_report(report, where)
        logged[key] = report
    return logged


def run_record(method: str, folder: Path, report: dict | None = None) -> RunRecord:
    """A run as :class:`delt.comparison.RunRecord`: its seed from its folder's name
    (``seedN``; else the name, ``once``), its report (``report``, or the folder's report.json)."""
    from delt.comparison import RunRecord
    from delt.report import load_report

    name = folder.name
    seed = int(name[4:]) if name.startswith("seed") else name
    if report is None:
        return RunRecord(method, seed, load_report(folder), folder)
    return RunRecord(method, seed, report, folder)


def finished_runs(config: QualityConfig) -> list[RunRecord]:
    """``--report-only``: the named runs that have finished (``report.json``), and those whose
    folder is gone but whose line is in ``OUT/progress.jsonl`` (:func:`logged_reports`); a folder
    without report.json is a run under way, not reported."""
    progress = config.out / "progress.jsonl"
    try:
        logged = logged_reports(progress)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    runs, from_log = [], 0
    for method, ipc, run_dir in config.run_dirs():
        if (run_dir / "report.json").is_file():
            runs.append(run_record(method, run_dir))
        elif (method, ipc, run_dir.name) in logged and not run_dir.exists():
            runs.append(run_record(method, run_dir, logged[(method, ipc, run_dir.name)]))
            from_log += 1
    if from_log:
        print(
            f"{from_log} of {len(runs)} runs reported from {progress} (their folders are gone, "
            "and with them their other evaluations)",
            flush=True,
        )
    return runs


def write_results(config: QualityConfig, machine: dict, runs: list[RunRecord]) -> None:
    """``OUT/results.md`` / ``.json`` / ``.png``: the runs pooled by (IPC, method variant), then
    every method's gain over random-real paired by seed (charted against the synthesis cost in
    ``OUT/results-gains.png``) and the other evaluations (:func:`delt.comparison.compare`)."""
    from delt.comparison import ProtocolMismatchError, compare, plot_gains
    from delt.io import atomic_open
    from delt.report import plot_comparison

    try:
        comparison = compare(runs, pair_by_seed=config.synthesis == "per-seed")
    except ProtocolMismatchError as error:
        raise SystemExit(str(error)) from None
    plot_comparison(comparison.rows, config.out / "results.png", config.title)
    plot_gains(comparison.gains, comparison.rows, config.out / "results-gains.png", config.title)
    markdown = comparison.markdown()
    with atomic_open(config.out / "results.md", "w") as handle:
        handle.write(markdown)
    document = {"machine": machine, "args": config.flags, **comparison.document()}
    with atomic_open(config.out / "results.json", "w") as handle:
        handle.write(json.dumps(document, indent=2) + "\n")
    print(markdown, end="", flush=True)


if __name__ == "__main__":
    sys.exit(main())
