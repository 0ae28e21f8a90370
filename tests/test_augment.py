"""Tests of the fused augmentation op (delt_ext.resized_crop_flip), its sampler and schedule.

The op is checked against torchvision (v2 functional resized_crop with antialias=False, hflip,
torch.roll), batch-shared and per image; gradients against autograd through the same chain.
"""

import itertools
import math

import pytest
import torch
from conftest import CROP_BOXES, CROP_H, CROP_W, DEVICES, requires_cuda
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

import delt_ext
from delt_ext import RandomResizedCropFlip, crop_scale_schedule, resized_crop_flip

pytestmark = pytest.mark.skipif(not delt_ext.HAS_OPS, reason="compiled delt_ext library not built")

CUDA = requires_cuda
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9}
LAYOUTS = (torch.contiguous_format, torch.channels_last)


def torchvision_chain(x, row, size):
    """torchvision on a batch: one box, one flip, one roll for every image of x."""
    top, left, height, width, flip, shift_y, shift_x = (int(v) for v in row)
    out = TF.resized_crop(x, top, left, height, width, list(size), antialias=False)
    if flip:
        out = TF.hflip(out)
    return torch.roll(out, shifts=(shift_y, shift_x), dims=(2, 3))


def torchvision_per_image(x, params, size):
    return torch.cat(
        [torchvision_chain(x[n : n + 1], params[n].tolist(), size) for n in range(x.shape[0])]
    )


def rows(*boxes):
    return torch.tensor(boxes, dtype=torch.float32)


def random_params(batch, height, width, size, generator, jitter=5):
    sampler = RandomResizedCropFlip(size, jitter=jitter, generator=generator)
    return sampler.sample_params(batch, height, width)


H, W = CROP_H, CROP_W
BOXES = CROP_BOXES
# Same size (no resize), downscaling, upscaling, mixed and non-square outputs.
SIZES = [(H, W), (8, 8), (32, 40), (5, 31), (1, 1), (29, 7)]
FLIP_SHIFTS = [(0, 0, 0), (1, 0, 0), (1, 2, -3), (0, -1, 45)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("memory_format", LAYOUTS)
def test_batch_shared_matches_torchvision(dtype, memory_format):
    x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(0), dtype=dtype)
    x = x.contiguous(memory_format=memory_format)
    worst = 0.0
    for box, size, (flip, shift_y, shift_x) in itertools.product(BOXES, SIZES, FLIP_SHIFTS):
        row = (*box, flip, shift_y, shift_x)
        out = resized_crop_flip(x, rows(row).to(dtype), size)
        expected = torchvision_chain(x, row, size)
        assert out.shape == expected.shape and out.dtype == dtype
        error = (out - expected).abs().max().item()
        assert error <= TOLERANCE[dtype], (row, size, error)
        worst = max(worst, error)
        if memory_format == torch.channels_last and size != (1, 1):
            assert out.is_contiguous(memory_format=torch.channels_last)
    assert worst > 0 or dtype == torch.float64  # the comparison is not vacuous


def test_same_size_box_is_an_exact_copy():
    # torchvision skips the resize when the box already has the output size; so must we.
    x = torch.randn(2, 3, H, W)
    x[0, 0, 2, 3] = float("inf")  # a non-finite neighbour must not leak through a zero weight
    out = resized_crop_flip(x, rows((1, 2, 5, 7, 0, 0, 0)), (5, 7))
    assert torch.equal(out, x[:, :, 1:6, 2:9])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("memory_format", LAYOUTS)
