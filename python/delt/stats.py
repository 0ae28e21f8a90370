"""``delt stats``: the teacher's per-class and global BN statistics over its training set, the
targets of per-class matching (``delt recover --match class``; docs/stats.md).

One pass over the training split with the teacher in eval mode records, for every BN layer (in
``model.named_modules()`` order, as :class:`delt_ext.BNStatMatching`), the per-channel mean and
biased variance of the layer's *input* in three conventions:

- ``pixel``: over all pixels of all images of the class (of the whole split for the global one);
- ``batch``: the average of per-batch statistics over batches of ``--batch-size`` images (WMDD,
  Liu et al., ICCV 2025, and G-VBSM, Shao et al., CVPR 2024: a class's images in dataset order
  cut into consecutive batches, the last one possibly smaller and weighted like the others; the
  global one over the split in dataset order);
- ``image``: the average of per-image statistics (EDC, Shao et al., NeurIPS 2024).

Every sum is float64: per image the channel sums of ``x`` and ``x²`` (``x²`` of a float32 is
exact in float64), added per class, per batch and per image in dataset order. The split is cut
into shards of ``--shard-size`` images; a shard's sums are a file of their own
(``OUT.parts/shard-<k>.pt``), the ranks of a torchrun job take the shards round-robin, and
rank 0 adds the shards' sums in shard order: the file is bitwise the same at any world size and
after any number of resumes. The shard size is part of the identity (another one adds in
another order).

The file (``torch.save`` of plain tensors and values, read with ``weights_only=True``) records
its format version, the teacher's SHA-256, the data's name and fingerprint, and a SHA-256 of
its own contents that :func:`load_statistics` checks.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from delt.batches import iterate_batches
from delt.config import ConfigError, check_int_fields, option
from delt.data import load_like
from delt.distributed import barrier, is_main, torchrun_environment, world
from delt.identity import check_or_reuse, identity_defaults, run_identity
from delt.io import FileFormatError, check_output, sha256_file, torch_load, torch_save
from delt.lock import output_lock
from delt.models import (
    Checkpoint,
    TeacherMismatchError,
    check_compatible,
    data_fingerprint,
    load_checkpoint,
)
from delt.runtime import logger, resolve_device
from delt_ext import image_channel_sums

__all__ = [
    "CONVENTIONS",
    "STATS_FORMAT",
    "STATS_VERSION",
    "BNStatistics",
    "StatsConfig",
    "collect_statistics",
    "load_statistics",
    "parts_folder",
]

STATS_FORMAT = "delt-bn-statistics"
# Version 2: the per-image sums come from delt_ext.image_channel_sums (a fixed summation order
# of its own, on every device); version 1 summed a float64 copy of x with torch. Both hold the
# same entries and read alike; shards of a version 1 run are computed again on resume.
STATS_VERSION = 2
_READ_VERSIONS = (1, 2)
CONVENTIONS = ("pixel", "batch", "image")
Convention = Literal["pixel", "batch", "image"]
_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)
# The sums of a shard, per layer (float64): per class (K, C) of x, x² and per-image variances;
# per (class, class batch) (K * Bk, C) and per global batch (NB, C) of x and x².
_SUMS = ("class_sum", "class_sq", "class_image_var", "cbatch_sum", "cbatch_sq")
_SUMS += ("gbatch_sum", "gbatch_sq")


@dataclass(kw_only=True)
class StatsConfig:
    """Configuration of ``delt stats`` (one field per flag)."""

    teacher: str = option(
        help="teacher checkpoint (DIR/teacher.pt of `delt teacher`)", identity=False
    )
    out: str = option(
        help="statistics file to write (e.g. stats.pt); the shards of an unfinished run sit in "
        "OUT.parts/ (re-running resumes)",
        identity=False,
    )
    data_root: str | None = option(
        None, help="folder of the teacher's dataset (default: the dataset's own)", identity=False
    )
    batch_size: int = option(
        100, help="images per teacher forward, and per batch of the 'batch' convention (WMDD: 100)"
    )
    shard_size: int = option(
        10000,
        help="images per shard (a multiple of --batch-size): the unit of resume and of "
        "the torchrun ranks' split",
    )
    channels_last: bool = option(False, help="channels_last memory format")
    device: str = option("auto", help="auto, cpu, cuda, cuda:1, ...", identity=False)
    keep_parts: bool = option(
        False, help="keep OUT.parts/ (the shards' sums) after the file is written", identity=False
    )
    progress: bool = option(True, help="show progress bars", identity=False)

    def __post_init__(self) -> None:
        check_int_fields(self, ("batch_size", "shard_size"))
        if self.shard_size % self.batch_size:
            raise ConfigError(
                f"--shard-size {self.shard_size} must be a multiple of --batch-size "
                f"{self.batch_size} (a shard is whole forward batches)"
            )


def parts_folder(out: str | Path) -> Path:
    """Where the shards of the statistics file ``out`` are kept until it is written."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


