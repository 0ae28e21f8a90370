"""``BNStatMatching``: the BN-statistic loss of every BatchNorm layer of a model, fused."""

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from delt_ext.functional import bn_stat_loss

_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)


def refuse_replica(owner: str, layer: str, called: nn.Module, hooked: nn.Module) -> None:
    """Raises when a hook runs for a copy of the module it was attached to.

    ``nn.DataParallel`` over several GPUs runs shallow copies (replicas) of every module, one per
    GPU and thread, which share the original's hook dictionaries: a hook that stores a result
    would be overwritten by whichever replica finishes last and cover only that replica's part of
    the batch. With one device DataParallel calls the module itself, which passes.
    """
    if called is not hooked:
        raise RuntimeError(
            f"{owner}: layer '{layer}' ran as a copy of the hooked module (an nn.DataParallel "
            "replica: several GPUs are visible). Each replica sees only part of the batch and "
            "their statistics would overwrite each other; make one GPU visible "
            "(CUDA_VISIBLE_DEVICES=0) or run one process per GPU (torchrun) instead."
        )


class BNStatMatching:
    """Matches the batch statistics of every BN layer's input to the layer's running statistics.

    Attaches a forward pre-hook to every ``BatchNorm2d`` and ``SyncBatchNorm`` of ``model`` (in
    ``model.modules()`` order). After a forward pass, :meth:`loss` returns
    ``sum_l w_l * (||mean_l - running_mean_l||_2 + ||var_l - running_var_l||_2)`` with
    ``w = [first_bn_multiplier, 1, 1, ...]``: SRe2L's ``loss_r_bn_feature``, computed by the fused
    :func:`delt_ext.bn_stat_loss`. It replaces SRe2L's list of ``BNFeatureHook``::

        bn_matching = delt_ext.BNStatMatching(model, first_bn_multiplier=10.0)
        loss_r_bn_feature = bn_matching.loss()

    The hooks run before each layer's forward, so the targets are the running statistics as they
    were before the batch (identical to SRe2L's for a model in ``eval()``, the normal case).
    The state lives in this object, never on the modules. ``nn.DataParallel`` replicas are refused
    (their hooks would race); use one process per GPU.

    Per-group targets (per-class statistics, or several independent chunks in one forward):
    pass ``targets``, one ``(mean, var)`` pair of (G, C_l) tensors per BN layer (a sequence in
    ``layer_names`` order, or a mapping by layer name), and before each forward the group of
    every sample with :meth:`set_groups`. Each layer's loss is then the grouped
    :func:`delt_ext.bn_stat_loss`: ``sum_g w_g * (||mean_lg - mean_target_lg||_2 + ||var_lg -
    var_target_lg||_2)`` over each group's own samples, in one read of the layer's input::

        matching = delt_ext.BNStatMatching(model, targets=class_stats)   # (G, C_l) per layer
        matching.set_groups(labels)                                      # (N,) int64 in [0, G)
        model(images)
        loss = matching.loss()

    Args:
        model: a module with at least one BatchNorm2d/SyncBatchNorm that tracks running statistics.
        first_bn_multiplier: weight of the first BN layer's loss (SRe2L: 10).
        targets: optional per-group targets, as above; without them the targets are the layers'
            running statistics.
    """

    def __init__(
        self,
        model: nn.Module,
        first_bn_multiplier: float = 10.0,
        targets: Sequence[tuple[Tensor, Tensor]]
        | Mapping[str, tuple[Tensor, Tensor]]
        | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(first_bn_multiplier, bool) or not isinstance(
            first_bn_multiplier, (int, float)
        ):
            raise TypeError(
                f"first_bn_multiplier must be a number, got {type(first_bn_multiplier).__name__}"
            )
        if not math.isfinite(first_bn_multiplier):
            raise ValueError(f"first_bn_multiplier must be finite, got {first_bn_multiplier}")
        layers = [(name, m) for name, m in model.named_modules() if isinstance(m, _BN_TYPES)]
        if not layers:
            raise ValueError(
                f"model ({type(model).__name__}) has no BatchNorm2d or SyncBatchNorm layer: "
                "BN-statistic matching needs a teacher with BatchNorm layers"
            )
        for name, module in layers:
            if module.running_mean is None or module.running_var is None:
                raise ValueError(
                    f"BN layer '{name}' keeps no running statistics (track_running_stats=False); "
                    "there is nothing to match"
                )
        self.layer_names: list[str] = [name for name, _ in layers]
        self.weights: list[float] = [float(first_bn_multiplier)] + [1.0] * (len(layers) - 1)
        self._modules = [module for _, module in layers]
        self._losses: list[Tensor | None] = [None] * len(layers)
        self._targets = None if targets is None else self._check_targets(targets)
        self._group_index: Tensor | None = None
        self._group_weight: Tensor | None = None
        self._handles = [model.register_forward_pre_hook(self._reset)]
        self._handles += [
            module.register_forward_pre_hook(self._recorder(index))
            for index, module in enumerate(self._modules)
        ]

    @property
    def groups(self) -> int | None:
        """G, the number of groups of the per-group targets (None without them)."""
        return None if self._targets is None else self._targets[0][0].shape[0]

    def _check_targets(self, targets) -> list[tuple[Tensor, Tensor]]:
        names = self.layer_names
        if isinstance(targets, Mapping):
            unknown = sorted(set(targets) - set(names))
            missing = [name for name in names if name not in targets]
            if unknown or missing:
                raise ValueError(
                    f"BNStatMatching: targets must name every BN layer once; missing {missing}, "
                    f"unknown {unknown}"
                )
            targets = [targets[name] for name in names]
        targets = list(targets)
        if len(targets) != len(names):
            raise ValueError(
                f"BNStatMatching: targets must hold one (mean, var) pair per BN layer "
                f"({len(names)}), got {len(targets)}"
            )
        checked, groups = [], None
        for name, module, pair in zip(names, self._modules, targets, strict=True):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"BNStatMatching: targets of layer '{name}' must be (mean, var)")
            channels = module.running_mean.shape[0]
            moved = []
            for what, t in zip(("mean", "var"), pair, strict=True):
                if not isinstance(t, Tensor) or not t.is_floating_point():
                    raise TypeError(
                        f"BNStatMatching: target {what} of layer '{name}' must be a floating tensor"
                    )
                if t.dim() != 2 or t.shape[1] != channels or t.shape[0] < 1:
                    raise ValueError(
                        f"BNStatMatching: target {what} of layer '{name}' must have shape "
                        f"(G, {channels}), got {tuple(t.shape)}"
                    )
                groups = t.shape[0] if groups is None else groups
                if t.shape[0] != groups:
                    raise ValueError(
                        f"BNStatMatching: every layer's targets must have the same number of "
                        f"groups; layer '{name}' has {t.shape[0]}, earlier layers {groups}"
                    )
                moved.append(t.detach().to(module.running_mean.device))
            checked.append((moved[0], moved[1]))
        return checked

    def set_groups(self, group_index: Tensor, weight: Tensor | None = None) -> "BNStatMatching":
        """Sets the group of every sample for the following forward passes (per-group targets).

        Args:
            group_index: (N,) int64, each sample's group in ``[0, G)``; the batch of every later
                forward must have N samples until it is set again. A group without samples adds
                nothing to the loss.
            weight: optional (G,) per-group weights of the loss (default 1).
        """
        if self._targets is None:
            raise RuntimeError(
                "BNStatMatching: set_groups needs per-group targets (BNStatMatching(model, "
                "targets=...)); without them every sample is matched to the running statistics"
            )
        if not isinstance(group_index, Tensor) or group_index.dim() != 1:
            raise ValueError(
                "BNStatMatching: group_index must be a 1-D int64 tensor, one per sample"
            )
        if group_index.dtype != torch.int64:
            raise ValueError(f"BNStatMatching: group_index must be int64, got {group_index.dtype}")
        device = self._targets[0][0].device
        self._group_index = group_index.to(device)
        self._group_weight = None if weight is None else weight.to(device)
        return self

    def _reset(self, module: nn.Module, args) -> None:
        self._losses = [None] * len(self._modules)

    def _recorder(self, index: int):
        def record(module: nn.Module, args) -> None:
            refuse_replica("BNStatMatching", self.layer_names[index], module, self._modules[index])
            x = args[0]
            if x.dim() != 4:
                raise ValueError(
                    f"BN layer '{self.layer_names[index]}' got a {x.dim()}-D input; BN-statistic "
                    "matching needs (N, C, H, W) inputs"
                )
            if self._targets is None:
                self._losses[index] = bn_stat_loss(x, module.running_mean, module.running_var)
                return
            groups = self._group_index
            if groups is None:
                raise RuntimeError(
                    "BNStatMatching: per-group targets need the group of every sample: call "
                    "set_groups(group_index) before the forward pass"
                )
            if groups.shape[0] != x.shape[0]:
                raise ValueError(
                    f"BNStatMatching: the group index set by set_groups has {groups.shape[0]} "
                    f"samples but layer '{self.layer_names[index]}' got a batch of {x.shape[0]}"
                )
            target_mean, target_var = self._targets[index]
            self._losses[index] = bn_stat_loss(
                x, target_mean, target_var, group_index=groups, weight=self._group_weight
            )

        return record

    def layer_losses(self) -> list[Tensor]:
        """Unweighted per-layer losses of the last forward pass, in ``layer_names`` order."""
        pairs = zip(self.layer_names, self._losses, strict=True)
        missing = [name for name, loss in pairs if loss is None]
        if len(missing) == len(self._losses):
            raise RuntimeError("BNStatMatching: no forward pass of the model has been recorded yet")
        if missing:
            raise RuntimeError(
                f"BNStatMatching: the last forward pass did not reach the BN layers {missing}"
            )
        return list(self._losses)  # type: ignore[arg-type]

    def loss(self) -> Tensor:
        """``sum_l weights[l] * layer_losses()[l]`` (0-dim, differentiable in the model input)."""
        losses = self.layer_losses()
        total = self.weights[0] * losses[0]
        for weight, layer_loss in zip(self.weights[1:], losses[1:], strict=True):
            total = total + weight * layer_loss
        return total

    def remove(self) -> None:
        """Detaches every hook; the model is left as it was. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._losses = [None] * len(self._modules)

    def __len__(self) -> int:
        return len(self._modules)

    def __enter__(self) -> "BNStatMatching":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def __repr__(self) -> str:
        groups = "" if self._targets is None else f", groups={self.groups}"
        return (
            f"BNStatMatching({len(self)} layers, first_bn_multiplier={self.weights[0]}{groups}, "
            f"attached={bool(self._handles)})"
        )
