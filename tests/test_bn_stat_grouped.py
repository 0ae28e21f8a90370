"""The grouped BN-statistic loss (per-group targets, one read of x) against its plain-PyTorch
reference (delt_ext.reference.bn_stat_loss_grouped: a Python loop over the groups), against the
ungrouped op applied to each group's samples, and its errors."""

import pytest
import torch
from conftest import BN_LAYOUTS, DTYPES, GRAD_RTOL
from test_bn_stat import (
    NONFINITE_CASES,
    assert_matches_with_nonfinite,
    make_input,
    nonfinite_input,
    rel_err,
)

import delt_ext
from delt_ext import reference

pytestmark = pytest.mark.skipif(not delt_ext.HAS_OPS, reason="compiled delt_ext library not built")

ops = torch.ops.delt_ext

# (N, C, H, W): whole planes, split planes (H*W > 4096), one value per channel, odd channel
# counts, many samples per group.
SHAPES = [(8, 16, 9, 7), (3, 5, 64, 65), (6, 6, 1, 1), (12, 37, 5, 5), (10, 130, 3, 3)]


def group_index(n, pattern, seed=0):
    """(index, G) for a batch of n samples: "one" (G = 1), "each" (G = N, one sample per group),
    "contiguous" (chunks of 2-3), "random" (random groups, some of them empty)."""
    generator = torch.Generator().manual_seed(seed)
    if pattern == "one":
        return torch.zeros(n, dtype=torch.int64), 1
    if pattern == "each":
        return torch.randperm(n, generator=generator), n
    if pattern == "contiguous":
        size = 2 if n % 2 == 0 else 3
        return torch.arange(n) // size, (n + size - 1) // size
    groups = n + 3  # at least three groups without samples
    return torch.randint(0, groups, (n,), generator=generator), groups


