"""Public functional API of the BN-statistic ops: argument checks, then the compiled op."""

import torch
from torch import Tensor

from delt_ext import reference
from delt_ext._library import HAS_OPS

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_image_batch(x: Tensor) -> None:
    """``x`` is a 4-D (N, C, H, W) float32/64/16 or bfloat16 tensor (TypeError/ValueError)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")


def _check_input(x: Tensor) -> None:
    check_image_batch(x)
    n, c, h, w = x.shape
    if c == 0 or n * h * w == 0:
        raise ValueError(
            "x must hold at least one value per channel (N*H*W >= 1, C >= 1), got shape "
            f"{tuple(x.shape)}"
        )


def _check_target(name: str, target: Tensor, x: Tensor, grouped: bool = False) -> int:
    """Checks a BN-statistic target of ``x``: (C,), or with ``grouped`` (G, C), one row per
    group; floating, on ``x``'s device. Returns G (1 ungrouped)."""
    if not isinstance(target, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(target).__name__}")
    channels = x.shape[1]
    if grouped and (target.dim() != 2 or target.shape[0] < 1 or target.shape[1] != channels):
        raise ValueError(
            f"{name} must have shape (G, {channels}) with group_index, one row per group "
            f"and one value per channel of x, got {tuple(target.shape)}"
        )
    if not grouped and target.shape != (channels,):
        raise ValueError(
            f"{name} must have shape ({channels},), one value per channel of x, got "
            f"{tuple(target.shape)}"
        )
    if target.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {target.dtype}")
    if target.device != x.device:
        raise ValueError(
            f"{name} is on {target.device} but x is on {x.device}; move it to x's device"
        )
    return target.shape[0] if grouped else 1


def batch_mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance, as BatchNorm computes them in training.

    Args:
        x: (N, C, H, W) float32, float64, float16 or bfloat16, NCHW or channels_last.

    Returns:
        ``(mean, var)``, each of shape (C,), in float32 (float64 for float64 ``x``);
        differentiable in ``x``.
    """
    _check_input(x)
    if not HAS_OPS:
        return reference.batch_mean_var(x)
    return torch.ops.delt_ext.batch_mean_var(x)


def bn_stat_loss(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    group_index: Tensor | None = None,
    weight: Tensor | None = None,
) -> Tensor:
    """SRe2L's BN-statistic matching loss of one layer, fused; optionally per group of samples.

    ``||mean(x) - running_mean||_2 + ||var(x) - running_var||_2``, with the per-channel mean and
    biased variance of ``x`` over (N, H, W). One read of ``x`` forward, one read and one write
    backward; no copy of ``x`` is kept.

    Args:
        x: the BN layer's input, (N, C, H, W), float32/float64/float16/bfloat16, NCHW or
            channels_last.
        running_mean, running_var: (C,) floating targets on ``x``'s device; with
            ``group_index``, (G, C): one row of targets per group.
        group_index: optional (N,) int64 on ``x``'s device, the group in ``[0, G)`` of each
            sample. Then every group g gets its own statistics over its samples x H x W (one read
            of ``x`` for all groups) and the loss is
            ``sum_g weight_g * (||mean_g - running_mean[g]||_2 + ||var_g - running_var[g]||_2)``.
            A group without samples adds nothing; an index outside ``[0, G)`` is an error (on
            CUDA a device-side assertion). NaN/Inf act per group as in the ungrouped loss.
        weight: optional (G,) floating per-group weights (default 1); only with ``group_index``.

    Returns:
        A 0-dim float32 tensor (float64 for float64 ``x``), differentiable in ``x`` (and in the
        targets and weights, should they require grad).
    """
    _check_input(x)
    if group_index is not None:
        return _bn_stat_loss_grouped(x, running_mean, running_var, group_index, weight)
    if weight is not None:
        raise ValueError("weight (per-group loss weights) needs group_index")
    _check_target("running_mean", running_mean, x)
    _check_target("running_var", running_var, x)
    if not HAS_OPS:
        return reference.bn_stat_loss(x, running_mean, running_var)
    return torch.ops.delt_ext.bn_stat_loss(x, running_mean, running_var)[0]


def _bn_stat_loss_grouped(
    x: Tensor, target_mean: Tensor, target_var: Tensor, group_index: Tensor, weight: Tensor | None
) -> Tensor:
    groups = _check_target("running_mean", target_mean, x, grouped=True)
    _check_target("running_var", target_var, x, grouped=True)
    if target_var.shape != target_mean.shape:
        raise ValueError(
            "running_mean and running_var must have the same shape (G, C), got "
            f"{tuple(target_mean.shape)} and {tuple(target_var.shape)}"
        )
    if not isinstance(group_index, Tensor):
        raise TypeError(f"group_index must be a torch.Tensor, got {type(group_index).__name__}")
    if group_index.shape != (x.shape[0],) or group_index.dtype != torch.int64:
        raise ValueError(
            f"group_index must be an int64 tensor of shape ({x.shape[0]},), one group per sample "
            f"of x, got {group_index.dtype} of shape {tuple(group_index.shape)}"
        )
    if group_index.device != x.device:
        raise ValueError(f"group_index is on {group_index.device} but x is on {x.device}")
    if group_index.device.type == "cpu" and not torch.compiler.is_compiling():
        low, high = group_index.min().item(), group_index.max().item()
        if low < 0 or high >= groups:
            raise ValueError(
                f"group_index holds {low if low < 0 else high}, outside [0, {groups}): the "
                f"targets have G = {groups} rows"
            )
    if weight is not None:
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if weight.shape != (groups,) or weight.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"weight must be a floating tensor of shape ({groups},), one value per group, "
                f"got {weight.dtype} of shape {tuple(weight.shape)}"
            )
        if weight.device != x.device:
            raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if not HAS_OPS:
        return reference.bn_stat_loss_grouped(x, group_index, target_mean, target_var, weight)
    outputs = torch.ops.delt_ext.bn_stat_loss_grouped(
        x, group_index, target_mean, target_var, weight
    )
    return outputs[0]


def image_channel_sums(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per image and channel, the sum of ``x`` over (H, W) and the sum of its squares, in float64.

    One read of ``x`` in its own dtype (no float64 copy), each value widened to float64 before it
    is added, in a fixed order (csrc/channel_sums.cpp): bitwise the same at any thread count,
    in NCHW and channels_last, and on CPU and CUDA for float32, float16 and bfloat16 ``x``.
    ``delt stats`` builds its per-class and per-batch statistics from these sums.

    Args:
        x: (N, C, H, W) float32, float64, float16 or bfloat16, any strides (NCHW and
            channels_last are read in place); N, C, H or W may be 0.

    Returns:
        ``(sum, sq)``, each (N, C) float64 on ``x``'s device. Not differentiable.
    """
    check_image_batch(x)
    if not HAS_OPS:
        return reference.image_channel_sums(x)
    return torch.ops.delt_ext.image_channel_sums(x)