@pytest.mark.parametrize("size", [(24, 24), (9, 30)])
def test_per_sample_matches_per_image_loop(dtype, memory_format, size):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 20, 23, generator=generator, dtype=dtype)
    x = x.contiguous(memory_format=memory_format)
    params = random_params(8, 20, 23, size, generator)
    params[0] = torch.tensor([0, 0, 20, 23, 1, 0, 0])  # full image
    params[1] = torch.tensor([19, 22, 1, 1, 0, 3, 7])  # 1x1 in the bottom-right corner
    params = params.to(dtype)
    out = resized_crop_flip(x, params, size)
    expected = torchvision_per_image(x, params, size)
    assert (out - expected).abs().max().item() <= TOLERANCE[dtype]
    # The reference used by the pure-PyTorch fallback agrees too.
    fallback = delt_ext.reference.resized_crop_flip(x, params, size)
    assert (out - fallback).abs().max().item() <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("memory_format", LAYOUTS)
def test_16bit_resamples_in_float(dtype, tolerance, memory_format):
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(4, 3, 16, 16, generator=generator).to(dtype)
    x = x.contiguous(memory_format=memory_format)
    params = random_params(4, 16, 16, (20, 12), generator)
    out = resized_crop_flip(x, params, (20, 12))
    assert out.dtype == dtype
    # torchvision also resizes 16-bit tensors in float32 and rounds once.
    expected = torchvision_per_image(x.float(), params, (20, 12))
    assert (out.float() - expected).abs().max().item() <= tolerance
    grad = torch.rand(out.shape, generator=generator).to(dtype)
    x_grad = x.detach().requires_grad_()
    (gx,) = torch.autograd.grad(resized_crop_flip(x_grad, params, (20, 12)), x_grad, grad)
    x_ref = x.detach().float().requires_grad_()
    (g_ref,) = torch.autograd.grad(
        torchvision_per_image(x_ref, params, (20, 12)), x_ref, grad.float()
    )
    assert gx.dtype == dtype
    assert (gx.float() - g_ref).abs().max().item() <= 8 * tolerance


@pytest.mark.parametrize("memory_format", LAYOUTS)
@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("size", [(16, 16), (7, 25)])
def test_gradients_match_autograd_of_torchvision(memory_format, per_sample, size):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 14, 19, generator=generator, dtype=torch.float64)
    x = x.contiguous(memory_format=memory_format)
    params = random_params(5 if per_sample else 1, 14, 19, size, generator).double()
    if per_sample:
        params[0] = torch.tensor([0, 0, 14, 19, 1, 0, 0])
        params[1] = torch.tensor([13, 0, 1, 1, 1, 2, 2])
        params[2] = torch.tensor([0, 18, 14, 1, 0, -1, 3])
    grad = torch.randn(5, 3, *size, generator=generator, dtype=torch.float64)

    x_op = x.detach().requires_grad_()
    (g_op,) = torch.autograd.grad(resized_crop_flip(x_op, params, size), x_op, grad)
    x_ref = x.detach().requires_grad_()
    reference = (
        torchvision_per_image(x_ref, params, size)
        if per_sample
        else torchvision_chain(x_ref, params[0].tolist(), size)
    )
    (g_ref,) = torch.autograd.grad(reference, x_ref, grad)
    assert (g_op - g_ref).abs().max().item() <= 1e-12
    if memory_format == torch.channels_last:
        assert g_op.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("memory_format", LAYOUTS)
def test_gradcheck_float64(memory_format, device):
    x = torch.randn(4, 2, 5, 6, dtype=torch.float64).contiguous(memory_format=memory_format)
    x = x.to(device).requires_grad_()
    per_sample = torch.tensor(
        [
            [0, 0, 5, 6, 0, 0, 0],
            [1, 2, 3, 3, 1, 1, -2],
            [4, 5, 1, 1, 1, 0, 5],
            [0, 3, 5, 3, 0, 6, 1],
        ],
        dtype=torch.float64,
        device=device,
    )
    shared = per_sample[1:2]
    for params in (per_sample, shared):
        for size in ((4, 9), (7, 3)):

            def fn(t, params=params, size=size):
                return resized_crop_flip(t, params, size)

            assert torch.autograd.gradcheck(fn, (x,))
            assert torch.autograd.gradgradcheck(fn, (x,))