def group_targets(groups, channels, seed=1, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(groups, channels, generator=generator)
    var = torch.rand(groups, channels, generator=generator) + 0.5
    return mean.to(dtype), var.to(dtype)


def group_weights(groups, seed=2):
    return torch.rand(groups, generator=torch.Generator().manual_seed(seed)) * 3


def exact_grouped(x, index, target_mean, target_var, weight=None):
    """Loss and gradient of the reference in float64 on the same input values."""
    x64 = x.detach().double().requires_grad_(True)
    w = None if weight is None else weight.double()
    loss = reference.bn_stat_loss_grouped(x64, index, target_mean.double(), target_var.double(), w)
    (grad,) = torch.autograd.grad(loss, x64)
    return loss, grad


PATTERNS = ["one", "each", "contiguous", "random"]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_loss_and_grad_match_reference(shape, dtype, layout, pattern):
    x = make_input(shape, dtype, layout).requires_grad_(True)
    index, groups = group_index(shape[0], pattern)
    target_mean, target_var = group_targets(groups, shape[1])
    weight = group_weights(groups) if pattern != "one" else None

    loss = delt_ext.bn_stat_loss(x, target_mean, target_var, group_index=index, weight=weight)
    (grad,) = torch.autograd.grad(loss, x)
    expected_loss, expected_grad = exact_grouped(x, index, target_mean, target_var, weight)

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.shape == () and loss.dtype == acc
    assert grad.dtype == dtype and grad.stride() == torch.empty_like(x).stride()
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(loss.double(), expected_loss, rtol=rtol, atol=0)
    assert torch.isfinite(grad).all()
    assert rel_err(grad, expected_grad) <= GRAD_RTOL[dtype]


@pytest.mark.cuda
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_the_cuda_kernel_matches_the_reference(shape, dtype, layout, pattern):
    # The CUDA kernel itself on a GPU (make gpu-check), beside the host emulation's tests.
    x = make_input(shape, dtype, layout, device="cuda").requires_grad_(True)
    index, groups = group_index(shape[0], pattern)
    target_mean, target_var = group_targets(groups, shape[1])
    weight = group_weights(groups) if pattern != "one" else None
    on_gpu = [t if t is None else t.cuda() for t in (index, target_mean, target_var, weight)]
    loss = delt_ext.bn_stat_loss(
        x, on_gpu[1], on_gpu[2], group_index=on_gpu[0], weight=on_gpu[3]
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, x)
    expected_loss, expected_grad = exact_grouped(x.cpu(), index, target_mean, target_var, weight)
    assert loss.device.type == "cuda" and grad.stride() == torch.empty_like(x).stride()
    torch.testing.assert_close(loss.double().cpu(), expected_loss, rtol=1e-5, atol=0)
    assert torch.isfinite(grad).all()
    assert rel_err(grad.cpu(), expected_grad) <= GRAD_RTOL[dtype]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_statistics_and_group_losses_match_reference(pattern, layout):
    shape = (12, 37, 5, 5)
    x = make_input(shape, torch.float64, layout)
    index, groups = group_index(shape[0], pattern)
    target_mean, target_var = group_targets(groups, shape[1], dtype=torch.float64)
    loss, group_loss, mean, var, coef = ops.bn_stat_loss_grouped(
        x, index, target_mean, target_var, None
    )
    ref_mean, ref_var = reference.group_mean_var(x, index, groups)
    assert mean.shape == var.shape == (groups, shape[1]) and coef.shape == (2, groups, shape[1])
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(var, ref_var, rtol=1e-12, atol=1e-12, equal_nan=True)
    counts = torch.bincount(index, minlength=groups)
    for g in range(groups):
        if counts[g] == 0:
            # A group without samples: NaN statistics, nothing to the loss or the gradients.
            assert mean[g].isnan().all() and var[g].isnan().all()
            assert group_loss[g] == 0 and not coef[:, g].any()
            continue
        members = (index == g).nonzero().flatten()
        expected = reference.bn_stat_loss(x[members], target_mean[g], target_var[g])
        torch.testing.assert_close(group_loss[g], expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(loss, group_loss.sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_group_equals_the_ungrouped_op_on_its_samples(dtype, layout):
    # The ungrouped op is the G = 1 case: per group, the same statistics, loss and gradient as
    # bn_stat_loss on the group's samples alone (up to the order of float sums).
    shape = (9, 24, 6, 7)
    x = make_input(shape, dtype, layout)
    index = torch.tensor([2, 0, 1, 2, 2, 0, 1, 1, 0])
    target_mean, target_var = group_targets(3, shape[1])
    loss, group_loss, mean, var, coef = ops.bn_stat_loss_grouped(
        x, index, target_mean, target_var, None
    )
    xg = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(
        delt_ext.bn_stat_loss(xg, target_mean, target_var, group_index=index), xg
    )
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for g in range(3):
        members = (index == g).nonzero().flatten()
        part = x[members].contiguous(memory_format=delt_ext.ops.layout_format(x))
        part = part.detach().requires_grad_(True)
        expected = ops.bn_stat_loss(part, target_mean[g], target_var[g])
        (expected_grad,) = torch.autograd.grad(expected[0], part)
        torch.testing.assert_close(group_loss[g], expected[0], rtol=tol, atol=0)
        torch.testing.assert_close(mean[g], expected[1], rtol=tol, atol=tol)
        torch.testing.assert_close(var[g], expected[2], rtol=tol, atol=tol)
        assert rel_err(grad[members], expected_grad) <= GRAD_RTOL[dtype]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_one_group_is_close_to_the_ungrouped_op(layout):
    x = make_input((16, 32, 12, 12), torch.float32, layout).requires_grad_(True)
    running_mean, running_var = group_targets(1, 32)
    index = torch.zeros(16, dtype=torch.int64)
    grouped = delt_ext.bn_stat_loss(x, running_mean, running_var, group_index=index)
    ungrouped = delt_ext.bn_stat_loss(x, running_mean[0], running_var[0])
    (grad,) = torch.autograd.grad(grouped, x)
    (ungrouped_grad,) = torch.autograd.grad(ungrouped, x)
    torch.testing.assert_close(grouped, ungrouped, rtol=1e-6, atol=0)
    assert rel_err(grad, ungrouped_grad) <= 1e-5


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_gradcheck_float64(pattern, layout):
    x = make_input((6, 3, 4, 5), torch.float64, layout).requires_grad_(True)
    index, groups = group_index(6, pattern, seed=3)
    target_mean, target_var = (
        t.requires_grad_(True) for t in group_targets(groups, 3, dtype=torch.float64)
    )
    weight = group_weights(groups).double().requires_grad_(True)

    def loss(x, target_mean, target_var, weight):
        return delt_ext.bn_stat_loss(x, target_mean, target_var, group_index=index, weight=weight)

    def outputs(x, target_mean, target_var):
        # Every differentiable output of the op: loss, per-group losses, statistics.
        out = ops.bn_stat_loss_grouped(x, index, target_mean, target_var, None)
        return out[0], out[1], out[2].nan_to_num(), out[3].nan_to_num()

    assert torch.autograd.gradcheck(loss, (x, target_mean, target_var, weight))
    assert torch.autograd.gradcheck(outputs, (x, target_mean, target_var))


def test_group_losses_and_statistics_reach_the_gradient():
    x = make_input((7, 4, 3, 3), torch.float64, "nchw").requires_grad_(True)
    index = torch.tensor([1, 1, 0, 3, 0, 1, 3])  # group 2 empty
    target_mean, target_var = group_targets(4, 4, dtype=torch.float64)
    loss, group_loss, mean, var, _ = ops.bn_stat_loss_grouped(
        x, index, target_mean, target_var, torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=torch.float64)
    )
    present = torch.tensor([0, 1, 3])
    value = (
        loss + (group_loss * torch.arange(4.0)).sum() + mean[present].sum() + 3 * var[present].sum()
    )
    (grad,) = torch.autograd.grad(value, x)
    ref_mean, ref_var = reference.group_mean_var(x, index, 4)
    ref_group = torch.stack(
        [
            reference.bn_stat_loss(x[index == g], target_mean[g], target_var[g])
            if g in (0, 1, 3)
            else x.new_zeros(())
            for g in range(4)
        ]
    )
    ref_loss = (ref_group * torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=torch.float64)).sum()
    ref_value = (
        ref_loss
        + (ref_group * torch.arange(4.0)).sum()
        + ref_mean[present].sum()
        + 3 * ref_var[present].sum()
    )
    (grad_ref,) = torch.autograd.grad(ref_value, x)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(100, 64, 8, 8), (6, 8, 70, 70), (3000, 3, 4, 4)])
