"""``delt recover --method sre2l|cda|delt``: synthesize a distilled set from a frozen teacher.

Every method optimizes pixels (normalized space) with the recipe of reference/delt.md §1-3:
Adam (lr 0.25, betas (0.5, 0.9), eps 1e-8), cosine LR over the whole loop, loss
``CE(teacher(aug(x)), y) + r_bn * sum_l w_l (||mu_l - RM_l||_2 + ||var_l - RV_l||_2)`` with
``w_1 = 10`` (``delt_ext.BNStatMatching``), and a per-channel clamp to the valid pixel range after
every step. Augmentation is ``delt_ext.RandomResizedCropFlip``, batch-shared by default (one box,
one flip, one roll per step for the whole batch, as the papers' torchvision-on-a-batch code).

===========  ===============  ====================  ====================  ======  ==========
method       init             batches               crop scale            jitter  EarlyLate
===========  ===============  ====================  ====================  ======  ==========
``sre2l``    Gaussian noise   one image per class   fixed (0.08, 1)       yes     no
``cda``      Gaussian noise   one image per class   cosine 1 → 0.08       yes     no
``delt``     ``delt select``  class-contiguous      cosine 1 → 0.08       0       MI/RI rounds
===========  ===============  ====================  ====================  ======  ==========

The work is cut into chunks of ``--batch-size`` images (:mod:`delt.schedules`), each an
independent problem seeded from ``(seed, chunk index)`` and saved to ``OUT/chunks/<k>.pt`` when
done. Re-running the same command skips finished chunks, so a killed run resumes and ends with
the same bytes as an uninterrupted one. Outputs: ``OUT/distilled.pt``, ``OUT/images/<class>/``,
``OUT/manifest.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import delt_ext
from delt.config import ConfigError, config_diff, identity_dict, option
from delt.data import DatasetInfo, load_like
from delt.io import read_json, save_image, torch_load, torch_save, write_json
from delt.models import Checkpoint, TeacherMismatchError, check_compatible, load_checkpoint
from delt.runtime import autocast, derive_seed, logger, resolve_device, versions
from delt.schedules import (
    Chunk,
    chunk_schedule,
    class_contiguous_chunks,
    class_interleaved_chunks,
    cosine_lr,
)
from delt.select import Selection

__all__ = [
    "METHODS",
    "ChunkResult",
    "MethodRecipe",
    "RecoverConfig",
    "RecoverResult",
    "RecoverySettings",
    "optimize_chunk",
    "recover",
]


# --------------------------------------------------------------------------------------------
# Methods


@dataclass(frozen=True)
class MethodRecipe:
    """What distinguishes one synthesis method from another (see the module table).

    Attributes:
        init: ``"noise"`` (standard normal in normalized space) or ``"selection"`` (real images
            from ``delt select``, in selection order).
        chunks: the batching, ``(num_classes, ipc, batch_size) -> list[Chunk]``.
        crop_curriculum: CDA's cosine min-crop schedule 1 → 0.08 (else a fixed (0.08, 1)).
        early_late: MI/RI rounds (``--round-iterations``).
        default_jitter: the roll range in pixels as a function of the image resolution.
    """

    init: Literal["noise", "selection"]
    chunks: Callable[[int, int, int], list[Chunk]]
    crop_curriculum: bool
    early_late: bool
    default_jitter: Callable[[int], int]


def _sre2l_jitter(resolution: int) -> int:
    # SRe2L/CDA rolled by up to 32 pixels at 224 (ImageNet) and by 4 on Tiny/CIFAR (delt.md §3.2).
    return 32 if resolution >= 224 else 4


METHODS: dict[str, MethodRecipe] = {
    "sre2l": MethodRecipe("noise", class_interleaved_chunks, False, False, _sre2l_jitter),
    "cda": MethodRecipe("noise", class_interleaved_chunks, True, False, _sre2l_jitter),
    # DELT's scripts pass --jitter 0 (delt.md §1.2 step 5).
    "delt": MethodRecipe("selection", class_contiguous_chunks, True, True, lambda resolution: 0),
}

DEFAULT_ROUND_ITERATIONS = 500


@dataclass
class RecoverConfig:
    """Configuration of ``delt recover`` (one field per flag)."""

    # Paths are not part of a run's identity (a moved folder still resumes); the teacher's and
    # the selection's contents are, through their SHA-256 in OUT/run.json.
    teacher: str = option(
        help="teacher checkpoint (DIR/teacher.pt of `delt teacher`)", identity=False
    )
    ipc: int = option(help="images per class to synthesize")
    out: str = option(help="output folder; re-running into it resumes", identity=False)
    method: str = option("delt", help="synthesis method", choices=tuple(METHODS))
    selection: str | None = option(
        None,
        help="delt: folder of `delt select` (initial images, in selection order)",
        identity=False,
    )
    data_root: str | None = option(
        None,
        help="delt: folder of the teacher's dataset (default: the one the selection used)",
        identity=False,
    )
    iterations: int = option(4000, help="iterations per chunk (DELT's MI)")
    round_iterations: int | None = option(
        None, help=f"delt: iterations between rounds (RI; default {DEFAULT_ROUND_ITERATIONS})"
    )
    batch_size: int = option(100, help="images per chunk")
    lr: float = option(0.25, help="Adam learning rate (cosine-decayed to 0)")
    beta1: float = option(0.5, help="Adam beta1")
    beta2: float = option(0.9, help="Adam beta2")
    r_bn: float = option(0.01, help="weight of the BN-statistic loss")
    first_bn_multiplier: float = option(10.0, help="extra weight of the first BN layer")
    jitter: int | None = option(
        None, help="roll range in pixels (default: delt 0; sre2l/cda 32 at >=224 px, else 4)"
    )
    per_sample_aug: bool = option(
        False, help="a crop/flip/roll per image instead of one per step for the batch"
    )
    amp: Literal["none", "bf16"] = option("none", help="autocast dtype of the teacher forward")
    channels_last: bool = option(False, help="channels_last memory format")
    compile: bool = option(False, help="torch.compile the teacher")
    image_format: Literal["png", "jpeg"] = option(
        "png", help="image files: png (lossless) or jpeg (quality 75, as the papers)"
    )
    seed: int = option(0, help="random seed; chunk k uses a seed derived from (seed, k)")
    device: str = option("auto", help="auto, cpu, cuda, cuda:1, ...", identity=False)
    progress: bool = option(True, help="show progress bars", identity=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(
                f"--method {self.method!r}: unknown method; known: {', '.join(METHODS)}"
            )
        recipe = METHODS[self.method]
        for name in ("ipc", "iterations", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}"
                )
        for name in ("lr", "r_bn", "first_bn_multiplier"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be a finite number > 0, got {value}"
                )
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.jitter is not None and self.jitter < 0:
            raise ConfigError(f"--jitter must be >= 0 pixels, got {self.jitter}")
        if recipe.init == "selection" and self.selection is None:
            raise ConfigError(
                f"--method {self.method} starts from real images: pass --selection DIR"
            )
        if recipe.init != "selection":
            for name in ("selection", "data_root"):
                if getattr(self, name) is not None:
                    raise ConfigError(
                        f"--{name.replace('_', '-')} applies to --method delt (real-image init); "
                        f"{self.method} starts from noise"
                    )
        if not recipe.early_late and self.round_iterations is not None:
            raise ConfigError(
                f"--round-iterations applies to --method delt; {self.method} has no rounds"
            )
        if recipe.early_late:
            round_iterations = self.round_iterations or DEFAULT_ROUND_ITERATIONS
            if self.round_iterations is not None and self.round_iterations < 1:
                raise ConfigError(f"--round-iterations must be >= 1, got {self.round_iterations}")
            if round_iterations > self.iterations:
                raise ConfigError(
                    f"--round-iterations ({round_iterations}) must be <= --iterations "
                    f"({self.iterations})"
                )
            if self.iterations % round_iterations:
                raise ConfigError(
                    f"--iterations ({self.iterations}) must be a multiple of --round-iterations "
                    f"({round_iterations})"
                )

    def resolved(self, info: DatasetInfo) -> RecoverConfig:
        """The config with every method default filled in (what the manifest records)."""
        recipe = METHODS[self.method]
        round_iterations = None
        if recipe.early_late:
            # IPC 1: no EarlyLate; the single image per class gets all iterations (delt.md §1.1).
            round_iterations = (
                self.iterations
                if self.ipc == 1
                else self.round_iterations or DEFAULT_ROUND_ITERATIONS
            )
        jitter = recipe.default_jitter(info.resolution) if self.jitter is None else self.jitter
        return dataclasses.replace(self, round_iterations=round_iterations, jitter=jitter)


# --------------------------------------------------------------------------------------------
# One chunk


@dataclass(frozen=True)
class RecoverySettings:
    """The loop's hyperparameters, shared by every chunk of a run.

    ``low`` and ``high`` are the valid pixel range per channel in normalized space, (C, 1, 1).
    """

    lr: float
    betas: tuple[float, float]
    r_bn: float
    crop_curriculum: bool
    jitter: int
    per_sample_aug: bool
    amp: str
    channels_last: bool
    low: Tensor
    high: Tensor


@dataclass
class ChunkResult:
    """A finished chunk: final images (B, C, H, W) float32 (CPU), final loss, seconds."""

    images: Tensor
    loss: float
    seconds: float


def optimize_chunk(
    teacher: nn.Module,
    bn_matching: delt_ext.BNStatMatching,
    init: Tensor,
    labels: Tensor,
    start_iterations: list[int],
    total_iterations: int,
    settings: RecoverySettings,
    generator: torch.Generator,
    progress: tqdm | None = None,
) -> ChunkResult:
    """Optimizes one chunk of images against a frozen teacher.

    Image ``i`` is forwarded from iteration ``start_iterations[i]`` on (EarlyLate); before that
    it is not in the batch, so it gets zero gradient and, its Adam moments being zero, no update.
    One Adam holds the whole chunk tensor, so a late image's first step sees the global step
    count (bias correction ~1), as in DELT (delt.md §1.2).

    Args:
        teacher: frozen model in eval mode, hooked by ``bn_matching``.
        bn_matching: the BN-statistic loss over the teacher's BN layers.
        init: (B, C, H, W) float32 initial images in normalized space, on the teacher's device.
        labels: (B,) int64 targets, same device.
        start_iterations: B ints in ``[0, total_iterations)``.
        total_iterations: the loop length T (the LR and crop schedules run over it).
        settings: hyperparameters.
        generator: CPU generator drawing every augmentation parameter of this chunk.
        progress: a tqdm bar advanced once per iteration (optional).

    Returns:
        The final images (not a "best" copy: SRe2L's best-image logic is dead code).
    """
    device = init.device
    pixels = init.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([pixels], lr=settings.lr, betas=settings.betas, eps=1e-8)
    augment = delt_ext.RandomResizedCropFlip(
        size=tuple(init.shape[-2:]),
        scale=(0.08, 1.0),
        jitter=settings.jitter,
        per_sample=settings.per_sample_aug,
        generator=generator,
    )
    low, high = settings.low.to(device), settings.high.to(device)
    starts = torch.tensor(start_iterations, dtype=torch.int64)
    active: Tensor | None = None
    active_count = -1
    start = time.perf_counter()
    loss_value = float("nan")
    for iteration in range(total_iterations):
        count = int((starts <= iteration).sum())
        if count != active_count:  # the active set only changes at round starts
            active_count = count
            is_full = count == len(starts)
            active = None if is_full else torch.nonzero(starts <= iteration).view(-1).to(device)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(iteration, total_iterations, settings.lr)
        if settings.crop_curriculum:
            augment.set_scale(delt_ext.crop_scale_schedule(iteration, total_iterations))
        batch = pixels if active is None else pixels.index_select(0, active)
        targets = labels if active is None else labels.index_select(0, active)
        inputs = augment(batch)
        if settings.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast(device, settings.amp):
            logits = teacher(inputs)
        loss = (
            nn.functional.cross_entropy(logits.float(), targets)
            + settings.r_bn * bn_matching.loss()
        )
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            pixels.clamp_(min=low, max=high)
        if progress is not None:
            progress.update()
            if iteration % 25 == 0 or iteration == total_iterations - 1:
                loss_value = loss.item()
                progress.set_postfix(loss=f"{loss_value:.3f}", active=count, refresh=False)
    if progress is None:
        loss_value = loss.item()
    return ChunkResult(pixels.detach().cpu(), float(loss_value), time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# A run


@dataclass
class RecoverResult:
    """Where a recovery's outputs are and what they cost."""

    out: Path
    images: Tensor  # (N, C, H, W) float32, normalized, class-major
    labels: Tensor  # (N,) int64
    iterations_per_image: list[int]
    wall_seconds: float


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _class_dir_width(num_classes: int) -> int:
    # Zero-padded so that sorted folder names are the class order (RDED #4).
    return max(3, len(str(num_classes - 1)))


def _check_run_identity(out: Path, identity: dict) -> None:
    """Writes ``OUT/run.json`` on the first run; refuses a resume with a different one."""
    path = out / "run.json"
    if path.is_file():
        saved = read_json(path)
        differences = config_diff(saved["config"], identity["config"])
        for key in ("teacher_sha256", "selection_sha256"):
            if saved.get(key) != identity.get(key):
                differences.append(f"{key}: the file changed since the first run")
        if differences:
            raise ConfigError(
                f"--out {out} holds a recovery with another configuration "
                f"({'; '.join(differences)}); re-run with the same flags to resume, or choose "
                "another --out"
            )
    else:
        write_json(path, identity)


def _initial_images(
    recipe: MethodRecipe,
    chunk: Chunk,
    info: DatasetInfo,
    generator: torch.Generator,
    selection_images: Callable[[Chunk], Tensor] | None,
) -> Tensor:
    if recipe.init == "noise":
        # Drawn on the CPU so that a chunk's start does not depend on the device.
        shape = (len(chunk), info.channels, info.resolution, info.resolution)
        return torch.randn(shape, generator=generator)
    assert selection_images is not None
    return selection_images(chunk)


def recover(config: RecoverConfig) -> RecoverResult:
    """Runs (or resumes) a recovery; writes ``distilled.pt``, ``images/`` and ``manifest.json``."""
    out = Path(config.out)
    teacher: Checkpoint = load_checkpoint(config.teacher)
    info = teacher.info
    config = config.resolved(info)
    recipe = METHODS[config.method]
    device = resolve_device(config.device)
    config = dataclasses.replace(config, device=str(device))  # the manifest says where it ran

    selection_images: Callable[[Chunk], Tensor] | None = None
    selection: Selection | None = None
    if recipe.init == "selection":
        selection = Selection.load(config.selection)
        selection_info = DatasetInfo.from_dict(selection.meta["dataset"])
        try:
            check_compatible(teacher.meta, selection_info)
        except TeacherMismatchError as error:
            raise TeacherMismatchError(f"--selection {config.selection}: {error}") from None
        if selection.ipc < config.ipc:
            raise ConfigError(
                f"--ipc {config.ipc}: the selection in {config.selection} holds only "
                f"{selection.ipc} images per class (run `delt select --ipc {config.ipc}`)"
            )
        dataset = load_like(info, "train", config.data_root or selection.meta.get("data_root"))
        check_compatible(teacher.meta, dataset.info)
        chosen = selection.indices

        def selection_images(chunk: Chunk) -> Tensor:
            # The first IPC picks of each class: a prefix of the selection order.
            pairs = zip(chunk.classes, chunk.within_class, strict=True)
            return dataset.images([chosen[c][j] for c, j in pairs])

    identity = {
        "config": identity_dict(config),
        "teacher_sha256": _sha256(teacher.path),
        "selection_sha256": _sha256(Path(config.selection) / "selection.json")
        if selection
        else None,
    }
    _check_run_identity(out, identity)

    model = teacher.model.to(device)
    model.requires_grad_(False)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    low, high = info.pixel_bounds()
    settings = RecoverySettings(
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        r_bn=config.r_bn,
        crop_curriculum=recipe.crop_curriculum,
        jitter=config.jitter,
        per_sample_aug=config.per_sample_aug,
        amp=config.amp,
        channels_last=config.channels_last,
        low=low,
        high=high,
    )
    chunks = recipe.chunks(info.num_classes, config.ipc, config.batch_size)
    round_iterations = config.round_iterations or config.iterations
    total_images = info.num_classes * config.ipc
    images = torch.empty(total_images, info.channels, info.resolution, info.resolution)
    labels = torch.arange(info.num_classes).repeat_interleave(config.ipc)
    iterations_per_image = [0] * total_images
    wall_seconds = 0.0
    chunk_dir = out / "chunks"
    done = [chunk.index for chunk in chunks if (chunk_dir / f"{chunk.index:05d}.pt").is_file()]
    logger.info(
        "recover: %s, %d classes x %d images, %d chunks of <= %d (%d already done), %d iterations, "
        "device %s -> %s",
        config.method, info.num_classes, config.ipc, len(chunks), config.batch_size, len(done),
        config.iterations, device, out,
    )  # fmt: skip

    with delt_ext.BNStatMatching(
        model, first_bn_multiplier=config.first_bn_multiplier
    ) as bn_matching:
        # Compile after hooking: the hooks are traced into the graph.
        forward = torch.compile(model) if config.compile else model
        chunk_bar = tqdm(chunks, desc=f"{config.method} chunks", disable=not config.progress)
        for chunk in chunk_bar:
            path = chunk_dir / f"{chunk.index:05d}.pt"
            positions = chunk.positions(config.ipc)
            total, starts = chunk_schedule(
                chunk.within_class, config.ipc, config.iterations, round_iterations
            )
            if path.is_file():
                saved = torch_load(path)
                if saved["positions"].tolist() != positions:
                    raise ConfigError(f"{path} does not hold chunk {chunk.index} of this run")
                chunk_images, seconds = saved["images"], float(saved["seconds"])
            else:
                generator = torch.Generator().manual_seed(derive_seed(config.seed, chunk.index))
                init = _initial_images(recipe, chunk, info, generator, selection_images)
                chunk_labels = torch.tensor(chunk.classes, dtype=torch.int64)
                bar = tqdm(
                    total=total,
                    desc=f"chunk {chunk.index}",
                    leave=False,
                    disable=not config.progress,
                )
                result = optimize_chunk(
                    forward, bn_matching, init.to(device), chunk_labels.to(device), starts, total,
                    settings, generator, bar,
                )  # fmt: skip
                bar.close()
                chunk_images, seconds = result.images, result.seconds
                torch_save(
                    {
                        "images": chunk_images,
                        "labels": chunk_labels,
                        "positions": torch.tensor(positions, dtype=torch.int64),
                        "iterations": torch.tensor([total - s for s in starts], dtype=torch.int64),
                        "seconds": seconds,
                        "loss": result.loss,
                    },
                    path,
                )
                logger.info(
                    "recover: chunk %d/%d done in %.1f s (loss %.3f)",
                    chunk.index + 1, len(chunks), seconds, result.loss,
                )  # fmt: skip
            index = torch.tensor(positions, dtype=torch.int64)
            images[index] = chunk_images
            for position, start in zip(positions, starts, strict=True):
                iterations_per_image[position] = total - start
            wall_seconds += seconds

    _write_outputs(
        out, config, info, teacher, selection, images, labels, iterations_per_image, wall_seconds
    )
    return RecoverResult(out, images, labels, iterations_per_image, wall_seconds)


def _write_outputs(
    out: Path,
    config: RecoverConfig,
    info: DatasetInfo,
    teacher: Checkpoint,
    selection: Selection | None,
    images: Tensor,
    labels: Tensor,
    iterations_per_image: list[int],
    wall_seconds: float,
) -> None:
    width = _class_dir_width(info.num_classes)
    index_width = max(3, len(str(config.ipc - 1)))
    suffix = "png" if config.image_format == "png" else "jpg"
    pixels = info.denormalize(images).clamp_(0, 1)
    for position in range(images.shape[0]):
        label = int(labels[position])
        within = position % config.ipc
        save_image(
            pixels[position],
            out / "images" / f"{label:0{width}d}" / f"{within:0{index_width}d}.{suffix}",
            config.image_format,
        )
    torch_save({"images": images.contiguous(), "labels": labels}, out / "distilled.pt")
    manifest = {
        "kind": "delt-distilled-set",
        "method": config.method,
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "progress"},
        "seed": config.seed,
        "ipc": config.ipc,
        "num_images": int(images.shape[0]),
        "dataset": info.to_dict(),
        "teacher": {
            "path": str(teacher.path),
            "sha256": _sha256(teacher.path),
            "meta": teacher.meta,
        },
        "selection": None
        if selection is None
        else {"path": str(config.selection), "strategy": selection.meta["strategy"]},
        "versions": versions(),
        "iterations_per_image": iterations_per_image,
        "image_iterations": int(sum(iterations_per_image)),
        "wall_seconds": wall_seconds,
        "files": {
            "distilled": "distilled.pt",
            "images": f"images/<class:0{width}d>/<index:0{index_width}d>.{suffix}",
        },
    }
    write_json(out / "manifest.json", manifest)
    logger.info(
        "recover: %d images, %d image-iterations, %.1f s of synthesis -> %s",
        images.shape[0], manifest["image_iterations"], wall_seconds, out,
    )  # fmt: skip
