"""``delt teacher``: train a teacher on real data and save it with its metadata.

SGD (Nesterov 0.9) with a one-cycle LR, label smoothing 0.1, optional flip / crop-flip. A
finished teacher is cached (another configuration, or other training data than ``--data-root``
holds, into the same ``--out`` is refused).
``--save-epochs`` also saves ``OUT/checkpoints/epoch-<e>.pt`` after those epochs (PDD's stage
teachers), without changing the final teacher.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from delt.batches import evaluate_accuracy, iterate_batches
from delt.config import ConfigError, check_int_fields, config_diff, identity_dict, option
from delt.data import ImageDataset, load_dataset
from delt.io import check_output
from delt.lock import output_lock
from delt.models import (
    build_model,
    check_model_memory,
    data_fingerprint,
    load_weights,
    model_spec,
    read_sidecar,
    read_weights,
    save_checkpoint,
)
from delt.runtime import autocast, logger, resolve_device, versions

__all__ = ["TeacherConfig", "TeacherResult", "import_teacher", "saved_checkpoints", "train_teacher"]


@dataclass
class TeacherConfig:
    """Configuration of ``delt teacher`` (one field per flag)."""

    out: str = option(
        help="output folder; the teacher goes to OUT/teacher.pt (+ .json)", identity=False
    )
    dataset: str = option("fashion-mnist", help="dataset name (see delt.data.DATASETS)")
    data_root: str | None = option(
        None, help="dataset folder (default: the dataset's own)", identity=False
    )
    resolution: int | None = option(None, help="image size, imagefolder/synthetic only")
    class_order: str | None = option(
        None, help="imagefolder: file of class folder names in label order (a subset is allowed)"
    )
    arch: str = option("convnet3", help="architecture (delt.models.MODELS or a torchvision name)")
    width: int | None = option(None, help="convnetD width (default 128)")
    epochs: int = option(3, help="training epochs")
    batch_size: int = option(256, help="batch size")
    lr: float = option(0.2, help="peak learning rate of the one-cycle schedule (SGD)")
    momentum: float = option(0.9, help="SGD Nesterov momentum")
    weight_decay: float = option(5e-4, help="weight decay")
    lr_schedule: Literal["one-cycle", "step"] = option(
        "one-cycle",
        help="one-cycle (a quarter warm-up to --lr, then down), or step: --lr divided by 10 "
        "every --lr-step-epochs epochs (torch's StepLR; DD-Ranking's full-data recipe)",
    )
    lr_step_epochs: int = option(100, help="--lr-schedule step: epochs between the LR's steps")
    nesterov: bool = option(True, help="Nesterov momentum (--no-nesterov: plain momentum)")
    decay_all: bool = option(
        False, help="weight decay on every parameter (default: not on BatchNorm and biases)"
    )
    label_smoothing: float = option(0.1, help="label smoothing of the cross-entropy")
    augment: Literal["none", "flip", "crop-flip"] = option(
        "none", help="per-sample augmentation: horizontal flip, and a random 4-pixel translation"
    )
    amp: Literal["none", "bf16"] = option("bf16", help="autocast dtype for forward passes")
    channels_last: bool = option(True, help="channels_last memory format (faster convs on CPU)")
    seed: int = option(0, help="random seed (init, shuffling, augmentation)")
    # Not part of the identity: the checkpoints do not change the final teacher. A cached
    # teacher that lacks a requested checkpoint is refused in train_teacher instead.
    save_epochs: tuple[int, ...] | None = option(
        None,
        help="also save the model after these epochs, e.g. 1,2,3,4,5 (PDD's stage teachers: "
        "OUT/checkpoints/epoch-<e>.pt)",
        identity=False,
    )
    device: str = option("auto", help="auto, cpu, cuda, cuda:1, ...", identity=False)
    num_workers: int = option(0, help="DataLoader workers (file-backed datasets)", identity=False)
    progress: bool = option(True, help="show progress bars", identity=False)
    import_arch: str | None = option(
        None,
        help="import pretrained weights (--weights) for this architecture (a torchvision name "
        "such as resnet18, or a registered arch) instead of training; --arch is not used",
        cli_flag="--import",
    )
    weights: str | None = option(
        None,
        help="--import: a state-dict file (.pth/.pt: plain, or under 'state_dict'/'model'; "
        "'module.' prefixes stripped) or a torchvision weights name (IMAGENET1K_V1, DEFAULT) "
        "read from the local torch hub cache ($TORCH_HOME/hub/checkpoints), never downloaded",
    )
    measure: bool = option(
        False, help="--import: measure the imported teacher's top-1 on the dataset's test split"
    )

    def __post_init__(self) -> None:
        check_int_fields(self, ("epochs", "batch_size", "width", "lr_step_epochs"))
        if self.import_arch is not None:
            if self.weights is None:
                raise ConfigError("--import needs --weights FILE or a torchvision weights name")
            try:
                imported = model_spec(self.import_arch)
            except ValueError as error:
                raise ConfigError(str(error).replace("--arch", "--import", 1)) from None
            if self.save_epochs is not None:
                raise ConfigError("--save-epochs applies to training, not to --import")
            if self.width is not None and "width" not in imported.kwargs:
                raise ConfigError(
                    f"--width applies to convnetD architectures, not --import {self.import_arch}"
                )
        elif self.weights is not None or self.measure:
            raise ConfigError(
                f"{'--weights' if self.weights is not None else '--measure'} applies with "
                "--import ARCH"
            )
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        spec = model_spec(self.arch)  # raises for an unknown --arch
        if self.width is not None and "width" not in spec.kwargs and self.import_arch is None:
            raise ConfigError(f"--width applies to convnetD architectures, not --arch {self.arch}")
        if self.save_epochs is not None:
            self.save_epochs = tuple(self.save_epochs)
            shown = ",".join(map(str, self.save_epochs))
            if not self.save_epochs or list(self.save_epochs) != sorted(set(self.save_epochs)):
                raise ConfigError(
                    f"--save-epochs must be strictly increasing (early phase first), got {shown}"
                )
            if not 1 <= self.save_epochs[0] <= self.save_epochs[-1] <= self.epochs:
                raise ConfigError(
                    f"--save-epochs must lie in [1, --epochs {self.epochs}], got {shown}"
                )

    @property
    def arch_kwargs(self) -> dict:
        return {} if self.width is None else {"width": self.width}


@dataclass
class TeacherResult:
    """What ``train_teacher`` produced: the checkpoint path, its test accuracy and training time."""

    path: Path
    test_accuracy: float | None  # None: imported without --measure
    train_seconds: float
    reused: bool
    source: str | None = None  # imported: where the weights came from


def _augment(images: Tensor, kind: str, generator: torch.Generator) -> Tensor:
    """Per-sample flip (p = 0.5) and, for ``crop-flip``, a random translation of up to 4 pixels
    with zero padding (CIFAR's pad-4 random crop), vectorized over the batch (B, C, H, W)."""
    if kind == "none":
        return images
    batch, channels, height, width = images.shape
    flip = torch.rand(batch, generator=generator) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
    if kind == "crop-flip":
        pad = 4
        padded = nn.functional.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (batch, 1), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (batch, 1), generator=generator)
        rows = (torch.arange(height).view(1, -1) + dy).view(batch, 1, height, 1)
        cols = (torch.arange(width).view(1, -1) + dx).view(batch, 1, 1, width)
        images = padded[
            torch.arange(batch).view(-1, 1, 1, 1),
            torch.arange(channels).view(1, -1, 1, 1),
            rows,
            cols,
        ]
    return images