def test_results_do_not_depend_on_thread_count(shape, layout, num_threads):
    x = make_input(shape, torch.float32, layout).requires_grad_(True)
    index = torch.randint(0, 7, (shape[0],), generator=torch.Generator().manual_seed(5))
    target_mean, target_var = group_targets(7, shape[1])
    results = []
    for threads in (1, 2, 3):
        num_threads(threads)
        out = ops.bn_stat_loss_grouped(x, index, target_mean, target_var, None)
        (grad,) = torch.autograd.grad(out[0], x)
        results.append((*out, grad))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", NONFINITE_CASES, ids=list(NONFINITE_CASES))
def test_nan_inf_and_overflow_follow_the_ungrouped_semantics_per_group(case, layout):
    # Each group behaves as the ungrouped op on that group's samples (tests/test_bn_stat.py):
    # a NaN makes its group's loss and its samples' gradients NaN, and leaves the others alone.
    x = nonfinite_input(case, layout).requires_grad_(True)
    index = torch.tensor([1, 0, 1, 0])
    target_mean, target_var = group_targets(2, 3)
    loss, group_loss, mean, var, _ = ops.bn_stat_loss_grouped(
        x, index, target_mean, target_var, None
    )
    (grad,) = torch.autograd.grad(loss, x)
    for g in range(2):
        members = (index == g).nonzero().flatten()
        part = x.detach()[members].contiguous(memory_format=delt_ext.ops.layout_format(x))
        part.requires_grad_(True)
        ref = ops.bn_stat_loss(part, target_mean[g], target_var[g])
        (ref_grad,) = torch.autograd.grad(ref[0], part)
        assert_matches_with_nonfinite(group_loss[g], ref[0], 1e-5)
        assert_matches_with_nonfinite(mean[g], ref[1], 1e-5)
        assert_matches_with_nonfinite(var[g], ref[2], 1e-4)
        assert_matches_with_nonfinite(grad[members], ref_grad, 1e-4)
    assert_matches_with_nonfinite(loss, group_loss.sum(), 1e-6)


