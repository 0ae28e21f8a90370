"""BNStatMatching against SRe2L's list of BNFeatureHook on real torchvision models."""

import copy

import pytest
import torch
from conftest import DEVICES
from torch import nn
from torchvision.models import resnet18

import delt_ext


class SRe2LBNFeatureHook:
    """SRe2L's recover/utils.py BNFeatureHook, as every batch-to-global repository copies it."""

    def __init__(self, module):
        self.hook = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module, input, output):
        nch = input[0].shape[1]
        mean = input[0].mean([0, 2, 3])
        var = input[0].permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
        self.r_feature = torch.norm(module.running_var.data - var, 2) + torch.norm(
            module.running_mean.data - mean, 2
        )

    def close(self):
        self.hook.remove()


def frozen_teacher(seed=0):
    """A resnet18 in eval mode with frozen weights and non-trivial running statistics."""
    torch.manual_seed(seed)
    model = resnet18(num_classes=10)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def sre2l_loss(model, inputs, first_bn_multiplier=10.0):
    hooks = [SRe2LBNFeatureHook(m) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model(inputs)
    rescale = [first_bn_multiplier] + [1.0] * (len(hooks) - 1)
    loss = sum(mult * hook.r_feature for mult, hook in zip(rescale, hooks, strict=True))
    per_layer = [hook.r_feature for hook in hooks]
    for hook in hooks:
        hook.close()
    return loss, per_layer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_resnet18_loss_and_gradient_equal_sre2l_hooks(channels_last, device):
    model = frozen_teacher().to(device)
    inputs = torch.randn(4, 3, 64, 64).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    inputs.requires_grad_(True)

    # Full float32 convolutions on CUDA (cuDNN would use TF32): the comparison is of the losses.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        expected, expected_layers = sre2l_loss(model, inputs)
        (expected_grad,) = torch.autograd.grad(expected, inputs)

        matching = delt_ext.BNStatMatching(model, first_bn_multiplier=10.0)
        model(inputs)
        loss = matching.loss()
        (grad,) = torch.autograd.grad(loss, inputs)
    layers = matching.layer_losses()
    matching.remove()

    assert len(matching) == len(expected_layers) == 20
    assert matching.layer_names[0] == "bn1" and matching.weights[:2] == [10.0, 1.0]
    torch.testing.assert_close(
        torch.stack(layers), torch.stack(expected_layers), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-3, atol=1e-6)
    # The x10 weight is on the first layer only.
    torch.testing.assert_close(loss, 10 * layers[0] + sum(layers[1:]), rtol=1e-6, atol=0)


def test_later_forward_replaces_earlier_losses():
    model = frozen_teacher()
    matching = delt_ext.BNStatMatching(model)
    model(torch.randn(2, 3, 32, 32))
    first = matching.loss()
    second_inputs = torch.randn(2, 3, 32, 32) * 3
    model(second_inputs)
    expected, _ = sre2l_loss(model, second_inputs)
    torch.testing.assert_close(matching.loss(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(first, matching.loss())


def test_remove_and_context_manager_detach_every_hook():
    model = frozen_teacher()
    with delt_ext.BNStatMatching(model) as matching:
        model(torch.randn(2, 3, 32, 32))
        assert matching.loss().item() > 0
    assert all(not m._forward_pre_hooks for m in model.modules())
    matching.remove()  # twice is fine
    with pytest.raises(RuntimeError, match="no forward pass"):
        matching.loss()


def test_layers_of_different_widths_are_weighted_first_then_one():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5)
    )
    model.eval()
    matching = delt_ext.BNStatMatching(model, first_bn_multiplier=2.0)
    x = torch.randn(3, 3, 8, 8, requires_grad=True)
    model(x)
    layers = matching.layer_losses()
    assert len(layers) == 2
    torch.testing.assert_close(matching.loss(), 2.0 * layers[0] + layers[1])


def test_loss_before_forward_is_an_error():
    matching = delt_ext.BNStatMatching(frozen_teacher())
    with pytest.raises(RuntimeError, match="no forward pass of the model has been recorded"):
        matching.loss()


def test_layers_missed_by_the_forward_are_reported():
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.BatchNorm2d(3)
            self.unused = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.used(x)

    model = TwoBranches().eval()
    matching = delt_ext.BNStatMatching(model)
    model(torch.randn(2, 3, 4, 4))
    with pytest.raises(RuntimeError, match=r"did not reach the BN layers \['unused'\]"):
        matching.loss()


def test_model_without_bn_layers_is_refused():
    with pytest.raises(ValueError, match="has no BatchNorm2d or SyncBatchNorm layer"):
        delt_ext.BNStatMatching(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()))


def test_bn_without_running_statistics_is_refused():
    model = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="BN layer '0' keeps no running statistics"):
        delt_ext.BNStatMatching(model)


def test_bad_multiplier_and_model_are_refused():
    with pytest.raises(TypeError, match="first_bn_multiplier must be a number"):
        delt_ext.BNStatMatching(frozen_teacher(), first_bn_multiplier="10")
    with pytest.raises(ValueError, match="first_bn_multiplier must be finite"):
        delt_ext.BNStatMatching(frozen_teacher(), first_bn_multiplier=float("nan"))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        delt_ext.BNStatMatching(object())


def test_sync_batchnorm_layers_are_matched():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4)).eval()
    matching = delt_ext.BNStatMatching(model)
    x = torch.randn(2, 3, 6, 6)
    # SyncBatchNorm needs a process group only in training mode; in eval it runs locally.
    model(x)
    features = model[0](x)
    expected = 10.0 * delt_ext.reference.bn_stat_loss(
        features, model[1].running_mean, model[1].running_var
    )
    torch.testing.assert_close(matching.loss(), expected, rtol=1e-5, atol=1e-6)


def test_replicas_of_hooked_layers_are_refused():
    # nn.DataParallel runs shallow copies of the modules that share their hook dictionaries;
    # the statistics of different replicas would overwrite each other, so this must fail loudly.
    model = nn.Sequential(nn.BatchNorm2d(3)).eval()
    delt_ext.BNStatMatching(model)
    replica = copy.copy(model[0])
    with pytest.raises(RuntimeError, match="DataParallel replica"):
        replica(torch.randn(2, 3, 4, 4))


def test_single_device_data_parallel_wrapper_as_in_sre2l():
    # SRe2L hooks a teacher wrapped in nn.DataParallel; with at most one visible device the
    # wrapper calls the model itself, so the drop-in gives the hooks' loss unchanged.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = frozen_teacher().to(device)
    inputs = torch.randn(2, 3, 32, 32, device=device)
    expected, _ = sre2l_loss(model, inputs)
    wrapper = nn.DataParallel(model, device_ids=[0] if device == "cuda" else None)
    with delt_ext.BNStatMatching(wrapper) as matching:
        wrapper(inputs)
        torch.testing.assert_close(matching.loss(), expected, rtol=1e-5, atol=1e-6)


def test_works_with_a_compiled_model():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
    ).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
    matching = delt_ext.BNStatMatching(model)
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    model(x)
    expected = matching.loss()
    (expected_grad,) = torch.autograd.grad(expected, x)
    compiled = torch.compile(model)
    compiled(x)
    loss = matching.loss()
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
