"""``delt recover``: synthesize a distilled set from a frozen teacher (README, "Methods": the
table of ``sre2l``, ``cda``, ``delt``; ``pdd`` runs in :mod:`delt.pdd`, ``rded`` in
:mod:`delt.rded`). Outputs:
``OUT/distilled.pt``, ``OUT/images/``, ``OUT/manifest.json`` (:mod:`delt.distilled`), and the
resume state ``OUT/chunks/`` and ``OUT/run.json``; the loop is :mod:`delt.synthesis`. One
process at a time writes ``OUT`` (``OUT/.lock``, :mod:`delt.lock`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from delt.config import ConfigError, check_float, check_int_fields, flag, identity_dict, option
from delt.data import DatasetInfo
from delt.lock import output_lock
from delt.pdd import (
    PDD_FIELDS,
    PDD_OPTIONS,
    PROGRESSIVE,
    check_pdd_options,
    pdd_base,
    recover_progressive,
    resolve_pdd_options,
)
from delt.rded import (
    LOOP_FIELDS,
    RDED,
    RDED_FIELDS,
    RDED_OPTIONS,
    check_rded_options,
    recorded_fields,
    recover_rded,
)
from delt.runtime import derive_seed, logger
from delt.schedules import Chunk
from delt.select import Selection
from delt.synthesis import (
    DEFAULT_ROUND_ITERATIONS,
    METHODS,
    MethodRecipe,
    RecoverResult,
    delete_resume_state,
    finished_run,
    load_selection,
    prepare_run,
    synthesize,
)

__all__ = ["RecoverConfig", "recover"]


@dataclass
class RecoverConfig:
    """Configuration of ``delt recover`` (one field per flag; the pdd ones are
    :data:`delt.pdd.PDD_OPTIONS`)."""

    # Paths are not part of a run's identity (a moved folder still resumes); the teacher's and
    # the selection's contents are, through their SHA-256 in OUT/run.json.
    teacher: str = option(
        help="teacher checkpoint (DIR/teacher.pt of `delt teacher`)", identity=False
    )
    ipc: int = option(help="images per class to synthesize")
    out: str = option(help="output folder; re-running into it resumes", identity=False)
    method: str = option(
        "delt",
        help="synthesis method (pdd: progressive stages; rded: teacher-scored real crops, no "
        "optimization)",
        choices=(*METHODS, PROGRESSIVE, RDED),
    )
    selection: str | None = option(
        None,
        help="delt: folder of `delt select` (initial images, in selection order)",
        identity=False,
    )
    data_root: str | None = option(
        None,
        help="delt, rded: folder of the teacher's dataset (default: delt: the one the selection "
        "used; rded: the dataset's own)",
        identity=False,
    )
    iterations: int = option(4000, help="iterations per chunk (DELT's MI)")
    round_iterations: int | None = option(
        None, help=f"delt: iterations between rounds (RI; default {DEFAULT_ROUND_ITERATIONS})"
    )
    batch_size: int = option(100, help="images per chunk (rded: crops per scoring forward)")
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
    stages: int | None = PDD_OPTIONS["stages"]
    base: str | None = PDD_OPTIONS["base"]
    stage_ipc: tuple[int, ...] | None = PDD_OPTIONS["stage_ipc"]
    stage_teachers: Literal["final", "checkpoints"] = PDD_OPTIONS["stage_teachers"]
    union_in_batch: bool = PDD_OPTIONS["union_in_batch"]
    union_sample: int | None = PDD_OPTIONS["union_sample"]
    stage_init: Literal["base", "hard"] = PDD_OPTIONS["stage_init"]
    hard_student_epochs: int | None = PDD_OPTIONS["hard_student_epochs"]
    candidates: int = RDED_OPTIONS["candidates"]
    num_crop: int = RDED_OPTIONS["num_crop"]
    factor: int = RDED_OPTIONS["factor"]
    device: str = option("auto", help="auto, cpu, cuda, cuda:1, ...", identity=False)
    progress: bool = option(True, help="show progress bars", identity=False)
    keep_chunks: bool = option(
        False,
        help="keep the resume state after a finished recovery: OUT/chunks/ (pdd: every "
        "stages/<k>/chunks/ and the stage's own U_k set), a second float32 copy of the images; "
        "by default it is deleted once distilled.pt is written",
        identity=False,
    )

    def __post_init__(self) -> None:
        if self.method not in (*METHODS, PROGRESSIVE, RDED):
            raise ConfigError(
                f"--method {self.method!r}: unknown method; known: "
                f"{', '.join((*METHODS, PROGRESSIVE, RDED))}"
            )
        check_int_fields(self, ("ipc", "iterations", "batch_size"))
        check_pdd_options(self)
        check_rded_options(self)
        if self.method == RDED:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for name in LOOP_FIELDS:
                if getattr(self, name) != defaults[name]:
                    raise ConfigError(
                        f"{flag(name)} applies to the methods that optimize pixels; rded picks "
                        "real crops and optimizes nothing"
                    )
            return
        recipe = self.recipe
        for name in ("lr", "r_bn", "first_bn_multiplier"):
            value = getattr(self, name)
            check_float(flag(name), value)  # also through the API: float32's range
            if value < 0 or (name == "lr" and value == 0):
                raise ConfigError(f"{flag(name)} must be a finite number > 0, got {value}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{flag(name)} must be in [0, 1), got {getattr(self, name)}")
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
            check_int_fields(self, ("round_iterations",))
            round_iterations = self.round_iterations or DEFAULT_ROUND_ITERATIONS
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
        return pdd_base(self) if self.method == PROGRESSIVE else self.method

    @property
    def recipe(self) -> MethodRecipe | None:
        """The optimization recipe; None for rded, which optimizes nothing."""
        return None if self.method == RDED else METHODS[self.base_method]

    def identity(self) -> dict:
        """The fields that determine the results (``OUT/run.json``); pdd's only for pdd, rded's
        only for rded (and, for rded, none of the loop's)."""
        identity = identity_dict(self)
        dropped = [*LOOP_FIELDS] if self.method == RDED else [*RDED_FIELDS]
        if self.method != PROGRESSIVE:
            dropped += PDD_FIELDS
        for name in dropped:
            identity.pop(name, None)
        return identity

    def manifest_fields(self) -> dict:
        """The resolved fields the manifest records (:func:`delt.rded.recorded_fields`; rded's
        without pdd's either)."""
        fields = recorded_fields(self)
        if self.method == RDED:
            for name in PDD_FIELDS:
                fields.pop(name)
        return fields

    def resolved(self, info: DatasetInfo) -> RecoverConfig:
        """The config with every method default filled in (what the manifest records)."""
        recipe = self.recipe
        if recipe is None:
            return self  # rded: nothing to resolve
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
            resolved = dataclasses.replace(resolved, **resolve_pdd_options(self))
        return resolved


def recover(config: RecoverConfig) -> RecoverResult:
    """Runs (or resumes) a recovery; writes ``distilled.pt``, ``images/`` and ``manifest.json``.

    ``--method pdd`` is :func:`delt.pdd.recover_progressive`, ``--method rded``
    :func:`delt.rded.recover_rded`. Holds ``OUT/.lock`` throughout; removes the temporary files
    a killed run left; a finished run writes nothing.
    """
    with output_lock(config.out) as lock:
        lock.sweep()
        if config.method == PROGRESSIVE:
            return recover_progressive(config)
        if config.method == RDED:
            return recover_rded(config)
        return _recover(config)


def _recover(config: RecoverConfig) -> RecoverResult:
    run = prepare_run(config)
    config, info = run.config, run.info
    recipe = config.recipe

    selection: Selection | None = None
    if recipe.init == "selection":
        selection, dataset = load_selection(config, run.teacher, config.ipc)
        chosen = selection.indices

    def initial_images(chunk: Chunk, generator: torch.Generator) -> Tensor:
        if recipe.init == "noise":
            # Drawn on the CPU so that a chunk's start does not depend on the device.
            shape = (len(chunk), info.channels, info.resolution, info.resolution)
            return torch.randn(shape, generator=generator)
        # The first IPC picks of each class: a prefix of the selection order.
        pairs = zip(chunk.classes, chunk.within_class, strict=True)
        return dataset.images([chosen[c][j] for c, j in pairs])

    run.check_identity(selection is not None)
    chunk_dir = run.out / "chunks"
    # A finished run (its chunks deleted or not): its outputs are the result (same identity,
    # checked above), nothing to optimize or write again; a cleanup a kill cut short is finished.
    finished = finished_run(run, [chunk_dir])
    if finished is not None:
        return finished
    chunks = recipe.chunks(info.num_classes, config.ipc, config.batch_size)
    labels = torch.arange(info.num_classes).repeat_interleave(config.ipc)
    done = [chunk.index for chunk in chunks if (chunk_dir / f"{chunk.index:05d}.pt").is_file()]
    logger.info(
        "recover: %s, %d classes x %d images, %d chunks of <= %d (%d already done), %d iterations, "
        "device %s -> %s",
        config.method, info.num_classes, config.ipc, len(chunks), config.batch_size, len(done),
        config.iterations, run.device, run.out,
    )  # fmt: skip
    images, iterations_per_image, seconds = synthesize(
        run, run.teacher.model, chunks, config.ipc, config.round_iterations or config.iterations,
        chunk_dir, lambda chunk: derive_seed(config.seed, chunk.index), initial_images,
        desc=f"{config.method} chunks",
    )  # fmt: skip
    manifest = run.write_outputs(
        run.out, selection, images, labels, config.ipc, iterations_per_image, seconds
    )
    # One copy of the images: distilled.pt (written and fsynced above) replaces the chunks.
    delete_resume_state(run.out, [chunk_dir], config.keep_chunks)
    logger.info(
        "recover: %d images, %d image-iterations, %.1f s of synthesis -> %s",
        images.shape[0], manifest.image_iterations, seconds, run.out,
    )  # fmt: skip
    return RecoverResult(run.out, images, labels, iterations_per_image, seconds)
