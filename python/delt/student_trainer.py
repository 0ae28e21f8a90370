"""The student trainer of ``delt eval``, PDD's hard-init student and stage-wise training:
:class:`StudentTrainer` (one student, its AdamW and half-cosine LR schedule, teacher soft labels
with a KL loss or hard labels; DistributedDataParallel under torchrun), :class:`GlobalBatchNorm2d`
for Gloo, and the evaluation protocol's defaults (RDED/DELT's; docs/evaluation.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from delt.batches import evaluate_accuracy
from delt.config import check_int
from delt.data import ImageDataset
from delt.distilled_set import normalized
from delt.distributed import world
from delt.runtime import autocast, derive_seed
from delt.schedules import LR_SCHEDULES, cosine_factor, half_cosine_factor, lr_factor
from delt.student_augment import (
    CutMixParams,
    StudentAugment,
    apply_cutmix,
    cutmix_cross_entropy,
    sample_cutmix,
)

__all__ = [
    "LR_SCHEDULES",
    "PROTOCOL",
    "AccuracyCheck",
    "AugmentedBatches",
    "EpochDraws",
    "SoftLabelSource",
    "GlobalBatchNorm2d",
    "StudentProtocol",
    "StudentTrainer",
    "TrainSettings",
    "batch_statistics",
    "cosine_factor",
    "default_batch_size",
    "draw_epoch",
    "half_cosine_factor",
    "lr_factor",
    "parameter_groups",
    "seeded",
    "soft_label_kl",
]


@dataclass(frozen=True)
class StudentProtocol:
    """The evaluation protocol's defaults (DELT's evaluation, Shen et al., CVPR 2025, after
    RDED's, Sun et al., CVPR 2024): ``delt eval``'s flag defaults and what pdd's hard-init
    student trains with."""

    temperature: float = 20.0
    lr: float = 1e-3
    weight_decay: float = 0.01
    cutmix_beta: float = 1.0
    randaugment_ops: int = 2
    randaugment_magnitude: int = 6
    min_crop: float = 0.25


PROTOCOL = StudentProtocol()


# --------------------------------------------------------------------------------------------
# Pure pieces: batch size rule, LR factor, loss, optimizer groups, seeding


def default_batch_size(ipc: int, num_classes: int, num_images: int) -> int:
    """DELT's evaluation batch size (github.com/VILA-Lab/DELT), capped at ``num_images``.

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


def soft_label_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``KL(softmax(teacher / T) || softmax(student / T))`` summed over classes, averaged over
    the batch (``batchmean``), without a ``T²`` factor (RDED/DELT); logits (B, K), float."""
    target = (teacher_logits.float() / temperature).softmax(1)
    log_probs = (student_logits.float() / temperature).log_softmax(1)
    return nn.functional.kl_div(log_probs, target, reduction="batchmean")


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


@contextlib.contextmanager
def batch_statistics(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """With ``enabled``, the block runs ``model``'s BatchNorm layers on the batch's statistics
    (training mode) without updating their running statistics (``track_running_stats`` off);
    each layer's mode and flag come back after."""
    if not enabled:
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(layer.training, layer.track_running_stats) for layer in layers]
    for layer in layers:
        layer.training, layer.track_running_stats = True, False
    try:
        yield
    finally:
        for layer, (training, track) in zip(layers, saved, strict=True):
            layer.training, layer.track_running_stats = training, track


@dataclass(frozen=True)
class TrainSettings:
    """What a training step needs besides the models (docs/evaluation.md).

    Attributes:
        batch_size: images per step.
        temperature: of the KL loss.
        cutmix_beta: λ ~ Beta(b, b); 0: no CutMix.
        hard_labels: cross-entropy on the given labels instead of the teacher's soft labels.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` (with a gradient scaler) autocast of forward
            passes.
        channels_last: memory format of the batches and models.
        lr_schedule: the per-epoch LR factor, a key of :data:`LR_SCHEDULES`.
        loss: the soft-label loss: ``"kl"`` (:func:`soft_label_kl`) or ``"mse-ce"`` (EDC's
            ``MSE(student logits, teacher logits) + ce_weight · CE(student, own label)``, the
            label of the image each row was pasted into, not mixed).
        ce_weight: the CE weight of ``"mse-ce"``.
        teacher_batch_stats: the teacher labels each batch with BatchNorm normalizing by the
            batch's own statistics (CV-DD's labels, its teachers in train mode), its running
            statistics untouched (:func:`batch_statistics`).
        ema_decay: > 0: an exponential moving average of the student's parameters,
            ``ema = d·ema + (1 − d)·param`` after every optimizer step, is what :meth:`test`
            tests (with the student's own BatchNorm statistics; EDC's ``EMAMODEL``); 0: off.
    """

    batch_size: int
    temperature: float = 20.0
    cutmix_beta: float = 1.0
    hard_labels: bool = False
    amp: str = "none"
    channels_last: bool = False
    lr_schedule: str = "half-cosine"
    ema_decay: float = 0.0
    loss: str = "kl"
    ce_weight: float = 0.025
    teacher_batch_stats: bool = False