def test_empty_groups_add_nothing_and_get_no_gradient():
    x = make_input((4, 3, 5, 5), torch.float32, "nchw").requires_grad_(True)
    index = torch.tensor([0, 0, 2, 2])
    target_mean, target_var = (t.requires_grad_(True) for t in group_targets(4, 3))
    weight = torch.tensor([1.0, float("inf"), 2.0, float("nan")], requires_grad=True)
    loss = delt_ext.bn_stat_loss(x, target_mean, target_var, group_index=index, weight=weight)
    grads = torch.autograd.grad(loss, (x, target_mean, target_var, weight))
    expected = reference.bn_stat_loss_grouped(x, index, target_mean, target_var, weight)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    assert all(torch.isfinite(g).all() for g in grads[:3])
    for g in (1, 3):  # no samples: whatever their targets and weights, no gradient
        assert not grads[1][g].any() and not grads[2][g].any() and grads[3][g] == 0


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck(layout):
    x = make_input((5, 6, 4, 3), torch.float32, layout)
    index = torch.tensor([0, 2, 0, 2, 1])
    target_mean, target_var = group_targets(3, 6)
    weight = group_weights(3)
    for requires_grad in (False, True):
        xg = x.detach().requires_grad_(requires_grad)
        for w in (None, weight):
            torch.library.opcheck(
                ops.bn_stat_loss_grouped.default, (xg, index, target_mean, target_var, w)
            )
    # An empty group (G = 4): its NaN statistics fail the harness's output comparisons (NaN is
    # not equal to NaN there), so only the schema, fake kernel and autograd registration.
    target_mean, target_var = group_targets(4, 6)
    torch.library.opcheck(
        ops.bn_stat_loss_grouped.default,
        (x.detach().requires_grad_(True), index, target_mean, target_var, group_weights(4)),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    _, _, mean, _, coef = ops.bn_stat_loss_grouped(x, index, target_mean, target_var, None)
    for scale in (None, torch.tensor(0.5), group_weights(4)):
        torch.library.opcheck(
            ops.grouped_stat_backward.default, (x, index, mean, coef[0], coef[1], scale)
        )


def test_torch_compile_fullgraph():
    def step(x, index, target_mean, target_var, weight):
        return 2.0 * delt_ext.bn_stat_loss(
            x, target_mean, target_var, group_index=index, weight=weight
        ) + delt_ext.bn_stat_loss(x, target_mean[0], target_var[0])

    compiled = torch.compile(step, fullgraph=True)
    for layout in ("nchw", "channels_last"):
        x = make_input((6, 5, 4, 4), torch.float32, layout).requires_grad_(True)
        index = torch.tensor([2, 0, 0, 2, 1, 2])
        target_mean, target_var = group_targets(4, 5)
        weight = group_weights(4)
        expected = step(x, index, target_mean, target_var, weight)
        (expected_grad,) = torch.autograd.grad(expected, x)
        value = compiled(x, index, target_mean, target_var, weight)
        (grad,) = torch.autograd.grad(value, x)
        torch.testing.assert_close(value, expected)
        torch.testing.assert_close(grad, expected_grad)


# ---- bad input -------------------------------------------------------------------------------


def test_rejects_group_index_out_of_range():
    x = torch.randn(4, 3, 2, 2)
    target_mean, target_var = group_targets(2, 3)
    for bad in (torch.tensor([0, 1, 2, 0]), torch.tensor([0, -1, 1, 0])):
        with pytest.raises(ValueError, match=r"outside \[0, 2\): the targets have G = 2 rows"):
            delt_ext.bn_stat_loss(x, target_mean, target_var, group_index=bad)
        with pytest.raises(RuntimeError, match=r"group_index\[1|2\] = .* is out of range"):
            ops.bn_stat_loss_grouped(x, bad, target_mean, target_var, None)
        mean = torch.zeros(2, 3)
        with pytest.raises(RuntimeError, match="is out of range"):
            ops.grouped_stat_backward(x, bad, mean, mean, mean, None)


def test_rejects_wrong_shapes_and_dtypes():
    x = torch.randn(4, 3, 2, 2)
    index = torch.tensor([0, 1, 1, 0])
    target_mean, target_var = group_targets(2, 3)
    with pytest.raises(ValueError, match=r"running_mean must have shape \(G, 3\)"):
        delt_ext.bn_stat_loss(x, torch.zeros(3), target_var, group_index=index)
    with pytest.raises(ValueError, match=r"running_var must have shape \(G, 3\)"):
        delt_ext.bn_stat_loss(x, target_mean, torch.ones(2, 4), group_index=index)
    with pytest.raises(ValueError, match="the same shape"):
        delt_ext.bn_stat_loss(x, target_mean, torch.ones(3, 3), group_index=index)
    with pytest.raises(ValueError, match=r"group_index must be an int64 tensor of shape \(4,\)"):
        delt_ext.bn_stat_loss(x, target_mean, target_var, group_index=index.int())
    with pytest.raises(ValueError, match=r"group_index must be an int64 tensor of shape \(4,\)"):
        delt_ext.bn_stat_loss(x, target_mean, target_var, group_index=index[:3])
    with pytest.raises(ValueError, match=r"weight must be a floating tensor of shape \(2,\)"):
        delt_ext.bn_stat_loss(x, target_mean, target_var, group_index=index, weight=torch.ones(3))
    with pytest.raises(ValueError, match="weight .* needs group_index"):
        delt_ext.bn_stat_loss(x, target_mean[0], target_var[0], weight=torch.ones(1))
    with pytest.raises(TypeError, match="group_index must be a torch.Tensor"):
        delt_ext.bn_stat_loss(x, target_mean, target_var, group_index=[0, 1, 1, 0])
    # The op's own checks, for callers of torch.ops.delt_ext directly.
    with pytest.raises(RuntimeError, match=r"target_mean must be a 2-D \(G, C\) tensor"):
        ops.bn_stat_loss_grouped(x, index, torch.zeros(3), target_var, None)
    with pytest.raises(RuntimeError, match="group_index must be int64"):
        ops.bn_stat_loss_grouped(x, index.int(), target_mean, target_var, None)
    with pytest.raises(RuntimeError, match="one group per sample"):
        ops.bn_stat_loss_grouped(x, index[:2], target_mean, target_var, None)
    with pytest.raises(RuntimeError, match="weight must be a 1-D tensor with one value per group"):
        ops.bn_stat_loss_grouped(x, index, target_mean, target_var, torch.ones(5))
    with pytest.raises(RuntimeError, match="grad_scale must hold one value or one per group"):
        mean = torch.zeros(2, 3)
        ops.grouped_stat_backward(x, index, mean, mean, mean, torch.ones(3))
