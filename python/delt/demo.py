"""``delt demo`` (``make demo``): Fashion-MNIST through ``delt distill`` on a CPU in minutes.

A ConvNet-3 teacher (``OUT/teacher``), then ``delt distill`` with it for ``--method delt`` (MI/RI
scaled down to fit a CPU) and ``random-real``, ``delt report`` over both, one printed table and
``OUT/summary.json``; every step caches (docs/quickstart.md). torch runs with ``--threads``
(default 2, what the README's figures were measured with) whatever the machine's load: the
teacher's training is not bitwise stable across thread counts, so a count chosen from the idle
cores made the printed accuracies depend on how busy the machine was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from delt.config import check_int_fields, option
from delt.data import load_dataset
from delt.io import check_output, write_json
from delt.lock import output_lock
from delt.method import methods
from delt.pipeline import DistillConfig, distill
from delt.report import ReportConfig, compare_runs
from delt.runtime import logger, with_threads
from delt.teacher import train_teacher

__all__ = ["DEMO_THREADS", "DemoConfig", "run_demo"]

# Fixed, not taken from the machine: the README's committed output is of a 2-thread run.
DEMO_THREADS = 2


@dataclass
class DemoConfig:
    """Configuration of ``delt demo`` (one field per flag)."""

    out: str = option("runs/demo", help="output folder (teacher/, delt-ipc10/, ...)")
    data_root: str | None = option(
        None, help="Fashion-MNIST folder (default: the Debian package's)"
    )
    width: int = option(64, help="ConvNet-3 width of teacher and student")
    teacher_epochs: int = option(5, help="teacher training epochs")
    ipc: int = option(10, help="images per class")
    iterations: int = option(1000, help="DELT MI (the paper: 4000)")
    round_iterations: int = option(125, help="DELT RI (the paper: 500)")
    eval_epochs: int = option(100, help="student epochs of `delt eval` (the paper: 300)")
    eval_every: int = option(25, help="test the students every k epochs")
    seed: int = option(0, help="random seed of every step")
    threads: int = option(
        DEMO_THREADS,
        help="torch CPU threads, whatever the machine's load (the results can differ in the last "
        "bits between thread counts; the README's figures: 2)",
        identity=False,
    )
    device: str = option("auto", help="auto, cpu, cuda, ...", identity=False)
    progress: bool = option(True, help="show progress bars", identity=False)

    def __post_init__(self) -> None:
        names = ("width", "teacher_epochs", "ipc", "iterations", "round_iterations")
        check_int_fields(self, (*names, "eval_epochs", "eval_every"))
        check_int_fields(self, ("threads",))

    def distill_config(self, method: str, teacher: str | None) -> DistillConfig:
        return DistillConfig(
            method=method, ipc=self.ipc, out=str(Path(self.out) / f"{method}-ipc{self.ipc}"),
            dataset="fashion-mnist", data_root=self.data_root, teacher=teacher,
            # The teacher's training flags only where it is trained (distill refuses them else).
            **(
                {"arch": "convnet3", "width": self.width, "teacher_epochs": self.teacher_epochs}
                if teacher is None
                else {}
            ),
            iterations=self.iterations,
            round_iterations=self.round_iterations if methods()[method].optimizes else None,
            eval_epochs=self.eval_epochs, eval_every=self.eval_every, seeds=(self.seed,),
            amp="bf16", channels_last=True, seed=self.seed, device=self.device,
            progress=self.progress,
        )  # fmt: skip


def run_demo(config: DemoConfig) -> dict:
    """Runs the demo; returns the summary it prints and writes to ``OUT/summary.json``."""
    return with_threads(config.threads, lambda: _run_demo(config, config.threads))


def _run_demo(config: DemoConfig, threads: int) -> dict:
    with output_lock(config.out) as lock:  # each run below also locks its own folder
        lock.sweep(recursive=False)
        return _demo_steps(config, threads)


def _demo_steps(config: DemoConfig, threads: int) -> dict:
    out = Path(config.out)
    started = time.perf_counter()
    logger.info("demo: %d torch thread(s); outputs under %s/", threads, out)
    check_output(out, "--out")  # it writes summary.json even when every step is cached
    # Fail early, with the install hint, before any work.
    load_dataset("fashion-mnist", "test", config.data_root)

    # One teacher for both runs: train it where the DELT run would, with the same flags.
    teacher_config = config.distill_config("delt", None).teacher_config()
    teacher_config.out = str(out / "teacher")
    teacher = train_teacher(teacher_config)
    rows: list[tuple[str, float, str]] = [
        (
            "teacher",
            teacher.train_seconds,
            f"ConvNet-3 w{config.width}, {config.teacher_epochs} epochs: "
            f"{teacher.test_accuracy:.2f}% test" + (" (cached)" if teacher.reused else ""),
        )
    ]
    runs = {}
    for method in ("delt", "random-real"):
        result = distill(config.distill_config(method, str(teacher.path)), print_summary=False)
        runs[method] = result
        for step in result.steps[1:]:  # the teacher is the shared one above
            cached = " (cached)" if step["cached"] else ""
            rows.append((f"{method}: {step['step']}", step["seconds"], step["result"] + cached))

    chart = out / "comparison.png"
    print()
    comparison = compare_runs(
        ReportConfig(
            runs=tuple(str(r.out) for r in runs.values()),
            out=str(chart),
            title=f"Fashion-MNIST, IPC {config.ipc}, ConvNet-3 w{config.width} "
            f"({config.eval_epochs} student epochs)",
        )
    )
    total = time.perf_counter() - started
    delt_run = runs["delt"]
    summary = {
        "teacher_accuracy": teacher.test_accuracy,
        "teacher_cached": teacher.reused,
        "reports": {method: r.report for method, r in runs.items()},
        "runs": {method: str(r.out) for method, r in runs.items()},
        "comparison": comparison,
        "chart": str(chart),
        "grid": str(delt_run.out / "grid.png"),
        "demo_seconds": total,
        "recovery": {"iterations": config.iterations, "round_iterations": config.round_iterations},
        "eval_epochs": config.eval_epochs,
        "threads": threads,
    }
    write_json(out / "summary.json", summary)
    width = max(len(name) for name, _, _ in rows)
    print()
    print(f"{'step':<{width}}  {'seconds':>8}  result")
    print(f"{'-' * width}  {'-' * 8}  {'-' * 60}")
    for name, seconds, text in rows:
        print(f"{name:<{width}}  {seconds:8.1f}  {text}")
    print(
        f"{'total':<{width}}  {total:8.1f}  {threads} thread(s); chart: {chart}; grid: "
        f"{summary['grid']}; outputs under {out}/"
    )
    logger.info("demo: done in %.0f s", total)
    return summary
