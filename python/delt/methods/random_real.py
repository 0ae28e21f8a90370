"""The random-real baseline of ``delt distill --method random-real``: ``--ipc`` training images
per class drawn with ``--seed``, nothing optimized (every image has 0 iterations)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor

from delt.config import ConfigError
from delt.data import ImageDataset, load_like
from delt.distilled_set import Manifest, save_distilled
from delt.io import sha256_file
from delt.method import Method, register
from delt.models import check_compatible, load_checkpoint
from delt.runtime import versions

__all__ = ["RANDOM_REAL", "RandomReal", "draw_random_real"]


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


class RandomReal(Method):
    """Random real images: ``delt distill``'s baseline (not a method of ``delt recover``)."""

    name = "random-real"
    optimizes = False
    recovers = False

    def reads_training_set(self, config: object) -> bool:
        return True

    def draw_set(
        self, teacher_path: str, ipc: int, seed: int, data_root: str | None, folder: Path
    ) -> None:
        """Saves ``ipc`` random real images per class as a distilled set in ``folder``."""
        teacher = load_checkpoint(teacher_path)
        start = time.perf_counter()
        dataset = load_like(teacher.info, "train", data_root)
        check_compatible(teacher.meta, dataset.info, fingerprint=dataset.fingerprint())
        images, labels, indices = draw_random_real(dataset, ipc, seed)
        seconds = time.perf_counter() - start
        manifest = Manifest(
            method=self.name, ipc=ipc, dataset=teacher.info,
            teacher={"path": str(teacher.path), "sha256": sha256_file(teacher.path),
                     "meta": teacher.meta},
            config={"ipc": ipc, "seed": seed, "data_root": data_root},
            num_images=len(labels), iterations_per_image=[0] * len(labels),
            synthesis_seconds=seconds, seed=seed, versions=versions(), indices=indices.tolist(),
        )  # fmt: skip
        save_distilled(folder, images, labels, manifest)


RANDOM_REAL = register(RandomReal())