# --------------------------------------------------------------------------------------------
# The file


@dataclass
class BNStatistics:
    """A statistics file of ``delt stats``, loaded and checked.

    ``layers[name][convention]`` holds ``class_mean``, ``class_var`` (K, C) and ``mean``,
    ``var`` (C,), float64 (C: the layer's channels, K: the classes).
    """

    path: Path
    teacher_sha256: str
    data: dict[str, Any]
    num_classes: int
    batch_size: int
    class_images: Tensor  # (K,) int64
    layer_names: list[str]
    layers: dict[str, dict[str, dict[str, Tensor]]]

    def class_targets(
        self, convention: Convention, group_classes: Tensor | None = None
    ) -> list[tuple[Tensor, Tensor]]:
        """Per-group targets of every layer, ``(mean (G, C), var (G, C))`` in layer order, as
        :class:`delt_ext.BNStatMatching` takes them: group g gets the statistics of class
        ``group_classes[g]`` (default: the classes themselves, G = K). Any assignment of images
        to groups works, e.g. groups of (chunk, class) pairs with ``group_classes`` repeating
        the classes once per chunk."""
        targets = []
        for name in self.layer_names:
            entry = self.layers[name][convention]
            mean, var = entry["class_mean"], entry["class_var"]
            if group_classes is not None:
                index = group_classes.to(torch.int64).cpu()
                mean, var = mean.index_select(0, index), var.index_select(0, index)
            targets.append((mean, var))
        return targets

    def check_teacher(self, teacher: Checkpoint, teacher_sha256: str, flag: str) -> None:
        """Refuses statistics of another teacher (by SHA-256) or of a model with other BN
        layers, naming the file.

        Raises:
            TeacherMismatchError: one line naming ``flag`` and the file.
        """
        if self.teacher_sha256 != teacher_sha256:
            raise TeacherMismatchError(
                f"{flag} {self.path}: statistics of another teacher (SHA-256 "
                f"{self.teacher_sha256[:16]}..., --teacher {teacher.path} has "
                f"{teacher_sha256[:16]}...); run `delt stats --teacher {teacher.path}`"
            )
        fingerprint = data_fingerprint(teacher.meta)
        if fingerprint is not None and self.data.get("fingerprint") not in (None, fingerprint):
            raise TeacherMismatchError(
                f"{flag} {self.path}: statistics of other data than the teacher's"
            )
        layers = [
            (name, int(m.num_features))
            for name, m in teacher.model.named_modules()
            if isinstance(m, _BN_TYPES)
        ]
        mine = [
            (name, int(self.layers[name]["pixel"]["mean"].shape[0])) for name in self.layer_names
        ]
        if layers != mine:
            raise TeacherMismatchError(
                f"{flag} {self.path}: its BN layers {mine} are not the teacher's {layers}"
            )


