"""The student-training engine: batches and accuracy, augmentation, CutMix, losses,
:class:`StudentTrainer` and stage-wise training (reference/delt.md §5), for ``delt eval``, pdd's
hard-init student, ``delt select`` and ``delt teacher``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import delt_ext
from delt.config import check_int
from delt.data import DatasetInfo, ImageDataset, TensorImageDataset
from delt.distilled import normalized
from delt.distributed import world
from delt.runtime import autocast, derive_seed
from delt.schedules import stage_epochs

__all__ = [
    "PROTOCOL",
    "RANDAUGMENT_BINS",
    "STAGE_SCHEDULES",
    "AugmentPlan",
    "Check",
    "CutMixParams",
    "GlobalBatchNorm2d",
    "StagePlan",
    "StudentAugment",
    "StudentProtocol",
    "StudentTrainer",
    "TrainSettings",
    "apply_cutmix",
    "cutmix_cross_entropy",
    "default_batch_size",
    "evaluate_accuracy",
    "half_cosine_factor",
    "iterate_batches",
    "parameter_groups",
    "sample_cutmix",
    "seeded",
    "shuffle_patches",
    "soft_label_kl",
    "stage_lr_factors",
    "stagewise_plan",
    "train_stagewise",
]

# RandAugment magnitudes on timm's scale: M of 10 = M / 10 of each op's largest strength.
RANDAUGMENT_BINS = 11
STAGE_SCHEDULES = ("restart", "continue")


@dataclass(frozen=True)
class StudentProtocol:
    """The evaluation protocol's defaults (RDED/DELT, delt.md §5): ``delt eval``'s flag defaults
    and what pdd's hard-init student trains with."""

    temperature: float = 20.0
    lr: float = 1e-3
    weight_decay: float = 0.01
    cutmix_beta: float = 1.0
    randaugment_ops: int = 2
    randaugment_magnitude: int = 6
    min_crop: float = 0.25


PROTOCOL = StudentProtocol()


# --------------------------------------------------------------------------------------------
# Batches and accuracy