def test_backward_is_deterministic():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(16, 3, 32, 32, generator=generator, requires_grad=True)
    params = random_params(16, 32, 32, (32, 32), generator)
    grad = torch.randn(16, 3, 32, 32, generator=generator)
    threads = torch.get_num_threads()
    results = []
    try:
        for num_threads in (threads, threads, 1):
            torch.set_num_threads(num_threads)
            (g,) = torch.autograd.grad(resized_crop_flip(x, params, (32, 32)), x, grad)
            results.append(g)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], g) for g in results[1:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("memory_format", LAYOUTS)
@pytest.mark.parametrize("per_sample", [True, False])
def test_opcheck(memory_format, per_sample, device):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 9, 11, generator=generator).contiguous(memory_format=memory_format)
    params = random_params(3 if per_sample else 1, 9, 11, (6, 13), generator).to(device)
    x = x.to(device).requires_grad_()
    torch.library.opcheck(torch.ops.delt_ext.resized_crop_flip.default, (x, params, 6, 13))
    grad = torch.randn(3, 4, 6, 13, generator=generator).contiguous(memory_format=memory_format)
    grad = grad.to(device).requires_grad_()
    torch.library.opcheck(
        torch.ops.delt_ext.resized_crop_flip_backward.default, (grad, params, 9, 11)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    generator = torch.Generator().manual_seed(6)
    params = random_params(4, 12, 12, (10, 10), generator).to(device)

    def step(x, params):
        return resized_crop_flip(x, params, (10, 10)).square().sum()

    compiled = torch.compile(step, fullgraph=True)
    x = torch.randn(4, 3, 12, 12, generator=generator).to(device).requires_grad_()
    loss = compiled(x, params)
    (g,) = torch.autograd.grad(loss, x)
    x_eager = x.detach().requires_grad_()
    loss_eager = step(x_eager, params)
    (g_eager,) = torch.autograd.grad(loss_eager, x_eager)
    torch.testing.assert_close(loss, loss_eager)
    torch.testing.assert_close(g, g_eager)


# ---- sampler ------------------------------------------------------------------------------------


def torchvision_boxes(count, height, width, scale, ratio, seed):
    torch.manual_seed(seed)
    image = torch.empty(1, height, width)
    return torch.tensor(
        [RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(count)],
        dtype=torch.float64,
    )


def box_statistics(boxes, height, width):
    top, left, h, w = boxes.unbind(1)
    area = h * w / (height * width)
    log_ratio = torch.log(w / h)
    # Position within the free range, in [0, 1] (0.5 when the box fills the axis).
    rel_top = torch.where(h < height, top / (height - h).clamp(min=1), torch.full_like(top, 0.5))
    full = ((h == height) & (w == width)).double()
    return area, log_ratio, rel_top, full


@pytest.mark.parametrize(
    "height, width, scale",
    [(32, 32, (0.08, 1.0)), (224, 224, (0.08, 1.0)), (28, 40, (0.5, 1.0)), (224, 224, (0.7, 1.0))],
)
def test_sampler_statistics_match_torchvision(height, width, scale):
    count = 4000
    ratio = (3 / 4, 4 / 3)
    sampler = RandomResizedCropFlip(
        (height, width), scale=scale, ratio=ratio, generator=torch.Generator().manual_seed(7)
    )
    params = sampler.sample_params(count, height, width).double()
    ours = params[:, :4]
    theirs = torchvision_boxes(count, height, width, scale, ratio, seed=7)
    top, left, h, w = ours.unbind(1)
    assert ((h >= 1) & (w >= 1) & (top >= 0) & (left >= 0)).all()
    assert ((top + h <= height) & (left + w <= width)).all()
    assert (ours == ours.round()).all()
    ours_stats, theirs_stats = (
        box_statistics(ours, height, width),
        box_statistics(theirs, height, width),
    )
    for a, b in zip(ours_stats, theirs_stats, strict=True):
        # Same range (up to the pixel rounding both apply), same mean and spread: 4000 draws give
        # a standard error of ~0.005 on these [0, 1]-scaled quantities.
        assert a.min() >= b.min() - 0.06 and a.max() <= b.max() + 0.06
        assert abs(a.mean() - b.mean()) < 0.03
        assert abs(a.std() - b.std()) < 0.03
        for q in (0.1, 0.5, 0.9):
            assert abs(torch.quantile(a, q) - torch.quantile(b, q)) < 0.06
    # Flip rate.
    flip = params[:, 4]
    assert set(flip.unique().tolist()) <= {0.0, 1.0}
    assert abs(flip.mean().item() - 0.5) < 0.04
    assert (params[:, 5:] == 0).all()  # jitter 0


def test_sampler_fallback_is_torchvisions_central_crop():
    # No box with area in [2, 3] x the image fits: torchvision falls back to a central crop.
    for height, width in ((32, 32), (20, 40), (40, 20)):
        sampler = RandomResizedCropFlip(
            8, scale=(2.0, 3.0), generator=torch.Generator().manual_seed(0)
        )
        params = sampler.sample_params(5, height, width)
        expected = torchvision_boxes(1, height, width, (2.0, 3.0), (3 / 4, 4 / 3), seed=0)[0]
        assert torch.equal(params[:, :4].double(), expected.expand(5, 4))


def test_sampler_modes_flip_and_jitter():
    generator = torch.Generator().manual_seed(8)
    shared = RandomResizedCropFlip(16, per_sample=False, generator=generator)
    assert shared.sample_params(100, 32, 32).shape == (1, 7)
    never = RandomResizedCropFlip(16, flip_p=0.0, generator=generator)
    assert (never.sample_params(200, 32, 32)[:, 4] == 0).all()
    always = RandomResizedCropFlip(16, flip_p=1.0, generator=generator)
    assert (always.sample_params(200, 32, 32)[:, 4] == 1).all()
    jittered = RandomResizedCropFlip(16, jitter=3, generator=generator)
    shifts = jittered.sample_params(2000, 32, 32)[:, 5:]
    # SRe2L's random.randint(0, jitter): both ends included, uniform.
    assert set(shifts.unique().tolist()) == {0.0, 1.0, 2.0, 3.0}
    assert abs(shifts.mean().item() - 1.5) < 0.1


def test_module_forward_is_replayable_and_reproducible():
    x = torch.randn(6, 3, 20, 20)
    first = RandomResizedCropFlip((16, 12), jitter=2, generator=torch.Generator().manual_seed(9))
    out = first(x)
    assert out.shape == (6, 3, 16, 12)
    assert first.last_params.shape == (6, 7)
    assert torch.equal(out, resized_crop_flip(x, first.last_params, (16, 12)))
    second = RandomResizedCropFlip((16, 12), jitter=2, generator=torch.Generator().manual_seed(9))
    assert torch.equal(second(x), out)
    shared = RandomResizedCropFlip(16, per_sample=False, generator=torch.Generator().manual_seed(9))
    out = shared(x)
    row = shared.last_params[0].tolist()
    assert (out - torchvision_chain(x, row, (16, 16))).abs().max().item() <= 1e-5


def test_fallback_without_compiled_library_matches_op(monkeypatch):
    # Without the compiled library, the public API runs delt_ext.reference instead.
    x = torch.randn(5, 3, 18, 22, requires_grad=True)
    sampler = RandomResizedCropFlip((12, 16), jitter=3, generator=torch.Generator().manual_seed(14))
    out = sampler(x)
    params = sampler.last_params
    monkeypatch.setattr(delt_ext.augment, "HAS_OPS", False)
    fallback = resized_crop_flip(x, params, (12, 16))
    assert (out - fallback).abs().max().item() <= 1e-5
    grad = torch.randn_like(out)
    (g_op,) = torch.autograd.grad(out, x, grad)
    (g_fallback,) = torch.autograd.grad(fallback, x, grad)
    assert (g_op - g_fallback).abs().max().item() <= 1e-5


def test_set_scale_narrows_the_area_range():
    sampler = RandomResizedCropFlip(32, generator=torch.Generator().manual_seed(10))
    sampler.set_scale(0.9)
    assert sampler.scale == (0.9, 1.0)
    boxes = sampler.sample_params(500, 64, 64)
    area = boxes[:, 2] * boxes[:, 3] / 64**2
    assert area.min() > 0.85  # 0.9 up to pixel rounding
    with pytest.raises(ValueError, match="scale"):
        sampler.set_scale(0.0)
    with pytest.raises(ValueError, match="scale"):
        sampler.set_scale(1.5)


# ---- schedule -----------------------------------------------------------------------------------


def test_crop_scale_schedule_is_delts_cosine():
    # DELT (Shen et al., CVPR 2025): min_crop at the round starts of a 4000-iteration run, RI 500.
    expected = [1.00, 0.965, 0.865, 0.716, 0.540, 0.364, 0.215, 0.115]
    got = [crop_scale_schedule(it, 4000) for it in range(0, 4000, 500)]
    assert got == pytest.approx(expected, abs=5e-4)
    for it in (0, 123, 2999):
        assert crop_scale_schedule(it, 4000) == pytest.approx(
            0.08 + 0.92 * (1 + math.cos(math.pi * it / 4000)) / 2
        )
    assert crop_scale_schedule(4000, 4000) == 0.08


def test_crop_scale_schedule_kinds_and_milestone():
    assert crop_scale_schedule(0, 100, "linear") == pytest.approx(1.0)
    assert crop_scale_schedule(50, 100, "linear") == pytest.approx(0.54)
    assert crop_scale_schedule(99, 100, "step") == 1.0
    assert crop_scale_schedule(100, 100, "step") == 0.08
    # Milestone 0.5: the curriculum ends halfway and stays at `end`.
    assert crop_scale_schedule(25, 100, "cosine", milestone=0.5) == pytest.approx(0.54)
    assert crop_scale_schedule(50, 100, "cosine", milestone=0.5) == 0.08
    assert crop_scale_schedule(90, 100, "linear", milestone=0.5, start=0.9, end=0.2) == 0.2
    values = [crop_scale_schedule(it, 1000) for it in range(1000)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


# ---- errors -------------------------------------------------------------------------------------

X = torch.zeros(2, 3, 8, 10)
GOOD = torch.tensor([[1, 2, 4, 5, 0, 0, 0]], dtype=torch.float32)


def with_row(**changes):
    row = dict(zip(delt_ext.augment.PARAM_COLUMNS, GOOD[0].tolist(), strict=True))
    row.update(changes)
    return torch.tensor([list(row.values())], dtype=torch.float32)


BAD_CALLS = [
    (lambda: resized_crop_flip(X[0], GOOD, 4), ValueError, "x must be a 4-D"),
    (lambda: resized_crop_flip(X.long(), GOOD, 4), TypeError, "x must be float32"),
    (lambda: resized_crop_flip([1.0], GOOD, 4), TypeError, "x must be a torch.Tensor"),
    (lambda: resized_crop_flip(X, GOOD[0], 4), ValueError, "params must have shape"),
    (lambda: resized_crop_flip(X, GOOD[:, :6], 4), ValueError, "params must have shape"),
    (lambda: resized_crop_flip(X, GOOD.expand(3, 7), 4), ValueError, "params must have shape"),
    (lambda: resized_crop_flip(X, GOOD.long(), 4), TypeError, "params must be float32"),
    (lambda: resized_crop_flip(X, GOOD.half(), 4), TypeError, "params must be float32"),
    (lambda: resized_crop_flip(X, GOOD.tolist(), 4), TypeError, "params must be a torch.Tensor"),
    (lambda: resized_crop_flip(X, GOOD.to("meta"), 4), ValueError, "params is on meta"),
    (lambda: resized_crop_flip(X, GOOD, 0), ValueError, "size must be"),
    (lambda: resized_crop_flip(X, GOOD, (4,)), ValueError, "size must be"),
    (lambda: resized_crop_flip(X, GOOD, (4, 2.5)), ValueError, "size must be"),
    (lambda: resized_crop_flip(X, GOOD, (True, 4)), ValueError, "size must be"),
    (lambda: resized_crop_flip(X, with_row(height=0), 4), ValueError, "height must be >= 1"),
    (lambda: resized_crop_flip(X, with_row(width=-2), 4), ValueError, "width must be >= 1"),
    (lambda: resized_crop_flip(X, with_row(top=-1), 4), ValueError, "top and left must be >= 0"),
    (lambda: resized_crop_flip(X, with_row(top=5), 4), ValueError, "ends below the image"),
    (lambda: resized_crop_flip(X, with_row(left=6), 4), ValueError, "ends right of the image"),
    (lambda: resized_crop_flip(X, with_row(flip=2), 4), ValueError, "flip must be 0 or 1"),
    (lambda: resized_crop_flip(X, with_row(top=0.5), 4), ValueError, "top must be an integer"),
    (
        lambda: resized_crop_flip(X, with_row(shift_x=1.5), 4),
        ValueError,
        "shift_x must be an integer",
    ),
    (lambda: resized_crop_flip(X, with_row(width=float("nan")), 4), ValueError, "finite"),
    (lambda: RandomResizedCropFlip(0), ValueError, "size must be"),
    (lambda: RandomResizedCropFlip(8, scale=(0.5, 0.1)), ValueError, "scale must be"),
    (lambda: RandomResizedCropFlip(8, scale=(0.0, 1.0)), ValueError, "scale must be"),
    (lambda: RandomResizedCropFlip(8, ratio=(2.0, 1.0)), ValueError, "ratio must be"),
    (lambda: RandomResizedCropFlip(8, flip_p=1.5), ValueError, "flip_p must be"),
    (lambda: RandomResizedCropFlip(8, jitter=-1), ValueError, "jitter must be"),
    (lambda: RandomResizedCropFlip(8, jitter=1.5), ValueError, "jitter must be"),
    (lambda: RandomResizedCropFlip(8, per_sample=1), TypeError, "per_sample must be"),
    (lambda: RandomResizedCropFlip(8, generator=0), TypeError, "generator must be"),
    (lambda: RandomResizedCropFlip(8).sample_params(4, 0, 8), ValueError, "in_h must be"),
    (lambda: RandomResizedCropFlip(8)(X[0]), ValueError, "x must be a 4-D"),
    (lambda: crop_scale_schedule(-1, 10), ValueError, "iteration must be"),
    (lambda: crop_scale_schedule(0, 0), ValueError, "total must be"),
    (lambda: crop_scale_schedule(0, 10, "exp"), ValueError, "kind must be"),
    (lambda: crop_scale_schedule(0, 10, milestone=0), ValueError, "milestone must be"),
    (lambda: crop_scale_schedule(0, 10, end=-0.1), ValueError, "end must be"),
    (lambda: crop_scale_schedule(0, 10, end=2.0), ValueError, "end is a crop scale"),
    (lambda: crop_scale_schedule(0, 10, start=1.5), ValueError, "start is a crop scale"),
]


@pytest.mark.parametrize("call, error, message", BAD_CALLS, ids=[m for _, _, m in BAD_CALLS])
def test_bad_arguments_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_op_checks_cpu_param_values_itself():
    # Direct op calls skip the Python wrapper; on CPU the op still refuses a box outside x.
    with pytest.raises(RuntimeError, match="outside the 8x10 image"):
        torch.ops.delt_ext.resized_crop_flip(X, with_row(top=6), 4, 4)
    with pytest.raises(RuntimeError, match="params must have shape"):
        torch.ops.delt_ext.resized_crop_flip(X, GOOD[:, :5], 4, 4)


def test_non_cpu_params_are_not_copied_to_the_host():
    # The wrapper checks values only of CPU params; others are checked by the op on their device.
    # Meta tensors hold no values: any host copy of them would fail.
    x = torch.empty(2, 3, 8, 10, device="meta")
    params = torch.empty(2, 7, device="meta")
    out = resized_crop_flip(x, params, (4, 5))
    assert out.device.type == "meta" and out.shape == (2, 3, 4, 5)


# ---- CUDA ---------------------------------------------------------------------------------------


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("memory_format", LAYOUTS)
@pytest.mark.parametrize("per_sample", [True, False])
def test_cuda_matches_cpu(dtype, memory_format, per_sample):
    generator = torch.Generator().manual_seed(11)
    x = (
        torch.randn(6, 3, 40, 36, generator=generator)
        .to(dtype)
        .contiguous(memory_format=memory_format)
    )
    params = random_params(6 if per_sample else 1, 40, 36, (32, 48), generator)
    grad = torch.randn(6, 3, 32, 48, generator=generator).to(dtype)
    tolerance = {
        torch.float32: 1e-5,
        torch.float64: 1e-12,
        torch.float16: 2e-3,
        torch.bfloat16: 1.6e-2,
    }[dtype]

    def run(device):
        xd = x.to(device).requires_grad_()
        out = resized_crop_flip(xd, params.to(device), (32, 48))
        (g,) = torch.autograd.grad(out, xd, grad.to(device))
        return out, g

    out_cpu, g_cpu = run("cpu")
    out_cuda, g_cuda = run("cuda")
    assert out_cuda.stride() == out_cpu.stride() and g_cuda.stride() == g_cpu.stride()
    assert (out_cuda.cpu().double() - out_cpu.double()).abs().max().item() <= tolerance
    assert (g_cuda.cpu().double() - g_cpu.double()).abs().max().item() <= 8 * tolerance


@CUDA
def test_cuda_backward_is_deterministic_and_gradchecks():
    generator = torch.Generator().manual_seed(12)
    x = torch.randn(32, 3, 64, 64, generator=generator, device="cpu").cuda().requires_grad_()
    params = random_params(32, 64, 64, (64, 64), generator).cuda()
    grad = torch.randn(32, 3, 64, 64, generator=generator).cuda()
    first = torch.autograd.grad(resized_crop_flip(x, params, 64), x, grad)[0]
    second = torch.autograd.grad(resized_crop_flip(x, params, 64), x, grad)[0]
    assert torch.equal(first, second)
    small = torch.randn(3, 2, 5, 6, dtype=torch.float64, device="cuda", requires_grad=True)
    rows_cuda = torch.tensor(
        [[0, 0, 5, 6, 0, 0, 0], [1, 2, 3, 3, 1, 1, -2], [4, 5, 1, 1, 1, 0, 5]],
        dtype=torch.float64,
        device="cuda",
    )
    assert torch.autograd.gradcheck(lambda t: resized_crop_flip(t, rows_cuda, (4, 9)), (small,))


@CUDA
def test_cuda_sampler_with_cuda_generator_and_opcheck():
    generator = torch.Generator(device="cuda").manual_seed(13)
    sampler = RandomResizedCropFlip(24, jitter=4, generator=generator)
    x = torch.randn(5, 3, 30, 30, device="cuda", requires_grad=True)
    out = sampler(x)
    assert out.shape == (5, 3, 24, 24) and sampler.last_params.device == x.device
    torch.library.opcheck(
        torch.ops.delt_ext.resized_crop_flip.default, (x, sampler.last_params, 24, 24)
    )


def test_cuda_tensor_on_cpu_only_build_gives_clear_error():
    if delt_ext.build_info().cuda_kernels:
        pytest.skip("this build has CUDA kernels")
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    params = torch.tensor([[0.0, 0.0, 4.0, 4.0, 0.0, 0.0, 0.0]])
    with pytest.raises(RuntimeError, match="built without CUDA kernels.*FORCE_CUDA=1"):
        torch.ops.delt_ext.resized_crop_flip.default.redispatch(
            keys, torch.randn(2, 3, 4, 4), params, 4, 4
        )
