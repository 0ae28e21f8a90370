"""Public functional API of the BN-statistic ops: argument checks, then the compiled op."""

import torch
from torch import Tensor

from delt_ext import reference
from delt_ext._library import HAS_OPS

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_input(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    n, c, h, w = x.shape
    if c == 0 or n * h * w == 0:
        raise ValueError(
            "x must hold at least one value per channel (N*H*W >= 1, C >= 1), got shape "
            f"{tuple(x.shape)}"
        )


def _check_target(name: str, target: Tensor, x: Tensor) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(target).__name__}")
    if target.shape != (x.shape[1],):
        raise ValueError(
            f"{name} must have shape ({x.shape[1]},), one value per channel of x, got "
            f"{tuple(target.shape)}"
        )
    if target.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {target.dtype}")
    if target.device != x.device:
        raise ValueError(
            f"{name} is on {target.device} but x is on {x.device}; move it to x's device"
        )


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


def bn_stat_loss(x: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """SRe2L's BN-statistic matching loss of one layer, fused.

    ``||mean(x) - running_mean||_2 + ||var(x) - running_var||_2``, with the per-channel mean and
    biased variance of ``x`` over (N, H, W). One read of ``x`` forward, one read and one write
    backward; no copy of ``x`` is kept.

    Args:
        x: the BN layer's input, (N, C, H, W), float32/float64/float16/bfloat16, NCHW or
            channels_last.
        running_mean, running_var: (C,) floating targets on ``x``'s device.

    Returns:
        A 0-dim float32 tensor (float64 for float64 ``x``), differentiable in ``x`` (and in the
        targets, should they require grad).
    """
    _check_input(x)
    _check_target("running_mean", running_mean, x)
    _check_target("running_var", running_var, x)
    if not HAS_OPS:
        return reference.bn_stat_loss(x, running_mean, running_var)
    return torch.ops.delt_ext.bn_stat_loss(x, running_mean, running_var)[0]