@dataclass
class AccuracyCheck:
    """A test of the student: after ``epoch`` epochs (1-based), ``accuracy`` % top-1."""

    epoch: int
    accuracy: float


@dataclass(frozen=True)
class EpochDraws:
    """An epoch's draws from the trainer's generator when batches are augmented from per-batch
    seeds (``--workers N > 0``, and any run on stored labels): what batch b holds and how it is
    mixed depend only on the seed, the set's size, the batch size and the epoch, never on
    which process or worker augments it.

    Attributes:
        order: (N,) int64, the epoch's shuffle; batch b is ``order[b * B : (b + 1) * B]``.
        epoch_seed: batch b's RandAugment draws come from ``derive_seed(epoch_seed, b)``, its
            crops and flips (and patch orders) from ``derive_seed(epoch_seed, b, 1)``.
        cutmix: per batch, its CutMix draw (None: CutMix off).
    """

    order: Tensor
    epoch_seed: int
    cutmix: list[CutMixParams | None]


def draw_epoch(
    generator: torch.Generator, count: int, batch_size: int, cutmix_beta: float,
    output_size: Sequence[int],
) -> EpochDraws:  # fmt: skip
    """Draws one epoch's :class:`EpochDraws` from ``generator`` (the trainer's, seeded with the
    student's seed): the shuffle, the epoch's seed, then every batch's CutMix, in this order.
    ``output_size``: (H, W) of the augmented images (the CutMix box's frame)."""
    order = torch.randperm(count, generator=generator)
    epoch_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    height, width = output_size
    cutmix = [
        None
        if cutmix_beta <= 0
        else sample_cutmix(min(batch_size, count - start), height, width, cutmix_beta, generator)
        for start in range(0, count, batch_size)
    ]
    return EpochDraws(order, epoch_seed, cutmix)


