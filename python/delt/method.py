"""Synthesis methods as registry entries (like timm's models): :class:`Method`, the registry
(:func:`register`, :func:`method_named`), the options every optimizing method shares
(:class:`SynthesisConfig`, the core of ``delt recover``'s flags) and the components a method is
composed of (:class:`MethodRecipe`: initialization, batching, iteration schedule, augmentation,
matching target, post-step).

A method owns its options dataclass (its own flags, shown in a help group of their own), their
validation, how it resolves its defaults and how it runs; commands look it up by name and never
branch on it. The built-in methods live in :mod:`delt.methods` (one module each); a new one is
one module and one :func:`register` call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from torch import Tensor

from delt.config import ConfigError, option, refuse_method_options
from delt.data import DatasetInfo
from delt.matching import MatchOptions, matching_target
from delt.schedules import Chunk, class_contiguous_chunks, class_interleaved_chunks
from delt.teachers import TeacherOptions

__all__ = [
    "DEFAULT_ROUND_ITERATIONS",
    "ClampPixels",
    "MatchingTarget",
    "Method",
    "MethodRecipe",
    "PostStep",
    "RecoverResult",
    "SynthesisConfig",
    "check_method_options",
    "method_named",
    "methods",
    "option_types",
    "clamp_to_pixel_range",
    "one_class_per_chunk",
    "register",
]

DEFAULT_ROUND_ITERATIONS = 500


@dataclass(kw_only=True)
class SynthesisConfig(MatchOptions, TeacherOptions):
    """The options every method of ``delt recover`` shares (one field per flag); a method's own
    flags are its :attr:`Method.options` dataclass, composed beside these by
    :class:`delt.recover.RecoverConfig`."""

    # Paths are not part of a run's identity (a moved folder still resumes); the teacher's and
    # the selection's contents are, through their SHA-256 in OUT/run.json.
    teacher: str = option(
        help="teacher checkpoint (DIR/teacher.pt of `delt teacher`)", identity=False
    )
    ipc: int = option(help="images per class to synthesize")
    out: str = option(help="output folder; re-running into it resumes", identity=False)
    method: str = option("delt", help="synthesis method")
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
    chunks_per_step: int = option(
        1,
        help="chunks optimized together in one teacher forward and backward, each with its own "
        "BN-statistic term and Adam state (the same loss as one at a time, up to float "
        "rounding; docs/chunks-per-step.md)",
        identity=False,
    )
    image_format: Literal["png", "jpeg"] = option(
        "png", help="image files: png (lossless) or jpeg (quality 75, as the papers)"
    )
    seed: int = option(0, help="random seed; chunk k uses a seed derived from (seed, k)")
    device: str = option("auto", help="auto, cpu, cuda, cuda:1, ...", identity=False)
    progress: bool = option(True, help="show progress bars", identity=False)
    keep_chunks: bool = option(
        False,
        help="keep the resume state after a finished recovery: OUT/chunks/ (pdd: every "
        "stages/<k>/chunks/ and the stage's own U_k set), a second float32 copy of the images; "
        "by default it is deleted once distilled.pt is written",
        identity=False,
    )

    @property
    def recipe(self) -> MethodRecipe | None:
        """The components of this config's method (None: a method of none, random-real)."""
        return method_named(self.method).recipe(self)


# The fields of SynthesisConfig that only the pixel optimization reads.
LOOP_FIELDS = (
    "selection", "iterations", "round_iterations", "lr", "beta1", "beta2", "r_bn",
    "first_bn_multiplier", "jitter", "per_sample_aug", "compile", "chunks_per_step", "match",
    "match_class_weight", "stats", "stats_convention", "teachers", "teacher_policy",
    "teacher_weights", "teacher_priors",
)  # fmt: skip


@dataclass
class RecoverResult:
    """Where a recovery's outputs are and what they cost."""

    out: Path
    images: Tensor  # (N, C, H, W) float32, normalized, class-major
    labels: Tensor  # (N,) int64
    iterations_per_image: list[int]
    synthesis_seconds: float  # the chunks' optimization seconds, summed (not wall time)


# --------------------------------------------------------------------------------------------
# Components


