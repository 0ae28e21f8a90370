"""Fused differentiable augmentation: random resized crop + horizontal flip + roll ("jitter").

The recover step of SRe2L/CDA/DELT augments the synthetic batch every iteration with
torchvision's ``RandomResizedCrop`` and ``RandomHorizontalFlip`` applied to the whole batch tensor
(one box and one flip for all images), then ``torch.roll`` by a random offset. Here sampling and
application are separate (kornia's design):

- :class:`RandomResizedCropFlip` draws a params tensor with torchvision's sampling rule, one row
  per image (``per_sample=True``) or one row for the batch (``per_sample=False``, torchvision's
  behaviour), and applies it;
- :func:`resized_crop_flip` applies a given params tensor (log it, replay it, reuse it for two
  batches) with one fused op whose forward and backward are both deterministic gathers.

A params row is ``[top, left, height, width, flip, shift_y, shift_x]`` (see ``PARAM_COLUMNS``):
the integer crop box in input pixels, flip 0 or 1, and integer roll shifts over (H, W).
"""

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from delt_ext import reference
from delt_ext._library import HAS_OPS
from delt_ext.functional import check_image_batch

PARAM_COLUMNS = ("top", "left", "height", "width", "flip", "shift_y", "shift_x")

_PARAM_DTYPES = (torch.float32, torch.float64)
# torchvision's RandomResizedCrop.get_params tries this many boxes before its central fallback.
_ATTEMPTS = 10
_SCHEDULE_KINDS = ("cosine", "linear", "step")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_image(x: Tensor) -> None:
    check_image_batch(x)
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"x must have a non-empty image (H, W >= 1), got shape {tuple(x.shape)}")


def _output_size(size) -> tuple[int, int]:
    if _is_int(size):
        size = (size, size)
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(_is_int(s) and s > 0 for s in size)
    ):
        raise ValueError(
            f"size must be a positive int or a pair of positive ints (out_h, out_w), got {size!r}"
        )
    return int(size[0]), int(size[1])


def _check_params(params: Tensor, x: Tensor) -> None:
    if not isinstance(params, Tensor):
        raise TypeError(f"params must be a torch.Tensor, got {type(params).__name__}")
    if params.dtype not in _PARAM_DTYPES:
        raise TypeError(f"params must be float32 or float64, got {params.dtype}")
    if params.dim() != 2 or params.shape[1] != 7 or params.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"params must have shape ({x.shape[0]}, 7) or (1, 7), columns {PARAM_COLUMNS}, got "
            f"{tuple(params.shape)}"
        )
    if params.device != x.device:
        raise ValueError(
            f"params is on {params.device} but x is on {x.device}; move it to x's device"
        )


def _params_look_valid(values: np.ndarray, height: int, width: int) -> bool:
    """One vectorized pass over the (R, 7) float64 values: True when every row is valid."""
    with np.errstate(invalid="ignore"):
        top, left, box_h, box_w, flip = (values[:, k] for k in range(5))
        return bool(
            np.isfinite(values).all()
            and (values == np.round(values)).all()
            and (box_h >= 1).all()
            and (box_w >= 1).all()
            and (top >= 0).all()
            and (left >= 0).all()
            and (top + box_h <= height).all()
            and (left + box_w <= width).all()
            and ((flip == 0) | (flip == 1)).all()
        )


