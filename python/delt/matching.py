"""The matching target of the pixel optimization, a component of every optimizing method
(``--match``; docs/stats.md):

- ``global`` (the default, SRe2L's): every BN layer's batch mean and variance against the
  teacher's running statistics (:class:`delt_ext.BNStatMatching`, exactly as before);
- ``class`` (WMDD, Liu et al., ICCV 2025): each class's images in the batch against that
  class's statistics of ``delt stats`` (:mod:`delt.stats`), by the grouped
  :func:`delt_ext.bn_stat_loss` with every image's class as its group, the mean over the
  classes present; the batches are class-contiguous;
- ``class-mean`` (EDC's "soft category-aware matching", Shao et al., NeurIPS 2024): the batch's
  statistics against the mean, over the batch's images, of their classes' statistics.

``--match-class-weight W`` mixes: per layer ``(1 - W) · global + W · class term`` (EDC: 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

import delt_ext
from delt.config import ConfigError, option
from delt.stats import CONVENTIONS, BNStatistics

__all__ = [
    "DEFAULT_CONVENTION",
    "MATCHES",
    "ClassMatching",
    "MatchOptions",
    "check_match",
    "matching_target",
    "resolved_match",
]

MATCHES = ("global", "class", "class-mean")
# Each style's statistics as its paper computes them: WMDD's per-batch averages, EDC's
# per-image averages.
DEFAULT_CONVENTION = {"class": "batch", "class-mean": "image"}
_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)


@dataclass(kw_only=True)
class MatchOptions:
    """The matching target's flags, shared by every optimizing method (``delt recover``,
    ``delt distill``)."""

    match: Literal["global", "class", "class-mean"] = option(
        "global",
        help="BN matching target: global (the teacher's running statistics), class (WMDD: each "
        "class's images against its class statistics; class-contiguous batches), class-mean "
        "(EDC: the batch against the mean of its images' class statistics); docs/stats.md",
    )
    match_class_weight: float | None = option(
        None,
        help="--match class/class-mean: weight W of the class term, (1 - W) of the global "
        "one (default 1; EDC: 0.5)",
    )
    stats: str | None = option(
        None,
        help="--match class/class-mean: statistics file of `delt stats` with the same teacher "
        "(delt distill: default OUT/stats.pt, made there)",
        identity=False,
    )
    stats_convention: Literal["pixel", "batch", "image"] | None = option(
        None,
        help="--match class/class-mean: which statistics of the file: pixel (all pixels), batch "
        "(average of per-batch ones), image (average of per-image ones); default: batch for "
        "class (WMDD), image for class-mean (EDC)",
    )


def check_match(config: MatchOptions) -> None:
    """Validates the matching flags of a config holding :class:`MatchOptions`' fields.

    Raises:
        ConfigError: naming the flag.
    """
    if config.match not in MATCHES:
        raise ConfigError(f"--match {config.match!r}: expected one of {', '.join(MATCHES)}")
    if config.match == "global":
        for name in ("match_class_weight", "stats", "stats_convention"):
            if getattr(config, name) is not None:
                raise ConfigError(
                    f"--{name.replace('_', '-')} applies to --match class or class-mean"
                )
        return
    weight = config.match_class_weight
    if weight is not None and not (math.isfinite(weight) and 0 < weight <= 1):
        raise ConfigError(f"--match-class-weight must be in (0, 1], got {weight}")
    if config.stats_convention is not None and config.stats_convention not in CONVENTIONS:
        raise ConfigError(
            f"--stats-convention {config.stats_convention!r}: expected one of "
            f"{', '.join(CONVENTIONS)}"
        )
    if config.stats is None:
        raise ConfigError(
            f"--match {config.match} needs --stats FILE (make it with `delt stats --teacher "
            "T --out FILE`)"
        )


def resolved_match(config: MatchOptions) -> dict[str, Any]:
    """The defaults of the matching flags filled in (nothing for ``--match global``)."""
    if config.match == "global":
        return {}
    return {
        "match_class_weight": 1.0
        if config.match_class_weight is None
        else config.match_class_weight,
        "stats_convention": config.stats_convention or DEFAULT_CONVENTION[config.match],
    }


class ClassMatching:
    """A matching target against per-class statistics (``--match class`` or ``class-mean``),
    hooking every BN layer of ``model`` like :class:`delt_ext.BNStatMatching`; before each
    forward, :meth:`set_labels` gives the class of every image of the batch.

    Args:
        model: the teacher (its BN layers those of ``statistics``, checked by
            :meth:`delt.stats.BNStatistics.check_teacher`).
        first_bn_multiplier: weight of the first BN layer's loss.
        statistics: the loaded file of ``delt stats``.
        convention: which of its statistics (``delt.stats.CONVENTIONS``).
        match: ``class`` (per-class, grouped) or ``class-mean`` (EDC).
        class_weight: W: each layer's loss is ``(1 - W) · global + W · class term``.
    """

    def __init__(
        self,
        model: nn.Module,
        first_bn_multiplier: float,
        statistics: BNStatistics,
        convention: str,
        match: str,
        class_weight: float,
    ) -> None:
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _BN_TYPES)]
        assert [n for n, _ in layers] == statistics.layer_names, "checked by check_teacher"
        self.weights = [float(first_bn_multiplier)] + [1.0] * (len(layers) - 1)
        self._modules = [m for _, m in layers]
        self.match, self.class_weight = match, class_weight
        self._targets = [
            (
                mean.to(m.running_mean.device, torch.float32),
                var.to(m.running_mean.device, torch.float32),
            )
            for (mean, var), m in zip(
                statistics.class_targets(convention), self._modules, strict=True
            )
        ]
        self._classes = statistics.num_classes
        self._labels: Tensor | None = None
        self._group_weight: Tensor | None = None
        self._batch_targets: list[tuple[Tensor, Tensor]] = []
        self._losses: list[Tensor | None] = [None] * len(layers)
        self._handles = [model.register_forward_pre_hook(self._reset)]
        self._handles += [
            m.register_forward_pre_hook(self._recorder(i)) for i, m in enumerate(self._modules)
        ]

    def set_labels(self, labels: Tensor) -> None:
        """The class of every image of the next forward passes, (N,) int64 on the device."""
        self._labels = labels
        if self.match == "class":
            # The mean over the classes present: every class of the batch weighs the same.
            present = (torch.bincount(labels, minlength=self._classes) > 0).to(torch.float32)
            self._group_weight = present / present.sum()
        else:
            self._batch_targets = [
                (mean.index_select(0, labels).mean(0), var.index_select(0, labels).mean(0))
                for mean, var in self._targets
            ]

    def _reset(self, module: nn.Module, args) -> None:
        self._losses = [None] * len(self._modules)

    def _recorder(self, index: int):
        def record(module: nn.Module, args) -> None:
            x = args[0]
            if self._labels is None or self._labels.shape[0] != x.shape[0]:
                raise RuntimeError(
                    "ClassMatching: set_labels(labels) must give the class of every image of the "
                    "batch before the forward pass"
                )
            if self.match == "class":
                mean, var = self._targets[index]
                loss = delt_ext.bn_stat_loss(
                    x, mean, var, group_index=self._labels, weight=self._group_weight
                )
            else:
                mean, var = self._batch_targets[index]
                loss = delt_ext.bn_stat_loss(x, mean, var)
            if self.class_weight < 1:
                running = delt_ext.bn_stat_loss(x, module.running_mean, module.running_var)
                loss = (1 - self.class_weight) * running + self.class_weight * loss
            self._losses[index] = loss

        return record

    def loss(self) -> Tensor:
        """``sum_l weights[l] · loss_l`` of the last forward pass (0-dim; with several chunks,
        :class:`delt.chunk_groups.ChunkClassMatching`, the sum of their BN terms)."""
        if any(loss is None for loss in self._losses):
            raise RuntimeError(
                f"{type(self).__name__}: the last forward pass did not reach every BN layer"
            )
        total = self.weights[0] * self._losses[0]
        for weight, layer_loss in zip(self.weights[1:], self._losses[1:], strict=True):
            total = total + weight * layer_loss
        return total

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@contextmanager
def matching_target(
    model: nn.Module,
    config: MatchOptions,
    first_bn_multiplier: float,
    statistics: BNStatistics | None,
) -> Iterator[Any]:
    """The matching target of a resolved config's ``--match`` on ``model``, hooks removed on
    exit: :class:`delt_ext.BNStatMatching` for ``global`` (bitwise the loss of before
    ``--match`` existed), else :class:`ClassMatching` on ``statistics``."""
    if config.match == "global":
        with delt_ext.BNStatMatching(model, first_bn_multiplier=first_bn_multiplier) as target:
            yield target
        return
    assert statistics is not None
    target = ClassMatching(
        model, first_bn_multiplier, statistics, config.stats_convention, config.match,
        config.match_class_weight,
    )  # fmt: skip
    try:
        yield target
    finally:
        target.remove()
