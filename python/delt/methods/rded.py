"""``delt recover --method rded``: RDED (Sun et al., CVPR 2024; github.com/LINs-lab/RDED),
the optimization-free baseline DELT compares against. No pixel is optimized: per class,
``--candidates`` real training images (a seeded draw) get ``--num-crop`` square RandomResizedCrops
of ``resolution / --factor`` pixels each; the teacher scores every crop by its cross-entropy on the
class (the crop zero-padded, in normalized space, to the full resolution, as RDED's ``pad``); the
lowest-loss crop of each image is kept, then the ``ipc * factor**2`` lowest-loss kept crops, and
``factor**2`` crops are tiled into each image.

The tiling is RDED's ``mix_images``: with ``n = ipc``, tile ``k`` (row-major) of image ``i`` is
the crop ranked ``k * n + i``, so the ``n`` best crops are the top-left tiles. Ties in the loss
keep the earlier crop (``argmin``) and the earlier candidate (a stable sort).

A class is one chunk of a :class:`delt.chunks.ChunkStore` (seeded from ``(seed, class)``, saved
to ``OUT/chunks/`` when done, so a killed run resumes to the same bytes; deleted once
``distilled.pt`` is written, unless ``--keep-chunks``). ``synthesis_seconds``
is the time spent cropping, scoring and tiling; every image has 0 iterations. The manifest's
``rded_crops`` gives, per image and tile, ``[training-set index, top, left, size]`` of its crop.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import delt_ext
from delt.chunks import ChunkResult
from delt.config import ConfigError, check_int_fields, flag, option
from delt.data import ImageDataset, load_like
from delt.io import torch_load
from delt.method import (
    LOOP_FIELDS,
    Method,
    MethodRecipe,
    RecoverResult,
    SynthesisConfig,
    one_class_per_chunk,
    register,
)
from delt.models import check_compatible
from delt.runtime import autocast, derive_seed, logger
from delt.schedules import Chunk
from delt.synthesis import (
    finished_run,
    frozen_teacher,
    prepare_run,
)

__all__ = [
    "RDED",
    "RdedOptions",
    "check_rded_data",
    "crop_candidates",
    "pad_to",
    "rded_class",
    "recover_rded",
    "sample_crop_boxes",
    "score_crops",
    "select_crops",
    "tile_crops",
]

# RDED's MultiRandomCrop: torchvision's RandomResizedCrop with its default area range and a fixed
# aspect ratio of 1.
CROP_SCALE = (0.08, 1.0)


@dataclass(kw_only=True)
class RdedOptions:
    """The flags of ``delt recover`` (and ``delt distill``) that only ``--method rded`` reads."""

    candidates: int = option(
        300,
        help="rded: real training images drawn per class, one kept crop each (RDED's mipc)",
        group="rded",
    )
    num_crop: int = option(
        5, help="rded: RandomResizedCrops per candidate image, scored by the teacher", group="rded"
    )
    factor: int = option(
        2,
        help="rded: tiles per side of each image (factor^2 crops of resolution/factor pixels)",
        group="rded",
    )


# RDED over the components: scored real crops, one class per chunk; no matching target, so
# nothing is optimized (no schedule, no augmentation of its own, no post-step).
RECIPE = MethodRecipe("scored_crops", one_class_per_chunk, "fixed", False, lambda _: 0, target=None)


class Rded(Method):
    """RDED: teacher-scored real crops, nothing optimized; its own flags are
    :class:`RdedOptions`."""

    name = "rded"
    options = RdedOptions
    optimizes = False
    checks_data = True

    def recipe(self, config: SynthesisConfig) -> MethodRecipe | None:
        return RECIPE

    def reads_training_set(self, config: object) -> bool:
        return True

    def check_options(self, options: RdedOptions, ipc: int) -> None:
        check_int_fields(options, tuple(f.name for f in dataclasses.fields(options)))
        needed = ipc * options.factor**2
        if options.candidates < needed:
            raise ConfigError(
                f"--candidates {options.candidates} must be >= --ipc x --factor^2 = {needed}: "
                "each candidate image gives at most one crop"
            )

    def check(self, config: SynthesisConfig) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(SynthesisConfig)}
        for name in LOOP_FIELDS:
            if getattr(config, name) != defaults[name]:
                raise ConfigError(
                    f"{flag(name)} applies to the methods that optimize pixels; rded picks real "
                    "crops and optimizes nothing"
                )

    def check_data(self, config: object, dataset: ImageDataset) -> None:
        check_rded_data(self.options_of(config), dataset)

    def recover(self, config: SynthesisConfig) -> RecoverResult:
        return recover_rded(config)


def check_rded_data(options: RdedOptions, dataset: ImageDataset) -> None:
    """Refuses a ``--factor`` that does not divide the resolution and a class with fewer than
    ``--candidates`` training images (before any work)."""
    resolution = dataset.info.resolution
    if resolution % options.factor:
        raise ConfigError(
            f"--factor {options.factor} must divide the image resolution {resolution} of "
            f"{dataset.info.name} (each tile is resolution / factor pixels)"
        )
    counts = torch.bincount(dataset.targets, minlength=dataset.info.num_classes)
    for class_index, count in enumerate(counts.tolist()):
        if count < options.candidates:
            raise ConfigError(
                f"--candidates {options.candidates}: class {class_index} "
                f"({dataset.info.class_names[class_index]!r}) has only {count} training images"
            )


# --------------------------------------------------------------------------------------------
# The construction (pure functions of tensors)


def sample_crop_boxes(
    count: int, num_crop: int, resolution: int, generator: torch.Generator
) -> Tensor:
    """``num_crop`` square crop boxes per image, torchvision's RandomResizedCrop rule with area
    ``CROP_SCALE`` and ratio (1, 1) (drawn by :class:`delt_ext.RandomResizedCropFlip`).

    Returns:
        (count, num_crop, 3) int64 ``[top, left, size]``; image ``j``'s crops are row ``j``, in
        draw order.
    """
    sampler = delt_ext.RandomResizedCropFlip(
        size=1, scale=CROP_SCALE, ratio=(1.0, 1.0), flip_p=0.0, per_sample=True,
        generator=generator,
    )  # fmt: skip
    params = sampler.sample_params(count * num_crop, resolution, resolution)
    top, left, height, width = params[:, :4].to(torch.int64).unbind(1)
    if not torch.equal(height, width):  # ratio (1, 1) gives square boxes by construction
        raise AssertionError("non-square crop box")
    return torch.stack([top, left, height], dim=1).view(count, num_crop, 3)


def crop_candidates(images: Tensor, boxes: Tensor, crop_size: int) -> Tensor:
    """Cuts ``boxes`` out of ``images`` and resizes them to ``crop_size`` (bilinear, antialiased,
    as RDED's ``RandomResizedCrop(..., antialias=True)``).

    Args:
        images: (count, C, H, W) float32.
        boxes: (count, num_crop, 3) int64 ``[top, left, size]``.

    Returns:
        (count, num_crop, C, crop_size, crop_size) float32.
    """
    count, num_crop = boxes.shape[:2]
    flat = boxes.view(-1, 3)
    out = images.new_empty(count * num_crop, images.shape[1], crop_size, crop_size)
    owner = torch.arange(count).repeat_interleave(num_crop)
    # One resize per box size: the boxes of a size are stacked and resized together.
    for size in torch.unique(flat[:, 2]).tolist():
        rows = torch.nonzero(flat[:, 2] == size).view(-1)
        pieces = torch.stack(
            [
                images[owner[r], :, top : top + size, left : left + size]
                for r, (top, left) in zip(rows.tolist(), flat[rows, :2].tolist(), strict=True)
            ]
        )
        if size != crop_size:
            pieces = F.interpolate(
                pieces, size=(crop_size, crop_size), mode="bilinear", align_corners=False,
                antialias=True,
            )  # fmt: skip
        out[rows] = pieces
    return out.view(count, num_crop, images.shape[1], crop_size, crop_size)


def pad_to(crops: Tensor, resolution: int) -> Tensor:
    """(N, C, s, s) → (N, C, resolution, resolution), zeros around, the extra row/column at the
    bottom/right (RDED's ``pad``)."""
    margin = resolution - crops.shape[-1]
    before = margin // 2
    return F.pad(crops, (before, margin - before, before, margin - before))


def score_crops(
    teacher: nn.Module,
    crops: Tensor,
    class_index: int,
    resolution: int,
    batch_size: int,
    device: torch.device,
    amp: str = "none",
    channels_last: bool = False,
) -> Tensor:
    """The teacher's cross-entropy on ``class_index`` of each crop, padded to ``resolution``.

    Args:
        crops: (N, C, s, s) float32 on the CPU.

    Returns:
        (N,) float32 on the CPU.
    """
    losses = []
    with torch.no_grad():
        for start in range(0, crops.shape[0], batch_size):
            batch = pad_to(crops[start : start + batch_size], resolution).to(device)
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                logits = teacher(batch)
            targets = torch.full((batch.shape[0],), class_index, dtype=torch.int64, device=device)
            losses.append(F.cross_entropy(logits.float(), targets, reduction="none").cpu())
    return torch.cat(losses)


def select_crops(losses: Tensor, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """RDED's ``selector``: the lowest-loss crop of each image, then the ``count`` lowest of those.

    Args:
        losses: (images, num_crop) float.

    Returns:
        ``(image index, crop index, loss)`` of the kept crops, (count,) each, best first. Equal
        losses keep the earlier crop and the earlier image.
    """
    best_loss, best_crop = losses.min(dim=1)  # the first minimum on ties
    order = torch.sort(best_loss, stable=True).indices[:count]
    return order, best_crop[order], best_loss[order]


def tile_crops(crops: Tensor, ipc: int, factor: int) -> Tensor:
    """RDED's ``mix_images``: (ipc * factor**2, C, s, s) ranked crops → (ipc, C, factor*s,
    factor*s); tile ``k = row * factor + col`` of image ``i`` is ``crops[k * ipc + i]``."""
    channels, size = crops.shape[1], crops.shape[-1]
    grid = crops.view(factor, factor, ipc, channels, size, size)
    # (row, col, image, C, y, x) -> (image, C, row, y, col, x)
    return grid.permute(2, 3, 0, 4, 1, 5).reshape(ipc, channels, factor * size, factor * size)


def rded_class(
    teacher: nn.Module,
    dataset: ImageDataset,
    class_index: int,
    ipc: int,
    candidates: int,
    num_crop: int,
    factor: int,
    generator: torch.Generator,
    batch_size: int,
    device: torch.device,
    amp: str = "none",
    channels_last: bool = False,
) -> tuple[Tensor, Tensor, float]:
    """The ``ipc`` RDED images of one class.

    Draws ``candidates`` training images of the class (a random permutation from ``generator``,
    then the boxes of every candidate from it), crops, scores, selects and tiles.

    Returns:
        ``(images (ipc, C, H, W) float32 normalized CPU, sources (ipc, factor**2, 4) int64
        [training-set index, top, left, size] per tile in row-major order, mean loss of the kept
        crops)``.
    """
    resolution = dataset.info.resolution
    crop_size = resolution // factor
    members = torch.nonzero(dataset.targets == class_index).view(-1)
    chosen = members[torch.randperm(members.numel(), generator=generator)[:candidates]]
    boxes = sample_crop_boxes(candidates, num_crop, resolution, generator)
    crops = crop_candidates(dataset.images(chosen), boxes, crop_size)
    flat = crops.view(candidates * num_crop, *crops.shape[2:])
    losses = score_crops(
        teacher, flat, class_index, resolution, batch_size, device, amp, channels_last
    ).view(candidates, num_crop)
    image_rank, crop_rank, kept_loss = select_crops(losses, ipc * factor**2)
    images = tile_crops(crops[image_rank, crop_rank], ipc, factor)
    sources = torch.cat([chosen[image_rank, None], boxes[image_rank, crop_rank]], dim=1)
    # ranked k * ipc + i -> image i, tile k
    sources = sources.view(factor**2, ipc, 4).transpose(0, 1).contiguous()
    return images, sources, float(kept_loss.mean())


# --------------------------------------------------------------------------------------------
# A run


def recover_rded(config: SynthesisConfig) -> RecoverResult:
    """Runs (or resumes) ``delt recover --method rded`` for a ``RecoverConfig``."""
    run = prepare_run(config)
    config, info = run.config, run.info
    dataset = load_like(info, "train", config.data_root)
    check_compatible(run.teacher.meta, dataset.info, fingerprint=dataset.fingerprint())
    options = RDED.options_of(config)
    check_rded_data(options, dataset)
    run.check_identity(False)
    store = run.chunk_store(run.out / "chunks", config.ipc)
    finished = finished_run(run, [store.folder])
    if finished is not None:
        return finished
    teacher = frozen_teacher(run.teacher.model, run.device, config.channels_last).eval()
    chunks = RECIPE.chunks(info.num_classes, config.ipc, config.batch_size)
    logger.info(
        "recover: rded, %d classes x %d images from %d candidates x %d crops, factor %d, "
        "device %s -> %s",
        info.num_classes, config.ipc, options.candidates, options.num_crop, options.factor,
        run.device, run.out,
    )  # fmt: skip

    def make_class(chunk: Chunk, generator: torch.Generator) -> tuple[ChunkResult, list[int]]:
        start = time.perf_counter()
        images, sources, loss = rded_class(
            teacher, dataset, chunk.classes[0], config.ipc, options.candidates, options.num_crop,
            options.factor, generator, config.batch_size, run.device, config.amp,
            config.channels_last,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        return ChunkResult(images, loss, seconds, {"sources": sources}), [0] * len(chunk)

    images, iterations_per_image, seconds = store.make_all(
        chunks, lambda chunk: derive_seed(config.seed, chunk.index), make_class, config.progress,
        "rded classes",
    )  # fmt: skip
    sources = [torch_load(store.path(chunk))["sources"] for chunk in chunks]
    labels = torch.arange(info.num_classes).repeat_interleave(config.ipc)
    # One copy of the images: distilled.pt (the crop sources in its manifest) replaces the chunks.
    return run.finish(
        None, images, labels, iterations_per_image, seconds, [store.folder], "crop scoring",
        extra={"rded_crops": torch.cat(sources).tolist()},
    )  # fmt: skip


RDED = register(Rded())
