"""The CUDA kernels (csrc/cuda/*.cuh) run on the CPU through the host emulation of
tests/cuda_emulation/, against delt_ext.reference and the CPU kernels.

No GPU is needed: the kernel bodies and their launch logic are the very code nvcc compiles into
the extension, built here with the system C++ compiler and run with one fiber per CUDA thread
(tests/cuda_emulation/README.md says what this checks and what it cannot). The module is built
once and cached under build/cuda_emulation/ (a new build when any kernel header changes).
"""

import hashlib
import itertools
from pathlib import Path

import pytest
import torch
from conftest import BN_SHAPES as SHARED_BN_SHAPES
from conftest import CROP_BOXES, CROP_H, CROP_W, DTYPES, GRAD_RTOL
from test_bn_stat import (
    NONFINITE_CASES,
    assert_matches_with_nonfinite,
    nonfinite_input,
    reference_nonfinite,
)

import delt_ext
from delt_ext import RandomResizedCropFlip, reference

ROOT = Path(__file__).resolve().parents[1]
EMULATION = Path(__file__).with_name("cuda_emulation")

pytestmark = pytest.mark.skipif(not delt_ext.HAS_OPS, reason="compiled delt_ext library not built")

# The CUDA tests' BN shapes (tests/test_bn_stat.py) and more: one value per channel, C > 1024
# and > 65535, 14x14 and 7x7 planes (vector fallbacks), many slices per channel.
BN_SHAPES = SHARED_BN_SHAPES + [(16, 512, 7, 7), (8, 32, 14, 14), (3, 1100, 2, 3)]
CROP_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _sources() -> list[Path]:
    return sorted(
        [*EMULATION.glob("*.h"), *EMULATION.glob("*.cpp"), *(ROOT / "csrc").glob("*.h")]
        + list((ROOT / "csrc" / "cuda").glob("*.cuh"))
    )


@pytest.fixture(scope="session")
def emu():
    from torch.utils import cpp_extension

    digest = hashlib.sha256()
    for path in _sources():
        digest.update(path.name.encode() + path.read_bytes())
    build = ROOT / "build" / "cuda_emulation"
    build.mkdir(parents=True, exist_ok=True)
    # cpp_extension.load rebuilds only when the listed sources change, not their headers: the
    # name carries a digest of every file the module includes.
    return cpp_extension.load(
        name=f"delt_cuda_emulation_{digest.hexdigest()[:16]}",
        sources=[str(EMULATION / "emulation.cpp")],
        extra_include_paths=[str(ROOT / "csrc"), str(EMULATION)],
        extra_cflags=["-O2", "-DDELT_CUDA_EMULATION"],
        build_directory=str(build),
    )


