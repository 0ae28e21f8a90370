"""Batches of an image dataset and a model's top-1 accuracy on it: how the student trainer,
``delt teacher`` and ``delt select`` read a dataset."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from delt.data import ImageDataset, TensorImageDataset
from delt.distributed import world
from delt.runtime import autocast

__all__ = ["evaluate_accuracy", "iterate_batches"]


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
