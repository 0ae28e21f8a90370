"""``delt eval``: train students from scratch on a distilled set and test them on real data.

The protocol is RDED/DELT's (reference/delt.md §5), one documented recipe for every method:

* **Soft labels online.** No label files: the frozen teacher labels every training batch,
  *after* augmentation and CutMix, i.e. exactly the pixels the student sees. Target =
  ``softmax(teacher(x) / T)``; loss = ``KL(log_softmax(student(x) / T) || target)`` with
  ``batchmean`` reduction and **no** ``T²`` factor; T = 20. ``--hard-labels`` trains on the
  set's own labels instead (CutMix-mixed cross-entropy), without the teacher.
* **Augmentation per image:** torchvision's RandAugment (``--randaugment-ops`` N,
  ``--randaugment-magnitude`` M on timm's 0-10 scale: DELT's ``rand-m6-n2``), then
  RandomResizedCrop(``--min-crop`` 0.25 to 1) and a horizontal flip
  (``delt_ext.RandomResizedCropFlip``, one box per image). Then **CutMix** on the batch:
  λ ~ Beta(β, β) with β = 1, one box and one permutation for the batch.
* **Optimizer:** AdamW (lr 1e-3, betas (0.9, 0.999)), weight decay 0.01 on weights with
  ``ndim > 1`` only (biases and BN parameters are not decayed), and DELT's per-epoch half-cosine
  ``LambdaLR`` factor ``0.5 * (1 + cos(pi * e / (2 E)))``: the LR ends near half its start.
* **Batch size** by delt.md §5's rule (:func:`default_batch_size`), capped at the set size.
* **Tests** on the real test split after every ``--eval-every`` epochs and after the last; the
  reported number is the best of these checks (RDED's code), the final one is reported beside it.
  ``--seeds a,b,c`` trains one student per seed: mean ± std (population std, numpy's default, as
  the papers' tables).

Representation: distilled sets are normalized float tensors, but RandAugment's colour ops
(posterize, solarize, equalize, ...) are defined on pixel values. Each image is denormalized to
[0, 1] (clamped; recovery keeps pixels in range anyway), RandAugment runs on that float image
(torchvision supports float images in [0, 1]; no uint8 round trip, so the distilled values are
not quantized), geometric ops fill with the dataset mean (timm fills with the image mean), and
the result is normalized again before the crop. torchvision's RandAugment has no magnitude noise
(timm's ``mstd1.0``): the magnitude is fixed. RandAugment draws from torch's global generator,
which each seed's run forks and seeds (:func:`seeded`), so a run is reproducible and leaves the
caller's generator alone.

``--random-real`` is the baseline: instead of the distilled set, each seed draws ``--ipc`` real
training images per class (:func:`draw_random_real`, seeded by the seed) and trains the same way.

Results go to ``DIR/eval.json`` (atomic): resolved config, per-seed curves, best/final,
mean/std, wall seconds, versions. Finished seeds are saved as they finish; re-running the same
command reuses them (a complete file means no work at all), a different configuration starts
over. Seeds are not part of the identity: a run with other ``--seeds`` reuses the finished ones
it asks for and keeps the others under ``other_seeds`` (the summary is over ``--seeds`` only).

Building blocks for other schedules (PDD's stage-wise evaluation, ``--stagewise`` in
:mod:`delt.stagewise`, trains on U1, then U1∪U2, … with the optimizer state carried over):
:class:`StudentTrainer` holds one student with its optimizer and LR schedule over a total number
of epochs and trains it epoch by epoch on whatever images it is given; :class:`EvalContext`
resolves teacher, student architecture, test set and settings once.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import delt_ext
from delt.config import ConfigError, identity_dict, option
from delt.data import DatasetInfo, ImageDataset, load_like
from delt.io import read_json, sha256_file, torch_load, write_json
from delt.models import (
    Checkpoint,
    TeacherMismatchError,
    build_model,
    check_compatible,
    load_checkpoint,
    model_spec,
)
from delt.runtime import autocast, logger, resolve_device, versions
from delt.teacher import evaluate_accuracy

__all__ = [
    "Check",
    "CutMixParams",
    "EvalConfig",
    "EvalContext",
    "EvalResult",
    "SeedResult",
    "StudentAugment",
    "StudentTrainer",
    "TrainSettings",
    "apply_cutmix",
    "check_distilled_set",
    "cutmix_cross_entropy",
    "default_batch_size",
    "draw_random_real",
    "evaluate",
    "half_cosine_factor",
    "load_distilled",
    "mean_std",
    "parameter_groups",
    "sample_cutmix",
    "seeded",
    "soft_label_kl",
]

EVAL_FORMAT = "delt-eval-v1"
# RandAugment magnitudes on timm's scale: M of 10 = M / 10 of each op's largest strength.
RANDAUGMENT_BINS = 11


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass
class EvalConfig:
    """Configuration of ``delt eval`` (one field per flag)."""

    distilled: str = option(
        help="folder of a distilled set (distilled.pt + manifest.json of `delt recover`); "
        "with --random-real, the folder the results go to",
        identity=False,
    )
    teacher: str | None = option(
        None, help="teacher checkpoint (default: the one the set's manifest names)", identity=False
    )
    data_root: str | None = option(
        None, help="folder of the real dataset (default: the dataset's own)", identity=False
    )
    student: str | None = option(
        None, help="student architecture (default: the teacher's, with its --width)"
    )
    student_width: int | None = option(None, help="convnetD student width (default: the teacher's)")
    epochs: int = option(300, help="training epochs per student")
    seeds: tuple[int, ...] = option((0,), help="one student per seed, e.g. 3407,4663,2897")
    eval_every: int = option(10, help="test every k epochs (and after the last)")
    batch_size: int | None = option(
        None, help="default: 100 / 50 / 10 for IPC >= 50 / >= 10 / less (delt.md §5), capped"
    )
    temperature: float = option(20.0, help="softmax temperature of the KL loss")
    lr: float = option(1e-3, help="AdamW learning rate")
    weight_decay: float = option(0.01, help="AdamW weight decay (weights with ndim > 1 only)")
    cutmix_beta: float = option(1.0, help="CutMix lambda ~ Beta(b, b); 0 turns CutMix off")
    randaugment_ops: int = option(2, help="RandAugment ops per image (0: none)")
    randaugment_magnitude: int = option(6, help="RandAugment magnitude, 0-10 (timm's scale)")
    min_crop: float = option(0.25, help="smallest RandomResizedCrop area fraction")
    hard_labels: bool = option(False, help="train on the set's labels, no teacher")
    random_real: bool = option(
        False, help="baseline: each seed draws --ipc random real images per class instead"
    )
    ipc: int | None = option(None, help="--random-real: images per class (default: the set's)")
    amp: Literal["none", "bf16"] = option("none", help="autocast dtype of forward passes")
    channels_last: bool = option(False, help="channels_last memory format (faster on CPU)")
    stagewise: bool = option(
        False,
        help="a --method pdd set: one student on U1, then U1+U2, ... (--epochs split across "
        "the stages, optimizer state carried over), beside the plain evaluation of the final set",
    )
    stage_schedule: Literal["restart", "continue"] = option(
        "restart",
        help="--stagewise LR schedule: a half-cosine per stage (PDD) or one over all --epochs",
    )
    out: str | None = option(
        None,
        help="results file (default: DISTILLED/eval.json; --stagewise: eval-stagewise.json)",
        identity=False,
    )
    device: str = option("auto", help="auto, cpu, cuda, ...", identity=False)
    progress: bool = option(True, help="show progress bars", identity=False)

    def __post_init__(self) -> None:
        for name in ("epochs", "eval_every"):
            _check_int(name, getattr(self, name), 1)
        for name in ("batch_size", "student_width", "ipc"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        _check_int("randaugment_ops", self.randaugment_ops, 0)
        _check_int("randaugment_magnitude", self.randaugment_magnitude, 0)
        if self.randaugment_magnitude > RANDAUGMENT_BINS - 1:
            raise ConfigError(
                f"--randaugment-magnitude must be in 0..{RANDAUGMENT_BINS - 1}, "
                f"got {self.randaugment_magnitude}"
            )
        self.seeds = tuple(self.seeds)
        if not self.seeds:
            raise ConfigError("--seeds needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds lists a seed twice: {','.join(map(str, self.seeds))}")
        for name in ("temperature", "lr"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"--{name} must be a finite number > 0, got {value}")
        for name in ("weight_decay", "cutmix_beta"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"--{_flag(name)} must be a finite number >= 0, got {value}")
        if not 0 < self.min_crop <= 1:
            raise ConfigError(f"--min-crop must be in (0, 1], got {self.min_crop}")
        if self.ipc is not None and not self.random_real:
            raise ConfigError("--ipc applies to --random-real (a distilled set has its own IPC)")
        if self.stagewise and self.random_real:
            raise ConfigError("--stagewise trains on the stages of a pdd set, not --random-real")
        if self.stage_schedule != "restart" and not self.stagewise:
            raise ConfigError("--stage-schedule applies with --stagewise")
        if self.student is not None:
            try:
                spec = model_spec(self.student)
            except ValueError as error:
                raise ConfigError(str(error).replace("--arch", "--student", 1)) from None
            if self.student_width is not None and "width" not in spec.kwargs:
                raise ConfigError(
                    f"--student-width applies to convnetD students, not --student {self.student}"
                )

    @property
    def results_path(self) -> Path:
        name = "eval-stagewise.json" if self.stagewise else "eval.json"
        return Path(self.out) if self.out else Path(self.distilled) / name


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"--{_flag(name)} must be an integer >= {low}, got {value!r}")


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
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
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


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (numpy's default, ``ddof=0``)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std())


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


class StudentAugment(nn.Module):
    """RandAugment, then RandomResizedCrop + flip, per image, on normalized (B, C, H, W) float.

    Args:
        info: the dataset (normalization, resolution, channel means used as the fill value).
        randaugment_ops: ops per image; 0 disables RandAugment.
        randaugment_magnitude: 0-10 on timm's scale.
        min_crop: smallest crop area fraction; crops are resized back to the input size.
        generator: draws the crop boxes and flips.
    """

    def __init__(
        self,
        info: DatasetInfo,
        randaugment_ops: int,
        randaugment_magnitude: int,
        min_crop: float,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        from torchvision.transforms import InterpolationMode, v2

        self.info = info
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

    def forward(self, images: Tensor) -> Tensor:
        if self.randaugment is not None:
            pixels = self.info.denormalize(images).clamp_(0.0, 1.0)
            # One draw of ops per image, as timm's per-sample transform in a DataLoader.
            pixels = torch.stack([self.randaugment(image) for image in pixels])
            images = self.info.normalize(pixels)
        return self.crop(images)


@dataclass(frozen=True)
class TrainSettings:
    """What a training step needs besides the models (delt.md §5).

    Attributes:
        batch_size: images per step.
        temperature: of the KL loss.
        cutmix_beta: λ ~ Beta(b, b); 0: no CutMix.
        hard_labels: cross-entropy on the given labels instead of the teacher's soft labels.
        amp: ``"none"`` or ``"bf16"`` autocast of forward passes.
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

    A stage-wise schedule, e.g. PDD's (E epochs split over the stages, one optimizer)::

        with seeded(seed):
            trainer = context.make_trainer(seed, total_epochs=E)
            for images, labels, epochs in stages:  # U1, then U1 ∪ U2, ...
                losses, checks = trainer.train_epochs(images, labels, epochs, context.test_set)
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        augment: nn.Module,
        settings: TrainSettings,
        total_epochs: int,
        lr: float,
        weight_decay: float,
        device: torch.device,
        generator: torch.Generator,
    ) -> None:
        if teacher is None and not settings.hard_labels:
            raise ValueError("a teacher is required unless settings.hard_labels")
        self.memory_format = (
            torch.channels_last if settings.channels_last else torch.contiguous_format
        )
        self.student = student.to(device).to(memory_format=self.memory_format)
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
        self.epochs_done = 0

    def step(self, images: Tensor, labels: Tensor) -> float:
        """One optimizer step on a batch of normalized images (B, C, H, W) and labels (B,)."""
        settings = self.settings
        batch = self.augment(images)
        params = None
        if settings.cutmix_beta > 0:
            params = sample_cutmix(
                batch.shape[0], batch.shape[2], batch.shape[3], settings.cutmix_beta,
                self.generator,
            )  # fmt: skip
            batch = apply_cutmix(batch, params)
        batch = batch.contiguous(memory_format=self.memory_format)
        if not settings.hard_labels:
            # The teacher labels the very batch the student sees: augmented and mixed.
            with torch.no_grad(), autocast(self.device, settings.amp):
                teacher_logits = self.teacher(batch)
        self.student.train()
        with autocast(self.device, settings.amp):
            logits = self.student(batch)
        if settings.hard_labels:
            loss = cutmix_cross_entropy(logits, labels, params)
        else:
            loss = soft_label_kl(logits, teacher_logits, settings.temperature)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def train_epoch(self, images: Tensor, labels: Tensor) -> float:
        """One shuffled pass over ``images`` (N, C, H, W) on ``device``; returns the mean loss.

        The LR schedule advances once per epoch.
        """
        if self.epochs_done >= self.total_epochs:
            raise RuntimeError(f"the schedule's {self.total_epochs} epochs are already done")
        count = images.shape[0]
        order = torch.randperm(count, generator=self.generator).to(images.device)
        losses = []
        for start in range(0, count, self.settings.batch_size):
            index = order[start : start + self.settings.batch_size]
            losses.append(self.step(images.index_select(0, index), labels.index_select(0, index)))
        self.scheduler.step()
        self.epochs_done += 1
        return float(np.mean(losses))

    def restart_schedule(self, epochs: int) -> None:
        """From now on, a fresh half-cosine over the next ``epochs`` epochs, starting at the base
        LR; the optimizer state (moments, step counts) is kept. PDD's stage-wise evaluation
        restarts the schedule at every stage (pdd.md §1.5)."""
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
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
            channels_last=self.settings.channels_last,
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