def checkpoint_path(out: Path, epoch: int) -> Path:
    """Where ``--save-epochs`` puts the model after ``epoch``: ``OUT/checkpoints/epoch-<e>.pt``."""
    return out / "checkpoints" / f"epoch-{epoch:03d}.pt"


def saved_checkpoints(teacher_path: str | Path) -> list[dict]:
    """The checkpoints ``--save-epochs`` saved beside a teacher, early phase first.

    Returns:
        ``[{"epoch": e, "path": Path, "test_accuracy": a}, ...]`` as listed in ``teacher.json``
        (empty for a teacher trained without ``--save-epochs``).
    """
    teacher_path = Path(teacher_path)
    entries = (read_sidecar(teacher_path) or {}).get("checkpoints") or []
    return [
        {**entry, "path": teacher_path.parent / entry["file"]}
        for entry in sorted(entries, key=lambda entry: entry["epoch"])
    ]


def _save_epoch_checkpoint(
    out: Path, model: nn.Module, meta: dict, epoch: int, accuracy: float
) -> dict:
    # A CPU copy in the default memory format, as the final teacher is saved; the training model
    # stays where it is.
    snapshot = copy.deepcopy(model).to("cpu").to(memory_format=torch.contiguous_format)
    path = checkpoint_path(out, epoch)
    save_checkpoint(path, snapshot, {**meta, "epoch": epoch, "test_accuracy": accuracy})
    return {"epoch": epoch, "file": str(path.relative_to(out)), "test_accuracy": accuracy}