def make_input(shape, dtype, layout, seed=0, offset=0.5, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * scale + offset
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def misaligned_copy(x, offset=1):
    """The same values in a view whose storage starts `offset` elements into a buffer."""
    memory_format = (
        torch.channels_last
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )
    base = torch.empty(x.numel() + offset, dtype=x.dtype)
    if memory_format == torch.channels_last:
        n, c, h, w = x.shape
        view = base[offset:].view(n, h, w, c).permute(0, 3, 1, 2)
    else:
        view = base[offset:].view(x.shape)
    view.copy_(x)
    assert view.storage_offset() == offset and view.stride() == x.stride()
    return view


def targets(channels, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(channels, generator=generator), torch.rand(
        channels, generator=generator
    ) + 0.5


def exact_reference(x, running_mean, running_var):
    x64 = x.detach().double().requires_grad_(True)
    loss = reference.bn_stat_loss(x64, running_mean.double(), running_var.double())
    (grad,) = torch.autograd.grad(loss, x64)
    return loss, grad


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def emulated_loss_and_grad(emu, x, running_mean, running_var, grad_scale=1.0):
    loss, mean, var, coef = emu.bn_stat_loss(x, running_mean, running_var)
    scale = torch.tensor(grad_scale, dtype=loss.dtype)
    grad = emu.batch_stat_backward(x, mean, coef[0], coef[1], scale)
    return loss, mean, var, coef, grad


# ---- BN statistics --------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BN_SHAPES)
def test_bn_kernels_match_reference_and_cpu(emu, shape, dtype, layout):
    x = make_input(shape, dtype, layout)
    running_mean, running_var = targets(shape[1])
    loss, mean, var, coef, grad = emulated_loss_and_grad(emu, x, running_mean, running_var)
    cpu = torch.ops.delt_ext.bn_stat_loss(x, running_mean, running_var)
    expected_loss, expected_grad = exact_reference(x, running_mean, running_var)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == mean.dtype == var.dtype == coef.dtype == acc
    assert grad.dtype == dtype and grad.stride() == x.stride()
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(loss.double(), expected_loss, rtol=rtol, atol=0)
    for ours, theirs in zip((loss, mean, var, coef), cpu, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol)
    assert rel_err(grad, expected_grad) <= GRAD_RTOL[dtype]
    stats = emu.batch_mean_var(x)
    assert torch.equal(stats[0], mean) and torch.equal(stats[1], var)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bn_large_inputs_many_slices(emu, layout):
    # The CUDA tests' largest shape: many slices per channel and several loop trips per thread.
    x = make_input((100, 64, 32, 32), torch.float32, layout, seed=3)
    running_mean, running_var = targets(64)
    loss, mean, var, coef, grad = emulated_loss_and_grad(emu, x, running_mean, running_var, 0.5)
    launch = emu.last_bn_launch()
    assert launch["grid"][1] > 1  # slices per channel
    cpu = torch.ops.delt_ext.bn_stat_loss(x, running_mean, running_var)
    for ours, theirs in zip((loss, mean, var, coef), cpu, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    expected_loss, expected_grad = exact_reference(x, running_mean, running_var)
    assert rel_err(grad, 0.5 * expected_grad) <= GRAD_RTOL[torch.float32]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bn_more_than_65535_channels(emu, layout):
    shape = (2, 65540, 1, 1) if layout == "nchw" else (1, 65540, 1, 2)
    x = make_input(shape, torch.float32, layout, seed=4)
    running_mean, running_var = targets(shape[1])
    loss, mean, var, coef, grad = emulated_loss_and_grad(emu, x, running_mean, running_var)
    # (N, C, 1, 1) is read as the (N, C) matrix it is: the channels_last kernels (finding 4).
    assert emu.last_bn_launch()["channels_last"]
    assert emu.last_bn_launch()["load_width"] == 4
    expected_mean, expected_var = reference.batch_mean_var(x.double())
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), expected_var, rtol=1e-5, atol=1e-5)
    expected_loss, expected_grad = exact_reference(x, running_mean, running_var)
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=0)
    assert rel_err(grad, expected_grad) <= GRAD_RTOL[torch.float32]


