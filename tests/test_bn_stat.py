"""The fused BN-statistic ops against the SRe2L formula (delt_ext.reference) and the eager hook."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BN_LAYOUTS, BN_SHAPES, DEVICES, DTYPES, GRAD_RTOL, requires_cuda
from torch.utils._python_dispatch import TorchDispatchMode

import delt_ext
from delt_ext import reference

ROOT = Path(__file__).resolve().parents[1]


def make_input(shape, dtype, layout, device="cpu", seed=0, offset=0.5, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    if layout == "strided":
        # Every other column of a wider tensor: neither NCHW- nor channels_last-contiguous.
        x = torch.randn(n, c, h, 2 * w, generator=generator)[..., ::2]
    else:
        x = torch.randn(shape, generator=generator)
    x = (x * scale + offset).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(device)


def make_targets(channels, device="cpu", seed=1):
    generator = torch.Generator().manual_seed(seed)
    running_mean = torch.randn(channels, generator=generator)
    running_var = torch.rand(channels, generator=generator) + 0.5
    return running_mean.to(device), running_var.to(device)


def sre2l_hook_loss(x, running_mean, running_var):
    """SRe2L's BNFeatureHook body, verbatim in spirit: the formula every repository copies."""
    nch = x.shape[1]
    mean = x.mean([0, 2, 3])
    var = x.permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
    return torch.norm(running_var - var, 2) + torch.norm(running_mean - mean, 2)


def exact_reference(x, running_mean, running_var):
    """Loss and gradient of the reference in float64 on the same input values."""
    x64 = x.detach().double().requires_grad_(True)
    loss = reference.bn_stat_loss(x64, running_mean.double(), running_var.double())
    (grad,) = torch.autograd.grad(loss, x64)
    return loss, grad


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BN_SHAPES)
def test_loss_and_grad_match_reference(shape, dtype, layout, device):
    x = make_input(shape, dtype, layout, device).requires_grad_(True)
    running_mean, running_var = make_targets(shape[1], device)

    loss = delt_ext.bn_stat_loss(x, running_mean, running_var)
    (grad,) = torch.autograd.grad(loss, x)
    expected_loss, expected_grad = exact_reference(x, running_mean, running_var)

    assert loss.shape == ()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype and grad.shape == x.shape
    assert grad.stride() == torch.empty_like(x).stride()
    loss_rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(loss.double(), expected_loss, rtol=loss_rtol, atol=0)
    assert torch.isfinite(grad).all()
    assert rel_err(grad, expected_grad) <= GRAD_RTOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BN_SHAPES)
def test_batch_mean_var_matches_reference(shape, dtype, layout, device):
    x = make_input(shape, dtype, layout, device)
    mean, var = delt_ext.batch_mean_var(x)
    expected_mean, expected_var = reference.batch_mean_var(x.double())
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == var.dtype == acc and mean.shape == var.shape == (shape[1],)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(mean.double(), expected_mean, rtol=rtol, atol=rtol)
    torch.testing.assert_close(var.double(), expected_var, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", BN_SHAPES + [(16, 32, 12, 12)])
def test_matches_sre2l_eager_hook(shape, dtype, layout, device):
    """The eager hook run in the input's own dtype, as SRe2L runs it (16-bit types: see below)."""
    x = make_input(shape, dtype, layout, device).requires_grad_(True)
    running_mean, running_var = (t.to(dtype) for t in make_targets(shape[1], device))
    hook_loss = sre2l_hook_loss(x, running_mean, running_var)
    (hook_grad,) = torch.autograd.grad(hook_loss, x)
    loss = delt_ext.bn_stat_loss(x, running_mean, running_var)
    (grad,) = torch.autograd.grad(loss, x)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(loss, hook_loss, rtol=rtol, atol=0)
    assert rel_err(grad, hook_grad) < (1e-10 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_sre2l_eager_hook_on_16_bit_inputs(dtype, layout, device):
    """16-bit activations (autocast): the fused op accumulates in float32, so it equals the hook
    applied to the same values upcast to float32, not the hook's own 16-bit arithmetic."""
    x = make_input((16, 32, 12, 12), dtype, layout, device).requires_grad_(True)
    running_mean, running_var = make_targets(32, device)
    x32 = x.detach().float().requires_grad_(True)
    hook_loss = sre2l_hook_loss(x32, running_mean, running_var)
    (hook_grad,) = torch.autograd.grad(hook_loss, x32)
    loss = delt_ext.bn_stat_loss(x, running_mean, running_var)
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(loss, hook_loss, rtol=1e-5, atol=0)
    assert grad.dtype == dtype
    assert rel_err(grad, hook_grad) <= GRAD_RTOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_batch_mean_var_gradient_matches_autograd(device):
    x = make_input((4, 6, 5, 3), torch.float64, "channels_last", device).requires_grad_(True)
    weights = torch.randn(2, 6, dtype=torch.float64).to(device)
    mean, var = delt_ext.batch_mean_var(x)
    (grad,) = torch.autograd.grad((weights[0] * mean).sum() + (weights[1] * var).sum(), x)
    mean_ref, var_ref = reference.batch_mean_var(x)
    (grad_ref,) = torch.autograd.grad(
        (weights[0] * mean_ref).sum() + (weights[1] * var_ref).sum(), x
    )
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12)
    # Only one output used: the other gets no gradient, and that must still work.
    (grad_var_only,) = torch.autograd.grad(delt_ext.batch_mean_var(x)[1].sum(), x)
    (grad_var_ref,) = torch.autograd.grad(reference.batch_mean_var(x)[1].sum(), x)
    torch.testing.assert_close(grad_var_only, grad_var_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 4, 1, 1), (3, 2, 1, 7)])