def _load_split(config: TeacherConfig, split: str) -> ImageDataset:
    return load_dataset(
        config.dataset, split, config.data_root, config.resolution, config.class_order
    )


def _test_accuracy(
    model: nn.Module, test_set: ImageDataset, device, config: TeacherConfig
) -> float:
    return evaluate_accuracy(
        model, test_set, device, amp=config.amp, channels_last=config.channels_last,
        num_workers=config.num_workers,
    )  # fmt: skip


def _saved_meta(path: Path) -> dict | None:
    """The metadata of the teacher saved at ``path`` (its sidecar), if it records a config."""
    meta = read_sidecar(path) if path.is_file() else None
    return meta if meta is not None and meta.get("config") is not None else None


# Flags added after teachers were first cached: at these values they are left out of a
# teacher's identity, so a teacher trained before they existed is reused as it was.
_LATER_DEFAULTS = {"lr_schedule": "one-cycle", "nesterov": True, "decay_all": False}


def teacher_identity(config: TeacherConfig) -> dict:
    """The fields that determine a teacher (:func:`delt.config.identity_dict`), less the later
    flags at their defaults (and ``--lr-step-epochs`` unless ``--lr-schedule step``)."""
    identity = identity_dict(config)
    for name, default in _LATER_DEFAULTS.items():
        if identity.get(name) == default:
            del identity[name]
    if config.lr_schedule != "step":
        del identity["lr_step_epochs"]
    return identity


def _check_training_data(config: TeacherConfig, path: Path, meta: dict) -> None:
    """Refuses to reuse a teacher trained on other data than ``--data-root`` holds now
    (``--data-root`` is not part of the identity: the data is, by its recorded fingerprint)."""
    recorded = data_fingerprint(meta)
    if recorded is None:
        return  # a teacher of before fingerprints: its data cannot be compared
    train_set = _load_split(config, "train")
    current = train_set.fingerprint()
    if current != recorded:
        raise ConfigError(
            f"{path} holds a teacher trained on other {config.dataset} data than --data-root "
            f"{config.data_root or '(the default)'} holds (training split fingerprint "
            f"{recorded[:19]} there, {current[:19]} here); choose another --out or delete it"
        )


def train_teacher(config: TeacherConfig) -> TeacherResult:
    """Trains (or reuses) the teacher of ``config``; writes ``OUT/teacher.pt`` and ``.json``.

    Holds ``OUT/.lock`` throughout (:func:`delt.lock.output_lock`). With ``--import ARCH``
    nothing is trained: :func:`import_teacher`.
    """
    with output_lock(config.out) as lock:
        lock.sweep()
        if config.import_arch is not None:
            return import_teacher(config)
        return _train_teacher(config)


