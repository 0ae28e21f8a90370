"""``delt recover --method pdd``: progressive synthesis (PDD) on BN-statistic matching.

PDD (reference/pdd.md §1) synthesizes the IPC images of a class in P stages. Stage k adds IPC_k
new images per class (:func:`delt.schedules.stage_sizes`) with the recipe of a base method
(``--base delt|cda|sre2l``: its init, batching, crop curriculum, jitter, and for delt its
EarlyLate rounds inside the stage). The images of earlier stages are frozen: they are never
optimized and stay bitwise unchanged. The stages differ by what they are conditioned on, three
options taken from pdd.md §4.2 that can be combined:

* ``--stage-teachers checkpoints`` (§4.2 option 1, PDD+MTT's later trajectory segments): stage k
  matches the BN statistics and class scores of the k-th of P checkpoints that ``delt teacher
  --save-epochs`` saved, early phase first. ``final``: every stage matches the final teacher.
* ``--union-in-batch`` (option 2, PDD's masked union): the frozen images of earlier stages for
  the chunk's classes join every forward pass (``--union-sample N``: a fresh seeded random N of
  them per step, as PDD+MTT minibatches its union). They are concatenated after the new images
  before augmentation, so every BN layer's batch statistics are the union's; gradients reach the
  new images only, and the cross-entropy covers the new images only (see
  :func:`delt.recover.optimize_chunk`).
* ``--stage-init hard`` (options 3/4, PDD's discarding of easy examples): stage k >= 2 starts from
  real training images that a student trained stage-wise on U_1 … U_{k-1} gets wrong
  (:func:`pick_hard_examples`). Otherwise a stage starts like its base method: noise, or for
  delt the next IPC_k entries of the ``delt select`` order of each class (consumed in order
  across stages, never reused).

Evaluation (``delt eval --stagewise``) trains one student on U_1, then U_1 ∪ U_2, …; its soft
labels always come from the final teacher.

Outputs in ``--out DIR``:

* ``DIR/distilled.pt``, ``DIR/images/``, ``DIR/manifest.json``: the union U_P, class-major and,
  inside a class, in stage order (class c's stage-k images at ``c * IPC + offset_k + j``). The
  manifest holds ``stage_per_image``, ``iterations_per_image``, ``image_iterations`` and one entry
  per stage (size, teacher, init, image-iterations, seconds).
* ``DIR/stages/<k>/``: ``images/`` (that stage's new images only), ``distilled.pt`` and
  ``manifest.json`` of the union U_k (a distilled set of its own: ``delt eval --distilled
  DIR/stages/3`` evaluates U_3), ``chunks/`` (the resume units) and, with ``--stage-init hard``,
  ``init.json`` (the real images picked, saved before the stage starts).

Resume: every chunk of every stage is saved when done and seeded from ``(seed, stage, chunk)``;
the hard picks are saved before their stage runs. Re-running the same command after a kill at
any point redoes only the unfinished work and ends with the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import delt_ext
from delt.config import ConfigError
from delt.data import DatasetInfo, ImageDataset, load_like
from delt.io import read_json, sha256_file, torch_load, torch_save, write_json
from delt.models import Checkpoint, TeacherMismatchError, check_compatible, load_checkpoint
from delt.recover import (
    RecoverConfig,
    RecoverResult,
    _check_run_identity,
    frozen_teacher,
    load_selection,
    manifest_fields,
    recovery_settings,
    save_images,
    synthesize_chunks,
)
from delt.runtime import autocast, derive_seed, logger, resolve_device
from delt.schedules import Chunk, stage_offsets, stage_round_iterations
from delt.select import Selection, order_class
from delt.teacher import iterate_batches, saved_checkpoints

__all__ = [
    "Stage",
    "load_stage_unions",
    "pick_hard_examples",
    "plan_stages",
    "recover_progressive",
    "union_prefix",
]


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


def union_prefix(images: Tensor, ipc: int, length: int) -> Tensor:
    """The first ``length`` images of every class of a class-major set with ``ipc`` per class.

    ``images`` (K * ipc, ...) → (K * length, ...), still class-major: the union U_k of a
    progressive run is ``union_prefix(U_P, IPC, offset_k + IPC_k)``.
    """
    if not 0 <= length <= ipc:
        raise ValueError(f"length must be in [0, ipc={ipc}], got {length}")
    per_class = images.reshape(-1, ipc, *images.shape[1:])
    return per_class[:, :length].reshape(-1, *images.shape[1:])


def load_stage_unions(folder: str | Path) -> list[tuple[Tensor, Tensor]]:
    """The unions U_1 … U_P of a finished ``--method pdd`` recovery: ``[(images, labels), ...]``.

    Images (N_k, C, H, W) float32 normalized, labels (N_k,) int64, class-major.

    Raises:
        FileNotFoundError: not a finished progressive recovery.
    """
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"--distilled {folder}: no manifest.json")
    manifest = read_json(manifest_path)
    if manifest.get("method") != "pdd":
        raise ValueError(
            f"--distilled {folder} was made by --method {manifest.get('method')}, not pdd: it "
            "has no stages to train on one after another"
        )
    payload = torch_load(folder / "distilled.pt")
    images, labels = payload["images"], payload["labels"]
    ipc = manifest["ipc"]
    return [
        (
            union_prefix(images, ipc, entry["union_ipc"]),
            union_prefix(labels, ipc, entry["union_ipc"]),
        )
        for entry in manifest["stages"]
    ]


# --------------------------------------------------------------------------------------------
# Conditioning: stage teachers and hard initial images


def _stage_teachers(config: RecoverConfig, teacher: Checkpoint) -> list[Checkpoint]:
    """The teacher of every stage: the final one P times, or the P ``--save-epochs`` checkpoints.

    Raises:
        ConfigError: the teacher has no or another number of checkpoints.
        TeacherMismatchError: a checkpoint is of another architecture or dataset.
    """
    stages = config.stages
    if config.stage_teachers == "final":
        return [teacher] * stages
    entries = saved_checkpoints(teacher.path)
    epochs = [entry["epoch"] for entry in entries]
    how = (
        f"train the teacher with `delt teacher --save-epochs e1,...,e{stages}` ({stages} "
        "increasing epochs, early phase first)"
    )
    if len(entries) != stages:
        raise ConfigError(
            f"--stage-teachers checkpoints: --stages {stages} needs {stages} teacher "
            f"checkpoints, but {teacher.path} has {len(entries)}"
            f"{f' (epochs {epochs})' if entries else ''}; {how}"
        )
    checkpoints = []
    for entry in entries:
        if not entry["path"].is_file():
            raise ConfigError(
                f"--stage-teachers checkpoints: {entry['path']} (epoch {entry['epoch']}) is "
                f"missing; {how}"
            )
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

    1. the student is wrong and the teacher right (CUDD's "medium" pick, pdd.md §4.1): examples
       the union so far has not taught, on which the teacher still carries a clean signal;
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

    One :class:`delt.evaluate.StudentTrainer` with the evaluator's default protocol (the
    teacher's soft labels, RandAugment, CutMix, AdamW, the batch size of an IPC ``ipc`` set),
    ``epochs`` split across the unions, optimizer state carried over, the LR schedule restarted
    per stage (:func:`delt.stagewise.train_stagewise`). So the images a stage starts from are
    exactly what the student of a stage-wise evaluation has not learned yet.

    Recovery thereby uses the evaluator's trainer (imported here, not at module level: the
    evaluator reads pdd's outputs).
    """
    from delt.evaluate import (
        EvalConfig,
        StudentAugment,
        StudentTrainer,
        TrainSettings,
        default_batch_size,
        seeded,
    )
    from delt.models import build_model
    from delt.stagewise import stagewise_plan, train_stagewise

    protocol = {f.name: f.default for f in dataclasses.fields(EvalConfig)}
    info = teacher.info
    sizes = [len(images) for images, _ in unions]
    settings = TrainSettings(
        batch_size=default_batch_size(ipc, info.num_classes, sizes[-1]),
        temperature=protocol["temperature"], cutmix_beta=protocol["cutmix_beta"], amp=amp,
        channels_last=channels_last,
    )  # fmt: skip
    plan = stagewise_plan(epochs, sizes, settings.batch_size)
    with seeded(seed):
        student = build_model(teacher.meta["arch"], info, teacher.meta["arch_kwargs"])
        generator = torch.Generator().manual_seed(seed)
        augment = StudentAugment(
            info, protocol["randaugment_ops"], protocol["randaugment_magnitude"],
            protocol["min_crop"], generator,
        )  # fmt: skip
        # The trainer only calls the teacher (no_grad): its mode and memory format stay as the
        # stage loop left them.
        trainer = StudentTrainer(
            student, teacher.model.to(device), augment, settings, epochs, protocol["lr"],
            protocol["weight_decay"], device, generator,
        )  # fmt: skip
        unions = [(images.to(device), labels.to(device)) for images, labels in unions]
        train_stagewise(trainer, unions, plan, "restart")
    return trainer.student.eval()


