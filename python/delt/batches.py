"""Batches of an image dataset and a model's top-1 accuracy on it: how the student trainer,
``delt teacher`` and ``delt select`` read a dataset."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.fx.experimental.optimization import fuse

from delt.data import ImageDataset, TensorImageDataset
from delt.distributed import world
from delt.runtime import autocast

__all__ = ["evaluate_accuracy", "inference_copy", "iterate_batches", "test_batch_size"]

logger = logging.getLogger(__name__)

# Test-pass batch per device type. On the CPU, 100 images keep a ConvNet's activations in cache
# (500 was 2.4x slower on the 2-core CPU, one thread; benchmarks/README.md, "Evaluation"); a
# GPU wants large batches.
TEST_BATCH_SIZE = {"cpu": 100}
DEFAULT_TEST_BATCH_SIZE = 500


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


def test_batch_size(device: torch.device) -> int:
    """Images per batch of a test pass on ``device`` (forward only)."""
    return TEST_BATCH_SIZE.get(device.type, DEFAULT_TEST_BATCH_SIZE)


def inference_copy(model: nn.Module, channels_last: bool) -> nn.Module:
    """A copy of ``model`` for forward passes in eval mode: each BatchNorm that follows a
    convolution (or linear layer) folded into it (torch.fx's ``fuse``), in ``channels_last``
    memory format if asked. ``model`` itself is not touched.

    Folding changes the logits only by float rounding; a model that torch.fx cannot trace
    (data-dependent control flow) is copied unfolded.
    """
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    was_training = model.training
    model.eval()
    try:
        folded = fuse(model)
    except Exception as error:  # noqa: BLE001 - any torchvision model may reach here
        logger.debug("test pass without BatchNorm folding: %s cannot be traced (%s)",
                     type(model).__name__, error)  # fmt: skip
        folded = copy.deepcopy(model)
    finally:
        model.train(was_training)
    folded.eval().requires_grad_(False)
    if channels_last:
        folded = folded.to(memory_format=torch.channels_last)
    return folded


def evaluate_accuracy(
    model: nn.Module,
    dataset: ImageDataset,
    device: torch.device,
    batch_size: int | None = None,
    amp: str = "none",
    channels_last: bool = False,
    num_workers: int = 0,
    sharded: bool = False,
) -> float:
    """Top-1 accuracy (in %) of ``model`` on ``dataset``; the model is left in eval mode.

    The pass runs a copy of the model with BatchNorm folded into the convolutions
    (:func:`inference_copy`), under ``inference_mode``, in batches of ``batch_size`` (default
    :func:`test_batch_size` of ``device``), channels_last on the CPU (faster there for every
    model measured) or where ``channels_last`` asks. The logits differ from the unfolded
    model's by float rounding only: a prediction can change only where two logits tie that
    closely.

    Under torchrun (``sharded``) each rank tests batches ``rank, rank + world, ...`` and the
    counts are summed over the ranks: every rank gets the whole set's accuracy.
    """
    model.eval()
    if batch_size is None:
        batch_size = test_batch_size(device)
    channels_last = channels_last or device.type == "cpu"
    with torch.no_grad():
        folded = inference_copy(model, channels_last)
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
    # The count stays on the device until the pass ends: no host synchronization per batch.
    correct = torch.zeros(1, dtype=torch.int64, device=device)
    with torch.inference_mode():
        for images, labels in batches:
            images = images.to(device, non_blocking=pin)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                logits = folded(images)
            correct += (logits.argmax(1) == labels.to(device, non_blocking=pin)).sum()
    if indices is not None:
        torch.distributed.all_reduce(correct)
    return 100.0 * int(correct) / len(dataset)
