"""``delt select``: rank real training images with the teacher and pick IPC per class.

Score = the teacher's probability of the true class (delt.md §2.2) with the dataset's own
normalization. Strategies return a class's picks *in selection order* (EarlyLate optimizes the
first longest): ``medium`` (DELT: from the median outwards), ``top``, ``min``, ``random``.
Writes ``selection.json`` (per class the chosen indices, in order) and ``ranking.csv``.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from delt.config import ConfigError, check_int_fields, identity_dict, option
from delt.data import load_like
from delt.distributed import all_gather, is_main, world
from delt.io import atomic_open, read_json, sha256_file, write_json
from delt.models import check_compatible, load_checkpoint
from delt.runtime import autocast, logger, resolve_device, versions
from delt.student import iterate_batches

__all__ = ["SelectConfig", "Selection", "order_class", "score_images", "select_images"]

STRATEGIES = ("medium", "top", "min", "random")


@dataclass
class SelectConfig:
    """Configuration of ``delt select`` (one field per flag)."""

    teacher: str = option(help="teacher checkpoint (DIR/teacher.pt of `delt teacher`)")
    ipc: int = option(help="images per class to select")
    out: str = option(help="output folder (selection.json, ranking.csv)", identity=False)
    strategy: Literal["medium", "top", "min", "random"] = option(
        "medium", help="which images to pick and in which order"
    )
    data_root: str | None = option(
        None, help="folder of the teacher's dataset (default: the dataset's own)", identity=False
    )
    seed: int = option(0, help="seed of the random strategy")
    batch_size: int = option(500, help="scoring batch size", identity=False)
    amp: Literal["none", "bf16"] = option("none", help="autocast dtype for scoring")
    channels_last: bool = option(False, help="channels_last memory format (faster on CPU)")
    device: str = option("auto", help="auto, cpu, cuda, ...", identity=False)
    num_workers: int = option(0, help="DataLoader workers (file-backed datasets)", identity=False)
    progress: bool = option(True, help="show progress bars", identity=False)

    def __post_init__(self) -> None:
        check_int_fields(self, ("ipc", "batch_size"))
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"--strategy must be one of {STRATEGIES}, got {self.strategy!r}")


@dataclass
class Selection:
    """A selection as saved in ``selection.json``.

    Attributes:
        indices: ``indices[c]`` = training-set indices of class c's picks, in selection order.
        meta: the whole JSON document (config, dataset info, teacher path and metadata).
    """

    indices: list[list[int]]
    meta: dict

    @property
    def ipc(self) -> int:
        return len(self.indices[0])

    @classmethod
    def load(cls, folder: str | Path) -> Selection:
        path = Path(folder) / "selection.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"--selection {folder}: no selection.json (run `delt select --out {folder}` first)"
            )
        meta = read_json(path)
        return cls(indices=[list(map(int, c)) for c in meta["classes"]], meta=meta)


def order_class(
    scores: torch.Tensor, strategy: str, generator: torch.Generator | None = None
) -> list[int]:
    """The positions (into ``scores``) of one class's images, in selection order, all of them.

    Args:
        scores: (n,) float, the teacher's probability of the true class for each image.
        strategy: ``medium``, ``top``, ``min`` or ``random``.
        generator: for ``random``.

    Ties are broken by position, so the order is deterministic.
    """
    count = scores.numel()
    if strategy == "random":
        return torch.randperm(count, generator=generator).tolist()
    # Stable sorts: equal scores keep their dataset order.
    ascending = torch.sort(scores, stable=True).indices.tolist()
    if strategy == "min":
        return ascending
    if strategy == "top":
        return torch.sort(scores, descending=True, stable=True).indices.tolist()
    if strategy != "medium":
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    mid = math.ceil(count / 2)
    order: list[int] = []
    k = 0
    # DELT: index k is mid + trunc(s * (k + 1) / 2) with s = -1 for even k, +1 for odd k, i.e.
    # mid, mid+1, mid-1, mid+2, mid-2, ... Positions past either end are skipped (DELT never
    # reaches them because it picks far fewer than a class holds).
    while len(order) < count:
        offset = (k + 1) // 2
        position = mid - offset if k % 2 == 0 else mid + offset
        if 0 <= position < count:
            order.append(ascending[position])
        k += 1
    return order


@torch.no_grad()
def score_images(config: SelectConfig) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Scores every training image: ``(scores (N,) float32, labels (N,) int64, teacher meta)``."""
    device = resolve_device(config.device)
    teacher = load_checkpoint(config.teacher)
    # The teacher's dataset, in the teacher's class order; a mismatch of the files is refused.
    dataset = load_like(teacher.info, "train", config.data_root)
    check_compatible(teacher.meta, dataset.info)
    model = teacher.model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Under torchrun, batch b (the one-process batch b, so every score is computed in the same
    # batch as without torchrun) is scored by rank b % world size; the shards are gathered.
    job = world()
    count = len(dataset)
    starts = list(range(0, count, config.batch_size))[job.rank :: job.size]
    shard = torch.cat(
        [torch.arange(s, min(s + config.batch_size, count)) for s in starts]
        or [torch.empty(0, dtype=torch.int64)]
    )
    shard_scores = torch.empty(len(shard), dtype=torch.float32)
    position = 0
    batches = iterate_batches(
        dataset, config.batch_size, num_workers=config.num_workers, indices=shard
    )
    bar = tqdm(batches, total=len(starts), desc="scoring", disable=not config.progress)
    for images, labels in bar:
        images = images.to(device)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, config.amp):
            logits = model(images)
        probabilities = logits.float().softmax(1).cpu()
        shard_scores[position : position + len(labels)] = probabilities.gather(
            1, labels.view(-1, 1)
        ).view(-1)
        position += len(labels)
    scores = torch.empty(count, dtype=torch.float32)
    for positions, values in all_gather((shard, shard_scores)):
        scores[positions] = values
    return scores, dataset.targets.clone(), {"teacher": teacher, "info": dataset.info}