@pytest.mark.parametrize(
    "shape, dtype, layout, forward_width, backward_width",
    [
        ((4, 8, 14, 14), torch.float16, "nchw", 4, 4),  # H*W = 196: 8-byte vectors
        ((4, 8, 7, 7), torch.float16, "nchw", 1, 1),  # H*W = 49: scalars
        ((4, 8, 5, 6), torch.float16, "nchw", 2, 2),  # H*W = 30: 4-byte vectors
        ((4, 8, 14, 14), torch.float32, "nchw", 4, 4),
        ((4, 8, 5, 6), torch.float32, "nchw", 2, 2),
        ((4, 8, 7, 7), torch.float32, "nchw", 1, 1),
        ((4, 12, 3, 3), torch.bfloat16, "channels_last", 4, 4),  # C = 12
        ((4, 6, 3, 3), torch.float32, "channels_last", 2, 2),
        ((4, 5, 3, 3), torch.float64, "channels_last", 1, 1),
        ((4, 64, 3, 3), torch.float16, "channels_last", 8, 8),
    ],
)
def test_bn_vector_width_falls_back_16_8_4_bytes(
    emu, shape, dtype, layout, forward_width, backward_width
):
    # Finding 2: the widest vector that divides the run (H*W or C) is used, not all-or-nothing.
    x = make_input(shape, dtype, layout, seed=5)
    running_mean, running_var = targets(shape[1])
    loss, mean, var, coef, grad = emulated_loss_and_grad(emu, x, running_mean, running_var)
    launch = emu.last_bn_launch()
    assert (launch["load_width"], launch["backward_width"]) == (forward_width, backward_width)
    expected_loss, expected_grad = exact_reference(x, running_mean, running_var)
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=0)
    assert rel_err(grad, expected_grad) <= GRAD_RTOL[dtype]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_misaligned_view_gives_the_bits_of_an_aligned_copy(emu, dtype, layout):
    # Finding 5: the summation order does not depend on the alignment (only the load width does).
    shape = (6, 16, 8, 8)
    x = make_input(shape, dtype, layout, seed=6)
    running_mean, running_var = targets(16)
    aligned = emulated_loss_and_grad(emu, x, running_mean, running_var)
    aligned_width = emu.last_bn_launch()["load_width"]
    shifted = misaligned_copy(x)
    misaligned = emulated_loss_and_grad(emu, shifted, running_mean, running_var)
    assert emu.last_bn_launch()["load_width"] < aligned_width  # a narrower load path ran
    for a, b in zip(aligned, misaligned, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(emu.batch_mean_var(shifted)[1], aligned[2])


def test_bn_channels_last_small_c_fills_the_gpu(emu):
    # Finding 3: with C <= 32 * VEC the grid is no longer capped at 256 blocks.
    x = make_input((256, 16, 32, 32), torch.float32, "channels_last", seed=7)
    mean, var = emu.batch_mean_var(x)
    launch = emu.last_bn_launch()
    assert launch["channels_last"] and launch["grid"][0] == 1 and launch["grid"][1] > 256
    expected_mean, expected_var = reference.batch_mean_var(x.double())
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), expected_var, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bn_results_do_not_depend_on_block_order(emu, layout):
    # The merge of partial sums has a fixed order: any interleaving of the blocks (1 or 3 host
    # threads running them) gives the same bits, as two runs on a GPU must.
    x = make_input((40, 24, 11, 13), torch.float32, layout, seed=8)
    running_mean, running_var = targets(24)
    runs = []
    try:
        for workers in (1, 3):
            emu.set_workers(workers)
            runs.append(emulated_loss_and_grad(emu, x, running_mean, running_var, 0.25))
    finally:
        emu.set_workers(2)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_bn_backward_with_statistics_gradients(emu):
    # batch_mean_var's backward: grad_mean and grad_var per channel, no scale.
    x = make_input((5, 9, 4, 6), torch.float64, "channels_last", seed=9).requires_grad_(True)
    weights = torch.randn(2, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mean, var = emu.batch_mean_var(x.detach())
    grad = emu.batch_stat_backward(x.detach(), mean, weights[0].clone(), weights[1].clone())
    mean_ref, var_ref = reference.batch_mean_var(x)
    (grad_ref,) = torch.autograd.grad(
        (weights[0] * mean_ref).sum() + (weights[1] * var_ref).sum(), x
    )
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", NONFINITE_CASES, ids=list(NONFINITE_CASES))
def test_bn_nan_inf_and_overflow_follow_the_eager_formula(emu, case, layout):
    # Issue 18: NaN anywhere -> NaN loss and gradient everywhere; inf as torch; no overflow from
    # the shift. The same cases as the CPU test (tests/test_bn_stat.py), on the CUDA kernels.
    x = nonfinite_input(case, layout)
    running_mean, running_var = targets(3)
    loss, mean, var, coef, grad = emulated_loss_and_grad(emu, x, running_mean, running_var)
    ref_loss, ref_grad, (ref_mean, ref_var) = reference_nonfinite(x, running_mean, running_var)
    assert_matches_with_nonfinite(loss, ref_loss, 1e-5)
    assert_matches_with_nonfinite(mean, ref_mean, 1e-5)
    assert_matches_with_nonfinite(var, ref_var, 1e-4)
    assert_matches_with_nonfinite(grad, ref_grad, 1e-4)
    stats = emu.batch_mean_var(x)
    assert torch.equal(stats[0].isnan(), mean.isnan())
    assert torch.equal(stats[1].isnan(), var.isnan())
    # The CPU kernels give the same NaN/inf pattern.
    cpu = torch.ops.delt_ext.bn_stat_loss(x, running_mean, running_var)
    for ours, theirs in zip((loss, mean, var, coef), cpu, strict=True):
        assert_matches_with_nonfinite(ours, theirs, 1e-4)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bn_overflow_repair_in_a_large_grid(emu, layout):
    # Several slices per channel and a huge value deep inside one channel, NaN in another.
    x = make_input((40, 24, 11, 13), torch.float32, layout, seed=12)
    x[17, 3, 5, 5] = 1e37
    x[0, 5, 0, 0] = float("-inf")
    x[39, 11, 10, 12] = float("nan")
    running_mean, running_var = targets(24)
    loss, mean, var, coef, grad = emulated_loss_and_grad(emu, x, running_mean, running_var)
    ref_mean, ref_var = reference.batch_mean_var(x)
    assert_matches_with_nonfinite(mean, ref_mean, 1e-5)
    assert_matches_with_nonfinite(var, ref_var, 1e-4)
    assert torch.isnan(loss) and torch.isnan(grad).all()


def test_bn_emulated_kernels_check_their_arguments(emu):
    with pytest.raises(RuntimeError, match="x must be a 4-D"):
        emu.batch_mean_var(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="running_mean must be a 1-D tensor"):
        emu.bn_stat_loss(torch.randn(2, 3, 4, 4), torch.zeros(2), torch.ones(3))


# ---- grouped BN statistics ---------------------------------------------------------------------

GROUPED_SHAPES = [(8, 16, 9, 7), (3, 5, 64, 65), (6, 6, 1, 1), (12, 37, 5, 5), (10, 130, 3, 3)]


def grouped_case(n, pattern, seed=0):
    from test_bn_stat_grouped import group_index

    return group_index(n, pattern, seed)


def emulated_grouped(emu, x, index, target_mean, target_var, weight=None, scale=None):
    out = emu.bn_stat_loss_grouped(x, index, target_mean, target_var, weight)
    grad_scale = scale
    if grad_scale is None and weight is not None:
        grad_scale = weight.to(out[0].dtype)
    grad = emu.grouped_stat_backward(x, index, out[2], out[4][0], out[4][1], grad_scale)
    return (*out, grad)


@pytest.mark.parametrize("pattern", ["one", "each", "random"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GROUPED_SHAPES)
def test_grouped_kernels_match_cpu_and_reference(emu, shape, dtype, layout, pattern):
    from test_bn_stat_grouped import exact_grouped, group_targets, group_weights

    x = make_input(shape, dtype, layout)
    index, groups = grouped_case(shape[0], pattern)
    target_mean, target_var = group_targets(groups, shape[1])
    weight = group_weights(groups)
    *outputs, grad = emulated_grouped(emu, x, index, target_mean, target_var, weight)
    cpu = torch.ops.delt_ext.bn_stat_loss_grouped(x, index, target_mean, target_var, weight)
    cpu_grad = torch.ops.delt_ext.grouped_stat_backward(
        x, index, cpu[2], cpu[4][0], cpu[4][1], weight
    )
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for ours, theirs in zip(outputs, cpu, strict=True):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol, equal_nan=True)
    assert grad.dtype == dtype and grad.stride() == x.stride()
    assert rel_err(grad, cpu_grad) <= GRAD_RTOL[dtype]
    expected_loss, expected_grad = exact_grouped(x, index, target_mean, target_var, weight)
    torch.testing.assert_close(outputs[0].double(), expected_loss, rtol=rtol, atol=0)
    assert rel_err(grad, expected_grad) <= GRAD_RTOL[dtype]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_grouped_large_input_and_one_group_match_the_ungrouped_kernels(emu, layout):
    x = make_input((100, 64, 32, 32), torch.float32, layout, seed=3)
    running_mean, running_var = targets(64)
    index = torch.zeros(100, dtype=torch.int64)
    *grouped, grad = emulated_grouped(
        emu, x, index, running_mean[None], running_var[None], scale=torch.tensor(0.5)
    )
    loss, mean, var, coef, ungrouped_grad = emulated_loss_and_grad(
        emu, x, running_mean, running_var, 0.5
    )
    torch.testing.assert_close(grouped[0], loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grouped[2][0], mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grouped[3][0], var, rtol=1e-5, atol=1e-6)
    assert rel_err(grad, ungrouped_grad) <= GRAD_RTOL[torch.float32]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_misaligned_view_and_block_order_give_the_same_bits(emu, dtype, layout):
    x = make_input((6, 16, 8, 8), dtype, layout, seed=6)
    index = torch.tensor([1, 0, 1, 2, 0, 1])
    target_mean, target_var = targets(16)
    tm, tv = target_mean.repeat(3, 1), target_var.repeat(3, 1)
    aligned = emulated_grouped(emu, x, index, tm, tv)
    width = emu.last_bn_launch()["load_width"]
    shifted = misaligned_copy(x)
    runs = []
    try:
        for workers in (1, 3):
            emu.set_workers(workers)
            runs.append(emulated_grouped(emu, shifted, index, tm, tv))
            assert emu.last_bn_launch()["load_width"] < width
    finally:
        emu.set_workers(2)
    for run in runs:
        for a, b in zip(aligned, run, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", NONFINITE_CASES, ids=list(NONFINITE_CASES))
def test_grouped_nan_inf_and_overflow_follow_the_cpu_kernels(emu, case, layout):
    x = nonfinite_input(case, layout)
    index = torch.tensor([1, 0, 1, 0])
    target_mean, target_var = targets(3)
    tm, tv = target_mean.repeat(2, 1), target_var.repeat(2, 1)
    *outputs, grad = emulated_grouped(emu, x, index, tm, tv)
    cpu = torch.ops.delt_ext.bn_stat_loss_grouped(x, index, tm, tv, None)
    cpu_grad = torch.ops.delt_ext.grouped_stat_backward(
        x, index, cpu[2], cpu[4][0], cpu[4][1], None
    )
    for ours, theirs in zip((*outputs, grad), (*cpu, cpu_grad), strict=True):
        assert_matches_with_nonfinite(ours, theirs, 1e-4)


def test_grouped_index_out_of_range_fails_on_the_device(emu):
    x = torch.randn(4, 3, 2, 2)
    target_mean, target_var = torch.zeros(2, 3), torch.ones(2, 3)
    for bad in (torch.tensor([0, 1, 2, 0]), torch.tensor([0, -1, 1, 0])):
        for layout in ("nchw", "channels_last"):
            xs = make_input((4, 3, 2, 2), torch.float32, layout)
            with pytest.raises(RuntimeError, match="group_index is out of range"):
                emu.bn_stat_loss_grouped(xs, bad, target_mean, target_var)
        with pytest.raises(RuntimeError, match="group_index is out of range"):
            emu.grouped_stat_backward(x, bad, target_mean, target_mean, target_var)
    with pytest.raises(RuntimeError, match="target_mean must be a 2-D"):
        emu.bn_stat_loss_grouped(x, torch.tensor([0, 1, 1, 0]), torch.zeros(3), target_var)


# ---- image_channel_sums -----------------------------------------------------------------------

SUMS_SHAPES = [(3, 5, 7, 9), (2, 3, 28, 28), (4, 37, 1, 1), (2, 70, 8, 4), (1, 2, 3, 1)]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SUMS_SHAPES)
def test_channel_sums_match_cpu_and_reference(emu, shape, dtype, layout):
    x = make_input(shape, dtype, layout, seed=11)
    emulated = emu.image_channel_sums(x)
    cpu = torch.ops.delt_ext.image_channel_sums(x)
    expected = reference.image_channel_sums(x)
    for got, want, exact in zip(emulated, cpu, expected, strict=True):
        assert got.dtype == torch.float64 and got.shape == shape[:2]
        if dtype == torch.float64:  # rounded squares: the order of the additions may differ
            torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-13)
        else:  # exact squares: the documented order gives the CPU kernel's bits
            assert torch.equal(got, want)
        torch.testing.assert_close(got, exact, rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_channel_sums_grid_stride_and_block_order(emu, layout):
    x = make_input((9, 40, 6, 7), torch.float32, layout, seed=12)
    expected = torch.ops.delt_ext.image_channel_sums(x)
    before = emu.set_sums_max_blocks(2)
    try:
        for workers in (1, 3):
            emu.set_workers(workers)
            for got, want in zip(emu.image_channel_sums(x), expected, strict=True):
                assert torch.equal(got, want)
    finally:
        emu.set_workers(2)
        emu.set_sums_max_blocks(before)


def test_channel_sums_empty_and_bad_input(emu):
    for shape in [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4)]:
        total, squares = emu.image_channel_sums(torch.randn(shape))
        assert total.shape == shape[:2] and not total.any() and not squares.any()
    with pytest.raises(RuntimeError, match="4-D"):
        emu.image_channel_sums(torch.randn(3, 4, 5))


