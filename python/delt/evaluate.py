"""``delt eval``: train students from scratch on a distilled set and test them on real data.

RDED/DELT's protocol (DELT: Shen et al., CVPR 2025, github.com/VILA-Lab/DELT;
docs/evaluation.md); the engine is :mod:`delt.student_trainer` with :mod:`delt.student_augment`,
``--stagewise`` runs in :mod:`delt.stagewise`. ``DIR/eval.json`` (atomic) caches every finished
seed of an identity (:func:`delt.identity.run_identity`: config, student, batch, input files,
the test split's fingerprint; not the seeds). An evaluation of another identity is never lost: it
is kept as ``DIR/eval-kept/<key>.json`` (:class:`delt.eval_results.ResultsFile`) and comes back
when its flags are used again.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from delt.batches import inference_copy
from delt.config import ConfigError, check_int_fields, flag, option
from delt.data import DatasetInfo, ImageDataset, load_like
from delt.distilled_set import Manifest, check_distilled_set, load_distilled, load_stored
from delt.distributed import barrier, is_main, world
from delt.eval_results import (
    EvalResult,
    ResultsFile,
    SeedResult,
    kept_folder,
    load_seed_state,
    save_seed_state,
    summary,
)
from delt.fkd_labels import FkdLabels, check_fkd_store, is_fkd_store
from delt.identity import identity_defaults, run_identity
from delt.io import check_output, sha256_file
from delt.lock import results_lock
from delt.methods.random_real import draw_random_real
from delt.models import (
    Checkpoint,
    TeacherMismatchError,
    build_model,
    check_compatible,
    check_model_memory,
    data_fingerprint,
    load_checkpoint,
    model_spec,
)
from delt.protocols import (
    DEFAULT_PROTOCOL,
    apply_protocol,
    protocol_names,
    protocol_record,
    trim_identity,
    warn_unsupported,
)
from delt.runtime import logger, resolve_device, versions
from delt.soft_labels import LabelStore, check_protocol, open_store, protocol_of
from delt.student_augment import RANDAUGMENT_BINS, NoAugment, StudentAugment
from delt.student_trainer import (
    PROTOCOL,
    AccuracyCheck,
    StudentTrainer,
    TrainSettings,
    default_batch_size,
    seeded,
)
from delt.teachers import EnsembleLogits, load_teachers, teacher_inputs, teacher_record

__all__ = [
    "EvalConfig",
    "EvalContext",
    "draw_random_real",
    "eval_document",
    "evaluate",
]

EVAL_FORMAT = "delt-eval-v1"


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass
class EvalConfig:
    """Configuration of ``delt eval`` (one field per flag)."""

    distilled: str = option(
        help="folder of a distilled set (distilled.pt + manifest.json of `delt recover`); "
        "with --random-real, the folder the results go to",
        identity=False,
    )
    teacher: str | None = option(
        None, help="teacher checkpoint (default: the one the set's manifest names)", identity=False
    )
    teachers: tuple[str, ...] = option(
        (),
        help="more teachers of the same data beside --teacher: soft labels from the ensemble, "
        "logits averaged after equalizing their norms as G-VBSM (docs/teachers.md)",
        identity=False,
    )
    data_root: str | None = option(
        None, help="folder of the real dataset (default: the dataset's own)", identity=False
    )
    student: str | None = option(
        None,
        help="student architecture (default: the teacher's, with its --width); a convnetD "
        "student of another depth takes the teacher's width too",
    )
    student_width: int | None = option(
        None, help="convnetD student width (default: the teacher's, where it has one; else 128)"
    )
    protocol: str = option(
        DEFAULT_PROTOCOL,
        choices=protocol_names,
        help="evaluation protocol: a preset of the settings below (docs/protocols.md); "
        "flags given explicitly override it",
    )
    # The settings below default to None: the --protocol's value (delt's in the help).
    epochs: int | None = option(None, help="training epochs per student (delt: 300)")
    # Seeds are results, not identity: adding a seed reuses the finished ones.
    seeds: tuple[int, ...] = option(
        (0,), help="one student per seed, e.g. 3407,4663,2897", identity=False
    )
    eval_every: int | None = option(
        None, help="test every k epochs (and after the last) (delt: 10)"
    )
    batch_size: int | None = option(
        None, help="delt: 100 / 50 / 10 for IPC >= 50 / >= 10 / less (DELT's), capped"
    )
    temperature: float | None = option(
        None, help=f"softmax temperature of the KL loss (delt: {PROTOCOL.temperature:g})"
    )
    lr: float | None = option(None, help=f"AdamW learning rate (delt: {PROTOCOL.lr:g})")
    weight_decay: float | None = option(
        None,
        help=f"AdamW weight decay, weights with ndim > 1 only (delt: {PROTOCOL.weight_decay:g})",
    )
    cutmix_beta: float | None = option(
        None,
        help=f"CutMix lambda ~ Beta(b, b); 0 turns CutMix off (delt: {PROTOCOL.cutmix_beta:g})",
    )
    randaugment_ops: int | None = option(
        None, help=f"RandAugment ops per image, 0: none (delt: {PROTOCOL.randaugment_ops})"
    )
    randaugment_magnitude: int | None = option(
        None,
        help="RandAugment magnitude, 0-10 on timm's scale "
        f"(delt: {PROTOCOL.randaugment_magnitude})",
    )
    min_crop: float | None = option(
        None, help=f"smallest RandomResizedCrop area fraction (delt: {PROTOCOL.min_crop:g})"
    )
    shuffle_patches: int | None = option(
        None,
        help="RDED's ShufflePatches: shuffle each training image's FACTOR column strips, then its "
        "row strips, before the other augmentations (RDED pairs it with --min-crop 1/FACTOR); "
        "delt: off",
    )
    lr_schedule: Literal["half-cosine", "cosine"] | None = option(
        None,
        help="per-epoch LR factor: half-cosine 0.5(1+cos(pi e/2E)) (DELT/RDED), cosine "
        "0.5(1+cos(pi e/E)) to 0 (SRe2L) (delt: half-cosine)",
    )
    ema_decay: float | None = option(
        None,
        help="test an exponential moving average of the student's parameters, updated after "
        "every step with this decay (EDC's EMA evaluation); 0: off (delt: 0)",
    )
    loss: Literal["kl", "mse-ce"] | None = option(
        None,
        help="soft-label loss: kl (KL at --temperature) or mse-ce (EDC's: MSE of the logits + "
        "--ce-weight x CE of each image's own label) (delt: kl)",
    )
    ce_weight: float | None = option(None, help="--loss mse-ce: the CE weight (delt: 0.025)")
    teacher_batch_stats: bool | None = option(
        None,
        help="the teacher labels each batch with BatchNorm on the batch's statistics (CV-DD's "
        "train-mode teachers), its running statistics untouched (delt: off)",
    )
    augment: bool = option(
        True,
        help="augment the student's batches (crops, flips, RandAugment, ShufflePatches, CutMix, "
        "as the protocol says); --no-augment: the images as they are (DD-Ranking's "
        "augmentation-robust score)",
    )
    hard_labels: bool = option(False, help="train on the set's labels, no teacher")
    random_real: bool = option(
        False, help="baseline: each seed draws --ipc random real images per class instead"
    )
    ipc: int | None = option(None, help="--random-real: images per class (default: the set's)")
    amp: Literal["none", "bf16", "fp16"] = option(
        "none", help="autocast dtype of forward passes (fp16: with a gradient scaler)"
    )
    channels_last: bool = option(False, help="channels_last memory format (faster on CPU)")
    fold_teacher: bool = option(
        False,
        help="the teacher's soft-label forward with BatchNorm folded into its convolutions "
        "(faster; moves the soft labels by float rounding; off: main's numbers bitwise)",
    )
    stagewise: bool = option(
        False,
        help="a --method pdd set: one student on U1, then U1+U2, ... (--epochs split across "
        "the stages, optimizer state carried over), beside the plain evaluation of the final set",
    )
    stage_schedule: Literal["restart", "continue"] = option(
        "restart",
        help="--stagewise LR schedule: a half-cosine per stage (PDD) or one over all --epochs",
    )
    out: str | None = option(
        None,
        help="results file (default: DISTILLED/eval.json; --stagewise: eval-stagewise.json)",
        identity=False,
    )
    device: str = option("auto", help="auto, cpu, cuda, ...", identity=False)
    progress: bool = option(True, help="show progress bars", identity=False)
    workers: int | None = option(
        None,
        help="DataLoader workers that augment the student's batches and read the test set "
        "(default: 0 on the CPU, which keeps main's numbers bitwise; min(8, CPUs) on a GPU). "
        "0 and N > 0 draw different random augmentations; any N > 0 gives the same numbers",
        identity=False,
    )
    labels: str | None = option(
        None,
        help="train on the soft labels of this store (`delt relabel`, one --seeds seed) instead "
        "of the teacher's online labels; the same batches at any --workers (docs/relabel.md)",
        identity=False,
    )
    checkpoint_every: int | None = option(
        None,
        help="save each student's training state every k epochs, to resume a killed run "
        "mid-seed (default: --eval-every, every test pass)",
        identity=False,
    )

    def __post_init__(self) -> None:
        apply_protocol(self)  # fills the settings left None
        check_int_fields(
            self, ("epochs", "eval_every", "batch_size", "student_width", "ipc", "shuffle_patches")
        )
        check_int_fields(self, ("checkpoint_every",))
        check_int_fields(self, ("workers",), low=0)
        check_int_fields(self, ("randaugment_ops", "randaugment_magnitude"), low=0)
        if self.randaugment_magnitude > RANDAUGMENT_BINS - 1:
            raise ConfigError(
                f"--randaugment-magnitude must be in 0..{RANDAUGMENT_BINS - 1}, "
                f"got {self.randaugment_magnitude}"
            )
        self.seeds = tuple(self.seeds)
        if not self.seeds:
            raise ConfigError("--seeds needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds lists a seed twice: {','.join(map(str, self.seeds))}")
        for name in ("temperature", "lr"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{flag(name)} must be a finite number > 0, got {value}")
        for name in ("weight_decay", "cutmix_beta"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{flag(name)} must be a finite number >= 0, got {value}")
        if not 0 < self.min_crop <= 1:
            raise ConfigError(f"--min-crop must be in (0, 1], got {self.min_crop}")
        if self.ipc is not None and not self.random_real:
            raise ConfigError("--ipc applies to --random-real (a distilled set has its own IPC)")
        if self.stagewise and self.random_real:
            raise ConfigError("--stagewise trains on the stages of a pdd set, not --random-real")
        self.teachers = tuple(self.teachers)
        if self.teachers and (self.hard_labels or self.labels is not None):
            used = "--hard-labels" if self.hard_labels else "--labels"
            raise ConfigError(f"--teachers label batches online; {used} takes no teacher labels")
        if self.labels is not None:
            for name in ("hard_labels", "random_real", "stagewise"):
                if getattr(self, name):
                    raise ConfigError(f"--labels: stored soft labels do not apply to {flag(name)}")
            if len(self.seeds) != 1:
                raise ConfigError("--labels: a store holds one seed's labels; pass one --seeds")
            if not self.augment:
                raise ConfigError("--labels: stored soft labels are of augmented batches, not "
                                  "--no-augment")  # fmt: skip
        if self.fold_teacher:
            for name in ("hard_labels", "labels", "teacher_batch_stats"):
                if getattr(self, name):
                    raise ConfigError(
                        f"--fold-teacher: no teacher forward to fold with {flag(name)}"
                    )
        if self.stage_schedule != "restart" and not self.stagewise:
            raise ConfigError("--stage-schedule applies with --stagewise")
        if self.student is not None:
            try:
                spec = model_spec(self.student)
            except ValueError as error:
                raise ConfigError(str(error).replace("--arch", "--student", 1)) from None
            if self.student_width is not None and "width" not in spec.kwargs:
                raise ConfigError(
                    f"--student-width applies to convnetD students, not --student {self.student}"
                )

    def check_results_path(self, probe: bool = True) -> None:
        """Refuses a results path that cannot be written (:func:`delt.io.check_output`)."""
        label = "--out" if self.out else "--distilled"
        check_output(self.results_path, label, folder=False, probe=probe)

    @property
    def results_path(self) -> Path:
        name = "eval-stagewise.json" if self.stagewise else "eval.json"
        return Path(self.out) if self.out else Path(self.distilled) / name

    def seed_checkpoint_path(self, seed: int) -> Path:
        """Where seed ``seed``'s training state goes while it trains: beside the results file,
        ``<results stem>-checkpoints/seed-<seed>.pt`` (deleted once the seed is done)."""
        results = self.results_path
        return results.parent / f"{results.stem}-checkpoints" / f"seed-{seed}.pt"


def resolve_workers(workers: int | None, device: torch.device) -> int:
    """``--workers``: as given, else 0 on the CPU (augmenting in workers would take cores from
    the training itself, and 0 keeps main's random stream) and min(8, CPUs) on a GPU."""
    if workers is not None:
        return workers
    if device.type == "cpu":
        return 0
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


def _student_kwargs(
    student_arch: str, student_width: int | None, teacher_arch: str, teacher_kwargs: dict
) -> dict:
    """The student's model kwargs: ``--student-width`` when given; else the teacher's kwargs for
    the teacher's architecture, and the teacher's width for another architecture that takes a
    width (``--student convnet4`` under a convnet3 w64 teacher: w64); else the model's defaults."""
    if student_width is not None:
        return {"width": student_width}
    if student_arch == teacher_arch:
        return dict(teacher_kwargs)
    if "width" in model_spec(student_arch).kwargs and "width" in teacher_kwargs:
        return {"width": teacher_kwargs["width"]}
    return {}


@dataclass
class EvalContext:
    """Everything a student training needs, resolved once from an :class:`EvalConfig`.

    Attributes:
        config: the command's config.
        device: resolved device.
        workers: resolved ``--workers``.
        teacher: the teacher checkpoint (model in eval mode on ``device``, frozen).
        info: the dataset of the set and the teacher.
        images, labels: the distilled set (N, C, H, W) as stored (float32 normalized, or
            uint8 pixels) and (N,) int64, on the host: only batches go to ``device``, so device
            memory does not grow with the set; None with ``--random-real`` (drawn per seed from
            ``train_set``).
        train_set: the real training split (``--random-real`` only).
        test_set: the real test split.
        ipc: images per class of the set (rounded for uneven sets).
        student_arch, student_kwargs: the student architecture.
        settings: per-step settings with the resolved batch size.
        manifest: the distilled set's manifest (None for a bare --random-real folder).
    """

    config: EvalConfig
    device: torch.device
    teacher: Checkpoint
    info: DatasetInfo
    images: Tensor | None
    labels: Tensor | None
    train_set: ImageDataset | None
    test_set: ImageDataset
    ipc: int
    student_arch: str
    student_kwargs: dict
    settings: TrainSettings
    manifest: Manifest | None
    workers: int = 0
    stored_labels: LabelStore | FkdLabels | None = None  # --labels: the stored soft labels
    ensemble: list[Checkpoint] | None = None  # --teachers (beside the teacher)

    @classmethod
    def from_config(cls, config: EvalConfig, whole_batches: bool = False) -> EvalContext:
        """Loads and checks the set, the teacher and the data (errors name the flag);
        ``whole_batches``: the teacher labels whole batches under torchrun too (relabel)."""
        warn_unsupported(config)
        device = resolve_device(config.device)
        folder = Path(config.distilled)
        has_set = (folder / "distilled.pt").is_file()
        images = labels = manifest = None
        if has_set:
            images, labels, manifest = load_stored(folder)
        elif not config.random_real:
            load_distilled(folder)  # raises the "no distilled.pt" error
        teacher_path = config.teacher
        if teacher_path is None:
            if manifest is None:
                raise ConfigError(
                    f"--teacher is required: {folder} holds no manifest naming a teacher"
                )
            teacher_path = manifest.teacher["path"]
            if not Path(teacher_path).is_file():
                raise FileNotFoundError(
                    f"the teacher named by {folder / 'manifest.json'} ({teacher_path}) is gone; "
                    "pass --teacher PATH"
                )
        teacher = load_checkpoint(teacher_path)
        if manifest is not None:
            info = manifest.dataset
            try:
                # The set's data identity is its teacher's (recorded in the manifest).
                check_compatible(
                    teacher.meta, info, fingerprint=data_fingerprint(manifest.teacher.get("meta"))
                )
            except TeacherMismatchError as error:
                raise TeacherMismatchError(f"--teacher {teacher_path}: {error}") from None
            recorded = manifest.teacher.get("sha256")
            if recorded is not None and recorded != sha256_file(teacher.path):
                logger.warning(
                    "eval: --teacher %s is not the teacher that synthesized %s (its SHA-256 "
                    "differs); its soft labels are used anyway", teacher_path, folder,
                )  # fmt: skip
        else:
            info = teacher.info
        data_root = config.data_root
        if data_root is None and manifest is not None:
            data_root = manifest.config.get("data_root")
        test_set = load_like(info, "test", data_root)
        check_compatible(teacher.meta, test_set.info, what="teacher")
        ensemble = load_teachers(config.teachers, teacher, info)
        if ensemble and world().size > 1 and not whole_batches:
            # G-VBSM's norms are over the whole batch; a rank holds only its rows of it.
            raise ConfigError(
                "--teachers under torchrun: an ensemble's norms are the whole batch's; label "
                "once with `delt relabel --teachers` and train on the store with --labels"
            )

        train_set = None
        if config.random_real:
            ipc = config.ipc or (None if manifest is None else manifest.ipc)
            if ipc is None:
                raise ConfigError(f"--random-real: pass --ipc ({folder} holds no distilled set)")
            train_set = load_like(info, "train", data_root)
            check_compatible(teacher.meta, train_set.info, fingerprint=train_set.fingerprint())
            images = labels = None
            num_images = ipc * info.num_classes
        else:
            check_distilled_set(images, labels, info, folder)
            num_images = images.shape[0]
            ipc = max(1, round(num_images / info.num_classes))
        if config.shuffle_patches is not None and info.resolution % config.shuffle_patches:
            # Named by the protocol when its preset chose the value (a protocol that does not
            # fit the data), by the flag when the user gave it.
            given = "shuffle_patches" in protocol_record(config)["overrides"]
            origin = "" if given else (
                f"--protocol {config.protocol} does not fit {config.distilled}: its "
            )  # fmt: skip
            raise ConfigError(
                f"{origin}--shuffle-patches {config.shuffle_patches} must divide the image "
                f"resolution {info.resolution}"
            )

        student_arch = config.student or teacher.meta["arch"]
        student_kwargs = _student_kwargs(
            student_arch, config.student_width, teacher.meta["arch"], teacher.meta["arch_kwargs"]
        )
        build_model(student_arch, info, student_kwargs)  # fails now, not after the first seed
        batch_size = config.batch_size or default_batch_size(ipc, info.num_classes, num_images)
        check_model_memory(
            student_arch, info, student_kwargs, min(batch_size, num_images), device, True,
            f"--batch-size {batch_size}",
        )  # fmt: skip
        settings = TrainSettings(
            batch_size=min(batch_size, num_images), temperature=config.temperature,
            cutmix_beta=config.cutmix_beta if config.augment else 0.0,
            hard_labels=config.hard_labels, amp=config.amp,
            channels_last=config.channels_last, lr_schedule=config.lr_schedule,
            ema_decay=config.ema_decay, loss=config.loss, ce_weight=config.ce_weight,
            teacher_batch_stats=config.teacher_batch_stats,
        )  # fmt: skip
        model = teacher.model.to(device).requires_grad_(False).eval()
        if config.fold_teacher:  # a copy: BatchNorm folded, eval mode (delt.batches)
            model = inference_copy(model, config.channels_last)
        elif config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        teacher.model = model
        if ensemble:
            others = [c.model.to(device).requires_grad_(False).eval() for c in ensemble]
            if config.fold_teacher:
                others = [inference_copy(other, config.channels_last) for other in others]
            elif config.channels_last:
                others = [other.to(memory_format=torch.channels_last) for other in others]
            teacher.model = EnsembleLogits([model, *others])
        context = cls(
            config, device, teacher, info, images, labels, train_set, test_set, ipc,
            student_arch, student_kwargs, settings, manifest,
            resolve_workers(config.workers, device), ensemble=ensemble,
        )  # fmt: skip
        if config.labels is not None:
            # Checked whole (every epoch's digest) and against this run before any training.
            context.stored_labels = store = open_store(config.labels)
            protocol = protocol_of(context, config.seeds[0])
            if is_fkd_store(store):  # imported FKD labels: their recorded batches, replayed
                check_fkd_store(store, protocol, config.epochs, config.batch_size)
                context.settings = replace(settings, batch_size=store.batch_size)
                context.stored_labels = FkdLabels.for_set(store, info)
                return context
            if store.layout.top_k is not None:
                protocol["temperature"] = config.temperature
            bn_mode = "train" if config.teacher_batch_stats else "eval"
            check_protocol(store, protocol, config.epochs, bn_mode)
        return context

    def make_trainer(self, seed: int, total_epochs: int | None = None) -> StudentTrainer:
        """A fresh student (initialized from torch's global generator: call inside
        :func:`seeded`) with its optimizer over ``total_epochs`` (default ``--epochs``)."""
        config = self.config
        student = build_model(self.student_arch, self.info, self.student_kwargs)
        generator = torch.Generator().manual_seed(seed)
        augment = (
            StudentAugment(
                self.info, config.randaugment_ops, config.randaugment_magnitude,
                config.min_crop, generator, config.shuffle_patches,
            )
            if config.augment
            else NoAugment(self.info)
        )  # fmt: skip
        online = not self.settings.hard_labels and self.stored_labels is None
        return StudentTrainer(
            student, self.teacher.model if online else None, augment,
            self.settings, total_epochs or config.epochs, config.lr, config.weight_decay,
            self.device, generator, workers=self.workers, soft_labels=self.stored_labels,
        )  # fmt: skip

    def identity(self) -> dict:
        """What determines the results (:func:`delt.identity.run_identity`): the config, the
        resolved student and batch, the input files and the data the numbers come from."""
        distilled = Path(self.config.distilled) / "distilled.pt"
        identity = run_identity(
            self.config,
            teacher_sha256=sha256_file(self.teacher.path),
            **teacher_inputs(self.config.teachers),
            distilled_sha256=None if self.config.random_real else sha256_file(distilled),
            dataset=self.info.name,
            # The test split, and the training split a --random-real set is drawn from (a
            # teacher may predate training fingerprints).
            data_fingerprints={
                "test": self.test_set.fingerprint(),
                "train": None if self.train_set is None else self.train_set.fingerprint(),
            },
        )
        trim_identity(identity["config"])  # the protocol's resolved values at delt's: as before
        identity["config"].update(
            student=self.student_arch, student_kwargs=self.student_kwargs,
            batch_size=self.settings.batch_size, ipc=self.ipc,
        )  # fmt: skip
        if isinstance(self.stored_labels, FkdLabels):
            identity["config"]["augmentation"] = "FKD replay (recorded crops, flips, mixes)"
        elif self.workers > 0 or self.stored_labels is not None:
            # Workers draw another random stream than the in-process augmentation (0).
            identity["config"]["augmentation"] = "workers: per-batch seeds"
        if self.stored_labels is not None:
            identity["labels_sha256"] = self.stored_labels.digest
        return identity

    def identity_defaults(self) -> dict:
        """The defaults of :meth:`identity` (:func:`delt.identity.identity_defaults`): the
        config's, and None for the entries it adds (an identity without them is the run's
        without workers or stored labels, not one recorded before they existed)."""
        defaults = identity_defaults(self.config)
        defaults["config"]["augmentation"] = None
        return {**defaults, "labels_sha256": None, "teachers_sha256": None}

    def run_seed(self, seed: int, identity: dict | None = None) -> SeedResult:
        """Trains and tests one student (and, with --random-real, draws its set) for ``seed``.

        With ``identity`` (the run's), the training state is saved every ``--checkpoint-every``
        epochs (:meth:`EvalConfig.seed_checkpoint_path`, atomically) and a saved state of the
        same identity and seed is resumed: the student, optimizer, LR schedule, gradient
        scaler, the trainer's generator and torch's global generators continue where they
        were, so the seed ends with the numbers of an uninterrupted run (bitwise on the CPU).
        """
        config = self.config
        start = time.perf_counter()
        indices = None
        every = config.checkpoint_every or config.eval_every
        path = config.seed_checkpoint_path(seed) if identity is not None else None
        with seeded(seed):
            if config.random_real:
                images, labels, drawn = draw_random_real(self.train_set, self.ipc, seed)
                indices = drawn.tolist()
            else:
                images, labels = self.images, self.labels
            trainer = self.make_trainer(seed)
            losses: list[float] = []
            checks: list[AccuracyCheck] = []
            seconds_before = 0.0
            if path is not None:
                resumed = load_seed_state(
                    path, identity, self.identity_defaults(), seed, trainer, self.device
                )
                if resumed is not None:
                    losses, checks, seconds_before = resumed
                    logger.info(
                        "eval: seed %d resumes after epoch %d (%s)", seed, trainer.epochs_done,
                        path,
                    )  # fmt: skip
            bar = tqdm(
                total=config.epochs, initial=trainer.epochs_done, desc=f"student seed {seed}",
                leave=False, disable=None if config.progress else True,
            )  # fmt: skip
            while trainer.epochs_done < config.epochs:
                epochs = min(
                    every - trainer.epochs_done % every, config.epochs - trainer.epochs_done
                )
                more_losses, more_checks = trainer.train_epochs(
                    images, labels, epochs, self.test_set, config.eval_every, bar
                )
                losses += more_losses
                checks += more_checks
                # Under torchrun rank 0 saves the training state, with every rank's generators.
                if path is not None and trainer.epochs_done < config.epochs:
                    seconds = seconds_before + time.perf_counter() - start
                    save_seed_state(path, identity, seed, trainer, losses, checks, seconds)
            bar.close()
        seconds = seconds_before + time.perf_counter() - start
        return SeedResult.from_checks(seed, checks, losses, seconds, indices)


def eval_document(
    context: EvalContext,
    identity: dict,
    seeds: list[SeedResult],
    complete: bool,
    other_seeds: Sequence[SeedResult] = (),
):
    """eval.json: ``seeds`` and the summaries over the requested seeds, ``other_seeds`` the
    finished ones of the same identity that were not requested (kept for a later run)."""
    config = context.config
    manifest = context.manifest
    return {
        "format": EVAL_FORMAT,
        "complete": complete,
        "identity": identity,
        "distilled": str(config.distilled),
        "method": "random-real" if config.random_real else manifest.method,
        "dataset": context.info.name,
        "ipc": context.ipc,
        "num_images": context.ipc * context.info.num_classes
        if config.random_real
        else int(context.images.shape[0]),
        "image_iterations": None if config.random_real else manifest.image_iterations,
        "config": {
            **{k: v for k, v in asdict(config).items() if k != "progress"},
            "seeds": list(config.seeds),
            "device": str(context.device),
            "student": context.student_arch,
            "student_kwargs": context.student_kwargs,
            "batch_size": context.settings.batch_size,
            "randaugment": f"rand-m{config.randaugment_magnitude}-n{config.randaugment_ops}"
            if config.randaugment_ops and config.augment
            else "none",
            **(
                {}
                if config.augment
                else {"student_augmentation": "none: the images as they are, no CutMix"}
            ),
            "lr_schedule": "LambdaLR 0.5*(1+cos(pi*e/(2E))) per epoch"
            if config.lr_schedule == "half-cosine"
            else "LambdaLR 0.5*(1+cos(pi*e/E)) per epoch",
            "optimizer": "AdamW betas (0.9, 0.999), weight decay on ndim>1 only",
            "loss": "CE on CutMix labels"
            if config.hard_labels
            else f"KL(teacher/T || student/T), T={config.temperature}, batchmean, no T^2"
            if config.loss == "kl"
            else f"MSE(student, teacher logits) + {config.ce_weight:g} CE(own label)",
        },
        "protocol": protocol_record(config),
        "teacher": {
            "path": str(context.teacher.path),
            "sha256": identity["teacher_sha256"],
            "arch": context.teacher.meta["arch"],
            "arch_kwargs": context.teacher.meta["arch_kwargs"],
            "test_accuracy": context.teacher.meta.get("test_accuracy"),
        },
        **(
            {"teachers": teacher_record([context.teacher, *context.ensemble], [])}
            if context.ensemble
            else {}
        ),
        "seeds": [asdict(s) for s in seeds],
        "other_seeds": [asdict(s) for s in other_seeds],
        **summary(seeds),
        "versions": versions(),
    }


def evaluate(config: EvalConfig) -> EvalResult:
    """Runs ``delt eval``: one student per seed; writes and returns the results.

    Seeds already in a results file made with the same identity are reused (a complete file:
    no training at all); a file of another identity is kept aside, not replaced
    (:class:`delt.eval_results.ResultsFile`). A ``--stagewise`` config is
    :func:`delt.stagewise.evaluate_stagewise`'s (the CLI dispatches it there).

    The file is a cache of every finished seed of its identity: ``seeds`` holds the requested
    ones (``--seeds``' order), over which ``best``/``final`` mean ± std are taken, and
    ``other_seeds`` the finished seeds this run did not ask for (by seed). So ``--seeds 0`` after
    ``--seeds 0,1`` reports seed 0 alone but keeps seed 1, and ``--seeds 0,1`` again trains
    nothing.
    """
    if config.stagewise:
        raise ConfigError("--stagewise: run it with delt.stagewise.evaluate_stagewise")
    config.check_results_path(probe=False)
    with results_lock(config.results_path) as lock:
        checkpoints = config.seed_checkpoint_path(0).parent
        kept = kept_folder(config.results_path)
        # A killed write of a seed's training state, or of a results file kept aside.
        lock.sweep(checkpoints, kept, recursive=False)
        return _evaluate(config)


def _evaluate(config: EvalConfig) -> EvalResult:
    context = EvalContext.from_config(config)
    identity = context.identity()
    path = config.results_path
    finished: dict[int, SeedResult] = {}
    saved_order: list[int] = []
    results = ResultsFile.open(path, EVAL_FORMAT, identity, context.identity_defaults())
    if results.document is not None:
        saved = results.document
        for entry in saved["seeds"] + saved.get("other_seeds", []):
            finished[int(entry["seed"])] = SeedResult(**entry)
        saved_order = [int(entry["seed"]) for entry in saved["seeds"]]
    reused = all(seed in finished for seed in config.seeds)
    # New seeds would be tested on a split a legacy file cannot vouch for: all afresh.
    if results.legacy and not results.keep_legacy(reused):
        finished, saved_order = {}, []
    rewrite = not results.legacy and (saved_order != list(config.seeds) or results.needs_write)
    if not reused or rewrite:
        config.check_results_path()  # before training: a result that cannot be saved is lost
    logger.info(
        "eval: %s, %d images (IPC %d), student %s%s, %d epochs, batch %d, seeds %s%s",
        "random real" if config.random_real else config.distilled,
        context.ipc * context.info.num_classes if config.random_real else len(context.images),
        context.ipc, context.student_arch, context.student_kwargs or "", config.epochs,
        context.settings.batch_size, ",".join(map(str, config.seeds)),
        " (all cached)" if reused else "",
    )  # fmt: skip

    def document() -> dict:
        done = [finished[s] for s in config.seeds if s in finished]
        others = [finished[s] for s in sorted(finished) if s not in config.seeds]
        return eval_document(context, identity, done, len(done) == len(config.seeds), others)

    for seed in config.seeds:
        if seed in finished:
            continue
        result = context.run_seed(seed, identity)
        logger.info(
            "eval: seed %d: best %.2f%% (epoch %d), final %.2f%%, %.0f s",
            seed, result.best_accuracy, result.best_epoch, result.final_accuracy, result.seconds,
        )  # fmt: skip
        finished[seed] = result
        # Saved after every seed (with the finished ones): a killed run resumes at the next one.
        if is_main():  # under torchrun every rank trained the same students
            results.write(document())
            state_path = config.seed_checkpoint_path(seed)
            state_path.unlink(missing_ok=True)
            if state_path.parent.is_dir() and not any(state_path.parent.iterdir()):
                state_path.parent.rmdir()
    seeds = [finished[seed] for seed in config.seeds]
    if results.legacy and saved_order != list(config.seeds):
        # A subset or reordering of a file that is not rewritten: summarized here only.
        return EvalResult.read(path, seeds, reused, _legacy_summary(results.document, seeds))
    if reused and rewrite and is_main():
        results.write(document())  # a subset or reordering: the summary is over --seeds
    barrier()  # rank 0's file, read by every rank
    return EvalResult.read(path, seeds, reused)


def _legacy_summary(saved: dict, seeds: list[SeedResult]) -> dict:
    """A results file's content summarized over ``seeds`` (requested, all in it), as
    :func:`eval_document` would write it, without writing it."""
    chosen = {s.seed for s in seeds}
    every = saved["seeds"] + saved.get("other_seeds", [])
    return {
        **saved,
        "seeds": [asdict(s) for s in seeds],
        "other_seeds": [e for e in every if int(e["seed"]) not in chosen],
        **summary(seeds),
    }
