"""``delt bench eval``: the cost of evaluating a distilled set, one student epoch and one test pass.

A student of ``--arch`` at ``--resolution`` trains one epoch on ``--ipc`` random images per class
(``--batch-size`` per step, soft labels of a teacher of the same architecture) and tests once on
``--test-images`` images; every row is timed ``--repeats`` times, the rows interleaved (after one
warm-up run each), so that every ratio compares runs made side by side under the same load:

=====================  ==========================================================================
row                    what it runs
=====================  ==========================================================================
``reference``          the loop of main a713465, written here: per step the batch's augmentation
                       (the product's RandAugment and crop, then CutMix), the teacher's
                       forward, the student's forward and backward, the KL loss, AdamW, the
                       loss read back; the test pass in eager mode in batches of 500 under
                       ``no_grad``, contiguous
``floor``              per step the teacher's forward and the student's forward and backward
                       alone, on batches made beforehand; the test pass: the folded student's
                       forward alone, same layout, precision and batch as ``delt``'s
``delt``               the product: :class:`~delt.student_trainer.StudentTrainer` (defaults:
                       fp32, contiguous) and its test pass (:func:`delt.batches.evaluate_accuracy`)
``+channels_last``     ``delt`` with ``--channels-last`` (training; the CPU's test pass is
                       channels_last in every row but ``reference``)
``floor+lean``         ``floor`` in channels_last with the teacher's BatchNorm folded: the
                       floor of ``+lean`` (its ``floor / row``)
``+lean``              ``delt`` with ``--channels-last --fold-teacher`` (the lean step)
=====================  ==========================================================================

The models are untrained (seeded): the cost of a step does not depend on the weights. The
projection turns a row's ms per step and per test image into hours of a ``delt eval`` of 300
epochs and 3 seeds, tested every 10 epochs and after the last (31 passes), at the default batch
(:func:`~delt.student_trainer.default_batch_size`): for Fashion-MNIST (10 classes, 10,000 test
images) and ImageNet-1K (1,000 classes, 50,000) at IPC 10 and 50. It is an estimate for a
dataset only when the bench measured that dataset's student and resolution on the device in
question (ConvNet-3 at 28 px, 1 channel; ResNet-18 at 224 px); otherwise it only restates the
measured rate.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from delt.batches import evaluate_accuracy, inference_copy, test_batch_size
from delt.bench import bench_header, bench_info, timed
from delt.config import ConfigError, check_int_fields, option
from delt.data import DatasetInfo, TensorImageDataset
from delt.io import write_json
from delt.models import build_model
from delt.runtime import machine, resolve_device, with_threads
from delt.student_augment import StudentAugment, apply_cutmix, sample_cutmix
from delt.student_trainer import (
    PROTOCOL,
    StudentTrainer,
    TrainSettings,
    default_batch_size,
    parameter_groups,
    soft_label_kl,
)

__all__ = ["EVAL_ROWS", "EvalBenchConfig", "format_eval_table", "run_eval_bench"]

EVAL_ROWS = ("reference", "floor", "delt", "+channels_last", "floor+lean", "+lean")
# The floor a row's ``floor / row`` divides by (default: ``floor``).
FLOOR_OF = {"floor+lean": "floor+lean", "+lean": "floor+lean"}
# The projection's evaluations: (name, classes, test images), 300 epochs, 3 seeds, 31 tests.
PROJECTED = (("fashion-mnist", 10, 10_000), ("imagenet-1k", 1000, 50_000))
PROJECTED_EPOCHS, PROJECTED_SEEDS, PROJECTED_TESTS = 300, 3, 31
_REFERENCE_TEST_BATCH = 500


@dataclass
class EvalBenchConfig:
    """Configuration of ``delt bench eval`` (one field per flag)."""

    arch: str = option("convnet3", help="student (and teacher) architecture")
    width: int = option(64, help="convnetD only: channels per block")
    resolution: int = option(28, help="image size in pixels")
    channels: int = option(1, help="image channels")
    classes: int = option(10, help="classes")
    ipc: int = option(10, help="images per class of the trained set (one epoch)")
    batch_size: int = option(0, help="images per training step (0: delt eval's default)")
    test_images: int = option(10_000, help="images of the test pass")
    repeats: int = option(3, help="timed runs of every row (interleaved; the median is shown)")
    rows: tuple[str, ...] = option(EVAL_ROWS, help=f"rows to run, of {', '.join(EVAL_ROWS)}")
    device: str = option("auto", help="auto, cpu, cuda, cuda:1, ...")
    threads: int = option(0, help="torch CPU threads (0: leave torch's default)")
    seed: int = option(0, help="seed of the models and images")
    json: str | None = option(None, help="also write the rows, config and machine to this file")
    progress: bool = option(True, help="show a progress bar")

    def __post_init__(self) -> None:
        check_int_fields(
            self, ("width", "resolution", "channels", "classes", "ipc", "test_images", "repeats")
        )
        check_int_fields(self, ("threads", "batch_size"), low=0)
        self.rows = tuple(self.rows)
        unknown = [row for row in self.rows if row not in EVAL_ROWS]
        if unknown or not self.rows or len(set(self.rows)) != len(self.rows):
            raise ConfigError(
                f"--rows {','.join(self.rows)}: expected distinct rows of {', '.join(EVAL_ROWS)}"
            )

    @property
    def train_images(self) -> int:
        return self.ipc * self.classes

    @property
    def step_batch(self) -> int:
        if self.batch_size:
            return min(self.batch_size, self.train_images)
        return default_batch_size(self.ipc, self.classes, self.train_images)


@dataclass
class _Case:
    info: DatasetInfo
    teacher: nn.Module
    student: nn.Module
    images: torch.Tensor  # (N, C, H, W) float32 normalized, the trained set
    labels: torch.Tensor
    test_set: TensorImageDataset
    device: torch.device


def _build_case(config: EvalBenchConfig, device: torch.device) -> _Case:
    info = bench_info(config.classes, config.channels, config.resolution)
    kwargs = {"width": config.width} if config.arch.startswith("convnet") else {}
    torch.manual_seed(config.seed)
    teacher = build_model(config.arch, info, kwargs).to(device).eval().requires_grad_(False)
    student = build_model(config.arch, info, kwargs)
    generator = torch.Generator().manual_seed(config.seed)
    shape = (config.channels, config.resolution, config.resolution)
    images = torch.randn((config.train_images, *shape), generator=generator)
    labels = torch.arange(config.train_images) % config.classes
    pixels = torch.randint(
        0, 256, (config.test_images, *shape), dtype=torch.uint8, generator=generator
    )
    test_set = TensorImageDataset(info, pixels, torch.arange(config.test_images) % config.classes)
    return _Case(info, teacher, student, images, labels, test_set, device)


def _augment(case: _Case, seed: int) -> StudentAugment:
    generator = torch.Generator().manual_seed(seed)
    return StudentAugment(case.info, PROTOCOL.randaugment_ops, PROTOCOL.randaugment_magnitude,
                          PROTOCOL.min_crop, generator)  # fmt: skip


def _reference_epoch(case: _Case, config: EvalBenchConfig) -> Callable[[], None]:
    student = copy.deepcopy(case.student).to(case.device)
    optimizer = torch.optim.AdamW(parameter_groups(student, PROTOCOL.weight_decay), lr=PROTOCOL.lr)
    augment = _augment(case, config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    images = case.images.to(case.device)

    def epoch() -> None:
        order = torch.randperm(images.shape[0])
        for start in range(0, images.shape[0], config.step_batch):
            batch = images[order[start : start + config.step_batch]]
            batch = augment.apply(batch, augment.plan(tuple(batch.shape)))
            size = config.resolution
            cutmix = sample_cutmix(batch.shape[0], size, size, PROTOCOL.cutmix_beta, generator)
            batch = apply_cutmix(batch, cutmix)
            with torch.no_grad():
                teacher_logits = case.teacher(batch)
            student.train()
            loss = soft_label_kl(student(batch), teacher_logits, PROTOCOL.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            float(loss.detach())

    return epoch


def _reference_test(case: _Case) -> Callable[[], None]:
    student = copy.deepcopy(case.student).to(case.device).eval()

    def test() -> None:
        correct = 0
        with torch.no_grad():
            for start in range(0, len(case.test_set), _REFERENCE_TEST_BATCH):
                index = torch.arange(start, min(start + _REFERENCE_TEST_BATCH, len(case.test_set)))
                logits = student(case.test_set.images(index).to(case.device))
                correct += int((logits.argmax(1).cpu() == case.test_set.targets[index]).sum())

    return test


def _floor_epoch(
    case: _Case, config: EvalBenchConfig, channels_last: bool, fold_teacher: bool = False
) -> Callable[[], None]:
    form = torch.channels_last if channels_last else torch.contiguous_format
    student = copy.deepcopy(case.student).to(case.device).to(memory_format=form).train()
    teacher = _teacher(case, channels_last, fold_teacher)
    batches = [
        case.images[start : start + config.step_batch]
        .to(case.device)
        .contiguous(memory_format=form)
        for start in range(0, case.images.shape[0], config.step_batch)
    ]

    def epoch() -> None:
        for batch in batches:
            with torch.no_grad():
                teacher(batch)
            student(batch).sum().backward()

    return epoch


def _floor_test(case: _Case) -> Callable[[], None]:
    channels_last = case.device.type == "cpu"
    form = torch.channels_last if channels_last else torch.contiguous_format
    student = inference_copy(case.student.to(case.device), channels_last)
    size = test_batch_size(case.device)
    batches = [
        case.test_set.images(torch.arange(s, min(s + size, len(case.test_set))))
        .to(case.device)
        .contiguous(memory_format=form)
        for s in range(0, len(case.test_set), size)
    ]

    def test() -> None:
        with torch.inference_mode():
            for batch in batches:
                student(batch)

    return test


def _teacher(case: _Case, channels_last: bool, fold: bool) -> nn.Module:
    """The teacher as ``delt eval`` prepares it (``--channels-last``, ``--fold-teacher``)."""
    if fold:
        return inference_copy(case.teacher, channels_last)
    teacher = copy.deepcopy(case.teacher)
    return teacher.to(memory_format=torch.channels_last) if channels_last else teacher


def _product(case: _Case, config: EvalBenchConfig, channels_last: bool, fold_teacher: bool = False):
    settings = TrainSettings(batch_size=config.step_batch, channels_last=channels_last)
    generator = torch.Generator().manual_seed(config.seed)
    teacher = _teacher(case, channels_last, fold_teacher)
    trainer = StudentTrainer(
        copy.deepcopy(case.student), teacher, _augment(case, config.seed), settings,
        total_epochs=10**6, lr=PROTOCOL.lr, weight_decay=PROTOCOL.weight_decay,
        device=case.device, generator=generator, data_parallel=False,
    )  # fmt: skip

    def epoch() -> None:
        trainer.train_epoch(case.images, case.labels)

    def test() -> None:
        evaluate_accuracy(trainer.student, case.test_set, case.device, channels_last=channels_last)

    return epoch, test


@dataclass
class EvalBenchSetup:
    """Every row's ``(epoch, test)`` callables, ready to time (nothing timed yet)."""

    rows: dict[str, tuple[Callable[[], None], Callable[[], None]]]
    steps: int
    train_images: int
    test_images: int
    device: torch.device