def sre2l_jitter(resolution: int) -> int:
    """SRe2L's and CDA's roll range: 32 pixels at 224 (ImageNet), 4 on Tiny/CIFAR (Yin et al.,
    NeurIPS 2023; Yin & Shen, TMLR 2024)."""
    return 32 if resolution >= 224 else 4


def one_class_per_chunk(num_classes: int, ipc: int, batch_size: int) -> list[Chunk]:
    """RDED's batching: one chunk per class (its ``ipc`` images; ``batch_size`` is the scoring
    forward's there)."""
    return class_contiguous_chunks(num_classes, ipc, ipc)


class MatchingTarget(Protocol):
    """What the synthesized images' statistics are matched to, as a loss over the hooked
    teacher's last forward: the teacher's running BN statistics (:class:`delt_ext.
    BNStatMatching`) or per-class ones (:class:`delt.matching.ClassMatching`, which also has
    ``set_labels(labels)``, called with the batch's classes before each forward)."""

    weights: list[float]  # per matched layer (the first one's multiplier first)

    def loss(self) -> Tensor: ...


class PostStep(Protocol):
    """The step's post-processing: applied in place to the pixels after every optimizer step
    (under ``torch.no_grad``)."""

    def __call__(self, pixels: Tensor) -> None: ...

    def to(self, device: object) -> PostStep: ...


@dataclass(frozen=True)
class ClampPixels:
    """Every pixel back into its channel's valid range, in normalized space: ``low`` and
    ``high`` (C, 1, 1) float32 (SRe2L's clip)."""

    low: Tensor
    high: Tensor

    def __call__(self, pixels: Tensor) -> None:
        pixels.clamp_(min=self.low, max=self.high)

    def to(self, device: object) -> ClampPixels:
        return ClampPixels(self.low.to(device), self.high.to(device))


def clamp_to_pixel_range(info: DatasetInfo) -> ClampPixels:
    """The post-step of the pixel methods: :class:`ClampPixels` to the dataset's pixel range."""
    low, high = info.pixel_bounds()
    return ClampPixels(low, high)


@dataclass(frozen=True)
class MethodRecipe:
    """The components a method is composed of (docs/methods.md).

    Attributes:
        init: the initialization: ``"noise"`` (standard normal in normalized space),
            ``"selection"`` (real images from ``delt select``, in selection order) or
            ``"scored_crops"`` (RDED's teacher-scored real crops).
        chunks: the batching, ``(num_classes, ipc, batch_size) -> list[Chunk]``
            (:func:`delt.schedules.class_interleaved_chunks`, ``class_contiguous_chunks``,
            :func:`one_class_per_chunk`).
        crop_curriculum: the augmentation's minimum crop scale over the loop
            (``schedules.CROP_CURRICULA``).
        early_late: the iteration schedule: MI/RI rounds (``--round-iterations``), else uniform.
        default_jitter: the augmentation's roll range in pixels by image resolution.
        stages: the iteration schedule's stages: PDD's progressive stages over the others
            (each stage a set of this recipe, the earlier stages frozen).
        target: the matching target, ``(teacher, config, first_bn_multiplier, statistics) ->
            context manager`` (:func:`delt.matching.matching_target`: ``--match``); None:
            nothing is optimized (RDED).
        post_step: the step's post-processing, made for the dataset (``info -> PostStep``).
    """

    init: Literal["noise", "selection", "scored_crops"]
    chunks: Callable[[int, int, int], list[Chunk]]
    crop_curriculum: str
    early_late: bool
    default_jitter: Callable[[int], int]
    stages: bool = False
    target: Callable[..., AbstractContextManager[MatchingTarget]] | None = matching_target
    post_step: Callable[[DatasetInfo], PostStep] = clamp_to_pixel_range

    @property
    def one_image_per_class(self) -> bool:
        """Whether a chunk holds at most one image of each class (class-interleaved)."""
        return self.chunks is class_interleaved_chunks


# --------------------------------------------------------------------------------------------
# Methods and the registry