def test_gradcheck_float64(shape, layout, device):
    x = make_input(shape, torch.float64, layout, device).requires_grad_(True)
    targets = make_targets(shape[1], device)
    running_mean, running_var = (t.double().requires_grad_(True) for t in targets)
    assert torch.autograd.gradcheck(delt_ext.bn_stat_loss, (x, running_mean, running_var))
    assert torch.autograd.gradcheck(delt_ext.batch_mean_var, (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_statistics_used_by_other_outputs_reach_the_gradient(device):
    # If a caller differentiates the op's mean/var outputs too, their gradients must add up.
    x = make_input((3, 4, 3, 3), torch.float64, "nchw", device).requires_grad_(True)
    running_mean, running_var = (t.double() for t in make_targets(4, device))
    loss, mean, var, _ = torch.ops.delt_ext.bn_stat_loss(x, running_mean, running_var)
    (grad,) = torch.autograd.grad(loss + mean.sum() + 3 * var.sum(), x)
    ref_loss = reference.bn_stat_loss(x, running_mean, running_var)
    ref_mean, ref_var = reference.batch_mean_var(x)
    (grad_ref,) = torch.autograd.grad(ref_loss + ref_mean.sum() + 3 * ref_var.sum(), x)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_of_the_loss_alone_is_one_kernel(device):
    # Issue 14: with only the loss used, the backward is the fused kernel with the incoming
    # gradient as its scale, not zero tensors for the unused mean/var outputs plus several
    # elementwise ops (register_autograd materializes zeros unless told not to).
    x = make_input((4, 6, 5, 5), torch.float32, "nchw", device).requires_grad_(True)
    running_mean, running_var = make_targets(6, device)
    loss = delt_ext.bn_stat_loss(x, running_mean, running_var)
    with _RecordOps() as recorded:
        (grad,) = torch.autograd.grad(3.0 * loss, x)
    kernels = [op for op in recorded.ops if op not in ("select", "detach", "alias")]
    assert kernels.count("batch_stat_backward") == 1
    assert not {"zeros_like", "zeros", "add", "fill_", "new_zeros"} & set(kernels), kernels
    _, expected = exact_reference(x, running_mean, running_var)
    assert rel_err(grad, 3.0 * expected) <= GRAD_RTOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_zero_norm_gives_zero_gradient_not_nan(device):
    # Values +-1 in every channel: the batch mean is exactly 0 and the variance exactly 1.
    signs = torch.tensor([1.0, -1.0], device=device).repeat(8)
    x = signs.reshape(2, 1, 2, 4).repeat(1, 3, 1, 1).requires_grad_(True)
    running_mean, running_var = torch.zeros(3, device=device), torch.ones(3, device=device)
    loss = delt_ext.bn_stat_loss(x, running_mean, running_var)
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(x))
    # Only the variance matches: the mean part still has its gradient.
    half = torch.full((3,), 0.5, device=device)
    loss = delt_ext.bn_stat_loss(x, half, running_var)
    (grad,) = torch.autograd.grad(loss, x)
    _, grad_ref = exact_reference(x, half, running_var)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_single_value_per_channel_has_zero_variance(device):
    x = torch.randn(1, 5, 1, 1, device=device, requires_grad=True)
    mean, var = delt_ext.batch_mean_var(x)
    assert torch.equal(var, torch.zeros(5, device=device))
    assert torch.equal(mean, x.detach().flatten())
    loss = delt_ext.bn_stat_loss(x, torch.zeros(5, device=device), torch.ones(5, device=device))
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_variance_is_stable_for_large_means(layout, device):
    # float32 data with mean 1e4 and std 1: a naive E[x^2] - E[x]^2 loses every digit.
    x = make_input((32, 8, 16, 16), torch.float32, layout, device, offset=1e4, scale=1.0)
    _, var = delt_ext.batch_mean_var(x)
    _, expected = reference.batch_mean_var(x.double())
    assert ((var.double() - expected).abs() / expected).max().item() < 1e-3
    # The gradient is computed around the mean, so it stays accurate too.
    x.requires_grad_(True)
    running_mean, running_var = torch.full((8,), 1e4, device=device), torch.ones(8, device=device)
    (grad,) = torch.autograd.grad(delt_ext.bn_stat_loss(x, running_mean, running_var), x)
    _, grad_ref = exact_reference(x, running_mean, running_var)
    assert rel_err(grad, grad_ref) < 1e-3


# Values written into x (float32, (4, 3, 5, 6)) at (n, c, h, w): NaN, infinities and huge
# finite values, as the first element of a channel (its shift) and elsewhere.
NONFINITE_CASES = {
    "nan": {(1, 1, 2, 3): float("nan")},
    "nan first": {(0, 0, 0, 0): float("nan")},
    "+inf": {(2, 1, 4, 5): float("inf")},
    "+inf first": {(0, 2, 0, 0): float("inf")},
    "-inf first": {(0, 0, 0, 0): float("-inf")},
    "+inf and -inf": {(1, 0, 1, 1): float("inf"), (3, 0, 2, 2): float("-inf")},
    "1e37 first": {(0, 0, 0, 0): 1e37},
    "3e38 first": {(0, 0, 0, 0): 3e38},
    "-3e38 first": {(0, 1, 0, 0): -3e38},
    "1e37 inside": {(2, 2, 3, 3): 1e37},
    "two 2e38": {(0, 1, 0, 0): 2e38, (3, 1, 4, 5): -2e38},
}


def nonfinite_input(case, layout, dtype=torch.float32):
    x = make_input((4, 3, 5, 6), torch.float32, "nchw", seed=7)
    for index, value in NONFINITE_CASES[case].items():
        x[index] = value
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def assert_matches_with_nonfinite(ours, expected, rtol):
    """Same NaN and +-inf positions; finite values close (relative to the largest finite one)."""
    ours, expected = ours.detach().double(), expected.detach().double()
    assert torch.equal(torch.isnan(ours), torch.isnan(expected))
    assert torch.equal(torch.isposinf(ours), torch.isposinf(expected))
    assert torch.equal(torch.isneginf(ours), torch.isneginf(expected))
    finite = torch.isfinite(expected)
    if finite.any():
        scale = expected[finite].abs().max().clamp_min(1e-30)
        assert ((ours[finite] - expected[finite]).abs().max() / scale).item() <= rtol


def reference_nonfinite(x, running_mean, running_var):
    """The eager formula and its autograd, in x's accumulate dtype (float32 here)."""
    x_ref = x.detach().float().requires_grad_(True)
    loss = reference.bn_stat_loss(x_ref, running_mean, running_var)
    (grad,) = torch.autograd.grad(loss, x_ref)
    return loss, grad, reference.batch_mean_var(x.detach())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", NONFINITE_CASES, ids=list(NONFINITE_CASES))
def test_nan_inf_and_overflow_follow_the_eager_formula(case, layout, device):
    x = nonfinite_input(case, layout).to(device).requires_grad_(True)
    running_mean, running_var = make_targets(3, device)
    loss = delt_ext.bn_stat_loss(x, running_mean, running_var)
    (grad,) = torch.autograd.grad(loss, x)
    mean, var = delt_ext.batch_mean_var(x)
    ref_loss, ref_grad, (ref_mean, ref_var) = reference_nonfinite(x, running_mean, running_var)
    assert_matches_with_nonfinite(loss, ref_loss, 1e-5)
    assert_matches_with_nonfinite(mean, ref_mean, 1e-5)
    assert_matches_with_nonfinite(var, ref_var, 1e-4)
    assert_matches_with_nonfinite(grad, ref_grad, 1e-4)
    if "nan" in case:
        # NaN anywhere in the layer's input: the loss and every gradient element are NaN.
        assert torch.isnan(loss) and torch.isnan(grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_overflow_cases_from_the_audit(device):
    # Issue: 1e37 as x[0, 0, 0, 0] gave mean -inf (torch: 3.9e34); 3e38 gave a NaN loss where the
    # eager formula gives inf; +inf gave mean NaN where torch gives inf.
    x = make_input((8, 16, 9, 7), torch.float32, "nchw", device)
    running_mean, running_var = make_targets(16, device)
    x[0, 0, 0, 0] = 1e37
    mean, _ = delt_ext.batch_mean_var(x)
    torch.testing.assert_close(mean[0], x[:, 0].mean(), rtol=1e-6, atol=0)
    x[0, 0, 0, 0] = 3e38
    assert torch.isposinf(delt_ext.bn_stat_loss(x, running_mean, running_var))
    x[0, 0, 0, 0] = float("inf")
    assert torch.isposinf(delt_ext.batch_mean_var(x)[0][0])
    x[0, 0, 0, 0] = float("nan")
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(delt_ext.bn_stat_loss(x, running_mean, running_var), x)
    assert torch.isnan(grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_nan_and_inf_in_other_dtypes(dtype, device):
    for case in ("nan", "+inf first", "+inf and -inf"):
        x = nonfinite_input(case, "nchw", dtype).to(device).requires_grad_(True)
        running_mean, running_var = make_targets(3, device)
        loss = delt_ext.bn_stat_loss(x, running_mean, running_var)
        (grad,) = torch.autograd.grad(loss, x)
        x_ref = x.detach().to(ops_accumulate(dtype)).requires_grad_(True)
        ref_loss = reference.bn_stat_loss(x_ref, running_mean, running_var)
        (ref_grad,) = torch.autograd.grad(ref_loss, x_ref)
        assert_matches_with_nonfinite(loss, ref_loss, 1e-5)
        assert torch.equal(torch.isnan(grad), torch.isnan(ref_grad))
        mean, var = delt_ext.batch_mean_var(x)
        ref_mean, ref_var = reference.batch_mean_var(x.detach())
        assert_matches_with_nonfinite(mean, ref_mean, 1e-5)
        assert_matches_with_nonfinite(var, ref_var, 1e-4)


def ops_accumulate(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_nonfinite_results_do_not_depend_on_thread_count(layout, num_threads):
    x = make_input((100, 64, 8, 8), torch.float32, layout)
    x[3, 5, 1, 1] = float("inf")
    x[0, 7, 0, 0] = 1e37
    x[9, 9, 2, 2] = float("nan")
    running_mean, running_var = make_targets(64)
    results = []
    for threads in (1, 2, 3):
        num_threads(threads)
        results.append((*torch.ops.delt_ext.bn_stat_loss(x, running_mean, running_var),))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a.isnan(), b.isnan())
            assert torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(100, 64, 8, 8), (4, 8, 70, 70), (3000, 3, 4, 4)])
def test_results_do_not_depend_on_thread_count(shape, layout, num_threads):
    x = make_input(shape, torch.float32, layout).requires_grad_(True)
    running_mean, running_var = make_targets(shape[1])
    results = []
    for threads in (1, 2, 3):
        num_threads(threads)
        loss = delt_ext.bn_stat_loss(x, running_mean, running_var)
        (grad,) = torch.autograd.grad(loss, x)
        results.append((loss, grad, *delt_ext.batch_mean_var(x)))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck(layout, device):
    x = make_input((3, 5, 4, 6), torch.float32, layout, device)
    running_mean, running_var = make_targets(5, device)
    ops = torch.ops.delt_ext
    for requires_grad in (False, True):
        xg = x.detach().requires_grad_(requires_grad)
        torch.library.opcheck(ops.bn_stat_loss.default, (xg, running_mean, running_var))
        torch.library.opcheck(ops.batch_mean_var.default, (xg,))
    _, mean, _, coef = ops.bn_stat_loss(x, running_mean, running_var)
    torch.library.opcheck(ops.batch_stat_backward.default, (x, mean, coef[0], coef[1], None))
    torch.library.opcheck(
        ops.batch_stat_backward.default,
        (x, mean, coef[0], coef[1], torch.tensor(0.5, device=device)),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def step(x, running_mean, running_var):
        mean, var = delt_ext.batch_mean_var(x)
        return 2.0 * delt_ext.bn_stat_loss(x, running_mean, running_var) + var.sum() + mean.sum()

    compiled = torch.compile(step, fullgraph=True)
    for layout in ("nchw", "channels_last"):
        x = make_input((4, 6, 5, 5), torch.float32, layout, device).requires_grad_(True)
        running_mean, running_var = make_targets(6, device)
        expected = step(x, running_mean, running_var)
        (expected_grad,) = torch.autograd.grad(expected, x)
        value = compiled(x, running_mean, running_var)
        (grad,) = torch.autograd.grad(value, x)
        torch.testing.assert_close(value, expected)
        torch.testing.assert_close(grad, expected_grad)


# ---- bad input -------------------------------------------------------------------------------


def test_rejects_non_4d_input():
    with pytest.raises(ValueError, match=r"x must be a 4-D \(N, C, H, W\) tensor"):
        delt_ext.bn_stat_loss(torch.randn(4, 3, 5), torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="x must be a 4-D"):
        delt_ext.batch_mean_var(torch.randn(2, 3, 4, 5, 6))


def test_rejects_channel_mismatch():
    with pytest.raises(ValueError, match=r"running_mean must have shape \(3,\)"):
        delt_ext.bn_stat_loss(torch.randn(2, 3, 4, 4), torch.zeros(4), torch.ones(3))
    with pytest.raises(ValueError, match=r"running_var must have shape \(3,\)"):
        delt_ext.bn_stat_loss(torch.randn(2, 3, 4, 4), torch.zeros(3), torch.ones(3, 1))


def test_rejects_integer_dtypes():
    with pytest.raises(TypeError, match="x must be float32, float64, float16 or bfloat16"):
        delt_ext.bn_stat_loss(
            torch.ones(2, 3, 4, 4, dtype=torch.int64), torch.zeros(3), torch.ones(3)
        )
    with pytest.raises(TypeError, match="running_var must be a floating tensor"):
        delt_ext.bn_stat_loss(
            torch.randn(2, 3, 4, 4), torch.zeros(3), torch.ones(3, dtype=torch.int32)
        )


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4), (2, 0, 4, 4)])
def test_rejects_empty_input(shape):
    with pytest.raises(ValueError, match="x must hold at least one value per channel"):
        delt_ext.bn_stat_loss(torch.randn(shape), torch.zeros(shape[1]), torch.ones(shape[1]))
    with pytest.raises(ValueError, match="x must hold at least one value per channel"):
        delt_ext.batch_mean_var(torch.randn(shape))