def _check_param_values(params: Tensor, height: int, width: int) -> None:
    """Raises ValueError naming the first bad column and row. Needs a host copy of params."""
    values = params.detach().to("cpu", torch.float64)
    # numpy is ~50x cheaper than torch on a few hundred values; the detailed checks below (which
    # build the message) only run when something is wrong.
    if _params_look_valid(values.numpy(), height, width):
        return

    def fail(mask: Tensor, message: str) -> None:
        if bool(mask.any()):
            row = int(mask.nonzero()[0, 0])
            row_values = dict(zip(PARAM_COLUMNS, values[row].tolist(), strict=True))
            raise ValueError(f"params row {row}: {message}; row is {row_values}")

    fail(~torch.isfinite(values).all(dim=1), "values must be finite")
    not_integer = values != values.round()
    for column in (0, 1, 2, 3, 5, 6):
        fail(not_integer[:, column], f"{PARAM_COLUMNS[column]} must be an integer")
    top, left, box_h, box_w, flip = values[:, :5].unbind(1)
    fail(box_h < 1, "height must be >= 1")
    fail(box_w < 1, "width must be >= 1")
    fail((top < 0) | (left < 0), "top and left must be >= 0")
    fail(top + box_h > height, f"the crop box ends below the image (top + height > H = {height})")
    fail(left + box_w > width, f"the crop box ends right of the image (left + width > W = {width})")
    fail((flip != 0) & (flip != 1), "flip must be 0 or 1")


def _apply(x: Tensor, params: Tensor, out_h: int, out_w: int) -> Tensor:
    if not HAS_OPS:
        return reference.resized_crop_flip(x, params, (out_h, out_w))
    return torch.ops.delt_ext.resized_crop_flip(x, params, out_h, out_w)


def resized_crop_flip(x: Tensor, params: Tensor, size) -> Tensor:
    """Crops, resizes (bilinear), flips and rolls each image with its own params row.

    Per row ``[top, left, height, width, flip, shift_y, shift_x]``: exactly
    ``torch.roll(hflip_if(flip, torchvision.transforms.v2.functional.resized_crop(x, top, left,
    height, width, size, antialias=False)), (shift_y, shift_x), dims=(2, 3))``; bilinear with
    half-pixel centres (``align_corners=False``), sampling clamped to the crop box. One fused op,
    forward and backward; the backward is deterministic (no atomics) and gives the gradient with
    respect to ``x`` only.

    Args:
        x: (N, C, H, W) float32, float64, float16 or bfloat16, NCHW or channels_last.
        params: (N, 7), or (1, 7) for one row shared by the batch; float32 or float64 on x's
            device. Box entries and shifts must be integers (any sign for shifts), the box inside
            the image with height, width >= 1, flip 0 or 1.
        size: output (out_h, out_w), or one int for a square output.

    Returns:
        (N, C, out_h, out_w), x's dtype, laid out like x (channels_last stays channels_last).

    Raises:
        TypeError, ValueError: naming the bad argument. The op itself checks every params row on
            both devices, also under ``torch.compile``: CPU params raise a RuntimeError; CUDA
            params are checked on the GPU (no host copy, no sync), where a bad row is a
            device-side assertion reported by the next synchronizing call. CPU params are also
            checked here first, for a message naming the row and column. Params from
            :class:`RandomResizedCropFlip` are valid by construction.
    """
    _check_image(x)
    out_h, out_w = _output_size(size)
    _check_params(params, x)
    if params.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_param_values(params, x.shape[2], x.shape[3])
    return _apply(x, params, out_h, out_w)


