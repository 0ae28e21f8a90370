"""``delt recover --method sre2l|cda|delt``: synthesize a distilled set from a frozen teacher.

Every method optimizes pixels (normalized space) with the recipe of reference/delt.md §1-3:
Adam (lr 0.25, betas (0.5, 0.9), eps 1e-8), cosine LR over the whole loop, loss
``CE(teacher(aug(x)), y) + r_bn * sum_l w_l (||mu_l - RM_l||_2 + ||var_l - RV_l||_2)`` with
``w_1 = 10`` (``delt_ext.BNStatMatching``), and a per-channel clamp to the valid pixel range after
every step. Augmentation is ``delt_ext.RandomResizedCropFlip``, batch-shared by default (one box,
one flip, one roll per step for the whole batch, as the papers' torchvision-on-a-batch code).

===========  ===============  ====================  ====================  ======  ==========
method       init             batches               crop scale            jitter  EarlyLate
===========  ===============  ====================  ====================  ======  ==========
``sre2l``    Gaussian noise   one image per class   fixed (0.08, 1)       yes     no
``cda``      Gaussian noise   one image per class   cosine 1 → 0.08       yes     no
``delt``     ``delt select``  class-contiguous      cosine 1 → 0.08       0       MI/RI rounds
===========  ===============  ====================  ====================  ======  ==========

The work is cut into chunks of ``--batch-size`` images (:mod:`delt.schedules`), each an
independent problem seeded from ``(seed, chunk index)`` and saved to ``OUT/chunks/<k>.pt`` when
done. Re-running the same command skips finished chunks, so a killed run resumes and ends with
the same bytes as an uninterrupted one. Outputs: ``OUT/distilled.pt``, ``OUT/images/<class>/``,
``OUT/manifest.json``.

The manifest's ``wall_seconds`` (kept under that name) is not the command's wall-clock time: it
is the synthesis time, each chunk's optimization loop timed by :func:`optimize_chunk` and summed
over all chunks, as saved in ``OUT/chunks/<k>.pt``. A chunk finished by an earlier, killed
process counts with the time it took then; a chunk this process only loads adds no new time;
loading the teacher and data, initial images, saving chunks and writing the outputs are not
counted. A resumed run thus reports about what one uninterrupted run would (its bytes too), and
re-running a finished recovery writes the same number again.

``--method pdd`` (progressive synthesis in P stages, each running one of the methods above on
frozen earlier stages) lives in :mod:`delt.pdd`; its flags are fields of :class:`RecoverConfig`
so that one command and one config cover every method.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import delt_ext
from delt.config import ConfigError, config_diff, flag, identity_dict, option
from delt.data import DatasetInfo, ImageDataset, load_like
from delt.io import read_json, save_image, sha256_file, torch_load, torch_save, write_json
from delt.models import Checkpoint, TeacherMismatchError, check_compatible, load_checkpoint
from delt.runtime import autocast, derive_seed, logger, resolve_device, versions
from delt.schedules import (
    Chunk,
    chunk_schedule,
    class_contiguous_chunks,
    class_interleaved_chunks,
    cosine_lr,
    stage_sizes,
)
from delt.select import Selection

__all__ = [
    "METHODS",
    "ChunkResult",
    "MethodRecipe",
    "RecoverConfig",
    "RecoverResult",
    "RecoverySettings",
    "optimize_chunk",
    "recover",
    "synthesize_chunks",
]


# --------------------------------------------------------------------------------------------
# Methods


@dataclass(frozen=True)
class MethodRecipe:
    """What distinguishes one synthesis method from another (see the module table).

    Attributes:
        init: ``"noise"`` (standard normal in normalized space) or ``"selection"`` (real images
            from ``delt select``, in selection order).
        chunks: the batching, ``(num_classes, ipc, batch_size) -> list[Chunk]``.
        crop_curriculum: CDA's cosine min-crop schedule 1 → 0.08 (else a fixed (0.08, 1)).
        early_late: MI/RI rounds (``--round-iterations``).
        default_jitter: the roll range in pixels as a function of the image resolution.
    """

    init: Literal["noise", "selection"]
    chunks: Callable[[int, int, int], list[Chunk]]
    crop_curriculum: bool
    early_late: bool
    default_jitter: Callable[[int], int]


def _sre2l_jitter(resolution: int) -> int:
    # SRe2L/CDA rolled by up to 32 pixels at 224 (ImageNet) and by 4 on Tiny/CIFAR (delt.md §3.2).
    return 32 if resolution >= 224 else 4


METHODS: dict[str, MethodRecipe] = {
    "sre2l": MethodRecipe("noise", class_interleaved_chunks, False, False, _sre2l_jitter),
    "cda": MethodRecipe("noise", class_interleaved_chunks, True, False, _sre2l_jitter),
    # DELT's scripts pass --jitter 0 (delt.md §1.2 step 5).
    "delt": MethodRecipe("selection", class_contiguous_chunks, True, True, lambda resolution: 0),
}

DEFAULT_ROUND_ITERATIONS = 500

# Progressive synthesis (delt.pdd): P stages, each a run of one METHODS entry (its "base").
PROGRESSIVE = "pdd"
DEFAULT_STAGES = 5  # PDD's released scripts (pdd.md §2)
DEFAULT_BASE = "delt"
DEFAULT_HARD_STUDENT_EPOCHS = 100
# Fields that only --method pdd reads. They are left out of other methods' run identity, so that
# runs started before these flags existed still resume.
PDD_FIELDS = (
    "stages", "base", "stage_ipc", "stage_teachers", "union_in_batch", "union_sample",
    "stage_init", "hard_student_epochs",
)  # fmt: skip


@dataclass
class RecoverConfig:
    """Configuration of ``delt recover`` (one field per flag)."""

    # Paths are not part of a run's identity (a moved folder still resumes); the teacher's and
    # the selection's contents are, through their SHA-256 in OUT/run.json.
    teacher: str = option(
        help="teacher checkpoint (DIR/teacher.pt of `delt teacher`)", identity=False
    )
    ipc: int = option(help="images per class to synthesize")
    out: str = option(help="output folder; re-running into it resumes", identity=False)
    method: str = option(
        "delt", help="synthesis method (pdd: progressive stages)", choices=(*METHODS, PROGRESSIVE)
    )
    selection: str | None = option(
        None,
        help="delt: folder of `delt select` (initial images, in selection order)",
        identity=False,
    )
    data_root: str | None = option(
        None,
        help="delt: folder of the teacher's dataset (default: the one the selection used)",
        identity=False,
    )
    iterations: int = option(4000, help="iterations per chunk (DELT's MI)")
    round_iterations: int | None = option(
        None, help=f"delt: iterations between rounds (RI; default {DEFAULT_ROUND_ITERATIONS})"
    )
    batch_size: int = option(100, help="images per chunk")
    lr: float = option(0.25, help="Adam learning rate (cosine-decayed to 0)")
    beta1: float = option(0.5, help="Adam beta1")
    beta2: float = option(0.9, help="Adam beta2")
    r_bn: float = option(0.01, help="weight of the BN-statistic loss")
    first_bn_multiplier: float = option(10.0, help="extra weight of the first BN layer")
    jitter: int | None = option(
        None, help="roll range in pixels (default: delt 0; sre2l/cda 32 at >=224 px, else 4)"
    )
    per_sample_aug: bool = option(
        False, help="a crop/flip/roll per image instead of one per step for the batch"
    )
    amp: Literal["none", "bf16"] = option("none", help="autocast dtype of the teacher forward")
    channels_last: bool = option(False, help="channels_last memory format")
    compile: bool = option(False, help="torch.compile the teacher")
    image_format: Literal["png", "jpeg"] = option(
        "png", help="image files: png (lossless) or jpeg (quality 75, as the papers)"
    )
    seed: int = option(0, help="random seed; chunk k uses a seed derived from (seed, k)")
    # --method pdd (delt.pdd, reference/pdd.md §4.2)
    stages: int | None = option(None, help=f"pdd: number of stages P (default {DEFAULT_STAGES})")
    base: str | None = option(
        None,
        help=f"pdd: the method each stage runs (default {DEFAULT_BASE})",
        choices=tuple(METHODS),
    )
    stage_ipc: tuple[int, ...] | None = option(
        None, help="pdd: images per class of each stage, e.g. 4,2,2,1,1 (default: IPC/P each)"
    )
    stage_teachers: Literal["final", "checkpoints"] = option(
        "final",
        help="pdd: every stage matches the final teacher, or stage k the k-th of P checkpoints "
        "of `delt teacher --save-epochs` (early phase first)",
    )
    union_in_batch: bool = option(
        False,
        help="pdd: earlier stages' images of the chunk's classes join every forward pass (BN "
        "statistics of the union; gradients reach the new images only)",
    )
    union_sample: int | None = option(
        None, help="pdd --union-in-batch: a random sample of this many earlier images per step"
    )
    stage_init: Literal["base", "hard"] = option(
        "base",
        help="pdd: stage k >= 2 starts from the base method's init, or from real images that a "
        "student trained on the union so far gets wrong",
    )
    hard_student_epochs: int | None = option(
        None,
        help=f"pdd --stage-init hard: epochs of that student (default "
        f"{DEFAULT_HARD_STUDENT_EPOCHS})",
    )
    device: str = option("auto", help="auto, cpu, cuda, cuda:1, ...", identity=False)
    progress: bool = option(True, help="show progress bars", identity=False)

    def __post_init__(self) -> None:
        if self.method not in (*METHODS, PROGRESSIVE):
            raise ConfigError(
                f"--method {self.method!r}: unknown method; known: "
                f"{', '.join((*METHODS, PROGRESSIVE))}"
            )
        for name in ("ipc", "iterations", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}"
                )
        self._check_pdd()
        recipe = self.recipe
        for name in ("lr", "r_bn", "first_bn_multiplier"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be a finite number > 0, got {value}"
                )
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.jitter is not None and self.jitter < 0:
            raise ConfigError(f"--jitter must be >= 0 pixels, got {self.jitter}")
        method = self.method if self.method in METHODS else f"pdd --base {self.base_method}"
        if recipe.init == "selection" and self.selection is None:
            raise ConfigError(f"--method {method} starts from real images: pass --selection DIR")
        if recipe.init != "selection":
            if self.selection is not None:
                raise ConfigError(
                    f"--selection applies to --method delt (real-image init); {method} starts "
                    "from noise"
                )
            # --stage-init hard reads real images too (it picks them itself, no selection).
            if self.data_root is not None and self.stage_init != "hard":
                raise ConfigError(
                    f"--data-root applies to --method delt (real-image init) and to pdd "
                    f"--stage-init hard; {method} starts from noise"
                )
        if not recipe.early_late and self.round_iterations is not None:
            raise ConfigError(
                f"--round-iterations applies to --method delt; {method} has no rounds"
            )
        if recipe.early_late:
            round_iterations = self.round_iterations or DEFAULT_ROUND_ITERATIONS
            if self.round_iterations is not None and self.round_iterations < 1:
                raise ConfigError(f"--round-iterations must be >= 1, got {self.round_iterations}")
            if round_iterations > self.iterations:
                raise ConfigError(
                    f"--round-iterations ({round_iterations}) must be <= --iterations "
                    f"({self.iterations})"
                )
            if self.iterations % round_iterations:
                raise ConfigError(
                    f"--iterations ({self.iterations}) must be a multiple of --round-iterations "
                    f"({round_iterations})"
                )

    @property
    def base_method(self) -> str:
        """The METHODS entry that synthesizes the images: the method, or pdd's ``--base``."""
        if self.method == PROGRESSIVE:
            return self.base or DEFAULT_BASE
        return self.method

    @property
    def recipe(self) -> MethodRecipe:
        return METHODS[self.base_method]

    @property
    def stage_ipc_list(self) -> list[int]:
        """pdd: images per class of each stage (validated in ``__post_init__``)."""
        stages = DEFAULT_STAGES if self.stages is None else self.stages
        return stage_sizes(self.ipc, stages, self.stage_ipc)

    def _check_pdd(self) -> None:
        if self.method != PROGRESSIVE:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for name in PDD_FIELDS:
                if getattr(self, name) != defaults[name]:
                    raise ConfigError(f"{flag(name)} applies to --method pdd, not {self.method}")
            return
        if self.base is not None and self.base not in METHODS:
            raise ConfigError(f"--base {self.base!r}: unknown method; known: {', '.join(METHODS)}")
        stages = DEFAULT_STAGES if self.stages is None else self.stages
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            raise ConfigError(f"--stages must be an integer >= 1, got {self.stages!r}")
        if stages > self.ipc:
            raise ConfigError(
                f"--stages {stages} must be <= --ipc {self.ipc}: every stage synthesizes at "
                "least one image per class"
            )
        if self.stage_ipc is not None:
            self.stage_ipc = sizes = tuple(self.stage_ipc)
            shown = ",".join(map(str, sizes))
            if len(sizes) != stages:
                raise ConfigError(
                    f"--stage-ipc {shown}: one size per stage expected ({stages} for "
                    f"--stages {stages}), got {len(sizes)}"
                )
            if min(sizes) < 1:
                raise ConfigError(f"--stage-ipc {shown}: every stage needs >= 1 image")
            if sum(sizes) != self.ipc:
                raise ConfigError(
                    f"--stage-ipc {shown} must sum to --ipc {self.ipc}, got {sum(sizes)}"
                )
        if self.union_sample is not None:
            if not self.union_in_batch:
                raise ConfigError("--union-sample applies with --union-in-batch")
            if self.union_sample < 1:
                raise ConfigError(f"--union-sample must be >= 1, got {self.union_sample}")
        if self.hard_student_epochs is not None:
            if self.stage_init != "hard":
                raise ConfigError("--hard-student-epochs applies with --stage-init hard")
            if self.hard_student_epochs < max(1, stages - 1):
                raise ConfigError(
                    f"--hard-student-epochs must be >= {max(1, stages - 1)} (an epoch per earlier "
                    f"stage at least), got {self.hard_student_epochs}"
                )

    def identity(self) -> dict:
        """The fields that determine the results (``OUT/run.json``); pdd's only for pdd."""
        identity = identity_dict(self)
        if self.method != PROGRESSIVE:
            for name in PDD_FIELDS:
                identity.pop(name)
        return identity

    def resolved(self, info: DatasetInfo) -> RecoverConfig:
        """The config with every method default filled in (what the manifest records)."""
        recipe = self.recipe
        round_iterations = None
        if recipe.early_late:
            # IPC 1: no EarlyLate; the single image per class gets all iterations (delt.md §1.1).
            # pdd decides per stage (schedules.stage_round_iterations).
            round_iterations = (
                self.iterations
                if self.ipc == 1 and self.method != PROGRESSIVE
                else self.round_iterations or DEFAULT_ROUND_ITERATIONS
            )
        jitter = recipe.default_jitter(info.resolution) if self.jitter is None else self.jitter
        resolved = dataclasses.replace(self, round_iterations=round_iterations, jitter=jitter)
        if self.method == PROGRESSIVE:
            resolved = dataclasses.replace(
                resolved,
                stages=DEFAULT_STAGES if self.stages is None else self.stages,
                base=self.base_method,
                stage_ipc=tuple(self.stage_ipc_list),
                hard_student_epochs=(self.hard_student_epochs or DEFAULT_HARD_STUDENT_EPOCHS)
                if self.stage_init == "hard"
                else None,
            )
        return resolved


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
    crop_curriculum: bool
    jitter: int
    per_sample_aug: bool
    amp: str
    channels_last: bool
    low: Tensor
    high: Tensor