# --------------------------------------------------------------------------------------------
# A run


@dataclass
class _StageInit:
    """How a stage's images start: noise, or real training indices per class."""

    kind: str  # "noise", "selection" or "hard"
    picks: list[list[int]] | None  # picks[c]: training-set indices, stage-local order
    info: dict  # for the manifest (tiers, student seconds)


def recover_progressive(config: RecoverConfig) -> RecoverResult:
    """Runs (or resumes) ``delt recover --method pdd``; see the module docstring."""
    out = Path(config.out)
    teacher = load_checkpoint(config.teacher)
    info = teacher.info
    config = config.resolved(info)
    recipe = config.recipe
    device = resolve_device(config.device)
    config = dataclasses.replace(config, device=str(device))
    stages = plan_stages(
        config.stage_ipc_list,
        config.iterations,
        config.round_iterations if recipe.early_late else None,
    )
    teachers = _stage_teachers(config, teacher)

    selection: Selection | None = None
    dataset: ImageDataset | None = None
    if recipe.init == "selection":
        # Usual init consumes the selection across stages; hard init only reads stage 1 from it.
        needed = stages[0].ipc if config.stage_init == "hard" else config.ipc
        selection, dataset = load_selection(config, teacher, needed)
    elif config.stage_init == "hard" and len(stages) > 1:
        dataset = load_like(info, "train", config.data_root)
        check_compatible(teacher.meta, dataset.info)

    _check_run_identity(
        out, config, teacher, selection is not None,
        stage_teachers_sha256=None
        if config.stage_teachers == "final"
        else [sha256_file(checkpoint.path) for checkpoint in teachers],
    )  # fmt: skip

    settings = recovery_settings(config, info)
    ipc = config.ipc
    shape = (info.channels, info.resolution, info.resolution)
    union = torch.zeros(info.num_classes * ipc, *shape)
    labels = torch.arange(info.num_classes).repeat_interleave(ipc)
    iterations_per_image = [0] * union.shape[0]
    stage_per_image = [0] * union.shape[0]
    stage_entries: list[dict] = []
    used: set[int] = set()
    teacher_scores: tuple[Tensor, Tensor] | None = None
    wall_seconds = 0.0
    logger.info(
        "recover: pdd over %s, %d stages of %s images per class, %d iterations each, "
        "stage teachers %s, union in batch %s, stage init %s, device %s -> %s",
        config.base, len(stages), ",".join(map(str, config.stage_ipc)), config.iterations,
        config.stage_teachers,
        f"yes (sample {config.union_sample or 'all'})" if config.union_in_batch else "no",
        config.stage_init, device, out,
    )  # fmt: skip

    for stage, stage_teacher in zip(stages, teachers, strict=True):
        stage_dir = out / "stages" / str(stage.index)
        # ---- initial images
        student_seconds = 0.0
        if recipe.init == "selection" and (stage.index == 1 or config.stage_init != "hard"):
            assert selection is not None
            picks = [
                chosen[stage.offset : stage.offset + stage.ipc] for chosen in selection.indices
            ]
            init = _StageInit("selection", picks, {"kind": "selection"})
        elif stage.index > 1 and config.stage_init == "hard":
            assert dataset is not None
            init_path = stage_dir / "init.json"
            if init_path.is_file():
                saved = read_json(init_path)
                init = _StageInit("hard", saved["picks"], saved["info"])
            else:
                if teacher_scores is None:
                    teacher_scores = _true_class_scores(teacher.model, dataset, device)
                start = time.perf_counter()
                unions = [
                    (union_prefix(union, ipc, e.union_ipc), union_prefix(labels, ipc, e.union_ipc))
                    for e in stages[: stage.index - 1]
                ]
                # The final teacher labels the student's batches, as in every evaluation.
                student = _train_hard_student(
                    unions, teacher, ipc, config.hard_student_epochs,
                    derive_seed(config.seed, 0, stage.index), device, config.amp,
                    config.channels_last,
                )  # fmt: skip
                student_scores = _true_class_scores(student, dataset, device)
                picks, tiers = pick_hard_examples(
                    dataset.targets, teacher_scores[0], teacher_scores[1], student_scores[0],
                    student_scores[1], stage.ipc, used,
                )  # fmt: skip
                student_seconds = time.perf_counter() - start
                student_accuracy = 100.0 * float(student_scores[1].float().mean())
                init_info = {
                    "kind": "hard",
                    "tiers": tiers,
                    "student_train_accuracy": student_accuracy,
                    "student_epochs": config.hard_student_epochs,
                    "student_seconds": student_seconds,
                }
                write_json(init_path, {"picks": picks, "info": init_info})
                init = _StageInit("hard", picks, init_info)
                logger.info(
                    "recover: stage %d init: student on U_%d is %.1f%% right on the training "
                    "set; picks %s (%.0f s)",
                    stage.index, stage.index - 1, student_accuracy, tiers, student_seconds,
                )  # fmt: skip
            student_seconds = float(init.info.get("student_seconds", 0.0))
        else:
            init = _StageInit("noise", None, {"kind": "noise"})
        if init.picks is not None:
            used.update(index for chosen in init.picks for index in chosen)

        def initial_images(chunk: Chunk, generator: torch.Generator, init=init) -> Tensor:
            if init.picks is None:
                # Drawn on the CPU so that a chunk's start does not depend on the device.
                return torch.randn((len(chunk), *shape), generator=generator)
            assert dataset is not None
            pairs = zip(chunk.classes, chunk.within_class, strict=True)
            return dataset.images([init.picks[c][j] for c, j in pairs])

        frozen_images = None
        if config.union_in_batch and stage.offset > 0:
            earlier = union_prefix(union, ipc, stage.offset).to(device)

            def frozen_images(chunk: Chunk, earlier=earlier, offset=stage.offset) -> Tensor:
                # Every earlier image of the chunk's classes, class-major.
                classes = list(dict.fromkeys(chunk.classes))
                rows = torch.cat([torch.arange(c * offset, (c + 1) * offset) for c in classes])
                return earlier.index_select(0, rows.to(earlier.device))

        # ---- the stage's chunks
        model = frozen_teacher(stage_teacher.model, device, config.channels_last)
        chunks = recipe.chunks(info.num_classes, stage.ipc, config.batch_size)
        with delt_ext.BNStatMatching(
            model, first_bn_multiplier=config.first_bn_multiplier
        ) as bn_matching:
            forward = torch.compile(model) if config.compile else model
            images, stage_iterations, seconds = synthesize_chunks(
                forward, bn_matching, chunks, stage.ipc, config.iterations,
                stage.round_iterations, settings, info, device, stage_dir / "chunks",
                chunk_seed=lambda chunk, k=stage.index: derive_seed(config.seed, k, chunk.index),
                initial_images=initial_images, frozen_images=frozen_images,
                frozen_sample=config.union_sample, progress=config.progress,
                desc=f"pdd stage {stage.index}/{len(stages)}",
            )  # fmt: skip

        # ---- into the union: class c's stage images at c * IPC + offset + j
        positions = [
            c * ipc + stage.offset + j for c in range(info.num_classes) for j in range(stage.ipc)
        ]
        union[torch.tensor(positions)] = images
        for position, iterations in zip(positions, stage_iterations, strict=True):
            iterations_per_image[position] = iterations
            stage_per_image[position] = stage.index
        wall_seconds += seconds + student_seconds
        stage_entries.append(
            {
                "stage": stage.index,
                "ipc": stage.ipc,
                "offset": stage.offset,
                "union_ipc": stage.union_ipc,
                "round_iterations": stage.round_iterations,
                "teacher": {
                    "path": str(stage_teacher.path),
                    "epoch": stage_teacher.meta.get("epoch", stage_teacher.meta.get("epochs")),
                },
                "init": init.info,
                "union_in_batch": config.union_in_batch and stage.offset > 0,
                "image_iterations": int(sum(stage_iterations)),
                "synthesis_seconds": seconds,
                "student_seconds": student_seconds,
            }
        )
        _write_stage(
            stage_dir, stage, config, info, teacher, selection, union, labels,
            iterations_per_image, stage_per_image, stage_entries, wall_seconds,
        )  # fmt: skip
        logger.info(
            "recover: stage %d/%d done: %d new images per class, %d image-iterations",
            stage.index, len(stages), stage.ipc, stage_entries[-1]["image_iterations"],
        )  # fmt: skip

    _write_union(
        out, out / "images", config, info, teacher, selection, union, labels, ipc,
        iterations_per_image, stage_per_image, stage_entries, wall_seconds,
    )  # fmt: skip
    return RecoverResult(out, union, labels, iterations_per_image, wall_seconds)


