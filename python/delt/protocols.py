"""Evaluation protocols as named presets: ``delt eval --protocol NAME`` (docs/protocols.md).

A protocol is a table of ``delt eval`` settings (:data:`SETTINGS`, each a field of
:class:`delt.evaluate.EvalConfig`) with the paper and repository it follows, and the list of
what that protocol does which this library does not (:attr:`Protocol.not_supported`: logged as
a WARNING and recorded in ``eval.json``). A setting the user gives explicitly (a flag, or a
field that is not None) overrides the preset; :func:`apply_protocol` fills in the rest.

Identity: the resolved settings are fields of the evaluation's identity already; the protocol's
name joins it when it is not ``delt`` (:func:`trim_identity`), so a preset changed later gives
a new identity (its resolved values differ), and ``--protocol delt`` at today's values adds
nothing: results files written before protocols existed are reused.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Any

from delt.config import ConfigError
from delt.runtime import logger
from delt.student_trainer import LR_SCHEDULES, PROTOCOL

__all__ = [
    "DEFAULT_PROTOCOL",
    "EvalSettings",
    "PROTOCOLS",
    "SETTINGS",
    "Protocol",
    "apply_protocol",
    "protocol_names",
    "protocol_record",
    "trim_identity",
    "warn_unsupported",
]

# The fields of delt eval a protocol sets (None in a config: take the protocol's value).
SETTINGS = (
    "epochs",
    "eval_every",
    "batch_size",
    "temperature",
    "lr",
    "weight_decay",
    "cutmix_beta",
    "randaugment_ops",
    "randaugment_magnitude",
    "min_crop",
    "shuffle_patches",
    "lr_schedule",
    "ema_decay",
    "loss",
    "ce_weight",
    "teacher_batch_stats",
)

DEFAULT_PROTOCOL = "delt"


class EvalSettings(typing.Protocol):
    """What this module reads of a ``delt eval`` config (:class:`delt.evaluate.EvalConfig`),
    besides the :data:`SETTINGS` it fills."""

    protocol: str
    hard_labels: bool
    lr_schedule: str | None
    ema_decay: float | None
    loss: str | None
    ce_weight: float | None


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol.

    Attributes:
        name: ``--protocol`` value.
        source: the paper and the repository (with the files) the settings follow.
        settings: a value for every name in :data:`SETTINGS`; ``batch_size`` None: DELT/RDED's
            IPC rule (:func:`delt.student_trainer.default_batch_size`), ``shuffle_patches``
            None: off.
        hard_labels: settings that replace ``settings`` under ``--hard-labels`` (unless given).
        not_supported: what the protocol does that ``delt eval`` does not (WARNING).
        notes: deviations that do not change the recipe much (docs and ``eval.json`` only).
    """

    name: str
    source: str
    settings: dict[str, Any]
    hard_labels: dict[str, Any] = field(default_factory=dict)
    not_supported: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def resolved(self, hard_labels: bool = False) -> dict[str, Any]:
        """The protocol's value of every setting (with ``--hard-labels``: its hard-label ones)."""
        return {**self.settings, **(self.hard_labels if hard_labels else {})}


def _settings(**values: Any) -> dict[str, Any]:
    """A full settings table: DELT's defaults, with ``values`` changed."""
    table = {
        "epochs": 300,
        "eval_every": 10,
        "batch_size": None,
        "temperature": PROTOCOL.temperature,
        "lr": PROTOCOL.lr,
        "weight_decay": PROTOCOL.weight_decay,
        "cutmix_beta": PROTOCOL.cutmix_beta,
        "randaugment_ops": PROTOCOL.randaugment_ops,
        "randaugment_magnitude": PROTOCOL.randaugment_magnitude,
        "min_crop": PROTOCOL.min_crop,
        "shuffle_patches": None,
        "lr_schedule": "half-cosine",
        "ema_decay": 0.0,
        "loss": "kl",
        "ce_weight": 0.025,
        "teacher_batch_stats": False,
    }
    unknown = set(values) - set(table)
    if unknown:
        raise KeyError(f"not protocol settings: {sorted(unknown)}")
    return {**table, **values}


_STORED_LABELS = (
    "soft labels stored once offline (FKD: one relabel pass per epoch, fp16 logits); delt eval "
    "labels every augmented batch online with the teacher (the same crops and CutMix, "
    "unrounded logits)"
)

PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            name="delt",
            source="DELT (Shen et al., CVPR 2025), github.com/VILA-Lab/DELT "
            "evaluation/main.py, after RDED's online-teacher evaluation",
            settings=_settings(),
        ),
        Protocol(
            name="rded",
            source="RDED (Sun et al., CVPR 2024), github.com/LINs-lab/RDED argument.py, "
            "validation/main.py, scripts/*_cr5.sh (--factor 2)",
            settings=_settings(randaugment_ops=0, min_crop=0.5, shuffle_patches=2),
            not_supported=(
                "RDED reports the best test accuracy over the last 20% of epochs only; delt eval "
                "takes it over every test (the final accuracy is recorded beside it)",
            ),
            notes=(
                "RDED's AdamW LR depends on the student (1e-3 for ResNet-18 and ConvNets, 5e-4 "
                "VGG-11, 2e-3 EfficientNet-B0, 2.5e-3 MobileNetV2, 1e-4 ViT/Swin): pass --lr",
                "CIFAR-100 with conv3 teacher and student: batch 25 and LR 2e-3 in RDED",
            ),
        ),
        Protocol(
            name="sre2l",
            source="SRe2L (Yin et al., NeurIPS 2023), github.com/VILA-Lab/SRe2L "
            "SRe2L/validate/train_FKD.py, train_FKD.sh, relabel/relabel.sh "
            "(the FKD relabel protocol in its online form)",
            settings=_settings(
                batch_size=1024,
                randaugment_ops=0,
                min_crop=0.08,
                lr_schedule="cosine",
            ),
            not_supported=(_STORED_LABELS,),
            notes=("the batch is capped at the set's size (SRe2L's 1024 is for ImageNet-1K)",),
        ),
        Protocol(
            name="edc",
            source="EDC (Shao et al., NeurIPS 2024), github.com/shaoshitong/EDC "
            "Branch_full_ImageNet_1k/train/train.sh, train_FKD_parallel.py, relabel/relabel.sh",
            settings=_settings(
                eval_every=30,
                batch_size=100,
                randaugment_ops=0,
                min_crop=0.5,
                shuffle_patches=2,
                ema_decay=0.99,
                loss="mse-ce",
            ),
            not_supported=(
                "EDC relabels with several teachers (--candidate-number 4); delt eval uses the "
                "one --teacher",
                _STORED_LABELS,
            ),
            notes=(
                "EDC tests the EMA of the student's parameters (--ema-dr 0.99) with the "
                "student's own BatchNorm statistics, as --ema-decay does",
                "EDC's LR factor 0.5(1 + cos(pi e / (2E))) (--st 2) is delt's half-cosine",
                "EDC tests after epochs 1, 31, 61, ...; delt eval after 30, 60, ... and the last",
            ),
        ),
        Protocol(
            name="cvdd",
            source="CV-DD (Cui et al., arXiv 2501.07575), github.com/Jiacheng8/CV-DD "
            "validate/train_fkd.py, validate/scripts/imagenet1k_experiment/*.sh, "
            "relabel/relabel.py",
            settings=_settings(
                batch_size=16, randaugment_ops=0, min_crop=0.08, teacher_batch_stats=True
            ),
            not_supported=(
                "CV-DD's labels come from a 5-teacher ensemble (ResNet-18, ResNet-50, "
                "ShuffleNetV2, MobileNetV2, DenseNet-121) weighted by each teacher's accuracy; "
                "delt eval uses the one --teacher",
                _STORED_LABELS,
            ),
            notes=(
                "batch-statistics labels (CV-DD's --eval-mode F: teachers in train mode) are "
                "--teacher-batch-stats; under torchrun each rank's teacher normalizes its own "
                "rows of the batch",
                "CV-DD's schedule is the half-cosine (eta 2) except at ImageNet-1K IPC 50, "
                "where it is the full cosine: pass --lr-schedule cosine there",
                "CV-DD's AdamW LR depends on dataset, student and IPC (1e-3 or 5e-4): pass --lr",
            ),
        ),
        Protocol(
            name="dd-ranking",
            source="DD-Ranking (Li et al., arXiv 2505.13300), github.com/NUS-HPC-AI-Lab/DD-Ranking "
            "ddranking/metrics/soft_label.py, ddranking/utils/train_and_eval.py, branch eval "
            "configs (SRe2L/ImageNet1K/IPC10.yaml: its soft-label recipe)",
            settings=_settings(
                eval_every=20,
                batch_size=1024,
                randaugment_ops=0,
                min_crop=0.08,
            ),
            # use_aug_for_hard: false: no CutMix for the hard-label runs (crops and flips stay).
            hard_labels={"cutmix_beta": 0.0},
            not_supported=(
                "DD-Ranking searches the LR over {1e-3, 5e-3, 1e-2, 5e-2, 1e-1} for every "
                "soft-label run of a method without its own LR; delt eval trains at --lr "
                "(delt.ddranking.lr_search does the search over delt eval runs)",
                "DD-Ranking decays all parameters; delt eval decays weights with ndim > 1 only",
            ),
            notes=(
                "the batch is capped at the set's size",
                "its 'cosine' schedule is 0.5(1 + cos(pi e / (2E))): delt's half-cosine",
            ),
        ),
    )
}


