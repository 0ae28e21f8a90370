"""The semantics of every delt_ext op in plain PyTorch.

These are the formulas of the research code the ops replace (SRe2L's ``BNFeatureHook``). Tests
compare the compiled ops against them, and the package falls back to them when the compiled
library cannot be loaded. They accept the same inputs and return the same dtypes as the ops, but
copy and re-read the data several times.
"""

import torch
from torch import Tensor

from delt_ext.ops import accumulate_dtype


def batch_mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` (N, C, H, W) over (N, H, W).

    Returns two (C,) tensors in float32 (float64 for float64 ``x``).
    """
    x = x.to(accumulate_dtype(x.dtype))
    channels = x.shape[1]
    mean = x.mean([0, 2, 3])
    var = x.permute(1, 0, 2, 3).contiguous().reshape(channels, -1).var(1, unbiased=False)
    return mean, var


def bn_stat_loss(x: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """``||mean - running_mean||_2 + ||var - running_var||_2`` for the batch statistics of ``x``.

    Returns a 0-dim tensor in float32 (float64 for float64 ``x``).
    """
    mean, var = batch_mean_var(x)
    return torch.norm(running_var.to(var.dtype) - var, 2) + torch.norm(
        running_mean.to(mean.dtype) - mean, 2
    )
