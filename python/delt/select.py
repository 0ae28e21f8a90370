"""``delt select``: rank real training images with the teacher and pick IPC per class.

Score = the teacher's probability of the true class (DELT's ``data_selection.py``,
github.com/VILA-Lab/DELT) with the dataset's own normalization. Strategies return a class's
picks *in selection order* (EarlyLate optimizes the first longest): ``medium`` (DELT: from the
median outwards), ``top``, ``min``, ``random``.
Writes ``selection.json`` (per class the chosen indices, in order) and ``ranking.csv``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from delt.batches import iterate_batches
from delt.config import ConfigError, check_int_fields, identity_dict, option
from delt.data import DatasetInfo, ImageDataset, TensorImageDataset, load_like
from delt.distributed import all_gather, is_main, world
from delt.io import (
    FileFormatError,
    IntegrityError,
    atomic_open,
    check_output,
    read_json,
    sha256_file,
    torch_load,
    torch_save,
    write_json,
)
from delt.lock import output_lock
from delt.models import check_compatible, check_model_memory, load_checkpoint
from delt.runtime import autocast, logger, resolve_device, versions

__all__ = [
    "SelectConfig",
    "Selection",
    "content_digest",
    "order_class",
    "score_images",
    "select_images",
]

STRATEGIES = ("medium", "top", "min", "random")


@dataclass
class SelectConfig:
    """Configuration of ``delt select`` (one field per flag)."""

    # The teacher's contents are part of the identity (teacher_sha256), not its path: a copied or
    # moved run folder is reused as it is.
    teacher: str = option(
        help="teacher checkpoint (DIR/teacher.pt of `delt teacher`)", identity=False
    )
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
    amp: Literal["none", "bf16", "fp16"] = option("none", help="autocast dtype for scoring")
    channels_last: bool = option(False, help="channels_last memory format (faster on CPU)")
    device: str = option("auto", help="auto, cpu, cuda, ...", identity=False)
    num_workers: int = option(0, help="DataLoader workers (file-backed datasets)", identity=False)
    progress: bool = option(True, help="show progress bars", identity=False)
    shard_batches: int = option(
        100,
        help="scores are saved to OUT/scores/ every this many batches, so that a killed "
        "selection resumes at its last shard",
        identity=False,
    )

    def __post_init__(self) -> None:
        check_int_fields(self, ("ipc", "batch_size", "shard_batches"))
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
        return min(len(picks) for picks in self.indices)

    @classmethod
    def load(cls, folder: str | Path) -> Selection:
        """Reads ``folder/selection.json``; checks its ``content_sha256`` where it has one (a
        selection written before the digest has none: loaded unchecked).

        Raises:
            FileNotFoundError: there is none.
            FileFormatError: not a selection (indices that are not lists of integers included).
            IntegrityError: its content is not the one its digest records (edited, corrupt).
        """
        path = Path(folder) / "selection.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"--selection {folder}: no selection.json (run `delt select --out {folder}` first)"
            )
        meta = read_json(path, "selection (selection.json of `delt select`)")
        try:
            indices = [list(c) for c in meta["classes"]]
            if not indices:
                raise ValueError("no classes")
            for picks in indices:
                for index in picks:
                    if isinstance(index, bool) or not isinstance(index, int):
                        raise TypeError(f"index {index!r} is not an integer")
            DatasetInfo.from_dict(meta["dataset"])
        except (KeyError, TypeError, ValueError) as error:
            raise FileFormatError(
                f"{path}: not a selection of `delt select` ({type(error).__name__}: {error})"
            ) from None
        recorded = meta.get("content_sha256")
        if recorded is not None and recorded != content_digest(meta):
            raise IntegrityError(
                f"{path}: its content differs from the one its content_sha256 recorded when "
                "it was written; the file is corrupt or was edited (run `delt select` again)"
            )
        return cls(indices=indices, meta=meta)

    def check_indices(self, targets: torch.Tensor, num_classes: int, where: str | Path) -> None:
        """Refuses indices that do not point at an image of their class in the training split
        whose labels are ``targets`` (N,) int64: one class list per class, each index in
        ``0 .. N - 1`` (no Python from-the-end ``-1``) and labelled with its list's class.
        Cheap: call it before any work.

        Raises:
            FileFormatError: naming ``where`` (the selection.json), the class and the index.
        """
        count = int(targets.shape[0])
        if len(self.indices) != num_classes:
            raise FileFormatError(
                f"{where}: holds {len(self.indices)} class lists, the training split has "
                f"{num_classes} classes"
            )
        for label, picks in enumerate(self.indices):
            for index in picks:
                if not 0 <= index < count:
                    raise FileFormatError(
                        f"{where}: class {label} lists index {index}, outside the training "
                        f"split's 0..{count - 1}"
                    )
                if int(targets[index]) != label:
                    raise FileFormatError(
                        f"{where}: class {label} lists index {index}, an image of class "
                        f"{int(targets[index])}"
                    )


def content_digest(document: dict) -> str:
    """The ``content_sha256`` of a selection document: the SHA-256 of its canonical JSON
    (sorted keys, no spaces) without that key. It covers the indices and the training split's
    fingerprint (``dataset.fingerprint``), i.e. what the indices point into."""
    body = {key: value for key, value in document.items() if key != "content_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


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


SHARD_FORMAT = "delt-select-scores-v1"


@torch.no_grad()
def score_images(config: SelectConfig) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Scores every training image: ``(scores (N,) float32, labels (N,) int64, teacher meta)``.

    Batches of ``--batch-size`` (read through ``--num-workers`` DataLoader workers into pinned
    memory for a GPU); every ``--shard-batches`` batches the scores so far go to
    ``OUT/scores/<first index>.pt`` (atomic), and shards of the same identity (teacher file,
    data, batch size, amp, memory format) are read back instead of scored again. Shards start at
    batch boundaries, so a resumed run scores the very batches of an uninterrupted one.
    """
    device = resolve_device(config.device)
    teacher = load_checkpoint(config.teacher)
    # The teacher's dataset, in the teacher's class order; a mismatch of the files is refused.
    dataset = load_like(teacher.info, "train", config.data_root)
    check_compatible(teacher.meta, dataset.info, fingerprint=dataset.fingerprint())
    check_model_memory(
        teacher.meta["arch"], teacher.info, teacher.meta["arch_kwargs"],
        min(config.batch_size, len(dataset)), device, False, f"--batch-size {config.batch_size}",
    )  # fmt: skip
    model = teacher.model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Under torchrun, shard k of the one-process shards is scored by rank k % world size (each
    # score computed in the very batch it has in one process) and the shards are gathered.
    job = world()
    count = len(dataset)
    scores = torch.empty(count, dtype=torch.float32)
    shard_size = config.batch_size * config.shard_batches
    shard_dir = Path(config.out) / "scores"
    identity = {
        "teacher_sha256": sha256_file(teacher.path),
        "dataset": dataset.info.name,
        "num_images": count,
        "batch_size": config.batch_size,
        "amp": config.amp,
        "channels_last": config.channels_last,
    }
    pin = device.type == "cuda"
    mine = sum(
        -(-(min(start + shard_size, count) - start) // config.batch_size)
        for number, start in enumerate(range(0, count, shard_size))
        if number % job.size == job.rank
    )
    bar = tqdm(total=mine, desc="scoring", disable=None if config.progress else True)
    done = []
    for number, start in enumerate(range(0, count, shard_size)):
        if number % job.size != job.rank:
            continue
        end = min(start + shard_size, count)
        done.append(torch.arange(start, end))
        path = shard_dir / f"{start:09d}.pt"
        if path.is_file():
            saved = torch_load(path)
            if saved.get("format") == SHARD_FORMAT and saved.get("identity") == identity:
                scores[start:end] = saved["scores"]
                bar.update(-(-(end - start) // config.batch_size))
                continue
        part = dataset if (start, end) == (0, count) else _shard(dataset, start, end)
        position = start
        for images, labels in iterate_batches(
            part, config.batch_size, num_workers=config.num_workers, pin_memory=pin
        ):
            images = images.to(device, non_blocking=pin)
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, config.amp):
                logits = model(images)
            probabilities = logits.float().softmax(1).cpu()
            scores[position : position + len(labels)] = probabilities.gather(
                1, labels.view(-1, 1)
            ).view(-1)
            position += len(labels)
            bar.update()
        if end < count or start > 0 or job.size > 1:  # one shard, one process: no resume state
            torch_save(
                {"format": SHARD_FORMAT, "identity": identity, "scores": scores[start:end].clone()},
                path,
            )
    bar.close()
    if job.size > 1:
        positions = torch.cat(done or [torch.empty(0, dtype=torch.int64)])
        for gathered, values in all_gather((positions, scores[positions])):
            scores[gathered] = values
    context = {"teacher": teacher, "info": dataset.info, "dataset": dataset}
    return scores, dataset.targets.clone(), context


def _shard(dataset: ImageDataset, start: int, end: int) -> ImageDataset:
    """Images ``start .. end - 1`` of ``dataset``; an in-memory one stays one (a view)."""
    if isinstance(dataset, TensorImageDataset):
        return TensorImageDataset(
            dataset.info, dataset.pixels[start:end], dataset.targets[start:end]
        )
    return _Range(dataset, start, end)


class _Range(ImageDataset):
    """Images ``start .. end - 1`` of a file-backed dataset (a shard)."""

    def __init__(self, dataset: ImageDataset, start: int, end: int) -> None:
        self.dataset, self.start = dataset, start
        self.info = dataset.info
        self.targets = dataset.targets[start:end]

    def __getitem__(self, index: int):
        return self.dataset[self.start + index]

    def images(self, indices):
        return self.dataset.images(torch.as_tensor(indices, dtype=torch.int64) + self.start)


def select_images(config: SelectConfig) -> Selection:
    """Runs ``delt select``: scores, picks, and writes ``selection.json`` and ``ranking.csv``.

    A previous selection in ``--out`` made with the same configuration and the same teacher file
    (by content: a copied folder is reused) is reused, writing nothing; any other is replaced.
    Holds ``OUT/.lock`` throughout.
    """
    with output_lock(config.out) as lock:
        lock.sweep()
        return _select_images(config)


def _same_config(saved: dict | None, current: dict) -> bool:
    # Selections written while the teacher's path was part of the config: the path is ignored.
    return isinstance(saved, dict) and {k: v for k, v in saved.items() if k != "teacher"} == current


def _select_images(config: SelectConfig) -> Selection:
    out = Path(config.out)
    check_output(out, "--out", probe=False)
    teacher_sha256 = sha256_file(config.teacher) if Path(config.teacher).is_file() else None
    if (out / "selection.json").is_file():
        previous = Selection.load(out)
        if (
            _same_config(previous.meta.get("config"), identity_dict(config))
            and previous.meta.get("teacher_sha256") == teacher_sha256
        ):
            logger.info("select: reusing %s", out / "selection.json")
            return previous
    check_output(out, "--out")
    start = time.perf_counter()
    scores, labels, context = score_images(config)
    info = context["dataset"].info
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
        "dataset": {**info.to_dict(), "fingerprint": context["dataset"].fingerprint()},
        "data_root": config.data_root,
        "teacher": {"path": str(teacher.path), "meta": teacher.meta},
        "teacher_sha256": teacher_sha256,
        "strategy": config.strategy,
        "ipc": config.ipc,
        "seconds": seconds,
        "versions": versions(),
        "classes": chosen,
    }
    document["content_sha256"] = content_digest(document)
    if not is_main():  # the other ranks of a torchrun job hold the same selection
        return Selection(indices=chosen, meta=document)
    with atomic_open(out / "ranking.csv", "w") as handle:
        handle.write(text.getvalue())
    write_json(out / "selection.json", document)
    if (out / "scores").is_dir():
        shutil.rmtree(out / "scores")  # the resume state of scoring; ranking.csv has the scores
    logger.info(
        "select: %d x %d images (%s) in %.1f s -> %s",
        info.num_classes, config.ipc, config.strategy, seconds, out / "selection.json",
    )  # fmt: skip
    return Selection(indices=chosen, meta=document)