@dataclass
class ChunkResult:
    """A finished chunk: final images (B, C, H, W) float32 (CPU), final loss, seconds.

    ``seconds``: wall time of :func:`optimize_chunk`'s iteration loop (every step, a
    ``--compile`` warm-up inside the first steps, and the copy of the result to the CPU), not
    the chunk's initialization or saving. Summed over chunks it is the manifest's
    ``wall_seconds``.
    """

    images: Tensor
    loss: float
    seconds: float


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
    optimizer = torch.optim.Adam([pixels], lr=settings.lr, betas=settings.betas, eps=1e-8)
    augment = delt_ext.RandomResizedCropFlip(
        size=tuple(init.shape[-2:]),
        scale=(0.08, 1.0),
        jitter=settings.jitter,
        per_sample=settings.per_sample_aug,
        generator=generator,
    )
    low, high = settings.low.to(device), settings.high.to(device)
    starts = torch.tensor(start_iterations, dtype=torch.int64)
    if frozen is not None:
        frozen = frozen.detach()
        if frozen_sample is not None and frozen_sample >= frozen.shape[0]:
            frozen_sample = None  # the whole pool fits: no sampling
    active: Tensor | None = None
    active_count = -1
    start = time.perf_counter()
    loss_value = float("nan")
    for iteration in range(total_iterations):
        count = int((starts <= iteration).sum())
        if count != active_count:  # the active set only changes at round starts
            active_count = count
            is_full = count == len(starts)
            active = None if is_full else torch.nonzero(starts <= iteration).view(-1).to(device)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(iteration, total_iterations, settings.lr)
        if settings.crop_curriculum:
            augment.set_scale(delt_ext.crop_scale_schedule(iteration, total_iterations))
        batch = pixels if active is None else pixels.index_select(0, active)
        targets = labels if active is None else labels.index_select(0, active)
        if frozen is not None:
            context = frozen
            if frozen_sample is not None:
                pick = torch.randperm(frozen.shape[0], generator=generator)[:frozen_sample]
                context = frozen.index_select(0, pick.to(device))
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
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            pixels.clamp_(min=low, max=high)
        if progress is not None:
            progress.update()
            if iteration % 25 == 0 or iteration == total_iterations - 1:
                loss_value = loss.item()
                progress.set_postfix(loss=f"{loss_value:.3f}", active=count, refresh=False)
    if progress is None:
        loss_value = loss.item()
    return ChunkResult(pixels.detach().cpu(), float(loss_value), time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# A run


@dataclass
class RecoverResult:
    """Where a recovery's outputs are and what they cost."""

    out: Path
    images: Tensor  # (N, C, H, W) float32, normalized, class-major
    labels: Tensor  # (N,) int64
    iterations_per_image: list[int]
    # The manifest's ``wall_seconds``: synthesis time, see the module docstring.
    wall_seconds: float


def _class_dir_width(num_classes: int) -> int:
    # Zero-padded so that sorted folder names are the class order (RDED #4).
    return max(3, len(str(num_classes - 1)))


def _check_run_identity(
    out: Path, config: RecoverConfig, teacher: Checkpoint, uses_selection: bool, **inputs: object
) -> None:
    """Writes ``OUT/run.json`` on the first run; refuses a resume with a different one.

    The identity holds ``config`` (the identity fields) and the SHA-256 of every input file:
    the teacher, the selection when ``uses_selection``, and ``inputs`` (``*_sha256`` keys, e.g.
    pdd's stage teachers).
    """
    identity = {
        "config": config.identity(),
        "teacher_sha256": sha256_file(teacher.path),
        "selection_sha256": sha256_file(Path(config.selection) / "selection.json")
        if uses_selection
        else None,
        **inputs,
    }
    path = out / "run.json"
    if path.is_file():
        saved = read_json(path)
        differences = config_diff(saved["config"], identity["config"])
        for key in sorted(set(saved) | set(identity)):
            if key != "config" and saved.get(key) != identity.get(key):
                differences.append(f"{key}: the file changed since the first run")
        if differences:
            raise ConfigError(
                f"--out {out} holds a recovery with another configuration "
                f"({'; '.join(differences)}); re-run with the same flags to resume, or choose "
                "another --out"
            )
    else:
        write_json(path, identity)


def load_selection(
    config: RecoverConfig, teacher: Checkpoint, needed_ipc: int
) -> tuple[Selection, ImageDataset]:
    """The ``--selection`` of a real-image init and the training set its indices point into.

    Raises:
        TeacherMismatchError: the selection was made on other data than the teacher's.
        ConfigError: it holds fewer than ``needed_ipc`` images per class.
    """
    selection = Selection.load(config.selection)
    selection_info = DatasetInfo.from_dict(selection.meta["dataset"])
    try:
        check_compatible(teacher.meta, selection_info)
    except TeacherMismatchError as error:
        raise TeacherMismatchError(f"--selection {config.selection}: {error}") from None
    if selection.ipc < needed_ipc:
        raise ConfigError(
            f"--ipc {config.ipc}: the selection in {config.selection} holds only "
            f"{selection.ipc} images per class (run `delt select --ipc {needed_ipc}`)"
        )
    dataset = load_like(teacher.info, "train", config.data_root or selection.meta.get("data_root"))
    check_compatible(teacher.meta, dataset.info)
    return selection, dataset


def recovery_settings(config: RecoverConfig, info: DatasetInfo) -> RecoverySettings:
    """The loop hyperparameters of a resolved config (its base method's recipe)."""
    low, high = info.pixel_bounds()
    return RecoverySettings(
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        r_bn=config.r_bn,
        crop_curriculum=config.recipe.crop_curriculum,
        jitter=config.jitter,
        per_sample_aug=config.per_sample_aug,
        amp=config.amp,
        channels_last=config.channels_last,
        low=low,
        high=high,
    )


def frozen_teacher(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """``model`` on ``device``, without parameter gradients, in the requested memory format."""
    model = model.to(device)
    model.requires_grad_(False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


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
) -> tuple[Tensor, list[int], float]:
    """Optimizes (or loads, when already done) every chunk of one set of ``ipc`` per class.

    Chunk ``k`` is saved to ``chunk_dir/<k>.pt`` when done and skipped on a re-run, so a killed
    run resumes; its generator is seeded with ``chunk_seed(chunk)``, which makes a chunk's result
    independent of whether earlier chunks ran in this process.

    Args:
        forward: the hooked teacher (possibly compiled).
        chunks: the batching of ``num_classes x ipc`` images (:mod:`delt.schedules`).
        iterations, round_iterations: MI and RI (``round_iterations == iterations``: no rounds).
        initial_images: ``(chunk, generator) -> (len(chunk), C, H, W)`` float32 on the CPU.
        frozen_images: ``chunk -> (F, C, H, W)`` images that join every forward pass of that
            chunk (:func:`optimize_chunk`'s ``frozen``), or None.

    Returns:
        ``(images (num_classes * ipc, C, H, W) float32 CPU class-major, iterations per image,
        seconds of optimization summed over chunks)``. The seconds of a chunk loaded from
        ``chunk_dir`` are the ones saved with it when it was optimized, possibly by an earlier
        process, so the sum is synthesis time, not this call's wall time.
    """
    total_images = info.num_classes * ipc
    images = torch.empty(total_images, info.channels, info.resolution, info.resolution)
    iterations_per_image = [0] * total_images
    wall_seconds = 0.0
    for chunk in tqdm(chunks, desc=desc, disable=not progress):
        path = chunk_dir / f"{chunk.index:05d}.pt"
        positions = chunk.positions(ipc)
        total, starts = chunk_schedule(chunk.within_class, ipc, iterations, round_iterations)
        if path.is_file():
            saved = torch_load(path)
            if saved["positions"].tolist() != positions:
                raise ConfigError(f"{path} does not hold chunk {chunk.index} of this run")
            chunk_images, seconds = saved["images"], float(saved["seconds"])
        else:
            generator = torch.Generator().manual_seed(chunk_seed(chunk))
            init = initial_images(chunk, generator)
            chunk_labels = torch.tensor(chunk.classes, dtype=torch.int64)
            frozen = None if frozen_images is None else frozen_images(chunk)
            bar = tqdm(total=total, desc=f"chunk {chunk.index}", leave=False, disable=not progress)
            result = optimize_chunk(
                forward, bn_matching, init.to(device), chunk_labels.to(device), starts, total,
                settings, generator, bar,
                frozen=None if frozen is None else frozen.to(device), frozen_sample=frozen_sample,
            )  # fmt: skip
            bar.close()
            chunk_images, seconds = result.images, result.seconds
            torch_save(
                {
                    "images": chunk_images,
                    "labels": chunk_labels,
                    "positions": torch.tensor(positions, dtype=torch.int64),
                    "iterations": torch.tensor([total - s for s in starts], dtype=torch.int64),
                    "seconds": seconds,
                    "loss": result.loss,
                },
                path,
            )
            logger.info(
                "recover: %s %d/%d done in %.1f s (loss %.3f)",
                desc, chunk.index + 1, len(chunks), seconds, result.loss,
            )  # fmt: skip
        images[torch.tensor(positions, dtype=torch.int64)] = chunk_images
        for position, start in zip(positions, starts, strict=True):
            iterations_per_image[position] = total - start
        wall_seconds += seconds
    return images, iterations_per_image, wall_seconds


def recover(config: RecoverConfig) -> RecoverResult:
    """Runs (or resumes) a recovery; writes ``distilled.pt``, ``images/`` and ``manifest.json``."""
    if config.method == PROGRESSIVE:
        from delt.pdd import recover_progressive

        return recover_progressive(config)
    out = Path(config.out)
    teacher: Checkpoint = load_checkpoint(config.teacher)
    info = teacher.info
    config = config.resolved(info)
    recipe = config.recipe
    device = resolve_device(config.device)
    config = dataclasses.replace(config, device=str(device))  # the manifest says where it ran

    selection: Selection | None = None
    if recipe.init == "selection":
        selection, dataset = load_selection(config, teacher, config.ipc)
        chosen = selection.indices

    def initial_images(chunk: Chunk, generator: torch.Generator) -> Tensor:
        if recipe.init == "noise":
            # Drawn on the CPU so that a chunk's start does not depend on the device.
            shape = (len(chunk), info.channels, info.resolution, info.resolution)
            return torch.randn(shape, generator=generator)
        # The first IPC picks of each class: a prefix of the selection order.
        pairs = zip(chunk.classes, chunk.within_class, strict=True)
        return dataset.images([chosen[c][j] for c, j in pairs])

    _check_run_identity(out, config, teacher, selection is not None)

    model = frozen_teacher(teacher.model, device, config.channels_last)
    settings = recovery_settings(config, info)
    chunks = recipe.chunks(info.num_classes, config.ipc, config.batch_size)
    labels = torch.arange(info.num_classes).repeat_interleave(config.ipc)
    chunk_dir = out / "chunks"
    done = [chunk.index for chunk in chunks if (chunk_dir / f"{chunk.index:05d}.pt").is_file()]
    logger.info(
        "recover: %s, %d classes x %d images, %d chunks of <= %d (%d already done), %d iterations, "
        "device %s -> %s",
        config.method, info.num_classes, config.ipc, len(chunks), config.batch_size, len(done),
        config.iterations, device, out,
    )  # fmt: skip

    with delt_ext.BNStatMatching(
        model, first_bn_multiplier=config.first_bn_multiplier
    ) as bn_matching:
        # Compile after hooking: the hooks are traced into the graph.
        forward = torch.compile(model) if config.compile else model
        images, iterations_per_image, wall_seconds = synthesize_chunks(
            forward, bn_matching, chunks, config.ipc, config.iterations,
            config.round_iterations or config.iterations, settings, info, device, chunk_dir,
            chunk_seed=lambda chunk: derive_seed(config.seed, chunk.index),
            initial_images=initial_images, progress=config.progress,
            desc=f"{config.method} chunks",
        )  # fmt: skip

    _write_outputs(
        out, config, info, teacher, selection, images, labels, iterations_per_image, wall_seconds
    )
    return RecoverResult(out, images, labels, iterations_per_image, wall_seconds)


def save_images(
    folder: Path,
    images: Tensor,
    labels: Tensor,
    ipc: int,
    info: DatasetInfo,
    image_format: str,
    positions: list[int] | None = None,
) -> str:
    """Writes ``folder/<class>/<index>.<png|jpg>`` for class-major ``images`` with ``ipc`` per
    class (index = position within the class); only ``positions`` when given.

    Returns:
        The file pattern, for the manifest.
    """
    width = _class_dir_width(info.num_classes)
    index_width = max(3, len(str(ipc - 1)))
    suffix = "png" if image_format == "png" else "jpg"
    pixels = info.denormalize(images).clamp_(0, 1)
    for position in range(images.shape[0]) if positions is None else positions:
        label = int(labels[position])
        within = position % ipc
        save_image(
            pixels[position],
            folder / f"{label:0{width}d}" / f"{within:0{index_width}d}.{suffix}",
            image_format,
        )
    return f"<class:0{width}d>/<index:0{index_width}d>.{suffix}"


def manifest_fields(
    config: RecoverConfig,
    info: DatasetInfo,
    teacher: Checkpoint,
    selection: Selection | None,
) -> dict:
    """The manifest entries every recovery shares: method, resolved config, data, teacher."""
    return {
        "kind": "delt-distilled-set",
        "method": config.method,
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "progress"},
        "seed": config.seed,
        "ipc": config.ipc,
        "dataset": info.to_dict(),
        "teacher": {
            "path": str(teacher.path),
            "sha256": sha256_file(teacher.path),
            "meta": teacher.meta,
        },
        "selection": None
        if selection is None
        else {"path": str(config.selection), "strategy": selection.meta["strategy"]},
        "versions": versions(),
    }


def _write_outputs(
    out: Path,
    config: RecoverConfig,
    info: DatasetInfo,
    teacher: Checkpoint,
    selection: Selection | None,
    images: Tensor,
    labels: Tensor,
    iterations_per_image: list[int],
    wall_seconds: float,
) -> None:
    pattern = save_images(out / "images", images, labels, config.ipc, info, config.image_format)
    torch_save({"images": images.contiguous(), "labels": labels}, out / "distilled.pt")
    manifest = {
        **manifest_fields(config, info, teacher, selection),
        "num_images": int(images.shape[0]),
        "iterations_per_image": iterations_per_image,
        "image_iterations": int(sum(iterations_per_image)),
        # Synthesis time (the chunks' optimization seconds summed), see the module docstring.
        "wall_seconds": wall_seconds,
        "files": {"distilled": "distilled.pt", "images": f"images/{pattern}"},
    }
    write_json(out / "manifest.json", manifest)
    logger.info(
        "recover: %d images, %d image-iterations, %.1f s of synthesis -> %s",
        images.shape[0], manifest["image_iterations"], wall_seconds, out,
    )  # fmt: skip