def test_rejects_statistics_on_another_device():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="running_mean is on meta but x is on cpu"):
        delt_ext.bn_stat_loss(x, torch.zeros(3, device="meta"), torch.ones(3))


@requires_cuda
def test_rejects_cpu_statistics_for_cuda_input():
    x = torch.randn(2, 3, 4, 4, device="cuda")
    with pytest.raises(ValueError, match="running_var is on cpu but x is on cuda:0"):
        delt_ext.bn_stat_loss(x, torch.zeros(3, device="cuda"), torch.ones(3))


def test_rejects_non_tensors():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        delt_ext.batch_mean_var([[1.0]])
    with pytest.raises(TypeError, match="running_mean must be a torch.Tensor"):
        delt_ext.bn_stat_loss(torch.randn(2, 3, 4, 4), [0.0] * 3, torch.ones(3))


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_op_checks_its_own_arguments(device):
    # Callers of torch.ops.delt_ext.* directly get the kernel's checks, not a crash.
    with pytest.raises(RuntimeError, match="x must be a 4-D"):
        torch.ops.delt_ext.batch_mean_var(torch.randn(3, 4, device=device))
    with pytest.raises(RuntimeError, match="running_mean must be a 1-D tensor"):
        torch.ops.delt_ext.bn_stat_loss(
            torch.randn(2, 3, 4, 4, device=device),
            torch.zeros(2, device=device),
            torch.ones(3, device=device),
        )


