"""Forward + backward of the BN-statistic loss: fused op vs the eager SRe2L hook vs
torch.compile of that hook, with a same-device clone as the bandwidth yardstick.

Shapes are the BN inputs of ResNet-18: on CIFAR (batch 100, 32x32) and on ImageNet (224x224;
batch 100 on GPU, 8 on CPU). Run with `make bench`; `python benchmarks/report.py` turns the JSON
into the table of benchmarks/README.md.
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