# --------------------------------------------------------------------------------------------
# Sets: distilled or random real


def load_distilled(folder: str | Path) -> tuple[Tensor, Tensor, dict]:
    """``(images (N, C, H, W) float32 normalized, labels (N,) int64, manifest)`` of a recovery."""
    folder = Path(folder)
    if not (folder / "distilled.pt").is_file():
        raise FileNotFoundError(
            f"--distilled {folder}: no distilled.pt (pass the --out folder of `delt recover` or "
            "the distilled/ folder of `delt distill`)"
        )
    if not (folder / "manifest.json").is_file():
        raise FileNotFoundError(f"--distilled {folder}: no manifest.json beside distilled.pt")
    payload = torch_load(folder / "distilled.pt")
    return payload["images"], payload["labels"], read_json(folder / "manifest.json")


def draw_random_real(dataset: ImageDataset, ipc: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``ipc`` random training images per class, class-major, drawn with ``seed``.

    Returns:
        ``(images (K * ipc, C, H, W) float32 normalized, labels int64, dataset indices int64)``.

    Raises:
        ConfigError: a class has fewer than ``ipc`` images.
    """
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(dataset.info.num_classes):
        members = torch.nonzero(dataset.targets == c).view(-1)
        if members.numel() < ipc:
            raise ConfigError(
                f"--ipc {ipc}: class {c} ({dataset.info.class_names[c]!r}) has only "
                f"{members.numel()} training images"
            )
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:ipc]])
    indices = torch.cat(chosen)
    return dataset.images(indices), dataset.targets[indices].clone(), indices


# --------------------------------------------------------------------------------------------
# A run


@dataclass
class SeedResult:
    """One student: best and final top-1 (%), its test curve and per-epoch training loss."""

    seed: int
    best_accuracy: float
    best_epoch: int
    final_accuracy: float
    curve: list[dict]
    train_loss: list[float]
    seconds: float
    indices: list[int] | None = None  # --random-real: the drawn training-set indices

    @classmethod
    def from_checks(
        cls, seed: int, checks: list[Check], losses: list[float], seconds: float, indices=None
    ) -> SeedResult:
        best = max(checks, key=lambda check: check.accuracy)  # the earliest of equal bests
        return cls(
            seed=seed, best_accuracy=best.accuracy, best_epoch=best.epoch,
            final_accuracy=checks[-1].accuracy, curve=[asdict(c) for c in checks],
            train_loss=losses, seconds=seconds, indices=indices,
        )  # fmt: skip


@dataclass
class EvalResult:
    """What ``delt eval`` reports; ``document`` is the eval.json content."""

    path: Path
    seeds: list[SeedResult]
    accuracy_mean: float
    accuracy_std: float
    final_mean: float
    final_std: float
    reused: bool
    document: dict = field(repr=False)

    @classmethod
    def read(cls, path: Path, seeds: list, reused: bool) -> EvalResult:
        """The result whose summary (best and final mean ± std) is the written file ``path``."""
        document = read_json(path)
        return cls(
            path=path,
            seeds=seeds,
            accuracy_mean=document["best"]["mean"],
            accuracy_std=document["best"]["std"],
            final_mean=document["final"]["mean"],
            final_std=document["final"]["std"],
            reused=reused,
            document=document,
        )


@dataclass
class EvalContext:
    """Everything a student training needs, resolved once from an :class:`EvalConfig`.

    Attributes:
        config: the command's config.
        device: resolved device.
        teacher: the teacher checkpoint (model in eval mode on ``device``, frozen).
        info: the dataset of the set and the teacher.
        images, labels: the distilled set (N, C, H, W) normalized float32 and (N,) int64 on
            ``device``; None with ``--random-real`` (drawn per seed from ``train_set``).
        train_set: the real training split (``--random-real`` only).
        test_set: the real test split.
        ipc: images per class of the set (rounded for uneven sets).
        student_arch, student_kwargs: the student architecture.
        settings: per-step settings with the resolved batch size.
        manifest: the distilled set's manifest (None for a bare --random-real folder).
    """

    config: EvalConfig
    device: torch.device
    teacher: Checkpoint
    info: DatasetInfo
    images: Tensor | None
    labels: Tensor | None
    train_set: ImageDataset | None
    test_set: ImageDataset
    ipc: int
    student_arch: str
    student_kwargs: dict
    settings: TrainSettings
    manifest: dict | None

    @classmethod
    def from_config(cls, config: EvalConfig) -> EvalContext:
        """Loads and checks the set, the teacher and the data (errors name the flag)."""
        device = resolve_device(config.device)
        folder = Path(config.distilled)
        has_set = (folder / "distilled.pt").is_file()
        images = labels = manifest = None
        if has_set:
            images, labels, manifest = load_distilled(folder)
        elif not config.random_real:
            load_distilled(folder)  # raises the "no distilled.pt" error
        teacher_path = config.teacher
        if teacher_path is None:
            if manifest is None:
                raise ConfigError(
                    f"--teacher is required: {folder} holds no manifest naming a teacher"
                )
            teacher_path = manifest["teacher"]["path"]
            if not Path(teacher_path).is_file():
                raise FileNotFoundError(
                    f"the teacher named by {folder / 'manifest.json'} ({teacher_path}) is gone; "
                    "pass --teacher PATH"
                )
        teacher = load_checkpoint(teacher_path)
        if manifest is not None:
            info = DatasetInfo.from_dict(manifest["dataset"])
            try:
                check_compatible(teacher.meta, info)
            except TeacherMismatchError as error:
                raise TeacherMismatchError(f"--teacher {teacher_path}: {error}") from None
            recorded = manifest.get("teacher", {}).get("sha256")
            if recorded is not None and recorded != sha256_file(teacher.path):
                logger.warning(
                    "eval: --teacher %s is not the teacher that synthesized %s (its SHA-256 "
                    "differs); its soft labels are used anyway", teacher_path, folder,
                )  # fmt: skip
        else:
            info = teacher.info
        data_root = config.data_root
        if data_root is None and manifest is not None:
            data_root = manifest.get("config", {}).get("data_root")
        test_set = load_like(info, "test", data_root)
        check_compatible(teacher.meta, test_set.info, what="teacher")

        train_set = None
        if config.random_real:
            ipc = config.ipc or (manifest or {}).get("ipc")
            if ipc is None:
                raise ConfigError(f"--random-real: pass --ipc ({folder} holds no distilled set)")
            train_set = load_like(info, "train", data_root)
            images = labels = None
            num_images = ipc * info.num_classes
        else:
            check_distilled_set(images, labels, info, folder)
            num_images = images.shape[0]
            ipc = max(1, round(num_images / info.num_classes))
            images, labels = images.to(device), labels.to(device)

        student_arch = config.student or teacher.meta["arch"]
        if config.student_width is not None:
            student_kwargs = {"width": config.student_width}
        elif student_arch == teacher.meta["arch"]:
            student_kwargs = dict(teacher.meta["arch_kwargs"])
        else:
            student_kwargs = {}
        build_model(student_arch, info, student_kwargs)  # fails now, not after the first seed
        batch_size = config.batch_size or default_batch_size(ipc, info.num_classes, num_images)
        settings = TrainSettings(
            batch_size=min(batch_size, num_images), temperature=config.temperature,
            cutmix_beta=config.cutmix_beta, hard_labels=config.hard_labels, amp=config.amp,
            channels_last=config.channels_last,
        )  # fmt: skip
        model = teacher.model.to(device).requires_grad_(False).eval()
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        teacher.model = model
        return cls(
            config, device, teacher, info, images, labels, train_set, test_set, ipc,
            student_arch, student_kwargs, settings, manifest,
        )  # fmt: skip

    def make_trainer(self, seed: int, total_epochs: int | None = None) -> StudentTrainer:
        """A fresh student (initialized from torch's global generator: call inside
        :func:`seeded`) with its optimizer over ``total_epochs`` (default ``--epochs``)."""
        config = self.config
        student = build_model(self.student_arch, self.info, self.student_kwargs)
        generator = torch.Generator().manual_seed(seed)
        augment = StudentAugment(
            self.info, config.randaugment_ops, config.randaugment_magnitude, config.min_crop,
            generator,
        )  # fmt: skip
        return StudentTrainer(
            student, None if self.settings.hard_labels else self.teacher.model, augment,
            self.settings, total_epochs or config.epochs, config.lr, config.weight_decay,
            self.device, generator,
        )  # fmt: skip

    def identity(self) -> dict:
        """What determines the results: config, resolved student and batch, input files."""
        config_identity = identity_dict(self.config)
        # Seeds are results, not identity: adding a seed reuses the finished ones.
        del config_identity["seeds"]
        if not self.config.stagewise:
            # Results files written before --stagewise existed stay valid.
            del config_identity["stagewise"], config_identity["stage_schedule"]
        config_identity.update(
            student=self.student_arch, student_kwargs=self.student_kwargs,
            batch_size=self.settings.batch_size, ipc=self.ipc,
        )  # fmt: skip
        distilled = Path(self.config.distilled) / "distilled.pt"
        return {
            "config": config_identity,
            "teacher_sha256": sha256_file(self.teacher.path),
            "distilled_sha256": None if self.config.random_real else sha256_file(distilled),
            "dataset": self.info.name,
        }

    def run_seed(self, seed: int) -> SeedResult:
        """Trains and tests one student (and, with --random-real, draws its set) for ``seed``."""
        config = self.config
        start = time.perf_counter()
        indices = None
        with seeded(seed):
            if config.random_real:
                images, labels, drawn = draw_random_real(self.train_set, self.ipc, seed)
                images, labels = images.to(self.device), labels.to(self.device)
                indices = drawn.tolist()
            else:
                images, labels = self.images, self.labels
            trainer = self.make_trainer(seed)
            bar = tqdm(
                total=config.epochs, desc=f"student seed {seed}", leave=False,
                disable=not config.progress,
            )  # fmt: skip
            losses, checks = trainer.train_epochs(
                images, labels, config.epochs, self.test_set, config.eval_every, bar
            )
            bar.close()
        return SeedResult.from_checks(seed, checks, losses, time.perf_counter() - start, indices)


def check_distilled_set(
    images: Tensor, labels: Tensor, info: DatasetInfo, folder: str | Path
) -> None:
    """Refuses a distilled set (of :func:`load_distilled`) that does not fit its dataset ``info``;
    ``delt eval`` and ``delt diversity`` check their ``--distilled`` set with it.

    Raises:
        ValueError: no images, not one label per image, or a label outside
            ``0 .. num_classes - 1``.
        TeacherMismatchError: images of another shape than the dataset's (C, H, W).
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(
            f"--distilled {folder}: the distilled set is empty (images of shape "
            f"{tuple(images.shape)}); nothing to evaluate"
        )
    expected = (info.channels, info.resolution, info.resolution)
    if tuple(images.shape[1:]) != expected:
        raise TeacherMismatchError(
            f"--distilled {folder}: images are {tuple(images.shape[1:])}, the dataset "
            f"{info.name} has {expected}"
        )
    if labels.shape != (images.shape[0],):
        raise ValueError(f"--distilled {folder}: one label per image expected")
    if int(labels.min()) < 0 or int(labels.max()) >= info.num_classes:
        raise ValueError(
            f"--distilled {folder}: labels must be in 0..{info.num_classes - 1}, got "
            f"{int(labels.min())}..{int(labels.max())}"
        )


def _document(
    context: EvalContext,
    identity: dict,
    seeds: list[SeedResult],
    complete: bool,
    other_seeds: Sequence[SeedResult] = (),
):
    """eval.json: ``seeds`` and the summaries over the requested seeds, ``other_seeds`` the
    finished ones of the same identity that were not requested (kept for a later run)."""
    config = context.config
    manifest = context.manifest or {}
    best = mean_std([s.best_accuracy for s in seeds]) if seeds else (None, None)
    final = mean_std([s.final_accuracy for s in seeds]) if seeds else (None, None)
    return {
        "format": EVAL_FORMAT,
        "complete": complete,
        "identity": identity,
        "distilled": str(config.distilled),
        "method": "random-real" if config.random_real else manifest.get("method"),
        "dataset": context.info.name,
        "ipc": context.ipc,
        "num_images": context.ipc * context.info.num_classes
        if config.random_real
        else int(context.images.shape[0]),
        "image_iterations": None if config.random_real else manifest.get("image_iterations"),
        "config": {
            **{k: v for k, v in asdict(config).items() if k != "progress"},
            "seeds": list(config.seeds),
            "device": str(context.device),
            "student": context.student_arch,
            "student_kwargs": context.student_kwargs,
            "batch_size": context.settings.batch_size,
            "randaugment": f"rand-m{config.randaugment_magnitude}-n{config.randaugment_ops}"
            if config.randaugment_ops
            else "none",
            "lr_schedule": "LambdaLR 0.5*(1+cos(pi*e/(2E))) per epoch",
            "optimizer": "AdamW betas (0.9, 0.999), weight decay on ndim>1 only",
            "loss": "CE on CutMix labels"
            if config.hard_labels
            else f"KL(teacher/T || student/T), T={config.temperature}, batchmean, no T^2",
        },
        "teacher": {
            "path": str(context.teacher.path),
            "sha256": identity["teacher_sha256"],
            "arch": context.teacher.meta["arch"],
            "arch_kwargs": context.teacher.meta["arch_kwargs"],
            "test_accuracy": context.teacher.meta.get("test_accuracy"),
        },
        "seeds": [asdict(s) for s in seeds],
        "other_seeds": [asdict(s) for s in other_seeds],
        "best": {"mean": best[0], "std": best[1]},
        "final": {"mean": final[0], "std": final[1]},
        "accuracy_mean": best[0],
        "accuracy_std": best[1],
        "wall_seconds": float(sum(s.seconds for s in seeds)),
        "versions": versions(),
    }


def evaluate(config: EvalConfig) -> EvalResult:
    """Runs ``delt eval``: one student per seed; writes and returns the results.

    Seeds already in a results file made with the same identity are reused (a complete file:
    no training at all); a file from another configuration is replaced. ``--stagewise`` runs
    :func:`delt.stagewise.evaluate_stagewise` instead.

    The file is a cache of every finished seed of its identity: ``seeds`` holds the requested
    ones (``--seeds``' order), over which ``best``/``final`` mean ± std are taken, and
    ``other_seeds`` the finished seeds this run did not ask for (by seed). So ``--seeds 0`` after
    ``--seeds 0,1`` reports seed 0 alone but keeps seed 1, and ``--seeds 0,1`` again trains
    nothing.
    """
    if config.stagewise:
        from delt.stagewise import evaluate_stagewise

        return evaluate_stagewise(config)
    context = EvalContext.from_config(config)
    identity = context.identity()
    path = config.results_path
    finished: dict[int, SeedResult] = {}
    saved_order: list[int] = []
    if path.is_file():
        saved = read_json(path)
        if saved.get("format") == EVAL_FORMAT and saved.get("identity") == identity:
            for entry in saved["seeds"] + saved.get("other_seeds", []):
                finished[int(entry["seed"])] = SeedResult(**entry)
            saved_order = [int(entry["seed"]) for entry in saved["seeds"]]
        else:
            logger.info("eval: %s comes from another configuration; evaluating again", path)
    reused = all(seed in finished for seed in config.seeds)
    logger.info(
        "eval: %s, %d images (IPC %d), student %s%s, %d epochs, batch %d, seeds %s%s",
        "random real" if config.random_real else config.distilled,
        context.ipc * context.info.num_classes if config.random_real else len(context.images),
        context.ipc, context.student_arch, context.student_kwargs or "", config.epochs,
        context.settings.batch_size, ",".join(map(str, config.seeds)),
        " (all cached)" if reused else "",
    )  # fmt: skip

    def document() -> dict:
        done = [finished[s] for s in config.seeds if s in finished]
        others = [finished[s] for s in sorted(finished) if s not in config.seeds]
        return _document(context, identity, done, len(done) == len(config.seeds), others)

    for seed in config.seeds:
        if seed in finished:
            continue
        result = context.run_seed(seed)
        logger.info(
            "eval: seed %d: best %.2f%% (epoch %d), final %.2f%%, %.0f s",
            seed, result.best_accuracy, result.best_epoch, result.final_accuracy, result.seconds,
        )  # fmt: skip
        finished[seed] = result
        # Saved after every seed (with the finished ones): a killed run resumes at the next one.
        write_json(path, document())
    if reused and saved_order != list(config.seeds):
        write_json(path, document())  # a subset or reordering: the summary is over --seeds
    return EvalResult.read(path, [finished[seed] for seed in config.seeds], reused)