# ---- build, fallback ---------------------------------------------------------------------------


def test_build_info_reports_the_compiled_library(tmp_path):
    info = delt_ext.build_info()
    assert info.compiled_library and delt_ext.HAS_OPS
    assert info.built_with_torch == torch.__version__.split("+")[0]
    if info.cuda_kernels:
        assert info.cuda_version and info.cuda_archs
    out = subprocess.run(
        [sys.executable, "-m", "delt_ext"], capture_output=True, text=True, check=True, cwd=tmp_path
    ).stdout
    assert "compiled library  loaded" in out and "CUDA kernels" in out and torch.__version__ in out


def test_cuda_tensor_on_cpu_only_build_gives_clear_error():
    if delt_ext.build_info().cuda_kernels:
        pytest.skip("this build has CUDA kernels")
    # Call the CUDA kernel of the op directly: no GPU is needed to reach the registration.
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with pytest.raises(RuntimeError, match="built without CUDA kernels.*FORCE_CUDA=1"):
        torch.ops.delt_ext.bn_stat_loss.default.redispatch(
            keys, torch.randn(2, 3, 4, 4), torch.zeros(3), torch.ones(3)
        )


FALLBACK_SCRIPT = """
import sys, warnings
sys.modules["delt_ext._C"] = None  # makes `from delt_ext import _C` fail like a broken build
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, delt_ext
    from delt_ext import reference
x = torch.randn(4, 3, 5, 5, requires_grad=True)
rm, rv = torch.randn(3), torch.rand(3)
loss = delt_ext.bn_stat_loss(x, rm, rv)
loss.backward()
messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
assert len(messages) == 1, messages
assert "could not be loaded" in messages[0] and "reference" in messages[0]
assert not delt_ext.HAS_OPS and not delt_ext.build_info().compiled_library
assert torch.equal(loss, reference.bn_stat_loss(x, rm, rv))
model = torch.nn.Sequential(torch.nn.BatchNorm2d(3)).eval()
with delt_ext.BNStatMatching(model) as matching:
    model(x)
    expected = 10.0 * reference.bn_stat_loss(x, model[0].running_mean, model[0].running_var)
    assert torch.equal(matching.loss(), expected)
print("fallback ok")
"""


