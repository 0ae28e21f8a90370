"""Several teachers (``--teachers``; docs/teachers.md): the per-step policy of the papers that
synthesize against an ensemble, the teachers' weights, the checks that they are teachers of the
same data, and the two ways an ensemble is used:

- in synthesis (:func:`ensemble_parts`), every active teacher contributes its cross-entropy
  and its BN-statistic term, ``sum_m w_m (CE_m + r_bn · BN_m)`` (CV-DD, Cui et al. 2025,
  github.com/Jiacheng8/CV-DD ``recover/recover.py``); which teachers are active at a step is
  the policy (:func:`active_teachers`): ``all`` of them, ``round-robin`` one per step
  (G-VBSM, Shao et al., CVPR 2024; FADRM+, github.com/Jiacheng8/FADRM ``recover/recover.py``)
  or a fixed ``pair`` per IPC index (CV-DD); the weights (:func:`teacher_weights`) are uniform
  or CV-DD's prior ``softmax(top-1 / 5)`` over the active teachers;
- for soft labels (:class:`EnsembleLogits`, ``delt eval --teachers``, ``delt relabel
  --teachers``), the teachers' logits averaged after equalizing their norms as G-VBSM's
  relabel does (github.com/shaoshitong/G_VBSM_Dataset_Condensation,
  ``relabel/generate_soft_label_with_db.py``).

The first teacher is ``--teacher`` (the one a run is checked against: its dataset, the
selection, the statistics), then ``--teachers`` in the order given.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

import delt_ext
from delt.config import ConfigError, option
from delt.data import DatasetInfo
from delt.io import sha256_file
from delt.models import (
    Checkpoint,
    TeacherMismatchError,
    check_compatible,
    data_fingerprint,
    load_checkpoint,
)

__all__ = [
    "POLICIES",
    "PRIOR_TEMPERATURE",
    "WEIGHTINGS",
    "EnsembleForward",
    "EnsembleLogits",
    "EnsembleTarget",
    "TeacherOptions",
    "active_teachers",
    "check_teacher_options",
    "ensemble_parts",
    "equalized_mean",
    "load_teachers",
    "priors_of",
    "resolved_teachers",
    "teacher_inputs",
    "teacher_pairs",
    "teacher_record",
    "teacher_weights",
]

POLICIES = ("all", "round-robin", "pair")
WEIGHTINGS = ("uniform", "prior")
# CV-DD's --weight-temperature default (recover/recover.py): w = softmax(top-1 [%] / 5).
PRIOR_TEMPERATURE = 5.0
_FIELDS = ("teacher_policy", "teacher_weights", "teacher_priors")


@dataclass(kw_only=True)
class TeacherOptions:
    """The flags of several teachers, shared by every optimizing method (``delt recover``)."""

    teachers: tuple[str, ...] = option(
        (),
        help="more teacher checkpoints of the same data beside --teacher: each contributes its "
        "CE and BN term (docs/teachers.md)",
        identity=False,
    )
    teacher_policy: Literal["all", "round-robin", "pair"] | None = option(
        None,
        help="--teachers: which teachers each step uses: all (default), round-robin (one per "
        "step, G-VBSM, FADRM+) or pair (a fixed pair per IPC index, CV-DD)",
    )
    teacher_weights: Literal["uniform", "prior"] | None = option(
        None,
        help="--teachers: each step's weights over its teachers: uniform (default) or prior "
        "(CV-DD: softmax(top-1 / 5))",
    )
    teacher_priors: tuple[float, ...] = option(
        (),
        help="--teacher-weights prior: each teacher's top-1 in percent, --teacher first "
        "(default: the test top-1 each checkpoint records)",
    )


# --------------------------------------------------------------------------------------------
# Policies and weights: pure functions


def teacher_pairs(count: int) -> list[tuple[int, int]]:
    """CV-DD's sequence of teacher pairs: every pair of ``count`` teachers in lexicographic order
    (its ``model_choice_sequence`` for 5 teachers: (0, 1), (0, 2), ..., (3, 4))."""
    return list(itertools.combinations(range(count), 2))


def active_teachers(policy: str, count: int, iteration: int, ipc_index: int) -> tuple[int, ...]:
    """The teachers (indices into the ``count`` teachers, ``--teacher`` = 0) a step uses.

    Args:
        policy: ``all``; ``round-robin``: teacher ``iteration mod count`` (the counter restarts
            with every batch, as FADRM's); ``pair``: pair ``ipc_index mod C(count, 2)`` of
            :func:`teacher_pairs` (CV-DD stops at C(count, 2) IPC indices; cycling is ours).
        iteration: the step of the chunk's loop (from 0).
        ipc_index: the images' index within their class (one per batch with ``pair``).
    """
    if policy == "all":
        return tuple(range(count))
    if policy == "round-robin":
        return (iteration % count,)
    if policy == "pair":
        pairs = teacher_pairs(count)
        return pairs[ipc_index % len(pairs)]
    raise ValueError(f"unknown teacher policy {policy!r}; known: {', '.join(POLICIES)}")


def teacher_weights(weighting: str, priors: Sequence[float]) -> list[float]:
    """The weights of a step's teachers (python floats, summing to 1).

    Args:
        weighting: ``uniform`` (``1 / n``) or ``prior``: CV-DD's ``softmax(prior / 5)`` over the
            step's teachers (``recover/utils_recover.py``, ``load_recover_model``).
        priors: the step's teachers' top-1 accuracies in percent (read with ``prior`` only).
    """
    if weighting == "uniform":
        return [1.0 / len(priors)] * len(priors)
    if weighting != "prior":
        raise ValueError(f"unknown teacher weighting {weighting!r}; known: {', '.join(WEIGHTINGS)}")
    scaled = [p / PRIOR_TEMPERATURE for p in priors]
    top = max(scaled)  # shifted: the same softmax, no overflow
    exps = [math.exp(s - top) for s in scaled]
    return [e / sum(exps) for e in exps]


# --------------------------------------------------------------------------------------------
# Flags: validation, defaults, identity, records


def check_teacher_options(
    config: TeacherOptions, teacher: str, one_image_per_class: bool, label: str
) -> None:
    """Validates the teacher flags of an optimizing method's config (``teacher``: its
    ``--teacher``; ``label`` names the method; ``one_image_per_class``: its batches hold one
    IPC index).

    Raises:
        ConfigError: naming the flag.
    """
    teachers = tuple(config.teachers)
    config.teachers = teachers
    config.teacher_priors = tuple(float(p) for p in config.teacher_priors)
    if not teachers:
        for name in _FIELDS:
            if getattr(config, name) not in (None, ()):
                raise ConfigError(f"--{name.replace('_', '-')} applies with --teachers")
        return
    count = 1 + len(teachers)
    paths = [str(teacher), *teachers]
    for i, path in enumerate(paths):
        if path in paths[:i]:
            raise ConfigError(f"--teachers: {path} is given twice; each teacher counts once")
    if config.teacher_policy == "pair" and not one_image_per_class:
        raise ConfigError(
            f"--teacher-policy pair takes one IPC index per batch (class-interleaved batches: "
            f"--method sre2l, cda or pdd over them); {label} batches a class's images together"
        )
    if config.teacher_weights != "prior" and config.teacher_priors:
        raise ConfigError("--teacher-priors applies with --teacher-weights prior")
    priors = config.teacher_priors
    if priors and len(priors) != count:
        raise ConfigError(
            f"--teacher-priors: expected {count} accuracies (--teacher, then each of "
            f"--teachers), got {len(priors)}"
        )
    for value in priors:
        if not (math.isfinite(value) and 0 <= value <= 100):
            raise ConfigError(f"--teacher-priors must be top-1 accuracies in [0, 100], got {value}")
    chunks_per_step = getattr(config, "chunks_per_step", 1)
    if chunks_per_step > 1:
        raise ConfigError(
            f"--teachers works with --chunks-per-step 1, got {chunks_per_step} (one "
            "ensemble forward per chunk)"
        )
    match = getattr(config, "match", "global")
    if match != "global":
        # Per-class statistics are one teacher's (--stats); one file per teacher is not built.
        raise ConfigError(
            f"--teachers works with --match global (each teacher's running statistics), got "
            f"--match {match}"
        )


def resolved_teachers(config: TeacherOptions) -> dict[str, Any]:
    """The defaults of the teacher flags filled in (nothing without ``--teachers``)."""
    if not config.teachers:
        return {}
    return {
        "teacher_policy": config.teacher_policy or "all",
        "teacher_weights": config.teacher_weights or "uniform",
    }


def teacher_inputs(teachers: Sequence[str]) -> dict[str, Any]:
    """The identity entry of ``--teachers``: their SHA-256 in order (none: nothing)."""
    return {"teachers_sha256": [sha256_file(path) for path in teachers]} if teachers else {}


def teacher_record(checkpoints: Sequence[Checkpoint], priors: Sequence[float]) -> list[dict]:
    """What a manifest or eval.json records of an ensemble: per teacher (``--teacher`` first)
    its path, SHA-256, architecture, recorded test top-1 and prior (None: not weighted so)."""
    return [
        {
            "path": str(checkpoint.path),
            "sha256": sha256_file(checkpoint.path),
            "arch": checkpoint.meta["arch"],
            "arch_kwargs": checkpoint.meta["arch_kwargs"],
            "test_accuracy": checkpoint.meta.get("test_accuracy"),
            "prior": None if not priors else priors[i],
        }
        for i, checkpoint in enumerate(checkpoints)
    ]


def load_teachers(
    paths: Sequence[str], first: Checkpoint, info: DatasetInfo, flag_name: str = "--teachers"
) -> list[Checkpoint]:
    """Loads ``--teachers`` and refuses, before any work, one made on other data than ``first``
    (``--teacher``; its dataset ``info``: name, classes, class order, resolution, normalization,
    training split) or a teacher given twice (the same SHA-256).

    Raises:
        TeacherMismatchError, ConfigError: naming the file.
    """
    digests = {sha256_file(first.path): str(first.path)}
    checkpoints = []
    for path in paths:
        checkpoint = load_checkpoint(path)
        try:
            check_compatible(checkpoint.meta, info, fingerprint=data_fingerprint(first.meta))
        except TeacherMismatchError as error:
            raise TeacherMismatchError(f"{flag_name} {path}: {error}") from None
        digest = sha256_file(checkpoint.path)
        if digest in digests:
            raise ConfigError(
                f"{flag_name} {path}: the same teacher as {digests[digest]} (same SHA-256); "
                "each teacher counts once"
            )
        digests[digest] = path
        checkpoints.append(checkpoint)
    return checkpoints


def priors_of(config: TeacherOptions, checkpoints: Sequence[Checkpoint]) -> list[float]:
    """The priors of ``--teacher-weights prior``: ``--teacher-priors``, else each checkpoint's
    recorded test top-1 (percent); empty with uniform weights.

    Raises:
        ConfigError: a checkpoint records no accuracy and no ``--teacher-priors`` was given.
    """
    if config.teacher_weights != "prior":
        return []
    if config.teacher_priors:
        return [float(p) for p in config.teacher_priors]
    priors = []
    for checkpoint in checkpoints:
        accuracy = checkpoint.meta.get("test_accuracy")
        if accuracy is None:
            raise ConfigError(
                f"--teacher-weights prior: {checkpoint.path} records no test accuracy (imported "
                "without --measure); pass --teacher-priors"
            )
        priors.append(float(accuracy))
    return priors


# --------------------------------------------------------------------------------------------
# Synthesis: the ensemble's forward and loss


class EnsembleForward(nn.Module):
    """The forward of a step's active teachers: (B, C, H, W) → (B, A, K) logits, the A active
    teachers' (set by :class:`EnsembleTarget` before each step) in order."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.active: tuple[int, ...] = tuple(range(len(models)))

    def forward(self, inputs: Tensor) -> Tensor:
        return torch.stack([self.models[i](inputs) for i in self.active], 1)


