"""``delt recover --method pdd``: progressive synthesis (PDD, Chen et al., ICLR 2024;
docs/methods.md): P stages of a base method, earlier stages frozen bitwise, optionally
conditioned on per-stage teachers, the union in the batch or hard real initial images. Outputs:
U_P as a distilled set in ``OUT``, and ``OUT/stages/<k>/`` (the stage's new images, ``init.json``,
and while the run is unfinished, or with ``--keep-chunks``, ``chunks/`` and U_k as a set of its
own; U_k is the prefix of U_P that :func:`delt.distilled_set.load_stage_unions` reads). Chunks are
seeded from ``(seed, stage, chunk)``: resumes are exact.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from delt.batches import iterate_batches
from delt.chunk_groups import chunk_optimizer
from delt.config import ConfigError, check_int, option
from delt.data import DatasetInfo, ImageDataset, load_like
from delt.distilled_set import save_images, union_prefix
from delt.distributed import is_main, main_first
from delt.identity import check_or_reuse
from delt.io import read_json, sha256_file, write_json
from delt.method import Method, MethodRecipe, RecoverResult, SynthesisConfig, methods, register
from delt.methods import cda, delt, sre2l  # noqa: F401 (the bases, registered before pdd)
from delt.methods.pixels import PixelMethod
from delt.models import (
    Checkpoint,
    TeacherMismatchError,
    build_model,
    check_compatible,
    load_checkpoint,
)
from delt.runtime import autocast, derive_seed, logger
from delt.schedules import Chunk, stage_offsets, stage_round_iterations, stage_sizes
from delt.select import Selection, order_class
from delt.stagewise_training import stagewise_plan, train_stagewise
from delt.student_augment import StudentAugment
from delt.student_trainer import PROTOCOL, StudentTrainer, TrainSettings, default_batch_size, seeded
from delt.synthesis import (
    Run,
    delete_resume_state,
    finished_run,
    load_selection,
    prepare_run,
)
from delt.teacher import saved_checkpoints

__all__ = [
    "PDD",
    "NAME",
    "PddOptions",
    "Progressive",
    "Stage",
    "StageInit",
    "pick_hard_examples",
    "plan_stages",
    "recover_progressive",
    "stage_checkpoints",
]

NAME = "pdd"
DEFAULT_STAGES = 5  # PDD's released scripts
DEFAULT_BASE = "delt"
DEFAULT_HARD_STUDENT_EPOCHS = 100
_BASES = tuple(methods(optimizes=True, recovers=True))  # the pixel methods registered before pdd


@dataclass(kw_only=True)
class PddOptions:
    """The flags of ``delt recover`` (and ``delt distill``) that only ``--method pdd`` reads."""

    stages: int | None = option(
        None, help=f"pdd: number of stages P (default {DEFAULT_STAGES})", group=NAME
    )
    base: str | None = option(
        None, help=f"pdd: the method each stage runs (default {DEFAULT_BASE})", choices=_BASES,
        group=NAME,
    )  # fmt: skip
    stage_ipc: tuple[int, ...] | None = option(
        None,
        help="pdd: images per class of each stage, e.g. 4,2,2,1,1 (default: IPC/P each)",
        group=NAME,
    )
    stage_teachers: Literal["final", "checkpoints"] = option(
        "final",
        help="pdd: every stage matches the final teacher, or stage k the k-th of P checkpoints "
        "of `delt teacher --save-epochs` (early phase first)",
        group=NAME,
    )
    union_in_batch: bool = option(
        False,
        help="pdd: earlier stages' images of the chunk's classes join every forward pass (BN "
        "statistics of the union; gradients reach the new images only)",
        group=NAME,
    )
    union_sample: int | None = option(
        None,
        help="pdd --union-in-batch: a random sample of this many earlier images per step",
        group=NAME,
    )
    stage_init: Literal["base", "hard"] = option(
        "base",
        help="pdd: stage k >= 2 starts from the base method's init, or from real images that a "
        "student trained on the union so far gets wrong",
        group=NAME,
    )
    hard_student_epochs: int | None = option(
        None,
        help=f"pdd --stage-init hard: epochs of that student (default "
        f"{DEFAULT_HARD_STUDENT_EPOCHS})",
        group=NAME,
    )

    @property
    def stage_count(self) -> int:
        return DEFAULT_STAGES if self.stages is None else self.stages


class Progressive(Method):
    """PDD (Chen et al., ICLR 2024): P stages of a pixel method (``--base``), earlier stages
    frozen; its own flags are :class:`PddOptions`."""

    name = NAME
    options = PddOptions

    def base(self, config: object) -> PixelMethod:
        """The pixel method every stage runs."""
        base = methods()[getattr(config, "base", None) or DEFAULT_BASE]
        assert isinstance(base, PixelMethod)
        return base

    def recipe(self, config: SynthesisConfig) -> MethodRecipe | None:
        """The base method's components, with progressive stages as the schedule."""
        base = self.base(config).recipe(config)
        return None if base is None else dataclasses.replace(base, stages=True)

    def label(self, config: object) -> str:
        return f"pdd --base {self.base(config).name}"

    def starts_from_selection(self, config: object) -> bool:
        return self.base(config).starts_from_selection(config)

    def reads_training_set(self, config: object) -> bool:
        # --stage-init hard reads the training set too, whatever its base.
        return self.starts_from_selection(config) or getattr(config, "stage_init", "") == "hard"

    def check_options(self, options: PddOptions, ipc: int) -> None:
        if options.base is not None and options.base not in _BASES:
            raise ConfigError(
                f"--base {options.base!r}: unknown method; known: {', '.join(_BASES)}"
            )
        stages = options.stage_count
        check_int("--stages", stages)
        if stages > ipc:
            raise ConfigError(
                f"--stages {stages} must be <= --ipc {ipc}: every stage synthesizes at least one "
                "image per class"
            )
        if options.stage_ipc is not None:
            options.stage_ipc = sizes = tuple(options.stage_ipc)
            shown = ",".join(map(str, sizes))
            if len(sizes) != stages:
                raise ConfigError(
                    f"--stage-ipc {shown}: one size per stage expected ({stages} for "
                    f"--stages {stages}), got {len(sizes)}"
                )
            if min(sizes) < 1:
                raise ConfigError(f"--stage-ipc {shown}: every stage needs >= 1 image")
            if sum(sizes) != ipc:
                raise ConfigError(f"--stage-ipc {shown} must sum to --ipc {ipc}, got {sum(sizes)}")
        if options.union_sample is not None:
            if not options.union_in_batch:
                raise ConfigError("--union-sample applies with --union-in-batch")
            check_int("--union-sample", options.union_sample)
        if options.hard_student_epochs is not None:
            if options.stage_init != "hard":
                raise ConfigError("--hard-student-epochs applies with --stage-init hard")
            check_int(
                "--hard-student-epochs (an epoch per earlier stage at least)",
                options.hard_student_epochs,
                max(1, stages - 1),
            )

    def check(self, config: SynthesisConfig) -> None:
        options = self.options_of(config)
        if getattr(config, "match", "global") != "global":
            # The union's images have no labels in the batch; a stage teacher is not the one
            # whose statistics --stats holds.
            if options.union_in_batch:
                raise ConfigError(f"--match {config.match} does not apply with --union-in-batch")
            if options.stage_teachers == "checkpoints":
                raise ConfigError(
                    f"--match {config.match} does not apply with --stage-teachers checkpoints "
                    "(--stats holds the final teacher's statistics)"
                )
        self.base(config).check_loop(
            config, reads_data=self.reads_training_set(config), label=self.label(config)
        )

    def resolved(self, config: SynthesisConfig, info: DatasetInfo) -> dict[str, Any]:
        # RI is decided per stage (schedules.stage_round_iterations).
        options = self.options_of(config)
        stages = options.stage_count
        hard = options.stage_init == "hard"
        return {
            **self.base(config).resolved_loop(config, info, single_image_rounds=False),
            "stages": stages,
            "base": self.base(config).name,
            "stage_ipc": tuple(stage_sizes(config.ipc, stages, options.stage_ipc)),
            "hard_student_epochs": (options.hard_student_epochs or DEFAULT_HARD_STUDENT_EPOCHS)
            if hard
            else None,
        }

    def check_teacher(self, config: SynthesisConfig, teacher_path: str) -> None:
        # A teacher without its P checkpoints is refused before selection and synthesis.
        options = self.options_of(config)
        if options.stage_teachers == "checkpoints":
            stage_checkpoints(options, teacher_path)

    def recover(self, config: SynthesisConfig) -> RecoverResult:
        return recover_progressive(config)


