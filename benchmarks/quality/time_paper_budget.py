"""Measured pieces of ``run.py --budget paper``, and the projection of its whole run from them.

The full paper-budget benchmark (MI 4000 / RI 500, 300 student epochs tested every 10, IPC 10 and
50, 3 seeds, five methods, two extra students) does not fit a shared 2-core CPU in one session.
This script times a small piece of each kind of work, with one torch thread, and multiplies:

- teacher: ``--teacher-steps`` SGD steps (batch 256, bf16 autocast, channels_last: the
  benchmark's teacher recipe) of its ConvNet-3 (width 64), projected to 10 epochs of 235 steps.
  The timed pieces below use that teacher untrained (BN statistics from 2,560 real images): a
  step costs the same whatever the weights;
- ``delt select`` (DELT's initial images), once per IPC and seed: its cost is one teacher forward
  (bf16, batch 2,000) over the 60,000 training images, timed on ``--select-images`` of them;
- synthesis: ``--method rded`` at IPC 10 in full; ``--method cda`` for ``--iterations`` steps on
  one chunk (SRe2L/CDA's: one image per class, 10 images), scaled by each method's
  image-iterations at the papers' budget (DELT's class-contiguous chunks of up to 100 images are
  counted by their images, as in the short-budget table, where DELT and CDA cost 0.99 and 1.10 ms
  per image-iteration);
- students: ``--student-epochs`` epochs of ``delt eval``'s trainer per IPC and student
  architecture (on random real images: the cost does not depend on the set), and one test of
  ``--test-images`` test images per architecture, scaled to the 10,000; 300 epochs and 31 tests
  per seed.

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
    parser.add_argument("--teacher-steps", type=int, default=20, help="timed teacher steps")
    parser.add_argument("--iterations", type=int, default=50, help="timed synthesis steps")
    parser.add_argument("--student-epochs", type=int, default=3, help="timed student epochs")
    parser.add_argument("--test-images", type=int, default=500, help="timed test images")
    parser.add_argument("--select-images", type=int, default=6000, help="timed scored images")
    args = parser.parse_args(argv)

    import torch
    from delt import runtime
    from delt.data import TensorImageDataset, load_dataset, load_like
    from delt.evaluate import EvalConfig, EvalContext, draw_random_real
    from delt.models import build_model, load_checkpoint, save_checkpoint
    from delt.recover import RecoverConfig, recover
    from delt.runtime import autocast
    from delt.student_trainer import seeded

    torch.set_num_threads(1)
    out = Path(args.out)
    machine = {**runtime.machine(), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    print(json.dumps(machine), flush=True)
    timing: dict[str, dict] = {}

    def record(name: str, timer: _Timer, **fields) -> None:
        timing[name] = {"wall_s": timer.wall, "cpu_s": timer.cpu, **fields}
        print(f"{name}: {timer.wall:.1f} s wall, {timer.cpu:.1f} s CPU {fields or ''}", flush=True)

    train_set = load_dataset("fashion-mnist", "train", args.data_root)
    info = train_set.info
    torch.manual_seed(0)
    model = build_model("convnet3", info, {"width": 64}).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    cpu = torch.device("cpu")
    batches = [
        train_set.images(range(k * 256, (k + 1) * 256)).contiguous(
            memory_format=torch.channels_last
        )
        for k in range(10)
    ]
    model.train()
    with _Timer() as timer:
        for step in range(args.teacher_steps):
            images = batches[step % 10]
            with autocast(cpu, "bf16"):
                logits = model(images)
            targets = train_set.targets[(step % 10) * 256 : (step % 10 + 1) * 256]
            loss = torch.nn.functional.cross_entropy(logits.float(), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    record("teacher_steps", timer, steps=args.teacher_steps)
    with torch.no_grad():  # BN running statistics of real data, then frozen
        for images in batches:
            model(images)
    model.eval()
    teacher_path = str(out / "teacher" / "teacher.pt")
    (out / "teacher").mkdir(parents=True, exist_ok=True)
    meta = {
        "arch": "convnet3", "arch_kwargs": {"width": 64}, "dataset": info.to_dict(),
        "data_root": args.data_root, "test_accuracy": 0.0, "epochs": 0, "train_seconds": 0.0,
    }  # fmt: skip
    save_checkpoint(teacher_path, model, meta)

    with _Timer() as timer, torch.no_grad():
        for start in range(0, args.select_images, 2000):
            images = train_set.images(range(start, min(start + 2000, args.select_images)))
            with autocast(cpu, "bf16"):
                model(images.contiguous(memory_format=torch.channels_last))
    record("select", timer, images=args.select_images)

    def timed_recover(name: str, **fields):
        """One timed ``delt recover`` from the teacher into OUT/name."""
        with _Timer() as timer:
            result = recover(
                RecoverConfig(
                    teacher=teacher_path, out=str(out / name), channels_last=True,
                    progress=False, **fields,
                )
            )  # fmt: skip
        return timer, result

    timer, result = timed_recover("rded10", ipc=10, method="rded", data_root=args.data_root)
    record("rded_ipc10", timer, synthesis_s=result.synthesis_seconds)

    timer, result = timed_recover("cda_chunk", ipc=1, method="cda", iterations=args.iterations)
    record(
        "cda_chunk", timer, steps=args.iterations, images=info.num_classes,
        synthesis_s=result.synthesis_seconds,
    )  # fmt: skip

    full_test = load_like(load_checkpoint(teacher_path).info, "test", args.data_root)
    test_set = TensorImageDataset(
        info, full_test.pixels[: args.test_images], full_test.targets[: args.test_images]
    )
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
                    record(f"student_{student}_test", timer, images=len(test_set))

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

    chunk = timing["cda_chunk"]
    teacher = timing["teacher_steps"]
    for key in ("wall_s", "cpu_s"):
        add("teacher (10 epochs, once)", key, 10 * 235 * teacher[key] / teacher["steps"])
        select = timing["select"][key] * 60_000 / timing["select"]["images"]
        add("delt select (per IPC, seed)", key, len(IPCS) * SEEDS * select)
        per_image_iteration = chunk[key] / (chunk["images"] * chunk["steps"])
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
                per_test = test[key] * 10_000 / test["images"]
                per_seed = EPOCHS * epochs[key] / epochs["epochs"] + TESTS * per_test
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
