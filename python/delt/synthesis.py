"""Synthesis: each method's recipe, run setup (:func:`prepare_run`), the chunk loop
(:func:`synthesize`, :func:`optimize_chunk`) and the output writer (:meth:`Run.write_outputs`),
shared by ``delt recover``, ``--method pdd`` and the benchmarks (reference/delt.md §1-3). Chunks
are seeded on their own and saved when done: a killed run resumes to the same bytes. Every chunk
records the identity of the run that made it (the config's identity fields and the SHA-256 of
the teacher, the selection and the other inputs, as ``OUT/run.json``); a chunk of another
identity is refused, naming what differs, and so is one whose content digest does not match
(:func:`chunk_digest`). A finished run re-run returns its saved result and writes nothing
(:meth:`Run.finished_result`), unless a kill cut its cleanup short: then it finishes it
(:func:`finished_run`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import delt_ext
from delt.config import ConfigError, config_diff
from delt.data import DatasetInfo, ImageDataset, load_like
from delt.distilled import Manifest, load_distilled, save_distilled, save_images
from delt.distributed import barrier, broadcast, is_main, main_first, world
from delt.io import (
    FileFormatError,
    IntegrityError,
    check_output,
    read_json,
    sha256_file,
    torch_load,
    torch_save,
    write_json,
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
from delt.schedules import (
    Chunk,
    chunk_schedule,
    class_contiguous_chunks,
    class_interleaved_chunks,
    cosine_lr,
    crop_min_scale,
)
from delt.select import Selection

__all__ = [
    "DEFAULT_ROUND_ITERATIONS",
    "FINISHED_MARK",
    "METHODS",
    "ActiveSets",
    "ChunkResult",
    "MethodRecipe",
    "NonFiniteError",
    "RecoverResult",
    "RecoverySettings",
    "Run",
    "chunk_digest",
    "delete_resume_state",
    "finished_run",
    "finished_without_chunks",
    "frozen_teacher",
    "load_selection",
    "optimize_chunk",
    "prepare_run",
    "recovery_adam",
    "recovery_settings",
    "run_chunks",
    "synthesize",
    "synthesize_chunks",
]


# --------------------------------------------------------------------------------------------
# Methods


@dataclass(frozen=True)
class MethodRecipe:
    """What distinguishes one synthesis method from another (README, "Methods").

    Attributes:
        init: ``"noise"`` (standard normal in normalized space) or ``"selection"`` (real images
            from ``delt select``, in selection order).
        chunks: the batching, ``(num_classes, ipc, batch_size) -> list[Chunk]``.
        crop_curriculum: the minimum crop scale over the loop (``schedules.CROP_CURRICULA``).
        early_late: MI/RI rounds (``--round-iterations``).
        default_jitter: the roll range in pixels as a function of the image resolution.
    """

    init: Literal["noise", "selection"]
    chunks: Callable[[int, int, int], list[Chunk]]
    crop_curriculum: str
    early_late: bool
    default_jitter: Callable[[int], int]


def _sre2l_jitter(resolution: int) -> int:
    # SRe2L/CDA rolled by up to 32 pixels at 224 (ImageNet) and by 4 on Tiny/CIFAR (delt.md §3.2).
    return 32 if resolution >= 224 else 4


METHODS: dict[str, MethodRecipe] = {
    "sre2l": MethodRecipe("noise", class_interleaved_chunks, "fixed", False, _sre2l_jitter),
    "cda": MethodRecipe("noise", class_interleaved_chunks, "cosine", False, _sre2l_jitter),
    # DELT's scripts pass --jitter 0 (delt.md §1.2 step 5).
    "delt": MethodRecipe("selection", class_contiguous_chunks, "cosine", True, lambda _: 0),
}

DEFAULT_ROUND_ITERATIONS = 500


# --------------------------------------------------------------------------------------------
# One chunk


@dataclass(frozen=True)
class RecoverySettings:
    """The loop's hyperparameters, shared by every chunk of a run.

    ``low`` and ``high`` are the valid pixel range per channel in normalized space, (C, 1, 1).
    """

    lr: float
    betas: tuple[float, float]
    r_bn: float
    crop_curriculum: str  # delt.schedules.CROP_CURRICULA
    jitter: int
    per_sample_aug: bool
    amp: str
    channels_last: bool
    low: Tensor
    high: Tensor


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


@dataclass
class ChunkResult:
    """A finished chunk: final images (B, C, H, W) float32 (CPU), final loss, seconds, and
    ``extra``: tensors a method saves beside them in the chunk file (rded: the crop sources).

    ``seconds``: wall time of :func:`optimize_chunk`'s iteration loop (every step, a
    ``--compile`` warm-up inside the first steps, and the copy of the result to the CPU), not
    the chunk's initialization or saving. Summed over chunks it is the manifest's
    ``synthesis_seconds``.
    """

    images: Tensor
    loss: float
    seconds: float
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


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
    bn_matching: delt_ext.BNStatMatching,
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
    count (bias correction ~1), as in DELT (delt.md §1.2).

    With ``frozen`` (PDD's union in the batch, pdd.md §4.2 option 2), those images are
    concatenated after the active images *before* augmentation, so they share the step's crop and
    flip and every BN layer's batch statistics are those of the union. They are constants (no
    gradient, never modified). The cross-entropy covers the new images only: the teacher runs in
    eval mode, so a frozen image's logits do not depend on the new images and its CE would be a
    constant that only shrinks the new images' CE weight as the union grows.

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
    low, high = settings.low.to(device), settings.high.to(device)
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
        if settings.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast(device, settings.amp):
            logits = teacher(inputs)
        if frozen is not None:
            logits = logits[: targets.shape[0]]
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
            pixels.clamp_(min=low, max=high)
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


def chunk_digest(payload: dict[str, Any]) -> str:
    """``"sha256:<hex>"`` of a chunk file's content (every field but ``digest``: each tensor's
    dtype, shape and bytes, each other value as JSON), saved with the chunk and checked before
    the chunk is used, so that a flipped bit is refused instead of mixed into the set."""
    digest = hashlib.sha256()
    for key in sorted(payload):
        if key == "digest":
            continue
        value = payload[key]
        digest.update(f"{key}\0".encode())
        if isinstance(value, Tensor):
            tensor = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{tensor.dtype}{tuple(value.shape)}\0".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
        else:
            digest.update(json.dumps(value, sort_keys=True).encode())
        digest.update(b"\0")
    return f"sha256:{digest.hexdigest()}"


def run_chunks(
    chunks: list[Chunk],
    ipc: int,
    info: DatasetInfo,
    chunk_dir: Path,
    chunk_seed: Callable[[Chunk], int],
    make_chunk: Callable[[Chunk, torch.Generator], tuple[ChunkResult, list[int]]],
    progress: bool = True,
    desc: str = "chunks",
    identity: dict | None = None,
) -> tuple[Tensor, list[int], float]:
    """Makes (or loads, when already done) every chunk of one set of ``ipc`` per class: the one
    resume mechanism of every method.

    Chunk ``k`` is saved to ``chunk_dir/<k>.pt`` when done, with its :func:`chunk_digest`, and
    skipped on a re-run, so a killed run resumes; a saved chunk whose contents do not match its
    digest is refused by name (delete it to recompute it), one saved before digests existed is
    accepted as it is. Its generator is seeded with ``chunk_seed(chunk)``, which makes a chunk's
    result independent of whether earlier chunks ran in this process. Under torchrun the chunks
    left to do are split across the ranks, and after a barrier every rank assembles the whole set
    from ``chunk_dir`` (a shared folder): the result is the one-process result at any world size.

    Args:
        chunks: the batching of ``num_classes x ipc`` images (:mod:`delt.schedules`).
        make_chunk: ``(chunk, generator) -> (result, iterations of each image)``: the chunk's
            images (len(chunk), C, H, W) float32 on the CPU, in chunk order; ``result.extra``
            is saved with them.
        identity: what made this set (JSON values): saved in every chunk; a saved chunk with
            another one is refused. A chunk saved before identities existed is accepted (its
            run's ``run.json``, checked before, matches). None: neither saved nor checked.

    Raises:
        ConfigError: a saved chunk holds other positions, or was made with another identity.
        FileFormatError: a saved chunk is unreadable or holds images of another shape.
        IntegrityError: a saved chunk's contents do not match its digest.

    Returns:
        ``(images (num_classes * ipc, C, H, W) float32 CPU class-major, iterations per image,
        seconds summed over chunks)``. The seconds of a chunk loaded from ``chunk_dir`` are the
        ones saved with it when it was made, possibly by an earlier process, so the sum is
        synthesis time, not this call's wall time.
    """
    total_images = info.num_classes * ipc
    images = torch.empty(total_images, info.channels, info.resolution, info.resolution)
    iterations_per_image = [0] * total_images
    seconds_of: dict[int, float] = {}
    identity_text = None if identity is None else json.dumps(identity, sort_keys=True)
    expected = (info.channels, info.resolution, info.resolution)

    def chunk_path(chunk: Chunk) -> Path:
        return chunk_dir / f"{chunk.index:05d}.pt"

    def place(chunk: Chunk, chunk_images: Tensor, seconds: float, iterations: list[int]) -> None:
        positions = chunk.positions(ipc)
        images[torch.tensor(positions, dtype=torch.int64)] = chunk_images
        for position, count in zip(positions, iterations, strict=True):
            iterations_per_image[position] = count
        seconds_of[chunk.index] = seconds

    def load(chunk: Chunk) -> None:
        path = chunk_path(chunk)
        positions = chunk.positions(ipc)
        keys = ("images", "positions", "iterations", "seconds")
        try:
            saved = torch_load(path, "recovery chunk", keys=keys)
        except FileFormatError as error:
            raise FileFormatError(f"{error} (delete it to make that chunk again)") from None
        if saved["positions"].tolist() != positions:
            raise ConfigError(f"{path} does not hold chunk {chunk.index} of this run")
        recorded = saved.get("identity")
        if identity_text is not None and recorded is not None and recorded != identity_text:
            differences = identity_differences(json.loads(recorded), json.loads(identity_text))
            raise ConfigError(
                f"{path} was made by another run ({'; '.join(differences)}); it is not mixed "
                "into this one: delete it to recompute it, or choose another --out"
            )
        chunk_images = saved["images"]
        if not isinstance(chunk_images, Tensor) or tuple(chunk_images.shape) != (
            len(positions),
            *expected,
        ):
            raise FileFormatError(
                f"{path}: not a recovery chunk of {(len(positions), *expected)} images"
            )
        if chunk_images.is_floating_point() and not bool(torch.isfinite(chunk_images).all()):
            raise FileFormatError(
                f"{path}: holds non-finite pixels (NaN or infinite); delete it to make that "
                "chunk again"
            )
        # Last, after the checks that say more: any other change (a flipped bit anywhere).
        # Chunks saved before digests existed have none: accepted (run.json was checked).
        if "digest" in saved and saved["digest"] != chunk_digest(saved):
            raise IntegrityError(
                f"{path}: its contents do not match the digest saved with them (the chunk is "
                "corrupt); it is not mixed into the set: delete it to recompute that chunk"
            )
        place(chunk, chunk_images, float(saved["seconds"]), saved["iterations"].tolist())

    # Under torchrun the chunks still to do are dealt round-robin over the ranks (rank 0's view
    # of the folder, so that every rank deals the same list); a chunk's result does not depend
    # on which rank made it, so the set is the one-process set whatever the world size.
    job = world()
    pending = broadcast([chunk.index for chunk in chunks if not chunk_path(chunk).is_file()])
    mine = set(pending[job.rank :: job.size])
    # The chunks saved before are checked first: a foreign or corrupt one is refused before
    # any work is done.
    for chunk in chunks:
        if chunk.index not in pending:
            load(chunk)
    for chunk in tqdm(
        [chunk for chunk in chunks if chunk.index in mine], desc=desc, disable=not progress
    ):
        generator = torch.Generator().manual_seed(chunk_seed(chunk))
        result, chunk_iterations = make_chunk(chunk, generator)
        # Written atomically by the rank that made it: a killed run or job resumes from it.
        payload = {
            "images": result.images,
            "labels": torch.tensor(chunk.classes, dtype=torch.int64),
            "positions": torch.tensor(chunk.positions(ipc), dtype=torch.int64),
            "iterations": torch.tensor(chunk_iterations, dtype=torch.int64),
            "seconds": result.seconds,
            "loss": result.loss,
            **result.extra,
            **({} if identity_text is None else {"identity": identity_text}),
        }
        torch_save({**payload, "digest": chunk_digest(payload)}, chunk_path(chunk))
        logger.info(
            "recover: %s %d/%d done in %.1f s (loss %.3f)",
            desc, chunk.index + 1, len(chunks), result.seconds, result.loss,
        )  # fmt: skip
        place(chunk, result.images, result.seconds, chunk_iterations)
    # Every rank assembles the whole set (the next PDD stage needs it); only rank 0 writes it.
    barrier()
    for chunk in chunks:
        if chunk.index not in seconds_of:
            load(chunk)  # made by another rank
    synthesis_seconds = 0.0
    for chunk in chunks:  # summed in chunk order, whoever made them
        synthesis_seconds += seconds_of[chunk.index]
    return images, iterations_per_image, synthesis_seconds


def synthesize_chunks(
    forward: nn.Module,
    bn_matching: delt_ext.BNStatMatching,
    chunks: list[Chunk],
    ipc: int,
    iterations: int,
    round_iterations: int,
    settings: RecoverySettings,
    info: DatasetInfo,
    device: torch.device,
    chunk_dir: Path,
    chunk_seed: Callable[[Chunk], int],
    initial_images: Callable[[Chunk, torch.Generator], Tensor],
    frozen_images: Callable[[Chunk], Tensor | None] | None = None,
    frozen_sample: int | None = None,
    progress: bool = True,
    desc: str = "chunks",
    identity: dict | None = None,
) -> tuple[Tensor, list[int], float]:
    """Optimizes (or loads, when already done) every chunk of one set of ``ipc`` per class
    (:func:`run_chunks` with :func:`optimize_chunk`).

    Args:
        forward: the hooked teacher (possibly compiled).
        chunks: the batching of ``num_classes x ipc`` images (:mod:`delt.schedules`).
        iterations, round_iterations: MI and RI (``round_iterations == iterations``: no rounds).
        initial_images: ``(chunk, generator) -> (len(chunk), C, H, W)`` float32 on the CPU.
        frozen_images: ``chunk -> (F, C, H, W)`` images that join every forward pass of that
            chunk (:func:`optimize_chunk`'s ``frozen``), or None.
        identity: what made this set (JSON values): saved in every chunk; a saved chunk with
            another one is refused. A chunk saved before identities existed is accepted (its
            run's ``run.json``, checked before, matches). None: neither saved nor checked.

    Raises:
        ConfigError: a saved chunk holds other positions, or was made with another identity.

    Returns:
        As :func:`run_chunks`; the seconds are optimization seconds.
    """

    def optimize(chunk: Chunk, generator: torch.Generator) -> tuple[ChunkResult, list[int]]:
        total, starts = chunk_schedule(chunk.within_class, ipc, iterations, round_iterations)
        init = initial_images(chunk, generator)
        chunk_labels = torch.tensor(chunk.classes, dtype=torch.int64)
        frozen = None if frozen_images is None else frozen_images(chunk)
        bar = tqdm(total=total, desc=f"chunk {chunk.index}", leave=False, disable=not progress)
        try:
            result = optimize_chunk(
                forward, bn_matching, init.to(device), chunk_labels.to(device), starts, total,
                settings, generator, bar,
                frozen=None if frozen is None else frozen.to(device), frozen_sample=frozen_sample,
            )  # fmt: skip
        except NonFiniteError as error:
            # Nothing of the chunk is saved: a NaN set is never written.
            raise ConfigError(
                f"chunk {chunk.index} ({desc}): {error}; nothing of it was saved. The loss is "
                f"scaled by --r-bn {settings.r_bn:g} and --first-bn-multiplier "
                f"{bn_matching.weights[0]:g}, its steps by --lr {settings.lr:g}: lower them"
            ) from None
        finally:
            bar.close()
        return result, [total - s for s in starts]

    return run_chunks(chunks, ipc, info, chunk_dir, chunk_seed, optimize, progress, desc, identity)


def identity_differences(saved: dict, current: dict) -> list[str]:
    """What differs between two run identities: ``--flag: a -> b`` for config fields, else the
    input whose contents changed."""
    differences = config_diff(saved.get("config", {}), current.get("config", {}))
    for key in sorted(set(saved) | set(current)):
        if key != "config" and saved.get(key) != current.get(key):
            differences.append(f"{key}: {_short(saved.get(key))} -> {_short(current.get(key))}")
    return differences


def _input_difference(key: str, saved: object, current: object) -> str:
    """How an input of ``run.json`` differs from this run's: a file's SHA-256 (another file, or
    the file was changed), or the data's identity."""
    if key.endswith("_sha256"):
        name = key.removesuffix("_sha256")
        flag_name = {"teacher": "--teacher", "selection": "--selection"}.get(name, name)

        def shown(value: object) -> str:
            return "none" if value is None else str(value)[:16] + "..."

        return (
            f"{flag_name}: the {name}'s SHA-256 differs (the first run's {shown(saved)}, now "
            f"{shown(current)}): another {name} file, or that file changed since the first run"
        )
    if key == "data":
        return f"the data differs ({_short(saved)} -> {_short(current)})"
    return f"{key}: {_short(saved)} -> {_short(current)}"


def _short(value: object) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "..."


def frozen_teacher(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """``model`` on ``device``, without parameter gradients, in the requested memory format."""
    model = model.to(device)
    model.requires_grad_(False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


# --------------------------------------------------------------------------------------------
# A run


@dataclass
class RecoverResult:
    """Where a recovery's outputs are and what they cost."""

    out: Path
    images: Tensor  # (N, C, H, W) float32, normalized, class-major
    labels: Tensor  # (N,) int64
    iterations_per_image: list[int]
    synthesis_seconds: float  # the chunks' optimization seconds, summed (not wall time)


def recovery_settings(config: Any, info: DatasetInfo) -> RecoverySettings:
    """The loop hyperparameters of a resolved ``RecoverConfig`` (its base method's recipe)."""
    low, high = info.pixel_bounds()
    recipe = config.recipe  # None: a method that optimizes nothing (rded reads amp, bounds)
    return RecoverySettings(
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        r_bn=config.r_bn,
        crop_curriculum="fixed" if recipe is None else recipe.crop_curriculum,
        jitter=config.jitter or 0,
        per_sample_aug=config.per_sample_aug,
        amp=config.amp,
        channels_last=config.channels_last,
        low=low,
        high=high,
    )


def load_selection(
    config: Any, teacher: Checkpoint, needed_ipc: int
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
    config: Any
    teacher: Checkpoint
    info: DatasetInfo
    device: torch.device
    settings: RecoverySettings
    identity: dict | None = None  # set by check_identity

    def check_identity(self, uses_selection: bool, **inputs: object) -> None:
        """Writes ``OUT/run.json`` on the first run; refuses a resume with another identity:
        the config's identity fields, the SHA-256 of every input file (the teacher, the
        selection when ``uses_selection``, and ``inputs``, ``*_sha256``) and the data identity
        (the dataset's name and training-split fingerprint). Sets :attr:`identity`, which every
        chunk records. By content, never by path: a moved or copied folder resumes."""
        config = self.config
        selection = Path(config.selection) / "selection.json" if uses_selection else None
        identity = {
            "config": config.identity(),
            "teacher_sha256": sha256_file(self.teacher.path),
            "selection_sha256": None if selection is None else sha256_file(selection),
            **inputs,
            "data": {"name": self.info.name, "fingerprint": data_fingerprint(self.teacher.meta)},
        }
        # The JSON form, so that a chunk's identity compares equal to run.json's.
        self.identity = json.loads(json.dumps(identity))
        path = self.out / "run.json"
        # Rank 0 writes it; the other ranks of a torchrun job then compare with it.
        with main_first():
            if is_main() and not path.is_file():
                write_json(path, identity)
                return
        saved = read_json(path)
        if "data" not in saved:
            # run.json of a run begun before data identities: the teacher's SHA-256 (which
            # records its data) already pins it.
            saved = {**saved, "data": identity["data"]}
        differences = config_diff(saved["config"], identity["config"])
        for key in sorted(set(saved) | set(identity)):
            if key != "config" and saved.get(key) != identity.get(key):
                differences.append(_input_difference(key, saved.get(key), identity.get(key)))
        if differences:
            raise ConfigError(
                f"--out {self.out} holds a recovery with another configuration "
                f"({'; '.join(differences)}); re-run with the same flags to resume, or choose "
                "another --out"
            )

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
        saved_config = json.loads(json.dumps(manifest.config))
        current = json.loads(json.dumps(self.config.identity()))
        if any(saved_config.get(key) != value for key, value in current.items()):
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
            config=config.manifest_fields(),
            num_images=len(iterations_per_image), iterations_per_image=iterations_per_image,
            synthesis_seconds=synthesis_seconds, seed=config.seed,
            selection=None
            if selection is None
            else {"path": str(config.selection), "strategy": selection.meta["strategy"]},
            versions=versions(), files=files, **fields,
        )  # fmt: skip
        if is_main():
            save_distilled(folder, images, labels, manifest)
        return manifest


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
        run.out, ", ".join(str(path.relative_to(run.out)) for path in left),
    )  # fmt: skip
    try:
        delete_resume_state(run.out, resume_state, keep=False)
    except OSError as error:
        logger.warning("recover: %s: its resume state stays (%s)", run.out, error)
    return finished


def prepare_run(config: Any) -> Run:
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
    config = dataclasses.replace(config.resolved(info), device=str(device))
    return Run(Path(config.out), config, teacher, info, device, recovery_settings(config, info))


def synthesize(
    run: Run,
    model: nn.Module,
    chunks: list[Chunk],
    ipc: int,
    round_iterations: int,
    chunk_dir: Path,
    chunk_seed: Callable[[Chunk], int],
    initial_images: Callable[[Chunk, torch.Generator], Tensor],
    frozen_images: Callable[[Chunk], Tensor | None] | None = None,
    frozen_sample: int | None = None,
    desc: str = "chunks",
    identity: dict | None = None,
) -> tuple[Tensor, list[int], float]:
    """:func:`synthesize_chunks` on ``model`` (a teacher checkpoint's) frozen on the run's
    device, hooked by ``BNStatMatching`` and, with ``--compile``, compiled after hooking.

    The chunks record ``run.identity`` (from :meth:`Run.check_identity`) updated with
    ``identity`` (what else makes these chunks, e.g. a pdd stage's teacher and initial images).
    """
    config = run.config
    model = frozen_teacher(model, run.device, config.channels_last)
    with delt_ext.BNStatMatching(
        model, first_bn_multiplier=config.first_bn_multiplier
    ) as bn_matching:
        # Compile after hooking: the hooks are traced into the graph.
        forward = torch.compile(model) if config.compile else model
        return synthesize_chunks(
            forward, bn_matching, chunks, ipc, config.iterations, round_iterations,
            run.settings, run.info, run.device, chunk_dir, chunk_seed, initial_images,
            frozen_images=frozen_images, frozen_sample=frozen_sample,
            progress=config.progress, desc=desc,
            identity=None if run.identity is None else {**run.identity, **(identity or {})},
        )  # fmt: skip