def _train_teacher(config: TeacherConfig) -> TeacherResult:
    out = Path(config.out)
    check_output(out, "--out", probe=False)
    path = out / "teacher.pt"
    identity = teacher_identity(config)
    meta = _saved_meta(path)
    if meta is not None:
        differences = config_diff(meta["config"], identity)
        if differences:
            raise ConfigError(
                f"{path} holds a teacher trained with another configuration "
                f"({'; '.join(differences)}); choose another --out or delete it"
            )
        _check_training_data(config, path, meta)
        have = {entry["epoch"] for entry in saved_checkpoints(path) if entry["path"].is_file()}
        missing = [epoch for epoch in config.save_epochs or () if epoch not in have]
        if missing:
            raise ConfigError(
                f"--save-epochs {','.join(map(str, config.save_epochs))}: {path} was trained "
                f"without checkpoints at epochs {missing} (it has {sorted(have) or 'none'}); "
                "train into another --out or delete it"
            )
        logger.info("teacher: reusing %s (test accuracy %.2f%%)", path, meta["test_accuracy"])
        return TeacherResult(path, meta["test_accuracy"], meta["train_seconds"], reused=True)

    check_output(out, "--out")  # before training: a result that cannot be saved is lost
    device = resolve_device(config.device)
    train_set = _load_split(config, "train")
    test_set = _load_split(config, "test")
    info = train_set.info
    sizes = f"--batch-size {config.batch_size}"
    if config.resolution is not None:
        sizes += f", --resolution {config.resolution}"
    check_model_memory(
        config.arch, info, config.arch_kwargs, min(config.batch_size, len(train_set)), device,
        True, sizes,
    )  # fmt: skip
    torch.manual_seed(config.seed)
    model = build_model(config.arch, info, config.arch_kwargs).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    steps_per_epoch = -(-len(train_set) // config.batch_size)
    # No weight decay on BN and biases (the usual practice; they have no scale to regularize),
    # unless --decay-all (DD-Ranking's SGD decays every parameter).
    decay = [p for p in model.parameters() if p.dim() > 1 or config.decay_all]
    no_decay = [p for p in model.parameters() if p.dim() <= 1 and not config.decay_all]
    optimizer = torch.optim.SGD(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
    )
    total_steps = config.epochs * steps_per_epoch
    if config.lr_schedule == "step":
        # torch's StepLR stepped once per epoch (gamma 0.1), here stepped per batch.
        step_steps = config.lr_step_epochs * steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.1 ** (step // step_steps)
        )
    else:
        # A quarter of the steps warm up. torch's OneCycleLR divides by pct_start * total - 1,
        # which is zero at exactly 4 steps: there the warm-up ends a fraction of a step later
        # (no other run's schedule changes).
        pct_start = 0.25 if total_steps != 4 else 0.3
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=pct_start
        )
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    generator = torch.Generator().manual_seed(config.seed)
    logger.info(
        "teacher: training %s%s on %s (%d images) for %d epochs on %s",
        config.arch, config.arch_kwargs or "", info.name, len(train_set), config.epochs, device,
    )  # fmt: skip
    # The metadata every checkpoint of this run shares (the final one adds its accuracy and time).
    base_meta = {
        "arch": config.arch,
        "arch_kwargs": config.arch_kwargs,
        # The training split's fingerprint: data of the same name and shape but other contents
        # is refused later (models.check_compatible).
        "dataset": {**info.to_dict(), "fingerprint": train_set.fingerprint()},
        "config": identity,
        "versions": versions(),
    }
    save_epochs = set(config.save_epochs or ())
    checkpoints: list[dict] = []
    eval_seconds = 0.0
    start = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        bar = tqdm(
            iterate_batches(train_set, config.batch_size, True, generator, config.num_workers),
            total=steps_per_epoch,
            desc=f"teacher epoch {epoch + 1}/{config.epochs}",
            disable=None if config.progress else True,
            leave=False,
        )
        for images, labels in bar:
            images = _augment(images, config.augment, generator).to(device)
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, config.amp):
                loss = criterion(model(images), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if epoch + 1 in save_epochs:
            # Evaluation runs in eval mode and draws no random numbers: training goes on as if
            # nothing happened. Its time is not training time.
            eval_start = time.perf_counter()
            accuracy = _test_accuracy(model, test_set, device, config)
            checkpoints.append(_save_epoch_checkpoint(out, model, base_meta, epoch + 1, accuracy))
            logger.info("teacher: epoch %d checkpoint, test accuracy %.2f%%", epoch + 1, accuracy)
            eval_seconds += time.perf_counter() - eval_start
    train_seconds = time.perf_counter() - start - eval_seconds
    accuracy = _test_accuracy(model, test_set, device, config)
    logger.info("teacher: test accuracy %.2f%% after %.0f s of training", accuracy, train_seconds)
    meta = {
        **base_meta,
        "test_accuracy": accuracy,
        "epochs": config.epochs,
        "train_seconds": train_seconds,
    }
    if checkpoints:
        meta["checkpoints"] = checkpoints
    save_checkpoint(path, model.to("cpu").to(memory_format=torch.contiguous_format), meta)
    return TeacherResult(path, accuracy, train_seconds, reused=False)


def import_teacher(config: TeacherConfig) -> TeacherResult:
    """``delt teacher --import ARCH --weights W``: a delt checkpoint from pretrained weights.

    Normalization, resolution and class order come from ``--dataset`` (for an ImageNet
    ``imagefolder``: torchvision's mean/std, 224 px, sorted WNIDs, which torchvision's weights
    assume); the weights must classify the dataset's classes. The metadata records the
    weights' source, path and SHA-256; ``--measure`` adds the top-1 on the test split.

    Raises:
        WriteError: ``--out`` cannot be written.
        ValueError: the weights do not fit (missing/unexpected keys).
        FileNotFoundError: ``--weights`` is neither a file nor a cached torchvision weights.
        TeacherMismatchError: the weights' class count differs from the dataset's.
        ConfigError: ``--out`` holds a teacher of another configuration.
    """
    out = Path(config.out)
    check_output(out, "--out")
    path = out / "teacher.pt"
    identity = teacher_identity(config)
    arch = config.import_arch
    # Read first: a missing file is an error before the dataset is scanned.
    weights = read_weights(arch, config.weights)
    meta = _saved_meta(path)
    if meta is not None:
        differences = config_diff(meta["config"], identity)
        recorded = (meta.get("weights") or {}).get("sha256")
        if recorded != weights.sha256:
            differences.append(f"weights SHA-256: {recorded} -> {weights.sha256}")
        if differences:
            raise ConfigError(
                f"{path} holds a teacher made with another configuration "
                f"({'; '.join(differences)}); choose another --out or delete it"
            )
        logger.info("teacher: reusing %s (imported from %s)", path, meta["weights"]["source"])
        return TeacherResult(
            path, meta["test_accuracy"], meta["train_seconds"], True, meta["weights"]["source"]
        )
    test_set = _load_split(config, "test")
    info = test_set.info
    model = build_model(arch, info, config.arch_kwargs)
    load_weights(model, weights, info, f"--weights {config.weights}")
    model.eval()
    accuracy = None
    if config.measure:
        device = resolve_device(config.device)
        model = model.to(device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        accuracy = _test_accuracy(model, test_set, device, config)
        logger.info("teacher: imported %s, test accuracy %.2f%%", arch, accuracy)
        model = model.to("cpu").to(memory_format=torch.contiguous_format)
    meta = {
        "arch": arch,
        "arch_kwargs": config.arch_kwargs,
        "dataset": info.to_dict(),
        "config": identity,
        "versions": versions(),
        "test_accuracy": accuracy,
        "epochs": 0,
        "train_seconds": 0.0,
        "weights": {"source": weights.source, "path": str(weights.path), "sha256": weights.sha256},
    }
    save_checkpoint(path, model, meta)
    return TeacherResult(path, accuracy, 0.0, reused=False, source=weights.source)