def prepare_eval_rows(config: EvalBenchConfig, device: torch.device | None = None):
    """Builds the models, the images and every row of ``config.rows``."""
    device = resolve_device(config.device) if device is None else device
    case = _build_case(config, device)
    builders = {
        "reference": lambda: (_reference_epoch(case, config), _reference_test(case)),
        "floor": lambda: (_floor_epoch(case, config, False), _floor_test(case)),
        "delt": lambda: _product(case, config, False),
        "+channels_last": lambda: _product(case, config, True),
        "floor+lean": lambda: (_floor_epoch(case, config, True, True), _floor_test(case)),
        "+lean": lambda: _product(case, config, True, True),
    }
    return EvalBenchSetup(
        rows={row: builders[row]() for row in config.rows},
        steps=math.ceil(config.train_images / config.step_batch),
        train_images=config.train_images,
        test_images=config.test_images,
        device=device,
    )


def projected_hours(ms_per_step: float, ms_per_test_image: float) -> dict[str, float]:
    """Hours of a 300-epoch, 3-seed ``delt eval`` (31 test passes) per dataset and IPC, from a
    measured step time and test time per image (valid only for the measured arch/resolution)."""
    hours = {}
    for name, classes, test_images in PROJECTED:
        for ipc in (10, 50):
            images = ipc * classes
            steps = math.ceil(images / default_batch_size(ipc, classes, images))
            seconds = (
                PROJECTED_EPOCHS * steps * ms_per_step
                + PROJECTED_TESTS * test_images * ms_per_test_image
            ) / 1e3
            hours[f"{name} ipc{ipc}"] = PROJECTED_SEEDS * seconds / 3600
    return hours


