"""``delt demo`` (``make demo``): Fashion-MNIST end to end on a CPU in a few minutes.

1. trains (or reuses) a ConvNet-3 teacher of width 64;
2. selects IPC 10 real images per class by DELT's ``medium`` order;
3. recovers them with DELT at IPC 10 (full precision, channels_last); MI/RI are scaled down
   from the paper's 4000/500 to 1000/125 (the same 8 rounds) so that it fits a CPU; the
   manifest records what ran;
4. trains a student briefly on the result with teacher soft labels (:mod:`delt.evaluate`) and,
   for scale, on IPC 10 random real images with the same recipe;
5. prints a summary table and writes ``OUT/distilled_grid.png`` (one row per class) and
   ``OUT/summary.json``.

Teacher training, scoring and the student use bf16 autocast and channels_last: 3-4x faster on a
CPU. Every step caches: a re-run reuses the teacher, the selection and the finished recovery.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from delt.config import ConfigError, option
from delt.data import load_dataset
from delt.evaluate import StudentConfig, load_distilled, train_student
from delt.io import atomic_open, write_json
from delt.models import load_checkpoint
from delt.recover import RecoverConfig, recover
from delt.runtime import logger, resolve_device
from delt.select import SelectConfig, select_images
from delt.teacher import TeacherConfig, train_teacher

__all__ = ["DemoConfig", "run_demo"]


@dataclass
class DemoConfig:
    """Configuration of ``delt demo`` (one field per flag)."""

    out: str = option("runs/demo", help="output folder (teacher/, select/, delt-ipc10/, ...)")
    data_root: str | None = option(
        None, help="Fashion-MNIST folder (default: the Debian package's)"
    )
    width: int = option(64, help="ConvNet-3 width of teacher and student")
    teacher_epochs: int = option(3, help="teacher training epochs")
    ipc: int = option(10, help="images per class")
    iterations: int = option(1000, help="DELT MI (the paper: 4000)")
    round_iterations: int = option(125, help="DELT RI (the paper: 500)")
    student_epochs: int = option(200, help="epochs of the brief student training")
    seed: int = option(0, help="random seed of every step")
    device: str = option("auto", help="auto, cpu, cuda, ...", identity=False)
    progress: bool = option(True, help="show progress bars", identity=False)

    def __post_init__(self) -> None:
        for name in (
            "width",
            "teacher_epochs",
            "ipc",
            "iterations",
            "round_iterations",
            "student_epochs",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )


def _write_grid(images: torch.Tensor, info, ipc: int, path: Path) -> None:
    """One row per class, ``ipc`` images per row, denormalized, (N, C, H, W); atomic."""
    from torchvision.utils import save_image

    pixels = info.denormalize(images).clamp(0, 1)
    # 3x nearest-neighbour upscaling: 28-pixel images are too small to look at.
    pixels = torch.nn.functional.interpolate(pixels, scale_factor=3, mode="nearest")
    with atomic_open(path, "wb") as handle:
        save_image(pixels, handle, nrow=ipc, padding=2, pad_value=1.0, format="png")


def run_demo(config: DemoConfig) -> dict:
    """Runs the demo; returns the summary it prints and writes to ``OUT/summary.json``."""
    out = Path(config.out)
    started = time.perf_counter()
    device = resolve_device(config.device)
    # Fail early, with the install hint, before any work.
    test_set = load_dataset("fashion-mnist", "test", config.data_root)
    rows: list[tuple[str, str, float]] = []

    step = time.perf_counter()
    teacher = train_teacher(
        TeacherConfig(
            out=str(out / "teacher"), dataset="fashion-mnist", data_root=config.data_root,
            arch="convnet3", width=config.width, epochs=config.teacher_epochs, seed=config.seed,
            device=config.device, progress=config.progress,
        )
    )  # fmt: skip
    rows.append(
        (
            "teacher",
            f"ConvNet-3 w{config.width}, {config.teacher_epochs} epochs: "
            f"{teacher.test_accuracy:.2f}% test" + (" (cached)" if teacher.reused else ""),
            teacher.train_seconds,
        )
    )

    step = time.perf_counter()
    select_images(
        SelectConfig(
            teacher=str(teacher.path), ipc=config.ipc, out=str(out / "select"), strategy="medium",
            data_root=config.data_root, seed=config.seed, batch_size=2000, amp="bf16",
            channels_last=True, device=config.device, progress=config.progress,
        )
    )  # fmt: skip
    rows.append(
        ("select", f"medium, {config.ipc} per class of 60,000 scored", time.perf_counter() - step)
    )

    recovery = recover(
        RecoverConfig(
            teacher=str(teacher.path), ipc=config.ipc, out=str(out / f"delt-ipc{config.ipc}"),
            method="delt", selection=str(out / "select"), data_root=config.data_root,
            iterations=config.iterations, round_iterations=config.round_iterations,
            channels_last=True, seed=config.seed, device=config.device, progress=config.progress,
        )
    )  # fmt: skip
    image_iterations = sum(recovery.iterations_per_image)
    full = len(recovery.labels) * config.iterations
    rows.append(
        (
            "recover",
            f"DELT IPC {config.ipc}, MI {config.iterations} / RI {config.round_iterations}: "
            f"{image_iterations:,} image-its ({100 * image_iterations / full:.1f}% of {full:,})",
            recovery.wall_seconds,
        )
    )

    checkpoint = load_checkpoint(teacher.path)
    teacher_model = checkpoint.model.to(device).requires_grad_(False)
    # The teacher runs in channels_last here too: about 3x faster convolutions on a CPU.
    teacher_model = teacher_model.to(memory_format=torch.channels_last)
    student_config = StudentConfig(
        epochs=config.student_epochs, amp="bf16", channels_last=True, seed=config.seed
    )
    images, _, manifest = load_distilled(recovery.out)
    student = train_student(
        images, teacher_model, checkpoint.meta, test_set, student_config, device, config.progress
    )
    rows.append(
        (
            "student (DELT)",
            f"{student.steps} KD steps on {len(images)} images: {student.test_accuracy:.2f}% test",
            student.seconds,
        )
    )

    # Same student recipe on random real images: what the distilled set is worth against it.
    train_set = load_dataset("fashion-mnist", "train", config.data_root)
    generator = torch.Generator().manual_seed(config.seed)
    random_indices = torch.cat(
        [
            torch.nonzero(train_set.targets == c).view(-1)[
                torch.randperm(int((train_set.targets == c).sum()), generator=generator)[
                    : config.ipc
                ]
            ]
            for c in range(train_set.info.num_classes)
        ]
    )
    baseline = train_student(
        train_set.images(random_indices), teacher_model, checkpoint.meta, test_set, student_config,
        device, config.progress,
    )  # fmt: skip
    rows.append(
        (
            "student (random real)",
            f"same recipe on {config.ipc}/class random real images: "
            f"{baseline.test_accuracy:.2f}% test",
            baseline.seconds,
        )
    )

    grid_path = out / "distilled_grid.png"
    _write_grid(images, checkpoint.info, config.ipc, grid_path)
    total = time.perf_counter() - started
    summary = {
        "teacher_accuracy": teacher.test_accuracy,
        "teacher_train_seconds": teacher.train_seconds,
        "teacher_cached": teacher.reused,
        "selection": str(out / "select" / "selection.json"),
        "distilled": str(recovery.out),
        "image_iterations": image_iterations,
        "synthesis_seconds": recovery.wall_seconds,
        "student_accuracy": student.test_accuracy,
        "random_real_accuracy": baseline.test_accuracy,
        "student": vars(student_config),
        "grid": str(grid_path),
        "demo_seconds": total,
        "manifest_iterations": {
            "iterations": manifest["config"]["iterations"],
            "round_iterations": manifest["config"]["round_iterations"],
        },
    }
    write_json(out / "summary.json", summary)
    width = max(len(name) for name, _, _ in rows)
    print()
    print(f"{'step':<{width}}  {'seconds':>8}  result")
    print(f"{'-' * width}  {'-' * 8}  {'-' * 60}")
    for name, text, seconds in rows:
        print(f"{name:<{width}}  {seconds:8.1f}  {text}")
    print(f"{'total':<{width}}  {total:8.1f}  grid: {grid_path}; outputs under {out}/")
    logger.info("demo: done in %.0f s", total)
    return summary
