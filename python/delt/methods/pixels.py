"""The pixel-optimizing methods: :class:`PixelMethod`, a preset of components
(:class:`delt.method.MethodRecipe`) that SRe2L, CDA and DELT are (:mod:`delt.methods.sre2l`,
``.cda``, ``.delt``) and PDD's stages run, and their plain recovery (:func:`recover_pixels`):
one set optimized chunk by chunk from noise or a selection."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from delt.chunk_groups import chunk_optimizer
from delt.config import ConfigError, check_int_fields, flag
from delt.data import DatasetInfo
from delt.matching import check_match, resolved_match
from delt.method import (
    DEFAULT_ROUND_ITERATIONS,
    Method,
    MethodRecipe,
    RecoverResult,
    SynthesisConfig,
)
from delt.runtime import derive_seed, logger
from delt.schedules import Chunk, class_contiguous_chunks
from delt.select import Selection
from delt.synthesis import (
    finished_run,
    load_selection,
    prepare_run,
)
from delt.teachers import check_teacher_options

__all__ = ["PixelMethod", "recover_pixels"]


class PixelMethod(Method):
    """A method that optimizes pixels against the teacher: a preset of components
    (:class:`MethodRecipe`); the run is :func:`delt.synthesis.recover_pixels`."""

    def __init__(self, name: str, preset: MethodRecipe) -> None:
        self.name = name  # type: ignore[misc]
        self.preset = preset

    def recipe(self, config: SynthesisConfig) -> MethodRecipe | None:
        if getattr(config, "match", "global") == "class":
            # Per-class matching needs several images of a class in a batch (WMDD's batches).
            return dataclasses.replace(self.preset, chunks=class_contiguous_chunks)
        return self.preset

    def starts_from_selection(self, config: object) -> bool:
        return self.recipe(config).init == "selection"  # type: ignore[arg-type,union-attr]

    def check(self, config: SynthesisConfig) -> None:
        self.check_loop(config, reads_data=False, label=self.name)

    def check_loop(self, config: SynthesisConfig, reads_data: bool, label: str) -> None:
        """The loop's flags; ``reads_data``: the method reads real images without a selection
        (``--data-root`` applies); ``label``: how messages name the method."""
        recipe = self.recipe(config)
        assert recipe is not None
        check_match(config)
        check_teacher_options(
            config, config.teacher, recipe.one_image_per_class, f"--method {label}"
        )
        for name in ("lr", "r_bn", "first_bn_multiplier"):
            value = getattr(config, name)
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise ConfigError(f"{flag(name)} must be a finite number > 0, got {value}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(config, name) < 1:
                raise ConfigError(f"{flag(name)} must be in [0, 1), got {getattr(config, name)}")
        check_int_fields(config, ("chunks_per_step",))
        if config.jitter is not None and config.jitter < 0:
            raise ConfigError(f"--jitter must be >= 0 pixels, got {config.jitter}")
        if recipe.init == "selection" and config.selection is None:
            raise ConfigError(f"--method {label} starts from real images: pass --selection DIR")
        if recipe.init != "selection":
            if config.selection is not None:
                raise ConfigError(
                    f"--selection applies to --method delt (real-image init); {label} starts "
                    "from noise"
                )
            if config.data_root is not None and not reads_data:
                raise ConfigError(
                    f"--data-root applies to --method delt (real-image init) and to pdd "
                    f"--stage-init hard; {label} starts from noise"
                )
        if not recipe.early_late and config.round_iterations is not None:
            raise ConfigError(f"--round-iterations applies to --method delt; {label} has no rounds")
        if recipe.early_late:
            check_int_fields(config, ("round_iterations",))
            round_iterations = config.round_iterations or DEFAULT_ROUND_ITERATIONS
            if round_iterations > config.iterations:
                raise ConfigError(
                    f"--round-iterations ({round_iterations}) must be <= --iterations "
                    f"({config.iterations})"
                )
            if config.iterations % round_iterations:
                raise ConfigError(
                    f"--iterations ({config.iterations}) must be a multiple of "
                    f"--round-iterations ({round_iterations})"
                )

    def resolved(self, config: SynthesisConfig, info: DatasetInfo) -> dict[str, Any]:
        return self.resolved_loop(config, info, single_image_rounds=True)

    def resolved_loop(
        self, config: SynthesisConfig, info: DatasetInfo, single_image_rounds: bool
    ) -> dict[str, Any]:
        """RI and the jitter resolved; ``single_image_rounds``: at IPC 1 the single image per
        class gets all iterations (no EarlyLate, as DELT's scripts)."""
        recipe = self.recipe(config)
        assert recipe is not None
        round_iterations = None
        if recipe.early_late:
            round_iterations = (
                config.iterations
                if config.ipc == 1 and single_image_rounds
                else config.round_iterations or DEFAULT_ROUND_ITERATIONS
            )
        jitter = recipe.default_jitter(info.resolution) if config.jitter is None else config.jitter
        return {"round_iterations": round_iterations, "jitter": jitter, **resolved_match(config)}

    def recover(self, config: SynthesisConfig) -> RecoverResult:
        return recover_pixels(config)


def recover_pixels(config: SynthesisConfig) -> RecoverResult:
    """Runs (or resumes) a recovery of a :class:`PixelMethod`: one set, chunk by chunk."""
    run = prepare_run(config)
    config, info = run.config, run.info
    recipe = config.recipe
    assert recipe is not None
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
    # A finished run (or one whose chunks were deleted): its outputs are the result (same
    # identity, checked above), nothing to optimize or write again.
    store = run.chunk_store(run.out / "chunks", config.ipc)
    # (a cleanup a kill cut short is finished by finished_run)
    finished = finished_run(run, [store.folder])
    if finished is not None:
        return finished
    chunks = recipe.chunks(info.num_classes, config.ipc, config.batch_size)
    labels = torch.arange(info.num_classes).repeat_interleave(config.ipc)
    done = [chunk.index for chunk in chunks if store.path(chunk).is_file()]
    logger.info(
        "recover: %s, %d classes x %d images, %d chunks of <= %d (%d already done), %d iterations, "
        "device %s -> %s",
        config.method, info.num_classes, config.ipc, len(chunks), config.batch_size, len(done),
        config.iterations, run.device, run.out,
    )  # fmt: skip
    with chunk_optimizer(run, run.teacher.model) as optimizer:
        images, iterations_per_image, seconds = optimizer.optimize_set(
            store, chunks, config.round_iterations or config.iterations,
            lambda chunk: derive_seed(config.seed, chunk.index), initial_images,
            desc=f"{config.method} chunks",
        )  # fmt: skip
    # One copy of the images: distilled.pt replaces the chunks.
    return run.finish(
        selection, images, labels, iterations_per_image, seconds, [store.folder], "synthesis"
    )