class EnsembleTarget:
    """The matching target of an ensemble (:class:`delt.method.MatchingTarget` plus the hooks
    :func:`delt.synthesis.optimize_chunk` calls): each teacher's :class:`delt_ext.
    BNStatMatching`, the policy's active teachers at each step and their weights.

    ``begin_chunk(chunk)`` before a chunk (its IPC index, for ``pair``), ``set_step(t)`` before
    each forward, then :meth:`ensemble_loss` of the forward's (B, A, K) logits.
    """

    def __init__(
        self,
        forward: EnsembleForward,
        matchings: Sequence[delt_ext.BNStatMatching],
        policy: str,
        weighting: str,
        priors: Sequence[float],
    ) -> None:
        self.forward, self.matchings = forward, list(matchings)
        self.policy, self.weighting, self.priors = policy, weighting, list(priors)
        self.weights = self.matchings[0].weights  # per BN layer (error messages read [0])
        self.ipc_index = 0
        self.step_weights = self._weights(self.forward.active)

    def _weights(self, active: tuple[int, ...]) -> list[float]:
        priors = [self.priors[i] for i in active] if self.priors else [0.0] * len(active)
        return teacher_weights(self.weighting, priors)

    def begin_chunk(self, chunk: Any) -> None:
        """A chunk starts: its IPC index (``pair``: one per chunk, checked by the flags)."""
        self.ipc_index = chunk.within_class[0]

    def set_step(self, iteration: int) -> None:
        active = active_teachers(self.policy, len(self.matchings), iteration, self.ipc_index)
        if active != self.forward.active:
            self.forward.active = active
            self.step_weights = self._weights(active)

    def ensemble_loss(self, logits: Tensor, targets: Tensor, r_bn: float) -> Tensor:
        """``sum_a w_a (CE(logits[:, a], targets) + r_bn · BN_a)`` over the active teachers;
        ``logits`` (B, A, K) of the last forward (the rows of the images that have labels)."""
        total = None
        for a, (i, weight) in enumerate(zip(self.forward.active, self.step_weights, strict=True)):
            ce = nn.functional.cross_entropy(logits[:, a].float(), targets)
            term = weight * (ce + r_bn * self.matchings[i].loss())
            total = term if total is None else total + term
        assert total is not None
        return total

    def loss(self) -> Tensor:
        """The weighted BN-statistic term of the last forward (0-dim)."""
        pairs = zip(self.forward.active, self.step_weights, strict=True)
        return sum(weight * self.matchings[i].loss() for i, weight in pairs)  # type: ignore[return-value]


