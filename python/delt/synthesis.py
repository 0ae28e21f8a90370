"""Synthesis by pixel optimization, shared by every method that optimizes pixels: run setup
(:func:`prepare_run`), the chunk optimizer (:class:`ChunkOptimizer`: the teacher, its matching
target, the settings and the device; one chunk's loop is :func:`optimize_chunk`), the output
writer (:meth:`Run.write_outputs`), shared by every method that optimizes pixels
(:mod:`delt.methods.pixels`, :mod:`delt.methods.pdd`). Chunks
are seeded on their own and kept by :class:`delt.chunks.ChunkStore`: a killed run resumes to the
same bytes. ``OUT/run.json`` records the run's identity (:func:`delt.identity.run_identity`):
the config's identity fields and the SHA-256 of the teacher, the selection and the other
inputs; a resume with another identity is refused, naming what differs. A finished run re-run
returns its saved result and writes nothing, and finishes a cleanup a kill cut short
(:func:`finished_run`).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import delt_ext
from delt.chunks import ChunkResult, ChunkStore
from delt.config import ConfigError
from delt.data import DatasetInfo, ImageDataset, load_like
from delt.distilled_set import Manifest, load_distilled, save_distilled, save_images
from delt.distributed import barrier, is_main
from delt.identity import check_or_reuse, identity_defaults, identity_differences, run_identity
from delt.io import check_output, sha256_file, torch_load
from delt.method import (
    LOOP_FIELDS,
    MatchingTarget,
    PostStep,
    RecoverResult,
    SynthesisConfig,
    clamp_to_pixel_range,
    method_named,
    methods,
)
from delt.models import (
    Checkpoint,
    TeacherMismatchError,
    check_compatible,
    check_model_memory,
    data_fingerprint,
    load_checkpoint,
)
from delt.runtime import autocast, check_memory, logger, resolve_device, versions
from delt.schedules import Chunk, chunk_schedule, cosine_lr, crop_min_scale
from delt.select import Selection
from delt.stats import BNStatistics, load_statistics
from delt.teachers import (
    ensemble_parts,
    load_teachers,
    priors_of,
    resolved_teachers,
    teacher_inputs,
    teacher_record,
)

__all__ = [
    "FINISHED_MARK",
    "ActiveSets",
    "ChunkOptimizer",
    "NonFiniteError",
    "RecoverySettings",
    "Run",
    "chunk_optimizer",
    "delete_resume_state",
    "finished_run",
    "finished_without_chunks",
    "frozen_teacher",
    "load_selection",
    "optimize_chunk",
    "prepare_run",
    "recovery_adam",
    "recovery_settings",
]


# --------------------------------------------------------------------------------------------
# One chunk


@dataclass(frozen=True)
class RecoverySettings:
    """The loop's hyperparameters, shared by every chunk of a run, and the step's
    post-processing (:class:`delt.method.PostStep`, e.g. the clamp to the valid pixel range)."""

    lr: float
    betas: tuple[float, float]
    r_bn: float
    crop_curriculum: str  # delt.schedules.CROP_CURRICULA
    jitter: int
    per_sample_aug: bool
    amp: str
    channels_last: bool
    post_step: PostStep


class NonFiniteError(ValueError):
    """A chunk's loss (at ``iteration``) or its final pixels became NaN or infinite."""

    def __init__(self, what: str, iteration: int, total_iterations: int) -> None:
        where = (
            f"at iteration {iteration} of {total_iterations}"
            if what == "loss"
            else f"after {total_iterations} iterations"
        )
        super().__init__(f"the {what} became non-finite (NaN or infinite) {where}")
        self.what, self.iteration = what, iteration


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` (CPU) on ``device``; to a GPU through pinned memory, without waiting."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def recovery_adam(params: list[Tensor], settings: RecoverySettings) -> torch.optim.Optimizer:
    """The papers' Adam (eps 1e-8), one kernel per step where that keeps CPU results bitwise.

    CUDA: the fused kernel. CPU: foreach, which gives the same bits as the default per-tensor
    loop (the fused CPU kernel rounds differently).
    """
    kind = {"fused": True} if params[0].device.type == "cuda" else {"foreach": True}
    return torch.optim.Adam(params, lr=settings.lr, betas=settings.betas, eps=1e-8, **kind)


class ActiveSets:
    """The images of a chunk that each iteration forwards (EarlyLate), without a host sync.

    Image ``i`` is active from ``start_iterations[i]`` on. Where the active images are a prefix
    of the chunk (every round of a one-class chunk, the full set) they are a slice, a view; else
    an ``index_select`` by an index built once per round and copied to the device without
    waiting. The rows stay in chunk order: reordering them so that every active set is a prefix
    would change the order of the BN-statistic sums and of per-image augmentation params, hence
    the outputs' bits (``tests/test_recover_reference.py``).
    """

    def __init__(self, start_iterations: list[int], device: torch.device) -> None:
        self.starts = list(start_iterations)
        self.device = device
        self._stale_from: float = 0  # the first iteration at which the set below is outdated
        self._count = 0
        self._index: Tensor | None = None

    def _update(self, iteration: int) -> None:
        active = [i for i, s in enumerate(self.starts) if s <= iteration]
        self._stale_from = min((s for s in self.starts if s > iteration), default=math.inf)
        self._count = len(active)
        is_prefix = active == list(range(len(active)))
        self._index = (
            None if is_prefix else _to_device(torch.tensor(active, dtype=torch.int64), self.device)
        )

    def select(self, iteration: int, pixels: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The active rows of ``pixels`` (N, C, H, W) and ``labels`` (N,) at ``iteration``
        (called with increasing iterations)."""
        if iteration >= self._stale_from or iteration == 0:
            self._update(iteration)
        if self._index is not None:
            return pixels.index_select(0, self._index), labels.index_select(0, self._index)
        if self._count == len(self.starts):
            return pixels, labels
        return pixels[: self._count], labels[: self._count]


def optimize_chunk(
    teacher: nn.Module,
    bn_matching: MatchingTarget,
    init: Tensor,
    labels: Tensor,
    start_iterations: list[int],
    total_iterations: int,
    settings: RecoverySettings,
    generator: torch.Generator,
    progress: tqdm | None = None,
    frozen: Tensor | None = None,
    frozen_sample: int | None = None,
) -> ChunkResult:
    """Optimizes one chunk of images against a frozen teacher.

    Image ``i`` is forwarded from iteration ``start_iterations[i]`` on (EarlyLate); before that
    it is not in the batch, so it gets zero gradient and, its Adam moments being zero, no update.
    One Adam holds the whole chunk tensor, so a late image's first step sees the global step
    count (bias correction ~1), as in DELT (github.com/VILA-Lab/DELT, ``recover/recover.py``).

    With ``frozen`` (PDD's union in the batch: a stage conditioned on the earlier stages'
    images), those images are concatenated after the active images *before* augmentation, so
    they share the step's crop and flip and every BN layer's batch statistics are the union's.
    They are constants (no gradient, never modified). The cross-entropy covers the new images
    only: the teacher runs in eval mode, so a frozen image's logits do not depend on the new
    images and its CE would be a constant that only shrinks the new images' CE weight as the
    union grows.

    Args:
        teacher: frozen model in eval mode, hooked by ``bn_matching``.
        bn_matching: the BN-statistic loss over the teacher's BN layers.
        init: (B, C, H, W) float32 initial images in normalized space, on the teacher's device.
        labels: (B,) int64 targets, same device.
        start_iterations: B ints in ``[0, total_iterations)``.
        total_iterations: the loop length T (the LR and crop schedules run over it).
        settings: hyperparameters.
        generator: CPU generator drawing every augmentation parameter of this chunk.
        progress: a tqdm bar advanced once per iteration (optional).
        frozen: (F, C, H, W) float32 images on the same device that join every forward pass.
        frozen_sample: draw this many of ``frozen`` (without replacement, from ``generator``)
            afresh at every step instead of taking all of them.

    Returns:
        The final images (not a "best" copy: SRe2L's best-image logic is dead code).
    """
    device = init.device
    pixels = init.detach().clone().requires_grad_(True)
    optimizer = recovery_adam([pixels], settings)
    augment = delt_ext.RandomResizedCropFlip(
        size=tuple(init.shape[-2:]),
        scale=(0.08, 1.0),
        jitter=settings.jitter,
        per_sample=settings.per_sample_aug,
        generator=generator,
    )
    post_step = settings.post_step.to(device)
    active_sets = ActiveSets(start_iterations, device)
    if frozen is not None:
        frozen = frozen.detach()
        if frozen_sample is not None and frozen_sample >= frozen.shape[0]:
            frozen_sample = None  # the whole pool fits: no sampling
    start = time.perf_counter()
    loss_value = float("nan")  # no step, no loss (the chunk file stores it; no JSON holds it)
    # The first iteration whose loss is not finite (total_iterations: none), kept on the device:
    # no host sync per step. It is read where the loss is read anyway (a redrawn bar) and once
    # at the chunk's end, with the pixels (copied to the host then anyway).
    first_bad = torch.full((), total_iterations, dtype=torch.int64, device=device)
    # A per-class target (delt.matching.ClassMatching) needs each batch's classes.
    set_labels = getattr(bn_matching, "set_labels", None)
    # Several teachers (delt.teachers.EnsembleTarget): the step's teachers and their loss.
    set_step = getattr(bn_matching, "set_step", None)
    ensemble_loss = getattr(bn_matching, "ensemble_loss", None)
    for iteration in range(total_iterations):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(iteration, total_iterations, settings.lr)
        if settings.crop_curriculum != "fixed":
            augment.set_scale(crop_min_scale(iteration, total_iterations, settings.crop_curriculum))
        batch, targets = active_sets.select(iteration, pixels, labels)
        if frozen is not None:
            context = frozen
            if frozen_sample is not None:
                pick = torch.randperm(frozen.shape[0], generator=generator)[:frozen_sample]
                context = frozen.index_select(0, _to_device(pick, device))
            batch = torch.cat([batch, context])
        inputs = augment(batch)
        if set_labels is not None:
            set_labels(targets)
        if set_step is not None:
            set_step(iteration)
        if settings.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast(device, settings.amp):
            logits = teacher(inputs)
        if frozen is not None:
            logits = logits[: targets.shape[0]]
        if ensemble_loss is not None:
            loss = ensemble_loss(logits, targets, settings.r_bn)
        else:
            loss = (
                nn.functional.cross_entropy(logits.float(), targets)
                + settings.r_bn * bn_matching.loss()
            )
        first_bad = torch.minimum(
            first_bad, torch.where(torch.isfinite(loss.detach()), total_iterations, iteration)
        )
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            post_step(pixels)
        if progress is not None and not progress.disable:
            progress.update()
            # Reading the loss waits for the device: only when the bar has just been redrawn.
            if progress.last_print_n == progress.n or iteration == total_iterations - 1:
                loss_value = loss.item()
                if not math.isfinite(loss_value):  # stop now rather than at the chunk's end
                    raise NonFiniteError("loss", int(first_bad), total_iterations)
                progress.set_postfix(
                    loss=f"{loss_value:.3f}", active=targets.shape[0], refresh=False
                )
    if total_iterations:
        loss_value = loss.item()
    images = pixels.detach().cpu()
    if int(first_bad) < total_iterations:
        raise NonFiniteError("loss", int(first_bad), total_iterations)
    if not bool(torch.isfinite(images).all()):
        raise NonFiniteError("pixels", total_iterations, total_iterations)
    return ChunkResult(images, float(loss_value), time.perf_counter() - start)


def frozen_teacher(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """``model`` on ``device``, without parameter gradients, in the requested memory format."""
    model = model.to(device)
    model.requires_grad_(False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


# --------------------------------------------------------------------------------------------
# A run


def recovery_settings(config: SynthesisConfig, info: DatasetInfo) -> RecoverySettings:
    """The loop hyperparameters of a resolved ``RecoverConfig`` (its base method's recipe)."""
    recipe = config.recipe  # None: a method that optimizes nothing
    return RecoverySettings(
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        r_bn=config.r_bn,
        crop_curriculum="fixed" if recipe is None else recipe.crop_curriculum,
        jitter=config.jitter or 0,
        per_sample_aug=config.per_sample_aug,
        amp=config.amp,
        channels_last=config.channels_last,
        post_step=(clamp_to_pixel_range if recipe is None else recipe.post_step)(info),
    )


def load_selection(
    config: SynthesisConfig, teacher: Checkpoint, needed_ipc: int
) -> tuple[Selection, ImageDataset]:
    """The ``--selection`` of a real-image init and the training set its indices point into.

    Raises:
        TeacherMismatchError: the selection was made on other data than the teacher's, or
            than the training split found.
        ConfigError: it holds fewer than ``needed_ipc`` images per class.
        FileFormatError: an index out of range or of another class (:meth:`Selection.
            check_indices`), before any work.
    """
    selection = Selection.load(config.selection)
    selection_info = DatasetInfo.from_dict(selection.meta["dataset"])
    try:
        check_compatible(teacher.meta, selection_info, fingerprint=data_fingerprint(selection.meta))
    except TeacherMismatchError as error:
        raise TeacherMismatchError(f"--selection {config.selection}: {error}") from None
    if selection.ipc < needed_ipc:
        raise ConfigError(
            f"--ipc {config.ipc}: the selection in {config.selection} holds only "
            f"{selection.ipc} images per class (run `delt select --ipc {needed_ipc}`)"
        )
    dataset = load_like(teacher.info, "train", config.data_root or selection.meta.get("data_root"))
    fingerprint = dataset.fingerprint()
    check_compatible(teacher.meta, dataset.info, fingerprint=fingerprint)
    path = Path(config.selection) / "selection.json"
    try:  # the split its indices point into, itself (a teacher of before fingerprints has none)
        check_compatible(selection.meta, dataset.info, what="selection", fingerprint=fingerprint)
    except TeacherMismatchError as error:
        raise TeacherMismatchError(f"--selection {config.selection}: {error}") from None
    selection.check_indices(dataset.targets, dataset.info.num_classes, path)
    return selection, dataset


@dataclass
class Run:
    """A recovery set up by :func:`prepare_run`: its output folder, its ``RecoverConfig`` with
    every default resolved (and the device it runs on), the loaded teacher and its dataset, the
    device and the loop's hyperparameters."""

    out: Path
    config: SynthesisConfig
    teacher: Checkpoint
    info: DatasetInfo
    device: torch.device
    settings: RecoverySettings
    identity: dict | None = None  # set by check_identity
    statistics: BNStatistics | None = None  # --stats, checked against the teacher
    ensemble: list[Checkpoint] = dataclasses.field(default_factory=list)  # --teachers
    priors: list[float] = dataclasses.field(default_factory=list)  # --teacher-weights prior

    def check_identity(self, uses_selection: bool, **inputs: object) -> None:
        """Writes ``OUT/run.json`` on the first run; refuses a resume with another identity
        (:func:`delt.identity.run_identity`: the config's identity fields, the SHA-256 of every
        input file: the teacher, the selection when ``uses_selection``, and ``inputs``,
        ``*_sha256``; and the data identity, the dataset's name and training-split
        fingerprint). Sets :attr:`identity`, which every chunk records. By content, never by
        path: a moved or copied folder resumes."""
        config = self.config
        selection = Path(config.selection) / "selection.json" if uses_selection else None
        self.identity = run_identity(
            config, teacher_sha256=sha256_file(self.teacher.path),
            selection_sha256=None if selection is None else sha256_file(selection), **inputs,
            **({"stats_sha256": sha256_file(config.stats)} if config.stats else {}),
            **teacher_inputs(config.teachers),
            data={"name": self.info.name, "fingerprint": data_fingerprint(self.teacher.meta)},
        )  # fmt: skip
        check_or_reuse(
            self.out / "run.json", self.identity, self.defaults,
            refuse=f"--out {self.out} holds a recovery with another configuration "
            "({differences}); re-run with the same flags to resume, or choose another --out",
        )  # fmt: skip

    @property
    def defaults(self) -> dict:
        """The defaults of :attr:`identity` (:func:`delt.identity.identity_defaults`; a run
        without ``--teachers`` has none)."""
        return {**identity_defaults(self.config), "teachers_sha256": None}

    def chunk_store(self, folder: Path, ipc: int, **identity: object) -> ChunkStore:
        """The chunks of a set of ``ipc`` per class in ``folder``; each records the run's
        identity updated with ``identity`` (what else makes them, e.g. a pdd stage's teacher)."""
        recorded = None if self.identity is None else {**self.identity, **identity}
        return ChunkStore(folder, self.info, ipc, recorded, self.defaults)

    def finished_result(self) -> RecoverResult | None:
        """The result of a finished run in ``OUT`` of this run's identity, else None.

        Finished: ``manifest.json`` (written last) records this config and the SHA-256 of
        ``distilled.pt``, which matches, and every image file it lists exists. Reads only, so a
        finished run re-run writes nothing (read-only media included).
        """
        try:
            manifest = Manifest.load(self.out)
        except (FileNotFoundError, ValueError):
            return None
        distilled = self.out / "distilled.pt"
        if manifest.distilled_sha256 is None or not distilled.is_file():
            return None
        # The manifest records every field; the identity's are compared.
        current = (self.identity or {}).get("config", {})
        known = {**self.defaults["config"], **current}
        saved = {key: value for key, value in manifest.config.items() if key in known}
        if identity_differences({"config": saved}, {"config": current}, self.defaults):
            return None
        if manifest.teacher.get("sha256") != (self.identity or {}).get("teacher_sha256"):
            return None
        images_dir = self.out / "images"
        count = (
            sum(1 for p in images_dir.glob("*/*") if not p.name.startswith("."))
            if images_dir.is_dir()
            else 0
        )
        if count != manifest.num_images or sha256_file(distilled) != manifest.distilled_sha256:
            return None
        payload = torch_load(distilled)
        logger.info("recover: %s is finished; nothing to do", self.out)
        return RecoverResult(
            self.out,
            payload["images"],
            payload["labels"],
            list(manifest.iterations_per_image),
            float(manifest.synthesis_seconds),
        )

    def write_outputs(
        self,
        folder: Path,
        selection: Selection | None,
        images: Tensor,
        labels: Tensor,
        ipc: int,
        iterations_per_image: list[int],
        synthesis_seconds: float,
        write_images: bool = True,
        **fields: Any,
    ) -> Manifest:
        """Writes ``folder/images/`` (unless not ``write_images``), ``distilled.pt`` and the
        manifest of a class-major set with ``ipc`` per class (``fields``: pdd's stages); on rank
        0 only under torchrun (the other ranks get the manifest without writing it)."""
        config, teacher = self.config, self.teacher
        files = {"distilled": "distilled.pt"}
        if write_images:
            # Shared outputs are rank 0's (the other ranks of a torchrun job hold the same set).
            pattern = (
                save_images(folder / "images", images, labels, ipc, self.info, config.image_format)
                if is_main()
                else "<class>/<index>"
            )
            files["images"] = f"images/{pattern}"
        else:
            files["images"] = "images/<class>/<index> (this stage's new images only)"
        manifest = Manifest(
            method=config.method, ipc=ipc, dataset=self.info,
            teacher={"path": str(teacher.path), "sha256": sha256_file(teacher.path),
                     "meta": teacher.meta},
            config=manifest_fields(config),
            num_images=len(iterations_per_image), iterations_per_image=iterations_per_image,
            synthesis_seconds=synthesis_seconds, seed=config.seed,
            selection=None
            if selection is None
            else {"path": str(config.selection), "strategy": selection.meta["strategy"]},
            versions=versions(), files=files, **fields,
        )  # fmt: skip
        if self.ensemble:
            manifest.extra["teachers"] = teacher_record([teacher, *self.ensemble], self.priors)
        if is_main():
            save_distilled(folder, images, labels, manifest)
        return manifest

    def finish(
        self,
        selection: Selection | None,
        images: Tensor,
        labels: Tensor,
        iterations_per_image: list[int],
        seconds: float,
        resume_state: list[Path],
        work: str,
        **fields: Any,
    ) -> RecoverResult:
        """Writes the outputs of a one-set recovery in ``OUT`` (:meth:`write_outputs`), then
        deletes its ``resume_state`` (:func:`delete_resume_state`: one copy of the images,
        ``distilled.pt``, stays) and logs what was made (``work``: what the seconds measure)."""
        config = self.config
        manifest = self.write_outputs(
            self.out, selection, images, labels, config.ipc, iterations_per_image, seconds,
            **fields,
        )  # fmt: skip
        delete_resume_state(self.out, resume_state, config.keep_chunks)
        logger.info(
            "recover: %d images, %d image-iterations, %.1f s of %s -> %s",
            images.shape[0], manifest.image_iterations, seconds, work, self.out,
        )  # fmt: skip
        return RecoverResult(self.out, images, labels, iterations_per_image, seconds)


# Written in OUT once its outputs are complete, before the resume state goes.
FINISHED_MARK = "chunks-deleted"


def finished_without_chunks(out: Path) -> RecoverResult | None:
    """The result of a run in ``out`` that finished and deleted its resume state
    (:func:`delete_resume_state`), else None; call it after the identity check.

    The mark is written after the outputs and before the first chunk goes, so a run killed while
    deleting is finished too. Reads only.
    """
    if not all((out / name).is_file() for name in (FINISHED_MARK, "distilled.pt", "manifest.json")):
        return None
    images, labels, manifest = load_distilled(out)
    logger.info("recover: %s is finished (%d images)", out, images.shape[0])
    return RecoverResult(
        out, images, labels, list(manifest.iterations_per_image),
        float(manifest.synthesis_seconds),
    )  # fmt: skip


def delete_resume_state(out: Path, paths: list[Path], keep: bool) -> None:
    """Deletes ``paths`` (chunk folders, a pdd stage's copy of its union) once ``out``'s outputs
    are written, so that a finished run keeps one float32 copy of its images; nothing with
    ``keep`` (``--keep-chunks``). Under torchrun every rank has read the chunks (barrier) and
    rank 0 deletes."""
    if keep:
        return
    barrier()
    if not is_main():
        return
    (out / FINISHED_MARK).write_text("resume state deleted after distilled.pt was written\n")
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def finished_run(run: Run, resume_state: list[Path]) -> RecoverResult | None:
    """The result of a finished run in ``run.out`` (:meth:`Run.finished_result`, else
    :func:`finished_without_chunks`), else None; call it after the identity check.

    A run killed after its outputs were written but before its resume state (``resume_state``,
    as given to :func:`delete_resume_state`) was all deleted is finished too: the cleanup is
    finished here when the run that wrote the outputs meant to delete it (its manifest records
    ``keep_chunks`` false) and this one does too (no ``--keep-chunks``). Otherwise reads only:
    a finished run without resume state left re-runs writing nothing (read-only media
    included); resume state that cannot be deleted there is reported, not an error.
    """
    finished = run.finished_result() or finished_without_chunks(run.out)
    if finished is None:
        return None
    left = [path for path in resume_state if path.exists()]
    if not left or run.config.keep_chunks:
        return finished
    recorded = Manifest.load(run.out).config.get("keep_chunks")
    if recorded is not False:  # kept on purpose (or a manifest too old to say): left as it is
        return finished
    logger.info(
        "recover: %s is finished but a kill interrupted its cleanup; deleting %s",
        run.out,
        ", ".join(str(path.relative_to(run.out)) for path in left),
    )
    try:
        delete_resume_state(run.out, resume_state, keep=False)
    except OSError as error:
        logger.warning("recover: %s: its resume state stays (%s)", run.out, error)
    return finished


def prepare_run(config: SynthesisConfig) -> Run:
    """Loads the teacher of a ``RecoverConfig``, resolves the config's defaults and device, and
    derives the loop settings: what every recovery does before its first chunk.

    Raises:
        FileNotFoundError, ValueError: no such teacher, or not a delt checkpoint.
    """
    out = Path(config.out)
    # A finished set (re-run: nothing to write) may sit on read-only media; anything else will
    # write, so it is probed now, before the first chunk.
    finished = (out / "distilled.pt").is_file() and (out / "manifest.json").is_file()
    check_output(out, "--out", probe=not finished)
    teacher = load_checkpoint(config.teacher)
    info = teacher.info
    device = resolve_device(config.device)
    # The whole set (and its chunks as they come back), then a chunk's optimization.
    count = info.num_classes * config.ipc
    check_memory(
        f"--ipc {config.ipc}: {count:,} images of {info.channels}x{info.resolution}x"
        f"{info.resolution}",
        2 * count * info.channels * info.resolution * info.resolution * 4,
    )
    meta = teacher.meta
    check_model_memory(
        meta["arch"], info, meta["arch_kwargs"], min(config.batch_size, count), device, True,
        f"--batch-size {config.batch_size}",
    )  # fmt: skip
    # The manifest says where it ran.
    resolved = method_named(config.method).resolved(config, info)
    config = dataclasses.replace(
        config, **resolved, **resolved_teachers(config), device=str(device)
    )
    # Several teachers: of the same data as --teacher, each once (before any work).
    ensemble = load_teachers(config.teachers, teacher, info)
    priors = priors_of(config, [teacher, *ensemble]) if ensemble else []
    statistics = None
    if config.stats is not None:  # another teacher's statistics: refused before any work
        statistics = load_statistics(config.stats)
        statistics.check_teacher(teacher, sha256_file(teacher.path), "--stats")
    return Run(
        Path(config.out), config, teacher, info, device, recovery_settings(config, info),
        statistics=statistics, ensemble=ensemble, priors=priors,
    )  # fmt: skip


def manifest_fields(config: SynthesisConfig) -> dict[str, Any]:
    """The fields of a resolved config a manifest records: the shared ones the method reads
    (not the loop's for one that optimizes nothing) and its own options, not other methods'."""
    method = method_named(config.method)
    dropped = {"progress", *([] if method.optimizes else LOOP_FIELDS)}
    for other in methods().values():
        if other is not method and other.options is not None:
            dropped.update(field.name for field in dataclasses.fields(other.options))
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in dropped}


# --------------------------------------------------------------------------------------------
# The chunk optimizer


class ChunkOptimizer:
    """Optimizes chunks against a frozen teacher: the teacher's forward (hooked by the matching
    target, possibly compiled), the matching target, the loop's settings and the device, for
    loops of ``iterations`` (MI) per chunk."""

    def __init__(
        self,
        forward: nn.Module,
        target: MatchingTarget,
        settings: RecoverySettings,
        device: torch.device,
        iterations: int,
        progress: bool = True,
    ) -> None:
        self.forward, self.target, self.settings = forward, target, settings
        self.device, self.iterations, self.progress = device, iterations, progress

    def optimize(
        self,
        chunk: Chunk,
        ipc: int,
        round_iterations: int,
        init: Tensor,
        generator: torch.Generator,
        frozen: Tensor | None = None,
        frozen_sample: int | None = None,
        desc: str = "chunks",
    ) -> tuple[ChunkResult, list[int]]:
        """One chunk of a set of ``ipc`` per class from ``init`` (len(chunk), C, H, W) float32
        (CPU), with RI ``round_iterations`` (``== iterations``: no rounds) and ``frozen``
        images joining every forward (:func:`optimize_chunk`); the result and each image's
        iterations."""
        total, starts = chunk_schedule(chunk.within_class, ipc, self.iterations, round_iterations)
        labels = torch.tensor(chunk.classes, dtype=torch.int64)
        begin_chunk = getattr(self.target, "begin_chunk", None)  # several teachers
        if begin_chunk is not None:
            begin_chunk(chunk)
        disable = None if self.progress else True  # None: a bar on a terminal only
        bar = tqdm(total=total, desc=f"chunk {chunk.index}", leave=False, disable=disable)
        try:
            result = optimize_chunk(
                self.forward, self.target, init.to(self.device), labels.to(self.device), starts,
                total, self.settings, generator, bar,
                frozen=None if frozen is None else frozen.to(self.device),
                frozen_sample=frozen_sample,
            )  # fmt: skip
        except NonFiniteError as error:
            # Nothing of the chunk is saved: a NaN set is never written.
            settings = self.settings
            raise ConfigError(
                f"chunk {chunk.index} ({desc}): {error}; nothing of it was saved. The loss is "
                f"scaled by --r-bn {settings.r_bn:g} and --first-bn-multiplier "
                f"{self.target.weights[0]:g}, its steps by --lr {settings.lr:g}: lower them"
            ) from None
        finally:
            bar.close()
        return result, [total - s for s in starts]

    def optimize_set(
        self,
        store: ChunkStore,
        chunks: list[Chunk],
        round_iterations: int,
        chunk_seed: Callable[[Chunk], int],
        initial_images: Callable[[Chunk, torch.Generator], Tensor],
        frozen_images: Callable[[Chunk], Tensor | None] | None = None,
        frozen_sample: int | None = None,
        desc: str = "chunks",
    ) -> tuple[Tensor, list[int], float]:
        """Optimizes (or loads from ``store``, when already done) every chunk of a set; as
        :meth:`delt.chunks.ChunkStore.make_all` (the seconds are optimization seconds).

        Args:
            initial_images: ``(chunk, generator) -> (len(chunk), C, H, W)`` float32 on the CPU.
            frozen_images: ``chunk -> (F, C, H, W)`` images that join every forward pass of that
                chunk (:func:`optimize_chunk`'s ``frozen``), or None.
        """

        def make(chunk: Chunk, generator: torch.Generator) -> tuple[ChunkResult, list[int]]:
            init = initial_images(chunk, generator)
            frozen = None if frozen_images is None else frozen_images(chunk)
            return self.optimize(
                chunk, store.ipc, round_iterations, init, generator, frozen, frozen_sample, desc
            )

        return store.make_all(chunks, chunk_seed, make, self.progress, desc)


@contextmanager
def chunk_optimizer(run: Run, model: nn.Module) -> Iterator[ChunkOptimizer]:
    """The run's :class:`ChunkOptimizer` for ``model`` (a teacher checkpoint's), frozen on the
    run's device and hooked by the recipe's matching target (``--match``,
    :func:`delt.matching.matching_target`; the hooks removed on exit); with ``--compile``,
    compiled after hooking, so that the hooks are traced into the graph."""
    config = run.config
    if run.ensemble:  # --teachers: model first, then the others (delt.teachers)
        models = [model, *(checkpoint.model for checkpoint in run.ensemble)]
        parts = ensemble_parts(
            models, config.first_bn_multiplier, str(config.teacher_policy),
            str(config.teacher_weights), run.priors, run.device, config.channels_last,
        )  # fmt: skip
        with parts as (ensemble, target):
            forward = torch.compile(ensemble) if config.compile else ensemble
            yield ChunkOptimizer(
                forward, target, run.settings, run.device, config.iterations, config.progress
            )
        return
    model = frozen_teacher(model, run.device, config.channels_last)
    recipe = config.recipe
    assert recipe is not None and recipe.target is not None, "a method that optimizes nothing"
    with recipe.target(model, config, config.first_bn_multiplier, run.statistics) as target:
        forward = torch.compile(model) if config.compile else model
        yield ChunkOptimizer(
            forward, target, run.settings, run.device, config.iterations, config.progress
        )