# --------------------------------------------------------------------------------------------
# Stages


@dataclass(frozen=True)
class Stage:
    """One stage of a progressive recovery.

    Attributes:
        index: 1-based stage number k.
        ipc: images per class this stage synthesizes (IPC_k).
        offset: within-class position of its first image in the union (sum of earlier IPC_j).
        round_iterations: DELT's RI inside the stage (``iterations`` when it has no rounds).
    """

    index: int
    ipc: int
    offset: int
    round_iterations: int

    @property
    def union_ipc(self) -> int:
        """Images per class of the union U_k after this stage."""
        return self.offset + self.ipc


def plan_stages(sizes: list[int], iterations: int, round_iterations: int | None) -> list[Stage]:
    """The stages of a run: sizes, offsets and per-stage RI (``None``: the base has no rounds)."""
    return [
        Stage(
            index=k + 1,
            ipc=size,
            offset=offset,
            round_iterations=iterations
            if round_iterations is None
            else stage_round_iterations(size, iterations, round_iterations),
        )
        for k, (size, offset) in enumerate(zip(sizes, stage_offsets(sizes), strict=True))
    ]


# --------------------------------------------------------------------------------------------
# Conditioning: stage teachers and hard initial images


def stage_checkpoints(options: PddOptions, teacher_path: str | Path) -> list[dict]:
    """The P checkpoints of ``--stage-teachers checkpoints`` beside a teacher, early phase first
    (:func:`delt.teacher.saved_checkpoints` entries), checked without loading them: exactly P
    listed, every file present.

    Raises:
        ConfigError: the teacher has no or another number of checkpoints, or one is missing.
    """
    stages = options.stage_count
    entries = saved_checkpoints(teacher_path)
    epochs = [entry["epoch"] for entry in entries]
    how = (
        f"train the teacher with `delt teacher --save-epochs e1,...,e{stages}` ({stages} "
        "increasing epochs, early phase first)"
    )
    if len(entries) != stages:
        raise ConfigError(
            f"--stage-teachers checkpoints: --stages {stages} needs {stages} teacher "
            f"checkpoints, but {teacher_path} has {len(entries)}"
            f"{f' (epochs {epochs})' if entries else ''}; {how}"
        )
    for entry in entries:
        if not entry["path"].is_file():
            raise ConfigError(
                f"--stage-teachers checkpoints: {entry['path']} (epoch {entry['epoch']}) is "
                f"missing; {how}"
            )
    return entries