def _write_stage(
    stage_dir: Path,
    stage: Stage,
    config: RecoverConfig,
    info: DatasetInfo,
    teacher: Checkpoint,
    selection: Selection | None,
    union: Tensor,
    labels: Tensor,
    iterations_per_image: list[int],
    stage_per_image: list[int],
    stage_entries: list[dict],
    wall_seconds: float,
) -> None:
    """``stages/<k>/``: the stage's new images, and U_k as a distilled set of its own."""
    ipc, length = config.ipc, stage.union_ipc
    keep = [c * ipc + j for c in range(info.num_classes) for j in range(length)]
    union_k = union_prefix(union, ipc, length)
    labels_k = union_prefix(labels, ipc, length)
    new = [c * length + j for c in range(info.num_classes) for j in range(stage.offset, length)]
    save_images(
        stage_dir / "images", union_k, labels_k, length, info, config.image_format, positions=new
    )
    _write_union(
        stage_dir, None, config, info, teacher, selection, union_k, labels_k, length,
        [iterations_per_image[p] for p in keep], [stage_per_image[p] for p in keep],
        stage_entries, wall_seconds,
    )  # fmt: skip


def _write_union(
    folder: Path,
    image_folder: Path | None,
    config: RecoverConfig,
    info: DatasetInfo,
    teacher: Checkpoint,
    selection: Selection | None,
    images: Tensor,
    labels: Tensor,
    union_ipc: int,
    iterations_per_image: list[int],
    stage_per_image: list[int],
    stage_entries: list[dict],
    wall_seconds: float,
) -> None:
    files = {"distilled": "distilled.pt"}
    if image_folder is not None:
        pattern = save_images(image_folder, images, labels, union_ipc, info, config.image_format)
        files["images"] = f"{image_folder.relative_to(folder)}/{pattern}"
    else:
        files["images"] = "images/<class>/<index> (this stage's new images only)"
    torch_save({"images": images.contiguous(), "labels": labels}, folder / "distilled.pt")
    manifest = {
        **manifest_fields(config, info, teacher, selection),
        # IPC of this set (U_k); the run's total is config.ipc.
        "ipc": union_ipc,
        "num_images": int(images.shape[0]),
        "stage": stage_entries[-1]["stage"],
        "stages": stage_entries,
        "stage_per_image": stage_per_image,
        "iterations_per_image": iterations_per_image,
        "image_iterations": int(sum(iterations_per_image)),
        "wall_seconds": wall_seconds,
        "files": files,
    }
    write_json(folder / "manifest.json", manifest)
