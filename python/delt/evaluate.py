"""A brief student training on a distilled set, with online teacher soft labels.

This is the small check that ``make demo`` prints. The full, documented evaluation protocol
(``delt eval``: CutMix, RandAugment, DELT's half-cosine AdamW schedule, several seeds, eval.json)
comes in its own issue and replaces :func:`train_student` here.

Per step: a batch of distilled images gets a per-image RandomResizedCrop(0.25-1) + flip
(``delt_ext.RandomResizedCropFlip``); the frozen teacher labels that augmented batch
(``softmax(teacher / T)``); the student minimizes ``KL(log_softmax(student / T) || target)``
with batchmean reduction (RDED/DELT, delt.md §5). AdamW, cosine LR to 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import delt_ext
from delt.data import DatasetInfo, ImageDataset
from delt.io import read_json, torch_load
from delt.models import build_model
from delt.runtime import autocast
from delt.teacher import evaluate_accuracy

__all__ = ["StudentConfig", "StudentResult", "load_distilled", "train_student"]


@dataclass
class StudentConfig:
    """Hyperparameters of the brief student training."""

    epochs: int = 300
    batch_size: int = 50
    lr: float = 1e-3
    weight_decay: float = 0.01
    temperature: float = 20.0
    min_crop: float = 0.25
    amp: str = "none"
    channels_last: bool = False
    seed: int = 0


@dataclass
class StudentResult:
    test_accuracy: float
    seconds: float
    steps: int


def load_distilled(folder: str | Path) -> tuple[Tensor, Tensor, dict]:
    """``(images (N, C, H, W) float32 normalized, labels (N,) int64, manifest)`` of a recovery."""
    folder = Path(folder)
    payload = torch_load(folder / "distilled.pt")
    return payload["images"], payload["labels"], read_json(folder / "manifest.json")


def train_student(
    images: Tensor,
    teacher: nn.Module,
    teacher_meta: dict,
    test_set: ImageDataset,
    config: StudentConfig,
    device: torch.device,
    progress: bool = True,
) -> StudentResult:
    """Trains a fresh student (the teacher's architecture) on ``images`` and tests it.

    Labels come from the teacher alone (soft labels on every augmented batch).

    Args:
        images: (N, C, H, W) float32, normalized like the teacher's data.
        teacher: frozen teacher in eval mode, on ``device``.
        teacher_meta: the teacher checkpoint's metadata (arch, arch_kwargs, dataset).
        test_set: the real test split.
    """
    info = DatasetInfo.from_dict(teacher_meta["dataset"])
    torch.manual_seed(config.seed)
    student = build_model(teacher_meta["arch"], info, teacher_meta["arch_kwargs"]).to(device)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    student = student.to(memory_format=memory_format)
    generator = torch.Generator().manual_seed(config.seed)
    augment = delt_ext.RandomResizedCropFlip(
        size=tuple(images.shape[-2:]),
        scale=(config.min_crop, 1.0),
        per_sample=True,
        generator=generator,
    )
    steps_per_epoch = -(-images.shape[0] // config.batch_size)
    steps = config.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    images = images.to(device)
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="student", disable=not progress, leave=False)
    for _ in range(config.epochs):
        order = torch.randperm(images.shape[0], generator=generator).to(device)
        for batch_start in range(0, images.shape[0], config.batch_size):
            batch = augment(
                images.index_select(0, order[batch_start : batch_start + config.batch_size])
            )
            batch = batch.contiguous(memory_format=memory_format)
            with torch.no_grad(), autocast(device, config.amp):
                target = (teacher(batch).float() / config.temperature).softmax(1)
            student.train()
            with autocast(device, config.amp):
                logits = student(batch).float()
            loss = nn.functional.kl_div(
                (logits / config.temperature).log_softmax(1), target, reduction="batchmean"
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update()
    bar.close()
    accuracy = evaluate_accuracy(
        student, test_set, device, amp=config.amp, channels_last=config.channels_last
    )
    return StudentResult(accuracy, time.perf_counter() - start, steps)