def select_images(config: SelectConfig) -> Selection:
    """Runs ``delt select``: scores, picks, and writes ``selection.json`` and ``ranking.csv``.

    A previous selection in ``--out`` made with the same configuration and the same teacher file
    is reused; any other is replaced.
    """
    out = Path(config.out)
    teacher_sha256 = sha256_file(config.teacher) if Path(config.teacher).is_file() else None
    if (out / "selection.json").is_file():
        previous = Selection.load(out)
        if (
            previous.meta.get("config") == identity_dict(config)
            and previous.meta.get("teacher_sha256") == teacher_sha256
        ):
            logger.info("select: reusing %s", out / "selection.json")
            return previous
    start = time.perf_counter()
    scores, labels, context = score_images(config)
    info = context["info"]
    teacher = context["teacher"]
    generator = torch.Generator().manual_seed(config.seed)
    chosen: list[list[int]] = []
    rank_within_class = torch.empty_like(labels)
    for c in range(info.num_classes):
        members = torch.nonzero(labels == c).view(-1)
        if members.numel() < config.ipc:
            raise ConfigError(
                f"--ipc {config.ipc}: class {c} ({info.class_names[c]!r}) has only "
                f"{members.numel()} training images"
            )
        order = order_class(scores[members], config.strategy, generator)
        chosen.append(members[order[: config.ipc]].tolist())
        descending = torch.sort(scores[members], descending=True, stable=True).indices
        rank_within_class[members[descending]] = torch.arange(members.numel())
    seconds = time.perf_counter() - start
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["index", "label", "score", "rank_in_class"])
    for index, (label, score, rank) in enumerate(
        zip(labels.tolist(), scores.tolist(), rank_within_class.tolist(), strict=True)
    ):
        writer.writerow([index, label, f"{score:.6g}", rank])
    document = {
        "config": identity_dict(config),
        "dataset": info.to_dict(),
        "data_root": config.data_root,
        "teacher": {"path": str(teacher.path), "meta": teacher.meta},
        "teacher_sha256": teacher_sha256,
        "strategy": config.strategy,
        "ipc": config.ipc,
        "seconds": seconds,
        "versions": versions(),
        "classes": chosen,
    }
    if not is_main():  # the other ranks of a torchrun job hold the same selection
        return Selection(indices=chosen, meta=document)
    with atomic_open(out / "ranking.csv", "w") as handle:
        handle.write(text.getvalue())
    write_json(out / "selection.json", document)
    logger.info(
        "select: %d x %d images (%s) in %.1f s -> %s",
        info.num_classes, config.ipc, config.strategy, seconds, out / "selection.json",
    )  # fmt: skip
    return Selection(indices=chosen, meta=document)
