"""delt.synthesis: one chunk's loop (EarlyLate masking, the union in the batch, the crop
curriculum in the settings) and run setup."""

import pytest
import torch
from delt.data import DatasetInfo
from delt.models import build_model
from delt.synthesis import RecoverySettings, optimize_chunk

import delt_ext


def _settings(info, curriculum="cosine"):
    low, high = info.pixel_bounds()
    return RecoverySettings(0.25, (0.5, 0.9), 0.01, curriculum, 0, False, "none", False, low, high)


def test_late_images_are_untouched_until_they_join():
    info = DatasetInfo("t", 2, 3, 8, (0.5,) * 3, (0.25,) * 3, ("a", "b"))
    torch.manual_seed(0)
    teacher = build_model("convnet1", info, {"width": 4}).eval().requires_grad_(False)
    teacher(torch.randn(1, 3, 8, 8))
    settings = _settings(info)
    init = torch.rand(4, 3, 8, 8)
    with delt_ext.BNStatMatching(teacher) as bn_matching:
        # Rows 2 and 3 would join at iteration 6 of a 6-iteration loop: never forwarded.
        result = optimize_chunk(
            teacher, bn_matching, init, torch.tensor([0, 1, 0, 1]), [0, 0, 6, 6], 6, settings,
            torch.Generator().manual_seed(0),
        )  # fmt: skip
    assert torch.equal(result.images[2:], init[2:])
    assert not torch.equal(result.images[:2], init[:2])


class _Recorder(torch.nn.Module):
    """Runs the teacher and keeps every input batch and BNStatMatching's per-layer losses."""

    def __init__(self, teacher, bn_matching):
        super().__init__()
        self.teacher, self.bn_matching = teacher, bn_matching
        self.inputs, self.layer_losses = [], []

    def forward(self, x):
        logits = self.teacher(x)
        self.inputs.append(x.detach().clone())
        self.layer_losses.append(
            [loss.detach().clone() for loss in self.bn_matching.layer_losses()]
        )
        return logits


def _manual_layer_losses(teacher, x):
    """SRe2L's per-layer ||mean - running_mean||_2 + ||var - running_var||_2, by hand."""
    inputs = []
    bns = [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    handles = [bn.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for bn in bns]
    with torch.no_grad():
        teacher(x)
    for handle in handles:
        handle.remove()
    losses = []
    for bn, value in zip(bns, inputs, strict=True):
        mean = value.mean(dim=(0, 2, 3))
        var = value.var(dim=(0, 2, 3), unbiased=False)
        losses.append(torch.norm(mean - bn.running_mean) + torch.norm(var - bn.running_var))
    return losses


@pytest.mark.parametrize("frozen_sample", [None, 3])
def test_union_in_batch_matches_the_bn_statistics_of_the_union(frozen_sample):
    info = DatasetInfo("t", 2, 3, 8, (0.5,) * 3, (0.25,) * 3, ("a", "b"))
    torch.manual_seed(0)
    teacher = build_model("convnet2", info, {"width": 4})
    teacher.train()
    teacher(torch.randn(64, 3, 8, 8) * 2 + 1)  # running statistics that are not 0/1
    teacher.eval().requires_grad_(False)
    settings = _settings(info)
    init = torch.rand(2, 3, 8, 8)
    frozen = torch.rand(6, 3, 8, 8) * 0.3 - 1.0  # other statistics than the new images'
    frozen_before = frozen.clone()
    with delt_ext.BNStatMatching(teacher) as bn_matching:
        recorder = _Recorder(teacher, bn_matching)
        result = optimize_chunk(
            recorder, bn_matching, init, torch.tensor([0, 1]), [0, 0], 4, settings,
            torch.Generator().manual_seed(0), frozen=frozen, frozen_sample=frozen_sample,
        )  # fmt: skip
    union_size = 2 + (frozen_sample or 6)
    assert [x.shape[0] for x in recorder.inputs] == [union_size] * 4
    # Iteration 0 crops the whole image (curriculum scale 1): the batch is the new images, then
    # the frozen ones, under one shared flip.
    first = recorder.inputs[0]
    flip = torch.equal(first[:2], init.flip(3))
    assert flip or torch.equal(first[:2], init)
    frozen_view = frozen.flip(3) if flip else frozen
    for row in first[2:]:
        assert any(torch.equal(row, candidate) for candidate in frozen_view)
    if frozen_sample is None:
        assert torch.equal(first[2:], frozen_view)
    # Every step's BN losses are those of the whole union batch, not of the new images alone.
    for x, recorded in zip(recorder.inputs, recorder.layer_losses, strict=True):
        manual = _manual_layer_losses(teacher, x)
        new_only = _manual_layer_losses(teacher, x[:2])
        for got, want, alone in zip(recorded, manual, new_only, strict=True):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(got, alone, rtol=1e-2)
    # Gradients reach the new images only: the frozen ones are bitwise unchanged.
    assert torch.equal(frozen, frozen_before)
    assert not torch.equal(result.images, init)


@pytest.mark.parametrize(
    "curriculum, expected",
    [("fixed", [0.08] * 4), ("full", [1.0] * 4),
     ("cosine", [delt_ext.crop_scale_schedule(i, 4) for i in range(4)])],
)  # fmt: skip
def test_the_crop_curriculum_comes_from_the_settings(monkeypatch, curriculum, expected):
    # The loop's minimum crop scale at each step is the settings' curriculum: a variant such
    # as the IPC-1 ablation's whole-image crop needs no patching of delt_ext.
    info = DatasetInfo("t", 2, 3, 8, (0.5,) * 3, (0.25,) * 3, ("a", "b"))
    torch.manual_seed(0)
    teacher = build_model("convnet1", info, {"width": 4}).eval().requires_grad_(False)
    scales = []
    original = delt_ext.RandomResizedCropFlip.forward

    def record(self, images):
        scales.append(self.scale[0])
        return original(self, images)

    monkeypatch.setattr(delt_ext.RandomResizedCropFlip, "forward", record)
    with delt_ext.BNStatMatching(teacher) as bn_matching:
        optimize_chunk(
            teacher, bn_matching, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), [0, 0], 4,
            _settings(info, curriculum), torch.Generator().manual_seed(0),
        )  # fmt: skip
    assert scales == pytest.approx(expected)
