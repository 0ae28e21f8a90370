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
