"""``delt bench synthesis``: the throughput of a recovery step, against the papers' eager loop.

One chunk of ``--batch-size`` images of a method (``sre2l``, ``cda``, or ``delt`` with its
EarlyLate active sub-batches) is optimized for ``--iterations`` steps by each row, the rows
interleaved over ``--repeats`` timed runs (after one warm-up run each), so that every ratio
compares runs made side by side under the same load:

=====================  ==========================================================================
row                    what one iteration runs
=====================  ==========================================================================
``reference``          the papers' eager loop, written here from their description
                       (SRe2L, NeurIPS 2023; DELT, CVPR 2025): SRe2L's forward hook per BN (mean,
                       ``permute().contiguous()``, biased var, two norms), torchvision's
                       ``RandomResizedCrop`` + ``RandomHorizontalFlip`` on the batch tensor, a
                       roll, index of the active rows, Adam, a per-channel clamp
``floor``              the teacher's forward and backward w.r.t. its input alone, same batch
                       sizes, nothing else: the limit any recovery loop can reach
``delt``               the product's loop as ``delt recover`` runs it (fp32)
``+channels_last``     ... in channels_last memory format
``+bf16``              ``+channels_last`` and a bfloat16 autocast of the teacher forward
``+compile``           ``+channels_last`` and ``torch.compile`` of the hooked teacher (fp32)
``+per-sample-aug``    ``delt`` (fp32) with a crop/flip/roll per image (``--per-sample-aug``)
``+chunks-per-step``   ``delt`` (fp32) with the ``--chunks-per-step`` chunks in one teacher step
                       (:mod:`delt.chunk_groups`)
=====================  ==========================================================================

With ``--chunks-per-step K`` the run holds the first K chunks of the method's batching (chunk
k's initial images seeded with ``--seed`` + k): every row but ``+chunks-per-step`` optimizes
them one after another, ``+chunks-per-step`` all K in one loop; a row's rate counts the
image-iterations of all K chunks, and its ms / iteration is per chunk-iteration.

The teacher is the architecture untrained (seeded; or ``--teacher`` for a checkpoint): the cost
of a step does not depend on its weights. DELT's active sub-batches are those of the first chunk
of a run at ``--ipc``, with the schedule's MI/RI rounds compressed into ``--iterations`` (each
round gets ``iterations / rounds`` steps), so the mean active batch is that of a real run.

The projection turns a row's images·iterations per second into hours for ImageNet-1K at IPC 10
and 50 (1,000 classes; image-iterations of :mod:`delt.schedules` with MI 4000 and RI 500 for
``delt``, 4000 per image for ``sre2l``/``cda``), beside the hours DELT reports for IPC 50 on one
RTX 4090 (DELT, CVPR 2025, Table 6): DELT 17.6 h, SRe2L/CDA 29.0 h. It is an ImageNet-1K
estimate only when the row measured ResNet-18 at 224 px on the device in question; otherwise it
only restates the measured rate.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import delt_ext
from delt.chunk_groups import ChunkSlotMatching, ChunkTask, optimize_chunks
from delt.config import ConfigError, check_int_fields, option
from delt.data import DatasetInfo
from delt.io import write_json
from delt.method import DEFAULT_ROUND_ITERATIONS, MethodRecipe, SynthesisConfig, methods
from delt.methods.pixels import PixelMethod
from delt.models import build_model, load_checkpoint
from delt.recover import RecoverConfig
from delt.runtime import machine, resolve_device, versions, with_threads
from delt.schedules import chunk_schedule, cosine_lr, early_late_iterations
from delt.synthesis import frozen_teacher, optimize_chunk, recovery_settings

__all__ = [
    "REPORTED_HOURS",
    "ROWS",
    "BenchSetup",
    "EagerBNHook",
    "SynthesisBenchConfig",
    "bench_header",
    "bench_info",
    "format_table",
    "imagenet_image_iterations",
    "prepare_rows",
    "reference_loop",
    "run_synthesis_bench",
    "synchronize",
    "timed",
]


def _presets() -> dict[str, MethodRecipe]:
    """The registered methods that are one pixel-optimizing preset (not pdd's stages)."""
    return {
        name: method.preset for name, method in methods().items() if isinstance(method, PixelMethod)
    }


ROWS = (
    "reference", "floor", "delt", "+channels_last", "+bf16", "+compile", "+per-sample-aug",
    "+chunks-per-step",
)  # fmt: skip
# What each product row turns on: +bf16 and +compile each add to +channels_last (not to each
# other: a CPU without bfloat16 units runs bf16 convolutions ~40x slower than fp32, which would
# leave +compile unmeasurable there); +per-sample-aug is delt (fp32) with per-image augmentation.
_PRODUCT_ROWS = {
    "delt": {},
    "+channels_last": {"channels_last": True},
    "+bf16": {"channels_last": True, "amp": "bf16"},
    "+compile": {"channels_last": True, "compile": True},
    "+per-sample-aug": {"per_sample_aug": True},
}

# Hours of synthesis for ImageNet-1K IPC 50, MI 4000, one RTX 4090 (DELT, CVPR 2025, Table 6).
REPORTED_HOURS = {"delt": 17.6, "sre2l": 29.0, "cda": 29.0}
IMAGENET_CLASSES = 1000
PAPER_ITERATIONS = 4000
# DELT's scripts: MI 4000, RI 500, so 8 rounds.
PAPER_ROUNDS = PAPER_ITERATIONS // DEFAULT_ROUND_ITERATIONS
_MEAN = 0.5
_STD = 0.25


@dataclass
class SynthesisBenchConfig:
    """Configuration of ``delt bench synthesis`` (one field per flag)."""

    method: str = option("delt", help="synthesis method of the chunk", choices=tuple(_presets()))
    arch: str = option("resnet18_small", help="teacher architecture (ignored with --teacher)")
    resolution: int = option(32, help="image size in pixels (ignored with --teacher)")
    channels: int = option(3, help="image channels (ignored with --teacher)")
    classes: int = option(1000, help="classes of the teacher (ignored with --teacher)")
    teacher: str | None = option(None, help="a teacher checkpoint instead of an untrained arch")
    batch_size: int = option(100, help="images per chunk")
    ipc: int = option(50, help="delt: images per class, which fixes the chunk's rounds")
    iterations: int = option(8, help="timed iterations per run (delt: a multiple of --rounds)")
    rounds: int = option(PAPER_ROUNDS, help="delt: MI/RI rounds compressed into --iterations")
    chunks_per_step: int = option(
        1,
        help="chunks of the run (the method's first ones); +chunks-per-step optimizes them "
        "in one teacher step, the other rows one after another",
    )
    repeats: int = option(3, help="timed runs of every row (interleaved; the median is shown)")
    rows: tuple[str, ...] = option(ROWS, help=f"rows to run, of {', '.join(ROWS)}")
    device: str = option("auto", help="auto, cpu, cuda, cuda:1, ...")
    threads: int = option(0, help="torch CPU threads (0: leave torch's default)")
    seed: int = option(0, help="seed of the teacher init and the initial images")
    json: str | None = option(None, help="also write the rows, config and machine to this file")
    progress: bool = option(True, help="show a progress bar")

    def __post_init__(self) -> None:
        presets = _presets()
        if self.method not in presets:
            raise ConfigError(f"--method {self.method!r}: known: {', '.join(presets)}")
        recipe = presets[self.method]
        check_int_fields(
            self,
            ("resolution", "channels", "classes", "batch_size", "ipc", "iterations", "rounds",
             "repeats", "chunks_per_step"),
        )  # fmt: skip
        check_int_fields(self, ("threads",), low=0)
        self.rows = tuple(self.rows)
        unknown = [row for row in self.rows if row not in ROWS]
        if unknown or not self.rows:
            raise ConfigError(
                f"--rows {','.join(self.rows)}: expected one or more of {', '.join(ROWS)}"
            )
        if len(set(self.rows)) != len(self.rows):
            raise ConfigError(f"--rows {','.join(self.rows)}: a row is listed twice")
        if recipe.early_late and self.iterations % self.rounds:
            raise ConfigError(
                f"--iterations ({self.iterations}) must be a multiple of --rounds ({self.rounds}) "
                "for --method delt: every round gets the same number of timed steps"
            )
        if recipe.one_image_per_class and self.batch_size > self.classes:
            raise ConfigError(
                f"--batch-size {self.batch_size} > --classes {self.classes}: a {self.method} "
                "chunk holds one image per class"
            )


def imagenet_image_iterations(method: str, ipc: int) -> int:
    """Image-iterations of an ImageNet-1K run at ``ipc`` with the papers' MI 4000 (RI 500)."""
    if _presets()[method].early_late and ipc > 1:
        per_class = early_late_iterations(ipc, PAPER_ITERATIONS, DEFAULT_ROUND_ITERATIONS)
        return IMAGENET_CLASSES * sum(per_class)
    return IMAGENET_CLASSES * ipc * PAPER_ITERATIONS


# --------------------------------------------------------------------------------------------
# The papers' eager loop (SRe2L's and DELT's recover scripts), written from their description.


class EagerBNHook:
    """SRe2L's BN feature hook: per-layer loss of the input's batch statistics."""

    def __init__(self, module: nn.BatchNorm2d) -> None:
        self.loss: Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.BatchNorm2d, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x = inputs[0]
        channels = x.shape[1]
        mean = x.mean([0, 2, 3])
        var = x.permute(1, 0, 2, 3).contiguous().view([channels, -1]).var(1, unbiased=False)
        self.loss = torch.norm(module.running_var.data - var, 2) + torch.norm(
            module.running_mean.data - mean, 2
        )


def reference_loop(
    teacher: nn.Module,
    init: Tensor,
    labels: Tensor,
    starts: list[int],
    total: int,
    crop_curriculum: bool,
    jitter: int,
    low: list[float],
    high: list[float],
    seed: int,
    lr0: float = 0.25,
    r_bn: float = 0.01,
    first_bn_multiplier: float = 10.0,
) -> Tensor:
    """The papers' loop over one chunk: ``init`` (B, C, H, W) float32 optimized for ``total``
    steps, image ``i`` forwarded from ``starts[i]`` on; returns the final images (CPU).

    ``crop_curriculum``: CDA/DELT's cosine minimum crop scale (else SRe2L's fixed 0.08);
    ``low``/``high``: the per-channel pixel range of the clamp.
    """
    from torchvision import transforms

    hooks = [EagerBNHook(m) for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        torch.manual_seed(seed)  # torchvision's transforms draw from the global generator
        rolls = random.Random(seed)
        size = tuple(init.shape[-2:])
        inputs = init.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([inputs], lr=lr0, betas=(0.5, 0.9), eps=1e-8)
        weights = [first_bn_multiplier] + [1.0] * (len(hooks) - 1)
        for iteration in range(total):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(iteration, total, lr0)
            min_crop = (
                0.08 + 0.92 * 0.5 * (1 + math.cos(math.pi * iteration / total))
                if crop_curriculum
                else 0.08
            )
            augment = transforms.Compose(
                [
                    transforms.RandomResizedCrop(size, scale=(min_crop, 1), antialias=False),
                    transforms.RandomHorizontalFlip(),
                ]
            )
            active = [i for i, start in enumerate(starts) if start <= iteration]
            # DELT indexes the active rows; SRe2L/CDA forward the whole tensor.
            batch = augment(inputs if len(active) == len(starts) else inputs[active])
            if jitter:
                shift_y, shift_x = rolls.randint(0, jitter), rolls.randint(0, jitter)
                batch = torch.roll(batch, shifts=(shift_y, shift_x), dims=(2, 3))
            outputs = teacher(batch)
            loss_bn = sum(w * hook.loss for w, hook in zip(weights, hooks, strict=True))
            loss = (
                nn.functional.cross_entropy(
                    outputs, labels[active] if len(active) < len(starts) else labels
                )
                + r_bn * loss_bn
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for c in range(inputs.shape[1]):
                    inputs.data[:, c] = torch.clamp(inputs.data[:, c], low[c], high[c])
        return inputs.detach().cpu()
    finally:
        for hook in hooks:
            hook.handle.remove()


# --------------------------------------------------------------------------------------------
# Rows


@dataclass
class _Case:
    teacher: nn.Module
    info: DatasetInfo
    init: Tensor  # (B, C, H, W) float32 on the device
    labels: Tensor  # (B,) int64 on the device
    starts: list[int]
    total: int
    device: torch.device

    @property
    def active_counts(self) -> list[int]:
        return [sum(1 for s in self.starts if s <= t) for t in range(self.total)]


def _build_cases(config: SynthesisBenchConfig, device: torch.device) -> list[_Case]:
    """The first ``--chunks-per-step`` chunks of the method's batching, on one teacher."""
    torch.manual_seed(config.seed)
    if config.teacher is not None:
        checkpoint = load_checkpoint(config.teacher)
        teacher, info = checkpoint.model, checkpoint.info
    else:
        info = bench_info(config.classes, config.channels, config.resolution)
        teacher = build_model(config.arch, info)
    teacher = teacher.to(device).eval().requires_grad_(False)
    recipe = _presets()[config.method]
    ipc = config.ipc if recipe.early_late else 1
    if recipe.one_image_per_class and config.batch_size > info.num_classes:
        raise ConfigError(
            f"--batch-size {config.batch_size} > the teacher's {info.num_classes} classes: a "
            f"{config.method} chunk holds one image per class"
        )
    chunks = recipe.chunks(info.num_classes, ipc, config.batch_size)
    if config.chunks_per_step > len(chunks):
        raise ConfigError(
            f"--chunks-per-step {config.chunks_per_step} > the {len(chunks)} chunk(s) of a "
            f"{config.method} run of {info.num_classes} classes at --ipc {ipc} and --batch-size "
            f"{config.batch_size}"
        )
    low, high = info.pixel_bounds()
    cases = []
    for k, chunk in enumerate(chunks[: config.chunks_per_step]):
        if recipe.early_late:
            round_iterations = config.iterations // config.rounds
            total, starts = chunk_schedule(
                chunk.within_class, ipc, config.iterations, round_iterations
            )
        else:
            total, starts = config.iterations, [0] * len(chunk)
        generator = torch.Generator().manual_seed(config.seed + k)
        init = torch.randn(
            len(chunk), info.channels, info.resolution, info.resolution, generator=generator
        )
        init = torch.maximum(torch.minimum(init, high), low)
        labels = torch.tensor(chunk.classes, dtype=torch.int64)
        cases.append(
            _Case(teacher, info, init.to(device), labels.to(device), starts, total, device)
        )
    return cases


def _reference_row(case: _Case, config: SynthesisBenchConfig) -> Callable[[], None]:
    recipe = _presets()[config.method]
    low, high = (t.view(-1).tolist() for t in case.info.pixel_bounds())
    jitter = recipe.default_jitter(case.info.resolution)
    teacher = copy.deepcopy(case.teacher)

    def run() -> None:
        reference_loop(
            teacher, case.init, case.labels, case.starts, case.total,
            recipe.crop_curriculum != "fixed", jitter, low, high, config.seed,
        )  # fmt: skip

    return run


def _floor_row(case: _Case) -> Callable[[], None]:
    teacher = copy.deepcopy(case.teacher)
    counts = case.active_counts
    leaves = {n: case.init[:n].clone().requires_grad_(True) for n in set(counts)}
    generator = torch.Generator().manual_seed(0)
    classes = case.info.num_classes
    grads = torch.randn(case.init.shape[0], classes, generator=generator).to(case.device)

    def run() -> None:
        for count in counts:
            x = leaves[count]
            torch.autograd.grad(teacher(x), x, grads[:count])

    return run


def _product_settings(case: _Case, config: SynthesisBenchConfig, overrides: dict):
    method = methods()[config.method]
    recipe = _presets()[config.method]
    early_late = recipe.early_late
    recover_config: SynthesisConfig = RecoverConfig(
        teacher="-", ipc=config.ipc if early_late else 1, out="-",
        method=config.method, iterations=config.iterations, batch_size=config.batch_size,
        round_iterations=config.iterations // config.rounds if early_late else None,
        selection="-" if recipe.init == "selection" else None,
        progress=False, **overrides,
    )  # fmt: skip
    recover_config = dataclasses.replace(
        recover_config, **method.resolved(recover_config, case.info)
    )
    return recover_config, recovery_settings(recover_config, case.info)


def _product_row(case: _Case, config: SynthesisBenchConfig, row: str) -> Callable[[], None]:
    recover_config, settings = _product_settings(case, config, _PRODUCT_ROWS[row])
    teacher = frozen_teacher(copy.deepcopy(case.teacher), case.device, settings.channels_last)
    bn_matching = delt_ext.BNStatMatching(
        teacher, first_bn_multiplier=recover_config.first_bn_multiplier
    )
    # As delt recover: compile after hooking, so that the hooks are traced into the graph.
    forward = torch.compile(teacher) if recover_config.compile else teacher

    def run() -> None:
        bar = tqdm(total=case.total, disable=True)
        optimize_chunk(
            forward, bn_matching, case.init, case.labels, case.starts, case.total, settings,
            torch.Generator().manual_seed(config.seed), bar,
        )  # fmt: skip
        bar.close()

    return run


def _chunks_per_step_row(cases: list[_Case], config: SynthesisBenchConfig) -> Callable[[], None]:
    # The K chunks in one loop, as delt recover --chunks-per-step K runs them (fp32).
    recover_config, settings = _product_settings(cases[0], config, {})
    teacher = frozen_teacher(copy.deepcopy(cases[0].teacher), cases[0].device, False)
    matching = ChunkSlotMatching(teacher, recover_config.first_bn_multiplier, len(cases))

    def run() -> None:
        tasks = [
            ChunkTask(
                case.init,
                case.labels,
                case.starts,
                case.total,
                torch.Generator().manual_seed(config.seed),
            )
            for case in cases
        ]
        optimize_chunks(teacher, matching, tasks, settings)

    return run


def _one_after_another(runs: list[Callable[[], None]]) -> Callable[[], None]:
    def run() -> None:
        for one in runs:
            one()

    return run


def synchronize(device: torch.device) -> None:
    """Waits for ``device`` (a no-op on the CPU): call before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_header(config, device: torch.device, where: dict, load_before: tuple) -> dict:
    """The set-up keys of a bench document: ``config``, ``device``, ``machine``, ``versions``
    and the ``load_average`` from ``load_before`` to now (call it when the timing ends)."""
    return {
        "config": dataclasses.asdict(config),
        "device": str(device),
        "machine": where,
        "versions": versions(),
        "load_average": {"start": list(load_before), "end": list(os.getloadavg())},
    }


def timed(run: Callable[[], None], device: torch.device) -> float:
    """Seconds that ``run()`` takes on ``device``, synchronized before and after."""
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def bench_info(classes: int, channels: int, resolution: int) -> DatasetInfo:
    """The dataset of a bench's untrained models and random images (mean 0.5, std 0.25)."""
    return DatasetInfo(
        name="bench", num_classes=classes, channels=channels, resolution=resolution,
        mean=(_MEAN,) * channels, std=(_STD,) * channels,
        class_names=tuple(f"class{c}" for c in range(classes)),
    )  # fmt: skip


def run_synthesis_bench(config: SynthesisBenchConfig) -> dict:
    """Runs the benchmark; prints the table; returns (and with ``--json`` writes) the results.

    Returns:
        ``{"config", "device", "machine", "versions", "load_average", "schedule", "rows": [{row,
        method, median_seconds, run_seconds, ms_per_iteration, image_iterations_per_second,
        vs_reference, floor_over_row, peak_memory_mib (None on a CPU), imagenet_hours}, ...],
        "reported_hours"}``; times in seconds, ratios None without their row.
    """
    device = resolve_device(config.device)
    return with_threads(config.threads, lambda: _run(config, device))


@dataclass
class BenchSetup:
    """The rows of a benchmark, ready to time: each ``rows[name]()`` runs one chunk's loop of
    ``iterations`` steps (``image_iterations`` active images summed over them) on ``device``."""

    rows: dict[str, Callable[[], None]]
    iterations: int
    active_counts: list[int]
    input_shape: tuple[int, ...]
    device: torch.device

    @property
    def image_iterations(self) -> int:
        return sum(self.active_counts)

    def synchronize(self) -> None:
        """Waits for the device (a no-op on the CPU): call before reading a clock."""
        synchronize(self.device)


def prepare_rows(config: SynthesisBenchConfig, device: torch.device | None = None) -> BenchSetup:
    """Builds the teacher, the chunks and every row of ``config.rows`` (nothing is timed)."""
    device = resolve_device(config.device) if device is None else device
    cases = _build_cases(config, device)
    builders: dict[str, Callable[[_Case], Callable[[], None]]] = {
        "reference": lambda case: _reference_row(case, config),
        "floor": _floor_row,
        **{row: (lambda case, row=row: _product_row(case, config, row)) for row in _PRODUCT_ROWS},
    }

    def build(row: str) -> Callable[[], None]:
        if row == "+chunks-per-step":
            return _chunks_per_step_row(cases, config)
        runs = [builders[row](case) for case in cases]
        return runs[0] if len(runs) == 1 else _one_after_another(runs)

    return BenchSetup(
        rows={row: build(row) for row in config.rows},
        iterations=sum(case.total for case in cases),
        active_counts=[count for case in cases for count in case.active_counts],
        input_shape=tuple(cases[0].init.shape),
        device=device,
    )


def _run(config: SynthesisBenchConfig, device: torch.device) -> dict:
    load_before = os.getloadavg()
    where = machine()  # its "started" is the start of the measurement
    setup = prepare_rows(config, device)
    rows = setup.rows
    times: dict[str, list[float]] = {row: [] for row in rows}
    peaks: dict[str, float] = {}
    steps = len(rows) * (config.repeats + 1)
    disable = None if config.progress else True  # None: bars on a terminal only
    with tqdm(total=steps, desc="bench synthesis", disable=disable) as bar:
        for row, run in rows.items():  # warm-up: first-call dispatch, allocator, compilation
            bar.set_postfix(row=row, refresh=False)
            run()
            synchronize(device)
            bar.update()
        for _ in range(config.repeats):
            for row, run in rows.items():
                bar.set_postfix(row=row, refresh=False)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times[row].append(timed(run, device))
                if device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated(device) / 2**20
                    peaks[row] = max(peaks.get(row, 0.0), peak)
                bar.update()
    header = bench_header(config, device, where, load_before)
    image_iterations = setup.image_iterations
    medians = {row: statistics.median(values) for row, values in times.items()}
    results = []
    for row, median in medians.items():
        rate = image_iterations / median
        results.append(
            {
                "row": row,
                "method": config.method,
                "median_seconds": median,
                "run_seconds": times[row],
                "ms_per_iteration": 1e3 * median / setup.iterations,
                "image_iterations_per_second": rate,
                "vs_reference": medians["reference"] / median if "reference" in medians else None,
                "floor_over_row": medians["floor"] / median if "floor" in medians else None,
                "peak_memory_mib": peaks.get(row),
                "imagenet_hours": {
                    f"ipc{ipc}": imagenet_image_iterations(config.method, ipc) / rate / 3600
                    for ipc in (10, 50)
                },
            }
        )
    document = {
        **header,
        "schedule": {
            "chunks": config.chunks_per_step,
            "iterations": setup.iterations,
            "active_counts": setup.active_counts,
            "image_iterations": image_iterations,
            "input_shape": list(setup.input_shape),
        },
        "rows": results,
        "reported_hours": {"ipc50": REPORTED_HOURS},
    }
    print(format_table(document))
    if config.json is not None:
        write_json(config.json, document)
    return document


def format_table(document: dict) -> str:
    """The markdown table of a :func:`run_synthesis_bench` document, with its set-up line."""
    config, schedule = document["config"], document["schedule"]
    shape = "x".join(map(str, schedule["input_shape"]))
    mean_active = schedule["image_iterations"] / schedule["iterations"]
    teacher = config["teacher"] or config["arch"]
    chunks = schedule.get("chunks", 1)
    if chunks > 1:
        shape = f"{chunks} chunks of {shape}"
    lines = [
        f"{config['method']}, {teacher}, input {shape}, {document['device']}, "
        f"{document['machine']['threads']} thread(s), {schedule['iterations']} iterations "
        f"(mean active batch {mean_active:.2f}), median of {config['repeats']} runs; load "
        f"average {document['load_average']['start'][0]:.2f} -> "
        f"{document['load_average']['end'][0]:.2f}",
        "",
        "| row | ms / iteration | images·it / s | vs reference | floor / row | peak MiB "
        "| IN-1K IPC 10 h | IN-1K IPC 50 h |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def ratio(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}x"

    for row in document["rows"]:
        memory = "" if row["peak_memory_mib"] is None else f"{row['peak_memory_mib']:.0f}"
        efficiency = "" if row["floor_over_row"] is None else f"{row['floor_over_row']:.2f}"
        lines.append(
            f"| {row['row']} | {row['ms_per_iteration']:.1f} | "
            f"{row['image_iterations_per_second']:.0f} | {ratio(row['vs_reference'])} | "
            f"{efficiency} | {memory} | {row['imagenet_hours']['ipc10']:.1f} | "
            f"{row['imagenet_hours']['ipc50']:.1f} |"
        )
    reported = REPORTED_HOURS[config["method"]]
    if document.get("versions", {}).get("delt_ext_ops") == "False":
        lines += ["", "WARNING: delt_ext's compiled ops did not load; delt rows ran its fallback."]
    lines += [
        "",
        f"Reported for ImageNet-1K IPC 50 on one RTX 4090 (DELT Table 6): {config['method']} "
        f"{reported} h (DELT 17.6 h, SRe2L/CDA 29.0 h). The projection is an ImageNet-1K "
        "estimate only for ResNet-18 at 224 px.",
    ]
    return "\n".join(lines)