def run_eval_bench(config: EvalBenchConfig) -> dict:
    """Runs the benchmark; prints the table; returns (and with ``--json`` writes) the results.

    Returns:
        ``{"config", "device", "machine", "versions", "load_average", "steps", "rows": [{row,
        epoch_seconds, test_seconds, ms_per_step, train_images_per_second,
        test_images_per_second, epoch_floor_over_row, test_floor_over_row, test_vs_reference,
        projected_hours}, ...]}``.
    """
    device = resolve_device(config.device)
    return with_threads(config.threads, lambda: _run(config, device))


def _run(config: EvalBenchConfig, device: torch.device) -> dict:
    load_before = os.getloadavg()
    where = machine()
    setup = prepare_eval_rows(config, device)
    epochs: dict[str, list[float]] = {row: [] for row in setup.rows}
    tests: dict[str, list[float]] = {row: [] for row in setup.rows}
    with tqdm(total=len(setup.rows) * (config.repeats + 1), desc="bench eval",
              disable=None if config.progress else True) as bar:  # fmt: skip
        for epoch, test in setup.rows.values():  # warm-up
            epoch()
            test()
            bar.update()
        for _ in range(config.repeats):
            for row, (epoch, test) in setup.rows.items():
                epochs[row].append(timed(epoch, device))
                tests[row].append(timed(test, device))
                bar.update()
    header = bench_header(config, device, where, load_before)
    epoch_median = {row: statistics.median(values) for row, values in epochs.items()}
    test_median = {row: statistics.median(values) for row, values in tests.items()}
    rows = []
    for row in setup.rows:
        floor = FLOOR_OF.get(row, "floor")
        ms_per_step = 1e3 * epoch_median[row] / setup.steps
        ms_per_test_image = 1e3 * test_median[row] / setup.test_images
        rows.append(
            {
                "row": row,
                "epoch_seconds": epochs[row],
                "test_seconds": tests[row],
                "ms_per_step": ms_per_step,
                "train_images_per_second": setup.train_images / epoch_median[row],
                "test_images_per_second": setup.test_images / test_median[row],
                "epoch_floor_over_row": epoch_median[floor] / epoch_median[row]
                if floor in epoch_median
                else None,
                "test_floor_over_row": test_median[floor] / test_median[row]
                if floor in test_median
                else None,
                "test_vs_reference": test_median["reference"] / test_median[row]
                if "reference" in test_median
                else None,
                "projected_hours": projected_hours(ms_per_step, ms_per_test_image),
            }
        )
    document = {**header, "steps": setup.steps, "step_batch": config.step_batch, "rows": rows}
    print(format_eval_table(document))
    if config.json is not None:
        write_json(config.json, document)
    return document


