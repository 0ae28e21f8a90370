"""Forward + backward of the BN-statistic loss: fused op vs the eager SRe2L hook vs
torch.compile of that hook, with a same-device clone as the bandwidth yardstick.

Shapes are the BN inputs of ResNet-18: on CIFAR (batch 100, 32x32) and on ImageNet (224x224;
batch 100 on GPU, 8 on CPU). Run with `make bench`; `python benchmarks/report.py` turns the JSON
into the table of benchmarks/README.md.

The grouped loss (per-group targets: per-class statistics, or several chunks in one forward) is
timed on one CPU thread against the eager per-class loop (a Python loop over the groups slicing
the batch, mean and variance per slice) and against torch.compile of that loop, and with one
group against the ungrouped op.
"""

import pytest
import torch

import delt_ext

CUDA = torch.cuda.is_available()

CIFAR_SHAPES = [(100, 64, 32, 32), (100, 128, 16, 16), (100, 256, 8, 8), (100, 512, 4, 4)]


def imagenet_shapes(batch):
    return [
        (batch, 64, 112, 112),
        (batch, 64, 56, 56),
        (batch, 128, 28, 28),
        (batch, 256, 14, 14),
        (batch, 512, 7, 7),
    ]


def case(device, shape):
    marks = pytest.mark.skipif(device == "cuda" and not CUDA, reason="needs a GPU")
    return pytest.param(device, shape, marks=marks, id=f"{device}-{'x'.join(map(str, shape))}")


CASES = [case("cpu", shape) for shape in CIFAR_SHAPES + imagenet_shapes(8)]
CASES += [case("cuda", shape) for shape in CIFAR_SHAPES + imagenet_shapes(100)]


def sre2l_hook_loss(x, running_mean, running_var):
    """The eager hook of SRe2L / DeepInversion."""
    nch = x.shape[1]
    mean = x.mean([0, 2, 3])
    var = x.permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
    return torch.norm(running_var - var, 2) + torch.norm(running_mean - mean, 2)


# One specialization per benchmarked shape (dynamic=False, as a recovery loop would run).
torch._dynamo.config.recompile_limit = 64
compiled_hook_loss = torch.compile(sre2l_hook_loss, fullgraph=True, dynamic=False)

LOSSES = {
    "fused": delt_ext.bn_stat_loss,
    "eager-hook": sre2l_hook_loss,
    "compiled-hook": compiled_hook_loss,
}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def inputs(shape, device):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).to(device).requires_grad_(True)
    running_mean = torch.randn(shape[1], generator=generator).to(device)
    running_var = (torch.rand(shape[1], generator=generator) + 0.5).to(device)
    return x, running_mean, running_var


def label(device, shape):
    return f"{device} {tuple(shape)}"


@pytest.mark.parametrize("impl", list(LOSSES))
@pytest.mark.parametrize(("device", "shape"), CASES)
def test_bn_stat_loss_forward_backward(benchmark, device, shape, impl):
    x, running_mean, running_var = inputs(shape, device)
    loss_fn = LOSSES[impl]

    def step():
        loss = loss_fn(x, running_mean, running_var)
        torch.autograd.grad(loss, x)
        sync(device)

    for _ in range(3):  # warm-up, and compilation for the compiled hook
        step()
    benchmark.group = f"bn_stat fwd+bwd {label(device, shape)}"
    # Minimal traffic of a fused implementation: read x (forward), read x + write dx (backward).
    benchmark.extra_info["bytes"] = 3 * x.numel() * x.element_size()
    benchmark(step)


@pytest.mark.parametrize("impl", ["fused"])
@pytest.mark.parametrize(("device", "shape"), CASES)
def test_bn_stat_loss_forward(benchmark, device, shape, impl):
    x, running_mean, running_var = inputs(shape, device)

    def forward():
        with torch.no_grad():
            delt_ext.bn_stat_loss(x, running_mean, running_var)
        sync(device)

    forward()
    benchmark.group = f"bn_stat fwd {label(device, shape)}"
    benchmark.extra_info["bytes"] = x.numel() * x.element_size()
    benchmark(forward)