class Method:
    """A synthesis method. Subclasses set :attr:`name` (and :attr:`options`, the dataclass of
    their own flags) and implement :meth:`recover`; the hooks below default to "nothing"."""

    name: ClassVar[str] = ""
    options: ClassVar[type | None] = None  # a dataclass of option() fields: this method's flags
    optimizes: ClassVar[bool] = True  # reads the pixel loop's flags (LOOP_FIELDS, --lr)
    recovers: ClassVar[bool] = True  # a method of `delt recover` (random-real: distill only)
    checks_data: ClassVar[bool] = False  # has a check_data (run before the teacher is trained)

    def recipe(self, config: SynthesisConfig) -> MethodRecipe | None:
        """The components the method is composed of; None for one of none (random-real)."""
        return None

    def label(self, config: object) -> str:
        """How messages name the method (pdd: with its base)."""
        return self.name

    def check_options(self, options: Any, ipc: int) -> None:
        """Validates an instance of :attr:`options` (raises ConfigError naming the flag)."""

    def check(self, config: SynthesisConfig) -> None:
        """Validates the shared options this method reads."""

    def resolved(self, config: SynthesisConfig, info: DatasetInfo) -> dict[str, Any]:
        """The fields whose defaults this method fills in (for ``dataclasses.replace``)."""
        return {}

    def starts_from_selection(self, config: object) -> bool:
        """Whether the method starts from `delt select`'s images."""
        return False

    def reads_training_set(self, config: object) -> bool:
        """Whether the method reads the training set itself (``--data-root`` applies)."""
        return self.starts_from_selection(config)

    def check_data(self, config: object, dataset: Any) -> None:
        """Checks the options against the training set, before any work."""

    def check_teacher(self, config: SynthesisConfig, teacher_path: str) -> None:
        """Checks what the method needs beside the teacher file, before any work."""

    def recover(self, config: SynthesisConfig) -> RecoverResult:
        """Runs (or resumes) ``delt recover`` with this method into ``config.out``."""
        raise NotImplementedError(f"--method {self.name} does not run in delt recover")

    def draw_set(
        self, teacher_path: str, ipc: int, seed: int, data_root: str | None, folder: Path
    ) -> None:
        """A method that is not a recovery (:attr:`recovers` False): saves its set in
        ``folder`` (``delt distill``)."""
        raise NotImplementedError(f"--method {self.name} is a recovery")

    def options_of(self, config: object) -> Any:
        """This method's options, read off a config that holds its fields."""
        assert self.options is not None
        return self.options(
            **{f.name: getattr(config, f.name) for f in dataclasses.fields(self.options)}
        )


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Adds ``method`` to the registry under its name (a second one of that name replaces it)."""
    _REGISTRY[method.name] = method
    return method


def methods(recovers: bool | None = None, optimizes: bool | None = None) -> dict[str, Method]:
    """The registered methods, in registration order, filtered by what they do."""
    return {
        name: method
        for name, method in _REGISTRY.items()
        if recovers in (None, method.recovers) and optimizes in (None, method.optimizes)
    }


def method_named(name: str, recovers: bool | None = None) -> Method:
    """The registered method ``name``.

    Raises:
        ConfigError: ``"--method NAME: unknown method; known: ..."``.
    """
    known = methods(recovers)
    if name not in known:
        raise ConfigError(f"--method {name!r}: unknown method; known: {', '.join(known)}")
    return known[name]


def option_types() -> tuple[type, ...]:
    """The options dataclasses of the registered methods, in registration order: the bases
    ``delt recover`` and ``delt distill`` compose their configs of."""
    return tuple(m.options for m in _REGISTRY.values() if m.options is not None)


def check_method_options(config: object, method: Method, ipc: int) -> None:
    """Each method's own flags on ``config``: validated (and normalized) for ``method``, refused
    for the others (``"<flag> applies to --method <name>, not <method>"``), in registration
    order."""
    for other in _REGISTRY.values():
        if other.options is None:
            continue
        if other is method:
            options = method.options_of(config)
            method.check_options(options, ipc)
            for field in dataclasses.fields(options):
                setattr(config, field.name, getattr(options, field.name))
            continue
        fields = {field.name: field for field in dataclasses.fields(other.options)}
        refuse_method_options(config, fields, other.name)