def _stage_teachers(options: PddOptions, teacher: Checkpoint) -> list[Checkpoint]:
    """The teacher of every stage: the final one P times, or the P ``--save-epochs`` checkpoints.

    Raises:
        ConfigError: the teacher has no or another number of checkpoints.
        TeacherMismatchError: a checkpoint is of another architecture or dataset.
    """
    if options.stage_teachers == "final":
        return [teacher] * options.stage_count
    checkpoints = []
    for entry in stage_checkpoints(options, teacher.path):
        checkpoint = load_checkpoint(entry["path"])
        same_model = (checkpoint.meta["arch"], checkpoint.meta["arch_kwargs"]) == (
            teacher.meta["arch"],
            teacher.meta["arch_kwargs"],
        )
        try:
            check_compatible(checkpoint.meta, teacher.info, what="checkpoint")
        except TeacherMismatchError as error:
            raise TeacherMismatchError(
                f"--stage-teachers checkpoints: {entry['path']}: {error}"
            ) from None
        if not same_model:
            raise TeacherMismatchError(
                f"--stage-teachers checkpoints: {entry['path']} is a {checkpoint.meta['arch']} "
                f"{checkpoint.meta['arch_kwargs']}, the teacher a {teacher.meta['arch']} "
                f"{teacher.meta['arch_kwargs']}"
            )
        checkpoints.append(checkpoint)
    return checkpoints