# ---- resized_crop_flip ------------------------------------------------------------------------

H, W = CROP_H, CROP_W
BOXES = [box for box in CROP_BOXES if box not in ((0, 0, CROP_H, 2), (6, 0, 1, CROP_W))]
SIZES = [(H, W), (8, 8), (32, 40), (1, 1), (29, 7)]
FLIP_SHIFTS = [(0, 0, 0), (1, 0, 0), (1, 2, -3), (0, -1, 45), (1, 1000, -999)]
LAYOUTS = (torch.contiguous_format, torch.channels_last)


def crop_both(emu, x, params, size, grad_out):
    out = emu.resized_crop_flip(x, params, *size)
    grad = emu.resized_crop_flip_backward(grad_out, params, x.shape[2], x.shape[3])
    out_cpu = torch.ops.delt_ext.resized_crop_flip(x, params, *size)
    grad_cpu = torch.ops.delt_ext.resized_crop_flip_backward(
        grad_out, params, x.shape[2], x.shape[3]
    )
    return out, grad, out_cpu, grad_cpu


@pytest.mark.parametrize("memory_format", LAYOUTS)
def test_crop_boxes_sizes_flips_and_rolls_match_cpu(emu, memory_format):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, H, W, generator=generator).contiguous(memory_format=memory_format)
    cases = list(itertools.product(BOXES, SIZES, FLIP_SHIFTS))
    for box, size, (flip, shift_y, shift_x) in cases:
        params = torch.tensor([[*box, flip, shift_y, shift_x]], dtype=torch.float32)
        grad_out = torch.randn(2, 3, *size, generator=generator).contiguous(
            memory_format=memory_format
        )
        out, grad, out_cpu, grad_cpu = crop_both(emu, x, params, size, grad_out)
        assert out.stride() == out_cpu.stride() and grad.stride() == grad_cpu.stride()
        assert (out - out_cpu).abs().max().item() <= 1e-5, (box, size, flip, shift_y, shift_x)
        assert (grad - grad_cpu).abs().max().item() <= 1e-5, (box, size, flip, shift_y, shift_x)
        expected = reference.resized_crop_flip(x, params, size)
        assert (out - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("memory_format", LAYOUTS)
@pytest.mark.parametrize("per_sample", [True, False])
def test_crop_random_params_match_cpu_and_reference(emu, dtype, memory_format, per_sample):
    # The CUDA tests' case (6, 3, 40, 36) -> (32, 48), with random boxes, flips and rolls.
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(6, 3, 40, 36, generator=generator).to(dtype)
    x = x.contiguous(memory_format=memory_format)
    sampler = RandomResizedCropFlip((32, 48), jitter=40, per_sample=per_sample, generator=generator)
    params = sampler.sample_params(6, 40, 36)
    grad_out = torch.randn(6, 3, 32, 48, generator=generator).to(dtype)
    grad_out = grad_out.contiguous(memory_format=memory_format)
    out, grad, out_cpu, grad_cpu = crop_both(emu, x, params, (32, 48), grad_out)
    tolerance = CROP_TOL[dtype]
    assert out.dtype == grad.dtype == dtype
    assert (out.double() - out_cpu.double()).abs().max().item() <= tolerance
    assert (grad.double() - grad_cpu.double()).abs().max().item() <= 8 * tolerance
    expected = reference.resized_crop_flip(x, params, (32, 48))
    assert (out.double() - expected.double()).abs().max().item() <= tolerance
    # The backward is the adjoint of the forward: <crop(x), g> == <x, crop^T(g)>.
    if dtype == torch.float64:
        lhs = (out * grad_out).sum()
        rhs = (x * grad).sum()
        torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


def test_crop_many_random_cases_float64(emu):
    generator = torch.Generator().manual_seed(21)
    worst = 0.0
    for case in range(120):
        n = 1 + case % 3
        height, width = (int(v) for v in torch.randint(1, 20, (2,), generator=generator))
        size = tuple(int(v) for v in torch.randint(1, 24, (2,), generator=generator))
        x = torch.randn(n, 2, height, width, generator=generator, dtype=torch.float64)
        if case % 2:
            x = x.contiguous(memory_format=torch.channels_last)
        sampler = RandomResizedCropFlip(
            size, scale=(0.01, 1.0), jitter=60, per_sample=case % 4 != 0, generator=generator
        )
        params = sampler.sample_params(n, height, width).double()
        grad_out = torch.randn(n, 2, *size, generator=generator, dtype=torch.float64)
        out, grad, out_cpu, grad_cpu = crop_both(emu, x, params, size, grad_out)
        worst = max(worst, (out - out_cpu).abs().max().item(), (grad - grad_cpu).abs().max().item())
    assert worst <= 1e-12


def test_crop_grid_stride_loops(emu):
    # A few blocks must cover every element through the grid-stride loops.
    generator = torch.Generator().manual_seed(31)
    x = torch.randn(3, 4, 21, 19, generator=generator)
    params = RandomResizedCropFlip((17, 23), jitter=9, generator=generator).sample_params(3, 21, 19)
    grad_out = torch.randn(3, 4, 17, 23, generator=generator)
    before = emu.set_max_blocks(2)
    try:
        out, grad, out_cpu, grad_cpu = crop_both(emu, x, params, (17, 23), grad_out)
    finally:
        emu.set_max_blocks(before)
    assert (out - out_cpu).abs().max().item() <= 1e-5
    assert (grad - grad_cpu).abs().max().item() <= 1e-5


def test_crop_is_deterministic_whatever_the_block_order(emu):
    generator = torch.Generator().manual_seed(41)
    params = RandomResizedCropFlip(30, jitter=4, generator=generator).sample_params(4, 30, 30)
    grad_out = torch.randn(4, 3, 30, 30, generator=generator)
    runs = []
    try:
        for workers in (1, 3):
            emu.set_workers(workers)
            runs.append(emu.resized_crop_flip_backward(grad_out, params, 30, 30))
    finally:
        emu.set_workers(2)
    assert torch.equal(runs[0], runs[1])


GOOD_ROW = [1.0, 2.0, 4.0, 5.0, 1.0, 3.0, -2.0]
BAD_ROWS = {
    "box below the image": {0: 5.0},
    "box right of the image": {1: 6.0},
    "zero height": {2: 0.0},
    "negative left": {1: -1.0},
    "fractional top": {0: 0.5},
    "flip 2": {4: 2.0},
    "NaN shift": {6: float("nan")},
    "infinite shift": {5: float("inf")},
}


@pytest.mark.parametrize("bad", BAD_ROWS, ids=list(BAD_ROWS))
@pytest.mark.parametrize("backward", [False, True])
def test_crop_params_are_checked_on_the_device_like_on_the_cpu(emu, bad, backward):
    # Finding 6: a bad row is an error on both devices (on a GPU a device-side assertion), never a
    # silently clamped crop; a good row passes on both.
    x = torch.randn(2, 3, 8, 10)
    params = torch.tensor([GOOD_ROW, GOOD_ROW])
    for column, value in BAD_ROWS[bad].items():
        params[1, column] = value
    if backward:
        grad_out = torch.randn(2, 3, 4, 4)
        with pytest.raises(RuntimeError):
            torch.ops.delt_ext.resized_crop_flip_backward(grad_out, params, 8, 10)
        with pytest.raises(RuntimeError, match="a params row is invalid"):
            emu.resized_crop_flip_backward(grad_out, params, 8, 10)
    else:
        with pytest.raises(RuntimeError):
            torch.ops.delt_ext.resized_crop_flip(x, params, 4, 4)
        with pytest.raises(RuntimeError, match="a params row is invalid"):
            emu.resized_crop_flip(x, params, 4, 4)
    good = torch.tensor([GOOD_ROW, GOOD_ROW])
    torch.testing.assert_close(
        emu.resized_crop_flip(x, good, 4, 4), delt_ext.resized_crop_flip(x, good, 4)
    )


def test_crop_empty_batch_still_checks_params(emu):
    params = torch.tensor([[0.0, 0.0, 9.0, 4.0, 0.0, 0.0, 0.0]])  # taller than the 8-row image
    with pytest.raises(RuntimeError):
        torch.ops.delt_ext.resized_crop_flip(torch.randn(0, 3, 8, 10), params, 4, 4)
    with pytest.raises(RuntimeError, match="a params row is invalid"):
        emu.resized_crop_flip(torch.randn(0, 3, 8, 10), params, 4, 4)


# ---- the emulator itself ----------------------------------------------------------------------


def test_emulator_counts_launches(emu):
    # The forward of the loss is two launches, its backward two (coefficients, elementwise).
    x = make_input((4, 8, 5, 5), torch.float32, "nchw")
    running_mean, running_var = targets(8)
    before = emu.launch_count()
    loss, mean, var, coef = emu.bn_stat_loss(x, running_mean, running_var)
    assert emu.launch_count() - before == 2
    emu.batch_stat_backward(x, mean, coef[0], coef[1])
    assert emu.launch_count() - before == 4