class SoftLabelSource(Protocol):
    """Stored teacher logits in place of an online teacher (``delt eval --labels``)."""

    def check_order(self, epoch: int, order: Tensor) -> None:
        """Raises unless ``order`` (N,) is the shuffle of epoch ``epoch`` the labels were
        made for."""

    def logits(self, epoch: int, position: int, rows: slice) -> Tensor:
        """(R, K) float32 logits of rows ``rows`` of batch ``position`` of epoch ``epoch``
        (0-based), augmented and mixed as the student sees them."""


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
    """One student with its AdamW optimizer and LR schedule (``settings.lr_schedule``, DELT's
    half-cosine by default) over ``total_epochs``.

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
        soft_labels: stored teacher logits (``delt eval --labels``) instead of ``teacher``:
            the batches are then always augmented from per-batch seeds (:func:`draw_epoch`),
            in this process with ``workers=0``, so any ``workers`` gives the same batches.
            A source with ``replay_epoch`` (imported FKD labels, :mod:`delt.fkd_labels`) also
            gives each epoch's batches, augmented and mixed as recorded.

    The images given to :meth:`train_epoch` may live on the host in their stored dtype (float32
    normalized, or uint8 pixels normalized batch by batch): only batches go to ``device``.
    A stage-wise schedule (PDD's) is :func:`delt.stagewise_training.train_stagewise`.
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
        soft_labels: SoftLabelSource | None = None,
    ) -> None:
        check_int("workers", workers, low=0)
        if teacher is None and soft_labels is None and not settings.hard_labels:
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
        schedule = settings.lr_schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda epoch: lr_factor(schedule, epoch, total_epochs)
        )
        # fp16's small range: the loss is scaled so that gradients do not underflow.
        self.scaler = torch.amp.GradScaler(device.type) if settings.amp == "fp16" else None
        self.workers = workers
        self.soft_labels = soft_labels
        self._position: int | None = None  # the batch of the epoch being trained on
        self.epochs_done = 0
        # The EMA of the parameters (settings.ema_decay > 0), in self.student's parameter order.
        self.ema: list[Tensor] | None = (
            [p.detach().clone() for p in self.student.parameters()]
            if settings.ema_decay > 0
            else None
        )

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
        Returns the loss (a host synchronization on a GPU; :meth:`train_epoch` reads its
        steps' losses once, at the epoch's end).
        """
        return float(self._step(images, labels, augmented, cutmix, rows))

    def _step(
        self,
        images: Tensor,
        labels: Tensor,
        augmented: bool,
        cutmix: CutMixParams | None,
        rows: Tensor | None,
    ) -> Tensor:
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
    ) -> Tensor:
        """The step on augmented rows ``rows`` (None: all) of the global batch of ``labels``;
        its loss, a detached scalar on the device (not read back here)."""
        settings = self.settings
        global_count = labels.shape[0]
        distributed = self.distributed
        own = _rank_rows(global_count) if distributed else slice(0, global_count)
        batch = _mixed_rows(batch, rows, own, global_count, params)
        batch = batch.contiguous(memory_format=self.memory_format)
        if self.soft_labels is not None and not settings.hard_labels:
            if self._position is None:
                raise RuntimeError("stored labels are read by train_epoch's batches only")
            teacher_logits = self.soft_labels.logits(self.epochs_done, self._position, own)
            teacher_logits = teacher_logits.to(self.device)
        elif not settings.hard_labels:
            # The teacher labels the very batch the student sees: augmented and mixed.
            with (
                torch.no_grad(),
                autocast(self.device, settings.amp),
                batch_statistics(self.teacher, settings.teacher_batch_stats),
            ):
                teacher_logits = self.teacher(batch)
        self.student.train()
        with autocast(self.device, settings.amp):
            logits = self.forward_student(batch)
        if settings.hard_labels:
            loss = cutmix_cross_entropy(logits, labels, params, own if distributed else None)
        elif settings.loss == "mse-ce":
            loss = nn.functional.mse_loss(
                logits.float(), teacher_logits.float()
            ) + settings.ce_weight * cutmix_cross_entropy(
                logits, labels, None, own if distributed else None
            )
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
        if self.ema is not None:
            self._update_ema()
        if distributed:
            reported = loss.detach().reshape(1) / world().size
            torch.distributed.all_reduce(reported)
            return reported.reshape(())
        return loss.detach()

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.settings.ema_decay
        for average, parameter in zip(self.ema, self.student.parameters(), strict=True):
            average.mul_(decay).add_(parameter.detach(), alpha=1.0 - decay)

    @contextlib.contextmanager
    def _ema_parameters(self) -> Iterator[None]:
        """The block runs with the EMA in the student's parameters (swapped back after)."""
        if self.ema is None:
            yield
            return
        self._swap_ema()
        try:
            yield
        finally:
            self._swap_ema()

    @torch.no_grad()
    def _swap_ema(self) -> None:
        for average, parameter in zip(self.ema, self.student.parameters(), strict=True):
            swapped = parameter.detach().clone()
            parameter.copy_(average)
            average.copy_(swapped)

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
        batch_size = self.settings.batch_size
        losses = []
        replay = getattr(self.soft_labels, "replay_epoch", None)
        if replay is not None:
            # Imported FKD labels (delt.fkd_labels): the recorded batches, crops, flips, mixes.
            for position, (index, batch) in enumerate(replay(self.epochs_done, images)):
                label_batch = self._to_device(labels.index_select(0, index.to(labels.device)))
                self._position = position
                try:
                    losses.append(self._optimize(self._to_device(batch), label_batch, None, None))
                finally:
                    self._position = None
        elif self.workers == 0 and self.soft_labels is None:
            order = torch.randperm(count, generator=self.generator).to(images.device)
            for start in range(0, count, batch_size):
                index = order[start : start + batch_size]
                plan, cutmix, rows = self._draws(index.numel(), images.shape[1:])
                picked = index if rows is None else index[rows.to(index.device)]
                batch = self._to_device(images.index_select(0, picked))
                batch = self.augment.apply(normalized(batch, self.augment.info), plan, rows)
                label_batch = self._to_device(labels.index_select(0, index))
                losses.append(self._optimize(batch, label_batch, cutmix, rows))
        else:
            # Every batch's CutMix (the same draws as step by step): the workers need the rows.
            draws = draw_epoch(
                self.generator, count, batch_size, self.settings.cutmix_beta,
                self.augment.output_size,
            )  # fmt: skip
            order, cutmixes = draws.order, draws.cutmix
            if self.soft_labels is not None:
                self.soft_labels.check_order(self.epochs_done, order)
            starts = range(0, count, batch_size)
            rows = [
                self._needed_rows(min(batch_size, count - s), c)
                for s, c in zip(starts, cutmixes, strict=True)
            ]
            batches = AugmentedBatches(
                images, order, batch_size, self.augment, draws.epoch_seed, rows
            )
            if self.workers == 0:  # stored labels: the workers' batches, made here
                loader = (batches[position] for position in range(len(batches)))
            else:
                loader = torch.utils.data.DataLoader(
                    batches, batch_size=None, shuffle=False, num_workers=self.workers,
                    pin_memory=self.device.type == "cuda",
                )  # fmt: skip
            for position, batch in enumerate(loader):
                index = order[position * batch_size : (position + 1) * batch_size]
                batch = batch.to(self.device, non_blocking=self.device.type == "cuda")
                label_batch = self._to_device(labels.index_select(0, index.to(labels.device)))
                self._position = position
                try:
                    losses.append(
                        self._step(batch, label_batch, True, cutmixes[position], rows[position])
                    )
                finally:
                    self._position = None
        self.scheduler.step()
        self.epochs_done += 1
        return _mean_loss(losses)

    def state_dict(self) -> dict:
        """Everything :meth:`load_state_dict` needs to continue exactly where this trainer is:
        student, optimizer, LR schedule, gradient scaler, generator, epochs done (CPU tensors
        and plain values, for ``weights_only`` loading)."""
        state = {
            "student": {k: v.detach().cpu() for k, v in self.student.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "epochs_done": self.epochs_done,
        }
        if self.ema is not None:
            state["ema"] = [average.detach().cpu() for average in self.ema]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restores a :meth:`state_dict` into this (freshly built, same-config) trainer."""
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        self.epochs_done = int(state["epochs_done"])
        if self.ema is not None:
            for average, saved in zip(self.ema, state["ema"], strict=True):
                average.copy_(saved)

    def restart_schedule(self, epochs: int) -> None:
        """From now on, a fresh half-cosine over the next ``epochs`` epochs, starting at the base
        LR; the optimizer state (moments, step counts) is kept. PDD's stage-wise evaluation
        restarts the schedule at every stage (Chen et al., ICLR 2024; its evaluation code)."""
        check_int("epochs", epochs)
        # A new LambdaLR keeps each group's "initial_lr" (setdefault) and sets lr = base * f(0).
        schedule = self.settings.lr_schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda epoch: lr_factor(schedule, epoch, epochs)
        )

    @property
    def optimizer_steps(self) -> int:
        """AdamW's step count (0 before the first step); it carries over across stages."""
        steps = [int(state["step"]) for state in self.optimizer.state.values() if "step" in state]
        return max(steps, default=0)

    def test(self, test_set: ImageDataset) -> float:
        """Top-1 accuracy (%) of the student (with ``ema_decay``: of its EMA) on ``test_set``."""
        with self._ema_parameters():
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
    ) -> tuple[list[float], list[AccuracyCheck]]:
        """Trains ``epochs`` epochs on ``images``; tests after every epoch whose global count
        (:attr:`epochs_done`) is a multiple of ``eval_every`` and after the schedule's last.

        Returns:
            ``(mean loss of each epoch, checks)``.
        """
        losses: list[float] = []
        checks: list[AccuracyCheck] = []
        for _ in range(epochs):
            losses.append(self.train_epoch(images, labels))
            done = self.epochs_done
            if test_set is not None and (done % eval_every == 0 or done == self.total_epochs):
                checks.append(AccuracyCheck(done, self.test(test_set)))
            if progress is not None:
                progress.update()
                postfix = {"loss": f"{losses[-1]:.3f}"}
                if checks:
                    postfix["acc"] = f"{checks[-1].accuracy:.2f}"
                progress.set_postfix(postfix, refresh=False)
        return losses, checks


class AugmentedBatches(torch.utils.data.Dataset):
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


def _mean_loss(losses: Sequence[Tensor]) -> float:
    """The mean of an epoch's step losses (scalars on the device), read back in one copy: the
    steps run without a host synchronization each. The float64 mean of the float32 values,
    as ``np.mean`` of the floats read step by step gave (the same float)."""
    values = torch.stack(list(losses)).cpu().numpy().astype(np.float64)
    return float(np.mean(values))


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
        params.paste(result, batch[position[params.permutation[mine]].to(batch.device)])
    return result