def protocol_names() -> tuple[str, ...]:
    """The ``--protocol`` choices."""
    return tuple(PROTOCOLS)


def apply_protocol(config: EvalSettings) -> None:
    """Fills each setting of ``config`` (a :class:`delt.evaluate.EvalConfig`) that is None with
    the value of its protocol (``config.protocol``; ``--hard-labels``: the protocol's
    hard-label values), in place.

    Raises:
        ConfigError: an unknown protocol, or a value outside ``--lr-schedule``'s choices.
    """
    protocol = PROTOCOLS.get(config.protocol)
    if protocol is None:
        raise ConfigError(
            f"--protocol must be one of {', '.join(PROTOCOLS)}, got {config.protocol!r}"
        )
    ce_weight_given = config.ce_weight is not None
    for name, value in protocol.resolved(config.hard_labels).items():
        if getattr(config, name) is None:
            setattr(config, name, value)
    if not 0.0 <= config.ema_decay < 1.0:
        raise ConfigError(f"--ema-decay must be in [0, 1) (0: off), got {config.ema_decay}")
    if config.loss not in ("kl", "mse-ce"):
        raise ConfigError(f"--loss must be kl or mse-ce, got {config.loss!r}")
    # A resolved config rebuilt (dataclasses.replace) carries the preset's weight: not an error.
    preset_weight = protocol.resolved(config.hard_labels)["ce_weight"]
    if ce_weight_given and config.loss != "mse-ce" and config.ce_weight != preset_weight:
        raise ConfigError(f"--ce-weight applies with --loss mse-ce, not --loss {config.loss}")
    if not (math.isfinite(config.ce_weight) and config.ce_weight >= 0):
        raise ConfigError(f"--ce-weight must be a finite number >= 0, got {config.ce_weight}")
    if config.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(
            f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {config.lr_schedule!r}"
        )


def protocol_record(config: EvalSettings) -> dict[str, Any]:
    """What ``eval.json`` records of a resolved config's protocol: its name and source, the
    resolved settings, those given explicitly that differ from the protocol's (``overrides``:
    name → the protocol's value), and what it needs that delt eval does not do."""
    protocol = PROTOCOLS[config.protocol]
    preset = protocol.resolved(config.hard_labels)
    settings = {name: getattr(config, name) for name in SETTINGS}
    return {
        "name": protocol.name,
        "source": protocol.source,
        "settings": settings,
        "overrides": {name: preset[name] for name in SETTINGS if settings[name] != preset[name]},
        "not_supported": list(protocol.not_supported),
        "notes": list(protocol.notes),
    }


def trim_identity(config_identity: dict[str, Any]) -> None:
    """Drops the protocol's entries at their defaults from an evaluation's identity config, in
    place: ``--protocol delt`` and ``--lr-schedule half-cosine`` (what every evaluation was before
    they existed), so older results files keep their identity; likewise ``--ema-decay 0`` and
    ``--loss kl`` (with its unused ``--ce-weight``) and ``--no-teacher-batch-stats``."""
    if config_identity.get("protocol") == DEFAULT_PROTOCOL:
        del config_identity["protocol"]
    if config_identity.get("lr_schedule") == "half-cosine":
        del config_identity["lr_schedule"]
    if config_identity.get("ema_decay") == 0.0:
        del config_identity["ema_decay"]
    if config_identity.get("teacher_batch_stats") is False:
        del config_identity["teacher_batch_stats"]
    if config_identity.get("loss") == "kl":  # --ce-weight applies to mse-ce only
        del config_identity["loss"]
        config_identity.pop("ce_weight", None)


def warn_unsupported(config: EvalSettings) -> None:
    """A WARNING for each thing ``config``'s protocol does that delt eval does not."""
    for gap in PROTOCOLS[config.protocol].not_supported:
        if gap is _STORED_LABELS and getattr(config, "labels", None):
            continue  # --labels: stored labels are what this evaluation trains on
        logger.warning("eval: --protocol %s: not done here: %s", config.protocol, gap)
