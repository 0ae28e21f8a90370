"""The semantics of every delt_ext op in plain PyTorch.

These are the formulas of the research code the ops replace (SRe2L's ``BNFeatureHook``; the
torchvision ``RandomResizedCrop`` + ``RandomHorizontalFlip`` + ``torch.roll`` chain). Tests
compare the compiled ops against them, and the package falls back to them when the compiled
library cannot be loaded. They accept the same inputs and return the same dtypes as the ops, but
copy and re-read the data several times.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from delt_ext.ops import accumulate_dtype, layout_format


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


def group_mean_var(x: Tensor, group_index: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Per-group :func:`batch_mean_var`: (G, C) mean and biased variance over each group's samples.

    ``group_index`` (N,) int64 gives each sample's group in ``[0, groups)``; a group without
    samples gets NaN. Dtypes as :func:`batch_mean_var`.
    """
    _check_group_index(group_index, groups)
    dtype = accumulate_dtype(x.dtype)
    means, variances = [], []
    for g in range(groups):
        members = (group_index == g).nonzero().flatten()
        if members.numel() == 0:
            nan = torch.full((x.shape[1],), float("nan"), dtype=dtype, device=x.device)
            means.append(nan)
            variances.append(nan)
            continue
        mean, var = batch_mean_var(x.index_select(0, members))
        means.append(mean)
        variances.append(var)
    return torch.stack(means), torch.stack(variances)


def bn_stat_loss_grouped(
    x: Tensor,
    group_index: Tensor,
    target_mean: Tensor,
    target_var: Tensor,
    weight: Tensor | None = None,
) -> Tensor:
    """``sum_g weight_g * (||mean_g - target_mean_g||_2 + ||var_g - target_var_g||_2)``.

    ``mean_g``, ``var_g``: the statistics of the samples ``n`` with ``group_index[n] == g`` (a
    Python loop over the groups); ``target_mean``, ``target_var``: (G, C); ``weight``: (G,),
    default 1. A group without samples adds nothing. Returns a 0-dim tensor in float32 (float64
    for float64 ``x``).
    """
    groups = target_mean.shape[0]
    _check_group_index(group_index, groups)
    total = x.new_zeros((), dtype=accumulate_dtype(x.dtype))
    for g in range(groups):
        members = (group_index == g).nonzero().flatten()
        if members.numel() == 0:
            continue
        group_loss = bn_stat_loss(x.index_select(0, members), target_mean[g], target_var[g])
        total = total + (group_loss if weight is None else weight[g].to(total.dtype) * group_loss)
    return total


def _check_group_index(group_index: Tensor, groups: int) -> None:
    if group_index.numel() and (group_index.min() < 0 or group_index.max() >= groups):
        raise ValueError(f"group_index must lie in [0, {groups}), the rows of the targets")


def image_channel_sums(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per image and channel, the float64 sum of ``x`` (N, C, H, W) over (H, W) and the sum of
    its squares: two (N, C) float64 tensors (through a float64 copy of ``x``; torch's own
    summation order, so not the compiled op's bits)."""
    n, c = x.shape[:2]
    flat = x.to(torch.float64).reshape(n, c, -1)
    return flat.sum(-1), (flat * flat).sum(-1)


def resized_crop_flip(x: Tensor, params: Tensor, size: tuple[int, int]) -> Tensor:
    """Crop, bilinear resize, horizontal flip and roll, one params row at a time.

    For each row ``[top, left, height, width, flip, shift_y, shift_x]`` of ``params`` ((N, 7), or
    (1, 7) for the whole batch), the image is sliced to the box, resized to ``size`` with
    ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)`` (skipped when the
    box already has that size, as torchvision does), flipped along W if ``flip`` and rolled by
    ``(shift_y, shift_x)`` over (H, W): torchvision's ``resized_crop`` + ``hflip`` +
    ``torch.roll``. 16-bit inputs are resampled in float32. Differentiable in ``x``.

    Returns (N, C, size[0], size[1]) in x's dtype, laid out like the compiled op's result.
    """
    out_h, out_w = size
    rows = params.detach().to("cpu", torch.float64).round().long().tolist()
    if len(rows) == 1:
        groups = [(x, rows[0])]
    else:
        groups = [(x[n : n + 1], row) for n, row in enumerate(rows)]
    outputs = []
    for images, (top, left, height, width, flip, shift_y, shift_x) in groups:
        patch = images[:, :, top : top + height, left : left + width]
        patch = patch.to(accumulate_dtype(x.dtype))
        if (height, width) != (out_h, out_w):
            patch = F.interpolate(
                patch, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=False
            )
        if flip:
            patch = patch.flip(3)
        patch = torch.roll(patch, shifts=(shift_y, shift_x), dims=(2, 3))
        outputs.append(patch.to(x.dtype))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return out.contiguous(memory_format=layout_format(x))
