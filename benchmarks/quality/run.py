"""Quality benchmark: random-real, SRe2L, CDA and DELT on Fashion-MNIST at IPC 1, 10 and 50.

One ConvNet-3 teacher (trained once, ``OUT/teacher``) synthesizes for every method and labels
every student; the students are ConvNet-3s of the same width, trained by ``delt eval``'s protocol
(reference/delt.md §5). Every (method, IPC, seed) is one ``delt distill`` run in
``OUT/<method>/ipc<IPC>/seed<seed>``: synthesis seed and evaluation seed are the same number,
so the spread over seeds covers both. ``--synthesis once`` instead synthesizes once per (method,
IPC) with seed 0 and evaluates that set with every seed (``OUT/<method>/ipc<IPC>/once``).

Resumable: ``delt distill`` caches each step (teacher, selection, recovery chunks, each
evaluation seed, diversity), so a killed run picks up where it stopped; finished runs cost
nothing. Each finished run appends a line to ``OUT/progress.jsonl``; at the end the pooled
table goes to ``OUT/results.md`` / ``results.json`` and the chart to ``OUT/results.png``.

    nohup python benchmarks/quality/run.py --out runs/quality > runs/quality.log 2>&1 &

Options are listed by ``--help``; the defaults are the committed benchmark's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

METHODS = ("random-real", "sre2l", "cda", "delt")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/quality", help="output folder")
    parser.add_argument("--data-root", default=None, help="Fashion-MNIST folder")
    parser.add_argument("--ipcs", default="1,10,50", help="comma-separated IPCs")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument(
        "--synthesis", choices=("per-seed", "once"), default="per-seed",
        help="per-seed: synthesis and evaluation seed together; once: one set, every seed "
        "evaluates it",
    )  # fmt: skip
    parser.add_argument("--width", type=int, default=64, help="ConvNet-3 width")
    parser.add_argument("--teacher-epochs", type=int, default=10, help="teacher epochs")
    parser.add_argument("--iterations", type=int, default=400, help="MI of every method")
    parser.add_argument("--round-iterations", type=int, default=50, help="DELT's RI")
    parser.add_argument("--eval-epochs", type=int, default=100, help="student epochs")
    parser.add_argument("--eval-every", type=int, default=50, help="test every k epochs")
    parser.add_argument("--amp", choices=("none", "bf16"), default="bf16", help="eval autocast")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (1: on a shared 2-core machine two OpenMP threads ran the "
        "recovery 4-8x slower than one)",
    )  # fmt: skip
    return parser.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from delt import runtime
    from delt.distill import DistillConfig, distill
    from delt.report import ReportConfig, compare_runs
    from delt.teacher import TeacherConfig, train_teacher

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    seeds = _ints(args.seeds)
    started = time.time()
    machine = {
        **runtime.machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    print(json.dumps(machine), flush=True)

    teacher = train_teacher(
        TeacherConfig(
            out=str(out / "teacher"), dataset="fashion-mnist", data_root=args.data_root,
            arch="convnet3", width=args.width, epochs=args.teacher_epochs, seed=0,
            device=args.device, progress=False,
        )
    )  # fmt: skip
    print(f"teacher: {teacher.path} {teacher.test_accuracy:.2f}% test", flush=True)

    runs = []
    for ipc in _ints(args.ipcs):
        jobs = (
            [(seed, (seed,), f"seed{seed}") for seed in seeds]
            if args.synthesis == "per-seed"
            else [(0, tuple(seeds), "once")]
        )
        for synthesis_seed, eval_seeds, name in jobs:
            for method in methods:
                run_dir = out / method / f"ipc{ipc}" / name
                config = DistillConfig(
                    method=method, ipc=ipc, out=str(run_dir), dataset="fashion-mnist",
                    data_root=args.data_root, teacher=str(teacher.path), arch="convnet3",
                    width=args.width, iterations=args.iterations,
                    round_iterations=args.round_iterations if method == "delt" else None,
                    eval_epochs=args.eval_epochs, seeds=eval_seeds, eval_every=args.eval_every,
                    amp=args.amp, channels_last=True, seed=synthesis_seed, device=args.device,
                    progress=False,
                )  # fmt: skip
                run_started = time.time()
                result = distill(config, print_summary=False)
                record = {
                    **result.report,
                    "run": str(run_dir),
                    "seed": synthesis_seed,
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
                runs.append(str(run_dir))

    rows = compare_runs(
        ReportConfig(
            runs=tuple(runs), out=str(out / "results.png"),
            title=f"Fashion-MNIST, ConvNet-3 w{args.width} teacher and student",
        )
    )  # fmt: skip
    (out / "results.json").write_text(
        json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=2) + "\n"
    )
    print(f"done in {time.time() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
