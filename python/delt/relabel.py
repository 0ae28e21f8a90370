"""``delt relabel``: a teacher's soft labels on every batch a ``delt eval`` student would see,
stored once (:mod:`delt.soft_labels`), so that ``delt eval --labels STORE`` trains without the
teacher (docs/relabel.md).

The batches are those of ``delt eval`` for the seed: the per-batch-seeded draws
(:func:`delt.student_trainer.draw_epoch`, :class:`delt.student_trainer.AugmentedBatches`), keyed
by epoch and batch, never by a sampler's state. Resumable by epoch; under torchrun each rank
labels a contiguous range of the epochs still to do and writes them in place, into the same file
whatever the world size.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from delt.config import ConfigError, check_int_fields, option
from delt.distributed import all_gather, barrier, broadcast, is_main, world
from delt.evaluate import EvalConfig, EvalContext
from delt.io import read_json, write_json
from delt.lock import results_lock
from delt.runtime import autocast, logger, versions
from delt.soft_labels import (
    StoreLayout,
    check_disk,
    compress_logits,
    data_offset,
    encode_header,
    epoch_block,
    header_capacity,
    human_bytes,
    protocol_differences,
    protocol_of,
    read_header,
    store_header,
    store_size,
)
from delt.student_augment import StudentAugment, apply_cutmix
from delt.student_trainer import PROTOCOL, AugmentedBatches, draw_epoch
from delt.teachers import teacher_inputs

__all__ = ["RelabelConfig", "RelabelResult", "relabel"]

PROGRESS_FORMAT = "delt-labels-progress-v1"


@dataclass
class RelabelConfig:
    """Configuration of ``delt relabel`` (one field per flag; the protocol flags are
    ``delt eval``'s, with its defaults)."""

    distilled: str = option(help="folder of a distilled set (as for delt eval)", identity=False)
    seed: int = option(0, help="the student seed whose batches are labelled")
    epochs: int = option(300, help="epochs of batches to label (delt eval --epochs)")
    top_k: int | None = option(
        None,
        help="keep the K largest logits per row (default: all); the rest are set back "
        "as FKD's marginal smoothing at --temperature (docs/relabel.md)",
    )
    dtype: Literal["fp32", "fp16", "bf16"] = option(
        "fp32", help="stored logit type (fp32: delt eval --labels gives the online numbers)"
    )
    bn_mode: Literal["eval", "train"] = option(
        "eval",
        help="teacher BatchNorm: running statistics (eval, delt eval's) or each batch's "
        "own statistics (train, CV-DD's batch-statistics labels)",
    )
    teachers: tuple[str, ...] = option(
        (),
        help="more teachers beside --teacher: the ensemble's logits, averaged after equalizing "
        "their norms as G-VBSM (docs/teachers.md)",
        identity=False,
    )
    teacher: str | None = option(
        None, help="teacher checkpoint (default: the one the set's manifest names)", identity=False
    )
    data_root: str | None = option(None, help="folder of the real dataset", identity=False)
    batch_size: int | None = option(None, help="as delt eval --batch-size (default: DELT's)")
    temperature: float = option(
        PROTOCOL.temperature, help="--top-k: the eval temperature the top-k labels are for"
    )
    cutmix_beta: float = option(PROTOCOL.cutmix_beta, help="as delt eval --cutmix-beta")
    randaugment_ops: int = option(PROTOCOL.randaugment_ops, help="as delt eval")
    randaugment_magnitude: int = option(PROTOCOL.randaugment_magnitude, help="as delt eval")
    min_crop: float = option(PROTOCOL.min_crop, help="as delt eval --min-crop")
    shuffle_patches: int | None = option(None, help="as delt eval --shuffle-patches")
    amp: Literal["none", "bf16", "fp16"] = option(
        "none", help="autocast of the teacher's forward (as delt eval --amp)"
    )
    channels_last: bool = option(False, help="channels_last teacher (as delt eval)")
    out: str | None = option(
        None, help="the store file (default: DISTILLED/labels-seed-S.labels)", identity=False
    )
    device: str = option("auto", help="auto, cpu, cuda, ...", identity=False)
    progress: bool = option(True, help="show progress bars", identity=False)

    def __post_init__(self) -> None:
        check_int_fields(self, ("epochs", "top_k"))
        check_int_fields(self, ("seed",), low=0)
        self.teachers = tuple(self.teachers)

    @property
    def out_path(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        return Path(self.distilled) / f"labels-seed-{self.seed}.labels"

    def eval_config(self) -> EvalConfig:
        """The ``delt eval`` config whose batches this store labels."""
        return EvalConfig(
            distilled=self.distilled, teacher=self.teacher, teachers=self.teachers,
            data_root=self.data_root, epochs=self.epochs, seeds=(self.seed,),
            batch_size=self.batch_size,
            temperature=self.temperature, cutmix_beta=self.cutmix_beta,
            randaugment_ops=self.randaugment_ops,
            randaugment_magnitude=self.randaugment_magnitude, min_crop=self.min_crop,
            shuffle_patches=self.shuffle_patches, amp=self.amp,
            channels_last=self.channels_last, device=self.device, progress=False, workers=0,
        )  # fmt: skip


@dataclass
class RelabelResult:
    path: Path
    size: int
    epochs_labelled: int
    reused: bool


def _partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _progress(out: Path) -> Path:
    return out.with_name(out.name + ".progress.json")


def _plan_key(header: dict) -> str:
    """What a partial store must have been made for to be resumed: the header sans digests."""
    body = {
        k: v for k, v in header.items() if k not in ("epoch_sha256", "versions", "header_sha256")
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _done_epochs(partial: Path, progress_path: Path, plan: str) -> dict[int, str]:
    """The epochs (and their blocks' SHA-256) a killed run of the same plan left in ``partial``."""
    if not partial.is_file():
        return {}
    progress = read_json(progress_path) if progress_path.is_file() else {}
    if progress.get("format") != PROGRESS_FORMAT or progress.get("plan") != plan:
        logger.info("relabel: %s comes from another run; it starts afresh", partial)
        return {}
    return {int(k): v for k, v in progress["epochs"].items()}


def _teacher_mode(model: nn.Module, bn_mode: str) -> nn.Module:
    model.eval()
    if bn_mode == "train":
        # Each batch normalized by its own statistics (running statistics are updated, unused).
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train()
    return model


def _label_epoch(context: EvalContext, draws, config: RelabelConfig, layout: StoreLayout):
    """Epoch ``draws``' block: the teacher's logits on each batch, as ``delt eval`` makes it."""
    settings = context.settings
    augment = StudentAugment(
        context.info, config.randaugment_ops, config.randaugment_magnitude, config.min_crop,
        torch.Generator().manual_seed(config.seed), config.shuffle_patches,
    )  # fmt: skip
    images = context.images
    batches = AugmentedBatches(images, draws.order, settings.batch_size, augment, draws.epoch_seed)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    teacher = context.teacher.model
    outputs = []
    for position in range(len(batches)):
        batch = batches[position].to(context.device)
        cutmix = draws.cutmix[position]
        if cutmix is not None:
            batch = apply_cutmix(batch, cutmix)
        batch = batch.contiguous(memory_format=memory_format)
        with torch.no_grad(), autocast(context.device, config.amp):
            outputs.append(teacher(batch).float().cpu())
    logits = torch.cat(outputs)
    arrays = compress_logits(logits, config.top_k, config.dtype, config.temperature)
    arrays["order"] = draws.order.to(torch.int32)
    return epoch_block(layout, arrays)


def relabel(config: RelabelConfig) -> RelabelResult:
    """Runs ``delt relabel``: makes (or finishes) the store at ``config.out_path``."""
    out = config.out_path
    with results_lock(out):
        return _relabel(config, out)


def _relabel(config: RelabelConfig, out: Path) -> RelabelResult:
    context = EvalContext.from_config(config.eval_config(), whole_batches=True)
    if context.settings.hard_labels:  # pragma: no cover (eval_config never sets it)
        raise ConfigError("hard labels need no store")
    num_classes = context.info.num_classes
    if config.top_k is not None and config.top_k >= num_classes:
        raise ConfigError(
            f"--top-k {config.top_k} keeps every one of the {num_classes} classes; leave it out"
        )
    protocol = protocol_of(context, config.seed)
    if config.top_k is not None:
        protocol["temperature"] = config.temperature
    rows = int(context.images.shape[0])
    layout = StoreLayout.plan(config.epochs, rows, num_classes, config.top_k, config.dtype)
    teacher = {
        "path": str(context.teacher.path), "arch": context.teacher.meta["arch"],
        "amp": config.amp, "bn_mode": config.bn_mode, "channels_last": config.channels_last,
    }  # fmt: skip
    if context.ensemble:  # the ensemble's other teachers, by content
        teacher["teachers"] = teacher_inputs(config.teachers)["teachers_sha256"]
    # The versions without the CPU thread count: a store's bytes do not depend on how many
    # threads (or torchrun ranks, one thread each) made it (tests/test_relabel.py).
    software = {k: v for k, v in versions().items() if k != "torch_threads"}
    header = store_header(
        protocol, layout, teacher, software, config.temperature if config.top_k else None
    )
    size = store_size(header)
    plan = _plan_key(header)
    if out.exists():
        existing, _ = read_header(out, "--out")
        if _plan_key(existing) == plan and all(existing.get("epoch_sha256", [])):
            logger.info("relabel: %s already holds these labels", out)
            return RelabelResult(out, out.stat().st_size, 0, True)
        differences = protocol_differences(existing.get("protocol", {}), protocol)
        differences += protocol_differences(existing.get("storage", {}), header["storage"])
        differences += protocol_differences(existing.get("teacher", {}), teacher)
        raise ConfigError(
            f"--out {out} holds another store ({'; '.join(differences) or 'other settings'}); "
            "remove it or choose another --out"
        )
    partial, progress_path = _partial(out), _progress(out)
    # Rank 0 decides what is done (the others could see its fresh files half made).
    done = broadcast(_done_epochs(partial, progress_path, plan) if is_main() else None)
    if done:
        logger.info("relabel: %s resumes with %d of %d epochs done", out, len(done), config.epochs)
    logger.info(
        "relabel: the store takes %s (%d epochs x %d rows x %s %s logits%s)", human_bytes(size),
        config.epochs, rows, "all" if config.top_k is None else f"top-{config.top_k} of",
        num_classes, f", {config.dtype}",
    )  # fmt: skip
    have = partial.stat().st_size if done else 0
    check_disk(out, size, have)
    capacity = header_capacity(header)
    if is_main() and not done:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as file:
            file.write(encode_header(header, capacity))
            file.truncate(size)
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(file.fileno(), 0, size)  # the disk space, reserved now
        write_json(progress_path, {"format": PROGRESS_FORMAT, "plan": plan, "epochs": {}})
    barrier()

    job = world()
    todo = [epoch for epoch in range(config.epochs) if epoch not in done]
    base, extra = divmod(len(todo), job.size)
    start = job.rank * base + min(job.rank, extra)
    mine = todo[start : start + base + (1 if job.rank < extra else 0)]
    rounds = math.ceil(len(todo) / job.size) if todo else 0
    offset = data_offset(capacity)
    generator = torch.Generator().manual_seed(config.seed)
    output_size = (context.info.resolution, context.info.resolution)
    replayed = 0  # epochs whose draws the generator has made
    _teacher_mode(context.teacher.model, config.bn_mode)
    disable = None if config.progress else True  # None: a bar on a terminal only
    bar = tqdm(total=len(todo), desc="relabel", leave=False, disable=disable)
    for round_index in range(rounds):
        finished = None
        if round_index < len(mine):
            epoch = mine[round_index]
            while True:
                draws = draw_epoch(
                    generator, rows, context.settings.batch_size, config.cutmix_beta, output_size
                )
                replayed += 1
                if replayed == epoch + 1:
                    break
            block = _label_epoch(context, draws, config, layout)
            _write_epoch(partial, offset + epoch * layout.epoch_bytes, block)
            finished = (epoch, hashlib.sha256(block).hexdigest())
        for item in all_gather(finished):
            if item is not None:
                done[item[0]] = item[1]
        if is_main():
            epochs = {str(k): v for k, v in sorted(done.items())}
            write_json(progress_path, {"format": PROGRESS_FORMAT, "plan": plan, "epochs": epochs})
        bar.update(min(job.size, len(todo) - round_index * job.size))
    bar.close()
    barrier()
    if is_main():
        final = dict(header, epoch_sha256=[done[e] for e in range(config.epochs)])
        with open(partial, "r+b") as file:
            file.write(encode_header(final, capacity))
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, out)
        progress_path.unlink(missing_ok=True)
    barrier()
    return RelabelResult(out, size, len(todo), False)


def _write_epoch(path: Path, offset: int, block: bytes) -> None:
    """Writes one epoch's block in place (its own bytes of the shared file) and syncs it, so
    that the progress record never names an epoch that is not on the disk."""
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(block)
        file.flush()
        os.fsync(file.fileno())