@contextmanager
def ensemble_parts(
    models: Sequence[nn.Module],
    first_bn_multiplier: float,
    policy: str,
    weighting: str,
    priors: Sequence[float],
    device: torch.device,
    channels_last: bool,
) -> Iterator[tuple[EnsembleForward, EnsembleTarget]]:
    """The forward and matching target of an ensemble (``models``, ``--teacher`` first), each
    frozen on ``device`` and hooked by its own :class:`delt_ext.BNStatMatching`, with the
    ``policy`` and ``weighting`` of :func:`active_teachers` and :func:`teacher_weights`; the
    hooks are removed on exit."""
    frozen = []
    for model in models:
        model = model.to(device).requires_grad_(False)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        frozen.append(model)
    forward = EnsembleForward(frozen)
    with ExitStack() as stack:
        matchings = [
            stack.enter_context(
                delt_ext.BNStatMatching(model, first_bn_multiplier=first_bn_multiplier)
            )
            for model in frozen
        ]
        yield forward, EnsembleTarget(forward, matchings, policy, weighting, priors)


# --------------------------------------------------------------------------------------------
# Soft labels: G-VBSM's norm-equalized mean


def equalized_mean(logits: Tensor) -> Tensor:
    """G-VBSM's ensemble soft labels: (T, B, K) logits of T teachers on one batch → (B, K).

    Each teacher's (B, K) logits are scaled to the teachers' mean Frobenius norm over the batch,
    then averaged: ``mean_t(z_t / ||z_t|| · mean_s ||z_s||)``
    (``relabel/generate_soft_label_with_db.py``: ``torch.norm(output, dim=[1, 2])``).
    """
    norm = torch.linalg.vector_norm(logits, dim=(1, 2), keepdim=True)
    return (logits / norm * norm.mean(0, keepdim=True)).mean(0)


class EnsembleLogits(nn.Module):
    """Several teachers as one labeller: :func:`equalized_mean` of their logits (float32) on
    each batch. The norm is the batch's, as in G-VBSM: a soft label depends on its batch."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, inputs: Tensor) -> Tensor:
        return equalized_mean(torch.stack([model(inputs).float() for model in self.models]))
