"""The student's augmentation in ``delt eval`` (the evaluation protocol of RDED, Sun et al.,
CVPR 2024, as DELT uses it, Shen et al., CVPR 2025; docs/evaluation.md): RDED's ShufflePatches,
torchvision's RandAugment with a replay of its draws (so a DDP rank augments only its rows of a
global batch), RandomResizedCrop + flip, and CutMix with its hard-label loss.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

import delt_ext
from delt.data import DatasetInfo

__all__ = [
    "RANDAUGMENT_BINS",
    "AugmentPlan",
    "CutMixParams",
    "NoAugment",
    "StudentAugment",
    "apply_cutmix",
    "cutmix_cross_entropy",
    "sample_cutmix",
    "shuffle_patches",
]

# RandAugment magnitudes on timm's scale: M of 10 = M / 10 of each op's largest strength.
RANDAUGMENT_BINS = 11


# --------------------------------------------------------------------------------------------
# ShufflePatches, RandAugment, crops and flips


def shuffle_patches(images: Tensor, factor: int, generator: torch.Generator) -> Tensor:
    """RDED's evaluation-side ShufflePatches, per image: the ``factor`` column strips in a
    random order, then the ``factor`` row strips in another (so the ``factor x factor`` tiles of
    an RDED image move by whole rows and columns of the grid).

    Args:
        images: (B, C, H, W), H and W divisible by ``factor``.
        generator: draws the two permutations of each image (CPU).

    Returns:
        (B, C, H, W), the same pixels rearranged.
    """
    _check_patch_factor(images.shape, factor)
    return _apply_patch_keys(images, factor, _patch_keys(images.shape[0], factor, generator))


def _check_patch_factor(shape: Sequence[int], factor: int) -> None:
    if shape[2] % factor or shape[3] % factor:
        raise ValueError(f"shuffle_patches: factor {factor} must divide {shape[2]}x{shape[3]}")


def _patch_keys(batch: int, factor: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The draws of :func:`shuffle_patches` for ``batch`` images: (B, factor) float32 keys whose
    argsort orders the column strips, then the row strips."""
    columns = torch.rand(batch, factor, generator=generator)
    return columns, torch.rand(batch, factor, generator=generator)