def _central_crop(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """torchvision's fallback box size (h, w) when no attempt fits."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return h, w


def _check_pair(name: str, value, allow_equal: bool = True) -> tuple[float, float]:
    if (
        not isinstance(value, Sequence)
        or len(value) != 2
        or not all(_is_number(v) and math.isfinite(v) and v > 0 for v in value)
    ):
        raise ValueError(f"{name} must be a pair of positive finite numbers, got {value!r}")
    low, high = float(value[0]), float(value[1])
    if low > high:
        raise ValueError(f"{name} must be (min, max) with min <= max, got {value!r}")
    return low, high


class RandomResizedCropFlip(nn.Module):
    """Random resized crop + horizontal flip + roll, per image or per batch, fused.

    Draws params with torchvision's ``RandomResizedCrop.get_params`` rule: up to 10 attempts of
    ``area * U(scale)`` and ``exp(U(log ratio))``, ``w = round(sqrt(area * ratio))``,
    ``h = round(sqrt(area / ratio))``, the first box that fits, at a uniform position; else the
    central-crop fallback. Vectorized: 10 candidates per image, the first valid one taken (the
    same distribution). The flip has probability ``flip_p``. ``jitter`` adds SRe2L's roll: shifts
    uniform in ``[0, jitter]`` on H and on W (``random.randint(0, jitter)``), drawn per image like
    the box (per batch with ``per_sample=False``). DELT uses ``jitter=0``.

    ``per_sample=False`` draws one row for the whole batch: torchvision applied to a batch tensor,
    as SRe2L/CDA/DELT do. ``per_sample=True`` gives every image its own box, flip and shifts at
    the same cost.

    The params of the last call are kept in ``last_params`` (on x's device) for logging and
    replay with :func:`resized_crop_flip`; :meth:`sample_params` draws params without applying
    them. Under ``torch.compile(fullgraph=True)``, Dynamo cannot trace a ``torch.Generator``
    argument: compile the module with ``generator=None``, or sample outside the compiled region
    and compile :func:`resized_crop_flip`.

    Args:
        size: output size, int (square) or (out_h, out_w).
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio w / h.
        flip_p: probability of a horizontal flip.
        jitter: largest roll shift in pixels (0: no roll).
        per_sample: one params row per image (True) or per call (False).
        generator: the torch.Generator that draws the params (its device is where they are
            drawn: a CUDA generator keeps sampling on the GPU); None: the global CPU generator.
    """

    def __init__(
        self,
        size,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter: int = 0,
        per_sample: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.size = _output_size(size)
        self.scale = _check_pair("scale", scale)
        self.ratio = _check_pair("ratio", ratio)
        if not _is_number(flip_p) or not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be a probability in [0, 1], got {flip_p!r}")
        if not _is_int(jitter) or jitter < 0:
            raise ValueError(f"jitter must be an int >= 0 (pixels), got {jitter!r}")
        if not isinstance(per_sample, bool):
            raise TypeError(f"per_sample must be a bool, got {type(per_sample).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        self.flip_p = float(flip_p)
        self.jitter = jitter
        self.per_sample = per_sample
        self.generator = generator
        self.last_params: Tensor | None = None

    def set_scale(self, min_scale: float, max_scale: float | None = None) -> None:
        """Sets the crop-area range to (min_scale, max_scale), e.g. from crop_scale_schedule.

        ``max_scale`` keeps its current value when None.
        """
        high = self.scale[1] if max_scale is None else max_scale
        self.scale = _check_pair("scale", (min_scale, high))

    def sample_params(self, batch_size: int, in_h: int, in_w: int) -> Tensor:
        """Draws params for a batch of ``batch_size`` (in_h x in_w) images.

        Returns:
            float32 (batch_size, 7) (per_sample) or (1, 7), columns ``PARAM_COLUMNS``, on the
            generator's device (CPU without a generator).
        """
        for name, value, low in (
            ("batch_size", batch_size, 0),
            ("in_h", in_h, 1),
            ("in_w", in_w, 1),
        ):
            if not _is_int(value) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        rows = batch_size if self.per_sample else 1
        device = self.generator.device if self.generator is not None else torch.device("cpu")
        generator = self.generator

        def uniform(*shape: int) -> Tensor:
            return torch.rand(shape, generator=generator, device=device, dtype=torch.float64)

        area = float(in_h * in_w)
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        u = uniform(rows, 2, _ATTEMPTS)
        target_area = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 0])
        aspect = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[:, 1])
        # torch.round and Python's round (torchvision) both round half to even.
        w = torch.round(torch.sqrt(target_area * aspect))
        h = torch.round(torch.sqrt(target_area / aspect))
        valid = (w > 0) & (w <= in_w) & (h > 0) & (h <= in_h)
        first = torch.argmax(valid.to(torch.uint8), dim=1, keepdim=True)  # first True (0 if none)
        found = valid.any(dim=1)
        fallback_h, fallback_w = _central_crop(in_h, in_w, self.ratio)
        h = torch.where(found, h.gather(1, first).squeeze(1), float(fallback_h))
        w = torch.where(found, w.gather(1, first).squeeze(1), float(fallback_w))
        position = uniform(rows, 2)
        # floor(U[0, 1) * n) is uniform on {0, ..., n - 1}, like torch.randint(0, n).
        top = torch.where(
            found, torch.floor(position[:, 0] * (in_h - h + 1)), float((in_h - fallback_h) // 2)
        )
        left = torch.where(
            found, torch.floor(position[:, 1] * (in_w - w + 1)), float((in_w - fallback_w) // 2)
        )
        flip = (uniform(rows) < self.flip_p).to(torch.float64)
        if self.jitter > 0:
            shifts = torch.floor(uniform(rows, 2) * (self.jitter + 1))
        else:
            shifts = torch.zeros((rows, 2), dtype=torch.float64, device=device)
        params = torch.stack([top, left, h, w, flip, shifts[:, 0], shifts[:, 1]], dim=1)
        return params.to(torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        """Augments x (N, C, H, W) to (N, C, out_h, out_w) with freshly drawn params."""
        _check_image(x)
        params = self.sample_params(x.shape[0], x.shape[2], x.shape[3])
        if params.device != x.device:
            # Drawn on the CPU for a CUDA batch: an asynchronous copy from pinned memory, so the
            # step does not wait for the device (the caching host allocator keeps the pinned
            # buffer alive until the copy is done).
            if x.device.type == "cuda":
                params = params.pin_memory().to(x.device, non_blocking=True)
            else:
                params = params.to(x.device)
        self.last_params = params
        return _apply(x, params, *self.size)

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, scale={self.scale}, ratio={self.ratio}, flip_p={self.flip_p}, "
            f"jitter={self.jitter}, per_sample={self.per_sample}"
        )


def crop_scale_schedule(
    iteration: int,
    total: int,
    kind: str = "cosine",
    milestone: float = 1.0,
    start: float = 1.0,
    end: float = 0.08,
) -> float:
    """CDA's easy-to-hard curriculum: the minimum crop scale at ``iteration`` of ``total``.

    With ``t = iteration / (milestone * total)``, before the milestone (``t < 1``):
    cosine ``end + (start - end) * (1 + cos(pi * t)) / 2``, linear ``end + (start - end) *
    (1 - t)``, step ``start``; from the milestone on, ``end``. DELT: cosine, milestone 1, 1.0 ->
    0.08, i.e. ``0.08 + 0.92 * (1 + cos(pi * it / T)) / 2``. Feed it to
    :meth:`RandomResizedCropFlip.set_scale` every iteration.

    Returns:
        The minimum crop scale (a float).
    """
    if not _is_int(iteration) or iteration < 0:
        raise ValueError(f"iteration must be an int >= 0, got {iteration!r}")
    if not _is_int(total) or total < 1:
        raise ValueError(f"total must be an int >= 1, got {total!r}")
    if kind not in _SCHEDULE_KINDS:
        raise ValueError(f"kind must be one of {_SCHEDULE_KINDS}, got {kind!r}")
    for name, value in (("milestone", milestone), ("start", start), ("end", end)):
        if not _is_number(value) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    for name, value in (("start", start), ("end", end)):
        if value > 1:
            raise ValueError(f"{name} is a crop scale (area fraction) in (0, 1], got {value!r}")
    horizon = milestone * total
    if iteration >= horizon:
        return float(end)
    t = iteration / horizon
    if kind == "cosine":
        return end + (start - end) * (1 + math.cos(math.pi * t)) / 2
    if kind == "linear":
        return end + (start - end) * (1 - t)
    return float(start)