def iterate_batches(
    dataset: ImageDataset,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    indices: Tensor | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches ``(images (B, C, H, W) float32 normalized, labels (B,) int64)`` of ``dataset``.

    In-memory datasets are sliced directly (no per-image Python calls); file-backed ones go
    through a DataLoader with ``num_workers`` workers (each image decoded once per pass), into
    pinned memory with ``pin_memory`` (for non-blocking copies to a GPU). ``indices`` (int64,
    unshuffled): only those images, in that order (a rank's shard), batched as if they were the
    dataset.
    """
    if indices is not None:
        count, order = len(indices), indices
    else:
        count = len(dataset)
        order = torch.randperm(count, generator=generator) if shuffle else torch.arange(count)
    if isinstance(dataset, TensorImageDataset):
        for start in range(0, count, batch_size):
            index = order[start : start + batch_size]
            yield dataset.images(index), dataset.targets[index]
        return
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, order.tolist()),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
    for images, labels in loader:
        yield images, labels.to(torch.int64)


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    dataset: ImageDataset,
    device: torch.device,
    batch_size: int = 500,
    amp: str = "none",
    channels_last: bool = False,
    num_workers: int = 0,
    sharded: bool = False,
) -> float:
    """Top-1 accuracy (in %) of ``model`` on ``dataset``; the model is left in eval mode.

    Under torchrun (``sharded``) each rank tests batches ``rank, rank + world, ...`` and the
    counts are summed over the ranks: every rank gets the whole set's accuracy.
    """
    model.eval()
    correct = 0
    pin = device.type == "cuda"
    job = world() if sharded else None
    indices = None
    if job is not None and job.size > 1:
        count = len(dataset)
        starts = list(range(0, count, batch_size))[job.rank :: job.size]
        indices = torch.cat(
            [torch.arange(s, min(s + batch_size, count)) for s in starts]
            or [torch.empty(0, dtype=torch.int64)]
        )
    batches = iterate_batches(
        dataset, batch_size, num_workers=num_workers, pin_memory=pin, indices=indices
    )
    for images, labels in batches:
        images = images.to(device, non_blocking=pin)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(images)
        correct += int((logits.argmax(1).cpu() == labels).sum())
    if indices is not None:
        total = torch.tensor([correct], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(total)
        correct = int(total.item())
    return 100.0 * correct / len(dataset)


# --------------------------------------------------------------------------------------------
# Pure pieces: batch size rule, LR factor, CutMix, losses


def default_batch_size(ipc: int, num_classes: int, num_images: int) -> int:
    """delt.md §5's training batch size, capped at ``num_images``.

    IPC >= 50: 100; IPC >= 10: 50; else 10 (RDED/DELT ``argument.py``); doubled for 100- and
    1000-class datasets (ImageNet-100/1K), fixed at 100 for 200 classes (Tiny-ImageNet). IPCs
    between the paper's are given the value of the next smaller paper IPC.
    """
    base = 100 if ipc >= 50 else 50 if ipc >= 10 else 10
    if num_classes == 200:
        base = 100
    elif num_classes >= 100:
        base *= 2
    return max(1, min(base, num_images))


def half_cosine_factor(epoch: int, epochs: int) -> float:
    """DELT/RDED's per-epoch LR factor ``0.5 * (1 + cos(pi * epoch / (2 * epochs)))``.

    1 at epoch 0, 0.5 at ``epoch == epochs``: half a cosine period over 2E, so training ends at
    about half the base LR (not at 0, unlike SRe2L's FKD).
    """
    check_int("epochs", epochs)
    return 0.5 * (1.0 + math.cos(math.pi * epoch / (2 * epochs)))


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
    permutation = params.permutation.to(images.device)
    box = (
        slice(None),
        slice(None),
        slice(params.top, params.bottom),
        slice(params.left, params.right),
    )
    mixed[box] = images[permutation][box]
    return mixed


def soft_label_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``KL(softmax(teacher / T) || softmax(student / T))`` summed over classes, averaged over
    the batch (``batchmean``), without a ``T²`` factor (RDED/DELT); logits (B, K), float."""
    target = (teacher_logits.float() / temperature).softmax(1)
    log_probs = (student_logits.float() / temperature).log_softmax(1)
    return nn.functional.kl_div(log_probs, target, reduction="batchmean")


def cutmix_cross_entropy(logits: Tensor, labels: Tensor, params: CutMixParams | None) -> Tensor:
    """Hard-label loss of a CutMix batch: ``λ CE(y) + (1 - λ) CE(y[permutation])``."""
    if params is None:
        return nn.functional.cross_entropy(logits.float(), labels)
    partner = labels[params.permutation.to(labels.device)]
    return params.lam * nn.functional.cross_entropy(logits.float(), labels) + (
        1.0 - params.lam
    ) * nn.functional.cross_entropy(logits.float(), partner)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on parameters with ``ndim > 1`` (conv and linear weights),
    none on biases and normalization parameters (RDED/DELT ``validation/utils.py``)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Runs the block with torch's global CPU generator forked and seeded with ``seed``.

    The student's initialization and torchvision's RandAugment draw from the global generator;
    forking makes a seed's run reproducible whatever ran before, and restores the caller's state.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------
# Augmentation and training


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


@dataclass(frozen=True)
class TrainSettings:
    """What a training step needs besides the models (delt.md §5).

    Attributes:
        batch_size: images per step.
        temperature: of the KL loss.
        cutmix_beta: λ ~ Beta(b, b); 0: no CutMix.
        hard_labels: cross-entropy on the given labels instead of the teacher's soft labels.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` (with a gradient scaler) autocast of forward
            passes.
        channels_last: memory format of the batches and models.
    """

    batch_size: int
    temperature: float = 20.0
    cutmix_beta: float = 1.0
    hard_labels: bool = False
    amp: str = "none"
    channels_last: bool = False


@dataclass
class Check:
    """A test of the student: after ``epoch`` epochs (1-based), ``accuracy`` % top-1."""

    epoch: int
    accuracy: float


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the global batch of a torchrun job on Gloo (CPU), where
    :class:`torch.nn.SyncBatchNorm` does not run (it needs GPU tensors).

    In training, each rank's per-channel count, sum and sum of squares are summed over the
    ranks with the differentiable ``torch.distributed.nn.functional.all_reduce``, so the batch
    statistics and their gradients are those of the global batch; running statistics are
    updated as :class:`nn.BatchNorm2d` does (unbiased variance, ``momentum``). In eval mode, or
    without a process group, it is :class:`nn.BatchNorm2d`. Input (B, C, H, W) float.
    """

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """``module`` with every ``nn.BatchNorm2d`` replaced (parameters and buffers kept)."""
        if type(module) is nn.BatchNorm2d:
            converted = cls(
                module.num_features, module.eps, module.momentum, module.affine,
                module.track_running_stats,
            )  # fmt: skip
            converted.load_state_dict(module.state_dict())
            converted.train(module.training)
            return converted
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child))
        return module

    def forward(self, input: Tensor) -> Tensor:
        if not (
            self.training
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce

        channels = input.shape[1]
        values = input.float()
        local = torch.cat(
            [
                values.sum((0, 2, 3)),
                (values * values).sum((0, 2, 3)),
                values.new_tensor([input.numel() / channels]),
            ]
        )
        total = all_reduce(local)
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels : 2 * channels] / count - mean * mean).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else self.momentum
                )
                unbiased = var * (count / (count - 1).clamp(min=1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        shape = (1, channels, 1, 1)
        output = (values - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        return output.to(input.dtype)


def _rank_rows(count: int) -> slice:
    """This rank's rows of a global batch of ``count``: contiguous, sizes differing by <= 1."""
    job = world()
    base, extra = divmod(count, job.size)
    start = job.rank * base + min(job.rank, extra)
    return slice(start, start + base + (1 if job.rank < extra else 0))


class StudentTrainer:
    """One student with its AdamW optimizer and half-cosine LR schedule over ``total_epochs``.

    :meth:`train_epochs` can be called several times with different image sets: the optimizer
    state, the schedule position (:attr:`epochs_done`) and the generator carry over, which is
    what a stage-wise schedule (train on U1 for some epochs, then on U1∪U2, ...) needs.

    Args:
        student: the model to train (moved to ``device``).
        teacher: frozen labeller in eval mode on ``device``; None with ``hard_labels``.
        augment: per-image augmentation of normalized batches.
        settings: loss and batch settings.
        total_epochs: the length of the LR schedule (all stages together).
        lr, weight_decay: AdamW's.
        device: where the models run.
        generator: CPU generator drawing batch orders and CutMix params.
        workers: 0: the images are augmented in this process, RandAugment drawing from torch's
            global generator and crops from ``generator`` (main's random stream, bitwise). N > 0:
            in N DataLoader workers (for a GPU: augmentation off the training process), each
            batch from a seed derived from a per-epoch draw of ``generator`` and its index, so
            the numbers are the same for any N >= 1 (but not those of 0); the test set is read
            through N workers too.
        data_parallel: under torchrun, train with DistributedDataParallel (every rank must
            train the same student); False: this rank trains alone.

    The images given to :meth:`train_epoch` may live on the host in their stored dtype (float32
    normalized, or uint8 pixels normalized batch by batch): only batches go to ``device``.
    A stage-wise schedule (PDD's) is :func:`train_stagewise`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        augment: StudentAugment,
        settings: TrainSettings,
        total_epochs: int,
        lr: float,
        weight_decay: float,
        device: torch.device,
        generator: torch.Generator,
        workers: int = 0,
        data_parallel: bool = True,
    ) -> None:
        check_int("workers", workers, low=0)
        if teacher is None and not settings.hard_labels:
            raise ValueError("a teacher is required unless settings.hard_labels")
        self.memory_format = (
            torch.channels_last if settings.channels_last else torch.contiguous_format
        )
        self.student = student.to(device).to(memory_format=self.memory_format)
        # Under torchrun: DistributedDataParallel over the ranks, BatchNorm over the global
        # batch (SyncBatchNorm on GPUs, GlobalBatchNorm2d on Gloo); rank r trains on its rows of
        # every global batch, which every rank draws alike (same generator) and of which it
        # augments only its rows and their CutMix partners.
        self.forward_student: nn.Module = self.student
        if data_parallel and world().size > 1:
            if device.type == "cuda":
                self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
            else:
                self.student = GlobalBatchNorm2d.convert(self.student)
            self.forward_student = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.teacher = teacher
        self.augment = augment
        self.settings = settings
        self.total_epochs = total_epochs
        self.device = device
        self.generator = generator
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.student, weight_decay), lr=lr, betas=(0.9, 0.999)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda epoch: half_cosine_factor(epoch, total_epochs)
        )
        # fp16's small range: the loss is scaled so that gradients do not underflow.
        self.scaler = torch.amp.GradScaler(device.type) if settings.amp == "fp16" else None
        self.workers = workers
        self.epochs_done = 0

    @property
    def distributed(self) -> bool:
        """Whether the student trains with DistributedDataParallel (this rank: its rows)."""
        return self.forward_student is not self.student

    def _sample_cutmix(self, count: int) -> CutMixParams | None:
        if self.settings.cutmix_beta <= 0:
            return None
        height, width = self.augment.output_size
        return sample_cutmix(count, height, width, self.settings.cutmix_beta, self.generator)

    def _needed_rows(self, count: int, cutmix: CutMixParams | None) -> Tensor | None:
        """(R,) int64 ascending: the rows of a global batch of ``count`` this rank augments, its
        own (:func:`_rank_rows`) and, with CutMix, the partners they take their box from; None:
        all of them (one process, or a torchvision whose RandAugment draws cannot be replayed)."""
        if not self.distributed or not self.augment.augments_subsets():
            return None
        own = torch.arange(count)[_rank_rows(count)]
        if cutmix is not None:
            own = torch.cat([own, cutmix.permutation[own]])
        return torch.unique(own)

    def _draws(self, count: int, shape: Sequence[int]):
        """A global batch's draws, in the order of one process's: the augmentation's crops (and
        patch orders), then CutMix; and the rows this rank needs (:meth:`_needed_rows`)."""
        plan = self.augment.plan((count, *shape))
        cutmix = self._sample_cutmix(count)
        return plan, cutmix, self._needed_rows(count, cutmix)

    def step(
        self,
        images: Tensor,
        labels: Tensor,
        augmented: bool = False,
        cutmix: CutMixParams | None = None,
        rows: Tensor | None = None,
    ) -> float:
        """One optimizer step on a global batch: normalized images (B, C, H, W) and labels (B,)
        on the device. The batch is augmented here, each rank augmenting only the rows it needs.

        ``augmented``: ``images`` are already augmented (by a worker): the global batch's rows
        ``rows`` (ascending; None: all B), ``cutmix`` its CutMix draw (drawn here if None).
        """
        count = labels.shape[0]
        if augmented:
            if cutmix is None:
                cutmix = self._sample_cutmix(count)
            batch = images
        else:
            plan, cutmix, rows = self._draws(count, images.shape[1:])
            picked = images if rows is None else images[rows.to(images.device)]
            batch = self.augment.apply(picked, plan, rows)
        return self._optimize(batch, labels, cutmix, rows)

    def _optimize(
        self, batch: Tensor, labels: Tensor, params: CutMixParams | None, rows: Tensor | None
    ) -> float:
        """The step on augmented rows ``rows`` (None: all) of the global batch of ``labels``."""
        settings = self.settings
        global_count = labels.shape[0]
        distributed = self.distributed
        own = _rank_rows(global_count) if distributed else slice(0, global_count)
        batch = _mixed_rows(batch, rows, own, global_count, params)
        batch = batch.contiguous(memory_format=self.memory_format)
        if distributed:
            if settings.hard_labels and params is not None:
                partner = labels[params.permutation.to(labels.device)][own]
            labels = labels[own]
        if not settings.hard_labels:
            # The teacher labels the very batch the student sees: augmented and mixed.
            with torch.no_grad(), autocast(self.device, settings.amp):
                teacher_logits = self.teacher(batch)
        self.student.train()
        with autocast(self.device, settings.amp):
            logits = self.forward_student(batch)
        if settings.hard_labels and distributed and params is not None:
            loss = params.lam * nn.functional.cross_entropy(logits.float(), labels) + (
                1.0 - params.lam
            ) * nn.functional.cross_entropy(logits.float(), partner)
        elif settings.hard_labels:
            loss = cutmix_cross_entropy(logits, labels, params)
        else:
            loss = soft_label_kl(logits, teacher_logits, settings.temperature)
        if distributed:
            # DDP averages the ranks' gradients; weighting each rank's mean by its share of the
            # global batch makes that average the global batch's mean (also for a short batch).
            loss = loss * (batch.shape[0] * world().size / global_count)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if distributed:
            reported = loss.detach().reshape(1) / world().size
            torch.distributed.all_reduce(reported)
            return float(reported)
        return float(loss.detach())

    def _to_device(self, batch: Tensor) -> Tensor:
        pin = self.device.type == "cuda" and batch.device.type == "cpu"
        if pin and not batch.is_pinned():
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=pin)

    def train_epoch(self, images: Tensor, labels: Tensor) -> float:
        """One shuffled pass over ``images`` (N, C, H, W) float32 normalized or uint8 pixels, on
        the host or on ``device``; returns the mean loss. The LR schedule advances once per
        epoch. Under DDP the order, the augmentation draws and CutMix are the global batch's
        (those of one process); each rank reads and augments only the rows it needs.
        """
        if self.epochs_done >= self.total_epochs:
            raise RuntimeError(f"the schedule's {self.total_epochs} epochs are already done")
        count = images.shape[0]
        order = torch.randperm(count, generator=self.generator)
        batch_size = self.settings.batch_size
        losses = []
        if self.workers == 0:
            order = order.to(images.device)
            for start in range(0, count, batch_size):
                index = order[start : start + batch_size]
                plan, cutmix, rows = self._draws(index.numel(), images.shape[1:])
                picked = index if rows is None else index[rows.to(index.device)]
                batch = self._to_device(images.index_select(0, picked))
                batch = self.augment.apply(normalized(batch, self.augment.info), plan, rows)
                label_batch = self._to_device(labels.index_select(0, index))
                losses.append(self._optimize(batch, label_batch, cutmix, rows))
        else:
            epoch_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            # Every batch's CutMix (the same draws as step by step): the workers need the rows.
            starts = range(0, count, batch_size)
            cutmixes = [self._sample_cutmix(min(batch_size, count - s)) for s in starts]
            rows = [
                self._needed_rows(min(batch_size, count - s), c)
                for s, c in zip(starts, cutmixes, strict=True)
            ]
            batches = _AugmentedBatches(images, order, batch_size, self.augment, epoch_seed, rows)
            loader = torch.utils.data.DataLoader(
                batches, batch_size=None, shuffle=False, num_workers=self.workers,
                pin_memory=self.device.type == "cuda",
            )  # fmt: skip
            for position, batch in enumerate(loader):
                index = order[position * batch_size : (position + 1) * batch_size]
                batch = batch.to(self.device, non_blocking=self.device.type == "cuda")
                label_batch = self._to_device(labels.index_select(0, index.to(labels.device)))
                losses.append(
                    self.step(batch, label_batch, True, cutmixes[position], rows[position])
                )
        self.scheduler.step()
        self.epochs_done += 1
        return float(np.mean(losses))

    def state_dict(self) -> dict:
        """Everything :meth:`load_state_dict` needs to continue exactly where this trainer is:
        student, optimizer, LR schedule, gradient scaler, generator, epochs done (CPU tensors
        and plain values, for ``weights_only`` loading)."""
        return {
            "student": {k: v.detach().cpu() for k, v in self.student.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "epochs_done": self.epochs_done,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a :meth:`state_dict` into this (freshly built, same-config) trainer."""
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        self.epochs_done = int(state["epochs_done"])

    def restart_schedule(self, epochs: int) -> None:
        """From now on, a fresh half-cosine over the next ``epochs`` epochs, starting at the base
        LR; the optimizer state (moments, step counts) is kept. PDD's stage-wise evaluation
        restarts the schedule at every stage (pdd.md §1.5)."""
        check_int("epochs", epochs)
        # A new LambdaLR keeps each group's "initial_lr" (setdefault) and sets lr = base * f(0).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda epoch: half_cosine_factor(epoch, epochs)
        )

    @property
    def optimizer_steps(self) -> int:
        """AdamW's step count (0 before the first step); it carries over across stages."""
        steps = [int(state["step"]) for state in self.optimizer.state.values() if "step" in state]
        return max(steps, default=0)

    def test(self, test_set: ImageDataset) -> float:
        """Top-1 accuracy (%) of the student on ``test_set``."""
        return evaluate_accuracy(
            self.student, test_set, self.device, amp=self.settings.amp,
            channels_last=self.settings.channels_last, num_workers=self.workers,
            sharded=self.forward_student is not self.student,
        )  # fmt: skip

    def train_epochs(
        self,
        images: Tensor,
        labels: Tensor,
        epochs: int,
        test_set: ImageDataset | None = None,
        eval_every: int = 10,
        progress: tqdm | None = None,
    ) -> tuple[list[float], list[Check]]:
        """Trains ``epochs`` epochs on ``images``; tests after every epoch whose global count
        (:attr:`epochs_done`) is a multiple of ``eval_every`` and after the schedule's last.

        Returns:
            ``(mean loss of each epoch, checks)``.
        """
        losses: list[float] = []
        checks: list[Check] = []
        for _ in range(epochs):
            losses.append(self.train_epoch(images, labels))
            done = self.epochs_done
            if test_set is not None and (done % eval_every == 0 or done == self.total_epochs):
                checks.append(Check(done, self.test(test_set)))
            if progress is not None:
                progress.update()
                postfix = {"loss": f"{losses[-1]:.3f}"}
                if checks:
                    postfix["acc"] = f"{checks[-1].accuracy:.2f}"
                progress.set_postfix(postfix, refresh=False)
        return losses, checks


class _AugmentedBatches(torch.utils.data.Dataset):
    """Item b: batch b of an epoch, augmented: read from the host set in its stored dtype,
    normalized, then ``augment`` with RandAugment and crops drawn from a seed derived from the
    epoch's seed and b (independent of which worker makes it, or how many there are). With
    ``rows`` (per batch, None: all), only those rows of the batch are read and augmented."""

    def __init__(
        self,
        images: Tensor,
        order: Tensor,
        batch_size: int,
        augment: StudentAugment,
        seed: int,
        rows: Sequence[Tensor | None] | None = None,
    ) -> None:
        self.images = images if images.device.type == "cpu" else images.cpu()
        self.order = order
        self.batch_size = batch_size
        self.augment = augment
        self.seed = seed
        self.rows = rows

    def __len__(self) -> int:
        return -(-self.order.numel() // self.batch_size)

    def __getitem__(self, position: int) -> Tensor:
        index = self.order[position * self.batch_size : (position + 1) * self.batch_size]
        rows = None if self.rows is None else self.rows[position]
        picked = index if rows is None else index[rows]
        batch = normalized(self.images.index_select(0, picked), self.augment.info)
        seed = derive_seed(self.seed, position)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # RandAugment's draws
            crops = torch.Generator().manual_seed(derive_seed(self.seed, position, 1))
            augment = self.augment.reseeded(crops)
            plan = augment.plan((index.numel(), *batch.shape[1:]))
            with torch.no_grad():
                return augment.apply(batch, plan, rows)


def _mixed_rows(
    batch: Tensor, rows: Tensor | None, own: slice, count: int, params: CutMixParams | None
) -> Tensor:
    """Rows ``own`` of a global batch of ``count`` after CutMix (``params``; None: no CutMix),
    from its augmented rows ``rows`` (ascending, holding ``own`` and their partners; None: all,
    in order) given in ``batch`` (R, C, H, W)."""
    if rows is None:
        if params is not None:
            batch = apply_cutmix(batch, params)
        return batch if own == slice(0, count) else batch[own]
    position = torch.full((count,), -1, dtype=torch.int64)
    position[rows] = torch.arange(rows.numel())
    mine = torch.arange(count)[own]
    result = batch[position[mine].to(batch.device)]
    if params is not None:
        partners = batch[position[params.permutation[mine]].to(batch.device)]
        box = (
            slice(None),
            slice(None),
            slice(params.top, params.bottom),
            slice(params.left, params.right),
        )
        result[box] = partners[box]
    return result


# --------------------------------------------------------------------------------------------
# Stage-wise training (PDD: U_1, then U_1 ∪ U_2, ...)


@dataclass(frozen=True)
class StagePlan:
    """One stage of a stage-wise training.

    Attributes:
        stage: 1-based stage number k.
        union_size: images in U_k.
        epochs: epochs trained on U_k.
        first_epoch: epochs done before the stage.
        steps: optimizer steps in the stage (``epochs * ceil(union_size / batch)``).
        steps_before: optimizer steps before it: AdamW's step count when the stage starts.
    """

    stage: int
    union_size: int
    epochs: int
    first_epoch: int
    steps: int
    steps_before: int


def stagewise_plan(
    total_epochs: int, union_sizes: Sequence[int], batch_size: int
) -> list[StagePlan]:
    """Epochs and optimizer steps of every stage: ``total_epochs`` split across the unions.

    >>> [(p.epochs, p.steps) for p in stagewise_plan(100, [20, 40, 60, 80, 100], 50)]
    [(20, 20), (20, 20), (20, 40), (20, 40), (20, 40)]
    """
    check_int("batch_size", batch_size)
    if not union_sizes or min(union_sizes) < 1:
        raise ValueError(f"union_sizes must be >= 1 each, got {list(union_sizes)}")
    plan = []
    first_epoch = steps_before = 0
    for stage, (size, epochs) in enumerate(
        zip(union_sizes, stage_epochs(total_epochs, len(union_sizes)), strict=True), start=1
    ):
        steps = epochs * -(-size // batch_size)  # train_epoch: batches of batch_size, last short
        plan.append(StagePlan(stage, size, epochs, first_epoch, steps, steps_before))
        first_epoch += epochs
        steps_before += steps
    return plan


def stage_lr_factors(plan: Sequence[StagePlan], schedule: str) -> list[float]:
    """The LR factor (times the base LR) of every epoch of a stage-wise training, in order.

    ``restart``: DELT's half-cosine over each stage's epochs, from 1 at every stage start;
    ``continue``: one half-cosine over all epochs (a plain evaluation's curve).
    """
    if schedule not in STAGE_SCHEDULES:
        raise ValueError(f"schedule must be one of {STAGE_SCHEDULES}, got {schedule!r}")
    total = sum(stage.epochs for stage in plan)
    if schedule == "continue":
        return [half_cosine_factor(epoch, total) for epoch in range(total)]
    return [
        half_cosine_factor(epoch, stage.epochs) for stage in plan for epoch in range(stage.epochs)
    ]


def train_stagewise(
    trainer: StudentTrainer,
    unions: Sequence[tuple[Tensor, Tensor]],
    plan: Sequence[StagePlan],
    schedule: str,
    test_set: ImageDataset | None = None,
    eval_every: int = 10,
    progress: tqdm | None = None,
) -> tuple[list[float], list[Check], list[dict]]:
    """Trains ``trainer``'s student on each union in turn for its planned epochs.

    The trainer (its optimizer, step count, generator) carries over from stage to stage; with
    ``restart`` its LR schedule restarts at each stage. ``trainer.total_epochs`` must be the plan's
    total. Tests ``test_set`` as :meth:`StudentTrainer.train_epochs` does and at each stage's end.

    Args:
        unions: ``(images (N_k, C, H, W), labels (N_k,))`` of U_1 … U_P on the trainer's device.

    Returns:
        ``(loss of each epoch, checks, one record per stage)``; a record holds the stage, its
        union size, epochs, optimizer steps before and after it, the LR factor it starts at, and
        the test accuracy at its end (None without ``test_set``).
    """
    if len(unions) != len(plan):
        raise ValueError(f"{len(unions)} unions for a plan of {len(plan)} stages")
    total = sum(stage.epochs for stage in plan)
    if trainer.total_epochs != total or trainer.epochs_done != 0:
        raise ValueError(
            f"the trainer must be fresh with total_epochs = {total} (the plan's), got "
            f"{trainer.total_epochs} with {trainer.epochs_done} done"
        )
    losses: list[float] = []
    checks: list[Check] = []
    records: list[dict] = []
    for (images, labels), stage in zip(unions, plan, strict=True):
        if images.shape[0] != stage.union_size:
            raise ValueError(
                f"stage {stage.stage}: {images.shape[0]} images, planned {stage.union_size}"
            )
        if schedule == "restart":
            trainer.restart_schedule(stage.epochs)
        lr_start = trainer.optimizer.param_groups[0]["lr"]
        steps_before = trainer.optimizer_steps
        stage_losses, stage_checks = trainer.train_epochs(
            images, labels, stage.epochs, test_set, eval_every, progress
        )
        accuracy = None
        if test_set is not None:
            if not stage_checks or stage_checks[-1].epoch != trainer.epochs_done:
                stage_checks.append(Check(trainer.epochs_done, trainer.test(test_set)))
            accuracy = stage_checks[-1].accuracy
        losses += stage_losses
        checks += stage_checks
        records.append(
            {
                "stage": stage.stage,
                "union_size": stage.union_size,
                "epochs": stage.epochs,
                "steps_before": steps_before,
                "steps_after": trainer.optimizer_steps,
                "lr_start": lr_start,
                "accuracy": accuracy,
            }
        )
    return losses, checks, records