def pick_hard_examples(
    labels: Tensor,
    teacher_probability: Tensor,
    teacher_correct: Tensor,
    student_probability: Tensor,
    student_correct: Tensor,
    counts: int,
    used: set[int],
) -> tuple[list[list[int]], dict[str, int]]:
    """Real images a student gets wrong: the initial images of a ``--stage-init hard`` stage.

    Per class, candidates (training-set indices not in ``used``) are taken in three tiers:

    1. the student is wrong and the teacher right (the "medium" pick of CUDD, Ma et al.,
       arXiv 2405.09150; github.com/MIV-XJTU/CUDD): examples the union so far has not taught,
       on which the teacher still carries a clean signal;
    2. both are wrong (only when tier 1 runs out);
    3. the student is right, least confident first (only when tiers 1-2 run out).

    Inside tiers 1 and 2 the order is DELT's ``medium`` order of the teacher's probability of the
    true class (:func:`delt.select.order_class`), the base selection rule; tier 3 is ordered by
    the student's probability, ascending.

    Args:
        labels: (N,) int64 labels of the training set.
        teacher_probability, student_probability: (N,) float, probability of the true class.
        teacher_correct, student_correct: (N,) bool, top-1 correct.
        counts: images to pick per class.
        used: indices never to pick (earlier stages' initial images).

    Returns:
        ``(picks, tiers)``: ``picks[c]`` the chosen indices of class c in order, and how many
        picks came from each tier over all classes.
    """
    num_classes = int(labels.max()) + 1
    used_mask = torch.zeros(labels.numel(), dtype=torch.bool)
    if used:
        used_mask[torch.tensor(sorted(used), dtype=torch.int64)] = True
    picks: list[list[int]] = []
    tiers = {"student_wrong_teacher_right": 0, "both_wrong": 0, "student_right": 0}
    for c in range(num_classes):
        available = (labels == c) & ~used_mask
        chosen: list[int] = []
        for tier, mask in (
            ("student_wrong_teacher_right", ~student_correct & teacher_correct),
            ("both_wrong", ~student_correct & ~teacher_correct),
            ("student_right", student_correct),
        ):
            if len(chosen) == counts:
                break
            members = torch.nonzero(available & mask).view(-1)
            if members.numel() == 0:
                continue
            if tier == "student_right":
                order = torch.sort(student_probability[members], stable=True).indices.tolist()
            else:
                order = order_class(teacher_probability[members], "medium")
            taken = members[order[: counts - len(chosen)]].tolist()
            chosen += taken
            tiers[tier] += len(taken)
        if len(chosen) < counts:
            raise ConfigError(
                f"--stage-init hard: class {c} has only {len(chosen)} unused training images, "
                f"{counts} needed"
            )
        picks.append(chosen)
    return picks, tiers


