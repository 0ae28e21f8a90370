"""Quality benchmark: random-real, RDED, SRe2L, CDA, DELT and PDD on Fashion-MNIST.

One ConvNet-3 teacher (trained once, ``OUT/teacher``, or an existing checkpoint, ``--teacher``)
synthesizes for every method and labels every student; the students are ConvNet-3s of the same
width, trained by ``delt eval``'s protocol (reference/delt.md §5). Every (method, IPC, seed) is
one ``delt distill`` run in ``OUT/<method>/ipc<IPC>/seed<seed>``: synthesis seed and evaluation
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
every method's gain over random-real paired by seed (the same seed's random-real run), charted
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
import functools
import json
import re
import sys
import time
from pathlib import Path

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


def parse_args(argv=None) -> argparse.Namespace:
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
        "tiling (`--factor N`; e.g. rded-factor1)",
    )  # fmt: skip
    parser.add_argument(
        "--teacher",
        help="an existing teacher checkpoint instead of training OUT/teacher (e.g. "
        "OUT/teacher/checkpoints/epoch-002.pt, a weaker one, into another --out); "
        "--teacher-epochs does not apply",
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
        "--students-eval-every", type=int,
        help="test the --students every k epochs (default --eval-every; one ResNet-18-small "
        "test of the 10,000 test images cost about 80 CPU-s on a 2-core CPU, so 100 keeps three "
        "tests of 300 epochs)",
    )  # fmt: skip
    parser.add_argument(
        "--amp", choices=("none", "bf16"), default="bf16",
        help="autocast of the teacher's training, the selection's scoring and the students (none: "
        "float32; on a CPU without bfloat16 units bf16 is emulated, several times slower)",
    )  # fmt: skip
    parser.add_argument(
        "--report-only", action="store_true",
        help="run nothing: write OUT/results.* from the named runs that have finished",
    )  # fmt: skip
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
    return args


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


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
        f"{', '.join(PDD_VARIANTS)}, or one of {', '.join(optimizing)} with -lrVALUE "
        "(VALUE > 0), or rded-factorN (N >= 1)"
    )


def method_settings(method: str, options: dict, ipc: int, args) -> dict:
    """The DistillConfig fields of one (method, IPC) beyond the shared ones: ``options``
    (:func:`parse_method`) with the iterations. pdd: 5 stages, the per-stage MI/RI whose
    image-iterations match DELT's at ``args.iterations`` / ``args.round_iterations``, and with
    ``--union-in-batch`` a sample of one stage's new images (IPC/5 per class)."""
    from delt.schedules import pdd_matched_iterations

    if method == "rded":
        return dict(options)
    if method == "pdd":
        matched = pdd_matched_iterations(
            ipc, args.iterations, args.round_iterations, CLASSES, PDD_STAGES
        )
        settings = {"stages": PDD_STAGES, "iterations": matched.iterations,
                    "round_iterations": matched.round_iterations, **options}  # fmt: skip
        if settings.get("union_in_batch"):
            settings["union_sample"] = ipc // PDD_STAGES * CLASSES
        return settings
    return {
        "iterations": args.iterations,
        "round_iterations": args.round_iterations if method == "delt" else None,
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


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from delt import runtime
    from delt.config import ConfigError
    from delt.distill import DistillConfig, distill
    from delt.evaluate import EvalConfig, evaluate
    from delt.models import MODELS, load_checkpoint
    from delt.pdd import stage_checkpoints
    from delt.teacher import TeacherConfig, train_teacher

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    methods = [m for m in args.methods.split(",") if m]
    variants = {name: parse_method(name) for name in methods}
    seeds = _ints(args.seeds)
    students = [s for s in args.students.split(",") if s]
    for student in students:
        if student not in MODELS:
            raise SystemExit(f"--students: unknown {student!r}; known: {', '.join(MODELS)}")
    started = time.time()
    machine = {
        **runtime.machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    print(json.dumps(machine), flush=True)

    if args.report_only:
        try:
            logged = logged_reports(out / "progress.jsonl")
        except ValueError as error:
            raise SystemExit(str(error)) from None
        runs, from_log = [], {}
        for method, run_dir in _run_dirs(args, out, methods, seeds):
            key = (method, int(run_dir.parent.name[3:]), run_dir.name)
            if (run_dir / "report.json").is_file():
                runs.append((method, str(run_dir)))
            elif key in logged and not run_dir.exists():  # a folder without report.json: running
                runs.append((method, str(run_dir)))
                from_log[str(run_dir)] = logged[key]
        if from_log:
            print(
                f"{len(from_log)} of {len(runs)} runs reported from {out / 'progress.jsonl'} "
                "(their folders are gone, and with them their other evaluations)",
                flush=True,
            )
        _write_results(out, machine, args, runs, from_log)
        return 0

    # Every run's config first: a bad one (pdd's 5 stages at IPC 1) is refused before any work.
    teacher_path = Path(args.teacher) if args.teacher else out / "teacher" / "teacher.pt"
    jobs = []
    for ipc in _ints(args.ipcs):
        syntheses = (
            [(seed, (seed,), f"seed{seed}") for seed in seeds]
            if args.synthesis == "per-seed"
            else [(0, tuple(seeds), "once")]
        )
        for synthesis_seed, eval_seeds, name in syntheses:
            for method in methods:
                run_dir = out / method / f"ipc{ipc}" / name
                base, options = variants[method]
                try:
                    settings = method_settings(base, options, ipc, args)
                    config = DistillConfig(
                        method=base, ipc=ipc, out=str(run_dir), dataset="fashion-mnist",
                        data_root=args.data_root, teacher=str(teacher_path),
                        eval_epochs=args.eval_epochs, seeds=eval_seeds,
                        eval_every=args.eval_every, amp=args.amp, channels_last=True,
                        seed=synthesis_seed, device=args.device, progress=False, **settings,
                    )  # fmt: skip
                except (ConfigError, ValueError) as error:
                    raise SystemExit(f"--methods {method} at IPC {ipc}: {error}") from None
                jobs.append((method, ipc, name, eval_seeds, config))
    checkpoints = [job for job in jobs if job[4].stage_teachers == "checkpoints"]

    if args.teacher:
        meta = load_checkpoint(args.teacher).meta
        print(f"teacher: {args.teacher} (given) {meta.get('test_accuracy', float('nan')):.2f}% "
              "test", flush=True)  # fmt: skip
    else:
        try:
            teacher = train_teacher(
                TeacherConfig(
                    out=str(out / "teacher"), dataset="fashion-mnist", data_root=args.data_root,
                    arch="convnet3", width=args.width, epochs=args.teacher_epochs, seed=0,
                    amp=args.amp, device=args.device, progress=False,
                    save_epochs=save_epochs(args.teacher_epochs) if checkpoints else None,
                )
            )  # fmt: skip
        except ConfigError as error:
            if not checkpoints:
                raise
            # A cached teacher trained without the checkpoints: refused here, not deep inside.
            raise SystemExit(
                f"--methods {checkpoints[0][0]} needs the teacher's checkpoints: {error}; or pass "
                f"--teacher PATH of a teacher trained with {PDD_STAGES} checkpoints (`delt "
                "teacher --save-epochs`)"
            ) from None
        print(f"teacher: {teacher.path} {teacher.test_accuracy:.2f}% test", flush=True)
    if checkpoints:
        try:  # before any run: the given teacher may lack them
            stage_checkpoints(checkpoints[0][4], teacher_path)
        except ConfigError as error:
            raise SystemExit(f"--methods {checkpoints[0][0]}: {error}") from None

    runs = []
    for method, ipc, name, eval_seeds, config in jobs:
        run_dir = Path(config.out)
        run_started = time.time()
        result = distill(config, print_summary=False)
        record = {
            **result.report,
            "run": str(run_dir),
            "variant": method,
            "seed": config.seed,
            "eval_seeds": list(eval_seeds),
            "final_mean": result.evaluation.final_mean,
            "cached": all(step["cached"] for step in result.steps),
            "wall_seconds": time.time() - run_started,
            "steps": result.steps,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        with open(out / "progress.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(
            f"{method:>11} IPC {ipc:>2} {name}: {result.report['accuracy_mean']:6.2f}% "
            f"(final {result.evaluation.final_mean:6.2f}%), diversity "
            f"{result.report['diversity']:.4f}, {result.report['image_iterations']:>9,} "
            f"image-its, synthesis {result.report['synthesis_seconds']:7.1f} s, run "
            f"{record['wall_seconds']:7.1f} s{' (cached)' if record['cached'] else ''}",
            flush=True,
        )
        runs.append((method, str(run_dir)))
        for student in students:
            _evaluate_student(
                args, evaluate, EvalConfig, run_dir, str(teacher_path), student, eval_seeds,
                method, ipc,
            )  # fmt: skip

    _write_results(out, machine, args, runs)
    print(f"done in {time.time() - started:.0f} s", flush=True)
    return 0


def _run_dirs(args, out: Path, methods: list[str], seeds: list[int]):
    """(method, run folder) of every run the flags name, in run order."""
    names = [f"seed{seed}" for seed in seeds] if args.synthesis == "per-seed" else ["once"]
    for ipc in _ints(args.ipcs):
        for name in names:
            for method in methods:
                yield method, out / method / f"ipc{ipc}" / name


def paired_gains(reports: list[tuple[str, int, dict]], baseline: str = "random-real") -> list:
    """Each method's gain over ``baseline`` paired by (IPC, seed): the difference of the two
    runs' accuracies for every seed both have, then their mean and (population) std.

    ``reports``: (method, seed, report.json) triples. Returns one dict per (IPC, method) with a
    paired seed: ``ipc``, ``method``, ``gains`` (seed → points), ``mean``, ``std``.
    """
    import numpy as np

    accuracy = {(m, r["ipc"], seed): r["accuracy_mean"] for m, seed, r in reports}
    rows = {}
    for (method, ipc, seed), value in accuracy.items():
        if method != baseline and (baseline, ipc, seed) in accuracy:
            gain = value - accuracy[(baseline, ipc, seed)]
            rows.setdefault((ipc, method), {})[seed] = gain
    return [
        {"ipc": ipc, "method": method, "gains": dict(sorted(gains.items())),
         "mean": float(np.mean(list(gains.values()))), "std": float(np.std(list(gains.values())))}
        for (ipc, method), gains in rows.items()
    ]  # fmt: skip


# Fields of an evaluation's identity config that do not change its training protocol, or that
# legitimately differ between the runs pooled under one NAME: the IPC (checked per IPC), the
# requested --student-width (the resolved student_kwargs stay), the memory format, whether the
# folder held a set or --random-real drew one, and the random stream of augmenting workers (0 on
# a CPU, N on a GPU: another draw, as another seed is).
NOT_PROTOCOL = ("ipc", "student_width", "channels_last", "random_real", "augmentation")


@functools.cache
def _eval_defaults() -> dict:
    """``delt eval``'s default of every field of an evaluation's identity config (computed once;
    callers copy before changing it)."""
    import dataclasses

    from delt.evaluate import EvalConfig

    return {
        f.name: f.default
        for f in dataclasses.fields(EvalConfig)
        if f.metadata.get("identity", True) and f.default is not dataclasses.MISSING
    }


def evaluation_protocol(document: dict) -> dict:
    """The training protocol of an eval document (``delt eval``'s eval.json): its identity
    config (the resolved student, its kwargs and batch size included), with ``delt eval``'s
    default for a field it lacks (a file written before the flag existed, or ShufflePatches
    off), less :data:`NOT_PROTOCOL` and the seeds."""
    defaults = {key: value for key, value in _eval_defaults().items() if key != "seeds"}
    protocol = {**defaults, **document["identity"]["config"]}
    for name in NOT_PROTOCOL:
        protocol.pop(name, None)
    return protocol


def describe_protocol(protocol: dict, ipc: int, num_images: int) -> str:
    """A protocol (:func:`evaluation_protocol`) in words: the student with its width, epochs and
    test interval, then every setting that differs from ``delt eval``'s defaults, e.g.
    ``"convnet4 w64, 300 epochs, tested every 10, ShufflePatches 2, min crop 0.5, RandAugment
    off"``; a batch size other than the IPC's default (``num_images`` caps it) is named too."""
    from delt.config import flag
    from delt.student import default_batch_size

    defaults = _eval_defaults()
    kwargs = protocol.get("student_kwargs") or {}
    model = "".join(
        f" w{value}" if key == "width" else f" {key}={value}" for key, value in kwargs.items()
    )
    parts = [
        f"{protocol['student']}{model}",
        f"{protocol['epochs']} epochs",
        f"tested every {protocol['eval_every']}",
    ]
    if protocol.get("shuffle_patches"):
        parts.append(f"ShufflePatches {protocol['shuffle_patches']}")
    if protocol["min_crop"] != defaults["min_crop"]:
        parts.append(f"min crop {protocol['min_crop']:g}")
    ops, magnitude = protocol["randaugment_ops"], protocol["randaugment_magnitude"]
    if ops == 0 and defaults["randaugment_ops"] != 0:
        parts.append("RandAugment off")
    elif (ops, magnitude) != (defaults["randaugment_ops"], defaults["randaugment_magnitude"]):
        parts.append(f"RandAugment rand-m{magnitude}-n{ops}")
    if protocol["cutmix_beta"] != defaults["cutmix_beta"]:
        beta = protocol["cutmix_beta"]
        parts.append("CutMix off" if beta == 0 else f"CutMix beta {beta:g}")
    if protocol["hard_labels"]:
        parts.append("hard labels")
    for name in ("temperature", "lr", "weight_decay", "amp"):
        if protocol[name] != defaults[name]:
            parts.append(f"{flag(name)} {protocol[name]}")
    classes = max(1, round(num_images / ipc))
    if protocol["batch_size"] != default_batch_size(ipc, classes, num_images):
        parts.append(f"batch {protocol['batch_size']}")
    if protocol.get("stagewise"):
        parts.append(f"stage-wise ({protocol['stage_schedule']})")
    # Any other field (one added to delt eval later) that differs from its default, by flag.
    described = {"student", "student_kwargs", "epochs", "eval_every", "shuffle_patches",
                 "min_crop", "randaugment_ops", "randaugment_magnitude", "cutmix_beta",
                 "hard_labels", "temperature", "lr", "weight_decay", "amp", "batch_size",
                 "stagewise", "stage_schedule"}  # fmt: skip
    parts += [
        f"{flag(key)} {value}"
        for key, value in protocol.items()
        if key not in described and (key not in defaults or value != defaults[key])
    ]
    return ", ".join(parts)


def other_evaluations(runs: list[tuple[str, str]], baseline: str = "random-real") -> list:
    """The runs' other evaluations of their sets (``RUN/distilled/eval-NAME.json`` beside the
    run's own ``eval.json``: another student, student budget or ShufflePatches), pooled by
    (IPC, NAME, method), with the gain over ``baseline``'s evaluation of the same NAME paired by
    seed. A NAME is one evaluation only where every file of that NAME at an IPC has the same
    training protocol (:func:`evaluation_protocol`: the student and its width, epochs, test
    interval, augmentation, loss, optimizer, batch size, ...); otherwise it is refused by file.

    Returns one dict per (IPC, NAME, method): ``evaluation`` (NAME), ``protocol``
    (:func:`describe_protocol`), ``ipc``, ``method``, ``accuracies`` (seed → best accuracy),
    ``mean``, ``std`` and, where the baseline shares a seed, ``gains`` (seed → points),
    ``gain_mean``, ``gain_std``.
    """
    import numpy as np
    from delt.config import config_diff

    found: dict[tuple, dict] = {}
    protocols: dict[tuple[int, str], tuple[dict, str, Path]] = {}
    for method, run in runs:
        for path in sorted((Path(run) / "distilled").glob("eval-*.json")):
            document = json.loads(path.read_text())
            if not document.get("complete"):
                continue
            ipc, name = document["ipc"], path.stem[len("eval-") :]
            protocol = evaluation_protocol(document)
            if (ipc, name) not in protocols:  # the first file of a NAME sets its protocol
                described = describe_protocol(protocol, ipc, document["num_images"])
                protocols[(ipc, name)] = (protocol, described, path)
            first = protocols[(ipc, name)]
            if first[0] != protocol:
                described = describe_protocol(protocol, ipc, document["num_images"])
                differences = "; ".join(config_diff(first[0], protocol))
                raise SystemExit(
                    f"{path}: protocol {described!r} differs from {first[2]}'s {first[1]!r} "
                    f"({differences}); an evaluation name must mean one protocol"
                )
            entry = found.setdefault((ipc, name, method), {})
            for seed in document["seeds"]:
                entry[seed["seed"]] = seed["best_accuracy"]
    rows = []
    for (ipc, name, method), accuracies in found.items():
        values = list(accuracies.values())
        row = {"evaluation": name, "protocol": protocols[(ipc, name)][1], "ipc": ipc,
               "method": method, "accuracies": dict(sorted(accuracies.items())),
               "mean": float(np.mean(values)), "std": float(np.std(values))}  # fmt: skip
        rows.append(row)
    # The gains: paired_gains over each evaluation name's accuracies, as for the runs' own.
    for name in dict.fromkeys(name for _, name in protocols):
        reports = [(method, seed, {"ipc": ipc, "accuracy_mean": accuracy})
                   for (ipc, n, method), accuracies in found.items() if n == name
                   for seed, accuracy in accuracies.items()]  # fmt: skip
        paired = {(g["ipc"], g["method"]): g for g in paired_gains(reports, baseline)}
        for row in rows:
            gain = paired.get((row["ipc"], row["method"])) if row["evaluation"] == name else None
            if gain:
                row.update(gains=gain["gains"], gain_mean=gain["mean"], gain_std=gain["std"])
    order: dict[str, int] = {}
    for method, _ in runs:
        order.setdefault(method, len(order))
    rows.sort(key=lambda r: (r["ipc"], r["evaluation"], order.get(r["method"], len(order))))
    return rows


def _count(value: float) -> str:
    """``4000000`` → ``"4M"``, ``340000`` → ``"340k"``: image-iterations on a chart."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.0f}"


def plot_gains(gains: list[dict], rows: list[dict], path: Path, title: str = "") -> None:
    """``OUT/results-gains.png``: per IPC (a row of two panels), each method's gain over
    random-real paired by seed (bars: the mean, error bars: the seeds' population std, dots: the
    seeds; under each bar the method's synthesis seconds and image-iterations), and that gain
    against its synthesis seconds (log axis). ``gains``: :func:`paired_gains`' rows; ``rows``:
    :func:`delt.report.pool_reports`' (synthesis seconds and image-iterations, the mean over a
    method's runs). A method without a random-real run of a common seed has no gain: it is
    named in its IPC's gain panel, not drawn."""
    import math

    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt
    import numpy as np
    from delt.io import atomic_open

    ipcs = list(dict.fromkeys([*(r["ipc"] for r in rows), *(g["ipc"] for g in gains)]))
    methods = list(dict.fromkeys([*(r["method"] for r in rows), *(g["method"] for g in gains)]))
    colors = {m: plt.get_cmap("tab10")(k % 10) for k, m in enumerate(methods)}
    cost = {(r["ipc"], r["method"]): r for r in rows}
    figure, axes = plt.subplots(
        max(1, len(ipcs)), 2, figsize=(12, 3.8 * max(1, len(ipcs))), squeeze=False
    )
    for (gain_axis, cost_axis), ipc in zip(axes, ipcs or [None], strict=True):
        paired = [g for g in gains if g["ipc"] == ipc]
        unpaired = [r["method"] for r in rows if r["ipc"] == ipc and r["method"] != "random-real"
                    and r["method"] not in {g["method"] for g in paired}]  # fmt: skip
        ticks = []  # the method, its synthesis seconds and image-iterations
        for k, gain in enumerate(paired):
            color = colors[gain["method"]]
            gain_axis.bar(k, gain["mean"], 0.6, yerr=gain["std"], capsize=4, color=color,
                          alpha=0.75)  # fmt: skip
            seeds = list(gain["gains"].values())
            offsets = np.linspace(-0.15, 0.15, len(seeds)) if len(seeds) > 1 else [0.0]
            gain_axis.scatter(k + np.asarray(offsets), seeds, s=14, color="black", zorder=3)
            row = cost.get((ipc, gain["method"]))
            if row is None:
                ticks.append(gain["method"])
                continue
            seconds = row["synthesis_seconds"]
            ticks.append(f"{gain['method']}\n{seconds:,.0f} s\n"
                         f"{_count(row['image_iterations'])} image-its")  # fmt: skip
            cost_axis.errorbar(seconds, gain["mean"], yerr=gain["std"], fmt="o", capsize=4,
                               color=color, label=gain["method"])  # fmt: skip
        gain_axis.set_xticks(range(len(paired)), ticks, fontsize=8)
        gain_axis.set_xlim(-0.6, max(len(paired), 3) - 0.4)  # one bar is not the axis' width
        gain_axis.axhline(0.0, color="gray", linewidth=0.8)
        gain_axis.set_ylabel("gain over random-real\n(points, paired by seed)")
        gain_axis.set_title(f"IPC {ipc}: gain, mean ± std over seeds (dots: seeds)", fontsize=10)
        gain_axis.grid(axis="y", alpha=0.3)
        cost_axis.axhline(0.0, color="gray", linewidth=0.8)
        positive = [cost[(ipc, g["method"])]["synthesis_seconds"] for g in paired
                    if (ipc, g["method"]) in cost]  # fmt: skip
        if positive and all(v > 0 and math.isfinite(v) for v in positive):
            cost_axis.set_xscale("log")
        elif positive:
            cost_axis.set_xscale("symlog", linthresh=1.0)
        cost_axis.set_xlabel("synthesis seconds (mean over runs)")
        cost_axis.set_ylabel("gain over random-real (points)")
        cost_axis.set_title(f"IPC {ipc}: gain against synthesis cost", fontsize=10)
        cost_axis.grid(alpha=0.3)
        if cost_axis.get_legend_handles_labels()[0]:
            cost_axis.legend(fontsize=8, loc="best")
        note = []
        if not paired:
            note.append("no method paired with a random-real run by seed")
        if unpaired:
            note.append(f"not paired with random-real by seed: {', '.join(unpaired)}")
        if note:
            gain_axis.text(0.02, 0.02, "\n".join(note), transform=gain_axis.transAxes,
                           fontsize=8, va="bottom")  # fmt: skip
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=120)
    plt.close(figure)


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


def _write_results(
    out: Path, machine: dict, args, runs: list[tuple[str, str]], from_log: dict | None = None
) -> None:
    """``OUT/results.md`` / ``.json`` / ``.png``: the runs pooled by (IPC, method variant), then
    every method's gain over random-real paired by seed (charted against the synthesis cost in
    ``OUT/results-gains.png``). ``from_log``: run folder → its report, for runs whose folder is
    gone (:func:`logged_reports`)."""
    from delt.io import atomic_open
    from delt.report import load_report, markdown_table, plot_comparison, pool_reports

    from_log = from_log or {}
    reports = []
    for method, run in runs:
        report = from_log[run] if run in from_log else load_report(run)
        seed = Path(run).name
        reports.append((method, int(seed[4:]) if seed.startswith("seed") else seed, report))
    rows = pool_reports([{**report, "method": method} for method, _, report in reports])
    gains = paired_gains(reports) if args.synthesis == "per-seed" else []
    title = f"Fashion-MNIST, ConvNet-3 w{args.width} teacher and student"
    plot_comparison(rows, out / "results.png", title)
    plot_gains(gains, rows, out / "results-gains.png", title)
    lines = [markdown_table(rows)]
    if gains:
        lines += ["", "| IPC | method | gain over random-real, per seed (points) | mean ± std |",
                  "|---:|---|---|---:|"]  # fmt: skip
        for row in gains:
            per_seed = ", ".join(f"{seed}: {g:+.2f}" for seed, g in row["gains"].items())
            lines.append(f"| {row['ipc']} | {row['method']} | {per_seed} "
                         f"| {row['mean']:+.2f} ± {row['std']:.2f} |")  # fmt: skip
    evaluations = other_evaluations(runs)
    if evaluations:
        lines += ["", "Other evaluations of the same sets (`RUN/distilled/eval-NAME.json`):", "",
                  "| IPC | evaluation | protocol | method | seeds | accuracy (%) "
                  "| gain over random-real (points) |",
                  "|---:|---|---|---|---:|---:|---:|"]  # fmt: skip
        for row in evaluations:
            gain = (f"{row['gain_mean']:+.2f} ± {row['gain_std']:.2f}" if "gains" in row
                    else "–")  # fmt: skip
            lines.append(f"| {row['ipc']} | {row['evaluation']} | {row['protocol']} | "
                         f"{row['method']} | {len(row['accuracies'])} | {row['mean']:.2f} ± "
                         f"{row['std']:.2f} | {gain} |")  # fmt: skip
    with atomic_open(out / "results.md", "w") as handle:
        handle.write("\n".join(lines).rstrip("\n") + "\n")
    per_run = [{"method": m, "seed": seed, **{k: r[k] for k in ("ipc", "accuracy_mean",
               "diversity", "synthesis_seconds", "image_iterations")}}
               for m, seed, r in reports]  # fmt: skip
    document = {"machine": machine, "args": vars(args), "rows": rows, "gains": gains,
                "evaluations": evaluations, "runs": per_run}  # fmt: skip
    with atomic_open(out / "results.json", "w") as handle:
        handle.write(json.dumps(document, indent=2) + "\n")
    print("\n".join(lines), flush=True)


def _evaluate_student(args, evaluate, eval_config, run_dir, teacher, student, seeds, method, ipc):
    """``delt eval --student STUDENT`` of a run's set (the set's teacher labels it), into
    ``RUN/distilled/eval-STUDENT.json``: a row of results.md's table of other evaluations."""
    distilled = run_dir / "distilled"
    result = evaluate(
        eval_config(
            distilled=str(distilled), teacher=teacher, student=student,
            student_width=args.width if student.startswith("convnet") else None,
            epochs=args.eval_epochs, seeds=tuple(seeds), eval_every=args.students_eval_every,
            amp=args.amp, channels_last=True, out=str(distilled / f"eval-{student}.json"),
            device=args.device, progress=False,
        )
    )  # fmt: skip
    print(
        f"{method:>11} IPC {ipc:>2} student {student}: {result.accuracy_mean:6.2f}% "
        f"({result.document['wall_seconds']:.0f} s{', cached' if result.reused else ''})",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