def _apply_patch_keys(images: Tensor, factor: int, keys: tuple[Tensor, Tensor]) -> Tensor:
    _, _, height, width = images.shape

    def strip_order(size: int, key: Tensor) -> Tensor:
        # (B, size): for each output row (column), the input row (column) it takes.
        perms = torch.argsort(key, dim=1)
        strip = size // factor
        offsets = torch.arange(size)
        return perms[:, offsets // strip] * strip + offsets % strip

    columns = strip_order(width, keys[0]).to(images.device)
    rows = strip_order(height, keys[1]).to(images.device)
    images = images.gather(3, columns[:, None, None, :].expand_as(images))
    return images.gather(2, rows[:, None, :, None].expand_as(images))


@dataclass(frozen=True)
class AugmentPlan:
    """The draws of one :class:`StudentAugment` call on a batch of ``count`` images from its
    generator, made before any image is augmented: so a rank can augment only the rows it needs
    of a global batch (:meth:`StudentAugment.apply`) and every row comes out as it would in the
    whole batch.

    Attributes:
        count: images in the batch.
        patch_keys: ShufflePatches' (count, factor) keys (columns, rows); None when off.
        crops: (count, 7) float32 crop/flip params (``delt_ext.augment.PARAM_COLUMNS``).
    """

    count: int
    patch_keys: tuple[Tensor, Tensor] | None
    crops: Tensor


@functools.cache
def _randaugment_skip_table(num_ops: int, magnitude: int) -> tuple[bool, ...] | None:
    """For each op of torchvision's RandAugment (in the order it picks them), whether one image's
    call draws a sign (``torch.rand(())``) after the op's pick (``torch.randint``); None when
    replaying these draws does not leave torch's global generator where a real call leaves it
    (another torchvision): then every row is augmented, as in one process."""
    from torchvision.transforms import InterpolationMode, v2

    space = getattr(v2.RandAugment, "_AUGMENTATION_SPACE", None)
    if not isinstance(space, dict):
        return None
    table = tuple(
        fn(RANDAUGMENT_BINS, 1, 1) is not None and bool(signed) for fn, signed in space.values()
    )
    real = v2.RandAugment(num_ops, magnitude, RANDAUGMENT_BINS, InterpolationMode.BILINEAR)
    image = torch.linspace(0.0, 1.0, 48).reshape(3, 4, 4)  # no draw from the global generator
    with torch.random.fork_rng(devices=[]):
        for seed in range(32):
            torch.manual_seed(seed)
            real(image)
            after_call = torch.get_rng_state()
            torch.manual_seed(seed)
            _skip_randaugment_draws(num_ops, table)
            if not torch.equal(after_call, torch.get_rng_state()):
                return None
    return table


def _skip_randaugment_draws(num_ops: int, table: tuple[bool, ...]) -> None:
    """Draws from torch's global generator what one image's RandAugment call draws."""
    for _ in range(num_ops):
        if table[int(torch.randint(len(table), ()))]:
            torch.rand(())


class StudentAugment(nn.Module):
    """(ShufflePatches,) RandAugment, then RandomResizedCrop + flip, per image, on normalized
    (B, C, H, W) float.

    Args:
        info: the dataset (normalization, resolution, channel means used as the fill value).
        randaugment_ops: ops per image; 0 disables RandAugment.
        randaugment_magnitude: 0-10 on timm's scale.
        min_crop: smallest crop area fraction; crops are resized back to the input size.
        generator: draws the crop boxes and flips (and the patch orders).
        shuffle_patches: RDED's ShufflePatches factor, applied first as in RDED's transform
            (:func:`shuffle_patches`); None: off.
    """

    def __init__(
        self,
        info: DatasetInfo,
        randaugment_ops: int,
        randaugment_magnitude: int,
        min_crop: float,
        generator: torch.Generator,
        shuffle_patches: int | None = None,
    ) -> None:
        super().__init__()
        from torchvision.transforms import InterpolationMode, v2

        self.info = info
        self.options = (randaugment_ops, randaugment_magnitude, min_crop)
        self.shuffle_patches = shuffle_patches
        self.generator = generator
        self.randaugment = (
            v2.RandAugment(
                num_ops=randaugment_ops,
                magnitude=randaugment_magnitude,
                num_magnitude_bins=RANDAUGMENT_BINS,
                interpolation=InterpolationMode.BILINEAR,
                fill=list(info.mean),
            )
            if randaugment_ops > 0
            else None
        )
        self.crop = delt_ext.RandomResizedCropFlip(
            size=(info.resolution, info.resolution),
            scale=(min_crop, 1.0),
            per_sample=True,
            generator=generator,
        )

    def reseeded(self, generator: torch.Generator) -> StudentAugment:
        """The same augmentation drawing its crops and flips from ``generator``."""
        return StudentAugment(self.info, *self.options, generator, self.shuffle_patches)

    @property
    def output_size(self) -> tuple[int, int]:
        """(H, W) of the augmented images."""
        return self.crop.size

    def plan(self, shape: Sequence[int]) -> AugmentPlan:
        """Draws from ``generator`` what augmenting a (B, C, H, W) batch of ``shape`` draws
        (the patch orders, then the crops and flips, as :meth:`forward` does)."""
        count, _, height, width = shape
        keys = None
        if self.shuffle_patches is not None:
            _check_patch_factor(shape, self.shuffle_patches)
            keys = _patch_keys(count, self.shuffle_patches, self.generator)
        return AugmentPlan(count, keys, self.crop.sample_params(count, height, width))

    def apply(self, images: Tensor, plan: AugmentPlan, rows: Tensor | None = None) -> Tensor:
        """Rows ``rows`` of the batch ``plan`` was drawn for, augmented: exactly those rows of
        what :meth:`forward` makes of the whole batch (same draws).

        RandAugment draws from torch's global generator image by image, the same draws whatever
        the image's content and size; for a row not in ``rows`` they are drawn and nothing is
        applied, so the generator ends where the whole batch leaves it.

        Args:
            images: (R, C, H, W) normalized: the batch's rows ``rows``, in that order.
            rows: (R,) int64, ascending; None: all ``plan.count`` rows.
        """
        table = None
        if rows is not None and self.randaugment is not None:
            table = _randaugment_skip_table(self.options[0], self.options[1])
            if table is None:
                raise RuntimeError(
                    "this torchvision's RandAugment draws differently: augment the whole batch"
                )
        index = None if rows is None else rows.to("cpu", torch.int64)
        if plan.patch_keys is not None:
            keys = plan.patch_keys if index is None else tuple(k[index] for k in plan.patch_keys)
            images = _apply_patch_keys(images, self.shuffle_patches, keys)
        if self.randaugment is not None:
            pixels = self.info.denormalize(images).clamp_(0.0, 1.0)
            if index is None:
                # One draw of ops per image, as timm's per-sample transform in a DataLoader.
                pixels = torch.stack([self.randaugment(image) for image in pixels])
            else:
                wanted = set(index.tolist())
                augmented = []
                for row in range(plan.count):
                    if row in wanted:
                        augmented.append(self.randaugment(pixels[len(augmented)]))
                    else:
                        _skip_randaugment_draws(self.options[0], table)
                pixels = torch.stack(augmented) if augmented else pixels[:0]
            images = self.info.normalize(pixels)
        params = plan.crops if index is None else plan.crops[index]
        if params.shape[0] == 0:
            return images.new_empty((0, images.shape[1], *self.crop.size))
        if params.device != images.device:
            if images.device.type == "cuda":
                params = params.pin_memory().to(images.device, non_blocking=True)
            else:
                params = params.to(images.device)
        self.crop.last_params = params
        return delt_ext.resized_crop_flip(images, params, self.crop.size)

    def augments_subsets(self) -> bool:
        """Whether :meth:`apply` can augment a subset of a batch's rows exactly (RandAugment's
        draws can be replayed with this torchvision)."""
        if self.randaugment is None:
            return True
        return _randaugment_skip_table(self.options[0], self.options[1]) is not None

    def forward(self, images: Tensor) -> Tensor:
        return self.apply(images, self.plan(images.shape))


class NoAugment(nn.Module):
    """The images as they are: the student of ``delt eval --no-augment`` (DD-Ranking's
    ``use_aug=False`` runs of its augmentation-robust score). The interface of
    :class:`StudentAugment`; it draws nothing from any generator.

    Args:
        info: the dataset (its resolution is the output size).
    """

    def __init__(self, info: DatasetInfo) -> None:
        super().__init__()
        self.info = info

    def reseeded(self, generator: torch.Generator) -> NoAugment:
        return self

    @property
    def output_size(self) -> tuple[int, int]:
        return (self.info.resolution, self.info.resolution)

    def plan(self, shape: Sequence[int]) -> AugmentPlan:
        return AugmentPlan(int(shape[0]), None, torch.empty(0, 7))

    def apply(self, images: Tensor, plan: AugmentPlan, rows: Tensor | None = None) -> Tensor:
        """A copy of ``images`` (the rows asked for, as given)."""
        return images.clone()

    def augments_subsets(self) -> bool:
        return True

    def forward(self, images: Tensor) -> Tensor:
        return self.apply(images, self.plan(images.shape))


# --------------------------------------------------------------------------------------------
# CutMix


@dataclass(frozen=True)
class CutMixParams:
    """One CutMix draw for a batch: image ``i`` gets the box of image ``permutation[i]``.

    Attributes:
        permutation: (B,) int64.
        top, bottom, left, right: the box, rows ``top:bottom`` and columns ``left:right``
            (possibly empty when clipped at the border).
        lam: the fraction of each image that stays its own, ``1 - box area / image area``
            (the area-corrected λ).
    """

    permutation: Tensor
    top: int
    bottom: int
    left: int
    right: int
    lam: float

    def paste(self, images: Tensor, partners: Tensor) -> None:
        """Writes the box of each of ``partners`` into the same place of ``images``, in place;
        both (R, C, H, W), row r of ``partners`` the partner of row r of ``images``."""
        box = (slice(None), slice(None), slice(self.top, self.bottom), slice(self.left, self.right))
        images[box] = partners[box]


def sample_cutmix(
    batch_size: int, height: int, width: int, beta: float, generator: torch.Generator
) -> CutMixParams:
    """Draws CutMix params as RDED's ``rand_bbox``: λ ~ Beta(β, β), a box of side
    ``sqrt(1 - λ)`` times the image's (truncated to whole pixels) centred at a uniform pixel and
    clipped to the image, and a random permutation of the batch; λ is then corrected to the
    box's actual area."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    # torch's Beta sampler takes no generator; numpy's, seeded from the generator, is reproducible.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(beta, beta))
    cut_ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut_ratio), int(width * cut_ratio)
    center_y = int(torch.randint(0, height, (1,), generator=generator))
    center_x = int(torch.randint(0, width, (1,), generator=generator))
    top, bottom = (min(max(center_y + d, 0), height) for d in (-(cut_h // 2), cut_h // 2))
    left, right = (min(max(center_x + d, 0), width) for d in (-(cut_w // 2), cut_w // 2))
    permutation = torch.randperm(batch_size, generator=generator)
    area = (bottom - top) * (right - left)
    return CutMixParams(permutation, top, bottom, left, right, 1.0 - area / (height * width))


def apply_cutmix(images: Tensor, params: CutMixParams) -> Tensor:
    """A new (B, C, H, W) batch: ``images`` with each box replaced by its partner's box."""
    mixed = images.clone()
    params.paste(mixed, images[params.permutation.to(images.device)])
    return mixed


def cutmix_cross_entropy(
    logits: Tensor, labels: Tensor, params: CutMixParams | None, rows: slice | None = None
) -> Tensor:
    """Hard-label loss of a CutMix batch: ``λ CE(y) + (1 - λ) CE(y[permutation])``.

    Args:
        logits: (R, K) float, the student's on rows ``rows`` of the batch (a DDP rank's share).
        labels: (B,) int64, the whole batch's.
        params: the batch's CutMix draw; None: no CutMix, plain cross-entropy.
        rows: which rows of the batch ``logits`` are; None: all B.
    """
    own = labels if rows is None else labels[rows]
    if params is None:
        return nn.functional.cross_entropy(logits.float(), own)
    partner = labels[params.permutation.to(labels.device)]
    if rows is not None:
        partner = partner[rows]
    return params.lam * nn.functional.cross_entropy(logits.float(), own) + (
        1.0 - params.lam
    ) * nn.functional.cross_entropy(logits.float(), partner)