@torch.no_grad()
def _true_class_scores(
    model: nn.Module, dataset: ImageDataset, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``(probability of the true class (N,) float32, top-1 correct (N,) bool)`` on the CPU.

    Scores a private channels_last copy under bf16 autocast: about 3x faster on a CPU, and a
    ranking needs no full precision. The copy leaves ``model`` as it was, so a stage teacher
    does not depend on whether this process scored (a resumed run may not).
    """
    model = copy.deepcopy(model).to(device).to(memory_format=torch.channels_last).eval()
    probabilities, correct = [], []
    for images, labels in iterate_batches(dataset, 1000):
        images = images.to(device).contiguous(memory_format=torch.channels_last)
        with autocast(device, "bf16"):
            logits = model(images).float().cpu()
        probabilities.append(logits.softmax(1).gather(1, labels.view(-1, 1)).view(-1))
        correct.append(logits.argmax(1) == labels)
    return torch.cat(probabilities), torch.cat(correct)


def _train_hard_student(
    unions: list[tuple[Tensor, Tensor]],
    teacher: Checkpoint,
    ipc: int,
    epochs: int,
    seed: int,
    device: torch.device,
    amp: str,
    channels_last: bool,
) -> nn.Module:
    """The student of ``--stage-init hard``: ``delt eval --stagewise``'s student on U_1 … U_{k-1}.

    The evaluation protocol's defaults (:data:`delt.student_trainer.PROTOCOL`), the batch size
    of an IPC ``ipc`` set, ``epochs`` split across the unions with the LR schedule restarted per
    stage (:func:`delt.stagewise_training.train_stagewise`): the images a stage starts from are
    what a stage-wise evaluation's student has not learned yet.
    """
    info = teacher.info
    sizes = [len(images) for images, _ in unions]
    settings = TrainSettings(
        batch_size=default_batch_size(ipc, info.num_classes, sizes[-1]),
        temperature=PROTOCOL.temperature, cutmix_beta=PROTOCOL.cutmix_beta, amp=amp,
        channels_last=channels_last,
    )  # fmt: skip
    plan = stagewise_plan(epochs, sizes, settings.batch_size)
    with seeded(seed):
        student = build_model(teacher.meta["arch"], info, teacher.meta["arch_kwargs"])
        generator = torch.Generator().manual_seed(seed)
        augment = StudentAugment(
            info, PROTOCOL.randaugment_ops, PROTOCOL.randaugment_magnitude, PROTOCOL.min_crop,
            generator,
        )  # fmt: skip
        # The trainer only calls the teacher (no_grad): its mode and memory format stay as the
        # stage loop left them.
        trainer = StudentTrainer(
            student, teacher.model.to(device), augment, settings, epochs, PROTOCOL.lr,
            PROTOCOL.weight_decay, device, generator, data_parallel=False,  # rank 0 alone
        )  # fmt: skip
        unions = [(images.to(device), labels.to(device)) for images, labels in unions]
        train_stagewise(trainer, unions, plan, "restart")
    return trainer.student.eval()


# --------------------------------------------------------------------------------------------
# A run: per stage, its start (init), its frozen union, its chunks


@dataclass
class StageInit:
    """How a stage's images start: ``kind`` ``"noise"``, ``"selection"`` or ``"hard"``, with
    ``picks[c]`` the training-set indices of class c (stage-local order) for real-image inits,
    ``info`` for the manifest and ``student_seconds`` spent on the hard-init student."""

    kind: str
    picks: list[list[int]] | None
    info: dict
    student_seconds: float = 0.0


@dataclass
class _Union:
    """The union being built: U_P's images (class-major, IPC per class) and bookkeeping."""

    images: Tensor
    labels: Tensor
    iterations_per_image: list[int]
    stage_per_image: list[int]
    entries: list[dict]
    used: set[int]
    synthesis_seconds: float = 0.0

    def prefix(self, ipc: int, length: int) -> tuple[Tensor, Tensor]:
        return union_prefix(self.images, ipc, length), union_prefix(self.labels, ipc, length)


def _stage_init(
    run: Run,
    stage: Stage,
    stages: list[Stage],
    selection: Selection | None,
    dataset: ImageDataset | None,
    union: _Union,
    stage_dir: Path,
    teacher_scores: Callable[[], tuple[Tensor, Tensor]],
) -> StageInit:
    """Step 1 of a stage: its initial images (hard picks are saved before the stage runs)."""
    config, hard = run.config, PDD.options_of(run.config).stage_init == "hard"
    if config.recipe.init == "selection" and (stage.index == 1 or not hard):
        picks = [chosen[stage.offset : stage.offset + stage.ipc] for chosen in selection.indices]
        return StageInit("selection", picks, {"kind": "selection"})
    if stage.index == 1 or not hard:
        return StageInit("noise", None, {"kind": "noise"})
    init_path = stage_dir / "init.json"
    identity = {**(run.identity or {}), "stage": stage.index}
    # Under torchrun rank 0 trains the student and writes the picks; the others read them.
    with main_first():
        if is_main() and not init_path.is_file():
            _pick_hard(run, stage, stages, dataset, union, init_path, teacher_scores, identity)
    check_or_reuse(
        init_path, identity, run.defaults, key="identity",
        refuse=f"{init_path} was made by another run; it is not used for this one: delete it "
        "to recompute it, or choose another --out",
    )  # fmt: skip
    saved = read_json(init_path)
    info = saved["info"]
    return StageInit("hard", saved["picks"], info, float(info.get("student_seconds", 0.0)))


def _pick_hard(
    run: Run,
    stage: Stage,
    stages: list[Stage],
    dataset: ImageDataset | None,
    union: _Union,
    init_path: Path,
    teacher_scores: Callable[[], tuple[Tensor, Tensor]],
    identity: dict,
) -> None:
    """``--stage-init hard``: trains the student on the earlier unions, writes its picks."""
    config, epochs = run.config, PDD.options_of(run.config).hard_student_epochs
    assert epochs is not None  # resolved
    scores = teacher_scores()
    start = time.perf_counter()
    ipc = config.ipc
    unions = [union.prefix(ipc, earlier.union_ipc) for earlier in stages[: stage.index - 1]]
    # The final teacher labels the student's batches, as in every evaluation.
    student = _train_hard_student(
        unions, run.teacher, ipc, epochs,
        derive_seed(config.seed, 0, stage.index), run.device, config.amp, config.channels_last,
    )  # fmt: skip
    student_scores = _true_class_scores(student, dataset, run.device)
    picks, tiers = pick_hard_examples(
        dataset.targets, scores[0], scores[1], student_scores[0], student_scores[1], stage.ipc,
        union.used,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    accuracy = 100.0 * float(student_scores[1].float().mean())
    info = {
        "kind": "hard",
        "tiers": tiers,
        "student_train_accuracy": accuracy,
        "student_epochs": epochs,
        "student_seconds": seconds,
    }
    write_json(init_path, {"picks": picks, "info": info, "identity": identity})
    logger.info(
        "recover: stage %d init: student on U_%d is %.1f%% right on the training set; picks %s "
        "(%.0f s)",
        stage.index, stage.index - 1, accuracy, tiers, seconds,
    )  # fmt: skip


def _frozen_union(run: Run, stage: Stage, union: _Union):
    """Step 2: with ``--union-in-batch``, ``chunk -> earlier images of its classes``, else None."""
    if not (PDD.options_of(run.config).union_in_batch and stage.offset > 0):
        return None
    earlier = union_prefix(union.images, run.config.ipc, stage.offset).to(run.device)
    offset = stage.offset

    def frozen_images(chunk: Chunk) -> Tensor:
        # Every earlier image of the chunk's classes, class-major.
        classes = list(dict.fromkeys(chunk.classes))
        rows = torch.cat([torch.arange(c * offset, (c + 1) * offset) for c in classes])
        return earlier.index_select(0, rows.to(earlier.device))

    return frozen_images


def _synthesize_stage(
    run: Run,
    stage: Stage,
    stage_teacher: Checkpoint,
    init: StageInit,
    dataset: ImageDataset | None,
    union: _Union,
    stage_dir: Path,
    total_stages: int,
) -> tuple[Tensor, list[int], float]:
    """Step 3: the stage's chunks against its teacher; ``(images, iterations, seconds)``."""
    config, info = run.config, run.info
    shape = (info.channels, info.resolution, info.resolution)

    def initial_images(chunk: Chunk, generator: torch.Generator) -> Tensor:
        if init.picks is None:
            # Drawn on the CPU so that a chunk's start does not depend on the device.
            return torch.randn((len(chunk), *shape), generator=generator)
        pairs = zip(chunk.classes, chunk.within_class, strict=True)
        return dataset.images([init.picks[c][j] for c, j in pairs])

    chunks = config.recipe.chunks(info.num_classes, stage.ipc, config.batch_size)
    # What else makes this stage's chunks: its teacher and its initial images.
    picks = json.dumps(init.picks).encode()
    store = run.chunk_store(
        stage_dir / "chunks", stage.ipc,
        stage={
            "index": stage.index, "teacher_sha256": sha256_file(stage_teacher.path),
            "init": init.kind, "picks_sha256": hashlib.sha256(picks).hexdigest(),
        },
    )  # fmt: skip
    with chunk_optimizer(run, stage_teacher.model) as optimizer:
        return optimizer.optimize_set(
            store, chunks, stage.round_iterations,
            lambda chunk: derive_seed(config.seed, stage.index, chunk.index), initial_images,
            frozen_images=_frozen_union(run, stage, union),
            frozen_sample=PDD.options_of(config).union_sample,
            desc=f"pdd stage {stage.index}/{total_stages}",
        )  # fmt: skip


def _add_stage(
    union: _Union,
    stage: Stage,
    stage_teacher: Checkpoint,
    init: StageInit,
    images: Tensor,
    iterations: list[int],
    seconds: float,
    config: SynthesisConfig,
) -> None:
    """Step 4: class c's stage images into the union at ``c * IPC + offset + j``."""
    ipc, num_classes = config.ipc, union.images.shape[0] // config.ipc
    union_in_batch = PDD.options_of(config).union_in_batch
    positions = [c * ipc + stage.offset + j for c in range(num_classes) for j in range(stage.ipc)]
    union.images[torch.tensor(positions)] = images
    for position, count in zip(positions, iterations, strict=True):
        union.iterations_per_image[position] = count
        union.stage_per_image[position] = stage.index
    if init.picks is not None:
        union.used.update(index for chosen in init.picks for index in chosen)
    union.synthesis_seconds += seconds + init.student_seconds
    union.entries.append(
        {
            "stage": stage.index, "ipc": stage.ipc, "offset": stage.offset,
            "union_ipc": stage.union_ipc, "round_iterations": stage.round_iterations,
            "teacher": {
                "path": str(stage_teacher.path),
                "epoch": stage_teacher.meta.get("epoch", stage_teacher.meta.get("epochs")),
            },
            "init": init.info, "union_in_batch": union_in_batch and stage.offset > 0,
            "image_iterations": int(sum(iterations)), "synthesis_seconds": seconds,
            "student_seconds": init.student_seconds,
        }
    )  # fmt: skip


def _write_union(
    run: Run, folder: Path, selection: Selection | None, union: _Union, length: int, images: bool
) -> None:
    """U_k (the first ``length`` images per class) as a distilled set in ``folder``."""
    ipc, num_classes = run.config.ipc, run.info.num_classes
    keep = [c * ipc + j for c in range(num_classes) for j in range(length)]
    union_images, union_labels = union.prefix(ipc, length)
    run.write_outputs(
        folder, selection, union_images, union_labels, length,
        [union.iterations_per_image[p] for p in keep], union.synthesis_seconds,
        write_images=images, stage=union.entries[-1]["stage"], stages=list(union.entries),
        stage_per_image=[union.stage_per_image[p] for p in keep],
    )  # fmt: skip


def _real_images(run: Run, stages: list[Stage]) -> tuple[Selection | None, ImageDataset | None]:
    """The selection and training set the stages start from, if any."""
    config, hard = run.config, PDD.options_of(run.config).stage_init == "hard"
    if config.recipe.init == "selection":
        # Usual init consumes the selection across stages; hard init only reads stage 1 from it.
        needed = stages[0].ipc if hard else config.ipc
        return load_selection(config, run.teacher, needed)
    if hard and len(stages) > 1:
        dataset = load_like(run.info, "train", config.data_root)
        # The run's data identity is the teacher's training split: the picks must come from it.
        check_compatible(run.teacher.meta, dataset.info, fingerprint=dataset.fingerprint())
        return None, dataset
    return None, None


def recover_progressive(config: SynthesisConfig) -> RecoverResult:
    """Runs (or resumes) ``delt recover --method pdd`` for a ``RecoverConfig``."""
    run = prepare_run(config)
    config, info = run.config, run.info
    options = PDD.options_of(config)
    assert options.stage_ipc is not None  # resolved
    stages = plan_stages(
        list(options.stage_ipc),
        config.iterations,
        config.round_iterations if config.recipe.early_late else None,
    )
    teachers = _stage_teachers(options, run.teacher)
    selection, dataset = _real_images(run, stages)
    run.check_identity(
        selection is not None,
        stage_teachers_sha256=None
        if options.stage_teachers == "final"
        else [sha256_file(checkpoint.path) for checkpoint in teachers],
    )
    # DIR/distilled.pt holds every U_k as a prefix: the chunks and the stages' float32 unions
    # are resume state, deleted once it is written (also by a re-run, after a kill).
    stage_dirs = [run.out / "stages" / str(stage.index) for stage in stages]
    resume_state = [
        d / name for d in stage_dirs for name in ("chunks", "distilled.pt", "manifest.json")
    ]
    finished = finished_run(run, resume_state)
    if finished is not None:
        return finished
    ipc = config.ipc
    count = info.num_classes * ipc
    union = _Union(
        torch.zeros(count, info.channels, info.resolution, info.resolution),
        torch.arange(info.num_classes).repeat_interleave(ipc), [0] * count, [0] * count, [], set(),
    )  # fmt: skip
    # The final teacher's scores of the training set, computed once, at the first hard stage.
    teacher_scores = functools.cache(
        lambda: _true_class_scores(run.teacher.model, dataset, run.device)
    )
    logger.info(
        "recover: pdd over %s, %d stages of %s images per class, %d iterations each, "
        "stage teachers %s, union in batch %s, stage init %s, device %s -> %s",
        options.base, len(stages), ",".join(map(str, options.stage_ipc)), config.iterations,
        options.stage_teachers,
        f"yes (sample {options.union_sample or 'all'})" if options.union_in_batch else "no",
        options.stage_init, run.device, run.out,
    )  # fmt: skip
    for stage, stage_teacher in zip(stages, teachers, strict=True):
        stage_dir = run.out / "stages" / str(stage.index)
        init = _stage_init(run, stage, stages, selection, dataset, union, stage_dir, teacher_scores)
        images, iterations, seconds = _synthesize_stage(
            run, stage, stage_teacher, init, dataset, union, stage_dir, len(stages)
        )
        _add_stage(union, stage, stage_teacher, init, images, iterations, seconds, config)
        # stages/<k>/: the stage's new images, and U_k as a distilled set of its own.
        length = stage.union_ipc
        union_images, union_labels = union.prefix(ipc, length)
        new = [c * length + j for c in range(info.num_classes) for j in range(stage.offset, length)]
        if is_main():
            save_images(
                stage_dir / "images", union_images, union_labels, length, info,
                config.image_format, positions=new,
            )  # fmt: skip
        _write_union(run, stage_dir, selection, union, length, images=False)
        logger.info(
            "recover: stage %d/%d done: %d new images per class, %d image-iterations",
            stage.index, len(stages), stage.ipc, union.entries[-1]["image_iterations"],
        )  # fmt: skip
    _write_union(run, run.out, selection, union, ipc, images=True)
    # DIR/distilled.pt (written and fsynced above) holds every U_k as a prefix: the chunks and
    # the stages' float32 unions go, so that one copy of the images stays.
    delete_resume_state(run.out, resume_state, config.keep_chunks)
    return RecoverResult(
        run.out, union.images, union.labels, union.iterations_per_image, union.synthesis_seconds
    )


PDD = register(Progressive())