def _digest(payload: dict[str, Any]) -> str:
    """SHA-256 of a statistics payload without its ``digest``: the metadata as JSON, then every
    tensor's name, dtype, shape and bytes, in a fixed order."""
    digest = hashlib.sha256()
    meta = {k: v for k, v in payload.items() if k not in ("digest", "layers", "class_images")}
    digest.update(json.dumps(meta, sort_keys=True).encode())
    tensors = [("class_images", payload["class_images"])]
    for name in payload["layer_names"]:
        for convention in CONVENTIONS:
            for key in ("class_mean", "class_var", "mean", "var"):
                tensors.append(
                    (f"{name}/{convention}/{key}", payload["layers"][name][convention][key])
                )
    for name, tensor in tensors:
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_statistics(path: str | Path, flag: str = "--stats") -> BNStatistics:
    """Loads and checks a statistics file of ``delt stats``.

    Raises:
        FileNotFoundError: no such file.
        FileFormatError: not a statistics file, another format version, or its contents do not
            match their recorded SHA-256 (a damaged file); one line naming ``flag`` and the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file (make it with `delt stats`)")
    payload = torch_load(path, "statistics file of `delt stats`", keys=("format", "digest"))
    if payload.get("format") != STATS_FORMAT:
        raise FileFormatError(f"{flag} {path}: not a statistics file of `delt stats`")
    if payload.get("version") not in _READ_VERSIONS:
        raise FileFormatError(
            f"{flag} {path}: statistics format version {payload.get('version')!r}; this delt "
            f"reads versions {', '.join(map(str, _READ_VERSIONS))} (run `delt stats` again)"
        )
    try:
        digest = _digest(payload)
    except (KeyError, TypeError, AttributeError, RuntimeError):
        raise FileFormatError(
            f"{flag} {path}: a damaged statistics file (entries missing)"
        ) from None
    if digest != payload["digest"]:
        raise FileFormatError(
            f"{flag} {path}: a damaged statistics file (its contents do not match their SHA-256)"
        )
    return BNStatistics(
        path=path, teacher_sha256=payload["teacher_sha256"], data=payload["data"],
        num_classes=payload["num_classes"], batch_size=payload["batch_size"],
        class_images=payload["class_images"], layer_names=list(payload["layer_names"]),
        layers=payload["layers"],
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Collection


class _Collector:
    """Forward pre-hooks on every BN layer adding the float64 sums of its input to a shard's
    accumulators (:data:`_SUMS`)."""

    def __init__(self, model: nn.Module, num_classes: int, class_batches: int, batches: int):
        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _BN_TYPES)]
        if not self.layers:
            raise ConfigError("--teacher: the model has no BatchNorm layer: nothing to collect")
        self.shape = (num_classes, class_batches, batches)
        self.handles = [
            m.register_forward_pre_hook(self._hook(i)) for i, (_, m) in enumerate(self.layers)
        ]
        self.pixels = [0] * len(self.layers)
        self.sums: list[dict[str, Tensor]] = []
        self.labels: Tensor | None = None
        self.class_batch: Tensor | None = None  # (N,) flat (class, class batch) index
        self.global_batch: Tensor | None = None  # (N,) global batch index

    def reset(self) -> None:
        classes, class_batches, batches = self.shape
        self.buffers: list[dict[str, Tensor]] = []
        self.sums = []
        for _, module in self.layers:
            channels = module.num_features
            # One buffer per index (class, class batch, global batch), one index_add_ each; the
            # sums are views of them (every element still adds its images in dataset order).
            buffers = {
                "class": (classes, 3 * channels),
                "cbatch": (classes * class_batches, 2 * channels),
                "gbatch": (batches, 2 * channels),
            }
            buffers = {k: torch.zeros(s, dtype=torch.float64) for k, s in buffers.items()}
            self.buffers.append(buffers)
            views = {
                "class_sum": ("class", 0), "class_sq": ("class", 1),
                "class_image_var": ("class", 2), "cbatch_sum": ("cbatch", 0),
                "cbatch_sq": ("cbatch", 1), "gbatch_sum": ("gbatch", 0), "gbatch_sq": ("gbatch", 1),
            }  # fmt: skip
            self.sums.append(
                {k: buffers[b][:, j * channels : (j + 1) * channels] for k, (b, j) in views.items()}
            )

    def _hook(self, index: int):
        def record(module: nn.Module, args) -> None:
            x = args[0].detach()
            pixels = x[0, 0].numel()
            self.pixels[index] = pixels
            # Per image and channel: the sums of x and x² over the pixels, in float64, from one
            # read of x in its own dtype (no float64 copy).
            image_sum, image_sq = image_channel_sums(x)
            if image_sum.device.type != "cpu":
                image_sum, image_sq = image_sum.cpu(), image_sq.cpu()
            mean = image_sum / pixels
            image_var = image_sq / pixels - mean * mean
            buffers = self.buffers[index]
            both = torch.cat([image_sum, image_sq], 1)  # (N, 2C)
            buffers["class"].index_add_(0, self.labels, torch.cat([both, image_var], 1))
            buffers["cbatch"].index_add_(0, self.class_batch, both)
            buffers["gbatch"].index_add_(0, self.global_batch, both)

        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _statistics(
    sums: list[dict[str, Tensor]],
    names: list[str],
    pixels: list[int],
    class_images: Tensor,
    class_batch_images: Tensor,
    batch_images: Tensor,
) -> dict[str, dict[str, dict[str, Tensor]]]:
    """Means and biased variances of the merged sums, per layer and convention."""
    layers = {}
    classes = class_images.to(torch.float64)[:, None]
    for name, layer, hw in zip(names, sums, pixels, strict=True):
        count = classes * hw
        class_mean = layer["class_sum"] / count
        class_var = layer["class_sq"] / count - class_mean * class_mean
        total = classes.sum() * hw
        mean = layer["class_sum"].sum(0) / total
        var = layer["class_sq"].sum(0) / total - mean * mean
        pixel = {"class_mean": class_mean, "class_var": class_var, "mean": mean, "var": var}
        # image: the mean of per-image means is the pixel mean (equal pixel counts).
        image = {
            "class_mean": class_mean, "class_var": layer["class_image_var"] / classes,
            "mean": mean, "var": layer["class_image_var"].sum(0) / classes.sum(),
        }  # fmt: skip
        # batch: per (class, batch) statistics, averaged over each class's batches.
        k = class_images.shape[0]
        per = class_batch_images.to(torch.float64).reshape(k, -1)
        present = per > 0
        n = (per * hw).clamp(min=1)[..., None]
        c_sum = layer["cbatch_sum"].reshape(k, per.shape[1], -1)
        c_sq = layer["cbatch_sq"].reshape(k, per.shape[1], -1)
        b_mean = c_sum / n
        b_var = c_sq / n - b_mean * b_mean
        weight = present.to(torch.float64)[..., None]
        batches = present.sum(1).to(torch.float64).clamp(min=1)[:, None]
        g = (batch_images.to(torch.float64) * hw)[:, None]
        g_mean = layer["gbatch_sum"] / g
        g_var = layer["gbatch_sq"] / g - g_mean * g_mean
        batch = {
            "class_mean": (b_mean * weight).sum(1) / batches,
            "class_var": (b_var * weight).sum(1) / batches,
            "mean": g_mean.mean(0),
            "var": g_var.mean(0),
        }
        layers[name] = {"pixel": pixel, "batch": batch, "image": image}
    return layers


def collect_statistics(config: StatsConfig) -> BNStatistics:
    """Runs (or resumes, or finds finished) ``delt stats``; returns the loaded file.

    Raises:
        ConfigError: ``--out`` or its parts hold statistics of another teacher, data or flags.
        TeacherMismatchError: the training split found is not the teacher's.
    """
    out = Path(config.out)
    parts = parts_folder(out)
    teacher = load_checkpoint(config.teacher)
    teacher_sha256 = sha256_file(teacher.path)
    dataset = load_like(teacher.info, "train", config.data_root)
    fingerprint = dataset.fingerprint()
    check_compatible(teacher.meta, dataset.info, fingerprint=fingerprint)
    data = {"name": teacher.info.name, "fingerprint": fingerprint}
    identity = run_identity(config, teacher_sha256=teacher_sha256, data=data)
    if out.is_file():
        done = load_statistics(out, "--out")
        mine = (teacher_sha256, data, config.batch_size)
        if (done.teacher_sha256, done.data, done.batch_size) != mine:
            raise ConfigError(
                f"--out {out} holds statistics of another teacher, data or --batch-size; "
                "choose another --out or delete it"
            )
        logger.info("stats: %s is finished; nothing to do", out)
        return done
    check_output(out.parent, "--out")
    # Under torchrun the command line holds OUT's folder for the whole job (delt.cli).
    lock = output_lock(parts, what="--out") if torchrun_environment() is None else nullcontext()
    with lock:
        check_or_reuse(
            parts / "identity.json", identity, identity_defaults(config),
            refuse=f"--out {out}: {parts} holds an unfinished run of another teacher, data or "
            "flags ({differences}); re-run with the same ones to resume, or delete it",
        )  # fmt: skip
        result = _collect(config, teacher, dataset, identity, teacher_sha256, data, parts, out)
        barrier()
    if is_main() and not config.keep_parts:
        shutil.rmtree(parts, ignore_errors=True)
    return result


def _collect(config, teacher, dataset, identity, teacher_sha256, data, parts, out):
    info = teacher.info
    labels = dataset.targets.to(torch.int64)
    count, classes, size = len(labels), info.num_classes, config.batch_size
    # Each image's position among its class's images (dataset order): its class batch.
    rank = torch.zeros(count, dtype=torch.int64)
    class_images = torch.bincount(labels, minlength=classes)
    for c in range(classes):
        where = (labels == c).nonzero().flatten()
        rank[where] = torch.arange(where.numel())
    class_batches = max(1, math.ceil(int(class_images.max()) / size))
    class_batch = labels * class_batches + rank // size
    global_batch = torch.arange(count) // size
    batches = math.ceil(count / size)
    shards = math.ceil(count / config.shard_size)
    device = resolve_device(config.device)
    model = teacher.model.to(device).eval()
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    collector = _Collector(model, classes, class_batches, batches)
    me = world()
    mine = [k for k in range(shards) if k % me.size == me.rank]
    todo = [k for k in mine if not _shard_done(parts, k, identity)]
    logger.info(
        "stats: %d images, %d shards of %d (%d of them this rank's, %d to do), device %s -> %s",
        count, shards, config.shard_size, len(mine), len(todo), device, out,
    )  # fmt: skip
    bar = tqdm(total=len(todo), desc="stats shards", disable=not config.progress)
    try:
        with torch.inference_mode():
            for k in todo:
                start, stop = k * config.shard_size, min((k + 1) * config.shard_size, count)
                collector.reset()
                index = torch.arange(start, stop)
                for offset, (images, targets) in zip(
                    range(start, stop, size),
                    iterate_batches(dataset, size, indices=index),
                    strict=True,
                ):
                    batch = slice(offset, offset + targets.shape[0])
                    collector.labels = targets
                    collector.class_batch, collector.global_batch = (
                        class_batch[batch],
                        global_batch[batch],
                    )
                    images = images.to(device)
                    if config.channels_last:
                        images = images.contiguous(memory_format=torch.channels_last)
                    model(images)
                torch_save(
                    {
                        "version": STATS_VERSION,
                        "identity": identity,
                        "pixels": collector.pixels,
                        "sums": collector.sums,
                    },
                    parts / f"shard-{k:05d}.pt",
                )
                bar.update()
    finally:
        bar.close()
        collector.remove()
    barrier()
    names = [name for name, _ in collector.layers]
    if not is_main():
        return None
    total: list[dict[str, Tensor]] | None = None
    pixels: list[int] = []
    for k in range(shards):  # in shard order: the same bits at any world size
        shard = torch_load(parts / f"shard-{k:05d}.pt", "shard of `delt stats`")
        pixels = shard["pixels"]
        if total is None:
            total = shard["sums"]
            continue
        for layer, add in zip(total, shard["sums"], strict=True):
            for key in _SUMS:
                layer[key] += add[key]
    assert total is not None
    class_batch_images = torch.bincount(class_batch, minlength=classes * class_batches)
    batch_images = torch.bincount(global_batch, minlength=batches)
    payload: dict[str, Any] = {
        "format": STATS_FORMAT, "version": STATS_VERSION, "teacher_sha256": teacher_sha256,
        "data": data, "num_classes": classes, "images": count, "batch_size": size,
        "shard_size": config.shard_size, "layer_names": names, "pixels": pixels,
        "class_images": class_images,
        "layers": _statistics(total, names, pixels, class_images, class_batch_images, batch_images),
    }  # fmt: skip
    payload["digest"] = _digest(payload)
    torch_save(payload, out)
    logger.info("stats: %d BN layers, %d classes, %d images -> %s", len(names), classes, count, out)
    return load_statistics(out, "--out")


def _shard_done(parts: Path, k: int, identity: dict) -> bool:
    """Whether shard ``k``'s sums are saved, by a run of ``identity``."""
    path = parts / f"shard-{k:05d}.pt"
    if not path.is_file():
        return False
    try:
        shard = torch_load(path, "shard of `delt stats`")
    except FileFormatError:
        return False
    # A shard of another version (summed in another order) is computed again.
    return (
        isinstance(shard, dict)
        and shard.get("version") == STATS_VERSION
        and shard.get("identity") == identity
    )