def format_eval_table(document: dict) -> str:
    """The markdown table of a :func:`run_eval_bench` document, with its set-up line."""
    config = document["config"]

    def ratio(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}"

    lines = [
        f"{config['arch']} at {config['resolution']} px, {config['channels']} channel(s), "
        f"{config['classes']} classes, IPC {config['ipc']} ({document['steps']} steps of "
        f"{document['step_batch']}), test pass of "
        f"{config['test_images']} images, {document['device']}, "
        f"{document['machine']['threads']} thread(s), median of {config['repeats']} runs; load "
        f"average {document['load_average']['start'][0]:.2f} -> "
        f"{document['load_average']['end'][0]:.2f}",
        "",
        "| row | ms / step | train img/s | floor / row (epoch) | test img/s | test vs reference "
        "| floor / row (test) | " + " | ".join(f"{name} h" for name in _projection_names()) + " |",
        "|---|" + "---:|" * (6 + len(_projection_names())),
    ]
    for row in document["rows"]:
        lines.append(
            f"| {row['row']} | {row['ms_per_step']:.1f} | {row['train_images_per_second']:.0f} | "
            f"{ratio(row['epoch_floor_over_row'])} | {row['test_images_per_second']:.0f} | "
            f"{ratio(row['test_vs_reference'])} | {ratio(row['test_floor_over_row'])} | "
            + " | ".join(f"{row['projected_hours'][n]:.2f}" for n in _projection_names())
            + " |"
        )
    lines += [
        "",
        f"Projection: {PROJECTED_SEEDS} seeds x {PROJECTED_EPOCHS} epochs, {PROJECTED_TESTS} test "
        "passes, delt eval's default batch; an estimate for a dataset only where this bench "
        "measured its student and resolution on this device.",
    ]
    return "\n".join(lines)


def _projection_names() -> list[str]:
    return [f"{name} ipc{ipc}" for name, _, _ in PROJECTED for ipc in (10, 50)]
