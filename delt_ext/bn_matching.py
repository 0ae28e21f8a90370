"""``BNStatMatching``: the BN-statistic loss of every BatchNorm layer of a model, fused."""

import math

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

    Args:
        model: a module with at least one BatchNorm2d/SyncBatchNorm that tracks running statistics.
        first_bn_multiplier: weight of the first BN layer's loss (SRe2L: 10).
    """

    def __init__(self, model: nn.Module, first_bn_multiplier: float = 10.0) -> None:
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
        self._handles = [model.register_forward_pre_hook(self._reset)]
        self._handles += [
            module.register_forward_pre_hook(self._recorder(index))
            for index, module in enumerate(self._modules)
        ]

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
            self._losses[index] = bn_stat_loss(x, module.running_mean, module.running_var)

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
        return (
            f"BNStatMatching({len(self)} layers, first_bn_multiplier={self.weights[0]}, "
            f"attached={bool(self._handles)})"
        )
