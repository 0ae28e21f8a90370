"""Measured pieces of ``run.py --budget paper``, and the projection of its whole run from them.

The full paper-budget benchmark (MI 4000 / RI 500, 300 student epochs tested every 10, IPC 10 and
50, 3 seeds, five methods, two extra students) does not fit a shared 2-core CPU in one session.
This script times a small piece of each kind of work, with one torch thread, and multiplies:

- teacher: one epoch of the benchmark's ConvNet-3 (width 64) teacher (the benchmark trains 10);
- ``delt select`` (DELT's initial images), once per IPC and seed;
- synthesis: ``--method rded`` at IPC 10 in full; ``--method cda`` for ``--iterations`` steps on
  one chunk of 100 images (one image per class per chunk, all of them active: what a step costs
  at the batch size every method uses), scaled by each method's image-iterations at the papers'
  budget (the cost of a step grows with the active images: DELT's partial batches are counted by
  their images, as in the short-budget table);
- students: ``--student-epochs`` epochs of ``delt eval``'s trainer per IPC and student
  architecture (on random real images: the cost does not depend on the set), and one test of
  the 10,000 test images per architecture; 300 epochs and 31 tests per seed.

Wall seconds depend on what else runs on the machine; CPU seconds (``time.process_time``, one
thread) much less, so the projection is given for both. Results: ``OUT/timing.json`` and the
table printed.

    PYTHONPATH=python python benchmarks/quality/time_paper_budget.py --out runs/quality-timing
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# The paper budget (run.py BUDGETS["paper"]).
IPCS = (10, 50)
SEEDS = 3
EPOCHS, EVAL_EVERY = 300, 10
TESTS = EPOCHS // EVAL_EVERY + 1  # every 10 epochs and after the last (the 300th counted once)
STUDENTS = ("convnet3", "resnet18_small", "convnet4")
MI, RI = 4000, 500


def _image_iterations(method: str, ipc: int) -> int:
    from delt.schedules import early_late_iterations

    if method in ("random-real", "rded"):
        return 0
    if method == "delt":
        return 10 * sum(early_late_iterations(ipc, MI, RI))
    return 10 * ipc * MI  # sre2l, cda


class _Timer:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/quality-timing")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--iterations", type=int, default=100, help="timed synthesis steps")
    parser.add_argument("--student-epochs", type=int, default=5, help="timed student epochs")
    args = parser.parse_args(argv)

    import torch
    from delt import runtime
    from delt.data import load_like
    from delt.evaluate import EvalConfig, EvalContext, draw_random_real
    from delt.models import load_checkpoint
    from delt.recover import RecoverConfig, recover
    from delt.select import SelectConfig, select_images
    from delt.student import seeded
    from delt.teacher import TeacherConfig, train_teacher

    torch.set_num_threads(1)
    out = Path(args.out)
    machine = {**runtime.machine(), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    print(json.dumps(machine), flush=True)
    timing: dict[str, dict] = {}

    def record(name: str, timer: _Timer, **fields) -> None:
        timing[name] = {"wall_s": timer.wall, "cpu_s": timer.cpu, **fields}
        print(f"{name}: {timer.wall:.1f} s wall, {timer.cpu:.1f} s CPU {fields or ''}", flush=True)

    with _Timer() as timer:
        teacher = train_teacher(
            TeacherConfig(
                out=str(out / "teacher"), dataset="fashion-mnist", data_root=args.data_root,
                arch="convnet3", width=64, epochs=1, seed=0, progress=False,
            )
        )  # fmt: skip
    record("teacher_epoch", timer)
    teacher_path = str(teacher.path)

    with _Timer() as timer:
        select_images(
            SelectConfig(
                teacher=teacher_path, ipc=50, out=str(out / "select"), data_root=args.data_root,
                batch_size=2000, amp="bf16", channels_last=True, progress=False,
            )
        )  # fmt: skip
    record("select", timer)

    with _Timer() as timer:
        result = recover(
            RecoverConfig(
                teacher=teacher_path, ipc=10, out=str(out / "rded10"), method="rded",
                data_root=args.data_root, channels_last=True, progress=False,
            )
        )  # fmt: skip
    record("rded_ipc10", timer, synthesis_s=result.synthesis_seconds)

    with _Timer() as timer:
        result = recover(
            RecoverConfig(
                teacher=teacher_path, ipc=1, out=str(out / "cda_chunk"), method="cda",
                iterations=args.iterations, channels_last=True, progress=False,
            )
        )  # fmt: skip
    record("cda_100_images", timer, steps=args.iterations, synthesis_s=result.synthesis_seconds)

    info = load_checkpoint(teacher_path).info
    test_set = load_like(info, "test", args.data_root)
    for ipc in IPCS:
        for student in STUDENTS:
            config = EvalConfig(
                distilled=str(out / "rded10"), teacher=teacher_path, random_real=True, ipc=ipc,
                data_root=args.data_root, student=student,
                student_width=64 if student.startswith("convnet") else None,
                epochs=args.student_epochs, eval_every=args.student_epochs + 1, amp="bf16",
                channels_last=True, out=str(out / f"eval-{student}-{ipc}.json"), progress=False,
            )  # fmt: skip
            context = EvalContext.from_config(config)
            images, labels, _ = draw_random_real(context.train_set, ipc, 0)
            with seeded(0):
                trainer = context.make_trainer(0)
                with _Timer() as timer:
                    for _ in range(args.student_epochs):
                        trainer.train_epoch(images, labels)
                record(f"student_{student}_ipc{ipc}_epochs", timer, epochs=args.student_epochs)
                if ipc == IPCS[0]:  # a test does not depend on the IPC
                    with _Timer() as timer:
                        trainer.test(test_set)
                    record(f"student_{student}_test", timer)

    projection = project(timing)
    (out / "timing.json").write_text(
        json.dumps({"machine": machine, "timing": timing, "projection": projection}, indent=2)
    )
    print(markdown(projection))
    return 0


METHODS = ("random-real", "rded", "sre2l", "cda", "delt")


def project(timing: dict) -> dict:
    """Seconds (wall and CPU) of each part of the paper-budget run, from the measured pieces."""
    parts: dict[str, dict[str, float]] = {}

    def add(name: str, key: str, seconds: float) -> None:
        parts.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})[key] += seconds

    chunk = timing["cda_100_images"]
    for key in ("wall_s", "cpu_s"):
        add("teacher (10 epochs, once)", key, 10 * timing["teacher_epoch"][key])
        add("delt select (per IPC, seed)", key, len(IPCS) * SEEDS * timing["select"][key])
        per_image_iteration = chunk[key] / (100 * chunk["steps"])
        for method in METHODS:
            for ipc in IPCS:
                if method == "rded":
                    seconds = timing["rded_ipc10"][key]  # scoring: the same crops at any IPC
                else:
                    seconds = _image_iterations(method, ipc) * per_image_iteration
                add(f"synthesis {method}", key, SEEDS * seconds)
        for student in STUDENTS:
            for ipc in IPCS:
                epochs = timing[f"student_{student}_ipc{ipc}_epochs"]
                test = timing[f"student_{student}_test"]
                per_seed = EPOCHS * epochs[key] / epochs["epochs"] + TESTS * test[key]
                add(f"students {student}", key, len(METHODS) * SEEDS * per_seed)
    total = {k: sum(p[k] for p in parts.values()) for k in ("wall_s", "cpu_s")}
    return {"parts": parts, "total": total}


def markdown(projection: dict) -> str:
    lines = ["| part | projected wall h | projected CPU h |", "|---|---:|---:|"]
    for name, part in {**projection["parts"], "**total**": projection["total"]}.items():
        lines.append(f"| {name} | {part['wall_s'] / 3600:.2f} | {part['cpu_s'] / 3600:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