def test_falls_back_to_reference_with_one_warning_when_library_is_missing(tmp_path):
    # cwd=tmp_path: import the package under test, not a source tree in the working directory.
    result = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout


def test_setup_without_torch_says_what_to_do():
    script = (
        "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
        f"exec(compile(open({str(ROOT / 'setup.py')!r}).read(), 'setup.py', 'exec'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert "install torch first" in message.lower()
    assert "pip install --no-build-isolation ." in message


@pytest.mark.parametrize(
    "variable, flags",
    [
        ("NVCC_FLAGS", "-O3 --use_fast_math"),
        ("NVCC_FLAGS", "-use_fast_math"),
        ("NVCC_FLAGS", "--ftz=true"),
        ("NVCC_FLAGS", "--prec-div=false"),
        ("NVCC_FLAGS", "-Xcompiler=-ffast-math,-O3"),
        ("NVCC_APPEND_FLAGS", "--use_fast_math"),
    ],
)
def test_setup_refuses_fast_math_nvcc_flags(variable, flags):
    env = {**os.environ, variable: flags}
    result = subprocess.run(
        [sys.executable, "setup.py", "--version"], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert variable in message and "fast-math" in message and "not supported" in message


def test_setup_accepts_ordinary_nvcc_flags():
    env = {**os.environ, "NVCC_FLAGS": "-O3 --ftz=false -lineinfo"}
    result = subprocess.run(
        [sys.executable, "setup.py", "--version"], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert result.returncode == 0, result.stderr


# ---- CUDA --------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BN_SHAPES + [(100, 64, 32, 32), (16, 512, 7, 7)])
def test_cuda_matches_cpu_and_is_deterministic(shape, dtype, layout):
    x_cpu = make_input(shape, dtype, layout)
    running_mean, running_var = make_targets(shape[1])
    x = x_cpu.cuda().requires_grad_(True)
    runs = []
    for _ in range(2):
        loss = delt_ext.bn_stat_loss(x, running_mean.cuda(), running_var.cuda())
        (grad,) = torch.autograd.grad(loss, x)
        runs.append((loss, grad, *delt_ext.batch_mean_var(x)))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    expected_loss, expected_grad = exact_reference(x_cpu, running_mean, running_var)
    loss, grad = runs[0][0].cpu(), runs[0][1].cpu()
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=0)
    assert rel_err(grad, expected_grad) <= max(GRAD_RTOL[dtype], 1e-5)
    assert grad.stride() == x.stride()