@pytest.mark.parametrize(("device", "shape"), CASES)
def test_clone_bandwidth(benchmark, device, shape):
    x = inputs(shape, device)[0].detach()

    def copy():
        x.clone()
        sync(device)

    copy()
    benchmark.group = f"clone {label(device, shape)}"
    benchmark.extra_info["bytes"] = 2 * x.numel() * x.element_size()
    benchmark(copy)


# ---- grouped loss: per-group targets ---------------------------------------------------------

# (shape, groups): groups of N / G consecutive samples.
GROUPED_CASES = [((1000, 64, 32, 32), 100), ((100, 64, 32, 32), 10)]


def per_class_loop(x, target_mean, target_var):
    """The eager way: one slice of the batch per group, its mean and variance, its two norms."""
    groups, nch = target_mean.shape
    size = x.shape[0] // groups
    total = x.new_zeros(())
    for g in range(groups):
        part = x[g * size : (g + 1) * size]
        mean = part.mean([0, 2, 3])
        var = part.permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
        total = total + torch.norm(target_var[g] - var, 2) + torch.norm(target_mean[g] - mean, 2)
    return total


compiled_per_class_loop = torch.compile(per_class_loop, fullgraph=True, dynamic=False)


def fused_grouped(x, target_mean, target_var, index):
    return delt_ext.bn_stat_loss(x, target_mean, target_var, group_index=index)


GROUPED = {
    "fused": lambda x, tm, tv, index: fused_grouped(x, tm, tv, index),
    "eager-loop": lambda x, tm, tv, index: per_class_loop(x, tm, tv),
    "compiled-loop": lambda x, tm, tv, index: compiled_per_class_loop(x, tm, tv),
}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def grouped_inputs(shape, groups):
    x, _, _ = inputs(shape, "cpu")
    generator = torch.Generator().manual_seed(1)
    target_mean = torch.randn(groups, shape[1], generator=generator)
    target_var = torch.rand(groups, shape[1], generator=generator) + 0.5
    index = torch.arange(shape[0]) // (shape[0] // groups)
    return x, target_mean, target_var, index


@pytest.mark.parametrize("impl", list(GROUPED))
@pytest.mark.parametrize(
    ("shape", "groups"), GROUPED_CASES, ids=[f"G{g}-{s[0]}" for s, g in GROUPED_CASES]
)
def test_grouped_forward_backward(benchmark, one_thread, shape, groups, impl):
    x, target_mean, target_var, index = grouped_inputs(shape, groups)
    loss_fn = GROUPED[impl]

    def step():
        loss = loss_fn(x, target_mean, target_var, index)
        torch.autograd.grad(loss, x)

    for _ in range(2):  # warm-up, and compilation for the compiled loop
        step()
    benchmark.group = f"bn_stat grouped fwd+bwd, 1 thread cpu {tuple(shape)} G={groups}"
    benchmark.extra_info["bytes"] = 3 * x.numel() * x.element_size()
    benchmark(step)


@pytest.mark.parametrize("impl", ["fused", "ungrouped"])
def test_one_group_forward_backward(benchmark, one_thread, impl):
    shape = (100, 64, 32, 32)
    x, target_mean, target_var, index = grouped_inputs(shape, 1)

    def step():
        if impl == "fused":
            loss = fused_grouped(x, target_mean, target_var, index)
        else:
            loss = delt_ext.bn_stat_loss(x, target_mean[0], target_var[0])
        torch.autograd.grad(loss, x)

    for _ in range(2):
        step()
    benchmark.group = f"bn_stat grouped fwd+bwd, 1 thread cpu {tuple(shape)} G=1"
    benchmark.extra_info["bytes"] = 3 * x.numel() * x.element_size()
    benchmark(step)
